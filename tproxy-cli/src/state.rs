//! The runtime record of a running instance: `/run/tproxy/<netns>-<iface>.json`.
//!
//! It is the only thing tproxy keeps outside the kernel. It holds an flock
//! while the instance lives, so a second instance on the same interface is
//! refused, and a record whose lock is free belongs to an instance that died
//! without cleaning up (SIGKILL): the next start removes what it left.
use std::{
    fs::{self, File, OpenOptions},
    io::{Read as _, Seek as _, Write as _},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{Error, Result, options::Steer, routing::TproxySpec, tc::TcMode};

pub const DEFAULT_RUN_DIR: &str = "/run/tproxy";

/// What a running instance installed, and where to find its maps.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    pub pid: i32,
    pub iface: String,
    pub ifindex: u32,
    pub netns_inode: u64,
    pub cgroup: PathBuf,
    /// `None` until the tc programs are attached.
    pub tc_mode: Option<TcMode>,
    /// tproxy added the clsact qdisc (netlink mode).
    pub created_clsact: bool,
    pub steer: Steer,
    /// What the tproxy back-end installed (rule, routes, nftables table).
    pub tproxy: Option<TproxySpec>,
    /// Map ids, for `tproxy stats` from another process.
    pub counters_map_id: u32,
    pub flows_map_id: u32,
    /// The embryonic flows (`SYNS`).
    #[serde(default)]
    pub syns_map_id: u32,
    /// The closed flows lingering (`CLOSING`).
    #[serde(default)]
    pub closing_map_id: u32,
    pub sockhash_map_id: u32,
    pub socks_map_id: u32,
}

/// The held lock on an instance's record; dropping it removes the record.
pub struct InstanceLock {
    file: File,
    path: PathBuf,
}

pub fn run_dir() -> PathBuf {
    std::env::var_os("TPROXY_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_RUN_DIR))
}

pub fn record_path(dir: &Path, netns_inode: u64, iface: &str) -> PathBuf {
    dir.join(format!("{netns_inode}-{iface}.json"))
}

fn try_flock(file: &File) -> std::io::Result<bool> {
    // SAFETY: flock on a valid fd.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        Ok(true)
    } else {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(false)
        } else {
            Err(e)
        }
    }
}

fn read_record(file: &mut File) -> Option<Record> {
    let mut s = String::new();
    file.read_to_string(&mut s).ok()?;
    serde_json::from_str(&s).ok()
}

impl InstanceLock {
    /// Takes the lock for (netns, iface). Returns the record a dead instance
    /// left there, if any, for the caller to clean up after.
    pub fn acquire(netns_inode: u64, iface: &str) -> Result<(InstanceLock, Option<Record>)> {
        let dir = run_dir();
        fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let path = record_path(&dir, netns_inode, iface);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        if !try_flock(&file).map_err(|e| Error::io(format!("locking {}", path.display()), e))? {
            let pid = read_record(&mut file).map(|r| r.pid).unwrap_or(0);
            return Err(Error::AlreadyRunning {
                pid,
                iface: iface.into(),
            });
        }
        let stale = read_record(&mut file);
        Ok((InstanceLock { file, path }, stale))
    }

    pub fn write(&mut self, record: &Record) -> Result<()> {
        let json = serde_json::to_vec_pretty(record).expect("record serializes");
        let io = |e| Error::io(format!("writing {}", self.path.display()), e);
        self.file.set_len(0).map_err(io)?;
        self.file.rewind().map_err(io)?;
        self.file.write_all(&json).map_err(io)?;
        self.file.flush().map_err(io)
    }
}

impl Drop for InstanceLock {
    fn drop(&mut self) {
        // Remove while still holding the lock; the lock goes with the fd.
        let _ = fs::remove_file(&self.path);
        if let Some(dir) = self.path.parent() {
            let _ = fs::remove_dir(dir); // only if empty
        }
    }
}

/// Records of live instances (their lock is held), for `tproxy stats`.
pub fn live_records() -> Vec<Record> {
    let Ok(entries) = fs::read_dir(run_dir()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let Ok(mut f) = File::open(e.path()) else {
            continue;
        };
        if matches!(try_flock(&f), Ok(false))
            && let Some(r) = read_record(&mut f)
        {
            out.push(r);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_and_record_is_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: tests in this module are the only users of the variable.
        unsafe { std::env::set_var("TPROXY_RUN_DIR", dir.path()) };
        let (mut lock, stale) = InstanceLock::acquire(1, "eth9").unwrap();
        assert!(stale.is_none());
        let rec = Record {
            pid: 42,
            iface: "eth9".into(),
            ifindex: 9,
            netns_inode: 1,
            cgroup: "/sys/fs/cgroup".into(),
            tc_mode: None,
            created_clsact: false,
            steer: Steer::Tproxy,
            tproxy: Some(TproxySpec::new("eth9", 0x7409, 0x7409, 15006)),
            counters_map_id: 1,
            flows_map_id: 2,
            syns_map_id: 5,
            closing_map_id: 6,
            sockhash_map_id: 3,
            socks_map_id: 4,
        };
        lock.write(&rec).unwrap();
        match InstanceLock::acquire(1, "eth9") {
            Err(Error::AlreadyRunning { pid, .. }) => assert_eq!(pid, 42),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("second lock granted"),
        }
        assert_eq!(live_records(), vec![rec]);
        // Another interface or namespace is another instance.
        let (other, _) = InstanceLock::acquire(2, "eth9").unwrap();
        drop(other);
        drop(lock);
        assert!(!record_path(dir.path(), 1, "eth9").exists());
    }
}
