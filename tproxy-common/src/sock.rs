//! Acceleration: the SOCKHASH and each accelerated socket's state (`SOCKS`),
//! the sockets waiting for their other end (`PENDING_PEERS`), and the
//! nudger's reports and walks (`NUDGE_EVENTS`, `NUDGE`). On the eBPF side:
//! `sockops.rs`, `sk_msg.rs`, `peer.rs`, `sockkey.rs`, `retire.rs`,
//! `recv.rs` and `nudge_iter.rs`.
use core::mem::{offset_of, size_of};

/// Size of the SOCKHASH (two entries per accelerated connection).
pub const SOCKHASH_MAX: u32 = 65_536;
/// Connecting sockets (the proxy's upstream ones, and clients in a pod
/// dialling another pod of this node) waiting for the other end of their
/// connection to be established.
pub const PENDING_MAX: u32 = 4_096;
/// Bytes of `NUDGE_EVENTS`, the ring buffer that reports short reads to
/// the nudger: 2,048 events of 32 bytes (24 + the ring's 8-byte header)
/// between two of its wake-ups. When it is full, a report is lost (the
/// reader keeps only sockops' `nudge`).
pub const NUDGE_EVENTS_BYTES: u32 = 64 << 10;
/// Sockets the nudger may wake in one walk of a namespace's TCP sockets
/// (`NUDGE`, filled by userspace right before the walk).
pub const NUDGE_MAX: u32 = 1_024;

/// SOCKHASH key: the full tuple of one socket as that socket sees it, plus
/// the cookie of its network namespace, so identical tuples in two
/// namespaces never meet. Addresses network order, ports host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub local_addr: [u32; 4],
    pub remote_addr: [u32; 4],
    pub local_port: u32,
    pub remote_port: u32,
    pub family: u32,
    pub _pad0: u32,
    pub netns_cookie: u64,
}

impl SockKey {
    /// The key of the other end of the same connection.
    pub const fn peer(&self) -> SockKey {
        SockKey {
            local_addr: self.remote_addr,
            remote_addr: self.local_addr,
            local_port: self.remote_port,
            remote_port: self.local_port,
            family: self.family,
            _pad0: 0,
            netns_cookie: self.netns_cookie,
        }
    }
}

