//! `tproxy flows`: its flags.

use crate::observe::{Result, flows};

#[derive(Debug, clap::Args)]
pub struct FlowsArgs {
    /// Only the instance on this interface.
    #[arg(short = 'i', long = "iface")]
    pub iface: Option<String>,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Instances in every network namespace, not just this one.
    #[arg(long)]
    pub all: bool,
}

impl FlowsArgs {
    pub fn run(&self) -> Result<()> {
        flows::run(self.iface.as_deref(), self.all, self.json)
    }
}
