//! Types shared by the eBPF programs (`tproxy-ebpf`) and userspace
//! (`tproxy-cli`). Every struct is `#[repr(C)]` with explicit padding so both
//! sides agree byte for byte; the size asserts at the bottom fail the build
//! if a field is added without thought.
#![cfg_attr(not(test), no_std)]

use core::mem::{offset_of, size_of};

/// Names of the maps and programs in the eBPF object, so userspace finds each
/// one by the same constant the eBPF side is named after.
pub mod names {
    pub const TARGETS: &str = "TARGETS";
    pub const NODE: &str = "NODE";
    pub const COUNTERS: &str = "COUNTERS";
    pub const FLOWS: &str = "FLOWS";
    pub const SYNS: &str = "SYNS";
    pub const CLOSING: &str = "CLOSING";
    pub const SOCKHASH: &str = "SOCKHASH";
    pub const SOCKS: &str = "SOCKS";
    pub const PENDING_PEERS: &str = "PENDING_PEERS";
    pub const TARGET_ADDRS: &str = "TARGET_ADDRS";
    pub const NUDGE_EVENTS: &str = "NUDGE_EVENTS";
    pub const NUDGE: &str = "NUDGE";
    pub const PRIOR_FLOWS: &str = "PRIOR_FLOWS";
    pub const PROXY_CONNECTS: &str = "PROXY_CONNECTS";
    pub const PROXY_LISTENERS: &str = "PROXY_LISTENERS";
    pub const PRIOR_LISTENERS: &str = "PRIOR_LISTENERS";
    pub const FLOWS_IN_USE: &str = "FLOWS_IN_USE";
    pub const SOCKS_IN_USE: &str = "SOCKS_IN_USE";

    pub const PROG_STEER: &str = "tproxy_steer";
    pub const PROG_RESTORE: &str = "tproxy_restore";
    pub const PROG_GETSOCKOPT: &str = "tproxy_getsockopt";
    pub const PROG_GETSOCKNAME4: &str = "tproxy_getsockname4";
    pub const PROG_GETSOCKNAME6: &str = "tproxy_getsockname6";
    pub const PROG_SOCKOPS: &str = "tproxy_sockops";
    /// sockops without acceleration (--no-accel): flow tracking only, no
    /// socket addresses as map keys (so no CAP_PERFMON needed).
    pub const PROG_SOCKOPS_FLOWS: &str = "tproxy_sockops_flows";
    pub const PROG_SK_MSG: &str = "tproxy_sk_msg";
    pub const PROG_RECV_LENGTH: &str = "tproxy_recv_length";
    /// Raw tracepoint after every recvmsg (socket, bytes read, flags).
    pub const RECV_TRACEPOINT: &str = "sock_recv_length";
    /// The nudger's TCP socket iterator (`iter/tcp`).
    pub const PROG_NUDGE_ITER: &str = "tproxy_nudge_iter";
    /// Its iterator type: the kernel's `bpf_iter_tcp`.
    pub const NUDGE_ITER_TYPE: &str = "tcp";
}

