//! The running agent: its registry of targets and those waiting for
//! their cgroup, shared by the API server, the target-file scanner, the
//! waiting targets' watcher and the signal handler; adding, replacing and
//! removing a target, and saving the state file after each change.
use std::{
    path::PathBuf,
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use tracing::{info, warn};

use super::{
    error::Error,
    registry::{self, ApiFailure, Change, Registry},
    waiting::{self, Waiting},
};
use crate::{
    api::{TargetSpec, code},
    config,
    sys::{error::Chain, system},
    target::{
        agent_state::{AgentState, WaitingRecord, write_state},
        drain,
    },
};

/// The running agent, shared by the API server, the target-file scanner
/// and the signal handler.
pub struct Agent {
    reg: Mutex<Registry>,
    /// Taken after `reg` when both are (never the other way round).
    waiting: Mutex<Waiting>,
    state_dir: PathBuf,
    bpffs: PathBuf,
    socket: PathBuf,
    drain: Duration,
}

impl Agent {
    /// The agent of `reg`; it saves its state to `state_dir` after each
    /// change.
    pub fn new(
        reg: Registry,
        state_dir: PathBuf,
        bpffs: PathBuf,
        socket: PathBuf,
        drain: Duration,
    ) -> Agent {
        Agent {
            reg: Mutex::new(reg),
            waiting: Mutex::new(Waiting::default()),
            state_dir,
            bpffs,
            socket,
            drain,
        }
    }

    /// The registry, for removals that lock it step by step.
    pub fn registry(&self) -> &Mutex<Registry> {
        &self.reg
    }

    /// How long removing a target waits for its flows.
    pub fn drain(&self) -> Duration {
        self.drain
    }

    pub fn lock(&self) -> MutexGuard<'_, Registry> {
        self.reg
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The targets waiting for their cgroup.
    pub fn waiting(&self) -> MutexGuard<'_, Waiting> {
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn save(&self, reg: &Registry) {
        let state = AgentState {
            pid: std::process::id() as i32,
            bpffs: self.bpffs.clone(),
            socket: self.socket.clone(),
            targets: reg.records(),
            waiting: self.waiting().records(),
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
                    if let Some(cgroup) = self.cgroup_to_wait_for(spec, &reg)? {
                        if self.waiting().insert(id, spec, cgroup.clone()) {
                            info!(
                                id,
                                name = spec.name.as_deref().unwrap_or(""),
                                cgroup = %cgroup.display(),
                                "target waits for its cgroup, which does not exist yet (the runtime makes it when the pod's first container starts)"
                            );
                            self.save(&reg);
                        }
                        return Ok(());
                    }
                    self.waiting().remove(id);
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

    /// `del`: drain and detach (a waiting target is just forgotten); an
    /// unknown id is fine.
    pub fn del(&self, id: &str) -> std::result::Result<(), ApiFailure> {
        {
            let reg = self.lock();
            if self.waiting().remove(id) {
                info!(id, "target removed before its cgroup appeared");
                self.save(&reg);
                return Ok(());
            }
            if reg.is_draining(id) {
                return Ok(()); // another request is already removing it
            }
        }
        let r = registry::remove(&self.reg, id, self.drain);
        self.save(&self.lock());
        r.map(drop).map_err(Into::into)
    }
}

impl Agent {
    /// Where `spec`'s cgroup will appear, when it does not exist yet and
    /// the rest of the target is sound: such a target waits. Its keys and
    /// its network namespace are checked now, so a mistake still fails
    /// the `add` (CNI ADD) that made it.
    fn cgroup_to_wait_for(
        &self,
        spec: &TargetSpec,
        reg: &Registry,
    ) -> std::result::Result<Option<PathBuf>, ApiFailure> {
        let Ok(mount) = system::cgroup2_root() else {
            return Ok(None);
        };
        let Some(cgroup) = waiting::cgroup_path(spec, &mount).filter(|p| !p.exists()) else {
            return Ok(None);
        };
        registry::options_of(spec, reg.quotas())?;
        if !spec.netns.exists() {
            return Err(Error::from(config::Error::InvalidTarget(format!(
                "network namespace {} does not exist: give the pod's namespace path",
                spec.netns.display()
            )))
            .into());
        }
        Ok(Some(cgroup))
    }

    /// Takes the previous agent's waiting targets over.
    pub fn restore_waiting(&self, records: Vec<WaitingRecord>) {
        let Ok(mount) = system::cgroup2_root() else {
            return;
        };
        let reg = self.lock();
        for r in records {
            if let Some(cgroup) = waiting::cgroup_path(&r.spec, &mount) {
                self.waiting().insert(&r.id, &r.spec, cgroup);
            }
        }
        self.save(&reg);
    }

    /// Attaches the waiting targets whose cgroup has appeared; forgets
    /// those whose namespace went. The watcher calls it every
    /// [`waiting::POLL`].
    pub fn attach_waiting(&self) {
        if self.waiting().is_empty() {
            return;
        }
        let (ready, gone) = self.waiting().due(Instant::now());
        if !gone.is_empty() {
            for id in &gone {
                info!(id, "waiting target dropped: its network namespace is gone");
            }
            self.save(&self.lock());
        }
        for (id, spec, cgroup) in ready {
            let mut reg = self.lock();
            // Removed or changed since: that request's word stands.
            if !self.waiting().spec_of(&id).is_some_and(|s| *s == spec) {
                continue;
            }
            self.waiting().remove(&id);
            match reg.attach(&id, &spec) {
                Ok(()) => {
                    info!(id, cgroup = %cgroup.display(), "the target's cgroup appeared: attached")
                }
                Err(e) => {
                    let why = Chain(&e).to_string();
                    if self.waiting().failed(&id, &spec, cgroup, why.clone()) {
                        warn!(
                            "attaching target {id} once its cgroup appeared: {why}; retried every second"
                        );
                    }
                }
            }
            self.save(&reg);
        }
    }
}

fn being_removed(id: &str) -> ApiFailure {
    ApiFailure {
        code: code::TRY_AGAIN,
        error: format!("target {id} is being removed; try again when it is gone"),
    }
}
