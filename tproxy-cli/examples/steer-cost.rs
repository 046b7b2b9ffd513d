//! What finding a packet's target costs the tc ingress program: a single
//! run's object (its one namespace from NODE) against the agent's (the
//! device's namespace through three kernel loads), on the same packet of
//! an established flow, with BPF_PROG_TEST_RUN's own timing (root).
//!
//!     cargo run --release -p tproxy-cli --example steer-cost
use aya::{
    EbpfLoader,
    maps::{Array, HashMap, MapData},
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use tproxy::sys::object::EBPF_OBJECT;
use tproxy_common::{Config, FlowKey, FlowValue, NodeConfig, Target, flags, names};

fn frame() -> Vec<u8> {
    // Ethernet + IPv4 + TCP ACK 10.0.0.20:40000 -> 192.168.178.10:8000.
    let mut f = vec![0u8; 14 + 20 + 20];
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&[10, 0, 0, 20]);
    ip[16..20].copy_from_slice(&[192, 168, 178, 10]);
    let tcp = &mut f[34..54];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&8000u16.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x10;
    f
}

fn cost(multi: bool) -> f64 {
    let (nd_net, net_cookie) = tproxy::sys::btf::netns_offsets().expect("BTF offsets");
    let mut ebpf = EbpfLoader::new()
        .override_global(tproxy_common::MULTI_TARGET_GLOBAL, &u8::from(multi), true)
        .load(EBPF_OBJECT)
        .expect("load");
    let cookie = tproxy::sys::system::netns_cookie().expect("cookie");
    let node = NodeConfig {
        dev_nd_net_offset: nd_net,
        net_cookie_offset: net_cookie,
        single_netns_cookie: if multi { 0 } else { cookie },
        ..NodeConfig::default()
    };
    Array::<&mut MapData, NodeConfig>::try_from(ebpf.map_mut(names::NODE).unwrap())
        .unwrap()
        .set(0, node, 0)
        .unwrap();
    let cfg = Config {
        proxy_port: 15006,
        steer_mode: 0,
        l2_len: 14,
        proxy_mark: 0x539,
        steer_mark: 0x7402,
        flags: flags::STEER_NEW,
        accel_max_queued: 1 << 20,
        accel_retire_ms: 0,
        slot: 1,
        proxy_cgroup_level: 0,
        netns_cookie: cookie,
        proxy_cgroup_id: 0,
        flows_quota: 0,
        socks_quota: 0,
        accel_min_message: 0,
        _pad0: 0,
    };
    HashMap::<&mut MapData, u64, Target>::try_from(ebpf.map_mut(names::TARGETS).unwrap())
        .unwrap()
        .insert(cookie, Target::new(cfg, [8000]), 0)
        .unwrap();
    let key = FlowKey {
        client_addr: [u32::from_ne_bytes([10, 0, 0, 20]), 0, 0, 0],
        local_addr: [u32::from_ne_bytes([192, 168, 178, 10]), 0, 0, 0],
        client_port: 40000u16.to_be(),
        local_port: 15006u16.to_be(),
        family: 2,
        _pad0: [0; 3],
        netns_cookie: cookie,
    };
    let value = FlowValue {
        orig_port: 8000u16.to_be(),
        state: 0,
        _pad0: 0,
        _pad1: 0,
        last_seen: 0,
        since: 0,
    };
    HashMap::<&mut MapData, FlowKey, FlowValue>::try_from(ebpf.map_mut(names::FLOWS).unwrap())
        .unwrap()
        .insert(key, value, 0)
        .unwrap();
    let p: &mut SchedClassifier = ebpf
        .program_mut(names::PROG_STEER)
        .unwrap()
        .try_into()
        .unwrap();
    p.load().unwrap();
    let f = frame();
    let mut out = vec![0u8; f.len() + 64];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(&f),
                data_out: Some(&mut out),
                repeat: 1_000_000,
                ..TestRunOptions::default()
            })
            .unwrap();
        best = best.min(r.duration.as_nanos() as f64);
    }
    best
}

fn main() {
    let single = cost(false);
    let multi = cost(true);
    println!("tproxy_steer, an established flow's packet (BPF_PROG_TEST_RUN, best of 5 x 1e6):");
    println!("  single run (namespace from NODE):       {single:.0} ns");
    println!(
        "  agent (namespace from skb->dev, 3 loads): {multi:.0} ns (+{:.0})",
        multi - single
    );
}
