//! The tc programs, one crafted packet at a time, through
//! `BPF_PROG_TEST_RUN`: the verdict, the bytes they rewrite (with valid
//! checksums), and the flow-table entries they leave. Nothing is attached:
//! the programs run on private copies of the maps. Root only.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use tproxy::{sys::object::EBPF_OBJECT, target::inspect::monotonic_coarse_ns};
use tproxy_common::{
    Config, Counter, FlowKey, FlowValue, NodeConfig, SteerMode, Target, flags, flow_state, names,
};
use tproxy_examples::packet::{self as pkt, ACK, Ext, FIN, PSH, RST, SYN, Tcp};

const TC_ACT_UNSPEC: u32 = u32::MAX; // -1
const TC_ACT_SHOT: u32 = 2;
const PROXY_PORT: u16 = 15006;
const PROXY_MARK: u32 = 0x539;
const STEER_MARK: u32 = 0x7400_0002;
/// sizeof(struct __sk_buff) on this kernel's uapi; `mark` is at offset 8.
const SKB_CTX: usize = 192;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 20);
const SERVER: Ipv4Addr = Ipv4Addr::new(192, 168, 178, 10);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 0x20);
const SERVER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x178, 0, 0, 0, 0, 0, 0x10);

struct Progs {
    ebpf: Ebpf,
    mode: SteerMode,
    /// The test's network namespace: BPF_PROG_TEST_RUN runs a tc program
    /// on this namespace's loopback, so this is the target it finds.
    cookie: u64,
}

/// The counter slot the test's target gets.
const SLOT: u32 = 1;

/// What one run did.
#[derive(Debug)]
struct Run {
    verdict: u32,
    out: Vec<u8>,
    mark: u32,
}

impl Progs {
    fn new(mode: SteerMode) -> Progs {
        Progs::with(mode, false, 0)
    }

    /// A many-target object (the agent's): its tc programs read the
    /// packet's namespace from the device (BPF_PROG_TEST_RUN's loopback
    /// here). The target is this namespace, or with `other` non-zero a
    /// namespace whose cookie is this one's plus `other`.
    fn multi(mode: SteerMode, other: u64) -> Progs {
        Progs::with(mode, true, other)
    }

    fn with(mode: SteerMode, multi: bool, other: u64) -> Progs {
        let (nd_net, net_cookie) = tproxy::sys::btf::netns_offsets().expect("BTF offsets");
        let mut ebpf = EbpfLoader::new()
            .override_global(tproxy_common::MULTI_TARGET_GLOBAL, &u8::from(multi), true)
            .load(EBPF_OBJECT)
            .expect("load object");
        let cookie = tproxy::sys::system::netns_cookie().expect("netns cookie") + other;
        let cfg = Config {
            proxy_port: PROXY_PORT,
            steer_mode: mode as u8,
            l2_len: 14,
            proxy_mark: PROXY_MARK,
            steer_mark: STEER_MARK,
            flags: flags::STEER_NEW,
            accel_max_queued: 1 << 20,
            accel_retire_ms: 0,
            slot: SLOT,
            proxy_cgroup_level: 0,
            netns_cookie: cookie,
            proxy_cgroup_id: 0,
            flows_quota: 0,
            socks_quota: 0,
            accel_min_message: 0,
            _pad0: 0,
        };
        // A single run's object: its tc programs take the namespace from NODE.
        let mut node: Array<&mut MapData, NodeConfig> =
            Array::try_from(ebpf.map_mut(names::NODE).unwrap()).unwrap();
        let n = if multi {
            NodeConfig {
                dev_nd_net_offset: nd_net,
                net_cookie_offset: net_cookie,
                ..NodeConfig::default()
            }
        } else {
            NodeConfig {
                single_netns_cookie: cookie,
                ..NodeConfig::default()
            }
        };
        node.set(0, n, 0).unwrap();
        let mut targets: HashMap<&mut MapData, u64, Target> =
            HashMap::try_from(ebpf.map_mut(names::TARGETS).unwrap()).unwrap();
        targets
            .insert(cookie, Target::new(cfg, [8000, 8080]), 0)
            .unwrap();
        for name in [names::PROG_STEER, names::PROG_RESTORE] {
            let p: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
            p.load().unwrap();
        }
        Progs { ebpf, mode, cookie }
    }

