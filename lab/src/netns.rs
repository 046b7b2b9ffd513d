//! A named network namespace (`ip netns add`), deleted on drop.
use std::{
    fs::File,
    os::{fd::AsFd as _, unix::process::CommandExt as _},
    path::PathBuf,
    process::Command,
};

use anyhow::{Context as _, Result};
use nix::sched::{CloneFlags, setns};

use crate::{Cgroup, run};

pub struct Netns {
    name: String,
    keep: bool,
}

impl Netns {
    /// Creates the namespace with its loopback up. A namespace of the same
    /// name left by an interrupted run is removed first.
    pub fn create(name: &str) -> Result<Netns> {
        if Netns::exists(name) {
            let _ = run(Command::new("ip").args(["netns", "del", name]));
        }
        run(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Netns {
            name: name.into(),
            keep: false,
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Adopts an existing namespace (the lab's `down` after an `up`).
    pub fn adopt(name: &str) -> Option<Netns> {
        Netns::exists(name).then(|| Netns {
            name: name.into(),
            keep: false,
        })
    }

    pub fn exists(name: &str) -> bool {
        Netns::path_of(name).exists()
    }

    fn path_of(name: &str) -> PathBuf {
        PathBuf::from("/run/netns").join(name)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        Netns::path_of(&self.name)
    }

    /// Leaves the namespace in place when dropped (the lab's `up`).
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// `ip -n NAME ARGS…`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// `ip netns exec`-free: the child enters the namespace with setns(2)
    /// before exec, so it keeps the host's /sys (cgroup and bpffs mounts),
    /// which `ip netns exec` would hide.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.command_in(program, None)
    }

    /// As `command`, and the child joins `cgroup` before exec.
    pub fn command_in(
        &self,
        program: impl AsRef<std::ffi::OsStr>,
        cgroup: Option<&Cgroup>,
    ) -> Command {
        let mut cmd = Command::new(program);
        let ns_path = self.path();
        let procs = cgroup.map(|c| c.path().join("cgroup.procs"));
        // SAFETY: only async-signal-safe work between fork and exec: open,
        // setns, write.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(procs) = &procs {
                    std::fs::write(procs, b"0")?;
                }
                let f = File::open(&ns_path)?;
                setns(f.as_fd(), CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
                Ok(())
            });
        }
        cmd
    }

    /// Runs `f` on a thread of this process that has entered the namespace
    /// (setns affects only the calling thread): sockets it opens live there.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        std::thread::scope(|s| {
            s.spawn(move || {
                let ns = File::open(&path).expect("open netns");
                setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }

    /// Waits until something in the namespace listens on TCP `port`.
    pub fn wait_listening(&self, port: u16, timeout: std::time::Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let out = self.exec("ss", &["-Hltn", &format!("sport = :{port}")])?;
            if !out.trim().is_empty() {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                anyhow::bail!(
                    "nothing listens on {port} in netns {} after {timeout:?}",
                    self.name
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Runs a command in the namespace to completion.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        run(self.command(program).args(args)).with_context(|| format!("in netns {}", self.name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.keep {
            let _ = run(Command::new("ip").args(["netns", "del", &self.name]));
        }
    }
}
