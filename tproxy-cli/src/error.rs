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

    #[error(
        "--proxy-cgroup {proxy} is not inside --cgroup {cgroup}: tproxy's hooks on {cgroup} would never see the proxy; pass a cgroup below --cgroup (or --cgroup a parent of both)"
    )]
    ProxyCgroupOutside { proxy: PathBuf, cgroup: PathBuf },

    #[error(
        "{failed} of {total} requirements are not met; each failing one says why and what to do"
    )]
    ChecksFailed { failed: usize, total: usize },

    #[error(
        "another tproxy (pid {pid}) already serves {iface} in this network namespace; stop it first"
    )]
    AlreadyRunning { pid: i32, iface: String },

    #[error(
        "no running tproxy instance{} in this network namespace (try --all)",
        iface.as_ref().map(|i| format!(" on {i}")).unwrap_or_default()
    )]
    NoInstance { iface: Option<String> },

    #[error(
        "network namespace {netns} is already a target (one target per namespace); remove that target first"
    )]
    TargetExists { netns: String },

    #[error(
        "a tproxy agent (pid {pid}) already runs with the state directory {dir}; stop it first (or give this one another --state-dir)"
    )]
    AgentRunning { dir: PathBuf, pid: i32 },

    #[error(
        "the agent socket's directory {} (mode {mode:o}) may be written by other users, who could replace the socket; pass --socket a path in a directory only root writes (a missing one is created with mode 0700)",
        .dir.display()
    )]
    SocketDir { dir: PathBuf, mode: u32 },

    #[error("the object was loaded without acceleration; a target cannot turn it on")]
    AccelNotLoaded,

    #[error(
        "no tproxy agent state in {dir}: start `tproxy agent`, or pass its --state-dir as --agent-state-dir"
    )]
    NoAgent { dir: std::path::PathBuf },

    #[error(
        "the tproxy agent of {dir} is not running (its targets stay attached through their pins): start it again, or run `tproxy cleanup` to remove them"
    )]
    AgentNotRunning { dir: std::path::PathBuf },

    #[error(
        "the tproxy instance (pid {pid}) was started by another tproxy build whose maps have another layout: read it with that build's `tproxy stats`"
    )]
    OtherBuild { pid: i32 },

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
        "tproxy (pid {pid}) on {iface} is running: cleanup only removes what dead instances left; stop it with SIGTERM (`kill {pid}`), which removes everything it installed"
    )]
    CleanupLive { iface: String, pid: i32 },

    #[error(
        "could not remove {count} object(s) a dead tproxy left (first: {first}); their records are kept, so `tproxy cleanup` can try again"
    )]
    CleanupFailed { count: usize, first: String },

    #[error(
        "{stale} dead and {degraded} degraded tproxy instance(s) (see above): `tproxy cleanup --all` removes what dead ones left; restart degraded ones"
    )]
    Unhealthy { stale: usize, degraded: usize },

    #[error(
        "the kernel refused to load the eBPF object (tproxy needs Linux >= 6.1 with BTF, 6.3 for acceleration)"
    )]
    LoadObject(#[source] aya::EbpfError),

    #[error(
        "the maps pinned in {dir} were made by another tproxy build ({detail}); this build cannot take over its targets: run `tproxy cleanup` (it detaches them), then start this agent, or start the build that made them"
    )]
    PinnedOtherBuild {
        dir: std::path::PathBuf,
        detail: String,
    },

    #[error(
        "the kernel refused program {name} (tproxy needs Linux >= 6.1 with BTF, 6.3 for acceleration; run with -v for the verifier log)"
    )]
    LoadProgram {
        name: &'static str,
        #[source]
        source: ProgramLoadError,
    },

    // Errors carry their cause as `source`, not in their own text: the top
    // level prints the chain (`Chain`) down to the failing syscall's errno.
    #[error("could not attach {what}")]
    Attach {
        what: String,
        #[source]
        source: aya::programs::ProgramError,
    },

    #[error("eBPF map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },

    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

/// Why the kernel refused a program. The verifier log is many lines: it
/// goes to the debug log (-v), the error stays one line.
#[derive(Debug, thiserror::Error)]
pub enum ProgramLoadError {
    #[error("BPF_PROG_LOAD failed")]
    Syscall(#[source] io::Error),
    #[error(transparent)]
    Other(aya::programs::ProgramError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A program the kernel would not load. The verifier log is many lines:
    /// it goes to the debug log (-v), the error stays one line.
    pub fn load_program(name: &'static str, err: aya::programs::ProgramError) -> Self {
        let source = match err {
            aya::programs::ProgramError::LoadError {
                io_error,
                verifier_log,
            } => {
                tracing::debug!("verifier log for {name}:\n{verifier_log}");
                ProgramLoadError::Syscall(io_error)
            }
            other => ProgramLoadError::Other(other),
        };
        Error::LoadProgram { name, source }
    }

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
        let e = Error::Attach {
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
