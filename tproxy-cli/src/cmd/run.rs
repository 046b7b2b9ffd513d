//! `tproxy -i IFACE -ports PORTS`: one instance, served until a signal,
//! then drained and removed. Its flags, merged with `--config`.
use std::{net::SocketAddr, path::PathBuf};

use clap::{ArgMatches, parser::ValueSource};
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

use super::Cli;
use crate::{
    Error, Instance, PortSet, Result,
    config::{
        file::FileConfig,
        options::{
            DEFAULT_PROXY_PORT, LogFormat, MAX_DRAIN_TIMEOUT, Options, Steer, TcMode, parse_mark,
        },
    },
    error::Chain,
    observe::metrics,
    target,
};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Read these settings from a YAML file (keys as the flags, with `_`:
    /// see examples/tproxy.yaml); flags given here override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Interface whose inbound TCP is intercepted.
    #[arg(
        short = 'i',
        long = "iface",
        value_name = "IFACE",
        required_unless_present = "config"
    )]
    pub iface: Option<String>,

    /// Intercepted destination ports: 8000 | 8000,8080 | 9000-9010 (also -ports).
    #[arg(short = 'p', long = "ports", value_name = "PORTS", required_unless_present = "config", value_parser = parse_ports)]
    pub ports: Option<PortSet>,

    /// cgroup v2 directory holding the proxy and the app (default: the cgroup v2 root).
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,

    /// The proxy's own cgroup v2 directory, inside --cgroup: only its
    /// processes get original destinations and acceleration (default:
    /// --cgroup itself).
    #[arg(long, value_name = "PATH")]
    pub proxy_cgroup: Option<PathBuf>,

    /// Port of the proxy's inbound listener.
    #[arg(long, value_name = "PORT", default_value_t = DEFAULT_PROXY_PORT, value_parser = clap::value_parser!(u16).range(1..))]
    pub proxy_port: u16,

    /// SO_MARK on the proxy's upstream sockets: such traffic is never steered (decimal or 0x hex).
    #[arg(long, value_name = "MARK", default_value = "0x539", value_parser = parse_mark)]
    pub proxy_mark: u32,

    /// Leave socket acceleration (sockops + sk_msg) out entirely.
    #[arg(long, overrides_with = "accel")]
    pub no_accel: bool,

    /// Socket acceleration on (the default; overrides `accel: false` in --config).
    #[arg(long, overrides_with = "no_accel")]
    pub accel: bool,

    /// Upper bound on the unread bytes a socket may hold before its sender
    /// leaves the fast path; the bound itself follows the reader (the larger
    /// of its receive buffer and what it read in the last 8 ms). Past it
    /// (slow reader) plain TCP applies backpressure until the reader has
    /// read every byte, then the sender redirects again.
    #[arg(long, value_name = "BYTES", default_value_t = tproxy_common::DEFAULT_ACCEL_MAX_QUEUED)]
    pub accel_max_queued: u32,

    /// A sender that stays on TCP this long (milliseconds) without its
    /// reader ever catching up (a continuous stream after a fallback) leaves
    /// the fast path for good, and the pair becomes plain TCP sockets: TCP
    /// through the sockmap costs more than plain TCP. 0: never.
    #[arg(long, value_name = "MS", default_value_t = tproxy_common::DEFAULT_ACCEL_RETIRE_MS)]
    pub accel_retire_ms: u32,

    /// How the tc programs attach: TCX links (kernel >= 6.6) or netlink filters.
    #[arg(long, value_enum, default_value_t = TcMode::Auto)]
    pub tc_mode: TcMode,

    /// Steering back-end: rewrite the port in tc, or mark for policy routing + nftables tproxy.
    #[arg(long, value_enum, default_value_t = Steer::Rewrite)]
    pub steer: Steer,

    /// tproxy back-end: mark set by tc and matched by the fwmark rule
    /// [default: 0x7400 + ifindex, or the next mark no ip rule uses].
    #[arg(long, value_name = "MARK", value_parser = parse_mark)]
    pub steer_mark: Option<u32>,

    /// tproxy back-end: routing table of the local default route, unused and
    /// not reserved [default: the steer mark, or the next unused table].
    #[arg(long, value_name = "ID", value_parser = parse_mark)]
    pub route_table: Option<u32>,

    /// On SIGTERM/SIGINT, stop steering new flows at once and let steered
    /// flows finish for up to this many seconds (0: stop at once). A second
    /// signal stops at once.
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(..=MAX_DRAIN_TIMEOUT))]
    pub drain_timeout: u64,

    /// Serve the counters and gauges in the Prometheus (OpenMetrics) text
    /// format on http://ADDR/metrics, e.g. 127.0.0.1:9090 or [::1]:9090.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl RunArgs {
    /// The options from the flags alone; `config::resolve` merges a
    /// `--config` file in (the binary uses that).
    pub fn options(&self) -> Options {
        Options {
            iface: self.iface.clone().expect("required by clap"),
            ports: self.ports.clone().expect("required by clap"),
            cgroup: self.cgroup.clone(),
            proxy_cgroup: self.proxy_cgroup.clone(),
            proxy_port: self.proxy_port,
            proxy_mark: self.proxy_mark,
            accel: !self.no_accel,
            tc_mode: self.tc_mode,
            steer: self.steer,
            steer_mark: self.steer_mark,
            route_table: self.route_table,
            accel_max_queued: self.accel_max_queued,
            accel_retire_ms: self.accel_retire_ms,
            flows_quota: 0,
            socks_quota: 0,
        }
    }
}