/// `SOCKS` value: one accelerated socket, keyed by its kernel address
/// (`struct sock *`, which sockops, sk_msg and the read hook all
/// see), so each hook finds it with one 8-byte hash lookup.
///
/// Byte order across the two paths (redirect and plain TCP): the peer's
/// reader takes queued redirected bytes before TCP's receive queue, so a
/// redirected byte must never overtake a TCP one. A sender redirects only
/// while every byte it sent before went the same way, or once the peer has
/// read all of them: `sent == peer read` by the counts here, and, decisive,
/// the sender's `write_seq` equals the peer's `copied_seq` (the kernel's
/// own count of the TCP bytes given and taken; sk_msg.rs).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockState {
    /// SOCKHASH key of the other end: where this socket's bytes go.
    pub peer_key: SockKey,
    /// The other end's kernel address (its `SOCKS` key); 0 until it is
    /// established and in the map.
    pub peer: u64,
    /// Bytes this socket's sendmsg handed over, by either path, since it
    /// entered the map (written only under the sender's socket lock). The
    /// TCP part is trued up from the kernel's `write_seq` on each send
    /// (`tcp_seq`, `tcp_unsynced`).
    pub sent: u64,
    /// `sent` just after the last redirected message: every byte before it
    /// is at the peer, read or queued in its ingress queue.
    pub redirected_end: u64,
    /// Bytes this socket's readers took (the read hook, MSG_PEEK
    /// excluded), since it entered the map. Atomic adds.
    pub read: u64,
    /// `sock_flags::*`.
    pub flags: u32,
    /// What a sender may leave unread at this socket (bytes, within
    /// `accel_max_queued`): the larger of its receive buffer (`sk_rcvbuf`,
    /// read at insert and on each read) and what its reader took in the
    /// last `READ_RATE_WINDOW_NS` times `READ_RATE_WINDOWS`. So a slow
    /// reader holds about what TCP would, while a fast one keeps its sender
    /// on the fast path (TCP autotunes its buffer by the same measure; the
    /// kernel never does for redirected bytes).
    pub rcvbuf: u32,
    /// Start of the current read-rate window (CLOCK_MONOTONIC_COARSE, ns).
    pub win_start: u64,
    /// `read` at the start of that window.
    pub win_read: u64,
    /// When this socket last left the fast path for TCP (a fallback),
    /// CLOCK_MONOTONIC_COARSE ns; 0: never.
    pub tcp_since: u64,
    /// The counter slot of this socket's target (`Config::slot`), for the
    /// hooks that see only the socket (the read hook).
    pub slot: u32,
    /// The socket's `write_seq` when `sent` was last trued up (at insert:
    /// its `snd_nxt` at ESTABLISHED, nothing queued yet).
    pub tcp_seq: u32,
    /// Bytes sk_msg passed to TCP since then, as it counted them. The
    /// kernel's figure (`write_seq - tcp_seq`) differs when a send went by
    /// TCP unseen (`Counter::AccelUncounted`) or TCP took only part of a
    /// message (EAGAIN: the rest is the app's to send again).
    pub tcp_unsynced: u64,
    /// What this socket's own program did that decides whether it may take
    /// part in the fast path (`sock_api`): one byte per fact, each only
    /// ever set, by a plain byte store, so hooks on several CPUs never
    /// need a read-modify-write and never undo each other.
    pub api: [u8; 8],
    /// The socket's cookie (`UPSTREAM_FLOWS` is keyed by it): how `tproxy
    /// flows` finds the steered flow a proxy's upstream socket serves.
    pub cookie: u64,
    /// Bytes this socket's sends redirected, in all.
    pub redirected: u64,
    /// Times this sender left the fast path for TCP (a slow reader), and
    /// came back to it.
    pub fallbacks: u32,
    pub returns: u32,
    /// The current stream window (`Config::accel_min_message`): redirects
    /// in it, the windows of small messages just before it, and this
    /// socket's `redirected`, and its peer's `sent`, `reads` and `read`
    /// when it began. Written only by this socket's sk_msg.
    pub win_msgs: u32,
    pub win_small: u32,
    pub win_redirected: u64,
    pub win_peer_sent: u64,
    pub win_peer_reads: u64,
    pub win_peer_read: u64,
    /// Reads that took bytes from this socket (the read hook, like `read`;
    /// a plain add: two readers at once may lose one, which only delays
    /// the small-writes rule).
    pub reads: u64,
    /// This socket's `copied_seq` when sockops first saw one of its
    /// packets after the pair left the SOCKHASH, with bit 32 set (0: not
    /// yet): once its reader has read past it, no read of it can be stuck
    /// after a short read, and sockops stops looking at its packets.
    pub left_copied: u64,
}

/// `SockState::api`: which socket APIs this socket's program used, one byte
/// each (index). Redirected bytes are read by tcp_bpf_recvmsg (and sent by
/// tcp_bpf_sendmsg), which honour only part of TCP's API; a socket that
/// used another part must not hold redirected bytes when it next reads,
/// so a pair with any `OFF_*` byte set never redirects again and leaves
/// the SOCKHASH once drained (`retire.rs`). The table of what each API does
/// under acceleration: README and docs/how-it-works.md.
pub mod sock_api {
    /// The socket's reader made a plain recvmsg (no MSG_WAITALL, MSG_TRUNC
    /// or MSG_OOB). Its peer redirects to it only after this: a reader that
    /// only ever splices, or waits with MSG_WAITALL from its first read,
    /// never has a redirected byte queued (tcp_splice_read and MSG_WAITALL
    /// do not see them).
    pub const READS_PLAIN: usize = 0;
    /// The `READS_PLAIN` byte's value (else 1) for a reader whose memory
    /// cgroup limits TCP memory (cgroup v1's
    /// `memory.kmem.tcp.limit_in_bytes`), as its first plain read found
    /// (an accepted socket gets its cgroup at accept): a redirect to it
    /// checks that limit first (`memory.rs` in tproxy-ebpf); to others it
    /// skips those reads.
    pub const PLAIN_TCP_LIMITED: u8 = 2;
    /// A recvmsg with MSG_WAITALL, MSG_TRUNC or MSG_OOB (tcp_bpf_recvmsg
    /// returns what is queued instead, copies where TCP discards, and reads
    /// urgent-data requests as plain reads), or a send with MSG_OOB
    /// (tcp_bpf_sendmsg ignores it: the urgent byte would arrive inline),
    /// seen by the send hook where the kernel has one.
    pub const OFF_ODD_READ: usize = 1;
    /// SO_ZEROCOPY (redirected MSG_ZEROCOPY sends are never notified).
    pub const OFF_ZEROCOPY: usize = 2;
    /// SO_RCVLOWAT above 1 (tcp_bpf_recvmsg and its poll ignore it).
    pub const OFF_RCVLOWAT: usize = 3;
    /// A receive control message: TCP_INQ or a receive timestamp (none is
    /// produced for redirected bytes).
    pub const OFF_RECV_CMSG: usize = 4;
    /// An upper-layer protocol (TCP_ULP, kTLS: tls_sw would hand redirected
    /// plaintext to a reader expecting records, and encrypts nothing it
    /// redirects).
    pub const OFF_ULP: usize = 5;
    /// The socket shut down its sending side: tcp_bpf_recvmsg returns
    /// EAGAIN to a blocking reader that the ACK of its own FIN wakes, so
    /// the pair leaves the SOCKHASH at the FIN, before the reader waits.
    pub const OFF_HALF_CLOSED: usize = 6;
    /// A send opened with a TLS handshake record: the app terminates TLS
    /// and may turn kTLS on next, with bytes already queued for it. kTLS
    /// reads queued redirected bytes without decrypting them
    /// (tls_sw_recvmsg) and hands its plaintext records to sk_msg
    /// (bpf_exec_tx_verdict), so no byte after the handshake's first may
    /// be redirected: sk_msg sees it before TCP_ULP is ever set.
    pub const OFF_TLS: usize = 7;
    /// Any `OFF_*` byte, as a mask over the bytes read as one u64.
    pub const OFF_MASK: u64 = !0xff;
    /// Names for userspace, by byte.
    pub const NAMES: [&str; 8] = [
        "reads_plain",
        "waitall_trunc_or_oob",
        "so_zerocopy",
        "so_rcvlowat",
        "recv_cmsg",
        "ulp",
        "half_closed",
        "tls_handshake",
    ];
}

