//! `cargo xtask lab up|down|shell|status`: the three-namespace lab of
//! docs/design.md, kept up between commands for a person to play in.
//!
//! `up` builds the release binaries, creates the client, gateway and server
//! namespaces and the server's cgroup, and starts in the server namespace
//! (and cgroup): the app (`lab-app`, HTTP and echo) on 8000, an iperf3
//! server on 5201, a sockperf server on 11111, the proxy on 15006 (Envoy by
//! default: HTTP on 8000, tcp_proxy for the rest; `--proxy haproxy` or
//! `--proxy ours`), and `tproxy -i eth0 -ports 8000,5201,11111`. They run detached, logging to
//! /run/tproxy-lab/; `down` stops them by PID and removes everything, also
//! after an interrupted run.
use std::{
    fs,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::process::CommandExt as _,
    },
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::{Subcommand, ValueEnum};
use tproxy_lab::{Netns, Topology, envoy, topology};

pub const PREFIX: &str = "tproxy-lab";
/// Other labs the tasks bring up (demo, bench): `down` removes their
/// leftovers too, should a run have been killed.
const OTHER_PREFIXES: [&str; 2] = ["tproxy-demo", "tproxy-bench"];
const STATE: &str = "/run/tproxy-lab";
pub const PORTS: &str = "8000,5201,11111";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProxyKind {
    /// Envoy (PATH, else the one `cargo xtask setup` installed).
    Envoy,
    Haproxy,
    /// examples' origdst-proxy.
    Ours,
}

#[derive(Subcommand)]
pub enum LabCmd {
    /// Create the namespaces and start the app, iperf3, sockperf, the proxy and tproxy.
    Up {
        /// Only the namespaces and the cgroup; start nothing.
        #[arg(long)]
        bare: bool,
        #[arg(long, value_enum, default_value_t = ProxyKind::Envoy)]
        proxy: ProxyKind,
        /// tproxy's steering back-end: rewrite or tproxy.
        #[arg(long, default_value = "rewrite")]
        steer: String,
        /// Run tproxy without socket acceleration.
        #[arg(long)]
        no_accel: bool,
    },
    /// Stop everything `up` started and remove the namespaces and cgroup.
    Down,
    /// Open a shell in one namespace: client, gateway or server.
    Shell { ns: String },
    /// Show what exists and what runs.
    Status,
}

/// Starts `cmd` detached (own session, output to STATE/name.log) and
/// records its PID for `down`.
fn daemon(name: &str, mut cmd: Command) -> Result<u32> {
    let log = fs::File::create(Path::new(STATE).join(format!("{name}.log")))?;
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid(2) between fork and exec: async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
    let pid = child.id();
    // The child exists from fork on, so its start time does too; a child
    // that could not be recorded is not left running.
    let Some(start) = start_time(pid as i32) else {
        let _ = child.kill();
        let _ = child.wait();
        bail!("{name}: /proc/{pid}/stat unreadable, so its record could not be made");
    };
    let mut pids = fs::read_to_string(Path::new(STATE).join("pids")).unwrap_or_default();
    pids.push_str(&format!("{name} {pid} {start}\n"));
    fs::write(Path::new(STATE).join("pids"), pids)?;
    Ok(pid)
}

/// What `daemon` recorded: name, PID and the process's start time (none
/// in a record an older build wrote).
fn recorded() -> Vec<(String, i32, Option<u64>)> {
    parse_records(&fs::read_to_string(Path::new(STATE).join("pids")).unwrap_or_default())
}

fn parse_records(text: &str) -> Vec<(String, i32, Option<u64>)> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let name = f.next()?.to_string();
            let pid = f.next()?.parse().ok()?;
            Some((name, pid, f.next().and_then(|t| t.parse().ok())))
        })
        .collect()
}

/// When `pid` started (field 22 of /proc/PID/stat, clock ticks since
/// boot). With the PID it names one process for good: a PID alone may
/// belong to another process by the time the lab goes down (a daemon that
/// died, or that an experiment stopped; pid_max is 32768 on some hosts).
fn start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name, which may hold spaces and parentheses.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// A pidfd on the recorded process if it still runs: opened first, then
/// checked against the recorded start time, so it refers to that process
/// and no other for as long as it is held, even if the PID is reused.
fn open_recorded(pid: i32, start: u64) -> Option<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a PID and flags and returns a new fd.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        // ESRCH: it is gone. Anything else (no pidfd_open before Linux
        // 5.3, a seccomp filter) must not pass for "gone" in silence.
        if e.raw_os_error() != Some(libc::ESRCH) {
            eprintln!("pid {pid}: pidfd_open: {e}; not signalled");
        }
        return None;
    }
    // SAFETY: a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    (start_time(pid) == Some(start)).then_some(fd)
}