fn parse_ports(s: &str) -> Result<PortSet, crate::Error> {
    s.parse()
}

/// Everything a run uses: what the instance does, and the process's own
/// settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunSettings {
    pub options: Options,
    pub drain_timeout: u64,
    pub metrics_addr: Option<SocketAddr>,
    pub log_format: LogFormat,
}

/// The run's settings: each from its flag if given on the command line,
/// else from `--config`, else the flag's default. `matches` are the ones
/// `cli::parse_from` returned with `cli`.
pub fn resolve(cli: &Cli, matches: &ArgMatches) -> Result<RunSettings> {
    let file = match &cli.run.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    merge(cli, matches, &file)
}

/// `resolve` with the file already read.
pub fn merge(cli: &Cli, matches: &ArgMatches, file: &FileConfig) -> Result<RunSettings> {
    let run = &cli.run;
    let t = file.target();
    // clap fills in defaults: only a flag typed on the command line beats
    // the file (`--proxy-port 15006` does, even though it is the default).
    let given = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
    fn pick<T>(given: bool, flag: T, file: Option<T>) -> T {
        match file {
            Some(v) if !given => v,
            _ => flag,
        }
    }
    let options = Options {
        iface: run.iface.clone().or(t.iface).ok_or(Error::Missing {
            what: "interface",
            flag: "-i IFACE",
            key: "iface",
        })?,
        ports: run.ports.clone().or(t.ports).ok_or(Error::Missing {
            what: "ports to intercept",
            flag: "-ports PORTS",
            key: "ports",
        })?,
        cgroup: run.cgroup.clone().or(t.cgroup),
        proxy_cgroup: run.proxy_cgroup.clone().or(t.proxy_cgroup),
        proxy_port: pick(given("proxy_port"), run.proxy_port, t.proxy_port),
        proxy_mark: pick(given("proxy_mark"), run.proxy_mark, t.proxy_mark),
        // --accel and --no-accel override each other: at most one is set.
        accel: match (run.accel, run.no_accel) {
            (true, _) => true,
            (_, true) => false,
            _ => t.accel.unwrap_or(true),
        },
        tc_mode: pick(given("tc_mode"), run.tc_mode, t.tc_mode),
        steer: pick(given("steer"), run.steer, t.steer),
        steer_mark: run.steer_mark.or(t.steer_mark),
        route_table: run.route_table.or(t.route_table),
        accel_max_queued: pick(
            given("accel_max_queued"),
            run.accel_max_queued,
            t.accel_max_queued,
        ),
        accel_retire_ms: pick(
            given("accel_retire_ms"),
            run.accel_retire_ms,
            t.accel_retire_ms,
        ),
        // A single run serves one target: the whole table is its own.
        flows_quota: 0,
        socks_quota: 0,
    };
    Ok(RunSettings {
        options,
        drain_timeout: pick(
            given("drain_timeout"),
            run.drain_timeout,
            file.drain_timeout,
        ),
        metrics_addr: run.metrics_addr.or(file.metrics_addr),
        log_format: cli.log_format.or(file.log_format).unwrap_or_default(),
    })
}

