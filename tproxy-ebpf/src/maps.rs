//! Every map the programs share, in one place. Userspace finds them by the
//! same names (`tproxy_common::names`).
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash},
};
use tproxy_common::{
    CLOSING_MAX, Config, Counter, FLOWS_MAX, FlowKey, FlowValue, PENDING_MAX, PORTS_MAX,
    SOCKHASH_MAX, SYNS_MAX, SockKey, SockState,
};

/// One entry, written by userspace: proxy port, marks, mode, flags.
#[map]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Indexed by destination port (host order): non-zero = intercepted.
#[map]
pub static INTERCEPT_PORTS: Array<u8> = Array::with_max_entries(PORTS_MAX, 0);

/// Per-CPU event counters, indexed by `Counter`.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// Established steered flows (the proxy's socket reached ESTABLISHED and
/// is open): where each was going. Not LRU: nothing a packet does evicts a
/// live flow. sockops moves an entry to CLOSING when its socket closes.
#[map]
pub static FLOWS: HashMap<FlowKey, FlowValue> = HashMap::with_max_entries(FLOWS_MAX, 0);

/// Embryonic steered flows (SYN seen): LRU, so a SYN flood only evicts
/// other embryonic entries. sockops promotes an entry to FLOWS when the
/// proxy's accepted socket reaches ESTABLISHED.
#[map]
pub static SYNS: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(SYNS_MAX, 0);

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

/// App-side key -> the proxy side's kernel address, for proxy sides in the
/// map: the passive side enters only if its active side did (both ends
/// local, in the cgroup), and learns its peer here.
#[map]
pub static PENDING_PEERS: LruHashMap<SockKey, u64> = LruHashMap::with_max_entries(PENDING_MAX, 0);
