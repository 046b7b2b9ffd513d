//! The node agent under test: a `tproxy agent` process with private paths
//! in a temp dir (socket, targets.d, state under TPROXY_RUN_DIR, a bpffs
//! mounted there), never the defaults; whatever it leaves is cleaned up on
//! drop. And a private mount namespace, for tests of what the agent mounts.
use std::{
    ffi::OsStr,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use tproxy::api::{self, Request, Response, TargetSpec};
use tproxy_lab::{Logged, Proc};

use super::{BIN, STARTUP};

/// A private bpffs mount, unmounted on drop (which also drops any pin
/// left in it: links detach, maps go).
pub struct Bpffs {
    pub path: PathBuf,
}

impl Bpffs {
    pub fn mount(path: PathBuf) -> Bpffs {
        std::fs::create_dir_all(&path).unwrap();
        tproxy_lab::run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&path)).unwrap();
        Bpffs { path }
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

/// The agent's private world and the agent process (if running).
pub struct Agent {
    pub proc: Option<Logged>,
    // Unmounted after the process is gone and cleanup ran.
    pub bpffs: Bpffs,
    pub dir: tempfile::TempDir,
    pub extra: Vec<String>,
}

impl Agent {
    pub fn new(extra: &[&str]) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let bpffs = Bpffs::mount(dir.path().join("bpffs"));
        std::fs::create_dir_all(dir.path().join("targets.d")).unwrap();
        let mut a = Agent {
            proc: None,
            bpffs,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        a.start();
        a
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    pub fn targets_dir(&self) -> PathBuf {
        self.dir.path().join("targets.d")
    }

    pub fn pins(&self) -> PathBuf {
        self.bpffs.path.join("tproxy")
    }

    pub fn state_file(&self) -> PathBuf {
        self.dir.path().join("run/agent/agent.json")
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("TPROXY_RUN_DIR", self.dir.path().join("run"))
            .env("TPROXY_LOG", "debug");
        cmd
    }

    pub fn start(&mut self) {
        assert!(self.proc.is_none());
        let (sock, td, pins) = (self.socket(), self.targets_dir(), self.pins());
        let mut cmd = self.command(&["agent"]);
        cmd.arg("--socket")
            .arg(sock)
            .arg("--targets-dir")
            .arg(td)
            .arg("--bpffs")
            .arg(pins)
            .args(&self.extra);
        let mut p = Logged::spawn("tproxy-agent", &mut cmd).unwrap();
        p.wait_for("agent serving", STARTUP).unwrap();
        self.proc = Some(p);
    }

    pub fn pid(&self) -> i32 {
        self.proc.as_ref().unwrap().proc.pid()
    }

    pub fn call(&self, req: &Request) -> Response {
        api::call(&self.socket(), req, Duration::from_secs(60)).unwrap()
    }

    pub fn add(&self, id: &str, spec: &TargetSpec) {
        let r = self.call(&Request::Add {
            id: id.into(),
            target: spec.clone(),
        });
        assert!(r.ok, "add {id}: {r:?}");
    }

    pub fn del(&self, id: &str) {
        let r = self.call(&Request::Del { id: id.into() });
        assert!(r.ok, "del {id}: {r:?}");
    }

    pub fn ids(&self) -> Vec<String> {
        let r = self.call(&Request::List);
        r.targets.unwrap().into_iter().map(|t| t.id).collect()
    }

    /// SIGTERM: exits leaving the targets attached.
    pub fn terminate(&mut self) -> String {
        let (st, log) = self.proc.take().unwrap().terminate().unwrap();
        assert!(st.success(), "agent exit {st}: {log}");
        log
    }

    pub fn kill9(&mut self) -> String {
        self.proc.take().unwrap().kill9().unwrap()
    }

    /// `tproxy cleanup` with this agent's run dir.
    pub fn cleanup(&self) -> String {
        let out = self.command(&["cleanup"]).output().unwrap();
        let s = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "cleanup: {s}");
        s
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(p) = self.proc.take() {
            let _ = p.kill9();
        }
        // Whatever the test left: filters and routing in the pods' (still
        // existing) namespaces, pins, state.
        let _ = self.command(&["cleanup"]).output();
    }
}

/// A private mount namespace, held by a `sleep` we start (and stop on
/// drop): what is mounted in it never reaches the host, and goes with it
/// (a bpffs with pins too: their links detach, their maps go).
pub struct MountNs {
    holder: Proc,
}

impl MountNs {
    pub fn new() -> MountNs {
        let holder = Proc::spawn(
            "unshare",
            Command::new("unshare").args([
                "--mount",
                "--propagation",
                "private",
                "sleep",
                "infinity",
            ]),
        )
        .unwrap();
        let ours = std::fs::read_link("/proc/self/ns/mnt").unwrap();
        let theirs = format!("/proc/{}/ns/mnt", holder.pid());
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_link(&theirs).is_ok_and(|ns| ns == ours) {
            assert!(Instant::now() < deadline, "unshare made no mount namespace");
            std::thread::sleep(Duration::from_millis(10));
        }
        MountNs { holder }
    }

    /// `program` in the namespace (nsenter execs it: the pid is its own).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--mount=/proc/{}/ns/mnt", self.holder.pid()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// The namespace's mounts, as its /proc/self/mountinfo lists them.
    pub fn mountinfo(&self) -> Vec<String> {
        std::fs::read_to_string(format!("/proc/{}/mountinfo", self.holder.pid()))
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    /// The mounts at or below `dir`: what a test there can change. Other
    /// tests of the binary add and remove mounts (network namespaces) at
    /// the same time, which a private mount namespace may still show.
    pub fn mountinfo_under(&self, dir: &std::path::Path) -> Vec<String> {
        let dir = dir.to_string_lossy().into_owned();
        self.mountinfo()
            .into_iter()
            .filter(|l| {
                l.split(' ')
                    .nth(4)
                    .is_some_and(|m| m == dir || m.starts_with(&format!("{dir}/")))
            })
            .collect()
    }

    /// `path` exists as seen in the namespace (a mount may hide it).
    pub fn exists(&self, path: &std::path::Path) -> bool {
        self.command("test")
            .arg("-e")
            .arg(path)
            .status()
            .unwrap()
            .success()
    }
}
