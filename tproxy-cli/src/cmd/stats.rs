//! `tproxy stats`: its flags.

use crate::observe::{
    Result, agent_view,
    stats::{self, Query},
};

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

fn parse_interval(s: &str) -> std::result::Result<std::time::Duration, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.05..=86400.0).contains(&v) => Ok(std::time::Duration::from_secs_f64(v)),
        _ => Err(format!(
            "{s:?} is not an interval in seconds from 0.05 to 86400"
        )),
    }
}

/// `tproxy stats …`: the agent's figures, or those of single runs.
pub fn run(args: &StatsArgs) -> Result<()> {
    if args.agent || args.agent_state_dir.is_some() {
        crate::sys::system::check_privileges()?;
        return agent_view::run_stats(args.agent_state_dir.as_deref(), args.json);
    }
    stats::run(&Query {
        iface: args.iface.clone(),
        all: args.all,
        json: args.json,
        watch: args.watch,
        interval: args.interval,
    })
}
