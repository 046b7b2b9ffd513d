//! `cargo xtask bench`: the reproducible comparison. In one run on one
//! host, the set-ups of `setups.rs`, interleaved repetition by repetition:
//! iperf3 throughput by write size, sockperf ping-pong latency, connection
//! rate, process-to-process loopback latency (with and without the
//! SOCKHASH), CPU seconds per GB. Writes a results folder with the raw tool
//! output, results.json, report.md and PNG plots.
mod parse;
mod plot;
mod report;
mod setups;
mod stats;

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
pub use setups::Setup;
use tproxy_lab::{Logged, Topology, topology::SERVER_IP};

#[derive(clap::Args, Debug)]
pub struct Opts {
    /// A short run (about two minutes): 3 repetitions of 4 set-ups, 64 KiB writes only, 1 s per measurement.
    #[arg(long)]
    pub quick: bool,
    /// Print results.json to stdout as well.
    #[arg(long)]
    pub json: bool,
    /// Repetitions (default 5, or 3 with --quick).
    #[arg(long)]
    pub reps: Option<usize>,
    /// Seconds per throughput/latency measurement (default 3, or 1 with --quick).
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Set-ups to run (default: all): base, proxy, proxy+accel, nft-redirect, proxy-tproxy-backend.
    #[arg(long, value_delimiter = ',')]
    pub setups: Vec<String>,
    /// Results folder (default lab/results/<UTC time>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Pin the client side (iperf3/sockperf clients, connection-rate
    /// threads) to the first CPU and the server side (proxy, apps, the
    /// loopback pair) to the last, like a sidecar sharing its app's core;
    /// without it the scheduler places everything.
    #[arg(long)]
    pub pin: bool,
}

/// CPUs for the two sides under `--pin`.
#[derive(Clone, Copy, Debug, Default)]
struct Pin {
    client: Option<usize>,
    server: Option<usize>,
}

impl Pin {
    fn new(on: bool) -> Pin {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        if on {
            Pin {
                client: Some(0),
                server: Some(n - 1),
            }
        } else {
            Pin::default()
        }
    }
}

/// Binds the calling thread (or, between fork and exec, the child) to `cpu`.
fn set_affinity(cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays in it;
    // sched_setaffinity is a plain syscall (async-signal-safe).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `cmd`, run on `cpu` if there is one.
fn pinned(mut cmd: Command, cpu: Option<usize>) -> Command {
    if let Some(cpu) = cpu {
        // SAFETY: set_affinity only makes a syscall.
        unsafe {
            cmd.pre_exec(move || set_affinity(cpu));
        }
    }
    cmd
}

pub const SIZES_FULL: [u64; 5] = [64, 1448, 16 << 10, 64 << 10, 1 << 20];
pub const SIZES_QUICK: [u64; 1] = [64 << 10];

pub fn size_label(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

/// One measured figure of one repetition.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Sample {
    pub setup: &'static str,
    pub rep: usize,
    pub metric: String,
    pub unit: &'static str,
    pub value: f64,
}

/// Everything a run needs to know.
struct Bench<'a> {
    lab: &'a Topology,
    tproxy: String,
    raw: PathBuf,
    seconds: u64,
    sizes: Vec<u64>,
    samples: Vec<Sample>,
    progress: ProgressBar,
    pin: Pin,
    /// HAProxy's and the sockperf server's PIDs, for their CPU time.
    haproxy_pid: i32,
    app_pid: i32,
}

/// CPU time a process (all its threads) has run, in ns (schedstat).
fn cpu_ns(pid: i32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .sum()
}

/// Busy and total CPU time of the whole host, in clock ticks.
fn cpu_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = f.iter().take(8).sum();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

