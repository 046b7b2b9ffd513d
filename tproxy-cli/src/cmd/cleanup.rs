//! `tproxy cleanup`: remove what dead instances left.
use crate::{
    Result,
    target::recovery::{self, Scope},
};

#[derive(Debug, clap::Args)]
pub struct CleanupArgs {
    /// Every dead instance on the host, entering its network namespace.
    #[arg(long, conflicts_with = "iface")]
    pub all: bool,
    /// Only the dead instance on this interface (this network namespace).
    #[arg(short = 'i', long = "iface", value_name = "IFACE")]
    pub iface: Option<String>,
}

impl CleanupArgs {
    pub fn run(&self) -> Result<()> {
        recovery::run_cleanup(&Scope::new(self.all, self.iface.as_deref()))
    }
}
