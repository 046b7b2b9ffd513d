//! `tproxy agent`: one long-running process per node that loads the
//! programs once and attaches them per target (a pod: its network
//! namespace, interface, cgroup and ports), added and removed at run time
//! through a Unix socket (`crate::api`) or files in `--targets-dir`.
//!
//! Restarts keep every target attached: the shared maps and each target's
//! bpf_links are pinned in bpffs (`pins`), and the state file says what
//! belongs to which target. SIGTERM/SIGINT exit and leave everything
//! attached; the next agent adopts the targets, swapping its own programs
//! into their links in one step each. Targets are removed one by one
//! (`del`, or deleting the target file), draining like a single run's stop;
//! after an agent that is not coming back, `tproxy cleanup` removes what it
//! left.
//!
//! Files, lowest first: `error`; `settings` (what it runs with);
//! `registry` (the targets and the object they share); `files` (target
//! files); `waiting` (targets whose cgroup does not exist yet); `service`
//! (the running agent, shared); `server` (the API on its socket); `run`
//! (the agent's life).
pub mod error;
pub mod files;
pub mod registry;
pub mod run;
pub mod server;
pub mod service;
pub mod settings;
pub mod waiting;

pub use self::{
    error::{Error, Result},
    run::run,
    service::Agent,
    settings::{
        DEFAULT_BPFFS, DEFAULT_MAX_TARGETS, DEFAULT_METRICS_ADDR, DEFAULT_TARGETS_DIR, Settings,
    },
};