impl Bench<'_> {
    fn push(&mut self, setup: Setup, rep: usize, metric: String, unit: &'static str, value: f64) {
        self.samples.push(Sample {
            setup: setup.name(),
            rep,
            metric,
            unit,
            value,
        });
    }

    fn save(&self, name: &str, text: &str) -> Result<()> {
        std::fs::write(self.raw.join(name), text).with_context(|| format!("writing raw {name}"))
    }

    fn step(&self, msg: String) {
        self.progress.set_message(msg);
    }

    fn iperf3(&mut self, setup: Setup, rep: usize) -> Result<()> {
        for size in self.sizes.clone() {
            self.step(format!(
                "rep {rep} {}: iperf3 {}",
                setup.name(),
                size_label(size)
            ));
            let (busy0, _) = cpu_ticks();
            let mut cmd = pinned(self.lab.client.command("iperf3"), self.pin.client);
            let out = crate::output(cmd.args([
                "-c",
                SERVER_IP,
                "-p",
                "5201",
                "-t",
                &self.seconds.to_string(),
                "-l",
                &size.to_string(),
                "-J",
            ]))?;
            let (busy1, _) = cpu_ticks();
            self.save(
                &format!("iperf3-{}-{size}-rep{rep}.json", setup.name()),
                &out,
            )?;
            let r = parse::iperf3_json(&out)?;
            let label = size_label(size);
            self.push(
                setup,
                rep,
                format!("throughput/{label}"),
                "Gbit/s",
                r.bits_per_second / 1e9,
            );
            let cpu_s = (busy1 - busy0) as f64 / ticks_per_second();
            self.push(
                setup,
                rep,
                format!("cpu_s_per_gb/{label}"),
                "CPU s/GB",
                cpu_s / (r.bytes / 1e9),
            );
            self.progress.inc(1);
        }
        Ok(())
    }

    fn sockperf(&mut self, setup: Setup, rep: usize, loopback: bool) -> Result<()> {
        let what = if loopback { "loopback" } else { "latency" };
        self.step(format!("rep {rep} {}: sockperf {what}", setup.name()));
        let mut cmd = if loopback {
            // Process to process on the server, both in the cgroup: the
            // shape of the proxy->app leg.
            pinned(
                self.lab
                    .server
                    .command_in("sockperf", Some(&self.lab.cgroup)),
                self.pin.server,
            )
        } else {
            pinned(self.lab.client.command("sockperf"), self.pin.client)
        };
        let ip = if loopback { "127.0.0.1" } else { SERVER_IP };
        cmd.args([
            "pp",
            "--tcp",
            "-i",
            ip,
            "-p",
            "11111",
            "-m",
            "64",
            "-t",
            &self.seconds.to_string(),
        ]);
        let cpu0 = (cpu_ns(self.haproxy_pid), cpu_ns(self.app_pid));
        let out = crate::output(&mut cmd)?;
        let cpu1 = (cpu_ns(self.haproxy_pid), cpu_ns(self.app_pid));
        self.save(
            &format!("sockperf-{what}-{}-rep{rep}.txt", setup.name()),
            &out,
        )?;
        let r = parse::sockperf(&out)?;
        if !loopback && r.round_trips > 0.0 {
            // Where a round trip's time goes: the proxy's CPU and the app's.
            for (who, ns) in [("haproxy", cpu1.0 - cpu0.0), ("app", cpu1.1 - cpu0.1)] {
                self.push(
                    setup,
                    rep,
                    format!("rt_cpu/{who}"),
                    "µs",
                    ns / 1e3 / r.round_trips,
                );
            }
        }
        for (k, v) in [
            ("avg", r.avg),
            ("p50", r.p50),
            ("p90", r.p90),
            ("p99", r.p99),
            ("p99.9", r.p999),
            ("max", r.max),
        ] {
            self.push(setup, rep, format!("{what}/{k}"), "µs", v);
        }
        self.progress.inc(1);
        Ok(())
    }

    /// New connections per second: connect, one small exchange, close;
    /// two clients in parallel.
    fn conn_rate(&mut self, setup: Setup, rep: usize) -> Result<()> {
        self.step(format!("rep {rep} {}: connection rate", setup.name()));
        let rate = self.connections(setup, Duration::from_secs(self.seconds.min(2)))?;
        self.push(setup, rep, "conn_rate".into(), "conn/s", rate);
        self.progress.inc(1);
        Ok(())
    }

    /// Connections per second over `dur`: two clients, each connecting,
    /// making one small exchange and closing, in a loop.
    fn connections(&self, setup: Setup, dur: Duration) -> Result<f64> {
        let done = AtomicU64::new(0);
        let failed = AtomicBool::new(false);
        let dst: SocketAddr = format!("{SERVER_IP}:8000").parse()?;
        let t0 = Instant::now();
        self.lab.client.run(|| {
            std::thread::scope(|s| {
                for _ in 0..2 {
                    s.spawn(|| {
                        if let Some(cpu) = self.pin.client
                            && set_affinity(cpu).is_err()
                        {
                            failed.store(true, Ordering::Relaxed);
                            return;
                        }
                        let mut buf = [0u8; 256];
                        while t0.elapsed() < dur {
                            let ok = (|| -> std::io::Result<()> {
                                let mut c = TcpStream::connect(dst)?;
                                c.set_nodelay(true)?;
                                c.write_all(b"x\n")?;
                                c.shutdown(Shutdown::Write)?;
                                while c.read(&mut buf)? > 0 {}
                                Ok(())
                            })();
                            if ok.is_err() {
                                failed.store(true, Ordering::Relaxed);
                                return;
                            }
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
            })
        });
        if failed.load(Ordering::Relaxed) {
            bail!(
                "{}: a connection failed during the connection-rate run",
                setup.name()
            );
        }
        Ok(done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64())
    }
}

/// `kernel.bpf_stats_enabled` on (per-program run time and count, read with
/// bpftool), restored on drop. Only for the eBPF-cost window: the stats
/// themselves cost two clock reads per program run, ~10 % of the
/// accelerated throughput at 1448 B writes (the recvmsg tracepoint runs on
/// every read of the host), so the other measurements run without them.
struct BpfStats(String);

impl BpfStats {
    const PATH: &str = "/proc/sys/kernel/bpf_stats_enabled";

    fn enable() -> Result<BpfStats> {
        let old = std::fs::read_to_string(Self::PATH)?.trim().to_string();
        std::fs::write(Self::PATH, "1")?;
        Ok(BpfStats(old))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, &self.0);
    }
}

impl Bench<'_> {
    /// Average cost per run of each tproxy program of the current set-up,
    /// over a window of its own (1 s of iperf3 at 16 KiB, 1 s of sockperf,
    /// 0.5 s of new connections)
    /// with the stats on; runs and run time only count while they are on.
    fn bpf_costs(&mut self, setup: Setup, rep: usize) -> Result<()> {
        self.step(format!("rep {rep} {}: eBPF cost", setup.name()));
        let stats = BpfStats::enable()?;
        let mut iperf = pinned(self.lab.client.command("iperf3"), self.pin.client);
        iperf.args(["-c", SERVER_IP, "-p", "5201", "-t", "1", "-l", "16384"]);
        crate::output(&mut iperf)?;
        let mut sp = pinned(self.lab.client.command("sockperf"), self.pin.client);
        sp.args([
            "pp", "--tcp", "-i", SERVER_IP, "-p", "11111", "-m", "64", "-t", "1",
        ]);
        crate::output(&mut sp)?;
        self.connections(setup, Duration::from_millis(500))?;
        let out = crate::output(Command::new("bpftool").args(["-j", "prog", "show"]))?;
        drop(stats);
        let v: serde_json::Value = serde_json::from_str(&out)?;
        for p in v.as_array().into_iter().flatten() {
            let name = p["name"].as_str().unwrap_or("");
            let (ns, cnt) = (
                p["run_time_ns"].as_f64().unwrap_or(0.0),
                p["run_cnt"].as_f64().unwrap_or(0.0),
            );
            if name.starts_with("tproxy_") && cnt > 0.0 {
                self.push(setup, rep, format!("bpf_ns_per_run/{name}"), "ns", ns / cnt);
                self.push(setup, rep, format!("bpf_runs/{name}"), "runs", cnt);
            }
        }
        Ok(())
    }
}

/// The apps on the server: lab-app (8000), iperf3 (5201), sockperf (11111);
/// and HAProxy on 15006 with transparent binds (serves every set-up),
/// logging off.
fn start_servers(
    lab: &Topology,
    bin_dir: &Path,
    out: &Path,
    cpu: Option<usize>,
) -> Result<Vec<Logged>> {
    let cg = Some(&lab.cgroup);
    let cmd =
        |program: &dyn AsRef<std::ffi::OsStr>| pinned(lab.server.command_in(program, cg), cpu);
    let mut procs = Vec::new();
    let mut app = cmd(&bin_dir.join("lab-app"));
    app.arg("8000");
    procs.push(Logged::spawn("lab-app", &mut app)?);
    let mut iperf = cmd(&"iperf3");
    iperf.args(["-s", "-p", "5201"]);
    procs.push(Logged::spawn("iperf3", &mut iperf)?);
    let mut sp = cmd(&"sockperf");
    sp.args(["sr", "--tcp", "-i", "0.0.0.0", "-p", "11111"]);
    procs.push(Logged::spawn("sockperf", &mut sp)?);

    let example =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/haproxy/haproxy-transparent.cfg");
    let cfg: String = std::fs::read_to_string(&example)?
        .lines()
        .filter(|l| !l.trim_start().starts_with("log"))
        .map(|l| format!("{l}\n"))
        .collect();
    let cfg_path = out.join("haproxy-bench.cfg");
    std::fs::write(&cfg_path, cfg)?;
    let mut hap = cmd(&"haproxy");
    hap.arg("-db").arg("-f").arg(&cfg_path);
    procs.push(Logged::spawn("haproxy", &mut hap)?);
    for port in [8000, 5201, 11111, 15006] {
        lab.server.wait_listening(port, Duration::from_secs(10))?;
    }
    Ok(procs)
}

fn environment() -> serde_json::Value {
    let cmd = |c: &str, args: &[&str]| -> String {
        Command::new(c)
            .args(args)
            .output()
            .map(|o| {
                let s = if o.stdout.is_empty() {
                    o.stderr
                } else {
                    o.stdout
                };
                String::from_utf8_lossy(&s)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string()
            })
            .unwrap_or_default()
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    serde_json::json!({
        "kernel": cmd("uname", &["-r"]),
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "iperf3": cmd("iperf3", &["--version"]),
        "sockperf": cmd("sockperf", &["--version"]),
        "haproxy": cmd("haproxy", &["-v"]),
        "git_commit": cmd("git", &["rev-parse", "--short", "HEAD"]),
        "date_utc": cmd("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
    })
}

pub fn run(opts: Opts) -> Result<()> {
    let reps = opts.reps.unwrap_or(if opts.quick { 3 } else { 5 });
    let seconds = opts.seconds.unwrap_or(if opts.quick { 1 } else { 3 });
    let sizes: Vec<u64> = if opts.quick {
        SIZES_QUICK.to_vec()
    } else {
        SIZES_FULL.to_vec()
    };
    let setups: Vec<Setup> = if opts.setups.is_empty() && opts.quick {
        Setup::ALL[..4].to_vec()
    } else if opts.setups.is_empty() {
        Setup::ALL.to_vec()
    } else {
        opts.setups
            .iter()
            .map(|s| Setup::parse(s).with_context(|| format!("unknown set-up {s:?}")))
            .collect::<Result<_>>()?
    };

    eprintln!("bench: building the release binaries");
    let bin_dir = crate::build_release()?;
    let tproxy = bin_dir.join("tproxy").to_string_lossy().into_owned();

    let stamp = crate::output(Command::new("date").args(["-u", "+%Y%m%dT%H%M%SZ"]))?;
    let out = opts.out.clone().unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../lab/results")
            .join(stamp.trim())
    });
    let raw = out.join("raw");
    std::fs::create_dir_all(&raw)?;

    let lab = Topology::up("tproxy-bench")?;
    lab.check_reachability()?;
    // Thousands of short connections per second: TIME_WAIT must not run
    // the ephemeral ports out (client side, and the proxy's upstream side).
    for ns in [&lab.client, &lab.server] {
        ns.exec(
            "sysctl",
            &[
                "-qw",
                "net.ipv4.tcp_tw_reuse=1",
                "net.ipv4.ip_local_port_range=1024 65000",
            ],
        )?;
    }
    let pin = Pin::new(opts.pin);
    let servers = start_servers(&lab, &bin_dir, &out, pin.server)?;

    let per_setup = sizes.len() as u64 + 3; // iperf3 sizes, latency, loopback, conn rate
    let progress = ProgressBar::new(reps as u64 * setups.len() as u64 * per_setup);
    progress.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")?
            .progress_chars("=> "),
    );
    let mut bench = Bench {
        lab: &lab,
        tproxy,
        raw,
        seconds,
        sizes: sizes.clone(),
        samples: Vec::new(),
        progress,
        pin,
        haproxy_pid: servers[3].proc.pid(),
        app_pid: servers[2].proc.pid(),
    };
    // Interleaved: every set-up once per repetition, so drift over the run
    // (thermal, noisy neighbours) spreads over all of them alike.
    for rep in 1..=reps {
        for &setup in &setups {
            bench.step(format!("rep {rep} {}: entering", setup.name()));
            let active = setups::enter(setup, &lab, &bench.tproxy)?;
            let r = (|| -> Result<()> {
                bench.iperf3(setup, rep)?;
                bench.sockperf(setup, rep, false)?;
                bench.sockperf(setup, rep, true)?;
                bench.conn_rate(setup, rep)?;
                // Base and nft-redirect run no tproxy program.
                if matches!(active, setups::Active::Tproxy(_)) {
                    bench.bpf_costs(setup, rep)?;
                }
                Ok(())
            })();
            setups::leave(active, &lab)?;
            r?;
        }
    }
    bench.progress.finish_with_message("done");
    drop(servers);

    let mut env = environment();
    env["placement"] = match (pin.client, pin.server) {
        (Some(c), Some(s)) => format!("pinned: client side on CPU {c}, proxy and apps on CPU {s}"),
        _ => "the scheduler's (nothing pinned)".to_string(),
    }
    .into();
    let results = report::Results::new(env, &setups, &sizes, reps, seconds, bench.samples);
    let json = serde_json::to_string_pretty(&results)?;
    std::fs::write(out.join("results.json"), &json)?;
    let md = report::markdown(&results);
    std::fs::write(out.join("report.md"), &md)?;
    plot::throughput(&results, &out.join("throughput.png"))?;
    plot::latency(&results, &out.join("latency.png"))?;
    drop(lab);

    if opts.json {
        println!("{json}");
    } else {
        println!("{md}");
    }
    eprintln!("bench: results in {}", out.display());
    Ok(())
}
