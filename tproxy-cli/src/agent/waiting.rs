//! Targets whose cgroup does not exist yet. A runtime may make a pod's
//! cgroup only when the pod's first container starts, after CNI ADD
//! (podman does; a kubelet makes it before it calls the runtime). Such a
//! target is accepted and waits here, and in the state file so a restart
//! keeps it, until its cgroup appears; it is then attached whole (the
//! agent looks every [`POLL`]).
//!
//! Nothing of the pod runs before its cgroup exists: the runtime makes it
//! for the pod's first container (the infra process), inside which the
//! app's and the proxy's containers come later. The window in which a
//! process of the pod could run unsteered is one poll and one attach
//! (tens of milliseconds) after that first container's start.
use std::{
    collections::BTreeMap,
    path::{Component, Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{
    api::{TargetSpec, TargetStatus},
    target::agent_state::WaitingRecord,
};

/// How often waiting targets' cgroups are looked for.
pub const POLL: Duration = Duration::from_millis(20);
/// How long after a failed attach it is tried again.
const RETRY: Duration = Duration::from_secs(1);

struct Entry {
    spec: TargetSpec,
    cgroup: PathBuf,
    next_try: Instant,
    error: Option<String>,
}

/// The waiting targets, by id.
#[derive(Default)]
pub struct Waiting {
    entries: BTreeMap<String, Entry>,
}

/// The cgroup `spec` names, as a path below the cgroup2 `mount`, when it
/// is one lexically (no `..`): only such a path can be waited for.
pub fn cgroup_path(spec: &TargetSpec, mount: &Path) -> Option<PathBuf> {
    let given = spec.target.cgroup.as_deref()?;
    if given.components().any(|c| c == Component::ParentDir) {
        return None;
    }
    let path = mount.join(given);
    (path.starts_with(mount) && path != mount).then_some(path)
}

impl Waiting {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn spec_of(&self, id: &str) -> Option<&TargetSpec> {
        self.entries.get(id).map(|e| &e.spec)
    }

    /// Adds or replaces `id`; whether it is new or changed.
    pub fn insert(&mut self, id: &str, spec: &TargetSpec, cgroup: PathBuf) -> bool {
        if self.spec_of(id) == Some(spec) {
            return false;
        }
        self.entries.insert(
            id.to_string(),
            Entry {
                spec: spec.clone(),
                cgroup,
                next_try: Instant::now(),
                error: None,
            },
        );
        true
    }

    pub fn remove(&mut self, id: &str) -> bool {
        self.entries.remove(id).is_some()
    }

    /// Puts `id` back after a failed attach: tried again after [`RETRY`].
    /// Whether `error` is new for it (to be logged).
    pub fn failed(&mut self, id: &str, spec: &TargetSpec, cgroup: PathBuf, error: String) -> bool {
        let new = self
            .entries
            .get(id)
            .is_none_or(|e| e.error.as_ref() != Some(&error));
        self.entries.insert(
            id.to_string(),
            Entry {
                spec: spec.clone(),
                cgroup,
                next_try: Instant::now() + RETRY,
                error: Some(error.clone()),
            },
        );
        new
    }

    /// Those whose cgroup now exists and whose turn it is, to be attached;
    /// and those whose network namespace went (the pod is gone), taken
    /// out here.
    pub fn due(&mut self, now: Instant) -> (Vec<(String, TargetSpec, PathBuf)>, Vec<String>) {
        let gone: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.spec.netns.exists())
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            self.entries.remove(id);
        }
        let ready = self
            .entries
            .iter()
            .filter(|(_, e)| e.next_try <= now && e.cgroup.is_dir())
            .map(|(id, e)| (id.clone(), e.spec.clone(), e.cgroup.clone()))
            .collect();
        (ready, gone)
    }

    /// `WAITING …`: for what, or why the last attach failed.
    pub fn state(&self, id: &str) -> Option<String> {
        let e = self.entries.get(id)?;
        Some(match &e.error {
            None => format!("WAITING for its cgroup {}", e.cgroup.display()),
            Some(err) => format!("WAITING: attaching failed, retried every second: {err}"),
        })
    }

    pub fn statuses(&self) -> Vec<TargetStatus> {
        self.entries
            .iter()
            .map(|(id, e)| TargetStatus {
                id: id.clone(),
                target: e.spec.clone(),
                state: self.state(id).unwrap_or_default(),
            })
            .collect()
    }

    pub fn records(&self) -> Vec<WaitingRecord> {
        self.entries
            .iter()
            .map(|(id, e)| WaitingRecord {
                id: id.clone(),
                spec: e.spec.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(cgroup: &str) -> TargetSpec {
        let mut s = TargetSpec::new("/run/netns/none", "eth0");
        s.target.cgroup = Some(cgroup.into());
        s
    }

    #[test]
    fn only_a_path_below_the_mount_is_waited_for() {
        let m = Path::new("/sys/fs/cgroup");
        let p = |c: &str| cgroup_path(&spec(c), m);
        assert_eq!(p("kubepods/pod1"), Some(m.join("kubepods/pod1")));
        assert_eq!(p("/sys/fs/cgroup/pod1"), Some(m.join("pod1")));
        assert_eq!(p("/elsewhere/pod1"), None);
        assert_eq!(p("kubepods/../../etc"), None);
        assert_eq!(p(""), None);
        assert_eq!(cgroup_path(&TargetSpec::new("/x", "eth0"), m), None);
    }

    #[test]
    fn a_target_is_due_once_its_cgroup_exists_and_dropped_with_its_netns() {
        let dir = tempfile::tempdir().unwrap();
        let netns = dir.path().join("netns");
        std::fs::write(&netns, "").unwrap();
        let cg = dir.path().join("pod");
        let mut s = spec("pod");
        s.netns = netns.clone();
        let mut w = Waiting::default();
        assert!(w.insert("a", &s, cg.clone()));
        assert!(
            !w.insert("a", &s, cg.clone()),
            "the same again is no change"
        );
        assert!(w.state("a").unwrap().starts_with("WAITING for its cgroup"));
        let now = Instant::now();
        assert_eq!(w.due(now), (vec![], vec![]));
        std::fs::create_dir(&cg).unwrap();
        assert_eq!(w.due(now).0, vec![("a".into(), s.clone(), cg.clone())]);
        // A failed attach waits its turn, and says why.
        assert!(w.failed("a", &s, cg.clone(), "no eth0".into()));
        assert!(!w.failed("a", &s, cg.clone(), "no eth0".into()));
        assert!(w.due(Instant::now()).0.is_empty());
        assert!(w.state("a").unwrap().contains("no eth0"));
        assert_eq!(w.due(Instant::now() + RETRY).0.len(), 1);
        std::fs::remove_file(&netns).unwrap();
        assert_eq!(w.due(now), (vec![], vec!["a".to_string()]));
        assert!(w.is_empty());
    }
}
