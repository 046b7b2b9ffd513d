//! `cargo xtask bench`: the reproducible comparison. In one run on one
//! host, the set-ups of `setups.rs`, interleaved repetition by repetition:
//! iperf3 throughput by write size, sockperf ping-pong latency, connection
//! rate, process-to-process loopback latency (with and without the
//! SOCKHASH), HTTP requests through the proxy (wrk), CPU seconds per GB.
//! The proxy is Envoy (explicit worker count), HAProxy, or each in turn.
//! Writes one folder per proxy with the raw tool output, results.json,
//! report.md and PNG plots: a run with every default replaces that proxy's
//! current report, lab/results/<proxy>/ (tracked, linked from the README);
//! any other run is an experiment and lands in lab/results/<UTC time>/
//! (ignored by git) or --out. See `Dest`.
mod parse;
mod plot;
mod report;
mod setups;
mod stats;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
pub use setups::Setup;
use tproxy_lab::{Logged, Topology, envoy, topology::SERVER_IP};

/// Which proxy serves the proxied set-ups.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProxyChoice {
    Envoy,
    Haproxy,
    /// Envoy's set-ups, then HAProxy's, each reported on its own.
    Both,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proxy {
    Envoy,
    Haproxy,
}

impl Proxy {
    pub fn name(self) -> &'static str {
        match self {
            Proxy::Envoy => "Envoy",
            Proxy::Haproxy => "HAProxy",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Proxy::Envoy => "envoy",
            Proxy::Haproxy => "haproxy",
        }
    }
}

/// The HTTP load: wrk's connections (one thread) and the script that
/// prints the percentiles `--latency` leaves out.
const WRK_CONNECTIONS: u32 = 16;
const WRK_SCRIPT: &str = include_str!("wrk-percentiles.lua");

#[derive(clap::Args, Debug)]
pub struct Opts {
    /// A short run (about two minutes): 3 repetitions of 4 set-ups, 64 KiB writes only, 1 s per measurement.
    /// Like every run with a non-default option, it leaves the current reports alone.
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
    /// iperf3 write sizes in bytes (default: 64,1448,16384,65536,1048576, or
    /// 65536 with --quick).
    #[arg(long, value_delimiter = ',')]
    pub sizes: Vec<u64>,
    /// Results folder, one subfolder per proxy. Default: a run with every
    /// default option (only --proxy and --json given) replaces
    /// lab/results/<proxy>/, the current report; any other run writes
    /// lab/results/<UTC time>/<proxy>/.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Pin the client side (iperf3/sockperf clients, connection-rate
    /// threads) to the first CPU and the server side (proxy, apps, the
    /// loopback pair) to the last, like a sidecar sharing its app's core;
    /// without it the scheduler places everything.
    #[arg(long)]
    pub pin: bool,
    /// The proxy of the proxied set-ups.
    #[arg(long, value_enum, default_value = "envoy")]
    pub proxy: ProxyChoice,
    /// Envoy's worker threads (--concurrency), recorded in the results.
    #[arg(long, default_value_t = DEFAULT_ENVOY_WORKERS)]
    pub envoy_workers: u32,
    /// HAProxy with its default buffers (16 KiB), as an operator's own
    /// config has them, instead of the shipped config's tune.bufsize.
    #[arg(long)]
    pub haproxy_default_buffers: bool,
    /// Measure this tproxy binary instead of the one built from this tree
    /// (a before/after comparison under the same harness and workload).
    #[arg(long)]
    pub tproxy_bin: Option<PathBuf>,
    /// One more tproxy argument for proxy+accel (repeatable), as
    /// `--accel-arg=--accel-min-message=0`: a policy's cost or effect
    /// measured against the same binary's defaults.
    #[arg(long = "accel-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub accel_args: Vec<String>,
}

const DEFAULT_REPS: usize = 5;
const DEFAULT_SECONDS: u64 = 3;
const DEFAULT_ENVOY_WORKERS: u32 = 2;

