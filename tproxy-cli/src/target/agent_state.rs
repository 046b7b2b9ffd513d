//! The node agent's state directory: its state file (what the next agent
//! adopts, and what `tproxy status`, `stats` and `cleanup` read of the
//! targets it serves) and its lock (one agent per directory).
use std::{
    fs::{self, File, OpenOptions},
    io::Write as _,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    api::TargetSpec,
    sys::netns::Located,
    target::{
        Error, Result,
        installed::{Installed, netns_at},
    },
};

/// What the state file keeps of one target: enough for the next agent to
/// adopt it, or for `tproxy cleanup` to remove it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TargetRecord {
    pub id: String,
    pub spec: TargetSpec,
    /// Where it is and what outlives its links (namespace, interface, tc
    /// mode and programs, routing: the same keys as ever, flattened).
    #[serde(flatten)]
    pub installed: Installed,
    pub slot: u32,
    /// Its pinned links, by program name, under `targets/<slot>/`.
    pub links: Vec<String>,
    /// Being removed (steering of new flows off).
    #[serde(default)]
    pub draining: bool,
}

impl TargetRecord {
    /// Where its namespace is now: at its path if that is still the one
    /// it was attached in, else gone.
    pub fn located(&self) -> Located {
        netns_at(&self.spec.netns, self.installed.netns_cookie)
    }
}

/// A target accepted before its cgroup existed, attached once it does
/// (`agent::waiting`): nothing of it is installed yet.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct WaitingRecord {
    pub id: String,
    pub spec: TargetSpec,
}

/// The agent's state file: what the next agent adopts.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AgentState {
    pub pid: i32,
    pub bpffs: PathBuf,
    pub socket: PathBuf,
    pub targets: Vec<TargetRecord>,
    /// Left out when empty, so earlier agents read the file as ever.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting: Vec<WaitingRecord>,
}

pub fn default_state_dir() -> PathBuf {
    crate::sys::run_dir::run_dir().join("agent")
}

pub fn state_path(dir: &Path) -> PathBuf {
    dir.join("agent.json")
}

pub fn lock_path(dir: &Path) -> PathBuf {
    dir.join("agent.lock")
}

/// The held flock on `agent.lock`: one agent per state directory, and
/// `tproxy cleanup` leaves a living agent alone.
pub struct AgentLock {
    _file: File,
}

/// Takes the agent lock in `dir`; `None` if an agent holds it.
pub fn try_lock(dir: &Path) -> Result<Option<AgentLock>> {
    fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let path = lock_path(dir);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    // SAFETY: flock on a valid fd.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Ok(None);
        }
        return Err(Error::io(format!("locking {}", path.display()), e));
    }
    Ok(Some(AgentLock { _file: file }))
}

pub fn read_state(dir: &Path) -> Option<AgentState> {
    parse_state(&fs::read(state_path(dir)).ok()?)
}

/// A state file as written by this build or an earlier one: those name a
/// target's interface only in its spec.
fn parse_state(json: &[u8]) -> Option<AgentState> {
    let mut state: AgentState = serde_json::from_slice(json).ok()?;
    for t in &mut state.targets {
        if t.installed.iface.is_empty()
            && let Some(iface) = &t.spec.target.iface
        {
            t.installed.iface.clone_from(iface);
        }
    }
    Some(state)
}

pub fn write_state(dir: &Path, state: &AgentState) -> Result<()> {
    let path = state_path(dir);
    let tmp = dir.join("agent.json.tmp");
    let io = |e| Error::io(format!("writing {}", path.display()), e);
    let mut f = File::create(&tmp).map_err(io)?;
    f.write_all(&serde_json::to_vec_pretty(state).expect("state serializes"))
        .map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, &path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::options::TcMode;

    /// The previous build's state file: the target's installed part at the
    /// top level of its record, its interface only in its spec.
    #[test]
    fn a_state_file_of_the_previous_build_reads() {
        let old = br#"{"pid":9,"bpffs":"/sys/fs/bpf/tproxy","socket":"/run/tproxy/agent.sock",
            "targets":[{"id":"k2","spec":{"netns":"/run/netns/pod","iface":"eth0",
            "cgroup":"/sys/fs/cgroup/pod","ports":"8000"},"netns_cookie":4096,
            "netns_inode":4026532301,"slot":1,"ifindex":3,"tc_mode":"netlink",
            "created_clsact":true,"tproxy":null,"tc_progs":[71,72],
            "links":["tproxy_sockops"],"draining":true}]}"#;
        let s = parse_state(old).unwrap();
        let t = &s.targets[0];
        assert_eq!((t.id.as_str(), t.slot, t.draining), ("k2", 1, true));
        let i = &t.installed;
        assert_eq!(i.iface, "eth0");
        assert_eq!(
            (i.ifindex, i.netns_cookie, i.netns_inode),
            (3, 4096, 4026532301)
        );
        assert_eq!(i.tc_mode, Some(TcMode::Netlink));
        assert!(i.created_clsact && i.tproxy.is_none());
        assert_eq!(i.tc_progs, vec![71, 72]);
        // Written again: the same keys at the same level, and `iface`.
        let v = serde_json::to_value(&s.targets[0]).unwrap();
        assert_eq!(v["tc_mode"], "netlink");
        assert_eq!(v["netns_cookie"], 4096);
        assert_eq!(v["iface"], "eth0");
        assert_eq!(serde_json::from_value::<TargetRecord>(v).unwrap(), *t);
    }
}
