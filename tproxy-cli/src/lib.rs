//! tproxy: transparent ingress steering to a local proxy with eBPF, and
//! socket-level acceleration of the proxy<->app leg.
//!
//! The folders are layers, lowest first (a file uses its own layer and
//! those below; `tests/layers.rs` checks it):
//! - `config`: what tproxy is asked to do, as values (one `Target` type
//!   for flags, `--config`, target files and the agent API);
//! - `api`: the agent API's types and client (all `tproxy-cni` uses);
//! - `sys`: the kernel and the host (bpf syscalls, pins, netns, tc,
//!   routing and nftables, host checks, probes);
//! - `target`: one target's lifecycle (load once, probe, attach, drain,
//!   detach, the record of what was installed and its removal);
//! - `observe`: `stats`, `status`, `check`, the metrics endpoint;
//! - `agent`: the node agent;
//! - `cmd`: one file per subcommand, the only users of clap.
//!
//! The kernel side is in the `tproxy-ebpf` crate, the types both share in
//! `tproxy-common`.
pub mod agent;
pub mod api;
pub mod cmd;
pub mod config;
pub mod observe;
pub mod sys;
pub mod target;

pub use config::{
    options::{Options, Steer},
    ports::PortSet,
};
pub use target::instance::Instance;
