//! The agent's targets by id, each with a counter slot, attached through
//! one loaded object. Attach and detach block (netlink, namespaces): the
//! caller runs them off the async runtime, one at a time (a Mutex).
use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    path::PathBuf,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, MapData, PerCpuArray, PerCpuValues};
use tproxy_common::{Counter, FLOW_ACTIVE_NS, FlowKey, FlowValue, SockState, flags, names};
use tracing::{debug, info, warn};

use crate::{
    Options, Steer,
    agent::error::{Error, Result},
    api::{TargetSpec, TargetStatus},
    config::{self, Role, Target, options::TcMode},
    sys::{
        error::Chain,
        netns::{self, Located},
        pins, system,
    },
    target,
    target::{
        agent_state::TargetRecord,
        attachment::{SteerGuard, TargetAttachment},
        drain,
        inspect::{accelerated, monotonic_coarse_ns, queued_redirected},
        installed::{AttachKind, Installed, netns_alive},
        loader::{self, Loaded},
        probe::Probed,
    },
};

enum Owner {
    /// Attached by this agent: the owner detaches on drop.
    Fresh(Box<TargetAttachment>),
    /// Attached by a previous agent, kept through its pins; removed step
    /// by step from its record.
    Adopted,
}

struct Entry {
    rec: TargetRecord,
    owner: Owner,
}

/// Targets, the object and the pins.
pub struct Registry {
    loaded: Loaded,
    bpffs: PathBuf,
    max_targets: u32,
    /// A target's quotas when its spec names none.
    quotas: Quotas,
    targets: BTreeMap<String, Entry>,
}

/// A target's share of the node's tables when its spec names none (0: no
/// quota): FLOWS entries, and accelerated sockets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Quotas {
    pub flows: u32,
    pub socks: u32,
}

/// An agent API error: the code and the one line.
#[derive(Debug)]
pub struct ApiFailure {
    pub code: u32,
    pub error: String,
}

impl From<Error> for ApiFailure {
    fn from(e: Error) -> Self {
        ApiFailure {
            code: e.api_code(),
            error: Chain(&e).to_string(),
        }
    }
}

/// The options a target attaches with: its keys, else the run flags'
/// defaults and the agent's quotas ([`Target::resolve`]).
///
/// [`Target::resolve`]: crate::config::Target::resolve
pub fn options_of(spec: &TargetSpec, quotas: Quotas) -> Result<Options> {
    Ok(spec.target.resolve(Role::Agent {
        flows_quota: spec.flows_quota.unwrap_or(quotas.flows),
        socks_quota: spec.socks_quota.unwrap_or(quotas.socks),
    })?)
}

/// How a target attached as `old` becomes `new`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Its `TARGETS` entry rewritten, its attachments kept: only the
    /// ports, the acceleration settings or the label change.
    InPlace,
    /// The same, after its steered flows drained: the rewrite back-end's
    /// proxy port or marks change, and its flows are keyed with the proxy
    /// port and restored by it (new connections are still steered, the
    /// old way, during the drain).
    InPlaceAfterDrain,
    /// Where or how it is attached changes (namespace, interface, cgroup,
    /// tc mode, back-end, the tproxy back-end's routing: its table, mark
    /// and proxy port): drained, detached and attached again.
    Replace,
}

pub fn change(old: &TargetSpec, new: &TargetSpec) -> Change {
    let config = |s: &TargetSpec| TargetSpec {
        target: Target {
            ports: None,
            accel: None,
            accel_ports: None,
            accel_max_queued: None,
            accel_retire_ms: None,
            accel_min_message: None,
            ..s.target.clone()
        },
        name: None,
        ..s.clone()
    };
    if config(old) == config(new) {
        return Change::InPlace;
    }
    let rewrite = |s: &TargetSpec| s.target.steer.unwrap_or(Steer::Rewrite) == Steer::Rewrite;
    let placement = |s: &TargetSpec| {
        let c = config(s);
        TargetSpec {
            target: Target {
                proxy_port: None,
                proxy_mark: None,
                steer_mark: None,
                ..c.target
            },
            ..c
        }
    };
    if rewrite(old) && rewrite(new) && placement(old) == placement(new) {
        Change::InPlaceAfterDrain
    } else {
        Change::Replace
    }
}

