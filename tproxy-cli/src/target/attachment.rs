//! Attach per target: one network namespace (a pod, or the namespace of a
//! single `tproxy` run) served by a `Loaded` object, with the `TargetEnv`
//! its probe made. Its `TARGETS` entry, its cgroup hooks, its tc programs
//! and (tproxy back-end) its routing, owned by one `TargetAttachment`
//! whose Drop detaches exactly those; with them, the entries it keeps in
//! the shared maps (the connections and proxy listeners older than it,
//! its addresses), the in-place update of a target's settings, and the
//! steering guard that covers an interface while its target is replaced.
//!
//! Attaching and dropping touch the interface and routing of the target's
//! namespace: the calling thread must be in it (the agent enters it with
//! `netns::Entered` for the duration).
use std::net::IpAddr;

use aya::{
    maps::{HashMap, Map, MapData},
    programs::{
        CgroupAttachMode, CgroupSockAddr, CgroupSockopt, SchedClassifier, SockOps, TcAttachType,
        links::LinkOrder,
        tc::{NlOptions, TcAttachOptions},
    },
};
use tproxy_common::{
    ADDRS_PER_TARGET, Config, FlowKey, ListenerKey, Target, TargetAddr, flags, names,
};
use tracing::warn;

use crate::{
    config::{
        options::{Options, TcMode},
        ports::PortSet,
    },
    sys::{error::Chain, routing::TproxyRouting, tc::ClsactQdisc},
    target::{
        Error, Result,
        attach::{
            Attachment, GetsocknameAttachment, GetsockoptAttachment, SockopsAttachment,
            TcAttachment,
        },
        installed::{AttachKind, Attached, Planned},
        loader::{self, Loaded, attached, program, sockops_name},
        probe::TargetEnv,
    },
};

/// Who the proxy is (`tproxy-ebpf/src/identity.rs`): a cgroup's id and
/// level, and the cgroup open: `--proxy-cgroup` if given (it must be
/// inside the target's cgroup, where the hooks run), else the target's
/// cgroup itself.
pub fn proxy_identity(opts: &Options, env: &TargetEnv) -> Result<((u64, u32), std::fs::File)> {
    let dir = match &opts.proxy_cgroup {
        None => env
            .cgroup_dir
            .try_clone()
            .map_err(|e| Error::io("reading the proxy's cgroup", e))?,
        Some(path) => {
            let proxy = crate::sys::system::open_cgroup(Some(path))?;
            if !crate::sys::system::cgroup_within(&proxy.dir, &env.cgroup_dir)? {
                return Err(Error::ProxyCgroupOutside {
                    proxy: path.clone(),
                    cgroup: env.cgroup.clone(),
                });
            }
            proxy.dir
        }
    };
    Ok((crate::sys::system::cgroup_identity(&dir)?, dir))
}

/// The proxy's listeners on its port that are older than the target
/// (`PRIOR_LISTENERS`): sockops counts the ones that start listening later
/// (TCP_LISTEN_CB) and uncounts them when they close, but never saw these
/// start. Found in the calling thread's namespace's socket table, each
/// kept if a process of the proxy's cgroup holds it; `recount` (in that
/// namespace) counts down those that stopped listening, so a stranger
/// binding the same address later is not taken for the proxy. Removed on
/// drop.
pub struct PriorListeners {
    map: Map,
    cookie: u64,
    /// Each listening socket counted: its key and socket inode.
    counted: Vec<(ListenerKey, u64)>,
}

impl PriorListeners {
    fn find(map: Map, port: u16, cookie: u64, proxy: &std::fs::File) -> PriorListeners {
        let mut me = PriorListeners {
            map,
            cookie,
            counted: Vec::new(),
        };
        let found = match listening_sockets(port) {
            Ok(found) => found,
            Err(e) => {
                warn!(
                    "reading the namespace's TCP listeners: {e}; a proxy already listening on {port} gets steered flows once it listens again"
                );
                return me;
            }
        };
        for (mut key, inode) in found {
            key.netns_cookie = cookie;
            let owned = socket_owners(inode).into_iter().any(|pid| {
                crate::sys::system::process_cgroup(pid)
                    .and_then(|cg| crate::sys::system::cgroup_within(&cg, proxy))
                    .unwrap_or(false)
            });
            if owned {
                me.counted.push((key, inode));
            } else {
                warn!(
                    "a socket listening on port {port} (inode {inode}) is not the proxy's (no process of its cgroup holds it): steered flows are refused while it is the one that would take them"
                );
            }
        }
        me.write();
        me
    }

    /// Counts down the listeners that closed (call in the target's
    /// namespace); how many.
    pub fn recount(&mut self) -> usize {
        let Some(port) = self.counted.first().map(|(k, _)| k.port as u16) else {
            return 0;
        };
        let Ok(now) = listening_sockets(port) else {
            return 0;
        };
        let before = self.counted.len();
        self.counted
            .retain(|(_, inode)| now.iter().any(|(_, i)| i == inode));
        let gone = before - self.counted.len();
        if gone > 0 {
            self.write();
        }
        gone
    }

