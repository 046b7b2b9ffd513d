//! The event counters (`COUNTERS`, per CPU, one slot of `Counter::COUNT` per
//! target): what each counts and the name userspace shows it by
//! (`tproxy-ebpf/src/counters.rs` adds to them).

/// Declares `Counter` from one list: each counter with what it counts and
/// the name userspace shows it by, so the enum, `Counter::ALL`,
/// `Counter::name` and `Counter::help` cannot disagree. A counter's index is its place in the
/// list.
macro_rules! counters {
    ($($(#[doc = $doc:literal])* $counter:ident => $name:literal,)*) => {
        /// Indexes into the per-CPU `COUNTERS` array.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter {
            $($(#[doc = $doc])* $counter,)*
        }

        impl Counter {
            pub const ALL: [Counter; [$(stringify!($counter)),*].len()] =
                [$(Counter::$counter),*];

            pub const fn name(self) -> &'static str {
                match self {
                    $(Counter::$counter => $name,)*
                }
            }

            /// What it counts: its doc comment, in one line (the metrics'
            /// HELP text).
            pub fn help(self) -> &'static str {
                match self {
                    $(Counter::$counter => concat!($($doc),*).trim_start(),)*
                }
            }
        }
    };
}

counters! {
    /// Packets the tc ingress program looked at.
    IngressPackets => "ingress_packets",
    /// Packets it steered to the proxy.
    IngressSteered => "ingress_steered",
    /// Packets the tc egress program looked at.
    EgressPackets => "egress_packets",
    /// Reply packets whose source was restored.
    EgressRestored => "egress_restored",
    /// getsockopt calls seen by the cgroup/getsockopt program.
    GetsockoptCalls => "getsockopt_calls",
    /// SO_ORIGINAL_DST answers given from the flow table.
    GetsockoptAnswered => "getsockopt_answered",
    /// getsockname() answers changed to the original destination.
    GetsocknameAnswered => "getsockname_answered",
    /// sockops callbacks seen.
    SockopsEvents => "sockops_events",
    /// Sockets inserted into the SOCKHASH.
    SockhashInserted => "sockhash_inserted",
    /// Sockets that left the SOCKHASH (closed).
    SockhashRemoved => "sockhash_removed",
    /// sendmsg calls seen by sk_msg.
    MsgSeen => "msg_seen",
    /// sendmsg calls redirected to the peer.
    MsgRedirected => "msg_redirected",
    /// Bytes redirected.
    MsgRedirectedBytes => "msg_redirected_bytes",
    /// sk_msg lookups that missed (passed to plain TCP).
    MsgMiss => "msg_miss",
    /// Flow-table entries created.
    FlowsCreated => "flows_created",
    /// Flow-table entries removed on FIN/RST.
    FlowsRemoved => "flows_removed",
    /// sendmsg calls passed to plain TCP while the sender is off the fast
    /// path (slow reader, or earlier TCP bytes still unread), or during
    /// teardown.
    MsgPassthrough => "msg_passthrough",
    /// Times a sender left the fast path (its reader fell behind by more
    /// than `accel_max_queued`).
    AccelFallbacks => "accel_fallbacks",
    /// Bytes read by the applications from accelerated sockets (either
    /// path), until the pair leaves the SOCKHASH.
    MsgReadBytes => "msg_read_bytes",
    /// SYNs dropped because the same client address and port already has a
    /// live flow to another intercepted port (they would be one 4-tuple at
    /// the proxy).
    SteerCollisions => "steer_collisions",
    /// Times a sender came (back) to the fast path after sending by TCP,
    /// once its reader had read every byte.
    AccelResumed => "accel_resumed",
    /// Flows promoted from `SYNS` to `FLOWS`: the proxy's socket reached
    /// ESTABLISHED.
    FlowsEstablished => "flows_established",
    /// Established flows whose proxy socket closed (they linger, then go).
    FlowsClosed => "flows_closed",
    /// Promotions refused because `FLOWS` was full (the flow stays
    /// embryonic: served, but evictable).
    FlowsTableFull => "flows_table_full",
    /// IP fragments after the first (no TCP header): passed untouched.
    Fragments => "fragments",
    /// Frames with a VLAN tag (in the frame, or taken off by the device):
    /// passed untouched; run tproxy on the VLAN interface instead.
    VlanPassed => "vlan_passed",
    /// Wake-ups given to a reader that had read every redirected byte while
    /// bytes its peer sent by TCP were waiting (see sockops.rs: `nudge`).
    AccelNudges => "accel_nudges",
    /// Senders that left the fast path for good (`sock_flags::RETIRED`).
    AccelRetired => "accel_retired",
    /// Pairs taken out of the SOCKHASH after retiring: plain TCP sockets again.
    AccelLeft => "accel_left",
    /// Proxy<->app pairs made (both ends in this target's namespace),
    /// counted in the app's target.
    AccelPairsApp => "accel_pairs_app",
    /// Client<->proxy pairs made across two targets of this node (a pod
    /// dialling another pod), counted in the server pod's target.
    AccelPairsPods => "accel_pairs_pods",
    /// Pairings refused: a socket's key was pending, but the waiting socket
    /// is not the other end of its TCP connection (sequence numbers differ:
    /// a colliding or forged tuple). Both stay plain TCP.
    AccelPairsRefused => "accel_pairs_refused",
    /// Reads that took the last redirected byte queued at a socket while
    /// bytes its peer sent by TCP were not read yet (Linux makes such a
    /// read short), each reported to the nudger.
    AccelShortReads => "accel_short_reads",
    /// Readers the nudger woke: still asleep a moment after such a read,
    /// with the TCP bytes unread (tproxy-ebpf/src/nudge_iter.rs).
    AccelWakeups => "accel_wakeups",
    /// Sends that went by TCP without sk_msg seeing them, found later from
    /// the socket's `write_seq` and counted in. Linux skips the program
    /// and reuses its last verdict (pass) on the send after one that TCP
    /// refused with EAGAIN (tcp_bpf_send_verdict keeps `psock->eval`), so
    /// `sent` alone would miss those bytes.
    AccelUncounted => "accel_uncounted",
    /// Redirects held back (sent by TCP instead) because the peer had not
    /// read every byte this end gave TCP, by the kernel's sequence numbers
    /// (the sender's `write_seq` against the peer's `copied_seq`), though
    /// the byte counts said it had. Each one is a redirect that would have
    /// overtaken TCP bytes.
    AccelOrderHeld => "accel_order_held",
    /// Packets dropped at ingress because they may carry TCP but their
    /// header cannot be read: a first fragment too short for it (RFC
    /// 1858), an IPv4 TCP fragment at offset 8 (RFC 3128), an IPv6 header
    /// chain longer than the parser walks, a header cut short.
    IngressUnreadable => "ingress_unreadable",
    /// Packets other than a SYN to an intercepted port, of no flow tproxy
    /// steered nor one open when it attached (`PRIOR_FLOWS`): dropped, so
    /// no connection reaches the app around the proxy.
    IngressUnknownDropped => "ingress_unknown_dropped",
    /// SYNs to an intercepted port dropped while the target drains (it
    /// steers no new flows, and none may reach the app around the proxy).
    SynsRefusedDraining => "syns_refused_draining",
    /// SYNs dropped because recording or rewriting them failed.
    SteerErrors => "steer_errors",
    /// SYNs dropped because the socket listening on the proxy port is not
    /// one the proxy opened (a stranger standing in for it).
    SteerNotProxy => "steer_not_proxy",
    /// Promotions refused because the target holds its quota of `FLOWS`
    /// entries (`Config::flows_quota`): the flow stays embryonic.
    FlowsQuotaFull => "flows_quota_full",
    /// Sockets not accelerated because the target holds its quota of
    /// accelerated sockets (`Config::socks_quota`): they stay plain TCP.
    AccelQuotaFull => "accel_quota_full",
    /// Socket options noted because redirected bytes would not honour
    /// them (SO_ZEROCOPY, SO_RCVLOWAT, TCP_INQ, receive timestamps,
    /// TCP_ULP; tproxy-ebpf/src/setsockopt.rs).
    AccelApiNoted => "accel_api_noted",
    /// Pairs that left the fast path because one end used an API it cannot
    /// honour (a noted option, a MSG_WAITALL, MSG_TRUNC or MSG_OOB read),
    /// or sent its FIN: a shutdown(SHUT_WR), and every close (`sock_api`).
    AccelApiRetired => "accel_api_retired",
    /// Sockets not accelerated because an option they inherited or set
    /// before they were established is one the fast path cannot honour.
    AccelApiRefused => "accel_api_refused",
    /// Sends that went by TCP because the peer's reader had not yet made
    /// a plain recvmsg (`sock_api::READS_PLAIN`).
    AccelReaderUnseen => "accel_reader_unseen",
    /// Sends that went by TCP because the reader's socket memory was short
    /// (the machine's TCP memory at its pressure mark, or the reader's
    /// memory cgroup at its TCP limit): the kernel would have refused part
    /// or all of a redirect, and handed the sender ENOMEM.
    AccelMemoryShort => "accel_memory_short",
    /// Senders retired because a one-way stream's redirects averaged less
    /// than `accel_min_message` (TCP merges such writes and moves them
    /// faster).
    AccelSmallRetired => "accel_small_messages",
}

impl Counter {
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// Where this counter of counter slot `slot` is in `COUNTERS`.
    #[inline(always)]
    pub const fn index(self, slot: u32) -> u32 {
        slot * Self::COUNT + self as u32
    }
}

const _: () = assert!(Counter::COUNT == Counter::AccelSmallRetired as u32 + 1);

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