    fn run(&self, prog: &str, frame: &[u8], mark: u32) -> Run {
        let p: &SchedClassifier = self.ebpf.program(prog).unwrap().try_into().unwrap();
        let mut ctx_in = [0u8; SKB_CTX];
        ctx_in[8..12].copy_from_slice(&mark.to_ne_bytes());
        let mut ctx_out = [0u8; SKB_CTX];
        let mut out = vec![0u8; frame.len() + 256];
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx_in),
                ctx_out: Some(&mut ctx_out),
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        Run {
            verdict: r.return_value,
            out,
            mark: u32::from_ne_bytes(ctx_out[8..12].try_into().unwrap()),
        }
    }

    fn ingress(&self, frame: &[u8]) -> Run {
        self.run(names::PROG_STEER, frame, 0)
    }

    fn egress(&self, frame: &[u8]) -> Run {
        self.run(names::PROG_RESTORE, frame, 0)
    }

    fn table(&self, name: &str) -> Vec<(FlowKey, FlowValue)> {
        let m = self.ebpf.map(name).unwrap();
        let h: HashMap<&MapData, FlowKey, FlowValue> = HashMap::try_from(m).unwrap();
        h.iter().map(Result::unwrap).collect()
    }

    fn put(&mut self, name: &str, k: FlowKey, v: FlowValue) {
        let mut h: HashMap<&mut MapData, FlowKey, FlowValue> =
            HashMap::try_from(self.ebpf.map_mut(name).unwrap()).unwrap();
        h.insert(k, v, 0).unwrap();
    }

    fn counter(&self, c: Counter) -> u64 {
        self.slot_counter(SLOT, c)
    }

    fn slot_counter(&self, slot: u32, c: Counter) -> u64 {
        let arr: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map(names::COUNTERS).unwrap()).unwrap();
        arr.get(&c.index(slot), 0).unwrap().iter().sum()
    }

    /// The flow key a client connection gets (as the proxy's socket sees it).
    fn key(&self, client: IpAddr, cport: u16, server: IpAddr, dport: u16) -> FlowKey {
        let a = |ip: IpAddr| match ip {
            IpAddr::V4(v) => [u32::from_ne_bytes(v.octets()), 0, 0, 0],
            IpAddr::V6(v) => {
                let o = v.octets();
                std::array::from_fn(|i| u32::from_ne_bytes(o[4 * i..4 * i + 4].try_into().unwrap()))
            }
        };
        let local = if self.mode == SteerMode::Rewrite {
            PROXY_PORT
        } else {
            dport
        };
        FlowKey {
            client_addr: a(client),
            local_addr: a(server),
            client_port: cport.to_be(),
            local_port: local.to_be(),
            family: if client.is_ipv4() { 2 } else { 10 },
            _pad0: [0; 3],
            netns_cookie: self.cookie,
        }
    }
}

fn flow(orig: u16, state: u8, last_seen: u64, since: u64) -> FlowValue {
    FlowValue {
        orig_port: orig.to_be(),
        state,
        _pad0: 0,
        _pad1: 0,
        last_seen,
        since,
    }
}

fn v4(src: Ipv4Addr, dst: Ipv4Addr, t: &Tcp) -> Vec<u8> {
    pkt::ether(pkt::ETH_P_IP, None, &pkt::ip_tcp(src.into(), dst.into(), t))
}

fn v6(src: Ipv6Addr, dst: Ipv6Addr, t: &Tcp) -> Vec<u8> {
    pkt::ether(
        pkt::ETH_P_IPV6,
        None,
        &pkt::ip_tcp(src.into(), dst.into(), t),
    )
}

/// The TCP header's ports in a frame, and whether its checksum is right.
fn tcp_of(frame: &[u8]) -> (u16, u16, bool) {
    let ip = &frame[14..];
    let (src, dst, l4): (IpAddr, IpAddr, &[u8]) = if ip[0] >> 4 == 4 {
        let ihl = usize::from(ip[0] & 0xf) * 4;
        assert_eq!(pkt::checksum(&ip[..ihl]), 0, "IPv4 header checksum");
        let s: [u8; 4] = ip[12..16].try_into().unwrap();
        let d: [u8; 4] = ip[16..20].try_into().unwrap();
        (s.into(), d.into(), &ip[ihl..])
    } else {
        let s: [u8; 16] = ip[8..24].try_into().unwrap();
        let d: [u8; 16] = ip[24..40].try_into().unwrap();
        // Walk the extension headers the tests build.
        let (mut next, mut off) = (ip[6], 40);
        while next != pkt::IPPROTO_TCP {
            let len = match next {
                44 => 8,
                51 => (usize::from(ip[off + 1]) + 2) * 4,
                _ => (usize::from(ip[off + 1]) + 1) * 8,
            };
            next = ip[off];
            off += len;
        }
        (s.into(), d.into(), &ip[off..])
    };
    let ok = pkt::l4_checksum_ok(src, dst, pkt::IPPROTO_TCP, l4);
    (
        u16::from_be_bytes([l4[0], l4[1]]),
        u16::from_be_bytes([l4[2], l4[3]]),
        ok,
    )
}

