//! `cargo xtask demo`: the README's main job. Brings up the three-namespace
//! lab; in the server namespace (and a child cgroup) starts the app on 8000,
//! the proxy on 15006 (Envoy, as the reference lab; `--proxy haproxy` for
//! HAProxy) and `tproxy -i eth0 -ports 8000`; sends requests from the
//! client namespace and shows the evidence (the app's answer, the proxy's
//! log line with the original destination it read for each request,
//! tproxy's counters); stops tproxy, tears the lab down and checks the
//! host is as it was.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::ValueEnum;
use tproxy_lab::{Logged, Topology, Tproxy, envoy, kernel, topology};

use crate::sh;

const PREFIX: &str = "tproxy-demo";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DemoProxy {
    /// Envoy (PATH, else the one `cargo xtask setup` installed).
    Envoy,
    Haproxy,
}

fn step(msg: &str) {
    println!("\n==> {msg}");
}

/// The demo's own namespaces and cgroup (other labs and tests may come
/// and go on the host meanwhile: only ours are compared).
fn host_snapshot() -> Result<String> {
    let ns: Vec<String> =
        String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output()?.stdout)
            .lines()
            .filter(|l| l.starts_with(PREFIX))
            .map(String::from)
            .collect();
    let cg_root = tproxy_lab::cgroup::cgroup2_root()?;
    let cgs: Vec<String> = std::fs::read_dir(&cg_root)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(PREFIX))
        .collect();
    Ok(format!("netns: {ns:?}, cgroups: {cgs:?}"))
}

/// What the demo's tproxy instance put in the kernel and /run: its runtime
/// record and its programs (all share its COUNTERS map).
struct Installed {
    record: PathBuf,
    programs: Vec<(u64, String)>,
}

impl Installed {
    fn read(server: &tproxy_lab::Netns) -> Result<Installed> {
        use std::os::unix::fs::MetadataExt as _;
        let inode = std::fs::metadata(server.path())?.ino();
        let record = PathBuf::from(format!("/run/tproxy/{inode}-eth0.json"));
        let v: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&record)
                .with_context(|| format!("tproxy's record {}", record.display()))?,
        )?;
        let map = v["counters_map_id"]
            .as_u64()
            .context("no counters_map_id in the record")?;
        let programs = kernel::programs_using_map(map)?
            .into_iter()
            .map(|p| (p.id, p.name))
            .collect();
        Ok(Installed { record, programs })
    }

    /// What of it is still there.
    fn left(&self) -> Result<Vec<String>> {
        let mut left = Vec::new();
        if self.record.exists() {
            left.push(self.record.display().to_string());
        }
        let loaded = kernel::programs()?;
        for (id, name) in &self.programs {
            if loaded.iter().any(|p| p.id == *id) {
                left.push(format!("program {id} {name}"));
            }
        }
        Ok(left)
    }
}

pub fn run(proxy: DemoProxy) -> Result<()> {
    step("building tproxy (release; the eBPF object is embedded in the binary)");
    let t0 = Instant::now();
    let bin = crate::build_release()?.join("tproxy");
    let size = std::fs::metadata(&bin).context("release binary")?.len();
    println!(
        "built {} ({:.1} MiB) in {:.0} s",
        bin.display(),
        size as f64 / 1048576.0,
        t0.elapsed().as_secs_f64()
    );
    let bin = bin.to_string_lossy().into_owned();

    let before = host_snapshot()?;
    let mut installed = None;
    let result = run_lab(&bin, proxy, &mut installed);
    // The lab's guards have dropped by now, on success and on error alike.
    let after = host_snapshot()?;
    step("host state after the demo");
    if before != after {
        if let Err(e) = &result {
            println!("the demo failed: {e:#}");
        }
        bail!("the demo left something behind:\nbefore: {before}\nafter:  {after}");
    }
    if let Some(installed) = &installed {
        let left = installed.left()?;
        if !left.is_empty() {
            bail!("tproxy left behind: {}", left.join(", "));
        }
        println!(
            "same as before the demo: no namespaces or cgroups of the demo, no record, none of tproxy's {} programs left",
            installed.programs.len()
        );
    }
    result
}

/// The proxy on 15006 in the server namespace and cgroup, up and serving.
fn start_proxy(lab: &Topology, proxy: DemoProxy) -> Result<(Logged, &'static str)> {
    match proxy {
        DemoProxy::Envoy => {
            let cfg = envoy::example_config(false);
            let p = envoy::start(
                &lab.server,
                Some(&lab.cgroup),
                &cfg,
                15006,
                &envoy::Opts::default(),
            )?;
            Ok((p, "envoy"))
        }
        DemoProxy::Haproxy => {
            let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            let cfg = repo.join("examples/haproxy/haproxy.cfg");
            let mut cmd = lab.server.command_in("haproxy", Some(&lab.cgroup));
            cmd.arg("-db").arg("-f").arg(cfg);
            let p = Logged::spawn("haproxy", &mut cmd)?;
            if let Err(e) = lab.server.wait_listening(15006, Duration::from_secs(10)) {
                bail!("haproxy did not come up ({e}); its output:\n{}", p.log());
            }
            Ok((p, "haproxy"))
        }
    }
}

