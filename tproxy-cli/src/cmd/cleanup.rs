//! `tproxy cleanup`: remove what dead instances left.
use anyhow::Result;

use crate::{
    sys::system,
    target::{
        self, agent_state,
        recovery::{self, Scope},
    },
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
        run_cleanup(&Scope::new(self.all, self.iface.as_deref()))
    }
}

/// `tproxy cleanup`: cleans up and says what it removed, one line per
/// object; an error if anything could not be removed.
fn run_cleanup(scope: &Scope) -> Result<()> {
    system::check_privileges()?;
    let cleaned = recovery::cleanup(scope)?;
    // A node agent that died (SIGKILL) or exited for good: its pins, its
    // targets' filters and routing, its state. A living one is left alone.
    let agent_dir = agent_state::default_state_dir();
    let agent = match scope {
        Scope::Iface(_) => None,
        _ => match recovery::cleanup_agent(&agent_dir) {
            Ok(r) => r,
            Err(target::Error::AgentRunning { .. }) => None,
            Err(e) => return Err(e.into()),
        },
    };
    if let Some(lines) = &agent {
        println!(
            "tproxy agent (state {}) is not running:",
            agent_dir.display()
        );
        for l in lines {
            println!("  {l}");
        }
    }
    if cleaned.is_empty() {
        if agent.is_none() {
            println!("nothing to clean up");
        }
        return Ok(());
    }
    let mut failed = Vec::new();
    for c in &cleaned {
        println!("{} died without cleaning up:", c.instance);
        for n in &c.notes {
            println!("  {n}");
        }
        for r in &c.removal.removed {
            println!("  removed {r}");
        }
        for f in &c.removal.failed {
            println!("  could not remove {f}");
            failed.push(f.clone());
        }
    }
    match failed.first() {
        None => Ok(()),
        Some(first) => anyhow::bail!(
            "could not remove {} object(s) a dead tproxy left (first: {first}); their records are kept, so `tproxy cleanup` can try again",
            failed.len()
        ),
    }
}