/// Established flows (`FLOWS`): a plain hash, never evicted. An entry
/// enters when the proxy's accepted socket reaches ESTABLISHED (sockops)
/// and leaves for `CLOSING` when that socket closes, so it holds open
/// flows only. When full, new flows stay in `SYNS` (still served, but
/// evictable) and are counted.
pub const FLOWS_MAX: u32 = 65_536;
/// Closed flows lingering (`CLOSING`): LRU, so at connection rates above
/// CLOSING_MAX / linger (about 1,000/s) the oldest lingerers go early;
/// never an open flow.
pub const CLOSING_MAX: u32 = 65_536;
/// Embryonic flows (`SYNS`): SYN seen, the proxy's socket not yet
/// established. LRU: a SYN flood churns this table and no other.
pub const SYNS_MAX: u32 = 65_536;
/// A closed flow's entry stays this long, so retransmitted FINs and the
/// proxy's TIME_WAIT ACKs are still steered and restored (TCP_TIMEWAIT_LEN).
pub const FLOW_LINGER_NS: u64 = 60_000_000_000;
/// A newcomer to another port may take a closed flow's tuple (rewrite
/// mode: both are one 4-tuple at the proxy) this long after it closed.
pub const FLOW_TAKEOVER_NS: u64 = 1_000_000_000;
/// An embryonic flow seen this recently holds its tuple against a
/// newcomer to another port (its SYN may still be retransmitted).
pub const EMBRYONIC_HOLD_NS: u64 = 3_000_000_000;
/// An open flow seen this recently is active: drain waits for active flows
/// only (a client that went silent would hold it for its whole timeout).
pub const FLOW_ACTIVE_NS: u64 = 10_000_000_000;
/// Size of the SOCKHASH (two entries per accelerated connection).
pub const SOCKHASH_MAX: u32 = 65_536;
/// Connecting sockets (the proxy's upstream ones, and clients in a pod
/// dialling another pod of this node) waiting for the other end of their
/// connection to be established.
pub const PENDING_MAX: u32 = 4_096;
/// Addresses a target may claim in `TARGET_ADDRS` (its interface's, link-
/// local ones excepted); the map holds this many per target.
pub const ADDRS_PER_TARGET: u32 = 8;
/// `PROXY_LISTENERS` entries: the proxy's distinct listening addresses on
/// its port, node-wide.
pub const PROXY_LISTENERS_MAX: u32 = 4_096;
/// `PROXY_CONNECTS` entries: the proxy's upstream connects between
/// TCP_CONNECT_CB and ESTABLISHED, node-wide.
pub const PROXY_CONNECTS_MAX: u32 = 16_384;
/// Bytes of `NUDGE_EVENTS`, the ring buffer that reports short reads to
/// the nudger: 2,048 events of 32 bytes (24 + the ring's 8-byte header)
/// between two of its wake-ups. When it is full, a report is lost (the
/// reader keeps only sockops' `nudge`).
pub const NUDGE_EVENTS_BYTES: u32 = 64 << 10;
/// Sockets the nudger may wake in one walk of a namespace's TCP sockets
/// (`NUDGE`, filled by userspace right before the walk).
pub const NUDGE_MAX: u32 = 1_024;
/// Default upper bound on redirected bytes queued, unread, at one socket.
/// The bound in force follows the reader (`SockState::rcvbuf`: its receive
/// buffer or its recent pace, whichever is larger) when that is smaller.
pub const DEFAULT_ACCEL_MAX_QUEUED: u32 = 16 << 20;
/// Default `Config::accel_retire_ms`: a TCP stretch no shorter than a few
/// scheduler slices (a reader descheduled for a moment is not a stream that
/// never lets it catch up).
pub const DEFAULT_ACCEL_RETIRE_MS: u32 = 100;
/// Default number of targets (network namespaces) one loaded object
/// serves: `TARGETS` entries, and counter slots. A single `tproxy` run
/// serves one; the agent sizes it from its config.
pub const TARGETS_MAX: u32 = 256;
/// Words of a target's port bitmap (`Target::ports`): one bit per port.
pub const PORT_WORDS: usize = 65_536 / 64;

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;

/// `Config::flags` bits.
pub mod flags {
    /// New flows are steered to the proxy. Cleared on SIGTERM so that draining
    /// starts at once while already-steered flows keep their entries.
    pub const STEER_NEW: u32 = 1 << 0;
    /// sockops may insert sockets into the SOCKHASH.
    pub const ACCEL: u32 = 1 << 1;
}

/// How flows reach the proxy.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SteerMode {
    /// tc rewrites the destination port (and restores it on egress).
    Rewrite = 0,
    /// tc only marks; policy routing + nftables `tproxy` deliver the flow.
    Tproxy = 1,
}

