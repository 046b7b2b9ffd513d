//! Every map the programs share, in one place. Userspace finds them by the
//! same names (`tproxy_common::names`).
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, SockHash},
};
use tproxy_common::{
    counters::Counter,
    flow::{CLOSING_MAX, FLOWS_MAX, FlowKey, FlowValue, SYNS_MAX},
    identity::{ListenerKey, PROXY_CONNECTS_MAX, PROXY_LISTENERS_MAX},
    sock::{
        Asked, NUDGE_EVENTS_BYTES, NUDGE_MAX, PENDING_MAX, Pending, PortKey, SOCK_API_MAX,
        SOCKHASH_MAX, SockKey, SockState, UPSTREAM_FLOWS_MAX, Upstream,
    },
    target::{ADDRS_PER_TARGET, NodeConfig, TARGETS_MAX, Target, TargetAddr},
};

/// The targets this object serves, keyed by their network namespace's
/// cookie: settings and intercepted ports. A packet or socket of any other
/// namespace is left alone. Userspace sizes it at load.
#[map]
pub static TARGETS: HashMap<u64, Target> = HashMap::with_max_entries(TARGETS_MAX, 0);

/// One entry: what every target shares (kernel facts).
#[map]
pub static NODE: Array<NodeConfig> = Array::with_max_entries(1, 0);

/// Per-CPU event counters, `Counter::index(slot)`: one slot of
/// `Counter::COUNT` per target (`Config::slot`), slot 0 for events of no
/// target. Userspace sizes it with `TARGETS`.
#[map]
pub static COUNTERS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries((TARGETS_MAX + 1) * Counter::COUNT, 0);

/// Established steered flows (the proxy's socket reached ESTABLISHED and
/// is open): where each was going. Not LRU: nothing a packet does evicts a
/// live flow. sockops moves an entry to CLOSING when its socket closes.
#[map]
pub static FLOWS: HashMap<FlowKey, FlowValue> = HashMap::with_max_entries(FLOWS_MAX, 0);

/// `FLOWS` entries per target, by counter slot (`Config::slot`; slot 0
/// unused): what `Config::flows_quota` is checked against, and what
/// stats, status and the metrics show as a target's flows in use without
/// walking `FLOWS`. Atomic adds (`atomic.rs`): an entry enters on one CPU
/// and leaves on another. Userspace sizes it with `TARGETS`, zeroes a
/// slot before a target takes it and after its sweep (`sweep.rs`).
#[map]
pub static FLOWS_IN_USE: Array<u64> = Array::with_max_entries(TARGETS_MAX + 1, 0);

/// `SOCKS` entries per target, by counter slot, likewise: what
/// `Config::socks_quota` is checked against. An entry counts in the slot
/// it carries (`SockState::slot`), the target whose sockops inserted it.
#[map]
pub static SOCKS_IN_USE: Array<u64> = Array::with_max_entries(TARGETS_MAX + 1, 0);

/// Embryonic steered flows (SYN seen): LRU, so a SYN flood only evicts
/// other embryonic entries. sockops promotes an entry to FLOWS when the
/// proxy's accepted socket reaches ESTABLISHED.
#[map]
pub static SYNS: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(SYNS_MAX, 0);

/// Connections to intercepted ports that were open when tproxy attached
/// (client side first, the dialled port as local port), written by
/// userspace from the namespace's socket table: their packets keep going
/// to the app; every other non-SYN packet of no known flow is dropped.
/// A plain hash: eviction would cut a live connection.
#[map]
pub static PRIOR_FLOWS: HashMap<FlowKey, u64> = HashMap::with_max_entries(FLOWS_MAX, 0);

/// Closed steered flows, lingering for retransmitted FINs and TIME_WAIT
/// ACKs: LRU of its own, so neither a SYN flood nor a high connection rate
/// can crowd open flows out of FLOWS; userspace removes an entry after
/// the linger.
#[map]
pub static CLOSING: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(CLOSING_MAX, 0);

/// The proxy<->app socket pairs, keyed by full tuple + netns cookie.
#[map]
pub static SOCKHASH: SockHash<SockKey> = SockHash::with_max_entries(SOCKHASH_MAX, 0);

/// Per accelerated socket, keyed by its kernel address (`struct sock *`):
/// its peer, bytes sent and read, fast-path flag.
#[map]
pub static SOCKS: HashMap<u64, SockState> = HashMap::with_max_entries(SOCKHASH_MAX, 0);

/// Socket options noted before a socket was established (`setsockopt.rs`),
/// by its kernel address, as `SockState::api` bytes: sockops takes them
/// into its `SOCKS` entry at ESTABLISHED. LRU: a socket that never gets
/// there costs an entry until newer ones push it out.
#[map]
pub static SOCK_API: LruHashMap<u64, u64> = LruHashMap::with_max_entries(SOCK_API_MAX, 0);

/// Options noted on a listener, by namespace and port: the sockets it
/// accepts inherit them.
#[map]
pub static LISTENER_API: LruHashMap<PortKey, u64> = LruHashMap::with_max_entries(SOCK_API_MAX, 0);

