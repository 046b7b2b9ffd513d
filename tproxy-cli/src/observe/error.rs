//! The observe layer's errors: what `stats`, `status`, `check` and the
//! metrics endpoint find wrong (no instance, a dead agent, a taken
//! address), and the lower layers' errors taken whole.
use std::{io, net::SocketAddr, path::PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] crate::config::Error),

    #[error(transparent)]
    Sys(#[from] crate::sys::Error),

    #[error(transparent)]
    Target(#[from] crate::target::Error),

    #[error(
        "{failed} of {total} requirements are not met; each failing one says why and what to do"
    )]
    ChecksFailed { failed: usize, total: usize },

    #[error(
        "no running tproxy instance{} in this network namespace (try --all)",
        iface.as_ref().map(|i| format!(" on {i}")).unwrap_or_default()
    )]
    NoInstance { iface: Option<String> },

    #[error(
        "no tproxy agent state in {dir}: start `tproxy agent`, or pass its --state-dir as --agent-state-dir"
    )]
    NoAgent { dir: PathBuf },

    #[error(
        "the tproxy agent of {dir} is not running (its targets stay attached through their pins): start it again, or run `tproxy cleanup` to remove them"
    )]
    AgentNotRunning { dir: PathBuf },

    #[error("the watched tproxy (pid {pid} on {iface}) has stopped")]
    InstanceGone { pid: i32, iface: String },

    /// The address comes from `--metrics-addr`, the run's or the agent's
    /// (the agent API has no such key).
    #[error(
        "cannot serve metrics on {addr}: {source}; pass a free local address and port to --metrics-addr (e.g. 127.0.0.1:9090)"
    )]
    MetricsBind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },

    #[error(
        "{stale} dead and {degraded} degraded tproxy instance(s) (see above): `tproxy cleanup --all` removes what dead ones left; restart degraded ones"
    )]
    Unhealthy { stale: usize, degraded: usize },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A failed I/O step, described: the sys layer's `Io`.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        crate::sys::Error::io(what, source).into()
    }
}