/// One target's settings: what tproxy does in one network namespace (a
/// pod, or the namespace a single `tproxy` run serves). Written by
/// userspace at attach and updated at runtime (drain).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Proxy listener port, host order.
    pub proxy_port: u16,
    /// `SteerMode as u8`.
    pub steer_mode: u8,
    /// Link-layer header length on the target's interface: 14 (Ethernet,
    /// loopback) or 0 (L3 devices: WireGuard, tun, ipip; the packet starts
    /// at IP).
    pub l2_len: u8,
    /// SO_MARK the proxy puts on its upstream sockets: never steered.
    pub proxy_mark: u32,
    /// Mark the tc program sets in `tproxy` mode (matched by the fwmark rule).
    pub steer_mark: u32,
    /// `flags::*`.
    pub flags: u32,
    /// Past this many unread bytes at the receiving socket (or its receive
    /// buffer, if smaller), the sender leaves the fast path (plain TCP, with
    /// TCP's backpressure) until the reader has caught up.
    pub accel_max_queued: u32,
    /// A sender on TCP this long without its reader ever catching up (a
    /// continuous stream after a fallback) leaves the fast path for good
    /// and the pair leaves the SOCKHASH: plain TCP without the sockmap's
    /// cost on every send. Milliseconds; 0: never.
    pub accel_retire_ms: u32,
    /// This target's counter slot: its counters are `COUNTERS[slot *
    /// Counter::COUNT + counter]` (slot 0: events of no target).
    pub slot: u32,
    /// The level (depth below the cgroup2 root) of `proxy_cgroup_id`.
    pub proxy_cgroup_level: u32,
    /// Cookie of the target's network namespace (also its `TARGETS` key):
    /// cgroup programs see sockets of every namespace whose processes are
    /// in the cgroup, and must not take another namespace's identical
    /// tuple for a steered flow.
    pub netns_cookie: u64,
    /// Who the proxy is: the id of its cgroup (v2). Steered SYNs go only to
    /// listeners its processes (of this cgroup or below it) opened, only
    /// they get original destinations answered, and only connections they
    /// make are paired as the proxy's upstream end. 0: no check (crafted-packet tests only;
    /// userspace always sets it).
    pub proxy_cgroup_id: u64,
    /// Most `FLOWS` entries this target may hold (`FLOWS_IN_USE[slot]`):
    /// past it, its new flows stay embryonic (served, but evictable by a
    /// SYN flood) and `Counter::FlowsQuotaFull` counts them, so one pod's
    /// clients cannot take the node's table from the others. 0: no quota
    /// (a single run: the whole table).
    pub flows_quota: u32,
    /// Most sockets this target may have accelerated (`SOCKS` and the
    /// SOCKHASH, `SOCKS_IN_USE[slot]`): past it its new connections stay
    /// plain TCP and `Counter::AccelQuotaFull` counts them, so one pod's
    /// connections cannot take the node's SOCKHASH from the others. 0: no
    /// quota.
    pub socks_quota: u32,
}

/// `TARGETS` value, keyed by the netns cookie: the settings and the
/// intercepted ports (bit `p % 64` of word `p / 64`), so every hook finds
/// all it needs about a packet's or socket's namespace in one lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub config: Config,
    pub ports: [u64; PORT_WORDS],
}

impl Target {
    pub fn new(config: Config, ports: impl IntoIterator<Item = u16>) -> Target {
        let mut t = Target {
            config,
            ports: [0; PORT_WORDS],
        };
        for p in ports {
            t.ports[usize::from(p / 64)] |= 1 << (p % 64);
        }
        t
    }

    #[inline(always)]
    pub fn intercepts(&self, port: u16) -> bool {
        // The mask keeps the index provably in bounds for the verifier.
        self.ports[usize::from(port >> 6) & (PORT_WORDS - 1)] & (1 << (port & 63)) != 0
    }
}

