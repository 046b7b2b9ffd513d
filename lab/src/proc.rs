//! Processes the lab starts: ended by PID on drop.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
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

    /// Stops the process (SIGSTOP) and returns once every thread of it is
    /// stopped (`T` in /proc), so nothing it does can happen after this:
    /// for tests that make a reader stop reading at a chosen moment.
    pub fn pause(&self) -> Result<()> {
        self.signal(libc::SIGSTOP);
        let pid = self.pid();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if all_threads_stopped(pid)? {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} (pid {pid}) did not stop within 60 s", self.name);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Lets a process stopped with [`Proc::pause`] run on (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }
}

/// Whether every thread of `pid` is stopped (state `T` or `t`).
fn all_threads_stopped(pid: i32) -> Result<bool> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("listing the threads of {pid}"))?;
    for t in tasks {
        let stat = std::fs::read_to_string(t?.path().join("stat")).unwrap_or_default();
        // pid (comm) S …: the state follows the last ')'.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.trim_start().chars().next());
        if !matches!(state, Some('T' | 't') | None) {
            return Ok(false);
        }
    }
    Ok(true)
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.signal(libc::SIGTERM);
            // A paused process handles the SIGTERM once it runs again.
            self.signal(libc::SIGCONT);
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
    /// Reader threads still reading (they end at the pipes' EOF).
    reading: Arc<AtomicUsize>,
    /// The process's stdin, if it was spawned with [`Logged::spawn_with_stdin`].
    stdin: Option<ChildStdin>,
}

/// A running `tproxy` (started with [`Logged::start_tproxy`]).
pub type Tproxy = Logged;

impl Logged {
    /// Starts `cmd`; its output is captured (stdin is closed).
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Logged> {
        Logged::spawn_io(name, cmd, false)
    }

    /// As [`Logged::spawn`], with a pipe to the process's stdin
    /// ([`Logged::send_line`]): for programs a test drives step by step.
    pub fn spawn_with_stdin(name: &str, cmd: &mut Command) -> Result<Logged> {
        Logged::spawn_io(name, cmd, true)
    }

    fn spawn_io(name: &str, cmd: &mut Command, stdin: bool) -> Result<Logged> {
        cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut proc = Proc::spawn(name, cmd)?;
        let child = proc.child.as_mut().unwrap();
        let stdin = child.stdin.take();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = mpsc::channel();
        let readers: Vec<Box<dyn std::io::Read + Send>> = vec![
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ];
        let reading = Arc::new(AtomicUsize::new(readers.len()));
        for r in readers {
            let (log, tx, reading) = (log.clone(), tx.clone(), reading.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(r).lines().map_while(Result::ok) {
                    log.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
                reading.fetch_sub(1, Ordering::SeqCst);
            });
        }
        Ok(Logged {
            proc,
            log,
            lines,
            reading,
            stdin,
        })
    }

    /// Writes `line` and a newline to the process's stdin.
    pub fn send_line(&mut self, line: &str) -> Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .context("spawned without a stdin pipe (Logged::spawn_with_stdin)")?;
        stdin.write_all(format!("{line}\n").as_bytes())?;
        stdin.flush()?;
        Ok(())
    }

    /// Waits until the reader threads have read the process's output to
    /// its end (the pipes close when the process and whatever inherited
    /// them exit), for at most `timeout`: after this, [`Logged::log`] holds
    /// every line (a sleep only made that likely). Whether they got there.
    pub fn drained(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.reading.load(Ordering::SeqCst) > 0 {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Waits up to `timeout` for the process to exit, then for its output
    /// to be read to the end (10 s more at most: a child that inherited
    /// the pipes may hold them open).
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let st = self.proc.wait_timeout(timeout)?;
        self.drained(Duration::from_secs(10));
        Ok(st)
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
        // Generous: loading and verifying the programs takes longer on a
        // busy machine, and this returns as soon as it serves.
        t.wait_for("serving", Duration::from_secs(120))?;
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
        let st = self.wait_timeout(Duration::from_secs(120))?;
        Ok((st, self.log()))
    }

    /// SIGKILL and wait: no cleanup runs.
    pub fn kill9(mut self) -> Result<String> {
        self.proc.signal(libc::SIGKILL);
        self.wait_timeout(Duration::from_secs(30))?;
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
