//! A child cgroup v2 directory, removed on drop after ending the processes
//! this lab put in it.
use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

pub struct Cgroup {
    path: PathBuf,
    keep: bool,
}

/// The cgroup v2 mount: /sys/fs/cgroup/unified on hybrid hosts.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<_> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .context("no cgroup2 mount in /proc/self/mounts")
}

impl Cgroup {
    /// Creates `<cgroup2 root>/<name>` (re-created if an interrupted run left it).
    pub fn create(name: &str) -> Result<Cgroup> {
        let path = cgroup2_root()?.join(name);
        if path.exists() {
            Cgroup {
                path: path.clone(),
                keep: false,
            }
            .remove()?;
        }
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Cgroup { path, keep: false })
    }

    pub fn adopt(name: &str) -> Option<Cgroup> {
        let path = cgroup2_root().ok()?.join(name);
        path.is_dir().then_some(Cgroup { path, keep: false })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn keep(&mut self) {
        self.keep = true;
    }

    pub fn pids(&self) -> Vec<i32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Ends the processes in the cgroup (all started by this lab into it),
    /// then removes the directory.
    fn remove(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut sig = libc::SIGTERM;
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                bail!("processes {pids:?} will not leave {}", self.path.display());
            }
            for pid in pids {
                // SAFETY: plain kill(2) on a pid read from our own cgroup.
                unsafe { libc::kill(pid, sig) };
            }
            std::thread::sleep(Duration::from_millis(100));
            sig = libc::SIGKILL;
        }
        // rmdir can race with the last exit being accounted: retry briefly.
        for _ in 0..50 {
            match fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        fs::remove_dir(&self.path).with_context(|| format!("removing {}", self.path.display()))
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if !self.keep
            && let Err(e) = self.remove()
        {
            eprintln!("lab: {e:#}");
        }
    }
}
