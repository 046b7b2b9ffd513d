//! The agent's errors: a second agent on one state directory, an unsafe
//! socket directory, and the lower layers' errors taken whole. The API
//! answers each with a code ([`Error::api_code`]).
use std::{io, path::PathBuf};

use crate::{api::code, config, sys, target};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::Error),

    #[error(transparent)]
    Sys(#[from] sys::Error),

    #[error(transparent)]
    Target(#[from] target::Error),

    #[error(transparent)]
    Observe(#[from] crate::observe::Error),

    #[error(
        "the agent socket's directory {} (mode {mode:o}) may be written by other users, who could replace the socket; pass --socket a path in a directory only root writes (a missing one is created with mode 0700)",
        .dir.display()
    )]
    SocketDir { dir: PathBuf, mode: u32 },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A failed I/O step, described: the sys layer's `Io`.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        sys::Error::io(what, source).into()
    }

    /// The agent API's code for this error: `INVALID_CONFIG` for a target
    /// the agent cannot take as given (its settings, its interface, its
    /// cgroup, a namespace already served), `OTHER` for the rest.
    pub fn api_code(&self) -> u32 {
        fn sys_invalid(e: &sys::Error) -> bool {
            matches!(
                e,
                sys::Error::Config(_)
                    | sys::Error::TableInUse { .. }
                    | sys::Error::MarkInUse { .. }
                    | sys::Error::NoSuchInterface(_)
                    | sys::Error::UnsupportedLinkType(..)
                    | sys::Error::NotCgroup2(_)
                    | sys::Error::AgentCgroup { .. }
            )
        }
        let invalid = match self {
            Error::Config(_) => true,
            Error::Sys(e) | Error::Target(target::Error::Sys(e)) => sys_invalid(e),
            Error::Target(target::Error::Config(_) | target::Error::TargetExists { .. }) => true,
            _ => false,
        };
        if invalid {
            code::INVALID_CONFIG
        } else {
            code::OTHER
        }
    }
}
