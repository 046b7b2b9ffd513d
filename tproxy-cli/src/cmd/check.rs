//! `tproxy check`: its flags, and the options of the run they describe.
use std::path::PathBuf;

use crate::{
    PortSet,
    config::options::{DEFAULT_PROXY_PORT, Options, Steer, TcMode, parse_mark},
};

/// `tproxy check` takes the options of the run it checks for.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// Interface the run would steer on (left out: not checked).
    #[arg(short = 'i', long = "iface", value_name = "IFACE")]
    pub iface: Option<String>,

    /// cgroup v2 directory the run would attach to (default: the cgroup v2 root).
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,

    /// Steering back-end of the run.
    #[arg(long, value_enum, default_value_t = Steer::Rewrite)]
    pub steer: Steer,

    /// Check for a run without socket acceleration.
    #[arg(long)]
    pub no_accel: bool,

    /// Port of the proxy's inbound listener: something must listen there.
    #[arg(long, value_name = "PORT", default_value_t = DEFAULT_PROXY_PORT, value_parser = clap::value_parser!(u16).range(1..))]
    pub proxy_port: u16,

    /// SO_MARK of the proxy's upstream sockets (decimal or 0x hex).
    #[arg(long, value_name = "MARK", default_value = "0x539", value_parser = parse_mark)]
    pub proxy_mark: u32,

    /// How the run would attach its tc programs.
    #[arg(long, value_enum, default_value_t = TcMode::Auto)]
    pub tc_mode: TcMode,

    /// tproxy back-end: the steer mark the run would use.
    #[arg(long, value_name = "MARK", value_parser = parse_mark)]
    pub steer_mark: Option<u32>,

    /// tproxy back-end: the routing table the run would use.
    #[arg(long, value_name = "ID", value_parser = parse_mark)]
    pub route_table: Option<u32>,

    /// Address the run would serve Prometheus metrics on: it must be free.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// One JSON array of {name, ok, detail, fix} instead of lines.
    #[arg(long)]
    pub json: bool,
}

impl CheckArgs {
    /// The options of the run checked for (ports are not asked for: any
    /// will do that leaves the proxy port out).
    fn options(&self) -> Options {
        let other = if self.proxy_port == 1 { "2" } else { "1" };
        Options {
            iface: self.iface.clone().unwrap_or_else(|| "check".into()),
            ports: other.parse::<PortSet>().expect("a valid port"),
            cgroup: self.cgroup.clone(),
            proxy_cgroup: None,
            proxy_port: self.proxy_port,
            proxy_mark: self.proxy_mark,
            accel: !self.no_accel,
            tc_mode: self.tc_mode,
            steer: self.steer,
            steer_mark: self.steer_mark,
            route_table: self.route_table,
            accel_max_queued: tproxy_common::DEFAULT_ACCEL_MAX_QUEUED,
            accel_retire_ms: tproxy_common::DEFAULT_ACCEL_RETIRE_MS,
            flows_quota: 0,
            socks_quota: 0,
        }
    }
}

impl CheckArgs {
    /// Prints every requirement; an error if one fails.
    pub fn run(&self) -> crate::Result<()> {
        crate::observe::check::run(
            &self.options(),
            self.iface.is_some(),
            self.metrics_addr,
            self.json,
        )
    }
}