/// The flow a proxy thread last asked the original destination of, by
/// thread (pid_tgid): its next connect is that flow's upstream.
#[map]
pub static ASKED: LruHashMap<u64, Asked> = LruHashMap::with_max_entries(UPSTREAM_FLOWS_MAX, 0);

/// A proxy's upstream socket (by cookie) -> the steered flow it serves, and
/// why it was not paired (`tproxy flows`).
#[map]
pub static UPSTREAM_FLOWS: LruHashMap<u64, Upstream> =
    LruHashMap::with_max_entries(UPSTREAM_FLOWS_MAX, 0);

/// A socket's `SOCKS` entry by its address; 0 (a `peer` not known yet)
/// has none.
#[inline(always)]
pub fn sock_state(sk: u64) -> Option<*mut SockState> {
    if sk == 0 {
        None
    } else {
        SOCKS.get_ptr_mut(&sk)
    }
}

/// The key the accepting end of a connection will have -> the connecting
/// end, in the map and waiting for it (`peer.rs`): the accepting end enters
/// only if it is pending and proves to be the other end of that connection.
/// LRU: a connection whose other end never comes costs an entry until
/// newer ones push it out.
#[map]
pub static PENDING_PEERS: LruHashMap<SockKey, Pending> =
    LruHashMap::with_max_entries(PENDING_MAX, 0);

/// Sockets the proxy connected (by socket cookie, which the kernel never
/// reuses), noted at TCP_CONNECT_CB, where the connecting process is the
/// current task: only these may be paired as the proxy's upstream end
/// (`identity.rs`). Only the proxy's connects write here, so no other
/// process can churn it; an entry is taken at ESTABLISHED, and the LRU
/// drops those of connects that never got there.
#[map]
pub static PROXY_CONNECTS: LruHashMap<u64, u8> =
    LruHashMap::with_max_entries(PROXY_CONNECTS_MAX, 0);

/// Where the proxy listens on its port, per namespace (`identity.rs`):
/// how many proxy sockets, counted at TCP_LISTEN_CB in a proxy process and
/// uncounted when they close. Steering sends a SYN to the proxy port only
/// if the listener the kernel would pick is here or in `PRIOR_LISTENERS`.
#[map]
pub static PROXY_LISTENERS: HashMap<ListenerKey, u64> =
    HashMap::with_max_entries(PROXY_LISTENERS_MAX, 0);

/// The proxy's listeners older than the target (sockops never saw them
/// start): found by userspace at attach from the socket table and the
/// owning processes' cgroups, and counted down by it as they close. Its
/// own map: userspace cannot add atomically to what sockops counts.
#[map]
pub static PRIOR_LISTENERS: HashMap<ListenerKey, u64> =
    HashMap::with_max_entries(PROXY_LISTENERS_MAX, 0);

/// The targets' own addresses (their interface's) -> their netns cookie,
/// written by userspace at attach: which pod of this node an address is,
/// for a client dialling it. Userspace sizes it with `TARGETS`.
#[map]
pub static TARGET_ADDRS: HashMap<TargetAddr, u64> =
    HashMap::with_max_entries(TARGETS_MAX * ADDRS_PER_TARGET, 0);

/// Each CPU's share of the machine's TCP memory headroom, as last read
/// (`memory.rs`): redirects spend it without reading the kernel's
/// figures again, for a few milliseconds.
#[map]
pub static MEM_BUDGET: PerCpuArray<Budget> = PerCpuArray::with_max_entries(1, 0);

/// Where sockops builds a socket's `SockState` before inserting it into
/// `SOCKS` (one per CPU): its 224 bytes on sockops' stack took the
/// program and its calls past the 512 bytes Linux 6.1 allows.
#[map]
pub static SOCK_SCRATCH: PerCpuArray<SockState> = PerCpuArray::with_max_entries(1, 0);

/// `MEM_BUDGET` value: a CPU's share of the machine's headroom below its
/// pressure mark, in pages (-1: found short), and when it was read
/// (jiffies; 0 on a CPU that has not read yet, never fresh).
#[repr(C)]
pub struct Budget {
    pub at: u64,
    pub pages: i64,
}

/// Short reads that may leave a reader asleep on TCP bytes
/// (`tproxy_common::NudgeEvent`, from `recv.rs`), for tproxy's
/// nudger in userspace: a ring buffer, so reporting never blocks a reader
/// and a full buffer only loses reports.
#[map]
pub static NUDGE_EVENTS: RingBuf = RingBuf::with_byte_size(NUDGE_EVENTS_BYTES, 0);

/// The sockets the nudger found still asleep, by kernel address -> their
/// `SockState::read` when it looked; written by userspace just before it
/// walks their namespace's TCP sockets (`nudge_iter.rs`), emptied after.
#[map]
pub static NUDGE: HashMap<u64, u64> = HashMap::with_max_entries(NUDGE_MAX, 0);
