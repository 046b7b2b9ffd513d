//! The runtime directory, `/run/tproxy` (`TPROXY_RUN_DIR` names another):
//! where single runs keep their runtime records, the agent its state, and
//! the lock two starts take to pick routing values one at a time.
use std::path::PathBuf;

pub const DEFAULT_RUN_DIR: &str = "/run/tproxy";

/// The runtime directory: `TPROXY_RUN_DIR` if set, else `DEFAULT_RUN_DIR`.
pub fn run_dir() -> PathBuf {
    std::env::var_os("TPROXY_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_RUN_DIR))
}
