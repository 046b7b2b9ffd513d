//! A target: one network namespace tproxy serves (a pod, or the namespace of
//! a single `tproxy` run). Its settings and intercepted ports (`TARGETS`), its
//! addresses (`TARGET_ADDRS`), what all targets of the node share (`NODE`),
//! and the defaults userspace fills them with. The eBPF side finds a
//! packet's or socket's target in `tproxy-ebpf/src/counters.rs` and
//! `netns.rs`.
use core::mem::{offset_of, size_of};

use crate::{AF_INET, AF_INET6};

/// Default upper bound on redirected bytes queued, unread, at one socket.
/// The bound in force follows the reader (`SockState::rcvbuf`: its receive
/// buffer or its recent pace, whichever is larger) when that is smaller.
pub const DEFAULT_ACCEL_MAX_QUEUED: u32 = 16 << 20;
/// Default `Config::accel_retire_ms`: a TCP stretch no shorter than a few
/// scheduler slices (a reader descheduled for a moment is not a stream that
/// never lets it catch up).
pub const DEFAULT_ACCEL_RETIRE_MS: u32 = 100;
/// Default `Config::accel_min_message`: a one-way stream's redirects
/// lost to TCP in the bench at 7-37 KB a message (HAProxy's 16 KiB writes,
/// Envoy's coalesced small ones), and won at 75 KB and up.
pub const DEFAULT_ACCEL_MIN_MESSAGE: u32 = 48 << 10;
/// Redirects over which a sender's mean message size is judged against
/// `Config::accel_min_message`.
pub const STREAM_WINDOW_MSGS: u32 = 64;
/// Consecutive windows of small messages that retire the sender: one
/// window dips below the mean now and then (the first messages after a
/// return, a pause in the stream), a stream of small writes stays there.
pub const STREAM_SMALL_WINDOWS: u32 = 4;
/// Default number of targets (network namespaces) one loaded object
/// serves: `TARGETS` entries, and counter slots. A single `tproxy` run
/// serves one; the agent sizes it from its config.
pub const TARGETS_MAX: u32 = 256;
/// Words of a target's port bitmap (`Target::ports`): one bit per port.
pub const PORT_WORDS: usize = 65_536 / 64;
/// Addresses a target may claim in `TARGET_ADDRS` (its interface's, link-
/// local ones excepted); the map holds this many per target.
pub const ADDRS_PER_TARGET: u32 = 8;

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
    /// A sender whose redirects averaged fewer bytes than this, read
    /// about one per read, over `STREAM_SMALL_WINDOWS` windows of
    /// `STREAM_WINDOW_MSGS` in a row, while its peer sent nothing (a
    /// one-way stream of small writes), retires: each redirected message
    /// is queued and announced to the reader on its own, where TCP merges
    /// such writes into fewer, larger segments and wake-ups. Bytes; 0:
    /// never.
    pub accel_min_message: u32,
    pub _pad0: u32,
}

/// `TARGETS` value, keyed by the netns cookie: the settings and the
/// intercepted ports (bit `p % 64` of word `p / 64`), so every hook finds
/// all it needs about a packet's or socket's namespace in one lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub config: Config,
    pub ports: [u64; PORT_WORDS],
    /// The intercepted ports whose proxy<->app (or pod<->pod) connections
    /// sockops pairs for acceleration: by default all of `ports`.
    pub accel_ports: [u64; PORT_WORDS],
}

impl Target {
    pub fn new(config: Config, ports: impl IntoIterator<Item = u16>) -> Target {
        let mut t = Target {
            config,
            ports: [0; PORT_WORDS],
            accel_ports: [0; PORT_WORDS],
        };
        for p in ports {
            t.ports[usize::from(p / 64)] |= 1 << (p % 64);
        }
        t.accel_ports = t.ports;
        t
    }

    /// Accelerates only those of its ports that are in `ports`.
    pub fn accelerate_only(&mut self, ports: impl IntoIterator<Item = u16>) {
        let mut only = [0u64; PORT_WORDS];
        for p in ports {
            only[usize::from(p / 64)] |= 1 << (p % 64);
        }
        for (a, (o, i)) in self
            .accel_ports
            .iter_mut()
            .zip(only.iter().zip(self.ports.iter()))
        {
            *a = o & i;
        }
    }