/// The one entry of `NODE`: what every target shares.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// Offset of `sk_rcvbuf` in the kernel's `struct sock` (from its BTF),
    /// for the recvmsg tracepoint to refresh `SockState::rcvbuf`; 0 if
    /// unknown (then the value read at insert stays).
    pub sk_rcvbuf_offset: u32,
    /// Offsets of `nd_net` in `struct net_device` and of `net_cookie` in
    /// `struct net` (from BTF): how the tc programs of a many-target object
    /// find a packet's namespace (`tproxy-ebpf/src/netns.rs`).
    pub dev_nd_net_offset: u32,
    pub net_cookie_offset: u32,
    /// `node_flags::*`.
    pub flags: u32,
    /// A one-target object (a single `tproxy` run): its namespace's cookie,
    /// which its tc programs use without reading the kernel's structs.
    pub single_netns_cookie: u64,
    /// Offsets of `write_seq` and `copied_seq` in the kernel's `struct
    /// tcp_sock` (from BTF): sk_msg compares a sender's `write_seq` with
    /// its peer's `copied_seq` before redirecting (every byte it ever gave
    /// TCP has been read); 0 if unknown.
    pub tcp_write_seq_offset: u32,
    pub tcp_copied_seq_offset: u32,
}

/// `NodeConfig::flags` bits.
pub mod node_flags {
    /// Pair a pod's client with another pod's proxy on this node (both
    /// legs socket to socket). The agent's default (`--no-accel-same-node`
    /// clears it).
    pub const SAME_NODE: u32 = 1 << 0;
}

/// Name of the read-only global the loader sets to 1 for a many-target
/// object (the agent): its tc programs then read each packet's namespace
/// from the device; 0 (a single run): `NodeConfig::single_netns_cookie`.
pub const MULTI_TARGET_GLOBAL: &str = "TPROXY_MULTI_TARGET";

/// `NUDGE_EVENTS` record: a read took the last redirected byte queued at
/// socket `sk` while bytes its peer sent by TCP were not read yet. Linux
/// makes that read short, and an edge-triggered reader may then sleep on
/// the TCP bytes for good (see tproxy-ebpf/src/recv_length.rs).
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

/// Flow-table key (`SYNS`, `FLOWS`): the connection exactly as the proxy's
/// accepted socket sees it: client address and port, the local address the
/// client dialled, and the local port (the proxy port with rewrite
/// steering, the dialled port with the tproxy back-end). Addresses in
/// network order, IPv4 in `[0]` with the rest zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub client_addr: [u32; 4],
    pub local_addr: [u32; 4],
    /// Network order.
    pub client_port: u16,
    /// Network order.
    pub local_port: u16,
    pub family: u8,
    pub _pad0: [u8; 3],
    /// The namespace the flow is in (the target's): identical tuples in two
    /// pods are two flows.
    pub netns_cookie: u64,
}

/// Flow-table value: where the flow was going, and its life.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowValue {
    /// The destination port the client dialled, network order.
    pub orig_port: u16,
    /// `flow_state::*` bits.
    pub state: u8,
    pub _pad0: u8,
    pub _pad1: u32,
    /// `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC_COARSE) of the last
    /// packet of the flow, either way.
    pub last_seen: u64,
    /// When the entry entered its table (CLOCK_MONOTONIC_COARSE): an
    /// embryonic flow's first SYN, an established flow's promotion, a
    /// closing flow's close. Hold-offs and the linger run from here, and no
    /// packet moves it (a spoofed SYN cannot extend a hold-off).
    pub since: u64,
}

pub mod flow_state {
    /// The proxy's socket of this flow has closed (sockops saw TCP_CLOSE):
    /// the entry lingers for retransmissions, then goes.
    pub const CLOSED: u8 = 1 << 0;
}

/// `PROXY_LISTENERS` key: a listening socket's address as the kernel's
/// lookup returns it (`bpf_sock`: family, source address, source port
/// host order), in one namespace. A dual-stack listener on `[::]` is
/// AF_INET6 `::` for IPv4 SYNs too, both when it listens and when found.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    pub addr: [u32; 4],
    pub port: u32,
    pub family: u32,
    pub netns_cookie: u64,
}

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