/// What a run measures, from its options.
struct Plan {
    reps: usize,
    seconds: u64,
    sizes: Vec<u64>,
    setups: Vec<Setup>,
}

impl Plan {
    fn new(opts: &Opts) -> Result<Plan> {
        let setups = if opts.setups.is_empty() && opts.quick {
            Setup::ALL[..4].to_vec()
        } else if opts.setups.is_empty() {
            Setup::ALL.to_vec()
        } else {
            opts.setups
                .iter()
                .map(|s| Setup::parse(s).with_context(|| format!("unknown set-up {s:?}")))
                .collect::<Result<_>>()?
        };
        Ok(Plan {
            reps: opts
                .reps
                .unwrap_or(if opts.quick { 3 } else { DEFAULT_REPS }),
            seconds: opts
                .seconds
                .unwrap_or(if opts.quick { 1 } else { DEFAULT_SECONDS }),
            sizes: if !opts.sizes.is_empty() {
                opts.sizes.clone()
            } else if opts.quick {
                SIZES_QUICK.to_vec()
            } else {
                SIZES_FULL.to_vec()
            },
            setups,
        })
    }
}

/// Where a run writes, one folder per proxy.
#[derive(Debug, PartialEq)]
enum Dest {
    /// A run with every default: it replaces `<root>/<proxy>/`, the one
    /// current report of that proxy, so the figures the README links all
    /// come from one kind of run. It writes to `<root>/.<proxy>.new/` and
    /// swaps that in only when the proxy's run is complete: an interrupted
    /// run leaves the current report as it was.
    Current { root: PathBuf },
    /// Anything else (--quick, --pin, other set-ups, sizes, repetitions,
    /// seconds, workers or binary, or --out): `<out>/<proxy>/`, never the current
    /// report.
    Experiment { out: PathBuf },
}

impl Dest {
    fn choose(opts: &Opts, plan: &Plan, stamp: &str) -> Dest {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../lab/results");
        // Judged on what the run measures, so that the defaults given
        // explicitly (`--reps 5`) still make the current report.
        let defaults = !opts.quick
            && !opts.pin
            && opts.tproxy_bin.is_none()
            && opts.accel_args.is_empty()
            && plan.reps == DEFAULT_REPS
            && plan.seconds == DEFAULT_SECONDS
            && plan.setups == Setup::ALL
            && plan.sizes == SIZES_FULL
            && opts.envoy_workers == DEFAULT_ENVOY_WORKERS
            && !opts.haproxy_default_buffers;
        match &opts.out {
            Some(out) => Dest::Experiment { out: out.clone() },
            None if defaults => Dest::Current { root },
            None => Dest::Experiment {
                out: root.join(stamp),
            },
        }
    }

    /// The folder a proxy's run writes into while it runs.
    fn working(&self, proxy: Proxy) -> PathBuf {
        match self {
            Dest::Current { root } => root.join(format!(".{}.new", proxy.key())),
            Dest::Experiment { out } => out.join(proxy.key()),
        }
    }

    /// Called once the proxy's results are all written: its final folder.
    fn finish(&self, proxy: Proxy) -> Result<PathBuf> {
        let working = self.working(proxy);
        let Dest::Current { root } = self else {
            return Ok(working);
        };
        let current = root.join(proxy.key());
        if current.exists() {
            std::fs::remove_dir_all(&current)
                .with_context(|| format!("removing the old {}", current.display()))?;
        }
        std::fs::rename(&working, &current)
            .with_context(|| format!("moving {} to {}", working.display(), current.display()))?;
        Ok(current)
    }
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
    /// The proxy's, the sockperf server's and the iperf3 server's PIDs, for
    /// their CPU time and context switches.
    proxy_pid: i32,
    app_pid: i32,
    iperf_pid: i32,
    /// The wrk script's path.
    wrk_script: PathBuf,
    /// Whether the current set-up runs tproxy with acceleration (its
    /// counters are then read around each measurement).
    accel: bool,
}