    #[inline(always)]
    pub fn accelerates(&self, port: u16) -> bool {
        self.accel_ports[usize::from(port >> 6) & (PORT_WORDS - 1)] & (1 << (port & 63)) != 0
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
    /// for the read hook to refresh `SockState::rcvbuf`; 0 if
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
    /// Where sockops finds the calling process's cgroup on a kernel whose
    /// sock_ops programs may not call bpf_get_current_ancestor_cgroup_id
    /// (before 6.4): offsets (from BTF) of `task_struct.cgroups`,
    /// `css_set.dfl_cgrp`, `cgroup.level`, `cgroup.ancestors`,
    /// `cgroup.kn` and `kernfs_node.id`, the helper's own walk. 0 where
    /// the helper is used (or BTF lacks one: no caller is the proxy).
    pub task_cgroups_offset: u32,
    pub css_set_dfl_cgrp_offset: u32,
    pub cgroup_level_offset: u32,
    pub cgroup_ancestors_offset: u32,
    pub cgroup_kn_offset: u32,
    pub kernfs_node_id_offset: u32,
    /// Offset of `msg_flags` in the kernel's `struct msghdr` (from BTF):
    /// the send hook (fentry on tcp_bpf_sendmsg, where the kernel has
    /// tracing programs) reads a send's flags there; 0 if unknown.
    pub msghdr_flags_offset: u32,
    /// Where sk_msg finds whether the kernel will take a redirect's bytes
    /// into the reader's socket memory (`tproxy-ebpf/src/memory.rs`):
    /// offsets (from BTF) of `sock_common.skc_prot`, of
    /// `proto.memory_allocated`, `proto.memory_pressure` and
    /// `proto.sysctl_mem`, of `sock.sk_memcg`, `mem_cgroup.tcpmem` and
    /// `page_counter.max`. Without the first four the loader refuses
    /// acceleration; the last three are 0 on a kernel without cgroup v1
    /// memory (no cgroup TCP limit to check).
    pub sk_prot_offset: u32,
    pub proto_memory_allocated_offset: u32,
    pub proto_memory_pressure_offset: u32,
    pub proto_sysctl_mem_offset: u32,
    pub sk_memcg_offset: u32,
    pub memcg_tcpmem_offset: u32,
    pub page_counter_max_offset: u32,
    /// Pages of TCP memory sk_msg keeps spare below a limit: per CPU,
    /// 1 MiB by which the machine's count may lag (the kernel's per-CPU
    /// reserve) and 1 MiB for a message another sender charges between
    /// the check and its redirect (a message is at most 17 page frags).
    pub mem_margin_pages: u32,
    /// The machine's possible CPUs: sk_msg splits the machine's TCP memory
    /// headroom among them (`memory.rs`).
    pub possible_cpus: u32,
}

/// `NodeConfig::flags` bits.
pub mod node_flags {
    /// Pair a pod's client with another pod's proxy on this node (both
    /// legs socket to socket). The agent's default (`--no-accel-same-node`
    /// clears it).
    pub const SAME_NODE: u32 = 1 << 0;
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

// Layout checks: the eBPF side reads these structs through raw map values,
// so a silent change of size or offset would be a wrong answer, not an error.
const _: () = {
    assert!(size_of::<Config>() == 64);
    assert!(offset_of!(Config, accel_min_message) == 56);
    assert!(offset_of!(Config, flows_quota) == 48);
    assert!(offset_of!(Config, socks_quota) == 52);
    assert!(offset_of!(Config, proxy_cgroup_level) == 28);
    assert!(offset_of!(Config, proxy_cgroup_id) == 40);
    assert!(offset_of!(Config, l2_len) == 3);
    assert!(offset_of!(Config, netns_cookie) == 32);
    assert!(offset_of!(Config, accel_max_queued) == 16);
    assert!(offset_of!(Config, accel_retire_ms) == 20);
    assert!(offset_of!(Config, slot) == 24);
    assert!(size_of::<Target>() == 64 + 2 * 8 * PORT_WORDS);
    assert!(offset_of!(Target, ports) == 64);
    assert!(offset_of!(Config, proxy_mark) == 4);
    assert!(offset_of!(Config, steer_mark) == 8);
    assert!(offset_of!(Config, flags) == 12);
    assert!(size_of::<NodeConfig>() == 96);
    assert!(offset_of!(NodeConfig, sk_prot_offset) == 60);
    assert!(offset_of!(NodeConfig, mem_margin_pages) == 88);
    assert!(offset_of!(NodeConfig, msghdr_flags_offset) == 56);
    assert!(offset_of!(NodeConfig, kernfs_node_id_offset) == 52);
    assert!(offset_of!(NodeConfig, tcp_write_seq_offset) == 24);
    assert!(offset_of!(NodeConfig, single_netns_cookie) == 16);
    assert!(size_of::<TargetAddr>() == 24);
    assert!(offset_of!(TargetAddr, family) == 16);
};

#[cfg(test)]
mod tests {
    use super::*;

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
            accel_min_message: 0,
            _pad0: 0,
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
}