/// `SOCKS` value: one accelerated socket, keyed by its kernel address
/// (`struct sock *`, which sockops, sk_msg and the recvmsg tracepoint all
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
    /// Bytes this socket's readers took (recvmsg tracepoint, MSG_PEEK
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
    /// hooks that see only the socket (the recvmsg tracepoint).
    pub slot: u32,
    /// The socket's `write_seq` when `sent` was last trued up (at insert:
    /// its `snd_nxt` at ESTABLISHED, nothing queued yet).
    pub tcp_seq: u32,
    /// Bytes sk_msg passed to TCP since then, as it counted them. The
    /// kernel's figure (`write_seq - tcp_seq`) differs when a send went by
    /// TCP unseen (`Counter::AccelUncounted`) or TCP took only part of a
    /// message (EAGAIN: the rest is the app's to send again).
    pub tcp_unsynced: u64,
}

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

/// `TARGET_ADDRS` key: an address of a target's interface (its pod's IP).
/// Network order, IPv4 in `[0]` with the rest zero; the family tells
/// `a.b.c.d` from the IPv6 address `xxxx:xxxx::`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TargetAddr {
    pub addr: [u32; 4],
    pub family: u32,
    pub _pad0: u32,
}

impl TargetAddr {
    pub fn from_ip(ip: core::net::IpAddr) -> TargetAddr {
        let (addr, family) = match ip {
            core::net::IpAddr::V4(a) => ([u32::from_ne_bytes(a.octets()), 0, 0, 0], AF_INET),
            core::net::IpAddr::V6(a) => {
                let o = a.octets();
                let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                ([w(0), w(4), w(8), w(12)], AF_INET6)
            }
        };
        TargetAddr {
            addr,
            family: u32::from(family),
            _pad0: 0,
        }
    }

    pub fn to_ip(&self) -> core::net::IpAddr {
        if self.family == u32::from(AF_INET) {
            core::net::IpAddr::from(self.addr[0].to_ne_bytes())
        } else {
            let mut o = [0u8; 16];
            for (i, w) in self.addr.iter().enumerate() {
                o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
            }
            core::net::IpAddr::from(o)
        }
    }
}

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