/// `UPSTREAM_FLOWS` value, by the cookie of a socket the proxy connected:
/// the steered flow whose original destination the proxy's thread asked
/// for just before (cgroup/getsockopt, then sockops at TCP_CONNECT_CB, by
/// thread id), and why sockops did not pair it, if it did not.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Upstream {
    pub flow: crate::FlowKey,
    /// `refused::*`.
    pub refused: u32,
    pub _pad0: u32,
}

/// `ASKED` value, by thread: the flow whose original destination the
/// thread was just told, and that destination's port (host order): the
/// thread's next connect is the flow's upstream only if it dials exactly
/// there (a thread pool may connect from another thread than the one that
/// asked).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Asked {
    pub flow: crate::FlowKey,
    pub port: u16,
    pub _pad0: [u16; 3],
}

/// Why a proxy's upstream socket was not paired (`Upstream::refused`).
pub mod refused {
    /// Paired, or not decided yet.
    pub const NONE: u32 = 0;
    /// Its port is not in `--accel-ports`.
    pub const PORT: u32 = 1;
    /// An option noted on it before it was established (`sock_api`).
    pub const API: u32 = 2;
    /// The target holds its quota of accelerated sockets.
    pub const QUOTA: u32 = 3;
    /// Acceleration is off for the target.
    pub const ACCEL_OFF: u32 = 4;
    pub const NAMES: [&str; 5] = [
        "",
        "port not in accel_ports",
        "socket options",
        "socks quota",
        "acceleration off",
    ];
}

/// `UPSTREAM_FLOWS` entries (LRU), and the threads' last asked flows.
pub const UPSTREAM_FLOWS_MAX: u32 = 16_384;

/// `SOCK_API` key: options set on a listener (an accepted socket inherits
/// them), by its namespace and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub netns_cookie: u64,
    pub port: u32,
    pub _pad0: u32,
}

/// Sockets whose options tproxy noted before they were established or
/// accepted (`SOCK_API`, LRU).
pub const SOCK_API_MAX: u32 = 8_192;

/// The read-rate window of `SockState::rcvbuf`.
pub const READ_RATE_WINDOW_NS: u64 = 4_000_000;
/// How many windows' worth of the reader's pace a sender may queue.
pub const READ_RATE_WINDOWS: u64 = 2;