/// pidfd_send_signal(2); signal 0 only asks whether the process still runs.
fn signal(pidfd: &OwnedFd, sig: i32) -> bool {
    // SAFETY: a pidfd we hold, no siginfo, no flags.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        ) == 0
    }
}

/// Stops what `up` started, tproxy first (a second SIGTERM skips its drain).
fn stop_daemons() {
    let mut procs = recorded();
    procs.sort_by_key(|(n, _, _)| n != "tproxy");
    for (name, pid, start) in procs {
        let Some(start) = start else {
            // Its PID may be another process's by now. The lab's cgroup is
            // emptied and removed after this, which stops the services;
            // tproxy runs outside it.
            println!(
                "{name} (pid {pid}): recorded without its start time (an older build's lab), so \
                 not signalled; the services go with the lab's cgroup, but a tproxy that still \
                 runs must be stopped by hand"
            );
            continue;
        };
        let Some(pidfd) = open_recorded(pid, start) else {
            continue;
        };
        for sig in [libc::SIGTERM, libc::SIGTERM, libc::SIGKILL] {
            signal(&pidfd, sig);
            let deadline = Instant::now() + Duration::from_secs(3);
            while signal(&pidfd, 0) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if !signal(&pidfd, 0) {
                break;
            }
        }
        println!("stopped {name} (pid {pid})");
    }
    let _ = fs::remove_dir_all(STATE);
}

/// Runtime records a killed tproxy left in /run/tproxy for a lab
/// namespace (their lock is free): the namespace goes, so do they.
fn remove_stale_records() -> Vec<String> {
    use std::os::unix::fs::MetadataExt as _;
    let mut inodes = Vec::new();
    for p in std::iter::once(PREFIX).chain(OTHER_PREFIXES) {
        for part in ["client", "gateway", "server"] {
            if let Ok(m) = fs::metadata(format!("/run/netns/{p}-{part}")) {
                inodes.push(m.ino());
            }
        }
    }
    let mut removed = Vec::new();
    let Ok(dir) = fs::read_dir("/run/tproxy") else {
        return removed;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = name
            .split('-')
            .next()
            .and_then(|i| i.parse::<u64>().ok())
            .is_some_and(|i| inodes.contains(&i));
        let Ok(f) = fs::File::open(e.path()) else {
            continue;
        };
        // SAFETY: flock on an fd we own; a free lock means a dead owner.
        let free = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        if ours && free && fs::remove_file(e.path()).is_ok() {
            removed.push(format!("stale record /run/tproxy/{name}"));
        }
    }
    let _ = fs::remove_dir("/run/tproxy"); // only if empty
    removed
}

fn up(proxy: ProxyKind, steer: &str, no_accel: bool) -> Result<()> {
    if !matches!(steer, "rewrite" | "tproxy") {
        bail!("--steer is rewrite or tproxy");
    }
    let release = crate::build_release()?;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = |n: &str| release.join(n);
    fs::create_dir_all(STATE)?;
    let transparent = steer == "tproxy";
    let mut t = Topology::up(PREFIX)?;
    t.check_reachability()?;
    t.keep();
    let cg = Some(&t.cgroup);
    let srv = &t.server;

    let mut app = srv.command_in(bin("lab-app"), cg);
    app.arg("8000");
    daemon("lab-app", app)?;
    let mut ip = srv.command_in("iperf3", cg);
    ip.args(["-s", "-p", "5201"]);
    daemon("iperf3", ip)?;
    let mut sp = srv.command_in("sockperf", cg);
    sp.args(["sr", "--tcp", "-i", "0.0.0.0", "-p", "11111"]);
    daemon("sockperf", sp)?;

    let pcmd = match proxy {
        ProxyKind::Envoy => envoy::command(
            srv,
            cg,
            &envoy::example_config(transparent),
            &envoy::Opts::default(),
        )?,
        ProxyKind::Haproxy => {
            let cfg = if transparent {
                "haproxy-transparent.cfg"
            } else {
                "haproxy.cfg"
            };
            let mut c = srv.command_in("haproxy", cg);
            c.arg("-db")
                .arg("-f")
                .arg(repo.join("examples/haproxy").join(cfg));
            c
        }
        _ => {
            let mut c = srv.command_in(bin("origdst-proxy"), cg);
            if transparent {
                c.arg("--transparent");
            }
            c
        }
    };
    daemon(&format!("{proxy:?}").to_lowercase(), pcmd)?;
    if proxy == ProxyKind::Envoy {
        envoy::wait_ready(srv, 15006, Duration::from_secs(20)).with_context(|| {
            format!(
                "its output:\n{}",
                fs::read_to_string(Path::new(STATE).join("envoy.log")).unwrap_or_default()
            )
        })?;
    }
    for port in [8000, 5201, 11111, 15006] {
        srv.wait_listening(port, Duration::from_secs(10))?;
    }

    let cgroup = t.cgroup.path().display().to_string();
    let mut tp = srv.command(bin("tproxy"));
    tp.args([
        "-i", "eth0", "-ports", PORTS, "--cgroup", &cgroup, "--steer", steer,
    ]);
    if no_accel {
        tp.arg("--no-accel");
    }
    daemon("tproxy", tp)?;
    std::thread::sleep(Duration::from_millis(500));
    println!(
        "lab up: client {} / {} -> gateway -> server {} / {}",
        topology::CLIENT_IP,
        topology::CLIENT_IP6,
        topology::SERVER_IP,
        topology::SERVER_IP6
    );
    println!(
        "server runs (cgroup {cgroup}): lab-app :8000, iperf3 :5201, sockperf :11111, {proxy:?} :15006, tproxy -i eth0 -ports {PORTS} --steer {steer}{}",
        if no_accel { " --no-accel" } else { "" }
    );
    println!("logs in {STATE}/; try:");
    println!(
        "  cargo xtask lab shell client     then: curl http://{}:8000/",
        topology::SERVER_IP
    );
    println!(
        "  ip netns exec {PREFIX}-client iperf3 -c {} -p 5201",
        topology::SERVER_IP
    );
    println!(
        "  ip netns exec {PREFIX}-client sockperf pp --tcp -i {} -p 11111",
        topology::SERVER_IP
    );
    println!("  ip netns exec {PREFIX}-server target/release/tproxy stats");
    if proxy == ProxyKind::Envoy {
        println!(
            "  Envoy's access log: {STATE}/envoy.log; its admin: ip netns exec {PREFIX}-server curl -s 127.0.0.1:15000/stats"
        );
    }
    Ok(())
}