// Layout checks: the eBPF side reads these structs through raw map values,
// so a silent change of size or offset would be a wrong answer, not an error.
const _: () = {
    assert!(size_of::<Config>() == 56);
    assert!(offset_of!(Config, flows_quota) == 48);
    assert!(offset_of!(Config, socks_quota) == 52);
    assert!(offset_of!(Config, proxy_cgroup_level) == 28);
    assert!(offset_of!(Config, proxy_cgroup_id) == 40);
    assert!(offset_of!(Config, l2_len) == 3);
    assert!(offset_of!(Config, netns_cookie) == 32);
    assert!(offset_of!(Config, accel_max_queued) == 16);
    assert!(offset_of!(Config, accel_retire_ms) == 20);
    assert!(offset_of!(Config, slot) == 24);
    assert!(size_of::<Target>() == 56 + 8 * PORT_WORDS);
    assert!(offset_of!(Target, ports) == 56);
    assert!(size_of::<NodeConfig>() == 32);
    assert!(offset_of!(NodeConfig, tcp_write_seq_offset) == 24);
    assert!(offset_of!(NodeConfig, single_netns_cookie) == 16);
    assert!(size_of::<SockState>() == 136);
    assert!(offset_of!(SockState, tcp_seq) == 124);
    assert!(offset_of!(SockState, tcp_unsynced) == 128);
    assert!(offset_of!(SockState, slot) == 120);
    assert!(offset_of!(SockState, win_start) == 96);
    assert!(offset_of!(SockState, peer) == 56);
    assert!(offset_of!(SockState, read) == 80);
    assert!(offset_of!(SockState, flags) == 88);
    assert!(offset_of!(SockState, rcvbuf) == 92);
    assert!(offset_of!(Config, proxy_mark) == 4);
    assert!(offset_of!(Config, steer_mark) == 8);
    assert!(offset_of!(Config, flags) == 12);
    assert!(size_of::<FlowKey>() == 48);
    assert!(offset_of!(FlowKey, netns_cookie) == 40);
    assert!(offset_of!(FlowKey, local_addr) == 16);
    assert!(offset_of!(FlowKey, client_port) == 32);
    assert!(offset_of!(FlowKey, local_port) == 34);
    assert!(offset_of!(FlowKey, family) == 36);
    assert!(size_of::<FlowValue>() == 24);
    assert!(offset_of!(FlowValue, last_seen) == 8);
    assert!(offset_of!(FlowValue, since) == 16);
    assert!(size_of::<SockKey>() == 56);
    assert!(offset_of!(SockKey, local_port) == 32);
    assert!(offset_of!(SockKey, family) == 40);
    assert!(offset_of!(SockKey, netns_cookie) == 48);
    assert!(size_of::<Pending>() == 72);
    assert!(offset_of!(Pending, key) == 8);
    assert!(offset_of!(Pending, snd_nxt) == 64);
    assert!(size_of::<TargetAddr>() == 24);
    assert!(offset_of!(TargetAddr, family) == 16);
    assert!(size_of::<NudgeEvent>() == 24);
    assert!(size_of::<ListenerKey>() == 32);
    assert!(offset_of!(ListenerKey, port) == 16);
    assert!(offset_of!(ListenerKey, netns_cookie) == 24);
    assert!(Counter::COUNT == Counter::AccelQuotaFull as u32 + 1);
};

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are #[repr(C)], Copy, with explicit padding fields
    // and no invalid bit patterns.
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for Target {}
    unsafe impl aya::Pod for NodeConfig {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for SockKey {}
    unsafe impl aya::Pod for SockState {}
    unsafe impl aya::Pod for Pending {}
    unsafe impl aya::Pod for TargetAddr {}
    unsafe impl aya::Pod for NudgeEvent {}
    unsafe impl aya::Pod for ListenerKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn a_target_intercepts_exactly_its_ports() {
        let cfg = Config {
            proxy_port: 15001,
            steer_mode: 0,
            l2_len: 14,
            proxy_mark: 0,
            steer_mark: 0,
            flags: 0,
            accel_max_queued: 0,
            accel_retire_ms: 0,
            slot: 1,
            proxy_cgroup_level: 0,
            netns_cookie: 1,
            proxy_cgroup_id: 0,
            flows_quota: 0,
            socks_quota: 0,
        };
        let t = Target::new(cfg, [0, 63, 64, 8000, 65535]);
        for p in [0, 63, 64, 8000, 65535] {
            assert!(t.intercepts(p), "{p}");
        }
        for p in [1, 62, 65, 7999, 8001, 65534] {
            assert!(!t.intercepts(p), "{p}");
        }
    }

    #[test]
    fn target_addrs_are_network_order_and_round_trip() {
        let v4: core::net::IpAddr = "10.1.2.3".parse().unwrap();
        let a = TargetAddr::from_ip(v4);
        assert_eq!(a.addr, [u32::from_be(0x0a01_0203), 0, 0, 0]);
        assert_eq!(a.family, u32::from(AF_INET));
        assert_eq!(a.to_ip(), v4);
        // fd00:: has the words of 253.0.0.0 and zeros: the family tells.
        let v6: core::net::IpAddr = "fd00::".parse().unwrap();
        let b = TargetAddr::from_ip(v6);
        assert_eq!(
            b.addr[0],
            TargetAddr::from_ip("253.0.0.0".parse().unwrap()).addr[0]
        );
        assert_ne!(a, b);
        assert_eq!(b.to_ip(), v6);
    }

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
