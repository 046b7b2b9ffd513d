//! `tproxy agent`: its flags and `--config` file, resolved into the
//! agent's settings.
use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

use crate::{
    agent::{
        DEFAULT_BPFFS, DEFAULT_MAX_TARGETS, DEFAULT_METRICS_ADDR, DEFAULT_TARGETS_DIR, Settings,
        registry,
    },
    target::{agent_state::default_state_dir, loader::MapSizes},
};

/// `tproxy agent` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// The agent API's Unix socket (mode 0600).
    #[arg(long, value_name = "PATH", default_value = crate::api::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Target files (`*.yaml`, the --config target keys plus `netns` and `name`), rescanned every second.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_TARGETS_DIR)]
    pub targets_dir: PathBuf,
    /// bpffs directory for the pins that keep targets attached across restarts (on a bpf filesystem, or an empty directory: one is mounted on it).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
    /// Where the agent keeps its state file and lock [default: /run/tproxy/agent].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Most targets at once (sizes TARGETS and COUNTERS) [default: 256].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=65_535))]
    pub max_targets: Option<u32>,
    /// How long removing a target waits for its steered flows to finish [default: 30].
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(..=crate::config::options::MAX_DRAIN_TIMEOUT))]
    pub drain_timeout: Option<u64>,
    /// Do not pair a client in one pod of this node with another pod's
    /// proxy: only the proxy->app leg goes socket to socket.
    #[arg(long)]
    pub no_accel_same_node: bool,
    /// (The default; kept so that command lines which asked for same-node
    /// pairing when it was off by default still work.)
    #[arg(long, hide = true, conflicts_with = "no_accel_same_node")]
    pub accel_same_node: bool,
    /// Serve Prometheus metrics on http://ADDR/metrics: every counter and
    /// gauge per target (labels `target`, `pod`); without ADDR the node's
    /// loopback, 127.0.0.1:9464 (the figures name pods: expose them with care).
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Most open steered flows (FLOWS entries) one target may hold, unless
    /// its spec says (`flows_quota`); past it, its new flows stay
    /// embryonic, so one pod's clients cannot take the node's table from
    /// the others; 0: no quota [default: the table (flows_max) / 8, or an
    /// equal share with fewer than 8 --max-targets].
    #[arg(long, value_name = "N")]
    pub flows_quota: Option<u32>,
    /// Most sockets one target may have accelerated (SOCKHASH entries),
    /// unless its spec says (`socks_quota`); past it, its new connections
    /// stay plain TCP; 0: no quota [default: socks_max / 8, or an equal
    /// share with fewer than 8 --max-targets].
    #[arg(long, value_name = "N")]
    pub socks_quota: Option<u32>,
    /// Agent settings in YAML: max_targets, drain_timeout, flows_max, flows_quota, syns_max, closing_max, socks_max, socks_quota.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// `--config` of the agent: sizes for the node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub max_targets: Option<u32>,
    pub drain_timeout: Option<u64>,
    /// Open flows, node-wide (FLOWS).
    pub flows_max: Option<u32>,
    /// A target's default quota of FLOWS entries (`--flows-quota`).
    pub flows_quota: Option<u32>,
    /// Embryonic flows (SYNS, LRU).
    pub syns_max: Option<u32>,
    /// Closed flows lingering (CLOSING, LRU).
    pub closing_max: Option<u32>,
    /// Accelerated sockets (SOCKHASH and SOCKS).
    pub socks_max: Option<u32>,
    /// A target's default quota of accelerated sockets (`--socks-quota`).
    pub socks_quota: Option<u32>,
}

/// A target's quota of a node-wide table (FLOWS, the SOCKHASH) when
/// neither its spec nor the agent's flags name one: an eighth of the table
/// (a pod's clients holding idle connections take at most that much from
/// the others), or an equal share when the agent serves fewer than 8
/// targets.
pub fn default_quota(table: u32, max_targets: u32) -> u32 {
    (table / max_targets.clamp(1, 8)).max(1)
}

impl AgentArgs {
    /// The agent's settings: each flag, else its key in --config, else its default.
    pub fn settings(&self) -> crate::config::Result<Settings> {
        let args = self;
        let file = match &args.config {
            Some(p) => crate::config::file::load::<Option<AgentConfig>>(p)?.unwrap_or_default(),
            None => AgentConfig::default(),
        };
        let max_targets = args
            .max_targets
            .or(file.max_targets)
            .unwrap_or(DEFAULT_MAX_TARGETS);
        let drain = Duration::from_secs(args.drain_timeout.or(file.drain_timeout).unwrap_or(30));
        let quotas = registry::Quotas {
            flows: args.flows_quota.or(file.flows_quota).unwrap_or_else(|| {
                default_quota(
                    file.flows_max.unwrap_or(tproxy_common::FLOWS_MAX),
                    max_targets,
                )
            }),
            socks: args.socks_quota.or(file.socks_quota).unwrap_or_else(|| {
                default_quota(
                    file.socks_max.unwrap_or(tproxy_common::SOCKHASH_MAX),
                    max_targets,
                )
            }),
        };
        Ok(Settings {
            socket: args.socket.clone(),
            targets_dir: args.targets_dir.clone(),
            bpffs: args.bpffs.clone(),
            state_dir: args.state_dir.clone().unwrap_or_else(default_state_dir),
            max_targets,
            drain,
            same_node: !args.no_accel_same_node,
            metrics_addr: args.metrics_addr,
            quotas,
            sizes: MapSizes {
                flows: file.flows_max,
                syns: file.syns_max,
                closing: file.closing_max,
                socks: file.socks_max,
            },
        })
    }
}
