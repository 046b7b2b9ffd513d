//! `tproxy agent`: one long-running process per node that loads the
//! programs once and attaches them per target (a pod: its network
//! namespace, interface, cgroup and ports), added and removed at run time
//! through a Unix socket (`agent_api`) or files in `--targets-dir`.
//!
//! Restarts keep every target attached: the shared maps and each target's
//! bpf_links are pinned in bpffs (`pins`), and the state file says what
//! belongs to which target. SIGTERM/SIGINT exit and leave everything
//! attached; the next agent adopts the targets, swapping its own programs
//! into their links in one step each. Targets are removed one by one
//! (`del`, or deleting the target file), draining like a single run's stop;
//! after an agent that is not coming back, `tproxy cleanup` removes what it
//! left.
pub mod error;
pub mod files;
pub mod registry;
pub mod server;

use std::{
    collections::HashMap as StdHashMap,
    fs::{self},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tracing::{info, warn};

pub use self::{
    error::{Error, Result},
    registry::{ApiFailure, Change, Registry},
};
use crate::{
    api::{TargetSpec, code},
    error::Chain,
    sys::{pins, system},
    target::{
        agent_state::{AgentState, read_state, try_lock, write_state},
        drain,
        loader::{LoadOptions, Loaded, MapSizes},
        nudger::{Netns, Nudger},
        recovery,
    },
};

/// What a `tproxy agent` runs with, resolved from its flags and its
/// `--config` file (`cmd::agent`).
#[derive(Clone, Debug)]
pub struct Settings {
    pub socket: PathBuf,
    pub targets_dir: PathBuf,
    pub bpffs: PathBuf,
    pub state_dir: PathBuf,
    pub max_targets: u32,
    /// How long removing a target waits for its steered flows.
    pub drain: Duration,
    /// Pair a client in one pod of this node with another pod's proxy.
    pub same_node: bool,
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// A target's quotas when its spec names none.
    pub quotas: registry::Quotas,
    pub sizes: MapSizes,
}

pub const DEFAULT_TARGETS_DIR: &str = "/run/tproxy/targets.d";
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/tproxy";
pub const DEFAULT_MAX_TARGETS: u32 = 256;
/// Where `--metrics-addr` alone serves: loopback, as the figures name pods
/// and containers and show each one's traffic.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";

/// The running agent, shared by the API server, the target-file scanner
/// and the signal handler.
pub struct Agent {
    reg: Mutex<Registry>,
    state_dir: PathBuf,
    bpffs: PathBuf,
    socket: PathBuf,
    drain: Duration,
}

impl Agent {
    pub fn lock(&self) -> MutexGuard<'_, Registry> {
        self.reg
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn save(&self, reg: &Registry) {
        let state = AgentState {
            pid: std::process::id() as i32,
            bpffs: self.bpffs.clone(),
            socket: self.socket.clone(),
            targets: reg.records(),
        };
        if let Err(e) = write_state(&self.state_dir, &state) {
            warn!("saving the agent state: {}", Chain(&e));
        }
    }

    /// `add`: attach, idempotent for the same spec; for another spec,
    /// update in place (no window) when `registry::change` says it can be,
    /// else replace (drain, detach, attach).
    pub fn add(&self, id: &str, spec: &TargetSpec) -> std::result::Result<(), ApiFailure> {
        {
            let mut reg = self.lock();
            if reg.is_draining(id) {
                return Err(being_removed(id));
            }
            match reg.spec_of(id) {
                Some(old) if old == spec => return Ok(()),
                Some(old) => match registry::change(old, spec) {
                    Change::Replace => {}
                    how => {
                        let old = old.clone();
                        drop(reg);
                        return self.update(id, &old, spec, how);
                    }
                },
                None => {
                    let r = reg.attach(id, spec);
                    self.save(&reg);
                    return r.map_err(Into::into);
                }
            }
        }
        // Another namespace, interface, cgroup, tc mode, back-end or
        // routing: replaced. New connections are refused while its flows
        // drain; in the same namespace and interface a steering guard holds
        // the interface from the detach to the new attach (docs/agent-and-kubernetes.md,
        // "Changing a target").
        info!(
            id,
            "target changed where or how it is attached: replacing it (drain, detach, attach)"
        );
        let r = registry::replace(&self.reg, id, spec, self.drain);
        self.save(&self.lock());
        r.map_err(Into::into)
    }

    /// The in-place part of `add`: the flows the change would cut (those to
    /// ports no longer intercepted; all, for `InPlaceAfterDrain`) get up to
    /// the drain timeout to finish, as on removal (new connections are
    /// still steered the old way meanwhile); then the entry is rewritten
    /// in one step.
    fn update(
        &self,
        id: &str,
        old: &TargetSpec,
        spec: &TargetSpec,
        how: Change,
    ) -> std::result::Result<(), ApiFailure> {
        let quotas = self.lock().quotas();
        let opts = registry::options_of(spec, quotas)?;
        let before = registry::options_of(old, quotas)?.ports;
        let all = how == Change::InPlaceAfterDrain;
        let gone = |p: u16| before.contains(p) && (all || !opts.ports.contains(p));
        if before.iter().any(gone) {
            let at = self
                .lock()
                .record(id)
                .map(|r| (r.installed.netns_cookie, r.slot));
            if let Some((cookie, slot)) = at {
                let active =
                    || Ok::<_, Error>(self.lock().active_flows_to(cookie, slot, gone).unwrap_or(0));
                let d = drain::flows(active()?, self.drain, active, drain::sleep)?;
                if d.start > 0 {
                    info!(
                        id,
                        "before the change: drained {} flow(s), cut {}",
                        d.ended(),
                        d.left
                    );
                }
            }
        }
        let mut reg = self.lock();
        if reg.is_draining(id) || reg.spec_of(id).is_none() {
            return Err(being_removed(id));
        }
        let r = reg.update(id, spec);
        self.save(&reg);
        r.map_err(Into::into)
    }

    /// `del`: drain and detach; an unknown id is fine.
    pub fn del(&self, id: &str) -> std::result::Result<(), ApiFailure> {
        if self.lock().is_draining(id) {
            return Ok(()); // another request is already removing it
        }
        let r = registry::remove(&self.reg, id, self.drain);
        self.save(&self.lock());
        r.map(drop).map_err(Into::into)
    }
}

fn being_removed(id: &str) -> ApiFailure {
    ApiFailure {
        code: code::TRY_AGAIN,
        error: format!("target {id} is being removed; try again when it is gone"),
    }
}

/// `tproxy agent`: serves until SIGTERM/SIGINT.
pub fn run(args: &Settings) -> Result<()> {
    let Settings {
        max_targets,
        drain,
        quotas,
        sizes,
        ..
    } = args.clone();
    let state_dir = args.state_dir.clone();

    system::check_privileges_for(true)?;
    system::check_kernel_version()?;
    system::check_btf()?;
    crate::sys::probe::check(true)?;
    let lock = try_lock(&state_dir)?.ok_or_else(|| Error::AgentRunning {
        dir: state_dir.clone(),
        pid: read_state(&state_dir).map_or(0, |s| s.pid),
    })?;
    let mounted = pins::ensure_bpffs(&args.bpffs)?;
    // A mount made for this start goes again if the start fails; once the
    // agent serves, it holds the pins and stays (`tproxy cleanup` unmounts).
    let mount = pins::MountGuard::new(&args.bpffs, mounted);
    let node = pins::node_dir(&args.bpffs);
    fs::create_dir_all(&node).map_err(|e| Error::io(format!("creating {}", node.display()), e))?;
    let previous = read_state(&state_dir).unwrap_or_default();
    let maps_pinned = node.join(tproxy_common::names::TARGETS).exists();
    if !previous.targets.is_empty() && !maps_pinned {
        // The pins are gone (bpffs unmounted, a reboot of /sys/fs/bpf):
        // the old targets' links went with them; remove what outlives.
        warn!(
            "the previous agent's pins in {} are gone: its {} target(s) are detached; removing their leftovers",
            node.display(),
            previous.targets.len()
        );
        for line in recovery::agent_leftovers(&previous) {
            info!("{line}");
        }
    }
    let mut loaded = Loaded::load_with(&LoadOptions {
        accel: true,
        max_targets,
        single: None,
        sizes,
        pin_dir: Some(node),
        same_node: args.same_node,
    })?;
    let nudge = loaded.nudge_maps()?;
    let mut reg = Registry::new(loaded, args.bpffs.clone(), max_targets, quotas);
    if maps_pinned {
        for rec in previous.targets {
            reg.adopt(rec);
        }
    }
    let agent = Arc::new(Agent {
        reg: Mutex::new(reg),
        state_dir: state_dir.clone(),
        bpffs: args.bpffs.clone(),
        socket: args.socket.clone(),
        drain,
    });
    agent.save(&agent.lock());
    // A removal the previous agent had begun (it exited mid-drain) goes on:
    // else the target would refuse new connections for good, and `add` and
    // `del` of it would wait for a removal no one makes.
    let resumed: Vec<String> = agent
        .lock()
        .records()
        .into_iter()
        .filter(|r| r.draining)
        .map(|r| r.id)
        .collect();
    for id in resumed {
        let agent = agent.clone();
        std::thread::Builder::new()
            .name("resume-removal".into())
            .spawn(move || {
                info!(id, "resuming the removal the previous agent had begun");
                let r = registry::remove(&agent.reg, &id, agent.drain);
                agent.save(&agent.lock());
                if let Err(e) = r {
                    warn!("removing target {id}: {}", Chain(&e));
                }
            })
            .map_err(|e| Error::io("starting a removal thread", e))?;
    }
    // Wakes readers asleep after a short read, in their pod's namespace.
    let _nudger = match nudge {
        Some(maps) => {
            let agent = agent.clone();
            Some(Nudger::start(maps, move |cookie| {
                agent.lock().netns_of(cookie).map_or(Netns::Gone, Netns::At)
            })?)
        }
        None => None,
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the async runtime", e))?;
    let sig = rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).map_err(|e| Error::io("SIGTERM", e))?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::io("SIGINT", e))?;
        if let Some(addr) = args.metrics_addr {
            let endpoint = crate::observe::metrics::Endpoint::bind(addr).await?;
            let maps = agent.lock().maps()?;
            let a = agent.clone();
            endpoint.start_agent(
                maps,
                Arc::new(move || {
                    a.lock()
                        .records()
                        .into_iter()
                        .map(|r| {
                            let pod = r.spec.name.clone().unwrap_or_default();
                            (r.id, pod, r.installed.netns_cookie, r.slot)
                        })
                        .collect()
                }),
            )?;
        }
        let listener = server::bind(&args.socket)?;
        tokio::spawn(server::serve(listener, agent.clone()));
        {
            let agent = agent.clone();
            let dir = args.targets_dir.clone();
            std::thread::Builder::new()
                .name("targets.d".into())
                .spawn(move || watch_targets_dir(&agent, &dir))
                .map_err(|e| Error::io("starting the targets.d thread", e))?;
        }
        info!(
            socket = %args.socket.display(),
            targets_dir = %args.targets_dir.display(),
            bpffs = %args.bpffs.display(),
            max_targets,
            flows_quota = quotas.flows,
            socks_quota = quotas.socks,
            targets = agent.lock().len(),
            "agent serving; SIGTERM or SIGINT exits and leaves the targets attached for the next agent"
        );
        let mut reap = tokio::time::interval(Duration::from_secs(1));
        let sig = loop {
            tokio::select! {
                _ = term.recv() => break "SIGTERM",
                _ = int.recv() => break "SIGINT",
                _ = reap.tick() => {
                    let agent = agent.clone();
                    let _ = tokio::task::spawn_blocking(move || agent.lock().reap_flows()).await;
                }
            }
        };
        Ok::<_, Error>(sig)
    })?;
    // Held to the end: no request changes anything after the state is saved.
    let reg = agent.lock();
    agent.save(&reg);
    let _ = fs::remove_file(&args.socket);
    info!(
        "{sig}: exiting with {} target(s) left attached and pinned in {}; the next agent adopts them (`tproxy cleanup` removes them if none comes)",
        reg.len(),
        args.bpffs.display()
    );
    drop(lock);
    mount.keep();
    // Nothing is dropped: dropping the owners would detach the targets.
    std::process::exit(0);
}