#[test]
fn a_syn_opens_an_embryonic_flow_and_its_packets_are_rewritten_both_ways() {
    let p = Progs::new(SteerMode::Rewrite);
    let r = p.ingress(&v4(CLIENT, SERVER, &Tcp::new(40000, 8000, SYN)));
    assert_eq!(r.verdict, TC_ACT_UNSPEC);
    assert_eq!(tcp_of(&r.out), (40000, PROXY_PORT, true));
    let syns = p.table(names::SYNS);
    assert_eq!(syns.len(), 1);
    assert_eq!(syns[0].0, p.key(CLIENT.into(), 40000, SERVER.into(), 8000));
    assert_eq!(u16::from_be(syns[0].1.orig_port), 8000);
    assert!(p.table(names::FLOWS).is_empty(), "only sockops establishes");

    let r = p.egress(&v4(SERVER, CLIENT, &Tcp::new(PROXY_PORT, 40000, SYN | ACK)));
    assert_eq!(tcp_of(&r.out), (8000, 40000, true), "SYN-ACK restored");
    let mut data = Tcp::new(40000, 8000, PSH | ACK);
    data.payload = b"GET / HTTP/1.1\r\n\r\n".to_vec();
    let r = p.ingress(&v4(CLIENT, SERVER, &data));
    assert_eq!(tcp_of(&r.out), (40000, PROXY_PORT, true));
    // Another client port, not a SYN: not ours, left alone.
    let stray = v4(CLIENT, SERVER, &Tcp::new(40001, 8000, ACK));
    assert_eq!(p.ingress(&stray).out, stray);
    // A port that is not intercepted: untouched, no entry.
    let other = v4(CLIENT, SERVER, &Tcp::new(40002, 8081, SYN));
    assert_eq!(p.ingress(&other).out, other);
    assert_eq!(p.table(names::SYNS).len(), 1);
}

/// The agent's object finds a packet's target by its device's namespace
/// (bpf_get_netns_cookie in tc is init_net's for a packet without a
/// socket): a target for this namespace steers, with its counter slot.
#[test]
fn a_many_target_object_steers_by_the_devices_namespace() {
    let p = Progs::multi(SteerMode::Rewrite, 0);
    let r = p.ingress(&v4(CLIENT, SERVER, &Tcp::new(40000, 8000, SYN)));
    assert_eq!(tcp_of(&r.out), (40000, PROXY_PORT, true));
    assert_eq!(
        p.table(names::SYNS)[0].0,
        p.key(CLIENT.into(), 40000, SERVER.into(), 8000)
    );
    assert_eq!(p.counter(Counter::IngressSteered), 1);
    let r = p.egress(&v4(SERVER, CLIENT, &Tcp::new(PROXY_PORT, 40000, SYN | ACK)));
    assert_eq!(tcp_of(&r.out), (8000, 40000, true));
}

/// A packet on a device of a namespace that is no target (another pod's
/// entry only) passes untouched, makes no entry, and counts in slot 0.
#[test]
fn a_packet_of_a_namespace_that_is_no_target_passes() {
    let p = Progs::multi(SteerMode::Rewrite, 1);
    let syn = v4(CLIENT, SERVER, &Tcp::new(40000, 8000, SYN));
    let r = p.ingress(&syn);
    assert_eq!((r.verdict, &r.out), (TC_ACT_UNSPEC, &syn));
    assert!(p.table(names::SYNS).is_empty());
    assert_eq!(p.slot_counter(0, Counter::IngressPackets), 1);
    assert_eq!(p.counter(Counter::IngressPackets), 0);
}

