//! The event counters (`COUNTERS`, per CPU, one slot of `Counter::COUNT` per
//! target): what each counts and the name userspace shows it by
//! (`tproxy-ebpf/src/counters.rs` adds to them).

/// Indexes into the per-CPU `COUNTERS` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Packets the tc ingress program looked at.
    IngressPackets = 0,
    /// Packets it steered to the proxy.
    IngressSteered,
    /// Packets the tc egress program looked at.
    EgressPackets,
    /// Reply packets whose source was restored.
    EgressRestored,
    /// getsockopt calls seen by the cgroup/getsockopt program.
    GetsockoptCalls,
    /// SO_ORIGINAL_DST answers given from the flow table.
    GetsockoptAnswered,
    /// getsockname() answers changed to the original destination.
    GetsocknameAnswered,
    /// sockops callbacks seen.
    SockopsEvents,
    /// Sockets inserted into the SOCKHASH.
    SockhashInserted,
    /// Sockets that left the SOCKHASH (closed).
    SockhashRemoved,
    /// sendmsg calls seen by sk_msg.
    MsgSeen,
    /// sendmsg calls redirected to the peer.
    MsgRedirected,
    /// Bytes redirected.
    MsgRedirectedBytes,
    /// sk_msg lookups that missed (passed to plain TCP).
    MsgMiss,
    /// Flow-table entries created.
    FlowsCreated,
    /// Flow-table entries removed on FIN/RST.
    FlowsRemoved,
    /// sendmsg calls passed to plain TCP while the sender is off the fast
    /// path (slow reader, or earlier TCP bytes still unread), or during
    /// teardown.
    MsgPassthrough,
    /// Times a sender left the fast path (its reader fell behind by more
    /// than `accel_max_queued`).
    AccelFallbacks,
    /// Bytes read by the applications from accelerated sockets (either
    /// path), until the pair leaves the SOCKHASH.
    MsgReadBytes,
    /// SYNs dropped because the same client address and port already has a
    /// live flow to another intercepted port (they would be one 4-tuple at
    /// the proxy).
    SteerCollisions,
    /// Times a sender came (back) to the fast path after sending by TCP,
    /// once its reader had read every byte.
    AccelResumed,
    /// Flows promoted from `SYNS` to `FLOWS`: the proxy's socket reached
    /// ESTABLISHED.
    FlowsEstablished,
    /// Established flows whose proxy socket closed (they linger, then go).
    FlowsClosed,
    /// Promotions refused because `FLOWS` was full (the flow stays
    /// embryonic: served, but evictable).
    FlowsTableFull,
    /// IP fragments after the first (no TCP header): passed untouched.
    Fragments,
    /// Frames with a VLAN tag (in the frame, or taken off by the device):
    /// passed untouched; run tproxy on the VLAN interface instead.
    VlanPassed,
    /// Wake-ups given to a reader that had read every redirected byte while
    /// bytes its peer sent by TCP were waiting (see sockops.rs: `nudge`).
    AccelNudges,
    /// Senders that left the fast path for good (`sock_flags::RETIRED`).
    AccelRetired,
    /// Pairs taken out of the SOCKHASH after retiring: plain TCP sockets again.
    AccelLeft,
    /// Proxy<->app pairs made (both ends in this target's namespace),
    /// counted in the app's target.
    AccelPairsApp,
    /// Client<->proxy pairs made across two targets of this node (a pod
    /// dialling another pod), counted in the server pod's target.
    AccelPairsPods,
    /// Pairings refused: a socket's key was pending, but the waiting socket
    /// is not the other end of its TCP connection (sequence numbers differ:
    /// a colliding or forged tuple). Both stay plain TCP.
    AccelPairsRefused,
    /// Reads that took the last redirected byte queued at a socket while
    /// bytes its peer sent by TCP were not read yet (Linux makes such a
    /// read short), each reported to the nudger.
    AccelShortReads,
    /// Readers the nudger woke: still asleep a moment after such a read,
    /// with the TCP bytes unread (tproxy-ebpf/src/nudge_iter.rs).
    AccelWakeups,
    /// Sends that went by TCP without sk_msg seeing them, found later from
    /// the socket's `write_seq` and counted in. Linux skips the program
    /// and reuses its last verdict (pass) on the send after one that TCP
    /// refused with EAGAIN (tcp_bpf_send_verdict keeps `psock->eval`), so
    /// `sent` alone would miss those bytes.
    AccelUncounted,
    /// Redirects held back (sent by TCP instead) because the peer had not
    /// read every byte this end gave TCP, by the kernel's sequence numbers
    /// (the sender's `write_seq` against the peer's `copied_seq`), though
    /// the byte counts said it had. Each one is a redirect that would have
    /// overtaken TCP bytes.
    AccelOrderHeld,
    /// Packets dropped at ingress because they may carry TCP but their
    /// header cannot be read: a first fragment too short for it (RFC
    /// 1858), an IPv4 TCP fragment at offset 8 (RFC 3128), an IPv6 header
    /// chain longer than the parser walks, a header cut short.
    IngressUnreadable,
    /// Packets other than a SYN to an intercepted port, of no flow tproxy
    /// steered nor one open when it attached (`PRIOR_FLOWS`): dropped, so
    /// no connection reaches the app around the proxy.
    IngressUnknownDropped,
    /// SYNs to an intercepted port dropped while the target drains (it
    /// steers no new flows, and none may reach the app around the proxy).
    SynsRefusedDraining,
    /// SYNs dropped because recording or rewriting them failed.
    SteerErrors,
    /// SYNs dropped because the socket listening on the proxy port is not
    /// one the proxy opened (a stranger standing in for it).
    SteerNotProxy,
    /// Promotions refused because the target holds its quota of `FLOWS`
    /// entries (`Config::flows_quota`): the flow stays embryonic.
    FlowsQuotaFull,
    /// Sockets not accelerated because the target holds its quota of
    /// accelerated sockets (`Config::socks_quota`): they stay plain TCP.
    AccelQuotaFull,
}

