//! `tproxy -i IFACE -ports PORTS`: one instance, served until a signal,
//! then drained and removed. Its flags, merged with `--config`.
use std::{net::SocketAddr, path::PathBuf};

use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

use super::Cli;
use crate::{
    Instance,
    config::{
        Options, Result, Role, Target,
        file::{FileConfig, RunKeys},
        options::{DEFAULT_DRAIN_TIMEOUT, LogFormat},
    },
    observe::metrics,
    sys::error::Chain,
    target,
};

/// `tproxy`'s flags: a target's ([`Target`]: -i, -ports, --proxy-port…)
/// and the run's own ([`RunKeys`]), each of them also a `--config` key.
#[derive(Debug, clap::Args)]
#[command(
    mut_arg("iface", |a| a.required_unless_present("config")),
    mut_arg("ports", |a| a.required_unless_present("config"))
)]
pub struct RunArgs {
    /// Read these settings from a YAML file (keys as the flags, with `_`:
    /// see examples/tproxy.yaml); flags given here override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub target: Target,

    #[command(flatten)]
    pub keys: RunKeys,
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
/// else from `--config`, else its default; checked.
pub fn resolve(cli: &Cli) -> Result<RunSettings> {
    let file = match &cli.run.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    merge(cli, file)
}

/// `resolve` with the file already read.
pub fn merge(cli: &Cli, file: FileConfig) -> Result<RunSettings> {
    let run = &cli.run;
    // A flag not given is None: whatever is set on the command line beats
    // the file (`--proxy-port 15006` does, even though it is the default).
    let options = (run.target.clone().or(file.target)).resolve(Role::Run {
        file: run.config.is_some(),
    })?;
    let keys = RunKeys {
        log_format: cli.log_format,
        ..run.keys.clone()
    }
    .or(file.run);
    Ok(RunSettings {
        options,
        drain_timeout: keys.drain_timeout.unwrap_or(DEFAULT_DRAIN_TIMEOUT),
        metrics_addr: keys.metrics_addr,
        log_format: keys.log_format.unwrap_or_default(),
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
    use crate::{Steer, cmd::parse_from, config};
    /// `tproxy ARGS…` resolved against a config file holding `yaml`.
    fn run_with(yaml: &str, args: &[&str]) -> Result<RunSettings> {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(yaml.as_bytes()).unwrap();
        let path = f.path().to_str().unwrap().to_string();
        let mut argv = vec!["tproxy", "--config", &path];
        argv.extend_from_slice(args);
        let cli = parse_from(argv.iter().map(OsString::from)).unwrap();
        resolve(&cli)
    }

    fn flags(args: &[&str]) -> RunSettings {
        let cli = parse_from(args.iter().map(OsString::from)).unwrap();
        resolve(&cli).unwrap()
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
        assert!(
            matches!(e, config::Error::Missing { key: "iface", .. }),
            "{e}"
        );
        assert!(e.is_usage());
        let e = run_with("iface: eth0\n", &[]).unwrap_err();
        assert!(
            matches!(e, config::Error::Missing { key: "ports", .. }),
            "{e}"
        );
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
        let line = crate::sys::error::Chain(&e).to_string();
        assert!(line.starts_with("config file /"), "{line}");
        assert!(
            line.contains(": proxy_port: port 0 is out of range"),
            "{line}"
        );
        let cli = parse_from(
            ["tproxy", "--config", "/nonexistent/tproxy.yaml"]
                .iter()
                .map(OsString::from),
        )
        .unwrap();
        let e = resolve(&cli).unwrap_err();
        assert!(e.is_usage());
        assert_eq!(
            crate::sys::error::Chain(&e).to_string(),
            "reading config file /nonexistent/tproxy.yaml: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn no_config_is_the_flags() {
        let s = flags(&["tproxy", "-i", "eth0", "-ports", "8000"]);
        let want = Target {
            ports: Some("8000".parse().unwrap()),
            ..Target::on("eth0")
        };
        assert_eq!(s.options, want.resolve(Role::Run { file: false }).unwrap());
        assert_eq!(s.drain_timeout, 30);
        assert_eq!(s.log_format, LogFormat::Text);
        assert_eq!(s.metrics_addr, None);
    }

    /// The annotated example in the repository parses, and means what the
    /// same settings as flags mean.
    #[test]
    fn the_example_equals_its_flags() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/tproxy.yaml");
        let cli = parse_from(["tproxy", "--config", path].iter().map(OsString::from)).unwrap();
        let from_file = resolve(&cli).unwrap();
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

    /// A flag has no clap default (not given, it is None, and a --config
    /// key may fill it in): its help states the default, which must be
    /// the one `resolve` takes.
    #[test]
    fn help_states_the_defaults_resolve_uses() {
        use clap::{CommandFactory as _, ValueEnum as _};
        let s = flags(&["tproxy", "-i", "eth0", "-ports", "80"]);
        let o = &s.options;
        let name = |v: Option<clap::builder::PossibleValue>| v.unwrap().get_name().to_string();
        let mut cli = Cli::command();
        let help = cli.render_long_help().to_string();
        let check = (cli.find_subcommand_mut("check").unwrap())
            .render_long_help()
            .to_string();
        for (help, flag, value) in [
            (&help, "--proxy-port", o.proxy_port.to_string()),
            (&check, "--proxy-port", o.proxy_port.to_string()),
            (&help, "--proxy-mark", format!("{:#x}", o.proxy_mark)),
            (&help, "--accel-max-queued", o.accel_max_queued.to_string()),
            (&help, "--accel-retire-ms", o.accel_retire_ms.to_string()),
            (
                &help,
                "--accel-min-message",
                o.accel_min_message.to_string(),
            ),
            (&help, "--tc-mode", name(o.tc_mode.to_possible_value())),
            (&help, "--steer", name(o.steer.to_possible_value())),
            (&help, "--drain-timeout", s.drain_timeout.to_string()),
            (
                &help,
                "--log-format",
                name(s.log_format.to_possible_value()),
            ),
        ] {
            let entry = help.split_once(&format!("      {flag} <")).unwrap().1;
            let entry = entry.split("\n      --").next().unwrap();
            assert!(
                entry.contains(&format!("[default: {value}]")),
                "{flag}: {entry}"
            );
        }
    }
}