#[test]
fn rsts_and_fins_from_the_client_end_nothing() {
    let mut p = Progs::new(SteerMode::Rewrite);
    let now = monotonic_coarse_ns();
    let k = p.key(CLIENT.into(), 40000, SERVER.into(), 8000);
    p.put(names::FLOWS, k, flow(8000, 0, now, 0));
    for (flags, seq) in [(RST, 7), (RST | ACK, 0x8000_0000), (FIN | ACK, 1000)] {
        let mut t = Tcp::new(40000, 8000, flags);
        t.seq = seq;
        let r = p.ingress(&v4(CLIENT, SERVER, &t));
        // Steered to the proxy's socket, whose TCP decides what it means.
        assert_eq!(
            tcp_of(&r.out),
            (40000, PROXY_PORT, true),
            "flags {flags:#x}"
        );
    }
    let flows = p.table(names::FLOWS);
    assert_eq!(flows.len(), 1, "the entry survives");
    assert_eq!(flows[0].1.state, 0, "and is still open");
}

#[test]
fn a_closed_flow_lingers_for_retransmissions() {
    let mut p = Progs::new(SteerMode::Rewrite);
    let now = monotonic_coarse_ns();
    let k = p.key(CLIENT.into(), 40000, SERVER.into(), 8000);
    p.put(names::CLOSING, k, flow(8000, flow_state::CLOSED, now, now));
    let r = p.ingress(&v4(CLIENT, SERVER, &Tcp::new(40000, 8000, FIN | ACK)));
    assert_eq!(
        tcp_of(&r.out),
        (40000, PROXY_PORT, true),
        "retransmitted FIN steered"
    );
    let r = p.egress(&v4(SERVER, CLIENT, &Tcp::new(PROXY_PORT, 40000, ACK)));
    assert_eq!(
        tcp_of(&r.out),
        (8000, 40000, true),
        "TIME_WAIT ACK restored"
    );
    assert_eq!(p.table(names::CLOSING).len(), 1);
    // A new connection on the same tuple and port: a new embryonic flow.
    let r = p.ingress(&v4(CLIENT, SERVER, &Tcp::new(40000, 8000, SYN)));
    assert_eq!(tcp_of(&r.out), (40000, PROXY_PORT, true));
    assert_eq!(
        (p.table(names::CLOSING).len(), p.table(names::SYNS).len()),
        (0, 1)
    );
}

#[test]
fn the_kernels_rst_for_an_embryonic_flow_ends_it_and_is_restored() {
    let p = Progs::new(SteerMode::Rewrite);
    p.ingress(&v4(CLIENT, SERVER, &Tcp::new(40000, 8000, SYN)));
    let r = p.egress(&v4(SERVER, CLIENT, &Tcp::new(PROXY_PORT, 40000, RST | ACK)));
    assert_eq!(tcp_of(&r.out), (8000, 40000, true));
    assert!(p.table(names::SYNS).is_empty());
}

#[test]
fn a_newcomer_on_a_live_tuple_is_held_off_until_the_old_flow_is_gone() {
    let mut p = Progs::new(SteerMode::Rewrite);
    let now = monotonic_coarse_ns();
    let k = p.key(CLIENT.into(), 45000, SERVER.into(), 8000);
    let syn_8080 = v4(CLIENT, SERVER, &Tcp::new(45000, 8080, SYN));
    // Open: dropped and counted.
    p.put(names::FLOWS, k, flow(8000, 0, now, 0));
    assert_eq!(p.ingress(&syn_8080).verdict, TC_ACT_SHOT);
    assert_eq!(p.counter(Counter::SteerCollisions), 1);
    // Closed just now (sockops moved it to CLOSING): still held, a late
    // retransmission may need it.
    let mut flows: HashMap<&mut MapData, FlowKey, FlowValue> =
        HashMap::try_from(p.ebpf.map_mut(names::FLOWS).unwrap()).unwrap();
    flows.remove(&k).unwrap();
    p.put(names::CLOSING, k, flow(8000, flow_state::CLOSED, now, now));
    assert_eq!(p.ingress(&syn_8080).verdict, TC_ACT_SHOT);
    // Closed 2 s ago: the newcomer takes the tuple.
    let then = now - 2_000_000_000;
    p.put(
        names::CLOSING,
        k,
        flow(8000, flow_state::CLOSED, then, then),
    );
    let r = p.ingress(&syn_8080);
    assert_eq!(r.verdict, TC_ACT_UNSPEC);
    assert_eq!(tcp_of(&r.out), (45000, PROXY_PORT, true));
    assert!(p.table(names::CLOSING).is_empty());
    let syns = p.table(names::SYNS);
    assert_eq!((syns.len(), u16::from_be(syns[0].1.orig_port)), (1, 8080));
    // A non-SYN to the other port belongs to no flow of ours: dropped, and
    // it never touches the entry.
    let ack = v4(CLIENT, SERVER, &Tcp::new(45000, 8000, ACK));
    assert_eq!(p.ingress(&ack).verdict, TC_ACT_SHOT);
    assert_eq!(p.table(names::SYNS)[0].1, syns[0].1);
}