    fn write(&mut self) {
        let Ok(mut m) = HashMap::<&mut MapData, ListenerKey, u64>::try_from(&mut self.map) else {
            return;
        };
        let keys: Vec<ListenerKey> = m
            .keys()
            .flatten()
            .filter(|k| k.netns_cookie == self.cookie)
            .collect();
        for (key, _) in &self.counted {
            let n = self.counted.iter().filter(|(k, _)| k == key).count() as u64;
            let _ = m.insert(*key, n, 0);
        }
        for key in keys {
            if !self.counted.iter().any(|(k, _)| *k == key) {
                let _ = m.remove(&key);
            }
        }
    }
}

impl Drop for PriorListeners {
    fn drop(&mut self) {
        if let Ok(mut m) = HashMap::<&mut MapData, ListenerKey, u64>::try_from(&mut self.map) {
            for (key, _) in &self.counted {
                let _ = m.remove(key);
            }
        }
    }
}

/// The sockets listening on `port` in the calling thread's namespace (key
/// without its cookie, and socket inode), as `bpf_sock` shows them: IPv4
/// sockets as AF_INET, every tcp6 socket as AF_INET6 with its address as
/// bound (`[::]` for a dual-stack one).
fn listening_sockets(port: u16) -> std::io::Result<Vec<(ListenerKey, u64)>> {
    let mut out = Vec::new();
    for row in tcp_rows()? {
        if row.state != TCP_LISTEN {
            continue;
        }
        let Some((a4, p)) = proc_addr(&row.local) else {
            continue;
        };
        if p != port {
            continue;
        }
        let (family, addr) = if row.v6 {
            let Some(a) = proc_addr6(&row.local) else {
                continue;
            };
            (tproxy_common::AF_INET6, a)
        } else {
            let Some(a) = a4 else { continue };
            (tproxy_common::AF_INET, [a, 0, 0, 0])
        };
        out.push((
            ListenerKey {
                addr,
                port: u32::from(port),
                family: u32::from(family),
                netns_cookie: 0,
            },
            row.inode,
        ));
    }
    Ok(out)
}

/// The processes holding socket `inode` open (a walk of /proc/*/fd).
fn socket_owners(inode: u64) -> Vec<u32> {
    let want = format!("socket:[{inode}]");
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| p.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
                fds.flatten().any(|fd| {
                    std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == want.as_str())
                })
            })
        })
        .collect()
}

/// One attached target. Fields drop in declaration order: steering stops
/// first; the `TARGETS` entry goes last, once nothing of the target runs.
pub struct TargetAttachment {
    steer: Option<TcAttachment>,
    restore: Option<TcAttachment>,
    #[expect(dead_code, reason = "held for its Drop")]
    routing: Option<TproxyRouting>,
    getsockopt: Option<GetsockoptAttachment>,
    setsockopt: Option<GetsockoptAttachment>,
    getsockname: Vec<GetsocknameAttachment>,
    sockops: Option<SockopsAttachment>,
    clsact: Option<ClsactQdisc>,
    addrs: TargetAddrs,
    prior: PriorFlows,
    listeners: PriorListeners,
    entry: TargetEntry,
    /// Last: once the `TARGETS` entry is gone, no program writes an entry
    /// of the namespace any more; what is left of it goes.
    #[expect(dead_code, reason = "held for its Drop")]
    sweep: TargetSweep,
    attachments: Vec<Attached>,
    iface: String,
}

/// The target's `TARGETS` entry; removed on drop unless kept (for the
/// target replacing it, `TargetAttachment::keep_entry`).
struct TargetEntry {
    map: Map,
    cookie: u64,
    keep: bool,
}

impl Drop for TargetEntry {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if let Err(e) = loader::remove_target(&mut self.map, self.cookie) {
            warn!(
                "removing target {:#x} from TARGETS: {}",
                self.cookie,
                Chain(&e)
            );
        }
    }
}

/// Sweeps the target's entries out of the shared maps on drop
/// (`sweep.rs`), after everything else of it is detached.
struct TargetSweep {
    maps: crate::target::sweep::SweepMaps,
    cookie: u64,
    slot: u32,
}

impl Drop for TargetSweep {
    fn drop(&mut self) {
        self.maps
            .sweep_logged(&format!("netns {:#x}", self.cookie), self.cookie, self.slot);
    }
}

/// The target's addresses in `TARGET_ADDRS` (its interface's): how a
/// client in another pod of this node, dialling one of them, knows it is
/// dialling this target (`tproxy-ebpf/src/peer.rs`). Removed on drop.
struct TargetAddrs {
    map: Map,
    cookie: u64,
    addrs: Vec<TargetAddr>,
}

