//! `cargo xtask demo`: the README's main job. Brings up the three-namespace
//! lab, runs `tproxy -i eth0 -ports 8000` in the server namespace with a
//! child cgroup, shows what is attached, stops it, tears the lab down, and
//! checks the host is as it was.
use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use tproxy_lab::{Topology, Tproxy, kernel, topology};

use crate::sh;

const PREFIX: &str = "tproxy-demo";

fn step(msg: &str) {
    println!("\n==> {msg}");
}

/// What the demo could leave on the host: namespaces, cgroups, runtime
/// records, loaded programs of ours.
fn host_snapshot() -> Result<String> {
    let ns = String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output()?.stdout)
        .into_owned();
    let cg_root = tproxy_lab::cgroup::cgroup2_root()?;
    let mut cgs: Vec<String> = std::fs::read_dir(&cg_root)?
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    cgs.sort();
    let run = std::fs::read_dir("/run/tproxy")
        .map(|d| d.flatten().count())
        .unwrap_or(0);
    let progs: Vec<String> = kernel::programs()?
        .into_iter()
        .filter(|p| p.name.starts_with("tproxy_"))
        .map(|p| format!("{}:{}", p.id, p.name))
        .collect();
    Ok(format!(
        "netns: {ns}\ncgroups: {cgs:?}\n/run/tproxy entries: {run}\ntproxy programs: {progs:?}"
    ))
}

fn tproxy_bin() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("release/tproxy")
}

pub fn run() -> Result<()> {
    step("building tproxy (release; the eBPF object is embedded in the binary)");
    let t0 = Instant::now();
    sh(Command::new("cargo").args(["build", "--release", "-p", "tproxy-cli"]))?;
    let bin = tproxy_bin();
    let size = std::fs::metadata(&bin).context("release binary")?.len();
    println!(
        "built {} ({:.1} MiB) in {:.0} s",
        bin.display(),
        size as f64 / 1048576.0,
        t0.elapsed().as_secs_f64()
    );
    let bin = bin.to_string_lossy().into_owned();

    let before = host_snapshot()?;
    let result = run_lab(&bin);
    // The lab's guards have dropped by now, on success and on error alike.
    let after = host_snapshot()?;
    step("host state after the demo");
    if before != after {
        bail!("the demo left something behind:\nbefore:\n{before}\nafter:\n{after}");
    }
    println!("same as before the demo: no namespaces, cgroups, records or programs left");
    result
}

fn run_lab(bin: &str) -> Result<()> {
    step("bringing up the lab: client -- gateway -- server (three network namespaces)");
    let lab = Topology::up(PREFIX)?;
    lab.check_reachability()?;
    println!(
        "client {} / {}  ->  gateway  ->  server eth0 {} / {}",
        topology::CLIENT_IP,
        topology::CLIENT_IP6,
        topology::SERVER_IP,
        topology::SERVER_IP6
    );
    println!(
        "server processes run in cgroup {}",
        lab.cgroup.path().display()
    );

    step("sudo tproxy -i eth0 -ports 8000   (in the server namespace)");
    let cg = lab.cgroup.path().display().to_string();
    let tp = Tproxy::start(
        bin,
        &lab.server,
        None,
        &["-i", "eth0", "-ports", "8000", "--cgroup", &cg],
    )?;
    for line in tp.log().lines() {
        println!("  | {line}");
    }

    step("what the kernel has attached");
    println!("cgroup {}:", cg);
    for (hook, name) in kernel::cgroup_programs(lab.cgroup.path())? {
        println!("  {hook:<20} {name}");
    }
    let progs = kernel::programs()?;
    for l in kernel::links()? {
        let pid = l["prog_id"].as_u64().unwrap_or(0);
        if let Some(p) = progs
            .iter()
            .find(|p| p.id == pid && p.name.starts_with("tproxy_"))
        {
            let kind = match l["type"].as_u64() {
                Some(11) => "tcx".to_string(),
                _ => l["type"].to_string().trim_matches('"').to_string(),
            };
            println!("  link {:<5} {kind:<8} prog {}", l["id"], p.name);
        }
    }

    step("traffic from the client reaches the server's eth0 (tc counters move)");
    sh(lab
        .client
        .command("ping")
        .args(["-c", "3", "-i", "0.2", "-q", topology::SERVER_IP]))?;
    sh(lab.server.command(bin).args(["stats", "-i", "eth0"]))?;

    step("SIGTERM: tproxy detaches everything");
    let (status, log) = tp.terminate()?;
    for line in log
        .lines()
        .filter(|l| l.contains("SIGTERM") || l.contains("detached") || l.contains("counters"))
    {
        println!("  | {line}");
    }
    if !status.success() {
        bail!("tproxy exited with {status}");
    }
    std::thread::sleep(Duration::from_millis(200));
    let left = kernel::cgroup_programs(lab.cgroup.path())?;
    if !left.is_empty() {
        bail!("programs still attached to the cgroup: {left:?}");
    }
    println!("cgroup {cg}: nothing attached");

    step("tearing down the lab");
    drop(lab);
    Ok(())
}