#[test]
fn the_tproxy_backend_marks_and_keys_by_the_dialled_port() {
    let p = Progs::new(SteerMode::Tproxy);
    let syn = v4(CLIENT, SERVER, &Tcp::new(45000, 8000, SYN));
    let r = p.ingress(&syn);
    assert_eq!((r.verdict, r.mark), (TC_ACT_UNSPEC, STEER_MARK));
    assert_eq!(r.out, syn, "tproxy mode rewrites nothing");
    // The same client port to another port: a flow of its own.
    let r = p.ingress(&v4(CLIENT, SERVER, &Tcp::new(45000, 8080, SYN)));
    assert_eq!((r.verdict, r.mark), (TC_ACT_UNSPEC, STEER_MARK));
    assert_eq!(p.table(names::SYNS).len(), 2);
    assert_eq!(p.counter(Counter::SteerCollisions), 0);
}

#[test]
fn the_proxys_own_packets_are_never_steered() {
    let p = Progs::new(SteerMode::Rewrite);
    let syn = v4(CLIENT, SERVER, &Tcp::new(40000, 8000, SYN));
    let r = p.run(names::PROG_STEER, &syn, PROXY_MARK);
    assert_eq!(r.out, syn);
    assert!(p.table(names::SYNS).is_empty());
}

#[test]
fn ipv4_options_are_parsed_past() {
    let p = Progs::new(SteerMode::Rewrite);
    let seg = Tcp::new(40000, 8000, SYN).bytes(CLIENT.into(), SERVER.into());
    // Record route (7), 11 bytes, plus padding to 12: IHL 8.
    let opts = [7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0];
    let frame = pkt::ether(
        pkt::ETH_P_IP,
        None,
        &pkt::ipv4(CLIENT, SERVER, &opts, 0x4000, 6, &seg),
    );
    let r = p.ingress(&frame);
    assert_eq!(tcp_of(&r.out), (40000, PROXY_PORT, true));
    assert_eq!(r.out[14] & 0xf, 8);
}

#[test]
fn ipv6_extension_headers_are_walked() {
    let p = Progs::new(SteerMode::Rewrite);
    let seg = Tcp::new(40000, 8000, SYN).bytes(CLIENT6.into(), SERVER6.into());
    let exts = [Ext::options(0, 1), Ext::options(60, 2)];
    let frame = pkt::ether(
        pkt::ETH_P_IPV6,
        None,
        &pkt::ipv6(CLIENT6, SERVER6, &exts, 6, &seg),
    );
    let r = p.ingress(&frame);
    assert_eq!(tcp_of(&r.out), (40000, PROXY_PORT, true));
    let r = p.egress(&v6(
        SERVER6,
        CLIENT6,
        &Tcp::new(PROXY_PORT, 40000, SYN | ACK),
    ));
    assert_eq!(tcp_of(&r.out), (8000, 40000, true));
    // ESP (50) is not TCP to us: untouched.
    let esp = pkt::ether(
        pkt::ETH_P_IPV6,
        None,
        &pkt::ipv6(CLIENT6, SERVER6, &[], 50, &seg),
    );
    assert_eq!(p.ingress(&esp).out, esp);
}