pub fn serve(settings: &RunSettings) -> anyhow::Result<()> {
    let opts = &settings.options;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        // Signal handlers first: a signal during attach must still tear down.
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        // Bound before anything is installed: a taken address is an error
        // with nothing to undo, and scrapes work once "serving" is logged.
        let endpoint = match settings.metrics_addr {
            Some(addr) => Some(metrics::Endpoint::bind(addr).await?),
            None => None,
        };
        // One line for the whole start (Instance::start's "attached"); each
        // attachment has its own line at debug.
        let mut instance = Instance::start(opts)?;
        if let Some(endpoint) = endpoint {
            endpoint.start(&instance, opts)?;
        }
        info!("serving; SIGINT or SIGTERM to stop");
        // Closed flows linger for retransmissions, then go.
        let mut reap = tokio::time::interval(std::time::Duration::from_secs(1));
        let sig = loop {
            tokio::select! {
                _ = term.recv() => break "SIGTERM",
                _ = int.recv() => break "SIGINT",
                _ = reap.tick() => reap_flows(&mut instance),
            }
        };
        let instance = drain(instance, sig, settings.drain_timeout, &mut term, &mut int).await?;
        let counters = instance.counters()?;
        instance.shutdown();
        let summary: Vec<String> = counters
            .iter()
            .filter(|(_, v)| *v > 0)
            .map(|(c, v)| format!("{}={v}", c.name()))
            .collect();
        if summary.is_empty() {
            info!("counters: all zero");
        } else {
            info!("counters: {}", summary.join(" "));
        }
        Ok(())
    })
}

/// Graceful stop: new connections to intercepted ports are refused from now
/// on (their SYNs dropped: none reaches the app around the proxy), flows
/// already steered keep their path until they end or the timeout runs out
/// (`target::drain`, off the runtime: a second signal stops it at once).
async fn drain(
    mut instance: Instance,
    sig: &str,
    timeout_s: u64,
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
) -> anyhow::Result<Instance> {
    instance.stop_steering_new()?;
    // Only flows seen lately: a client that went silent would hold the
    // drain for its whole timeout and gain nothing.
    let flows = instance.flows()?;
    let start = flows.active;
    if start == 0 || timeout_s == 0 {
        info!(
            "{sig}: detaching ({start} active steered flow(s) cut; {} idle)",
            flows.open - flows.active
        );
        return Ok(instance);
    }
    info!(
        "{sig}: new connections to intercepted ports are now refused; draining {start} active steered flow(s) for up to {timeout_s} s ({} idle ones are not waited for; signal again to stop now)",
        flows.open - flows.active
    );
    // Sent (or dropped) to stop the drain now.
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let mut waiting = tokio::task::spawn_blocking(move || {
        let drained = target::drain::flows(
            start,
            std::time::Duration::from_secs(timeout_s),
            || {
                reap_flows(&mut instance);
                instance.flows().map(|f| f.active)
            },
            |tick| {
                matches!(
                    stopped.recv_timeout(tick),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                )
            },
        );
        (instance, drained)
    });
    let (instance, drained) = tokio::select! {
        r = &mut waiting => r?,
        _ = term.recv() => second_signal(stop, waiting).await?,
        _ = int.recv() => second_signal(stop, waiting).await?,
    };
    let drained = drained?;
    info!(
        "drained {} flow(s), cut {}; detaching",
        drained.ended(),
        drained.left
    );
    Ok(instance)
}

/// Stops the drain under way now.
async fn second_signal<T>(
    stop: std::sync::mpsc::Sender<()>,
    waiting: tokio::task::JoinHandle<T>,
) -> Result<T, tokio::task::JoinError> {
    info!("second signal: stopping now");
    let _ = stop.send(());
    waiting.await
}

fn reap_flows(instance: &mut Instance) {
    match instance.reap_flows() {
        Ok(0) => {}
        Ok(n) => tracing::debug!("removed {n} closed flow(s) after their linger"),
        Err(e) => tracing::warn!("reaping closed flows: {}", Chain(&e)),
    }
}

#[cfg(test)]
mod tests {
    use std::{ffi::OsString, io::Write as _};

    use super::*;
    use crate::cmd::parse_from;
    /// `tproxy ARGS…` resolved against a config file holding `yaml`.
    fn run_with(yaml: &str, args: &[&str]) -> Result<RunSettings> {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(yaml.as_bytes()).unwrap();
        let path = f.path().to_str().unwrap().to_string();
        let mut argv = vec!["tproxy", "--config", &path];
        argv.extend_from_slice(args);
        let (cli, m) = parse_from(argv.iter().map(OsString::from)).unwrap();
        resolve(&cli, &m)
    }

    fn flags(args: &[&str]) -> RunSettings {
        let (cli, m) = parse_from(args.iter().map(OsString::from)).unwrap();
        resolve(&cli, &m).unwrap()
    }

