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

use crate::{Error, Result, api::TargetSpec, config::options::TcMode, sys::routing::TproxySpec};

/// What the state file keeps of one target: enough for the next agent to
/// adopt it, or for `tproxy cleanup` to remove it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TargetRecord {
    pub id: String,
    pub spec: TargetSpec,
    pub netns_cookie: u64,
    pub netns_inode: u64,
    pub slot: u32,
    pub ifindex: u32,
    pub tc_mode: TcMode,
    pub created_clsact: bool,
    pub tproxy: Option<TproxySpec>,
    /// Program ids of its tc programs (netlink filters are found by them).
    pub tc_progs: Vec<u32>,
    /// Its pinned links, by program name, under `targets/<slot>/`.
    pub links: Vec<String>,
    /// Being removed (steering of new flows off).
    #[serde(default)]
    pub draining: bool,
}

/// The agent's state file: what the next agent adopts.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AgentState {
    pub pid: i32,
    pub bpffs: PathBuf,
    pub socket: PathBuf,
    pub targets: Vec<TargetRecord>,
}

pub fn default_state_dir() -> PathBuf {
    crate::target::record::run_dir().join("agent")
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
    serde_json::from_slice(&fs::read(state_path(dir)).ok()?).ok()
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