#[test]
fn first_fragments_are_steered_and_later_ones_pass() {
    let p = Progs::new(SteerMode::Rewrite);
    // IPv4: the first fragment (MF, offset 0) carries the TCP header. Its
    // checksum covers bytes in later fragments, so check the delta instead:
    // the rewritten port, and the checksum field moved by exactly that.
    let mut t = Tcp::new(40000, 8000, PSH | ACK);
    t.payload = vec![7; 64];
    let seg = t.bytes(CLIENT.into(), SERVER.into());
    let first = pkt::ether(
        pkt::ETH_P_IP,
        None,
        &pkt::ipv4(CLIENT, SERVER, &[], 0x2000, 6, &seg[..48]),
    );
    let p2 = Progs::new(SteerMode::Rewrite);
    p2.ingress(&v4(CLIENT, SERVER, &Tcp::new(40000, 8000, SYN)));
    let r = p2.ingress(&first);
    let l4 = &r.out[34..];
    assert_eq!(u16::from_be_bytes([l4[2], l4[3]]), PROXY_PORT);
    // Reassemble in our head: the whole segment's checksum must verify.
    let mut whole = seg.clone();
    whole[..48].copy_from_slice(l4);
    assert!(pkt::l4_checksum_ok(CLIENT.into(), SERVER.into(), 6, &whole));
    // A later fragment has no ports: untouched and counted.
    let later = pkt::ether(
        pkt::ETH_P_IP,
        None,
        &pkt::ipv4(CLIENT, SERVER, &[], 6, 6, &seg[48..]),
    );
    assert_eq!(p.ingress(&later).out, later);
    assert_eq!(p.counter(Counter::Fragments), 1);
    // IPv6: a fragment header at offset 0 is walked; a later one passes.
    let seg6 = Tcp::new(40000, 8000, SYN).bytes(CLIENT6.into(), SERVER6.into());
    let first6 = pkt::ether(
        pkt::ETH_P_IPV6,
        None,
        &pkt::ipv6(CLIENT6, SERVER6, &[Ext::fragment(0, true)], 6, &seg6),
    );
    assert_eq!(tcp_of(&p.ingress(&first6).out), (40000, PROXY_PORT, true));
    let later6 = pkt::ether(
        pkt::ETH_P_IPV6,
        None,
        &pkt::ipv6(CLIENT6, SERVER6, &[Ext::fragment(3, false)], 6, &seg6),
    );
    assert_eq!(p.ingress(&later6).out, later6);
    assert_eq!(p.counter(Counter::Fragments), 2);
}

/// A VLAN frame belongs to a VLAN interface (without one the kernel drops
/// it): passed and counted. A frame whose TCP header is cut short may be
/// a tiny first fragment in disguise: dropped and counted, never steered
/// nor passed to the app.
#[test]
fn vlan_tagged_frames_pass_and_cut_headers_are_dropped() {
    let p = Progs::new(SteerMode::Rewrite);
    let inner = pkt::ip_tcp(CLIENT.into(), SERVER.into(), &Tcp::new(40000, 8000, SYN));
    let tagged = pkt::ether(pkt::ETH_P_IP, Some(100), &inner);
    assert_eq!(p.ingress(&tagged).out, tagged);
    assert_eq!(p.counter(Counter::VlanPassed), 1);
    let syn = v4(CLIENT, SERVER, &Tcp::new(40000, 8000, SYN));
    for cut in [34, 40, 50] {
        let short = &syn[..cut];
        let r = p.ingress(short);
        assert_eq!(
            (r.verdict, r.out.as_slice()),
            (TC_ACT_SHOT, short),
            "cut at {cut}"
        );
    }
    assert_eq!(p.counter(Counter::IngressUnreadable), 3);
    assert!(p.table(names::SYNS).is_empty());
}

/// RFC 1858's tiny-fragment attack: a SYN to 8000 whose first fragment
/// holds only 8 bytes of TCP header (ports, no flags), the rest at offset
/// 8. Linux reassembles them into a SYN; steering never sees its flags.
/// Both fragments are dropped (the first cannot be read, the second could
/// only overwrite a first fragment's flags, RFC 3128), and counted.
#[test]
fn a_tiny_first_fragment_and_an_offset_8_fragment_are_dropped() {
    let p = Progs::new(SteerMode::Rewrite);
    let seg = Tcp::new(40000, 8000, SYN).bytes(CLIENT.into(), SERVER.into());
    let first = pkt::ether(
        pkt::ETH_P_IP,
        None,
        &pkt::ipv4(CLIENT, SERVER, &[], 0x2000, 6, &seg[..8]),
    );
    let rest = pkt::ether(
        pkt::ETH_P_IP,
        None,
        &pkt::ipv4(CLIENT, SERVER, &[], 1, 6, &seg[8..]),
    );
    assert_eq!(p.ingress(&first).verdict, TC_ACT_SHOT);
    assert_eq!(p.ingress(&rest).verdict, TC_ACT_SHOT);
    assert_eq!(p.counter(Counter::IngressUnreadable), 2);
    assert_eq!(p.counter(Counter::Fragments), 0);
    assert!(p.table(names::SYNS).is_empty());
    // The same split at 16 bytes (offset 2): the first fragment holds the
    // flags, so it is a SYN like any other, and the rest passes.
    let mut long = Tcp::new(40001, 8000, SYN);
    long.payload = vec![1; 16];
    let seg = long.bytes(CLIENT.into(), SERVER.into());
    let first = pkt::ether(
        pkt::ETH_P_IP,
        None,
        &pkt::ipv4(CLIENT, SERVER, &[], 0x2000, 6, &seg[..24]),
    );
    let r = p.ingress(&first);
    assert_eq!(r.verdict, TC_ACT_UNSPEC);
    assert_eq!(u16::from_be_bytes([r.out[36], r.out[37]]), PROXY_PORT);
    assert_eq!(p.table(names::SYNS).len(), 1);
}

