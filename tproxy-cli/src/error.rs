//! Library errors. Each message is one line that names the problem and,
//! where there is one, the fix. A layer's own errors are its type, taken
//! whole here: `config::Error` (settings), `sys::Error` (the kernel and
//! the host).
use std::{io, path::PathBuf};

pub use crate::sys::error::Chain;

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
        "a tproxy agent (pid {pid}) already runs with the state directory {dir}; stop it first (or give this one another --state-dir)"
    )]
    AgentRunning { dir: PathBuf, pid: i32 },

    #[error(
        "the agent socket's directory {} (mode {mode:o}) may be written by other users, who could replace the socket; pass --socket a path in a directory only root writes (a missing one is created with mode 0700)",
        .dir.display()
    )]
    SocketDir { dir: PathBuf, mode: u32 },

    #[error(
        "no tproxy agent state in {dir}: start `tproxy agent`, or pass its --state-dir as --agent-state-dir"
    )]
    NoAgent { dir: std::path::PathBuf },

    #[error(
        "the tproxy agent of {dir} is not running (its targets stay attached through their pins): start it again, or run `tproxy cleanup` to remove them"
    )]
    AgentNotRunning { dir: std::path::PathBuf },

    #[error("the watched tproxy (pid {pid} on {iface}) has stopped")]
    InstanceGone { pid: i32, iface: String },

    #[error(
        "cannot serve metrics on {addr}: {source}; pass a free local address and port to --metrics-addr (e.g. 127.0.0.1:9090)"
    )]
    MetricsBind {
        addr: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },

    #[error(
        "could not remove {count} object(s) a dead tproxy left (first: {first}); their records are kept, so `tproxy cleanup` can try again"
    )]
    CleanupFailed { count: usize, first: String },

    #[error(
        "{stale} dead and {degraded} degraded tproxy instance(s) (see above): `tproxy cleanup --all` removes what dead ones left; restart degraded ones"
    )]
    Unhealthy { stale: usize, degraded: usize },

    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A bad command line or config file (exit status 2, as clap's usage
    /// errors): nothing was tried.
    pub fn is_usage(&self) -> bool {
        matches!(self, Error::Config(e) if e.is_usage())
    }

    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_goes_down_to_the_errno_on_one_line() {
        let e = Error::io(
            "adding the fwmark rule",
            io::Error::from_raw_os_error(libc::EPERM),
        );
        assert_eq!(
            Chain(&e).to_string(),
            "adding the fwmark rule: Operation not permitted (os error 1)"
        );
        // aya's SyscallError names the call; its errno is its source.
        let e = crate::target::Error::Attach {
            what: "sockops to cgroup /x".into(),
            source: aya::programs::ProgramError::SyscallError(aya::sys::SyscallError {
                call: "bpf_link_create",
                io_error: io::Error::from_raw_os_error(libc::EBADF),
            }),
        };
        assert_eq!(
            Chain(&e).to_string(),
            "could not attach sockops to cgroup /x: `bpf_link_create` failed: Bad file descriptor (os error 9)"
        );
    }
}
