//! Command line. `tproxy -i eth0 -ports 8000` (Go-style single-dash long
//! flags, as in the lab that inspired tproxy) is accepted alongside
//! `--ports`.
//!
//! One file per subcommand: its flags (clap lives only in this folder) and
//! how it runs; `main` here parses, sets up logging and dispatches.
pub mod agent;
pub mod check;
pub mod cleanup;
pub mod dist;
pub mod flows;
pub mod run;
pub mod stats;
pub mod status;
use std::{ffi::OsString, process::ExitCode};

use clap::{CommandFactory as _, Parser, Subcommand};

use crate::{config::options::LogFormat, sys::error::Chain};

#[derive(Debug, Parser)]
#[command(
    name = "tproxy",
    version,
    about = "Put a local proxy transparently in front of an application with eBPF, and short-circuit the proxy->app leg in the kernel.",
    long_about = None,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Example: sudo tproxy -i eth0 -ports 8000\nServes until SIGINT/SIGTERM, then removes everything it installed.\n\nSettings can also come from a YAML file (--config FILE, keys as the flags: examples/tproxy.yaml); flags override it. Logging: RUST_LOG (or TPROXY_LOG) sets the filter, -v/-vv raise the default level. Exit status: 1 on errors, 2 on a bad command line or config file."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub run: run::RunArgs,

    /// More logging (-v debug, -vv trace); RUST_LOG (or TPROXY_LOG), when set, wins.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    /// Log lines as text, or as one JSON object per line for log shippers [default: text].
    #[arg(long, value_enum, value_name = "FORMAT", global = true)]
    pub log_format: Option<LogFormat>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The node agent: loads the programs once and attaches them per target
    /// (a pod), added and removed at run time through --socket or --targets-dir.
    Agent(agent::AgentArgs),
    /// Print the counters of the running instance(s), once or with --watch.
    Stats(stats::StatsArgs),
    /// Every steered flow (the `conntrack -L` of tproxy): client, dialled
    /// address, state, and what became of its proxy<->app pair, and why.
    Flows(flows::FlowsArgs),
    /// Check, attaching nothing, that a run with these options would work:
    /// one line per requirement, with the fix for each that fails (exit 1).
    Check(check::CheckArgs),
    /// Every instance on the host (all network namespaces), checked against
    /// the kernel; exit 1 if one is dead (stale) or degraded.
    Status(status::StatusArgs),
    /// Remove what killed instances left (netlink tc filters and qdisc,
    /// policy routing, nftables table, runtime record); by default those of
    /// this network namespace. Never touches a running instance.
    Cleanup(cleanup::CleanupArgs),
}

/// Parses the command line (after `normalize_args`).
pub fn parse_from(args: impl IntoIterator<Item = OsString>) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(normalize_args(args))
}

/// Rewrites Go-style `-ports 8000` / `-proxy-port=…` into `--ports …`, for
/// every long option whose name is longer than one letter.
pub fn normalize_args(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let cmd = Cli::command();
    let mut longs: Vec<String> = cmd
        .get_arguments()
        .filter_map(|a| a.get_long().map(String::from))
        .collect();
    longs.extend(["help".to_string(), "version".to_string()]);
    for sub in cmd.get_subcommands() {
        longs.extend(
            sub.get_arguments()
                .filter_map(|a| a.get_long().map(String::from)),
        );
    }
    let mut out = Vec::new();
    let mut after_dashdash = false;
    for arg in args {
        if after_dashdash {
            out.push(arg);
            continue;
        }
        let rewritten = arg.to_str().and_then(|s| {
            if s == "--" {
                after_dashdash = true;
                return None;
            }
            let body = s.strip_prefix('-').filter(|b| !b.starts_with('-'))?;
            let name = body.split('=').next()?;
            (name.len() > 1 && longs.iter().any(|l| l == name)).then(|| format!("-{s}"))
        });
        out.push(rewritten.map(OsString::from).unwrap_or(arg));
    }
    out
}