pub fn run(cmd: LabCmd) -> Result<()> {
    match cmd {
        LabCmd::Up {
            bare,
            proxy,
            steer,
            no_accel,
        } => {
            stop_daemons();
            Topology::down(PREFIX);
            if bare {
                let mut t = Topology::up(PREFIX)?;
                t.check_reachability()?;
                t.keep();
                println!(
                    "lab up (bare): namespaces {PREFIX}-client/-gateway/-server, cgroup {}",
                    t.cgroup.path().display()
                );
                return Ok(());
            }
            let r = up(proxy, &steer, no_accel);
            if r.is_err() {
                // All or nothing: an interrupted `up` leaves nothing behind.
                stop_daemons();
                Topology::down(PREFIX);
            }
            r
        }
        LabCmd::Down => {
            stop_daemons();
            let stale = remove_stale_records();
            let mut removed = Topology::down(PREFIX);
            removed.extend(stale);
            for p in OTHER_PREFIXES {
                removed.extend(Topology::down(p));
            }
            if removed.is_empty() {
                println!("lab down: nothing to remove");
            } else {
                println!("lab down: removed {}", removed.join(", "));
            }
            Ok(())
        }
        LabCmd::Shell { ns } => {
            let name = format!("{PREFIX}-{ns}");
            let Some(mut netns) = Netns::adopt(&name) else {
                bail!("no namespace {name}: run `cargo xtask lab up` first");
            };
            netns.keep();
            let shell = std::env::var("SHELL").unwrap_or_else(|_| "/bin/bash".into());
            let err = netns
                .command(&shell)
                .env("PS1", format!("[{ns}] \\w# "))
                .exec();
            bail!("exec {shell}: {err}")
        }
        LabCmd::Status => {
            let out = Command::new("ip").args(["netns", "list"]).output()?;
            let ns = String::from_utf8_lossy(&out.stdout);
            let ours: Vec<&str> = ns.lines().filter(|l| l.starts_with(PREFIX)).collect();
            println!(
                "namespaces: {}",
                if ours.is_empty() {
                    "none".into()
                } else {
                    ours.join(", ")
                }
            );
            for (name, pid, start) in recorded() {
                println!(
                    "  {name:<10} pid {pid:<7} {}",
                    if start.and_then(|t| open_recorded(pid, t)).is_some() {
                        "running"
                    } else {
                        "gone"
                    }
                );
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    /// A record names one process: its PID with another start time (as
    /// after the PID is reused) is not it, and once it has exited and been
    /// reaped nothing answers to the record.
    #[test]
    fn a_record_names_its_process_and_no_other() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id() as i32;
        let start = start_time(pid).unwrap();
        let fd = open_recorded(pid, start).expect("the recorded process runs");
        assert!(signal(&fd, 0));
        assert!(open_recorded(pid, start + 1).is_none());
        assert!(signal(&fd, libc::SIGTERM));
        child.wait().unwrap();
        assert!(
            !signal(&fd, 0),
            "the pidfd still reaches a process that exited"
        );
        assert!(open_recorded(pid, start).is_none());
    }

    #[test]
    fn records_without_a_start_time_are_read_as_such() {
        assert_eq!(
            parse_records("envoy 12 345\ntproxy 13\n"),
            [("envoy".into(), 12, Some(345)), ("tproxy".into(), 13, None)]
        );
    }
}
