//! The lab: network namespaces, a child cgroup, and processes started in
//! them, each a guard that removes what it made when dropped, so a failing
//! test or an interrupted demo leaves the host as it found it.
//!
//! Used by the integration tests (tproxy-cli/tests) and by `cargo xtask
//! lab …` / `cargo xtask demo`.
pub mod cgroup;
pub mod cni;
pub mod envoy;
pub mod k8s_validate;
pub mod kernel;
pub mod netns;
pub mod proc;
pub mod topology;

pub use cgroup::Cgroup;
pub use netns::Netns;
pub use proc::{Logged, Proc, Tproxy, sibling_bin};
pub use topology::Topology;

/// A name unique to this process and call, for namespaces and cgroups that
/// tests create in parallel.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command to completion; an error carries its stderr.
pub fn run(cmd: &mut std::process::Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .map_err(|e| anyhow::anyhow!("running {cmd:?}: {e}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
