//! The embedded eBPF object agrees with tproxy-common: every map's key and
//! value sizes, entry counts and the program set are what userspace reads
//! and writes. A mismatch here would be silent garbage at run time.
use std::mem::size_of;

use tproxy::sys::object::EBPF_OBJECT;
use tproxy_common::{
    ADDRS_PER_TARGET, Asked, CLOSING_MAX, Counter, FLOWS_MAX, FlowKey, FlowValue, ListenerKey,
    NUDGE_EVENTS_BYTES, NUDGE_MAX, NodeConfig, PENDING_MAX, PROXY_CONNECTS_MAX,
    PROXY_LISTENERS_MAX, Pending, PortKey, SOCK_API_MAX, SOCKHASH_MAX, SYNS_MAX, SockKey,
    SockState, TARGETS_MAX, Target, TargetAddr, UPSTREAM_FLOWS_MAX, Upstream, names,
};

// Map types from the kernel's uapi (enum bpf_map_type).
const ARRAY: u32 = 2;
const PERCPU_ARRAY: u32 = 6;
const HASH: u32 = 1;
const LRU_HASH: u32 = 9;
const SOCKHASH: u32 = 18;
const RINGBUF: u32 = 27;

#[test]
fn maps_in_the_object_match_the_shared_types() {
    let obj = aya_obj::Object::parse(EBPF_OBJECT).expect("embedded object parses");
    let check = |name: &str, ty: u32, key: usize, value: usize, max: u32| {
        let m = obj
            .maps
            .get(name)
            .unwrap_or_else(|| panic!("map {name} missing"));
        assert_eq!(m.map_type(), ty, "{name} type");
        assert_eq!(m.key_size() as usize, key, "{name} key size");
        assert_eq!(m.value_size() as usize, value, "{name} value size");
        assert_eq!(m.max_entries(), max, "{name} max entries");
    };
    // Targets by netns cookie; the counters, a slot per target and one
    // for events of no target (both resized at load).
    check(names::TARGETS, HASH, 8, size_of::<Target>(), TARGETS_MAX);
    check(names::NODE, ARRAY, 4, size_of::<NodeConfig>(), 1);
    check(
        names::COUNTERS,
        PERCPU_ARRAY,
        4,
        8,
        (TARGETS_MAX + 1) * Counter::COUNT,
    );
    // Established flows: a plain hash (nothing evicts them); embryonic
    // ones: LRU (a SYN flood churns only these).
    check(
        names::FLOWS,
        HASH,
        size_of::<FlowKey>(),
        size_of::<FlowValue>(),
        FLOWS_MAX,
    );
    check(
        names::SYNS,
        LRU_HASH,
        size_of::<FlowKey>(),
        size_of::<FlowValue>(),
        SYNS_MAX,
    );
    // Closed flows lingering: LRU of their own.
    check(
        names::CLOSING,
        LRU_HASH,
        size_of::<FlowKey>(),
        size_of::<FlowValue>(),
        CLOSING_MAX,
    );
    check(
        names::SOCKHASH,
        SOCKHASH,
        size_of::<SockKey>(),
        4,
        SOCKHASH_MAX,
    );
    check(names::SOCKS, HASH, 8, size_of::<SockState>(), SOCKHASH_MAX);
    check(
        names::PENDING_PEERS,
        LRU_HASH,
        size_of::<SockKey>(),
        size_of::<Pending>(),
        PENDING_MAX,
    );
    // Pods' addresses, a few per target (resized at load with TARGETS).
    check(
        names::TARGET_ADDRS,
        HASH,
        size_of::<TargetAddr>(),
        8,
        TARGETS_MAX * ADDRS_PER_TARGET,
    );
    // Short-read reports for the nudger (a ring buffer: no key or value;
    // its size in bytes is its max entries), and the sockets it wakes.
    check(names::NUDGE_EVENTS, RINGBUF, 0, 0, NUDGE_EVENTS_BYTES);
    check(names::NUDGE, HASH, 8, 8, NUDGE_MAX);
    // Each CPU's share of the machine's TCP memory headroom (sk_msg's
    // memory check: a timestamp and a count of pages).
    check(names::MEM_BUDGET, PERCPU_ARRAY, 4, 16, 1);
    // Connections open at attach (never evicted), and the proxy's connects
    // between TCP_CONNECT_CB and ESTABLISHED.
    check(names::PRIOR_FLOWS, HASH, size_of::<FlowKey>(), 8, FLOWS_MAX);
    check(names::PROXY_CONNECTS, LRU_HASH, 8, 1, PROXY_CONNECTS_MAX);
    // Where the proxy listens: counted by sockops, and seeded by userspace.
    for name in [names::PROXY_LISTENERS, names::PRIOR_LISTENERS] {
        check(name, HASH, size_of::<ListenerKey>(), 8, PROXY_LISTENERS_MAX);
    }
    // Each target's count of FLOWS entries, by counter slot (resized at
    // load with TARGETS).
    check(names::FLOWS_IN_USE, ARRAY, 4, 8, TARGETS_MAX + 1);
    check(names::SOCKS_IN_USE, ARRAY, 4, 8, TARGETS_MAX + 1);
    // Socket options noted before a socket was paired, by its address and
    // by its listener's port (`sock_api` bytes).
    check(names::SOCK_API, LRU_HASH, 8, 8, SOCK_API_MAX);
    check(
        names::LISTENER_API,
        LRU_HASH,
        size_of::<PortKey>(),
        8,
        SOCK_API_MAX,
    );
    // Which flow a proxy thread asked about last, and which flow each of the
    // proxy's upstream sockets serves (`tproxy flows`).
    check(
        names::ASKED,
        LRU_HASH,
        8,
        size_of::<Asked>(),
        UPSTREAM_FLOWS_MAX,
    );
    check(
        names::UPSTREAM_FLOWS,
        LRU_HASH,
        8,
        size_of::<Upstream>(),
        UPSTREAM_FLOWS_MAX,
    );
    // Our maps; the compiler may add data sections (.rodata) of its own.
    let ours = obj.maps.keys().filter(|k| !k.starts_with('.')).count();
    assert_eq!(ours, 24, "maps: {:?}", obj.maps.keys().collect::<Vec<_>>());
}

#[test]
fn programs_in_the_object_are_the_hooks() {
    let obj = aya_obj::Object::parse(EBPF_OBJECT).expect("embedded object parses");
    let mut progs: Vec<&str> = obj.programs.keys().map(String::as_str).collect();
    progs.sort_unstable();
    let mut want = vec![
        names::PROG_STEER,
        names::PROG_RESTORE,
        names::PROG_GETSOCKOPT,
        names::PROG_GETSOCKNAME4,
        names::PROG_GETSOCKNAME6,
        names::PROG_SOCKOPS,
        names::PROG_SOCKOPS_FLOWS,
        names::PROG_SK_MSG,
        names::PROG_SETSOCKOPT,
        // The read hooks: the loader attaches one (`sys::probe::ReadHook`).
        names::PROG_RECV_LENGTH,
        names::PROG_RECV_FEXIT,
        // The send hook, attached with the fexit read hook.
        names::PROG_SEND_FENTRY,
        names::PROG_NUDGE_ITER,
    ];
    want.sort_unstable();
    assert_eq!(progs, want);
}