pub mod sock_flags {
    /// This socket's sends are being redirected (fast path). Cleared when
    /// the peer has more unread than its receive buffer or `accel_max_queued` (slow
    /// reader: TCP's backpressure takes over), set again once the peer has
    /// read every byte sent.
    pub const FAST: u32 = 1 << 0;
    /// This socket will never redirect again (set by the socket itself, in
    /// its sk_msg): it stayed on TCP for `accel_retire_ms` without its
    /// reader catching up, or its peer retired. The pair then leaves the
    /// SOCKHASH once neither end has redirected bytes left unread.
    pub const RETIRED: u32 = 1 << 1;
    /// The pair is out of the SOCKHASH: both ends are plain TCP sockets
    /// again. Set on both by the end that took it out (on the peer at best
    /// effort); their reads are counted no more.
    pub const LEFT: u32 = 1 << 2;
    /// Retired by `Config::accel_min_message` (with RETIRED): a one-way
    /// stream of small writes, which TCP moves faster.
    pub const SMALL_MESSAGES: u32 = 1 << 3;
}

/// `PENDING_PEERS` value, keyed by the key the other end's socket will have:
/// the connecting socket that waits for it, and what proves the other end
/// is really the other end of the same TCP connection (see `tproxy-ebpf/src/
/// peer.rs`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pending {
    /// The connecting socket's kernel address (its `SOCKS` key).
    pub sk: u64,
    /// Its SOCKHASH key: where the other end's bytes go. The same namespace
    /// (proxy to app) or another pod's (client to that pod's proxy).
    pub key: SockKey,
    /// Its `snd_nxt` and `rcv_nxt` at ESTABLISHED (just after the
    /// handshake): the other end's `rcv_nxt` and `snd_nxt` then.
    pub snd_nxt: u32,
    pub rcv_nxt: u32,
}

/// `NUDGE_EVENTS` record: a read took the last redirected byte queued at
/// socket `sk` while bytes its peer sent by TCP were not read yet. Linux
/// makes that read short, and an edge-triggered reader may then sleep on
/// the TCP bytes for good (see tproxy-ebpf/src/recv.rs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NudgeEvent {
    /// The reading socket's kernel address (its `SOCKS` key).
    pub sk: u64,
    /// Its network namespace's cookie: where the nudger walks.
    pub netns_cookie: u64,
    /// Its `SockState::read` just after that read: unchanged later means
    /// its reader has not read since.
    pub read: u64,
}

// Layout checks: the eBPF side reads these structs through raw map values,
// so a silent change of size or offset would be a wrong answer, not an error.
const _: () = {
    assert!(size_of::<SockState>() == 224);
    assert!(offset_of!(SockState, win_msgs) == 168);
    assert!(offset_of!(SockState, cookie) == 144);
    assert!(size_of::<Upstream>() == 56);
    assert!(size_of::<Asked>() == 56);
    assert!(offset_of!(SockState, api) == 136);
    assert!(size_of::<PortKey>() == 16);
    assert!(offset_of!(SockState, tcp_seq) == 124);
    assert!(offset_of!(SockState, tcp_unsynced) == 128);
    assert!(offset_of!(SockState, slot) == 120);
    assert!(offset_of!(SockState, win_start) == 96);
    assert!(offset_of!(SockState, peer) == 56);
    assert!(offset_of!(SockState, read) == 80);
    assert!(offset_of!(SockState, flags) == 88);
    assert!(offset_of!(SockState, rcvbuf) == 92);
    assert!(size_of::<SockKey>() == 56);
    assert!(offset_of!(SockKey, local_port) == 32);
    assert!(offset_of!(SockKey, family) == 40);
    assert!(offset_of!(SockKey, netns_cookie) == 48);
    assert!(size_of::<Pending>() == 72);
    assert!(offset_of!(Pending, key) == 8);
    assert!(offset_of!(Pending, snd_nxt) == 64);
    assert!(size_of::<NudgeEvent>() == 24);
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AF_INET;

    #[test]
    fn peer_key_swaps_ends_and_keeps_the_namespace() {
        let k = SockKey {
            local_addr: [1, 0, 0, 0],
            remote_addr: [2, 0, 0, 0],
            local_port: 40000,
            remote_port: 8000,
            family: AF_INET as u32,
            _pad0: 0,
            netns_cookie: 77,
        };
        let p = k.peer();
        assert_eq!((p.local_addr, p.remote_addr), ([2, 0, 0, 0], [1, 0, 0, 0]));
        assert_eq!((p.local_port, p.remote_port), (8000, 40000));
        assert_eq!(p.netns_cookie, 77);
        assert_eq!(p.peer(), k);
    }
}