/// An extension header of the given type with `units` 8-byte units.
fn ext(kind: u8, units: usize) -> Ext {
    match kind {
        0 | 60 => Ext::options(kind, units),
        // Routing: type 0 segments left 0, then padding.
        43 => {
            let mut body = vec![0, (units - 1) as u8, 0, 0];
            body.resize(8 * units, 0);
            Ext { kind, body }
        }
        44 => Ext::fragment(0, false),
        // AH: length in 4-byte units minus 2.
        51 => {
            let mut body = vec![0, (2 * units - 2) as u8, 0, 0];
            body.resize(8 * units, 0);
            Ext { kind, body }
        }
        _ => unreachable!(),
    }
}

/// Every extension header type at any length up to a chain of eight is
/// walked to the TCP header (the SYN is steered: before, a 200-byte
/// destination-options header hid it and it went straight to the app); a
/// chain of nine cannot be walked: dropped and counted.
#[test]
fn ipv6_chains_of_any_length_up_to_eight_headers_are_walked() {
    let p = Progs::new(SteerMode::Rewrite);
    let mut port = 41000;
    let mut syn_behind = |exts: Vec<Ext>| {
        port += 1;
        let seg = Tcp::new(port, 8000, SYN).bytes(CLIENT6.into(), SERVER6.into());
        let frame = pkt::ether(
            pkt::ETH_P_IPV6,
            None,
            &pkt::ipv6(CLIENT6, SERVER6, &exts, 6, &seg),
        );
        let r = p.ingress(&frame);
        (r.verdict, tcp_of(&r.out).1)
    };
    // 200 bytes of destination options.
    assert_eq!(
        syn_behind(vec![ext(60, 25)]),
        (TC_ACT_UNSPEC, PROXY_PORT),
        "200-byte destination options"
    );
    for kind in [0, 43, 44, 51, 60] {
        assert_eq!(
            syn_behind(vec![ext(kind, 2)]),
            (TC_ACT_UNSPEC, PROXY_PORT),
            "extension header {kind}"
        );
    }
    let eight: Vec<Ext> = [0, 60, 43, 44, 51, 60, 43, 60]
        .into_iter()
        .map(|k| ext(k, 1))
        .collect();
    assert_eq!(syn_behind(eight), (TC_ACT_UNSPEC, PROXY_PORT), "eight");
    assert_eq!(p.counter(Counter::IngressUnreadable), 0);
    let nine: Vec<Ext> = [0, 60, 43, 44, 51, 60, 43, 60, 60]
        .into_iter()
        .map(|k| ext(k, 1))
        .collect();
    assert_eq!(syn_behind(nine).0, TC_ACT_SHOT, "nine");
    assert_eq!(p.counter(Counter::IngressUnreadable), 1);
    assert_eq!(p.table(names::SYNS).len(), 7);
}