/// Rescans `dir` every second: new and changed files add or replace their
/// target, removed ones remove it; a broken file is one log line, once.
fn watch_targets_dir(agent: &Agent, dir: &Path) {
    let mut reported: StdHashMap<String, String> = StdHashMap::new();
    loop {
        let found = files::scan(dir);
        for (id, (path, spec)) in &found {
            let outcome = match spec {
                Err(problem) => Err(format!(
                    "target file {}: {problem}; skipped (fix the file; other targets are unaffected)",
                    path.display()
                )),
                Ok(spec) => agent.add(id, spec).map_err(|f| {
                    format!(
                        "target file {}: {}; will retry when the file changes",
                        path.display(),
                        f.error
                    )
                }),
            };
            match outcome {
                Ok(()) => {
                    reported.remove(id);
                }
                Err(line) => {
                    if reported.get(id) != Some(&line) {
                        warn!("{line}");
                        reported.insert(id.clone(), line);
                    }
                }
            }
        }
        let gone: Vec<String> = agent
            .lock()
            .ids()
            .into_iter()
            .filter(|id| id.starts_with("file:") && !found.contains_key(id))
            .collect();
        for id in gone {
            info!(id, "target file removed: removing the target");
            if let Err(f) = agent.del(&id) {
                warn!("removing target {id}: {}", f.error);
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}