    #[test]
    fn flags_override_the_file() {
        let yaml = "iface: eth1\nports: 8000\nproxy_port: 15001\naccel: true\nsteer: tproxy\ndrain_timeout: 5\nlog_format: json\n";
        let s = run_with(yaml, &[]).unwrap();
        assert_eq!(s.options.iface, "eth1");
        assert_eq!(s.options.proxy_port, 15001);
        assert_eq!(s.options.steer, Steer::Tproxy);
        assert_eq!(s.drain_timeout, 5);
        assert_eq!(s.log_format, LogFormat::Json);
        // Each flag beats its key; the other keys stay.
        let s = run_with(
            yaml,
            &[
                "-i",
                "eth2",
                "-ports",
                "9000",
                "--no-accel",
                "--drain-timeout",
                "0",
                "--log-format",
                "text",
            ],
        )
        .unwrap();
        assert_eq!(s.options.iface, "eth2");
        assert_eq!(s.options.ports.to_string(), "9000");
        assert!(!s.options.accel);
        assert_eq!(s.drain_timeout, 0);
        assert_eq!(s.log_format, LogFormat::Text);
        assert_eq!(s.options.proxy_port, 15001);
        assert_eq!(s.options.steer, Steer::Tproxy);
        // Even a flag set to its default beats the file.
        let s = run_with(yaml, &["--proxy-port", "15006", "--steer", "rewrite"]).unwrap();
        assert_eq!(s.options.proxy_port, 15006);
        assert_eq!(s.options.steer, Steer::Rewrite);
        // --accel beats `accel: false`.
        let off = "iface: eth0\nports: 80\naccel: false\n";
        assert!(!run_with(off, &[]).unwrap().options.accel);
        assert!(run_with(off, &["--accel"]).unwrap().options.accel);
        assert!(
            !run_with(off, &["--accel", "--no-accel"])
                .unwrap()
                .options
                .accel
        );
    }

    #[test]
    fn iface_and_ports_are_needed_from_somewhere() {
        let e = run_with("ports: 8000\n", &[]).unwrap_err();
        assert!(matches!(e, Error::Missing { key: "iface", .. }), "{e}");
        assert!(e.is_usage());
        let e = run_with("iface: eth0\n", &[]).unwrap_err();
        assert!(matches!(e, Error::Missing { key: "ports", .. }), "{e}");
        assert!(run_with("iface: eth0\n", &["-ports", "80"]).is_ok());
        // Without --config, clap itself still requires both.
        for args in [&["tproxy", "-i", "eth0"][..], &["tproxy", "-ports", "80"]] {
            assert!(
                parse_from(args.iter().map(OsString::from)).is_err(),
                "{args:?}"
            );
        }
    }

    #[test]
    fn file_errors_name_the_file() {
        let e = run_with("proxy_port: 0\n", &["-i", "eth0", "-ports", "80"]).unwrap_err();
        assert!(e.is_usage());
        let line = crate::error::Chain(&e).to_string();
        assert!(line.starts_with("config file /"), "{line}");
        assert!(
            line.contains(": proxy_port: port 0 is out of range"),
            "{line}"
        );
        let (cli, m) = parse_from(
            ["tproxy", "--config", "/nonexistent/tproxy.yaml"]
                .iter()
                .map(OsString::from),
        )
        .unwrap();
        let e = resolve(&cli, &m).unwrap_err();
        assert!(e.is_usage());
        assert_eq!(
            crate::error::Chain(&e).to_string(),
            "reading config file /nonexistent/tproxy.yaml: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn no_config_is_the_flags() {
        let s = flags(&["tproxy", "-i", "eth0", "-ports", "8000"]);
        let (cli, _) = parse_from(
            ["tproxy", "-i", "eth0", "-ports", "8000"]
                .iter()
                .map(OsString::from),
        )
        .unwrap();
        assert_eq!(s.options, cli.run.options());
        assert_eq!(s.drain_timeout, 30);
        assert_eq!(s.log_format, LogFormat::Text);
        assert_eq!(s.metrics_addr, None);
    }

    /// The annotated example in the repository parses, and means what the
    /// same settings as flags mean.
    #[test]
    fn the_example_equals_its_flags() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/tproxy.yaml");
        let (cli, m) = parse_from(["tproxy", "--config", path].iter().map(OsString::from)).unwrap();
        let from_file = resolve(&cli, &m).unwrap();
        let from_flags = flags(&[
            "tproxy",
            "-i",
            "eth0",
            "-ports",
            "8000,8080,9000-9010",
            "--cgroup",
            "/sys/fs/cgroup/unified/app",
            "--proxy-port",
            "15006",
            "--proxy-mark",
            "0x539",
            "--steer",
            "rewrite",
            "--tc-mode",
            "auto",
            "--accel-max-queued",
            "16777216",
            "--drain-timeout",
            "30",
            "--log-format",
            "text",
        ]);
        assert_eq!(from_file, from_flags);
        from_file.options.validate().unwrap();
    }
}