/// Runs `f` in a fresh, empty network namespace: for dropping an owner
/// whose namespace is gone, so its netlink and routing removals (which
/// would otherwise run here, in the agent's namespace, against whatever
/// has the same index) find nothing.
fn in_empty_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(move || {
            if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
                // Never run the removals in the agent's own namespace.
                panic!("unshare(CLONE_NEWNET) for a gone target failed: {e}");
            }
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

impl Registry {
    pub fn new(loaded: Loaded, bpffs: PathBuf, max_targets: u32, quotas: Quotas) -> Registry {
        Registry {
            loaded,
            bpffs,
            max_targets,
            quotas,
            targets: BTreeMap::new(),
        }
    }

    /// New descriptors of the object's maps (the metrics endpoint's).
    pub fn maps(&self) -> Result<crate::target::inspect::Maps> {
        Ok(crate::target::inspect::Maps::dup(self.loaded.ebpf())?)
    }

    pub fn records(&self) -> Vec<TargetRecord> {
        self.targets.values().map(|e| e.rec.clone()).collect()
    }

    pub fn ids(&self) -> Vec<String> {
        self.targets.keys().cloned().collect()
    }

    pub fn spec_of(&self, id: &str) -> Option<&TargetSpec> {
        self.targets.get(id).map(|e| &e.rec.spec)
    }

    pub fn is_draining(&self, id: &str) -> bool {
        self.targets.get(id).is_some_and(|e| e.rec.draining)
    }

    pub fn len(&self) -> usize {
        self.targets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    fn free_slot(&self) -> Option<u32> {
        let used: Vec<u32> = self.targets.values().map(|e| e.rec.slot).collect();
        (1..=self.max_targets).find(|s| !used.contains(s))
    }

    /// Attaches `spec` as `id`. The caller has made sure `id` is free.
    pub fn attach(&mut self, id: &str, spec: &TargetSpec) -> Result<()> {
        self.attach_with(id, spec, false)
    }

    /// `attach`; `replacing`: over the `TARGETS` entry a replaced target
    /// of the same namespace kept (`TargetAttachment::attach_replacing`).
    fn attach_with(&mut self, id: &str, spec: &TargetSpec, replacing: bool) -> Result<()> {
        let started = Instant::now();
        let opts = options_of(spec, self.quotas)?;
        // First, before anything is attached: never the root, never outside.
        let system::CgroupDir {
            path: cgroup,
            dir: cgroup_dir,
            ..
        } = system::open_agent_cgroup(opts.cgroup.as_deref().expect("checked"))?;
        if !spec.netns.exists() {
            return Err(config::Error::InvalidTarget(format!(
                "network namespace {} does not exist: give the pod's namespace path",
                spec.netns.display()
            ))
            .into());
        }
        let (probed, plan) = netns::run_in(&spec.netns, || -> Result<_> {
            let probed = Probed::here(&opts.iface, opts.tc_mode)?;
            let plan = crate::target::probe::plan_steering(&opts, probed.ifindex)?;
            Ok((probed, plan))
        })??;
        if let Some((other, _)) = self
            .targets
            .iter()
            .find(|(_, e)| e.rec.installed.netns_cookie == probed.netns_cookie)
        {
            return Err(target::Error::TargetExists {
                netns: format!("{} (target {other})", spec.netns.display()),
            }
            .into());
        }
        let slot = self.free_slot().ok_or_else(|| {
            config::Error::InvalidTarget(format!(
                "the agent already has its {} targets (max_targets): remove one, or restart the agent with a larger --max-targets",
                self.max_targets
            ))
        })?;
        self.zero_counters(slot)?;
        let mut installed = Installed::new(&probed, plan.0.clone());
        let env = probed.env(cgroup, cgroup_dir, plan);
        let loaded = &mut self.loaded;
        let att = netns::run_in(&spec.netns, || {
            let note = |planned: crate::target::installed::Planned<'_>| {
                installed.plan(&planned);
                Ok(())
            };
            if replacing {
                TargetAttachment::attach_replacing(loaded, &opts, env, slot, note)
            } else {
                TargetAttachment::attach(loaded, &opts, env, slot, note)
            }
        })??;
        let dir = pins::target_dir(&self.bpffs, slot);
        let mut links = Vec::new();
        let pinned = (|| -> Result<()> {
            // A slot's pins from an earlier owner (a crash between unpin and
            // state write) would make our pins fail: they are stale.
            pins::remove_tree(&dir);
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
            for a in att.attachments() {
                // Netlink filters are no links (fill_link_ids leaves
                // them none): only cgroup and TCX links are pinned.
                let is_link = match a.kind {
                    AttachKind::Cgroup => true,
                    AttachKind::TcIngress | AttachKind::TcEgress => {
                        probed.tc_mode != TcMode::Netlink
                    }
                    _ => false,
                };
                if let Some(link) = a.link_id.filter(|_| is_link) {
                    pins::pin_link_id(link, &dir.join(&a.program))?;
                    links.push(a.program.clone());
                }
            }
            Ok(())
        })();
        if let Err(e) = pinned {
            pins::remove_tree(&dir);
            let _ = netns::run_in(&spec.netns, move || drop(att));
            return Err(e);
        }
        let rec = TargetRecord {
            id: id.to_string(),
            spec: spec.clone(),
            installed,
            slot,
            links,
            draining: false,
        };
        info!(
            id,
            name = spec.name.as_deref().unwrap_or(""),
            netns = %spec.netns.display(),
            iface = spec.iface(),
            ports = %opts.ports,
            slot,
            tc = ?probed.tc_mode,
            ms = started.elapsed().as_millis() as u64,
            "target attached"
        );
        self.targets.insert(
            id.to_string(),
            Entry {
                rec,
                owner: Owner::Fresh(Box::new(att)),
            },
        );
        Ok(())
    }

    /// The quotas a target gets when its spec names none.
    pub fn quotas(&self) -> Quotas {
        self.quotas
    }

    /// Changes target `id` to `spec` in place (`change` said it can be):
    /// its `TARGETS` entry is rewritten in one step, in its namespace
    /// (`target::update_in_place`); its attachments stay, so no connection
    /// meets a moment without steering. Flows the change would cut are the
    /// caller's to drain first.
    pub fn update(&mut self, id: &str, spec: &TargetSpec) -> Result<()> {
        let opts = options_of(spec, self.quotas)?;
        let Some(e) = self.targets.get(id) else {
            return Err(config::Error::InvalidTarget(format!("target {id} is gone")).into());
        };
        let old = options_of(&e.rec.spec, self.quotas)?;
        let (cookie, netns) = (e.rec.installed.netns_cookie, e.rec.spec.netns.clone());
        // The rewrite back-end's steer mark (the tproxy back-end's is its
        // routing's, which an in-place change keeps).
        let steer_mark = (opts.steer == Steer::Rewrite).then(|| {
            opts.steer_mark.unwrap_or_else(|| {
                crate::config::options::default_steer_mark(e.rec.installed.ifindex)
            })
        });
        if steer_mark == Some(opts.proxy_mark) {
            return Err(crate::config::Error::MarksCollide {
                mark: opts.proxy_mark,
                via: crate::config::Via::Keys,
            }
            .into());
        }
        let maps = crate::target::attachment::EntryMaps {
            targets: self.loaded.targets_map()?,
            prior_flows: self.loaded.prior_flows_map()?,
            target_addrs: self.loaded.target_addrs_map()?,
        };
        let claim = opts.accel && !old.accel;
        let updated = netns::run_in(&netns, || {
            crate::target::attachment::update_in_place(
                maps, cookie, &opts, &old.ports, steer_mark, claim,
            )
        })??;
        let e = self.targets.get_mut(id).expect("looked up above");
        match &mut e.owner {
            Owner::Fresh(att) => att.keep_updated(updated),
            // An adopted target's entries go by its cookie on removal.
            Owner::Adopted => {}
        }
        e.rec.spec = spec.clone();
        info!(
            id,
            ports = %opts.ports,
            accel = opts.accel,
            slot = e.rec.slot,
            "target updated in place"
        );
        Ok(())
    }

    /// A steering guard on the interface of target `id`, in its namespace
    /// (`target::SteerGuard`).
    fn guard(&mut self, id: &str) -> Result<Option<SteerGuard>> {
        let Some(e) = self.targets.get(id) else {
            return Ok(None);
        };
        let rec = &e.rec;
        let (netns, iface, ifindex) = (
            rec.spec.netns.clone(),
            rec.installed.iface.clone(),
            rec.installed.ifindex,
        );
        let old_clsact =
            rec.installed.tc_mode == Some(TcMode::Netlink) && rec.installed.created_clsact;
        let loaded = &mut self.loaded;
        let g = netns::run_in(&netns, || {
            SteerGuard::attach(loaded, &iface, ifindex, old_clsact)
        })??;
        debug!("target {id}: steering guard on {iface} for its replacement");
        Ok(Some(g))
    }

    /// The new target of a replacement takes over the clsact qdisc its
    /// guard held (`SteerGuard::hand_over_clsact`), if it uses netlink.
    fn take_clsact(&mut self, id: &str, guard: &mut SteerGuard) {
        let Some(e) = self.targets.get_mut(id) else {
            return;
        };
        if e.rec.installed.tc_mode != Some(TcMode::Netlink) || !guard.hand_over_clsact() {
            return;
        }
        e.rec.installed.created_clsact = true;
        if let Owner::Fresh(att) = &mut e.owner {
            att.own_clsact();
        }
    }

    /// Takes over a target a previous agent attached: its pinned links now
    /// run this agent's programs (swapped in one step each), its maps are
    /// the same pinned ones. A target whose namespace is gone is removed.
    pub fn adopt(&mut self, rec: TargetRecord) {
        let dir = pins::target_dir(&self.bpffs, rec.slot);
        if rec.located() == Located::Gone {
            info!(
                id = rec.id,
                "target's network namespace is gone (pod deleted while no agent ran): removing what is left of it"
            );
            pins::remove_tree(&dir);
            if let Err(e) = self.remove_targets_entry(rec.installed.netns_cookie, false) {
                debug!("TARGETS entry of {}: {}", rec.id, Chain(&e));
            }
            self.sweep(&rec);
            return;
        }
        for prog in &rec.links {
            let pin = dir.join(prog);
            let Some(name) = program_name(prog) else {
                continue;
            };
            let fd = match self.loaded.ebpf().program(name).map(|p| p.fd()) {
                Some(Ok(fd)) => std::os::fd::AsFd::as_fd(fd).try_clone_to_owned(),
                _ => continue,
            };
            let Ok(fd) = fd else { continue };
            match pins::update_link(&pin, std::os::fd::AsFd::as_fd(&fd)) {
                Ok(()) => debug!(
                    "target {}: link {} now runs this agent's {name}",
                    rec.id,
                    pin.display()
                ),
                Err(e) => warn!(
                    "target {}: link {} keeps the previous agent's program ({e}); it shares the maps, nothing is lost",
                    rec.id,
                    pin.display()
                ),
            }
        }
        info!(
            id = rec.id,
            slot = rec.slot,
            "target adopted from the previous agent"
        );
        self.targets.insert(
            rec.id.clone(),
            Entry {
                rec,
                owner: Owner::Adopted,
            },
        );
    }

    /// Steering of new flows off (first step of a removal).
    pub fn start_draining(&mut self, id: &str) -> Result<Option<(u64, u32)>> {
        let Some(e) = self.targets.get_mut(id) else {
            return Ok(None);
        };
        e.rec.draining = true;
        let (cookie, slot) = (e.rec.installed.netns_cookie, e.rec.slot);
        self.set_flag(cookie, flags::STEER_NEW, false)?;
        Ok(Some((cookie, slot)))
    }

    /// Sets or clears a `flags::*` bit of the target `cookie`.
    pub fn set_flag(&mut self, cookie: u64, flag: u32, on: bool) -> Result<()> {
        Ok(loader::set_flag(
            &mut self.loaded.targets_map()?,
            cookie,
            flag,
            on,
        )?)
    }

    /// An adopted target's `TARGETS` entry (unless `keep_entry`), its
    /// addresses in `TARGET_ADDRS` and its connections in `PRIOR_FLOWS` (a
    /// fresh target's owner removes its own).
    fn remove_targets_entry(&mut self, cookie: u64, keep_entry: bool) -> Result<()> {
        let mut prior = self.loaded.prior_flows_map()?;
        if let Ok(mut m) = HashMap::<&mut MapData, FlowKey, u64>::try_from(&mut prior) {
            let ours: Vec<FlowKey> = m
                .keys()
                .flatten()
                .filter(|k| k.netns_cookie == cookie)
                .collect();
            for k in ours {
                let _ = m.remove(&k);
            }
        }
        let mut addrs = self.loaded.target_addrs_map()?;
        let mut m: HashMap<&mut MapData, tproxy_common::TargetAddr, u64> =
            HashMap::try_from(&mut addrs).map_err(|source| target::Error::Map {
                name: names::TARGET_ADDRS,
                source,
            })?;
        let ours: Vec<_> = m
            .iter()
            .flatten()
            .filter(|&(_, c)| c == cookie)
            .map(|(k, _)| k)
            .collect();
        for k in ours {
            let _ = m.remove(&k);
        }
        if keep_entry {
            return Ok(());
        }
        let mut map = self.loaded.targets_map()?;
        Ok(loader::remove_target(&mut map, cookie)?)
    }

    /// One of the object's hash maps, typed.
    fn hash_map<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &'static str,
    ) -> Result<HashMap<&MapData, K, V>> {
        let map = self.loaded.ebpf().map(name).expect("a map of the object");
        Ok(HashMap::try_from(map).map_err(|source| target::Error::Map { name, source })?)
    }

    /// Active steered flows of the namespace `cookie`, counter slot
    /// `slot`: seen lately by tc, or, for a client in another pod of this
    /// node with both legs socket to socket (no packet crosses tc after
    /// the handshake), read lately on the proxy's accepted socket.
    pub fn active_flows(&self, cookie: u64, slot: u32) -> Result<usize> {
        self.active_flows_to(cookie, slot, |_| true)
    }

    /// `active_flows` of those dialled to a port `dialled` says yes to.
    pub fn active_flows_to(
        &self,
        cookie: u64,
        slot: u32,
        dialled: impl Fn(u16) -> bool,
    ) -> Result<usize> {
        let now = monotonic_coarse_ns();
        // Clients (address, port) of this pod's fast-path sockets that read
        // lately. The proxy's accepted socket's peer is the client's socket;
        // `win_start` moves on its reads (the read hook).
        let socks: HashMap<&MapData, u64, SockState> = self.hash_map(names::SOCKS)?;
        let reading: std::collections::HashSet<([u32; 4], u16)> = socks
            .iter()
            .flatten()
            .filter(|(_, s)| {
                s.slot == slot
                    && s.peer_key.netns_cookie != cookie
                    && now.saturating_sub(s.win_start) < FLOW_ACTIVE_NS
            })
            .map(|(_, s)| (s.peer_key.local_addr, s.peer_key.local_port as u16))
            .collect();
        let m: HashMap<&MapData, FlowKey, FlowValue> = self.hash_map(names::FLOWS)?;
        Ok(m.iter()
            .flatten()
            .filter(|(k, v)| {
                k.netns_cookie == cookie
                    && dialled(u16::from_be(v.orig_port))
                    && (now.saturating_sub(v.last_seen) < FLOW_ACTIVE_NS
                        || reading.contains(&(k.client_addr, u16::from_be(k.client_port))))
            })
            .count())
    }

    /// Open flows of the namespace `cookie`.
    pub fn open_flows(&self, cookie: u64) -> usize {
        let map = self.loaded.ebpf().map(names::FLOWS).expect("FLOWS");
        HashMap::<&MapData, FlowKey, FlowValue>::try_from(map)
            .map(|m| {
                m.keys()
                    .flatten()
                    .filter(|k| k.netns_cookie == cookie)
                    .count()
            })
            .unwrap_or(0)
    }

    /// Accelerated sockets of counter slot `slot` and the redirected bytes
    /// queued at them.
    pub fn accel_of_slot(&self, slot: u32) -> Result<(usize, i64)> {
        let m: HashMap<&MapData, u64, SockState> = self.hash_map(names::SOCKS)?;
        let socks: StdHashMap<u64, SockState> =
            m.iter().flatten().filter(|(_, s)| s.slot == slot).collect();
        Ok((accelerated(&socks), queued_redirected(&socks)))
    }

    /// The last step of a removal: unpins and detaches everything of `id`
    /// (in its namespace, or, if that is gone, nowhere) and frees its slot.
    pub fn detach(&mut self, id: &str) {
        self.detach_with(id, false);
    }

    /// `detach`; `keep_entry`: its `TARGETS` entry stays, for the target
    /// replacing it in the same namespace to overwrite.
    fn detach_with(&mut self, id: &str, keep_entry: bool) {
        let Some(Entry { rec, owner }) = self.targets.remove(id) else {
            return;
        };
        let removed = pins::remove_tree(&pins::target_dir(&self.bpffs, rec.slot));
        debug!("target {id}: unpinned {} link(s)", removed.len());
        let at = rec.located();
        let alive = at != Located::Gone;
        match owner {
            Owner::Fresh(mut att) => {
                if keep_entry {
                    att.keep_entry();
                }
                if alive {
                    if let Err(e) = netns::run_in(&rec.spec.netns, move || drop(att)) {
                        warn!("target {id}: detaching in its namespace: {}", Chain(&e));
                    }
                } else {
                    in_empty_netns(move || drop(att));
                }
            }
            Owner::Adopted => {
                // What outlives its links (netlink filters, routing), in its
                // namespace; if that is gone, they went with it.
                match rec.installed.remove(&at) {
                    Ok((r, _)) => {
                        for f in r.failed {
                            warn!("target {id}: could not remove {f}");
                        }
                    }
                    Err(e) => warn!("target {id}: detaching in its namespace: {}", Chain(&e)),
                }
                if let Err(e) = self.remove_targets_entry(rec.installed.netns_cookie, keep_entry) {
                    warn!("target {id}: removing its TARGETS entry: {}", Chain(&e));
                }
                // A fresh target's owner sweeps as it drops (target.rs).
                self.sweep(&rec);
            }
        }
        info!(id, slot = rec.slot, netns_gone = !alive, "target detached");
    }

    /// An adopted target's entries, out of the shared maps once it is
    /// detached (`sweep.rs`), before its slot is free for another.
    fn sweep(&self, rec: &TargetRecord) {
        match self.loaded.sweep_maps() {
            Ok(mut maps) => {
                maps.sweep_logged(&rec.id, rec.installed.netns_cookie, rec.slot);
            }
            Err(e) => warn!("target {}: cannot sweep its entries: {}", rec.id, Chain(&e)),
        }
    }

    fn zero_counters(&mut self, slot: u32) -> Result<()> {
        let ncpus = aya::util::nr_cpus().map_err(|(_, e)| Error::io("counting CPUs", e))?;
        let map = self
            .loaded
            .ebpf_mut()
            .map_mut(names::COUNTERS)
            .expect("COUNTERS");
        let mut arr: PerCpuArray<&mut MapData, u64> =
            PerCpuArray::try_from(map).map_err(|source| target::Error::Map {
                name: names::COUNTERS,
                source,
            })?;
        for c in Counter::ALL {
            let zeros = PerCpuValues::try_from(vec![0u64; ncpus]).expect("one per CPU");
            arr.set(c.index(slot), zeros, 0)
                .map_err(|source| target::Error::Map {
                    name: names::COUNTERS,
                    source,
                })?;
        }
        Ok(())
    }

    /// Counters of one slot.
    pub fn counters_of_slot(&self, slot: u32) -> Result<Vec<(Counter, u64)>> {
        let map = self.loaded.ebpf().map(names::COUNTERS).expect("COUNTERS");
        let arr: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(|source| target::Error::Map {
                name: names::COUNTERS,
                source,
            })?;
        Ok(crate::target::inspect::slot_counters(&arr, slot)?)
    }

    /// `check`: attached and whole, or what is wrong.
    pub fn check(&self, id: &str) -> Option<String> {
        let e = self.targets.get(id)?;
        if e.rec.draining {
            return Some("DRAINING".into());
        }
        if e.rec.located() == Located::Gone {
            return Some("DEGRADED: its network namespace is gone".into());
        }
        let dir = pins::target_dir(&self.bpffs, e.rec.slot);
        if let Some(missing) = e.rec.links.iter().find(|l| !dir.join(l).exists()) {
            return Some(format!("DEGRADED: its {missing} link is not pinned"));
        }
        if loader::read_target(
            &self.loaded.targets_map().ok()?,
            e.rec.installed.netns_cookie,
        )
        .is_err()
        {
            return Some("DEGRADED: no TARGETS entry".into());
        }
        Some("OK".into())
    }

    pub fn statuses(&self) -> Vec<TargetStatus> {
        self.targets
            .keys()
            .map(|id| TargetStatus {
                id: id.clone(),
                target: self.targets[id].rec.spec.clone(),
                state: self.check(id).unwrap_or_default(),
            })
            .collect()
    }

    /// The network namespace (path) of the target with this cookie: where
    /// the nudger walks.
    pub fn netns_of(&self, cookie: u64) -> Option<PathBuf> {
        self.targets
            .values()
            .find(|e| e.rec.installed.netns_cookie == cookie)
            .map(|e| e.rec.spec.netns.clone())
    }

    pub fn record(&self, id: &str) -> Option<&TargetRecord> {
        self.targets.get(id).map(|e| &e.rec)
    }

    /// Removes closed flows that lingered; how many. Also counts down, in
    /// each target's namespace, the proxy listeners older than the target
    /// that closed (only targets that had some).
    pub fn reap_flows(&mut self) -> usize {
        for e in self.targets.values_mut() {
            if let Owner::Fresh(t) = &mut e.owner
                && t.has_prior_listeners()
            {
                let _ = netns::run_in(&e.rec.spec.netns, || t.recount_listeners());
            }
        }
        self.loaded.reap_flows().unwrap_or(0)
    }
}