impl Counter {
    pub const ALL: [Counter; 43] = [
        Counter::IngressPackets,
        Counter::IngressSteered,
        Counter::EgressPackets,
        Counter::EgressRestored,
        Counter::GetsockoptCalls,
        Counter::GetsockoptAnswered,
        Counter::GetsocknameAnswered,
        Counter::SockopsEvents,
        Counter::SockhashInserted,
        Counter::SockhashRemoved,
        Counter::MsgSeen,
        Counter::MsgRedirected,
        Counter::MsgRedirectedBytes,
        Counter::MsgMiss,
        Counter::FlowsCreated,
        Counter::FlowsRemoved,
        Counter::MsgPassthrough,
        Counter::AccelFallbacks,
        Counter::MsgReadBytes,
        Counter::SteerCollisions,
        Counter::AccelResumed,
        Counter::FlowsEstablished,
        Counter::FlowsClosed,
        Counter::FlowsTableFull,
        Counter::Fragments,
        Counter::VlanPassed,
        Counter::AccelNudges,
        Counter::AccelRetired,
        Counter::AccelLeft,
        Counter::AccelPairsApp,
        Counter::AccelPairsPods,
        Counter::AccelPairsRefused,
        Counter::AccelShortReads,
        Counter::AccelWakeups,
        Counter::AccelUncounted,
        Counter::AccelOrderHeld,
        Counter::IngressUnreadable,
        Counter::IngressUnknownDropped,
        Counter::SynsRefusedDraining,
        Counter::SteerErrors,
        Counter::SteerNotProxy,
        Counter::FlowsQuotaFull,
        Counter::AccelQuotaFull,
    ];
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// Where this counter of counter slot `slot` is in `COUNTERS`.
    #[inline(always)]
    pub const fn index(self, slot: u32) -> u32 {
        slot * Self::COUNT + self as u32
    }

    pub const fn name(self) -> &'static str {
        match self {
            Counter::IngressPackets => "ingress_packets",
            Counter::IngressSteered => "ingress_steered",
            Counter::EgressPackets => "egress_packets",
            Counter::EgressRestored => "egress_restored",
            Counter::GetsockoptCalls => "getsockopt_calls",
            Counter::GetsockoptAnswered => "getsockopt_answered",
            Counter::GetsocknameAnswered => "getsockname_answered",
            Counter::SockopsEvents => "sockops_events",
            Counter::SockhashInserted => "sockhash_inserted",
            Counter::SockhashRemoved => "sockhash_removed",
            Counter::MsgSeen => "msg_seen",
            Counter::MsgRedirected => "msg_redirected",
            Counter::MsgRedirectedBytes => "msg_redirected_bytes",
            Counter::MsgMiss => "msg_miss",
            Counter::FlowsCreated => "flows_created",
            Counter::FlowsRemoved => "flows_removed",
            Counter::MsgPassthrough => "msg_passthrough",
            Counter::AccelFallbacks => "accel_fallbacks",
            Counter::MsgReadBytes => "msg_read_bytes",
            Counter::SteerCollisions => "steer_collisions",
            Counter::AccelResumed => "accel_resumed",
            Counter::FlowsEstablished => "flows_established",
            Counter::FlowsClosed => "flows_closed",
            Counter::FlowsTableFull => "flows_table_full",
            Counter::Fragments => "fragments",
            Counter::VlanPassed => "vlan_passed",
            Counter::AccelNudges => "accel_nudges",
            Counter::AccelRetired => "accel_retired",
            Counter::AccelLeft => "accel_left",
            Counter::AccelPairsApp => "accel_pairs_app",
            Counter::AccelPairsPods => "accel_pairs_pods",
            Counter::AccelPairsRefused => "accel_pairs_refused",
            Counter::AccelShortReads => "accel_short_reads",
            Counter::AccelWakeups => "accel_wakeups",
            Counter::AccelUncounted => "accel_uncounted",
            Counter::AccelOrderHeld => "accel_order_held",
            Counter::IngressUnreadable => "ingress_unreadable",
            Counter::IngressUnknownDropped => "ingress_unknown_dropped",
            Counter::SynsRefusedDraining => "syns_refused_draining",
            Counter::SteerErrors => "steer_errors",
            Counter::SteerNotProxy => "steer_not_proxy",
            Counter::FlowsQuotaFull => "flows_quota_full",
            Counter::AccelQuotaFull => "accel_quota_full",
        }
    }
}

const _: () = assert!(Counter::COUNT == Counter::AccelQuotaFull as u32 + 1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_dense_and_named_uniquely() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as u32, i as u32, "{c:?} out of order");
            for d in &Counter::ALL[i + 1..] {
                assert_ne!(c.name(), d.name());
            }
        }
    }
}