fn run_lab(bin: &str, proxy_kind: DemoProxy, installed: &mut Option<Installed>) -> Result<()> {
    let examples = Path::new(bin).parent().context("binary folder")?;
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

    step("server: the app on 8000, the proxy on 15006");
    let mut app_cmd = lab
        .server
        .command_in(examples.join("lab-app"), Some(&lab.cgroup));
    app_cmd.arg("8000");
    let mut app = Logged::spawn("lab-app", &mut app_cmd)?;
    app.wait_for("listening", Duration::from_secs(10))?;
    let (proxy, proxy_name) = start_proxy(&lab, proxy_kind)?;
    match proxy_kind {
        DemoProxy::Envoy => println!(
            "app: lab-app on :8000; proxy: {} on :15006 (examples/envoy/envoy.yaml: original_dst listener filter, \
             http_connection_manager for :8000, ORIGINAL_DST cluster, upstream SO_MARK 0x539)",
            envoy::version(&envoy::require()?)?
        ),
        DemoProxy::Haproxy => println!(
            "app: lab-app on :8000; proxy: HAProxy on :15006 (examples/haproxy/haproxy.cfg: `server original 0.0.0.0`)"
        ),
    }

    step("sudo tproxy -i eth0 -ports 8000   (in the server namespace)");
    let cg = lab.cgroup.path().display().to_string();
    let tp = Tproxy::start(
        bin,
        &lab.server,
        None,
        &["-i", "eth0", "-ports", "8000", "--cgroup", &cg],
    )?;
    for line in tp.log().lines().filter(|l| l.contains("INFO")) {
        println!("  | {line}");
    }
    *installed = Some(Installed::read(&lab.server)?);

    step("what the kernel has attached");
    println!("cgroup {cg}:");
    for (hook, name) in kernel::cgroup_programs(lab.cgroup.path())? {
        println!("  {hook:<26} {name}");
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

    step("client: curl http://192.168.178.10:8000/ and http://[fd00:178::10]:8000/");
    for url in [
        format!("http://{}:8000/", topology::SERVER_IP),
        format!("http://[{}]:8000/", topology::SERVER_IP6),
    ] {
        let out = lab.client.exec("curl", &["-sS", "-m", "5", &url])?;
        print!("  {url} -> {out}");
        if !out.contains("hello from the app on port 8000") {
            bail!("unexpected answer from {url}: {out:?}");
        }
    }
    println!(
        "(the app saw the proxy as its peer: the request went client -> tc steer -> {proxy_name} -> app)"
    );

    step(&format!(
        "{proxy_name}'s log: the original destination it read (SO_ORIGINAL_DST or getsockname, answered by tproxy's cgroup programs)"
    ));
    // The proxy logs a session when it ends, a moment after the client;
    // Envoy writes its access log out every 0.1 s (--file-flush-interval-msec).
    let prefix = format!("{proxy_name}: client");
    let deadline = Instant::now() + Duration::from_secs(5);
    let lines: Vec<String> = loop {
        let lines: Vec<String> = proxy
            .lines()
            .into_iter()
            .filter(|l| l.starts_with(&prefix))
            .collect();
        if lines.len() >= 2 || Instant::now() > deadline {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    for l in &lines {
        println!("  | {l}");
    }
    // HAProxy's stdout logger may drop a line under load; none at all
    // means the proxy was not in the path. Envoy logs every request.
    let wanted = if proxy_kind == DemoProxy::Envoy { 2 } else { 1 };
    if lines.len() < wanted {
        bail!(
            "{proxy_name} logged {} of the 2 requests:\n{}",
            lines.len(),
            proxy.log()
        );
    }

    step("tproxy stats (in the server namespace)");
    sh(lab.server.command(bin).args(["stats", "-i", "eth0"]))?;

    step("SIGTERM: tproxy stops steering, drains, detaches everything");
    let (status, log) = tp.terminate()?;
    for line in log.lines().filter(|l| {
        l.contains("SIGTERM")
            || l.contains("drained")
            || l.contains("detached")
            || l.contains("counters")
    }) {
        println!("  | {line}");
    }
    if !status.success() {
        bail!("tproxy exited with {status}");
    }
    let left = kernel::cgroup_programs(lab.cgroup.path())?;
    if !left.is_empty() {
        bail!("programs still attached to the cgroup: {left:?}");
    }
    println!("cgroup {cg}: nothing attached");
    let out = lab.client.exec(
        "curl",
        &[
            "-sS",
            "-m",
            "5",
            &format!("http://{}:8000/", topology::SERVER_IP),
        ],
    )?;
    print!("without tproxy the client reaches the app directly: {out}");

    step("tearing down the lab");
    drop(proxy);
    drop(app);
    drop(lab);
    Ok(())
}