/// The `&'static str` name of a program the agent pins links of.
fn program_name(s: &str) -> Option<&'static str> {
    [
        names::PROG_STEER,
        names::PROG_RESTORE,
        names::PROG_GETSOCKOPT,
        names::PROG_GETSOCKNAME4,
        names::PROG_GETSOCKNAME6,
        names::PROG_SOCKOPS,
        names::PROG_SOCKOPS_FLOWS,
    ]
    .into_iter()
    .find(|n| *n == s)
}

/// Removes one target through the registry behind `reg`, draining like a
/// single run's stop: new connections are refused at once; steered
/// flows get up to `drain` to finish; then acceleration is handed back
/// (bounded wait for queued bytes to be read); then detach. The lock is
/// held only for each short step, so other targets' requests go on.
pub fn remove(reg: &std::sync::Mutex<Registry>, id: &str, drain: Duration) -> Result<bool> {
    let lock = || {
        reg.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    let Some((cookie, slot)) = lock().start_draining(id)? else {
        return Ok(false);
    };
    drain_target(reg, id, cookie, slot, drain)?;
    lock().detach(id);
    Ok(true)
}

/// A removal's steps between `start_draining` and the detach
/// (`target::drain`): steered flows get up to `timeout` to finish, then
/// acceleration is handed back (bounded wait for queued bytes to be read).
fn drain_target(
    reg: &std::sync::Mutex<Registry>,
    id: &str,
    cookie: u64,
    slot: u32,
    timeout: Duration,
) -> Result<()> {
    let lock = || {
        reg.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    let active = || Ok::<_, Error>(lock().active_flows(cookie, slot).unwrap_or(0));
    let d = drain::flows(active()?, timeout, active, drain::sleep)?;
    info!(id, "drained {} flow(s), cut {}", d.ended(), d.left);
    let h = drain::accel(
        || lock().set_flag(cookie, flags::ACCEL, false),
        || lock().accel_of_slot(slot),
    )?;
    if h.sockets > 0 {
        info!(
            id,
            "accel: {} socket(s) handed back to plain TCP; {} byte(s) unread", h.sockets, h.left
        );
    }
    Ok(())
}

/// Replaces target `id` with `spec` (a change of where or how it is
/// attached): drained like a removal (new connections refused), detached,
/// attached again. In the same namespace and interface, no moment is left
/// without steering: a guard link of the steering program (TCX) holds the
/// interface from before the detach to after the new attach, steering by
/// the entry the old target keeps (new connections refused) until the new
/// target overwrites it and, fully attached, steers new connections again.
/// If the guard cannot be attached, between the detach and the attach the
/// interface is not steered (logged).
pub fn replace(
    reg: &std::sync::Mutex<Registry>,
    id: &str,
    spec: &TargetSpec,
    drain: Duration,
) -> Result<()> {
    let lock = || {
        reg.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    let same_place = lock()
        .record(id)
        .is_some_and(|r| r.spec.netns == spec.netns && r.spec.iface() == spec.iface());
    let Some((cookie, slot)) = lock().start_draining(id)? else {
        return lock().attach(id, spec);
    };
    drain_target(reg, id, cookie, slot, drain)?;
    let mut r = lock();
    let guard = if same_place {
        match r.guard(id) {
            Ok(g) => g,
            Err(e) => {
                warn!(
                    "target {id}: no steering guard for its replacement ({}): its interface is not steered between the detach and the attach",
                    Chain(&e)
                );
                None
            }
        }
    } else {
        None
    };
    let kept = guard.is_some();
    r.detach_with(id, kept);
    let res = r.attach_with(id, spec, kept);
    let Some(mut guard) = guard else {
        return res;
    };
    if r.record(id).map(|n| n.installed.netns_cookie) != Some(cookie) {
        // The new target failed, or is another namespace at the same path:
        // the kept entry is no one's.
        let _ = r.remove_targets_entry(cookie, false);
    }
    r.take_clsact(id, &mut guard);
    // Its netlink filter goes in its namespace (by ifindex): never here.
    if netns_alive(&spec.netns, cookie) {
        if let Err(e) = netns::run_in(&spec.netns, move || drop(guard)) {
            warn!("target {id}: removing its steering guard: {}", Chain(&e));
        }
    } else {
        in_empty_netns(move || drop(guard));
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> TargetSpec {
        let mut s = TargetSpec::new("/run/netns/pod", "eth0");
        s.target.cgroup = Some("/sys/fs/cgroup/pod".into());
        s.target.ports = Some("8000".parse().unwrap());
        s
    }

    #[test]
    fn what_changes_in_place_and_what_replaces() {
        let base = spec();
        let spec = |f: fn(&mut Target)| {
            let mut s = spec();
            f(&mut s.target);
            s
        };
        for new in [
            spec(|t| t.ports = Some("8000,8080".parse().unwrap())),
            spec(|t| {
                t.accel = Some(false);
                t.accel_ports = Some("8000".parse().unwrap());
                t.accel_max_queued = Some(1 << 20);
                t.accel_retire_ms = Some(5);
            }),
            TargetSpec {
                name: Some("default/web".into()),
                ..spec(|_| {})
            },
        ] {
            assert_eq!(change(&base, &new), Change::InPlace, "{new:?}");
        }
        for new in [
            spec(|t| t.proxy_port = Some(15001)),
            spec(|t| t.proxy_mark = Some(0x539)),
            spec(|t| t.steer_mark = Some(0x1234)),
        ] {
            assert_eq!(change(&base, &new), Change::InPlaceAfterDrain, "{new:?}");
        }
        let tproxy = spec(|t| t.steer = Some(Steer::Tproxy));
        for new in [
            TargetSpec::new("/run/netns/other", "eth0"),
            spec(|t| t.iface = Some("eth1".into())),
            spec(|t| t.cgroup = Some("/sys/fs/cgroup/other".into())),
            spec(|t| t.tc_mode = Some(TcMode::Netlink)),
            spec(|t| t.steer = Some(Steer::Tproxy)),
            spec(|t| t.route_table = Some(200)),
        ] {
            assert_eq!(change(&base, &new), Change::Replace, "{new:?}");
        }
        // The tproxy back-end's proxy port and mark are its routing's.
        let tproxy_with = |f: fn(&mut Target)| {
            let mut s = tproxy.clone();
            f(&mut s.target);
            s
        };
        for new in [
            tproxy_with(|t| t.proxy_port = Some(15001)),
            tproxy_with(|t| t.steer_mark = Some(0x1234)),
        ] {
            assert_eq!(change(&tproxy, &new), Change::Replace, "{new:?}");
        }
        let ports = tproxy_with(|t| t.ports = Some("9000".parse().unwrap()));
        assert_eq!(change(&tproxy, &ports), Change::InPlace);
    }
}
