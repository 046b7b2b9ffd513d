//! tproxy: transparent ingress steering to a local proxy with eBPF, and
//! socket-level acceleration of the proxy<->app leg.
//!
//! Where things are: `options` is what an instance is asked to do;
//! `instance` loads and attaches everything (one owner per attachment, in
//! `attach`); `inspect` reads a running instance's maps, which `stats`
//! prints and `metrics` serves to Prometheus; `recovery` cleans up after a
//! killed one (at start and `tproxy cleanup`); `status` checks every
//! instance against the kernel; `netns` finds and enters the namespaces
//! records name; `tc` handles netlink-mode tc; `state` is the runtime record
//! and instance lock; `system` the host checks; `probe` the kernel features;
//! `nudger` wakes readers of accelerated sockets asleep on TCP bytes;
//! `check` the preflight (`tproxy check`) over both; `cli` the
//! command line, `config` the `--config` file, `dist` its completions and
//! man pages. The kernel side is in the `tproxy-ebpf` crate.
pub mod agent;
pub mod api;
pub mod cmd;
pub mod config;
pub mod error;
pub mod observe;
pub mod sys;
pub mod target;

pub use config::{
    options::{Options, Steer},
    ports::PortSet,
};
pub use error::{Error, Result};
pub use target::instance::Instance;