impl TargetAddrs {
    /// Claims the addresses of `iface` (the calling thread's namespace)
    /// for the target `cookie`. An address another target already claims
    /// (two pods with one IP: a stale target) stays that target's: this
    /// one is then not found by clients dialling it, which costs only
    /// acceleration. Never an error: the target works without them.
    fn register(mut map: Map, iface: &str, cookie: u64) -> TargetAddrs {
        let mut addrs = Vec::new();
        let found = match interface_addrs(iface) {
            Ok(found) => found,
            Err(e) => {
                warn!(
                    "reading the addresses of {iface}: {e}; clients of other pods will not be accelerated"
                );
                Vec::new()
            }
        };
        const BPF_NOEXIST: u64 = 1;
        for ip in found.into_iter().take(ADDRS_PER_TARGET as usize) {
            let key = TargetAddr::from_ip(ip);
            let r = HashMap::<&mut MapData, TargetAddr, u64>::try_from(&mut map)
                .and_then(|mut m| m.insert(key, cookie, BPF_NOEXIST));
            match r {
                Ok(()) => addrs.push(key),
                Err(e) => warn!("claiming {ip} for {iface}: {e} (another target has it?)"),
            }
        }
        TargetAddrs { map, cookie, addrs }
    }

    /// The addresses claimed, no longer removed on drop.
    fn into_addrs(mut self) -> Vec<TargetAddr> {
        std::mem::take(&mut self.addrs)
    }
}

impl Drop for TargetAddrs {
    fn drop(&mut self) {
        let Ok(mut m) = HashMap::<&mut MapData, TargetAddr, u64>::try_from(&mut self.map) else {
            return;
        };
        for key in &self.addrs {
            // Only our own claim.
            if m.get(key, 0).is_ok_and(|c| c == self.cookie) {
                let _ = m.remove(key);
            }
        }
    }
}

/// The connections to intercepted ports that were open when the target
/// was attached (`PRIOR_FLOWS`): the only non-SYN packets of unknown flows
/// that steering lets through to the app. Listed from the namespace's
/// socket table before the tc programs attach (so they lose nothing) and
/// again after (for the handshakes that were finishing in between: their
/// sockets are then in SYN_RECV); removed on drop.
struct PriorFlows {
    map: Map,
    keys: Vec<FlowKey>,
}

impl PriorFlows {
    fn new(map: Map) -> PriorFlows {
        PriorFlows {
            map,
            keys: Vec::new(),
        }
    }

    /// Lists the calling thread's namespace's connections to `ports`.
    fn list(&mut self, ports: &PortSet, cookie: u64) {
        self.list_where(|p| ports.contains(p), cookie);
    }

    /// Lists the calling thread's namespace's connections to the ports
    /// `wanted` says yes to.
    fn list_where(&mut self, wanted: impl Fn(u16) -> bool, cookie: u64) {
        let found = match open_connections(wanted, cookie) {
            Ok(found) => found,
            Err(e) => {
                warn!(
                    "reading the namespace's TCP sockets: {e}; connections open before tproxy started may be cut"
                );
                return;
            }
        };
        let Ok(mut m) = HashMap::<&mut MapData, FlowKey, u64>::try_from(&mut self.map) else {
            return;
        };
        let mut full = 0;
        for key in found {
            if self.keys.contains(&key) {
                continue;
            }
            match m.insert(key, 0, 0) {
                Ok(()) => self.keys.push(key),
                Err(_) => full += 1,
            }
        }
        if full > 0 {
            warn!(
                "{full} connection(s) open before tproxy started could not be listed (PRIOR_FLOWS is full): their packets will be dropped"
            );
        }
    }
}

impl PriorFlows {
    /// The connections listed, no longer removed on drop.
    fn into_keys(mut self) -> Vec<FlowKey> {
        std::mem::take(&mut self.keys)
    }
}

impl Drop for PriorFlows {
    fn drop(&mut self) {
        if let Ok(mut m) = HashMap::<&mut MapData, FlowKey, u64>::try_from(&mut self.map) {
            for key in &self.keys {
                let _ = m.remove(key);
            }
        }
    }
}

/// The connections (any state but LISTEN) to a port `wanted` says yes to,
/// in the calling thread's network namespace, keyed as steering looks them
/// up (client first, the dialled port as local port).
pub fn open_connections(
    wanted: impl Fn(u16) -> bool,
    cookie: u64,
) -> std::io::Result<Vec<FlowKey>> {
    let mut out = Vec::new();
    for row in tcp_rows()? {
        if row.state == TCP_LISTEN {
            continue;
        }
        let (Some((la, lp)), Some((ra, rp))) = (proc_addr(&row.local), proc_addr(&row.remote))
        else {
            continue;
        };
        if !wanted(lp) {
            continue;
        }
        let (family, la, ra) = match (la, ra) {
            (Some(l4), Some(r4)) => (tproxy_common::AF_INET, [l4, 0, 0, 0], [r4, 0, 0, 0]),
            _ => {
                let (Some(l), Some(r)) = (proc_addr6(&row.local), proc_addr6(&row.remote)) else {
                    continue;
                };
                (tproxy_common::AF_INET6, l, r)
            }
        };
        out.push(FlowKey {
            client_addr: ra,
            local_addr: la,
            client_port: rp.to_be(),
            local_port: lp.to_be(),
            family,
            _pad0: [0; 3],
            netns_cookie: cookie,
        });
    }
    Ok(out)
}

