//! Command line. `tproxy -i eth0 -ports 8000` (Go-style single-dash long
//! flags, as in the lab that inspired tproxy) is accepted alongside
//! `--ports`.
use std::{ffi::OsString, path::PathBuf};

use clap::{ArgMatches, CommandFactory as _, FromArgMatches as _, Parser, Subcommand};

use crate::{
    PortSet,
    options::{Options, Steer},
    tc::TcMode,
};

pub const DEFAULT_PROXY_PORT: u16 = 15006;
/// Istio's mark for the proxy's own traffic; Envoy configs commonly use it.
pub const DEFAULT_PROXY_MARK: u32 = 0x539;
/// Longest --drain-timeout: a day (a longer wait is a mistake, and the
/// deadline must stay representable).
pub const MAX_DRAIN_TIMEOUT: u64 = 86_400;

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
    pub run: RunArgs,

    /// More logging (-v debug, -vv trace); RUST_LOG (or TPROXY_LOG), when set, wins.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    /// Log lines as text, or as one JSON object per line for log shippers [default: text].
    #[arg(long, value_enum, value_name = "FORMAT", global = true)]
    pub log_format: Option<LogFormat>,
}

/// How log lines are written (to stderr).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object per line: timestamp, level, fields.message.
    Json,
}

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

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The node agent: loads the programs once and attaches them per target
    /// (a pod), added and removed at run time through --socket or --targets-dir.
    Agent(crate::agent::AgentArgs),
    /// Print the counters of the running instance(s), once or with --watch.
    Stats(StatsArgs),
    /// Check, attaching nothing, that a run with these options would work:
    /// one line per requirement, with the fix for each that fails (exit 1).
    Check(crate::check::CheckArgs),
    /// Every instance on the host (all network namespaces), checked against
    /// the kernel; exit 1 if one is dead (stale) or degraded.
    Status {
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
        /// The node agent instead: its targets, each with its figures, and
        /// the node total.
        #[arg(long)]
        agent: bool,
        /// The agent's state directory (implies --agent) [default: /run/tproxy/agent].
        #[arg(long, value_name = "DIR")]
        agent_state_dir: Option<std::path::PathBuf>,
    },
    /// Remove what killed instances left (netlink tc filters and qdisc,
    /// policy routing, nftables table, runtime record); by default those of
    /// this network namespace. Never touches a running instance.
    Cleanup {
        /// Every dead instance on the host, entering its network namespace.
        #[arg(long, conflicts_with = "iface")]
        all: bool,
        /// Only the dead instance on this interface (this network namespace).
        #[arg(short = 'i', long = "iface", value_name = "IFACE")]
        iface: Option<String>,
    },
}

#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    /// Only the instance on this interface.
    #[arg(short = 'i', long = "iface")]
    pub iface: Option<String>,
    /// JSON instead of a table (with --watch: one JSON object per line).
    #[arg(long)]
    pub json: bool,
    /// Instances in every network namespace, not just this one.
    #[arg(long)]
    pub all: bool,
    /// The node agent instead: per-target figures and the node total.
    #[arg(long)]
    pub agent: bool,
    /// The agent's state directory (implies --agent) [default: /run/tproxy/agent].
    #[arg(long, value_name = "DIR")]
    pub agent_state_dir: Option<std::path::PathBuf>,
    /// Keep printing totals and per-second rates every --interval until
    /// Ctrl-C: redrawn in place on a terminal, a line per interval when
    /// piped.
    #[arg(short = 'w', long)]
    pub watch: bool,
    /// Seconds between samples with --watch (fractions allowed).
    #[arg(long, value_name = "SECONDS", default_value = "1", value_parser = parse_interval, requires = "watch")]
    pub interval: std::time::Duration,
}

/// Parses the command line (after `normalize_args`), keeping clap's matches:
/// they tell which flags were given (and so override `--config`).
pub fn parse_from(
    args: impl IntoIterator<Item = OsString>,
) -> Result<(Cli, ArgMatches), clap::Error> {
    let matches = Cli::command().try_get_matches_from(normalize_args(args))?;
    let cli = Cli::from_arg_matches(&matches)?;
    Ok((cli, matches))
}

fn parse_ports(s: &str) -> Result<PortSet, crate::Error> {
    s.parse()
}

fn parse_interval(s: &str) -> Result<std::time::Duration, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.05..=86400.0).contains(&v) => Ok(std::time::Duration::from_secs_f64(v)),
        _ => Err(format!(
            "{s:?} is not an interval in seconds from 0.05 to 86400"
        )),
    }
}

pub(crate) fn parse_mark(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("{s:?} is not a 32-bit mark (decimal or 0x hex)"))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(normalize_args(args.iter().map(OsString::from)))
    }

    #[test]
    fn single_dash_ports_like_the_lab() {
        let cli = parse(&["tproxy", "-i", "eth0", "-ports", "8000"]).unwrap();
        let o = cli.run.options();
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
        assert_eq!(cli.run.drain_timeout, 0);
        let o = cli.run.options();
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
        assert!(cli.run.iface.is_none());
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
        assert_eq!(cli.run.options().ports.to_string(), "80");
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
        assert!(matches!(
            cli.run.options().validate(),
            Err(crate::Error::ProxyPortIntercepted(15006))
        ));
    }

    #[test]
    fn reserved_route_tables_are_refused_without_privileges() {
        for t in ["0", "253", "254", "0xff"] {
            let cli = parse(&["tproxy", "-i", "eth0", "-ports", "80", "--route-table", t]).unwrap();
            assert!(
                matches!(
                    cli.run.options().validate(),
                    Err(crate::Error::ReservedTable(_))
                ),
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
        assert!(cli.run.options().validate().is_ok());
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
        assert_eq!(cli.run.metrics_addr, None);
        for a in ["127.0.0.1:9090", "[::1]:9090"] {
            let cli = parse(&["tproxy", "-i", "eth0", "-ports", "80", "-metrics-addr", a]).unwrap();
            assert_eq!(cli.run.metrics_addr, Some(a.parse().unwrap()));
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
        assert_eq!(a.iface.as_deref(), Some("eth0"));
        assert_eq!(a.steer, Steer::Tproxy);
        assert_eq!(a.proxy_port, 15001);
        assert!(a.json && !a.no_accel);
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
            Some(Command::Status { json: true, .. })
        ));
        let cli = parse(&["tproxy", "cleanup", "-iface", "eth1"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Cleanup { all: false, iface: Some(ref i) }) if i == "eth1"
        ));
        assert!(parse(&["tproxy", "cleanup", "--all", "-i", "eth0"]).is_err());
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
