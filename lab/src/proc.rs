//! Processes the lab starts: ended by PID on drop.
use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{Cgroup, Netns};

/// A child process, killed (SIGTERM, then SIGKILL) and reaped on drop.
pub struct Proc {
    name: String,
    child: Option<Child>,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Proc> {
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Proc {
            name: name.into(),
            child: Some(child),
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child's pid (not yet reaped).
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().context("already reaped")?;
        loop {
            if let Some(st) = child.try_wait()? {
                self.child = None;
                return Ok(st);
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.signal(libc::SIGTERM);
            if self.wait_timeout(Duration::from_secs(3)).is_err() {
                self.signal(libc::SIGKILL);
                let _ = self.wait_timeout(Duration::from_secs(3));
            }
        }
    }
}

/// A running process with its stdout and stderr captured line by line.
pub struct Logged {
    pub proc: Proc,
    log: Arc<Mutex<Vec<String>>>,
    lines: mpsc::Receiver<String>,
}

/// A running `tproxy` (started with [`Logged::start_tproxy`]).
pub type Tproxy = Logged;

impl Logged {
    /// Starts `cmd`; its output is captured (stdin is closed).
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Logged> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut proc = Proc::spawn(name, cmd)?;
        let child = proc.child.as_mut().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = mpsc::channel();
        let readers: Vec<Box<dyn std::io::Read + Send>> = vec![
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ];
        for r in readers {
            let (log, tx) = (log.clone(), tx.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(r).lines().map_while(Result::ok) {
                    log.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        Ok(Logged { proc, log, lines })
    }

    /// Starts `bin ARGS…` as tproxy in `ns` (and `cgroup`, if given),
    /// with debug logging; does not wait.
    pub fn spawn_tproxy(
        bin: &str,
        ns: &Netns,
        cgroup: Option<&Cgroup>,
        args: &[&str],
    ) -> Result<Logged> {
        let mut cmd = ns.command_in(bin, cgroup);
        cmd.args(args).env("TPROXY_LOG", "debug");
        Logged::spawn("tproxy", &mut cmd)
    }

    /// Starts tproxy and waits until it says it is serving.
    pub fn start(bin: &str, ns: &Netns, cgroup: Option<&Cgroup>, args: &[&str]) -> Result<Logged> {
        let mut t = Logged::spawn_tproxy(bin, ns, cgroup, args)?;
        t.wait_for("serving", Duration::from_secs(20))?;
        Ok(t)
    }

    /// Waits for an output line containing `needle`.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(_) => {}
                Err(_) => bail!(
                    "no output line with {needle:?} within {timeout:?}; output:\n{}",
                    self.log()
                ),
            }
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// SIGTERM and wait for exit.
    pub fn terminate(mut self) -> Result<(ExitStatus, String)> {
        self.proc.signal(libc::SIGTERM);
        let st = self.proc.wait_timeout(Duration::from_secs(60))?;
        // Let the reader threads drain the pipes.
        std::thread::sleep(Duration::from_millis(50));
        Ok((st, self.log()))
    }

    /// SIGKILL and wait: no cleanup runs.
    pub fn kill9(mut self) -> Result<String> {
        self.proc.signal(libc::SIGKILL);
        self.proc.wait_timeout(Duration::from_secs(10))?;
        Ok(self.log())
    }
}

/// A program built next to `sibling` (e.g. `lab-app` and `origdst-proxy`
/// from tproxy-examples, next to the `tproxy` binary); built on demand.
pub fn sibling_bin(name: &str, sibling: &std::path::Path) -> Result<std::path::PathBuf> {
    let path = sibling.with_file_name(name);
    if !path.exists() {
        let release = sibling.components().any(|c| c.as_os_str() == "release");
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(["build", "-q", "-p", "tproxy-examples"]);
        if release {
            cmd.arg("--release");
        }
        crate::run(&mut cmd)?;
    }
    Ok(path)
}