/// The log filter: RUST_LOG when set, else TPROXY_LOG (the older name),
/// else info, debug (-v) or trace (-vv).
fn log_filter(verbose: u8) -> crate::config::Result<tracing_subscriber::EnvFilter> {
    for var in ["RUST_LOG", "TPROXY_LOG"] {
        if let Some(value) = std::env::var(var).ok().filter(|v| !v.trim().is_empty()) {
            return tracing_subscriber::EnvFilter::builder()
                .parse(&value)
                .map_err(|source| crate::config::Error::LogFilter { var, value, source });
        }
    }
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    Ok(tracing_subscriber::EnvFilter::new(default))
}

fn init_logging(filter: tracing_subscriber::EnvFilter, format: LogFormat) {
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => fmt.json().init(),
    }
}

/// Usage errors in one line, like every other error.
fn usage_error(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let parts: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information")
        })
        .collect();
    let msg = parts.join(" ");
    format!(
        "{} (see `tproxy --help`)",
        msg.trim_start_matches("error: ")
    )
}

/// The `tproxy` binary: parse, set up logging, run the command, and exit
/// 0, 1 (an error) or 2 (a bad command line or config file).
pub fn main() -> ExitCode {
    let cli = match parse_from(std::env::args_os()) {
        Ok(parsed) => parsed,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            eprintln!("tproxy: {}", usage_error(&e));
            return ExitCode::from(2);
        }
    };
    // The run's settings come before logging: the file may set its format.
    let settings = match cli.command {
        None => Some(run::resolve(&cli)),
        Some(_) => None,
    };
    let format = match &settings {
        Some(Ok(s)) => s.log_format,
        _ => cli.log_format.unwrap_or_default(),
    };
    if let Err(e) = log_filter(cli.verbose).map(|filter| init_logging(filter, format)) {
        eprintln!("tproxy: {}", Chain(&e));
        return ExitCode::from(2);
    }
    let result: anyhow::Result<()> = match &cli.command {
        Some(Command::Agent(args)) => args
            .settings()
            .map_err(anyhow::Error::from)
            .and_then(|s| Ok(crate::agent::run(&s)?)),
        Some(Command::Stats(args)) => stats::run(args).map_err(Into::into),
        Some(Command::Flows(args)) => args.run().map_err(Into::into),
        Some(Command::Check(args)) => args.run().map_err(Into::into),
        Some(Command::Status(args)) => args.run().map_err(Into::into),
        Some(Command::Cleanup(args)) => args.run(),
        None => settings
            .expect("resolved for a run")
            .map_err(Into::into)
            .and_then(|s| run::serve(&s)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes, down to the errno.
            let line = Chain(e.as_ref()).to_string();
            let usage = e
                .downcast_ref::<crate::config::Error>()
                .is_some_and(crate::config::Error::is_usage);
            if format == LogFormat::Json {
                tracing::error!("{line}");
            } else {
                eprintln!("tproxy: {line}");
            }
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::{Steer, cmd::stats::StatsArgs, config};

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        parse_from(args.iter().map(OsString::from))
    }

    /// The run's options (checked), from the flags alone.
    fn options(cli: &Cli) -> crate::config::Result<crate::Options> {
        run::resolve(cli).map(|s| s.options)
    }

    #[test]
    fn single_dash_ports_like_the_lab() {
        let cli = parse(&["tproxy", "-i", "eth0", "-ports", "8000"]).unwrap();
        let o = options(&cli).unwrap();
        assert_eq!(o.iface, "eth0");
        assert_eq!(o.ports.to_string(), "8000");
        assert_eq!(o.proxy_port, 15006);
        assert_eq!(o.proxy_mark, 0x539);
        assert!(o.accel);
    }

    #[test]
    fn double_dash_and_equals_forms() {
        let cli = parse(&[
            "tproxy",
            "--iface=eth1",
            "--ports=8000,8080,9000-9010",
            "-proxy-port=15001",
            "-proxy-mark",
            "0x10",
            "--no-accel",
            "--cgroup",
            "/sys/fs/cgroup/unified/x",
            "-steer",
            "tproxy",
            "--steer-mark=0x20",
            "--drain-timeout",
            "0",
        ])
        .unwrap();
        assert_eq!(cli.run.keys.drain_timeout, Some(0));
        let o = options(&cli).unwrap();
        assert_eq!(o.steer, Steer::Tproxy);
        assert_eq!(o.steer_mark, Some(0x20));
        assert_eq!(o.iface, "eth1");
        assert_eq!(o.ports.len(), 13);
        assert_eq!(o.proxy_port, 15001);
        assert_eq!(o.proxy_mark, 16);
        assert!(!o.accel);
        assert_eq!(o.cgroup.unwrap(), PathBuf::from("/sys/fs/cgroup/unified/x"));
    }

    #[test]
    fn config_and_log_format_flags_go_style_too() {
        let cli = parse(&[
            "tproxy",
            "-config",
            "/etc/tproxy.yaml",
            "-log-format",
            "json",
        ])
        .unwrap();
        assert_eq!(
            cli.run.config.as_deref(),
            Some(std::path::Path::new("/etc/tproxy.yaml"))
        );
        assert_eq!(cli.log_format, Some(LogFormat::Json));
        // Without -i and -ports: the file must hold them (config::resolve).
        assert!(cli.run.target.iface.is_none());
        let cli = parse(&["tproxy", "stats", "--log-format", "json"]).unwrap();
        assert_eq!(cli.log_format, Some(LogFormat::Json));
        for args in [
            &["tproxy", "-config", "x.yaml", "stats"][..],
            &[
                "tproxy",
                "--log-format",
                "xml",
                "-i",
                "eth0",
                "-ports",
                "80",
            ],
            &[
                "tproxy",
                "-i",
                "eth0",
                "-ports",
                "80",
                "--drain-timeout",
                "86401",
            ],
        ] {
            assert!(parse(args).is_err(), "{args:?} parsed");
        }
    }

    #[test]
    fn short_flags_are_left_alone() {
        let cli = parse(&["tproxy", "-vv", "-i", "eth0", "-p", "80"]).unwrap();
        assert_eq!(cli.verbose, 2);
        assert_eq!(options(&cli).unwrap().ports.to_string(), "80");
    }

    #[test]
    fn bad_input_is_a_usage_error() {
        for args in [
            &["tproxy", "-i", "eth0"][..],
            &["tproxy", "-ports", "8000"],
            &["tproxy", "-i", "eth0", "-ports", ""],
            &["tproxy", "-i", "eth0", "-ports", "0"],
            &["tproxy", "-i", "eth0", "-ports", "70000"],
            &["tproxy", "-i", "eth0", "-ports", "80,x"],
            &["tproxy", "-i", "eth0", "-ports", "80", "--proxy-port", "0"],
            &["tproxy", "-i", "eth0", "-ports", "80", "--proxy-mark", "zz"],
            &["tproxy", "-i", "eth0", "-ports", "80", "--bogus"],
        ] {
            assert!(parse(args).is_err(), "{args:?} parsed");
        }
    }

    #[test]
    fn proxy_port_inside_the_set_is_refused() {
        let cli = parse(&["tproxy", "-i", "eth0", "-ports", "15000-15010"]).unwrap();
        let e = options(&cli).unwrap_err();
        assert!(
            matches!(e, config::Error::ProxyPortIntercepted { port: 15006, .. }),
            "{e}"
        );
        // Named as the flags it came from; exit 1 (not a usage error) as
        // when the instance found it.
        assert!(
            e.to_string()
                .ends_with("choose another --proxy-port or drop 15006 from --ports")
        );
        assert!(!e.is_usage());
    }

    #[test]
    fn reserved_route_tables_are_refused_without_privileges() {
        for t in ["0", "253", "254", "0xff"] {
            let cli = parse(&["tproxy", "-i", "eth0", "-ports", "80", "--route-table", t]).unwrap();
            assert!(
                matches!(options(&cli), Err(config::Error::ReservedTable { .. })),
                "{t}"
            );
        }
        let cli = parse(&[
            "tproxy",
            "-i",
            "eth0",
            "-ports",
            "80",
            "--route-table",
            "100",
        ])
        .unwrap();
        assert!(options(&cli).is_ok());
    }

    #[test]
    fn stats_subcommand_needs_no_iface() {
        let cli = parse(&["tproxy", "stats", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Stats(StatsArgs {
                json: true,
                watch: false,
                ..
            }))
        ));
    }

    #[test]
    fn stats_watch_interval() {
        let cli = parse(&["tproxy", "stats", "-watch", "-interval", "0.2"]).unwrap();
        let Some(Command::Stats(a)) = cli.command else {
            panic!("not stats")
        };
        assert!(a.watch);
        assert_eq!(a.interval, std::time::Duration::from_millis(200));
        let Some(Command::Stats(a)) = parse(&["tproxy", "stats", "-w"]).unwrap().command else {
            panic!("not stats")
        };
        assert_eq!(a.interval, std::time::Duration::from_secs(1));
        for bad in [
            &["tproxy", "stats", "--interval", "2"][..], // without --watch
            &["tproxy", "stats", "--watch", "--interval", "0"],
            &["tproxy", "stats", "--watch", "--interval", "-1"],
            &["tproxy", "stats", "--watch", "--interval", "nan"],
            &["tproxy", "stats", "--watch", "--interval", "x"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    /// The agent's metrics are off unless asked for; `--metrics-addr`
    /// alone is the node's loopback (its figures name pods).
    #[test]
    fn the_agents_metrics_default_to_loopback() {
        let agent = |args: &[&str]| {
            let all: Vec<&str> = ["tproxy", "agent"].iter().chain(args).copied().collect();
            match parse(&all).unwrap().command {
                Some(Command::Agent(a)) => a.metrics_addr,
                _ => panic!("not agent"),
            }
        };
        assert_eq!(agent(&[]), None);
        let lo = Some("127.0.0.1:9464".parse().unwrap());
        assert_eq!(agent(&["--metrics-addr"]), lo);
        assert_eq!(agent(&["--metrics-addr", "--socket", "/s"]), lo);
        assert_eq!(
            agent(&["--metrics-addr", "[::1]:9100"]),
            Some("[::1]:9100".parse().unwrap())
        );
    }

    #[test]
    fn metrics_addr_v4_and_v6() {
        let cli = parse(&["tproxy", "-i", "eth0", "-ports", "80"]).unwrap();
        assert_eq!(cli.run.keys.metrics_addr, None);
        for a in ["127.0.0.1:9090", "[::1]:9090"] {
            let cli = parse(&["tproxy", "-i", "eth0", "-ports", "80", "-metrics-addr", a]).unwrap();
            assert_eq!(cli.run.keys.metrics_addr, Some(a.parse().unwrap()));
        }
        for bad in ["9090", "localhost:9090", "127.0.0.1", "::1:9090"] {
            assert!(
                parse(&[
                    "tproxy",
                    "-i",
                    "eth0",
                    "-ports",
                    "80",
                    "--metrics-addr",
                    bad
                ])
                .is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn check_subcommand_takes_the_run_options_go_style_too() {
        let cli = parse(&[
            "tproxy",
            "check",
            "-i",
            "eth0",
            "-steer",
            "tproxy",
            "-proxy-port",
            "15001",
            "--json",
        ])
        .unwrap();
        let Some(Command::Check(a)) = cli.command else {
            panic!("{:?}", cli.command)
        };
        assert_eq!(a.target.iface.as_deref(), Some("eth0"));
        assert_eq!(a.target.steer, Some(Steer::Tproxy));
        assert_eq!(a.target.proxy_port, Some(15001));
        assert!(a.json && !a.target.no_accel);
        // Nothing is required.
        assert!(matches!(
            parse(&["tproxy", "check"]).unwrap().command,
            Some(Command::Check(_))
        ));
    }

    #[test]
    fn status_and_cleanup_subcommands() {
        let cli = parse(&["tproxy", "status", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Status(status::StatusArgs { json: true, .. }))
        ));
        let cli = parse(&["tproxy", "cleanup", "-iface", "eth1"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Cleanup(cleanup::CleanupArgs { all: false, iface: Some(ref i) })) if i == "eth1"
        ));
        assert!(parse(&["tproxy", "cleanup", "--all", "-i", "eth0"]).is_err());
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
