//! Every map the programs share, in one place. Userspace finds them by the
//! same names (`tproxy_common::names`).
use aya_ebpf::{
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray, SockHash},
};
use tproxy_common::{
    Config, Counter, FLOWS_MAX, FlowKey, FlowValue, PORTS_MAX, SOCKHASH_MAX, SockKey,
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

/// Steered flows: where each was going. LRU so silent flows age out.
#[map]
pub static FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(FLOWS_MAX, 0);

/// The proxy<->app socket pairs, keyed by full tuple + netns cookie.
#[map]
pub static SOCKHASH: SockHash<SockKey> = SockHash::with_max_entries(SOCKHASH_MAX, 0);