/// TCP_LISTEN as /proc/net/tcp prints the state.
const TCP_LISTEN: u8 = 0x0a;

/// One socket of /proc/net/tcp or tcp6.
struct TcpRow {
    v6: bool,
    local: String,
    remote: String,
    state: u8,
    inode: u64,
}

/// Every TCP socket of the calling thread's network namespace (thread-self:
/// the agent enters a pod's namespace on one thread).
fn tcp_rows() -> std::io::Result<Vec<TcpRow>> {
    let mut out = Vec::new();
    for (file, v6) in [("tcp", false), ("tcp6", true)] {
        let text = match std::fs::read_to_string(format!("/proc/thread-self/net/{file}")) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && v6 => continue,
            Err(e) => return Err(e),
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(remote), Some(st), Some(inode)) =
                (f.get(1), f.get(2), f.get(3), f.get(9))
            else {
                continue;
            };
            let (Ok(state), Ok(inode)) = (u8::from_str_radix(st, 16), inode.parse()) else {
                continue;
            };
            out.push(TcpRow {
                v6,
                local: (*local).to_string(),
                remote: (*remote).to_string(),
                state,
                inode,
            });
        }
    }
    Ok(out)
}

/// `/proc/net/tcp{,6}`'s `ADDR:PORT`: the IPv4 address as the kernel's
/// own word (network-order bytes, printed as a native u32), or None for an
/// IPv6 one that is not v4-mapped; the port.
fn proc_addr(s: &str) -> Option<(Option<u32>, u16)> {
    let (a, p) = s.split_once(':')?;
    let port = u16::from_str_radix(p, 16).ok()?;
    match a.len() {
        8 => Some((Some(u32::from_str_radix(a, 16).ok()?), port)),
        32 => {
            let w = proc_addr6(s)?;
            // ::ffff:a.b.c.d arrives as IPv4 on the wire.
            let mapped = w[0] == 0 && w[1] == 0 && w[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]);
            Some((mapped.then_some(w[3]), port))
        }
        _ => None,
    }
}

fn proc_addr6(s: &str) -> Option<[u32; 4]> {
    let (a, _) = s.split_once(':')?;
    if a.len() != 32 {
        return None;
    }
    let mut w = [0u32; 4];
    for (i, word) in w.iter_mut().enumerate() {
        *word = u32::from_str_radix(&a[8 * i..8 * i + 8], 16).ok()?;
    }
    Some(w)
}

/// The addresses of `iface` in the calling thread's namespace that name
/// this pod and no other: not loopback, link-local, multicast or unspecified
/// (every pod has fe80::…).
pub fn interface_addrs(iface: &str) -> std::io::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)? {
        if ifa.interface_name != iface {
            continue;
        }
        let Some(a) = ifa.address else { continue };
        let ip = if let Some(v4) = a.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = a.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        let special = match ip {
            IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local() || v4.is_multicast(),
            IpAddr::V6(v6) => v6.is_loopback() || v6.is_unicast_link_local() || v6.is_multicast(),
        };
        if !special && !ip.is_unspecified() && !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}

/// What an in-place update (`update_in_place`) added to a target, for its
/// owner to remove when the target goes.
#[derive(Debug, Default)]
pub struct Updated {
    pub prior: Vec<FlowKey>,
    pub addrs: Vec<TargetAddr>,
}

/// Handles on the maps a target's entries are in (for `update_in_place`).
pub struct EntryMaps {
    pub targets: Map,
    pub prior_flows: Map,
    pub target_addrs: Map,
}