/// A packet other than a SYN to an intercepted port, of no flow tproxy
/// steered: dropped and counted (before, it passed: a connection that
/// began around the steering kept going to the app), unless its
/// connection was open when tproxy attached (`PRIOR_FLOWS`). Ports tproxy
/// does not intercept are not its business.
#[test]
fn non_syns_of_unknown_flows_are_dropped_unless_open_at_attach() {
    let mut p = Progs::new(SteerMode::Rewrite);
    let ack = v4(CLIENT, SERVER, &Tcp::new(42000, 8000, ACK));
    assert_eq!(p.ingress(&ack).verdict, TC_ACT_SHOT);
    assert_eq!(p.counter(Counter::IngressUnknownDropped), 1);
    let other = v4(CLIENT, SERVER, &Tcp::new(42000, 7000, ACK));
    assert_eq!(p.ingress(&other).verdict, TC_ACT_UNSPEC);
    // Listed at attach: the app's own socket, the dialled port as local port.
    let mut prior = p.key(CLIENT.into(), 42000, SERVER.into(), 8000);
    prior.local_port = 8000u16.to_be();
    let mut h: HashMap<&mut MapData, FlowKey, u64> =
        HashMap::try_from(p.ebpf.map_mut(names::PRIOR_FLOWS).unwrap()).unwrap();
    h.insert(prior, 0, 0).unwrap();
    let r = p.ingress(&ack);
    assert_eq!((r.verdict, r.out), (TC_ACT_UNSPEC, ack.clone()));
    assert_eq!(p.counter(Counter::IngressUnknownDropped), 1);
    assert!(p.table(names::SYNS).is_empty());
}

/// While a target drains (STEER_NEW clear), new connections are refused:
/// their SYNs are dropped and counted, never passed to the app (before,
/// they went straight to it). Flows already steered keep their path.
#[test]
fn while_draining_new_syns_are_dropped_and_steered_flows_go_on() {
    let mut p = Progs::new(SteerMode::Rewrite);
    p.ingress(&v4(CLIENT, SERVER, &Tcp::new(43000, 8000, SYN)));
    let mut targets: HashMap<&mut MapData, u64, Target> =
        HashMap::try_from(p.ebpf.map_mut(names::TARGETS).unwrap()).unwrap();
    let mut t = targets.get(&p.cookie, 0).unwrap();
    t.config.flags &= !flags::STEER_NEW;
    targets.insert(p.cookie, t, 0).unwrap();
    let r = p.ingress(&v4(CLIENT, SERVER, &Tcp::new(43001, 8000, SYN)));
    assert_eq!(r.verdict, TC_ACT_SHOT);
    assert_eq!(p.counter(Counter::SynsRefusedDraining), 1);
    let r = p.ingress(&v4(CLIENT, SERVER, &Tcp::new(43000, 8000, ACK)));
    assert_eq!((r.verdict, tcp_of(&r.out).1), (TC_ACT_UNSPEC, PROXY_PORT));
}

/// A spoofed SYN from a client's address and port to another intercepted
/// port opens an embryonic entry that holds the tuple off; repeating it
/// (or the proxy's SYN-ACK retransmissions) refreshes `last_seen` but not
/// `since`, so the hold-off ends EMBRYONIC_HOLD_NS after the first SYN and
/// the real client's connection gets through (before, each spoofed SYN
/// renewed the hold-off, for as long as the spoofing lasted).
#[test]
fn spoofed_syns_cannot_extend_an_embryonic_hold_off() {
    let mut p = Progs::new(SteerMode::Rewrite);
    let now = monotonic_coarse_ns();
    let k = p.key(CLIENT.into(), 44000, SERVER.into(), 8080);
    // Opened 4 s ago by a spoofed SYN to 8080, "seen" just now.
    let first = now - 4_000_000_000;
    p.put(names::SYNS, k, flow(8080, 0, now, first));
    // Another spoofed SYN refreshes it, and the hold-off still ends.
    let spoof = v4(CLIENT, SERVER, &Tcp::new(44000, 8080, SYN));
    assert_eq!(p.ingress(&spoof).verdict, TC_ACT_UNSPEC);
    assert_eq!(p.table(names::SYNS)[0].1.since, first);
    let real = p.ingress(&v4(CLIENT, SERVER, &Tcp::new(44000, 8000, SYN)));
    assert_eq!(
        (real.verdict, tcp_of(&real.out).1),
        (TC_ACT_UNSPEC, PROXY_PORT)
    );
    let syns = p.table(names::SYNS);
    assert_eq!(u16::from_be(syns[0].1.orig_port), 8000);
    // The newcomer's own entry now holds the tuple against the spoofer.
    assert_eq!(p.ingress(&spoof).verdict, TC_ACT_SHOT);
    assert_eq!(p.counter(Counter::SteerCollisions), 1);
}