/// Voluntary context switches of a process (all its threads): each is a
/// sleep, so each is a wake-up to come.
fn wakeups(pid: i32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .sum()
}

/// The accel counters that explain a figure: fallbacks to TCP and returns,
/// pairs that retired and left the SOCKHASH, sendmsg calls redirected or
/// passed to TCP, bytes redirected, retirements for small writes, nudges.
const ACCEL_COUNTERS: [&str; 10] = [
    "accel_fallbacks",
    "accel_resumed",
    "accel_retired",
    "accel_left",
    "msg_redirected",
    "msg_redirected_bytes",
    "msg_passthrough",
    "msg_miss",
    "accel_small_messages",
    "accel_nudges",
];

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
            let c0 = self.counters();
            let w0 = (wakeups(self.proxy_pid), wakeups(self.iperf_pid));
            let proxy0 = cpu_ns(self.proxy_pid);
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
            let proxy1 = cpu_ns(self.proxy_pid);
            let w1 = (wakeups(self.proxy_pid), wakeups(self.iperf_pid));
            let c1 = self.counters();
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
            // What moves a figure: the proxy's CPU share (of one CPU), and
            // wake-ups of the proxy and the app per MB.
            let mb = r.bytes / 1e6;
            if self.proxy_pid != 0 {
                self.push(
                    setup,
                    rep,
                    format!("proxy_cpu/{label}"),
                    "% of a CPU",
                    (proxy1 - proxy0) / 1e7 / r.seconds,
                );
            }
            for (who, d) in [("proxy", w1.0 - w0.0), ("app", w1.1 - w0.1)] {
                self.push(
                    setup,
                    rep,
                    format!("wakeups_per_mb/{who}/{label}"),
                    "per MB",
                    d / mb,
                );
            }
            self.push_counters(setup, rep, &format!("iperf3/{label}"), &c0, &c1);
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
        let c0 = self.counters();
        let cpu0 = (cpu_ns(self.proxy_pid), cpu_ns(self.app_pid));
        let out = crate::output(&mut cmd)?;
        let cpu1 = (cpu_ns(self.proxy_pid), cpu_ns(self.app_pid));
        let c1 = self.counters();
        self.push_counters(setup, rep, what, &c0, &c1);
        self.save(
            &format!("sockperf-{what}-{}-rep{rep}.txt", setup.name()),
            &out,
        )?;
        let r = parse::sockperf(&out)?;
        if !loopback && r.round_trips > 0.0 {
            // Where a round trip's time goes: the proxy's CPU and the app's.
            for (who, ns) in [("proxy", cpu1.0 - cpu0.0), ("app", cpu1.1 - cpu0.1)] {
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

    /// HTTP through the proxy's HTTP listener (Envoy: http_connection_manager
    /// on 8000; HAProxy: its tcp mode): wrk, one thread, a fixed number of
    /// keep-alive connections, for the measurement's seconds.
    fn http(&mut self, setup: Setup, rep: usize) -> Result<()> {
        self.step(format!("rep {rep} {}: HTTP (wrk)", setup.name()));
        let c0 = self.counters();
        let mut cmd = pinned(self.lab.client.command("wrk"), self.pin.client);
        cmd.args([
            "-t1",
            &format!("-c{WRK_CONNECTIONS}"),
            &format!("-d{}s", self.seconds),
            "--latency",
            "-s",
        ])
        .arg(&self.wrk_script)
        .arg(format!("http://{SERVER_IP}:8000/"));
        let out = crate::output(&mut cmd)?;
        let c1 = self.counters();
        self.save(&format!("wrk-{}-rep{rep}.txt", setup.name()), &out)?;
        let r = parse::wrk(&out).with_context(|| format!("{}: wrk", setup.name()))?;
        self.push(setup, rep, "http/rps".into(), "req/s", r.rps);
        for (k, v) in [
            ("p50", r.p50),
            ("p90", r.p90),
            ("p99", r.p99),
            ("p99.9", r.p999),
            ("max", r.max),
        ] {
            self.push(setup, rep, format!("http/{k}"), "µs", v);
        }
        self.push(setup, rep, "http/errors".into(), "errors", r.errors);
        self.push_counters(setup, rep, "http", &c0, &c1);
        self.progress.inc(1);
        Ok(())
    }

    /// tproxy's counters now, when the set-up accelerates (`tproxy stats
    /// --json` in the server's namespace).
    fn counters(&self) -> Option<serde_json::Value> {
        if !self.accel {
            return None;
        }
        let out = self
            .lab
            .server
            .exec(&self.tproxy, &["stats", "--json"])
            .ok()?;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        Some(v.get(0)?.get("counters")?.clone())
    }

    /// The accel counters' increase over one measurement, and the bytes per
    /// redirected sendmsg (the proxy's or app's write size on the fast path).
    fn push_counters(
        &mut self,
        setup: Setup,
        rep: usize,
        what: &str,
        c0: &Option<serde_json::Value>,
        c1: &Option<serde_json::Value>,
    ) {
        let (Some(c0), Some(c1)) = (c0, c1) else {
            return;
        };
        let d = |k: &str| c1[k].as_f64().unwrap_or(0.0) - c0[k].as_f64().unwrap_or(0.0);
        for k in ACCEL_COUNTERS {
            self.push(setup, rep, format!("accel/{what}/{k}"), "count", d(k));
        }
        if d("msg_redirected") > 0.0 {
            self.push(
                setup,
                rep,
                format!("accel/{what}/bytes_per_redirect"),
                "B",
                d("msg_redirected_bytes") / d("msg_redirected"),
            );
        }
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
                                // A whole HTTP exchange (Envoy's listener on
                                // 8000 speaks HTTP; HAProxy and the app do too):
                                // the server closes after its answer.
                                let mut c = TcpStream::connect(dst)?;
                                c.set_nodelay(true)?;
                                c.write_all(
                                    b"GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n",
                                )?;
                                let n = c.read(&mut buf)?;
                                if !buf[..n].starts_with(b"HTTP/1.1 200") {
                                    return Err(std::io::Error::other("no 200 answer"));
                                }
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

/// What serves the set-ups: the apps and the proxy, with their PIDs.
struct Servers {
    /// Held: dropping them stops the processes.
    _procs: Vec<Logged>,
    proxy_pid: i32,
    app_pid: i32,
    iperf_pid: i32,
}

/// The apps on the server: lab-app (8000), iperf3 (5201), sockperf (11111);
/// and the proxy on 15006 with a transparent listener (serves every
/// set-up: rewrite, nft REDIRECT and tproxy steering), logging off.
fn start_servers(
    lab: &Topology,
    bin_dir: &Path,
    out: &Path,
    cpu: Option<usize>,
    proxy: Proxy,
    envoy_workers: u32,
    haproxy_default_buffers: bool,
) -> Result<Servers> {
    let cg = Some(&lab.cgroup);
    let cmd =
        |program: &dyn AsRef<std::ffi::OsStr>| pinned(lab.server.command_in(program, cg), cpu);
    let mut procs = Vec::new();
    let mut app = cmd(&bin_dir.join("lab-app"));
    app.arg("8000");
    procs.push(Logged::spawn("lab-app", &mut app)?);
    let mut iperf = cmd(&"iperf3");
    iperf.args(["-s", "-p", "5201"]);
    let iperf = Logged::spawn("iperf3", &mut iperf)?;
    let iperf_pid = iperf.proc.pid();
    procs.push(iperf);
    let mut sp = cmd(&"sockperf");
    sp.args(["sr", "--tcp", "-i", "0.0.0.0", "-p", "11111"]);
    let sp = Logged::spawn("sockperf", &mut sp)?;
    let app_pid = sp.proc.pid();
    procs.push(sp);
    for port in [8000, 5201, 11111] {
        lab.server.wait_listening(port, Duration::from_secs(10))?;
    }

    let proxy_proc = match proxy {
        Proxy::Haproxy => {
            let example = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../examples/haproxy/haproxy-transparent.cfg");
            let cfg: String = std::fs::read_to_string(&example)?
                .lines()
                .filter(|l| !l.trim_start().starts_with("log"))
                .filter(|l| {
                    !(haproxy_default_buffers && l.trim_start().starts_with("tune.bufsize"))
                })
                .map(|l| format!("{l}\n"))
                .collect();
            let cfg_path = out.join("haproxy-bench.cfg");
            std::fs::write(&cfg_path, cfg)?;
            let mut hap = cmd(&"haproxy");
            hap.arg("-db").arg("-f").arg(&cfg_path);
            let p = Logged::spawn("haproxy", &mut hap)?;
            lab.server.wait_listening(15006, Duration::from_secs(10))?;
            p
        }
        Proxy::Envoy => {
            let cfg = bench_envoy_config(&envoy::without_access_log(&std::fs::read_to_string(
                envoy::example_config(true),
            )?));
            let cfg_path = out.join("envoy-bench.yaml");
            std::fs::write(&cfg_path, cfg)?;
            let opts = envoy::Opts {
                concurrency: envoy_workers,
                log_level: "warning",
            };
            let mut c = pinned(envoy::command(&lab.server, cg, &cfg_path, &opts)?, cpu);
            let p = Logged::spawn("envoy", &mut c)?;
            if let Err(e) = envoy::wait_ready(&lab.server, 15006, Duration::from_secs(30)) {
                bail!("{e}; Envoy's output:\n{}", p.log());
            }
            p
        }
    };
    let proxy_pid = proxy_proc.proc.pid();
    procs.push(proxy_proc);
    Ok(Servers {
        _procs: procs,
        proxy_pid,
        app_pid,
        iperf_pid,
    })
}

/// The shipped transparent config, for the bench: upstream HTTP
/// connections close after 0.5 s idle. Envoy pools them across set-ups;
/// one opened under a set-up without acceleration would carry the next
/// set-up's requests outside the SOCKHASH (sockops pairs sockets at
/// connect), so each set-up's HTTP run starts on fresh connections.
fn bench_envoy_config(shipped: &str) -> String {
    const POOL: &str = "      lb_policy: CLUSTER_PROVIDED\n";
    assert!(
        shipped.contains(POOL),
        "the shipped config's cluster changed"
    );
    shipped.replacen(
        POOL,
        &format!(
            "{POOL}      typed_extension_protocol_options:\n\
             \x20       envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n\
             \x20         \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n\
             \x20         common_http_protocol_options: {{ idle_timeout: 0.5s }}\n\
             \x20         explicit_http_config: {{ http_protocol_options: {{}} }}\n"
        ),
        1,
    )
}

/// The first line a tool prints (stdout, or stderr if stdout is empty).
fn environment_line(c: &str, args: &[&str]) -> String {
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
}

fn environment() -> serde_json::Value {
    let cmd = environment_line;
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
        "git_commit": cmd("git", &["rev-parse", "--short", "HEAD"]),
        "date_utc": cmd("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
    })
}

pub fn run(opts: Opts) -> Result<()> {
    let plan = Plan::new(&opts)?;
    let Plan {
        reps,
        seconds,
        ref sizes,
        ref setups,
    } = plan;
    let proxies = match opts.proxy {
        ProxyChoice::Envoy => vec![Proxy::Envoy],
        ProxyChoice::Haproxy => vec![Proxy::Haproxy],
        ProxyChoice::Both => vec![Proxy::Envoy, Proxy::Haproxy],
    };
    anyhow::ensure!(
        opts.envoy_workers >= 1,
        "--envoy-workers must be at least 1"
    );
    if proxies.contains(&Proxy::Envoy) {
        envoy::require()?;
    }

    eprintln!("bench: building the release binaries");
    let bin_dir = crate::build_release()?;
    let tproxy = opts
        .tproxy_bin
        .clone()
        .unwrap_or_else(|| bin_dir.join("tproxy"))
        .to_string_lossy()
        .into_owned();

    let stamp = crate::output(Command::new("date").args(["-u", "+%Y%m%dT%H%M%SZ"]))?;
    let dest = Dest::choose(&opts, &plan, stamp.trim());
    // Recorded in each report: how to get the same kind of run again.
    let command = std::iter::once("cargo xtask".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");

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
    for &proxy in &proxies {
        let dir = dest.working(proxy);
        if matches!(dest, Dest::Current { .. }) && dir.exists() {
            // Left by an interrupted run.
            std::fs::remove_dir_all(&dir)?;
        }
        let raw = dir.join("raw");
        std::fs::create_dir_all(&raw)?;
        // wrk reads its script from a file; the script is in the
        // repository (xtask/src/bench/), so a report need not carry a copy.
        let wrk_script =
            std::env::temp_dir().join(format!("tproxy-bench-wrk-{}.lua", std::process::id()));
        std::fs::write(&wrk_script, WRK_SCRIPT)?;
        eprintln!("bench: {} ({})", proxy.name(), dir.display());
        let servers = start_servers(
            &lab,
            &bin_dir,
            &dir,
            pin.server,
            proxy,
            opts.envoy_workers,
            opts.haproxy_default_buffers,
        )?;

        // iperf3 sizes, latency, loopback, HTTP, conn rate
        let per_setup = sizes.len() as u64 + 4;
        let progress = ProgressBar::new(reps as u64 * setups.len() as u64 * per_setup);
        progress.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")?
                .progress_chars("=> "),
        );
        let mut bench = Bench {
            lab: &lab,
            tproxy: tproxy.clone(),
            raw,
            seconds,
            sizes: sizes.clone(),
            samples: Vec::new(),
            progress,
            pin,
            proxy_pid: servers.proxy_pid,
            app_pid: servers.app_pid,
            iperf_pid: servers.iperf_pid,
            wrk_script,
            accel: false,
        };
        // Interleaved: every set-up once per repetition, so drift over the
        // run (thermal, noisy neighbours) spreads over all of them alike;
        // in reverse order every other repetition, so that no set-up always
        // runs after the same one (a connection-rate phase leaves thousands
        // of TIME_WAIT sockets to the next set-up's iperf3).
        for rep in 1..=reps {
            let order: Vec<Setup> = if rep % 2 == 1 {
                setups.to_vec()
            } else {
                setups.iter().rev().copied().collect()
            };
            for setup in order {
                bench.step(format!("rep {rep} {}: entering", setup.name()));
                let active = setups::enter(setup, &lab, &bench.tproxy, &opts.accel_args)?;
                bench.accel = setup == Setup::ProxyAccel;
                let r = (|| -> Result<()> {
                    bench.iperf3(setup, rep)?;
                    bench.sockperf(setup, rep, false)?;
                    bench.sockperf(setup, rep, true)?;
                    bench.http(setup, rep)?;
                    bench.conn_rate(setup, rep)?;
                    // Base and nft-redirect run no tproxy program.
                    if matches!(active, setups::Active::Tproxy(_)) {
                        bench.bpf_costs(setup, rep)?;
                    }
                    Ok(())
                })();
                bench.accel = false;
                setups::leave(active, &lab)?;
                r?;
            }
        }
        bench.progress.finish_with_message("done");
        drop(servers);
        let _ = std::fs::remove_file(&bench.wrk_script);

        let mut env = environment();
        env["placement"] = match (pin.client, pin.server) {
            (Some(c), Some(s)) => {
                format!("pinned: client side on CPU {c}, proxy and apps on CPU {s}")
            }
            _ => "the scheduler's (nothing pinned)".to_string(),
        }
        .into();
        env["proxy"] = proxy.name().into();
        match proxy {
            Proxy::Envoy => {
                env["proxy_version"] = envoy::version(&envoy::require()?)?.into();
                env["envoy_workers"] = opts.envoy_workers.into();
            }
            Proxy::Haproxy => {
                env["proxy_version"] = environment_line("haproxy", &["-v"]).into();
                env["haproxy_bufsize"] = if opts.haproxy_default_buffers {
                    "default (16384)"
                } else {
                    "the shipped config's"
                }
                .into();
            }
        }
        env["wrk"] = environment_line("wrk", &["-v"]).into();
        env["command"] = command.clone().into();
        env["wrk_connections"] = WRK_CONNECTIONS.into();
        let results = report::Results::new(env, setups, sizes, reps, seconds, bench.samples);
        let json = serde_json::to_string_pretty(&results)?;
        std::fs::write(dir.join("results.json"), &json)?;
        let md = report::markdown(&results);
        std::fs::write(dir.join("report.md"), &md)?;
        plot::throughput(&results, &dir.join("throughput.png"))?;
        plot::latency(&results, &dir.join("latency.png"))?;
        let dir = dest.finish(proxy)?;
        if opts.json {
            println!("{json}");
        } else {
            println!("{md}");
        }
        eprintln!("bench: {} results in {}", proxy.name(), dir.display());
    }
    drop(lab);
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        opts: Opts,
    }

    /// Where `cargo xtask bench ARGS` writes.
    fn dest(args: &[&str]) -> Dest {
        let opts = Cli::parse_from(std::iter::once("bench").chain(args.iter().copied())).opts;
        Dest::choose(&opts, &Plan::new(&opts).unwrap(), "20261123T000000Z")
    }

    /// Only a run with every default replaces the current reports; the
    /// defaults given explicitly count as defaults.
    #[test]
    fn only_a_default_run_replaces_the_current_report() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../lab/results");
        let current = Dest::Current { root: root.clone() };
        assert_eq!(dest(&[]), current);
        assert_eq!(dest(&["--proxy", "both", "--json"]), current);
        assert_eq!(dest(&["--reps", "5", "--seconds", "3"]), current);
        assert_eq!(current.working(Proxy::Haproxy), root.join(".haproxy.new"),);
        let experiment = Dest::Experiment {
            out: root.join("20261123T000000Z"),
        };
        for args in [
            &["--quick"][..],
            &["--pin"],
            &["--reps", "3"],
            &["--seconds", "1"],
            &["--setups", "base,proxy,proxy+accel"],
            &["--envoy-workers", "1"],
            &["--tproxy-bin", "/tmp/tproxy"],
        ] {
            assert_eq!(dest(args), experiment, "{args:?}");
        }
        assert_eq!(
            dest(&["--out", "/tmp/b"]).working(Proxy::Envoy),
            Path::new("/tmp/b/envoy"),
        );
    }

    /// Envoy itself accepts the bench's config (the pool timeout added to
    /// the shipped transparent one, access logs taken out).
    #[test]
    fn the_bench_envoy_config_is_valid() {
        let shipped = std::fs::read_to_string(envoy::example_config(true)).unwrap();
        let cfg = bench_envoy_config(&envoy::without_access_log(&shipped));
        assert!(cfg.contains("idle_timeout: 0.5s"), "{cfg}");
        let path = std::env::temp_dir().join(format!("envoy-bench-{}.yaml", std::process::id()));
        std::fs::write(&path, cfg).unwrap();
        let out = envoy::validate(&envoy::require().unwrap(), &path);
        let _ = std::fs::remove_file(&path);
        let out = out.unwrap();
        assert!(out.contains("OK"), "{out}");
    }
}