/// Rewrites the `TARGETS` entry of the target `cookie` for the ports,
/// acceleration settings, proxy port and marks of `opts` (`old`: the ports
/// it intercepted until now; `steer_mark`: the rewrite back-end's new one),
/// leaving everything else as it is: its slot, back-end, `STEER_NEW`, and
/// its attachments, which stay attached (the programs are the object's,
/// shared by every target, and read the entry per packet). So no packet
/// meets a moment without steering.
///
/// Run in the target's namespace: connections already open to ports it
/// starts to intercept are listed in `PRIOR_FLOWS` before the entry
/// changes (so they keep passing to the app) and again after (handshakes
/// that were finishing in between). With `claim_addrs` (acceleration
/// turned on) the interface's addresses are claimed for same-node pairing.
pub fn update_in_place(
    maps: EntryMaps,
    cookie: u64,
    opts: &Options,
    old: &PortSet,
    steer_mark: Option<u32>,
    claim_addrs: bool,
) -> Result<Updated> {
    let EntryMaps {
        mut targets,
        prior_flows: prior,
        target_addrs: addrs,
    } = maps;
    let current = loader::read_target(&targets, cookie)?;
    let mut config = current.config;
    config.proxy_port = opts.proxy_port;
    config.proxy_mark = opts.proxy_mark;
    if let Some(mark) = steer_mark {
        config.steer_mark = mark;
    }
    config.flags = (config.flags & !flags::ACCEL) | if opts.accel { flags::ACCEL } else { 0 };
    config.accel_max_queued = opts.accel_max_queued;
    config.accel_retire_ms = opts.accel_retire_ms;
    config.accel_min_message = opts.accel_min_message;
    config.flows_quota = opts.flows_quota;
    config.socks_quota = opts.socks_quota;
    let added = |p: u16| opts.ports.contains(p) && !old.contains(p);
    let mut listed = PriorFlows::new(prior);
    listed.list_where(added, cookie);
    loader::write_target(&mut targets, cookie, &target_entry(config, opts))?;
    listed.list_where(added, cookie);
    let addrs = if claim_addrs {
        TargetAddrs::register(addrs, &opts.iface, cookie).into_addrs()
    } else {
        Vec::new()
    };
    Ok(Updated {
        prior: listed.into_keys(),
        addrs,
    })
}

/// The settings `opts` give a target in `TARGETS`.
pub fn target_value(opts: &Options, env: &TargetEnv, slot: u32, proxy: (u64, u32)) -> Target {
    let config = Config {
        proxy_port: opts.proxy_port,
        steer_mode: opts.steer.mode() as u8,
        l2_len: env.l2_len,
        proxy_mark: opts.proxy_mark,
        steer_mark: env.steer_mark,
        flags: flags::STEER_NEW | if opts.accel { flags::ACCEL } else { 0 },
        accel_max_queued: opts.accel_max_queued,
        accel_retire_ms: opts.accel_retire_ms,
        slot,
        proxy_cgroup_level: proxy.1,
        netns_cookie: env.netns_cookie,
        proxy_cgroup_id: proxy.0,
        flows_quota: opts.flows_quota,
        socks_quota: opts.socks_quota,
        accel_min_message: opts.accel_min_message,
        _pad0: 0,
    };
    target_entry(config, opts)
}

/// A `TARGETS` entry: `config`, with the ports and accelerated ports of
/// `opts`.
fn target_entry(config: Config, opts: &Options) -> Target {
    let mut t = Target::new(config, opts.ports.iter());
    if let Some(only) = &opts.accel_ports {
        t.accelerate_only(only.iter());
    }
    t
}

