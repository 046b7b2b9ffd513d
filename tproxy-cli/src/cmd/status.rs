//! `tproxy status`: every single run on the host, or the node agent.
use std::path::PathBuf;

use crate::observe::{Result, agent_view, status};

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// The node agent instead: its targets, each with its figures, and
    /// the node total.
    #[arg(long)]
    pub agent: bool,
    /// The agent's state directory (implies --agent) [default: /run/tproxy/agent].
    #[arg(long, value_name = "DIR")]
    pub agent_state_dir: Option<PathBuf>,
}

impl StatusArgs {
    pub fn run(&self) -> Result<()> {
        if self.agent || self.agent_state_dir.is_some() {
            agent_view::run_status(self.agent_state_dir.as_deref(), self.json)
        } else {
            status::run(self.json)
        }
    }
}
