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

/// A running `tproxy` with its log captured line by line.
pub struct Tproxy {
    pub proc: Proc,
    log: Arc<Mutex<Vec<String>>>,
    lines: mpsc::Receiver<String>,
}

impl Tproxy {
    /// Starts `bin ARGS…` in `ns` (and `cgroup`, if given); does not wait.
    pub fn spawn(bin: &str, ns: &Netns, cgroup: Option<&Cgroup>, args: &[&str]) -> Result<Tproxy> {
        let mut cmd = ns.command_in(bin, cgroup);
        cmd.args(args)
            .env("TPROXY_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut proc = Proc::spawn("tproxy", &mut cmd)?;
        let stderr = proc.child.as_mut().unwrap().stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log2.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        Ok(Tproxy { proc, log, lines })
    }

    /// Starts tproxy and waits until it says it is serving.
    pub fn start(bin: &str, ns: &Netns, cgroup: Option<&Cgroup>, args: &[&str]) -> Result<Tproxy> {
        let mut t = Tproxy::spawn(bin, ns, cgroup, args)?;
        t.wait_for("serving", Duration::from_secs(20))?;
        Ok(t)
    }

    /// Waits for a log line containing `needle`.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(_) => {}
                Err(_) => bail!(
                    "tproxy did not log {needle:?} within {timeout:?}; log:\n{}",
                    self.log()
                ),
            }
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// SIGTERM and wait for exit.
    pub fn terminate(mut self) -> Result<(ExitStatus, String)> {
        self.proc.signal(libc::SIGTERM);
        let st = self.proc.wait_timeout(Duration::from_secs(60))?;
        // Let the reader thread drain the pipe.
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