impl TargetAttachment {
    /// Attaches `loaded`'s programs for one target, from the inside out,
    /// steering last: by the time a flow is steered, everything that
    /// serves it is in place. `before_steering` runs once every program
    /// is known and before the interface or routing is touched (the
    /// single run writes its record there). All or nothing: on an error,
    /// what was attached is dropped (detached) before it returns.
    pub fn attach(
        loaded: &mut Loaded,
        opts: &Options,
        env: TargetEnv,
        slot: u32,
        before_steering: impl FnOnce(Planned<'_>) -> Result<()>,
    ) -> Result<TargetAttachment> {
        Self::attach_inner(loaded, opts, env, slot, before_steering, false)
    }

    /// `attach` over the `TARGETS` entry a replaced target of the same
    /// namespace kept (`keep_entry`; its `STEER_NEW` clear, so a steering
    /// guard on the interface refuses new connections meanwhile): the entry
    /// is overwritten with `STEER_NEW` still clear, and set once everything
    /// of the new target is attached.
    pub fn attach_replacing(
        loaded: &mut Loaded,
        opts: &Options,
        env: TargetEnv,
        slot: u32,
        before_steering: impl FnOnce(Planned<'_>) -> Result<()>,
    ) -> Result<TargetAttachment> {
        Self::attach_inner(loaded, opts, env, slot, before_steering, true)
    }

    fn attach_inner(
        loaded: &mut Loaded,
        opts: &Options,
        env: TargetEnv,
        slot: u32,
        before_steering: impl FnOnce(Planned<'_>) -> Result<()>,
        replacing: bool,
    ) -> Result<TargetAttachment> {
        if opts.accel && !loaded.accel() {
            return Err(Error::AccelNotLoaded);
        }
        let mut map = loaded.targets_map()?;
        if !replacing && loader::read_target(&map, env.netns_cookie).is_ok() {
            return Err(Error::TargetExists {
                netns: format!("cookie {:#x}", env.netns_cookie),
            });
        }
        let (proxy, proxy_dir) = proxy_identity(opts, &env)?;
        let listeners = PriorListeners::find(
            loaded.prior_listeners_map()?,
            opts.proxy_port,
            env.netns_cookie,
            &proxy_dir,
        );
        // The slot's count of FLOWS entries starts at 0 (a previous owner's
        // sweep zeroed it too; a crash in between may not have).
        let mut sweep_maps = loaded.sweep_maps()?;
        sweep_maps.zero_in_use(slot)?;
        let mut value = target_value(opts, &env, slot, proxy);
        if replacing {
            value.config.flags &= !flags::STEER_NEW;
        }
        loader::write_target(&mut map, env.netns_cookie, &value)?;
        // Dropped after `entry`, whatever fails from here on.
        let sweep = TargetSweep {
            maps: sweep_maps,
            cookie: env.netns_cookie,
            slot,
        };
        let entry = TargetEntry {
            map,
            cookie: env.netns_cookie,
            keep: false,
        };
        let addrs = if opts.accel {
            TargetAddrs::register(loaded.target_addrs_map()?, &opts.iface, env.netns_cookie)
        } else {
            TargetAddrs {
                map: loaded.target_addrs_map()?,
                cookie: env.netns_cookie,
                addrs: Vec::new(),
            }
        };
        let mut prior = PriorFlows::new(loaded.prior_flows_map()?);
        prior.list(&opts.ports, env.netns_cookie);
        let cgroup = env.cgroup.display().to_string();
        let mut attachments = Vec::new();
        // Every target of an accelerating object gets the pairing sockops
        // program (one without acceleration has its ACCEL flag clear, so it
        // pairs nothing); a `--no-accel` run loads the flows-only one.
        let sockops_name = sockops_name(loaded.accel());
        let loaded_accel = loaded.accel();
        let ebpf = loaded.ebpf_mut();

        // Cgroup attachments are bpf_links, which the kernel always stacks
        // (multi mode): `Single` only means "no BPF_F_ALLOW_* flags", which
        // link_create requires. Other programs on the cgroup are untouched.
        //
        // sockops tells the flow table when the proxy's socket is
        // established and when it closes, so it is attached in every mode;
        // with acceleration the same program pairs the sockets.
        let prog: &mut SockOps = program(ebpf, sockops_name)?;
        let what = format!("sockops {sockops_name} to {cgroup}");
        attachments.push(attached(
            &what,
            AttachKind::Cgroup,
            sockops_name,
            prog.info(),
        )?);
        let id = prog
            .attach(&env.cgroup_dir, CgroupAttachMode::Single)
            .map_err(|source| Error::Attach {
                what: format!("sockops to cgroup {cgroup}"),
                source,
            })?;
        let sockops = Some(SockopsAttachment::new(
            what,
            prog.take_link(id).expect("fresh link"),
        ));

        // A cgroup sockopt program on the cgroup, its record entry pushed.
        let mut sockopt = |name: &'static str, hook: &str| -> Result<GetsockoptAttachment> {
            let prog: &mut CgroupSockopt = program(ebpf, name)?;
            let what = format!("cgroup/{hook} {name} to {cgroup}");
            attachments.push(attached(&what, AttachKind::Cgroup, name, prog.info())?);
            let id = prog
                .attach(&env.cgroup_dir, CgroupAttachMode::Single)
                .map_err(|source| Error::Attach {
                    what: format!("cgroup/{hook} to {cgroup}"),
                    source,
                })?;
            Ok(GetsockoptAttachment::new(
                what,
                prog.take_link(id).expect("fresh link"),
            ))
        };
        let getsockopt = Some(sockopt(names::PROG_GETSOCKOPT, "getsockopt")?);
        // With acceleration: the options the fast path cannot honour.
        let setsockopt = if loaded_accel {
            Some(sockopt(names::PROG_SETSOCKOPT, "setsockopt")?)
        } else {
            None
        };
        let mut getsockname = Vec::new();
        for (name, hook) in [
            (names::PROG_GETSOCKNAME4, "getsockname4"),
            (names::PROG_GETSOCKNAME6, "getsockname6"),
        ] {
            let prog: &mut CgroupSockAddr = program(ebpf, name)?;
            let what = format!("cgroup/{hook} {name} to {cgroup}");
            attachments.push(attached(&what, AttachKind::Cgroup, name, prog.info())?);
            let id = prog
                .attach(&env.cgroup_dir, CgroupAttachMode::Single)
                .map_err(|source| Error::Attach {
                    what: format!("cgroup/{hook} to {cgroup}"),
                    source,
                })?;
            getsockname.push(GetsocknameAttachment::new(
                what,
                prog.take_link(id).expect("fresh link"),
            ));
        }

        let tc_mode = env.tc_mode;
        let clsact = match tc_mode {
            TcMode::Netlink => Some(ClsactQdisc::ensure(&opts.iface, env.ifindex)?),
            _ => None,
        };
        for (name, hook) in [
            (names::PROG_RESTORE, TcAttachType::Egress),
            (names::PROG_STEER, TcAttachType::Ingress),
        ] {
            let prog: &mut SchedClassifier = program(ebpf, name)?;
            let kind = if hook == TcAttachType::Ingress {
                AttachKind::TcIngress
            } else {
                AttachKind::TcEgress
            };
            let what = tc_what(name, &opts.iface, hook, tc_mode);
            attachments.push(attached(&what, kind, name, prog.info())?);
        }
        before_steering(Planned {
            attachments: &attachments,
            tc_mode,
            created_clsact: clsact.as_ref().is_some_and(ClsactQdisc::created),
        })?;
        let routing = env.tproxy.map(TproxyRouting::install).transpose()?;
        let restore = Some(attach_tc(
            ebpf,
            names::PROG_RESTORE,
            &opts.iface,
            TcAttachType::Egress,
            tc_mode,
        )?);
        let steer = Some(attach_tc(
            ebpf,
            names::PROG_STEER,
            &opts.iface,
            TcAttachType::Ingress,
            tc_mode,
        )?);
        prior.list(&opts.ports, env.netns_cookie);
        fill_link_ids(&mut attachments, Some(tc_mode));
        let mut att = TargetAttachment {
            steer,
            restore,
            routing,
            getsockopt,
            setsockopt,
            getsockname,
            sockops,
            clsact,
            addrs,
            prior,
            listeners,
            entry,
            sweep,
            attachments,
            iface: opts.iface.clone(),
        };
        if replacing {
            att.set_flag(flags::STEER_NEW, true)?;
        }
        Ok(att)
    }

    /// Takes over the clsact qdisc its netlink filters are on as tproxy's
    /// (a replaced target or its guard added it): removed, when unused, on
    /// drop.
    pub fn own_clsact(&mut self) {
        if let Some(c) = &mut self.clsact {
            c.set_created(true);
        }
    }

    /// Leaves the `TARGETS` entry in place when this target is dropped:
    /// the target replacing it overwrites it (`attach_replacing`).
    pub fn keep_entry(&mut self) {
        self.entry.keep = true;
    }

    /// Record entries: program ids and link ids of what is attached.
    pub fn attachments(&self) -> &[Attached] {
        &self.attachments
    }

    pub fn netns_cookie(&self) -> u64 {
        self.entry.cookie
    }

    /// The addresses this target claimed in `TARGET_ADDRS`.
    pub fn addrs(&self) -> Vec<IpAddr> {
        self.addrs.addrs.iter().map(|a| a.to_ip()).collect()
    }

    pub fn iface(&self) -> &str {
        &self.iface
    }

    /// What is attached, one line each.
    pub fn hooks(&self) -> Vec<String> {
        let mut out: Vec<String> = [&self.steer, &self.restore]
            .into_iter()
            .flatten()
            .map(|a| a.what().to_string())
            .collect();
        out.extend(self.getsockopt.iter().map(|a| a.what().to_string()));
        out.extend(self.setsockopt.iter().map(|a| a.what().to_string()));
        out.extend(self.getsockname.iter().map(|a| a.what().to_string()));
        out.extend(self.sockops.iter().map(|a| a.what().to_string()));
        out
    }

    /// Takes over what an in-place update added (removed on drop).
    pub fn keep_updated(&mut self, updated: Updated) {
        for key in updated.prior {
            if !self.prior.keys.contains(&key) {
                self.prior.keys.push(key);
            }
        }
        self.addrs.addrs.extend(updated.addrs);
    }

    /// Sets or clears a `flags::*` bit of this target.
    pub fn set_flag(&mut self, flag: u32, on: bool) -> Result<()> {
        loader::set_flag(&mut self.entry.map, self.entry.cookie, flag, on)
    }

    /// Counts down the proxy's listeners older than the target that have
    /// closed (call in the target's namespace, now and then).
    pub fn recount_listeners(&mut self) -> usize {
        self.listeners.recount()
    }

    /// Whether any proxy listener older than the target is still counted.
    pub fn has_prior_listeners(&self) -> bool {
        !self.listeners.counted.is_empty()
    }

    /// The counter slot this target was given.
    pub fn slot(&self) -> Result<u32> {
        Ok(loader::read_target(&self.entry.map, self.entry.cookie)?
            .config
            .slot)
    }
}

/// One more attachment of the steering program on an interface, for a
/// target being replaced there: between the old target's detach and the
/// new one's attach it steers by the entry the old one kept (`STEER_NEW`
/// clear: new connections refused), so no moment leaves the interface
/// without steering. A netlink filter (TCX refuses a program attached
/// twice to one hook, and either target may use TCX), on a clsact qdisc
/// that is tproxy's if the guard or the old target added it. Fields drop
/// in order: the filter, then the qdisc if it is ours and unused. Drop it
/// in the interface's namespace.
pub struct SteerGuard {
    _filter: TcAttachment,
    clsact: ClsactQdisc,
}

impl SteerGuard {
    /// Attaches the guard on `iface` (the calling thread's namespace);
    /// `old_clsact`: the replaced target added the clsact qdisc.
    pub fn attach(
        loaded: &mut Loaded,
        iface: &str,
        ifindex: u32,
        old_clsact: bool,
    ) -> Result<SteerGuard> {
        let mut clsact = ClsactQdisc::ensure(iface, ifindex)?;
        if old_clsact {
            clsact.set_created(true);
        }
        let filter = attach_tc(
            loaded.ebpf_mut(),
            names::PROG_STEER,
            iface,
            TcAttachType::Ingress,
            TcMode::Netlink,
        )?;
        Ok(SteerGuard {
            _filter: filter,
            clsact,
        })
    }

    /// Hands the clsact qdisc over (the new target uses netlink filters on
    /// it): whether it was tproxy's to remove; the guard no longer removes it.
    pub fn hand_over_clsact(&mut self) -> bool {
        let ours = self.clsact.created();
        self.clsact.set_created(false);
        ours
    }
}

fn attach_tc(
    ebpf: &mut aya::Ebpf,
    name: &'static str,
    iface: &str,
    hook: TcAttachType,
    mode: TcMode,
) -> Result<TcAttachment> {
    let prog: &mut SchedClassifier = program(ebpf, name)?;
    let options = match mode {
        TcMode::Netlink => TcAttachOptions::Netlink(NlOptions::default()),
        _ => TcAttachOptions::TcxOrder(LinkOrder::default()),
    };
    let hook_s = hook_name(hook);
    let id = prog
        .attach_with_options(iface, hook, options)
        .map_err(|source| Error::Attach {
            what: format!("tc {hook_s} ({mode:?}) on {iface}"),
            source,
        })?;
    Ok(Attachment::new(
        tc_what(name, iface, hook, mode),
        prog.take_link(id).expect("fresh link"),
    ))
}

fn hook_name(hook: TcAttachType) -> &'static str {
    if hook == TcAttachType::Ingress {
        "ingress"
    } else {
        "egress"
    }
}

fn tc_what(name: &str, iface: &str, hook: TcAttachType, mode: TcMode) -> String {
    format!("tc {} {name} on {iface} ({mode:?})", hook_name(hook))
}

/// Sets each attachment's link id, just after attaching: the kernel's
/// link running its program on this target. A program of a shared object
/// runs in many links (one per target); link ids grow, so the newest link
/// of the program is the one just made. sk_msg and netlink filters are no
/// links (`tc_mode` Netlink): they get none, never another target's TCX link.
pub(crate) fn fill_link_ids(attachments: &mut [Attached], tc_mode: Option<TcMode>) {
    let links: Vec<(u32, u32)> = aya::programs::loaded_links()
        .flatten()
        .map(|l| (l.program_id(), l.id()))
        .collect();
    for a in attachments {
        let tc = matches!(a.kind, AttachKind::TcIngress | AttachKind::TcEgress);
        if a.kind == AttachKind::SkMsg || (tc && tc_mode == Some(TcMode::Netlink)) {
            a.link_id = None;
            continue;
        }
        a.link_id = links
            .iter()
            .filter(|(prog, _)| *prog == a.prog_id)
            .map(|(_, link)| *link)
            .max();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// /proc/net/tcp prints an address as the kernel's word in hex (network
    /// byte order in memory): the same word steering reads from a packet.
    #[test]
    fn proc_net_tcp_addresses_are_the_kernels_words() {
        let (a, p) = proc_addr("0AB2A8C0:1F40").unwrap();
        assert_eq!(p, 8000);
        assert_eq!(
            a.unwrap().to_ne_bytes(),
            [0xc0, 0xa8, 0xb2, 0x0a],
            "192.168.178.10"
        );
        // ::ffff:192.168.178.10 folds to IPv4, as it arrives on the wire.
        let (a, _) = proc_addr("0000000000000000FFFF00000AB2A8C0:1F40").unwrap();
        assert_eq!(a.unwrap().to_ne_bytes(), [0xc0, 0xa8, 0xb2, 0x0a]);
        // fd00:178::10: no IPv4 word; the IPv6 words as in memory.
        let s = "780100FD000000000000000010000000:1F40";
        let (a, _) = proc_addr(s).unwrap();
        assert_eq!(a, None);
        let w = proc_addr6(s).unwrap();
        let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_ne_bytes()).collect();
        let ip: std::net::Ipv6Addr = "fd00:178::10".parse().unwrap();
        assert_eq!(bytes, ip.octets());
    }
}
