//! What a `tproxy agent` runs with, and the defaults of its flags.
use std::{path::PathBuf, time::Duration};

use super::registry;
use crate::target::loader::MapSizes;

/// What a `tproxy agent` runs with, resolved from its flags and its
/// `--config` file (`cmd::agent`).
#[derive(Clone, Debug)]
pub struct Settings {
    pub socket: PathBuf,
    pub targets_dir: PathBuf,
    pub bpffs: PathBuf,
    pub state_dir: PathBuf,
    pub max_targets: u32,
    /// How long removing a target waits for its steered flows.
    pub drain: Duration,
    /// Pair a client in one pod of this node with another pod's proxy.
    pub same_node: bool,
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// A target's quotas when its spec names none.
    pub quotas: registry::Quotas,
    pub sizes: MapSizes,
}

pub const DEFAULT_TARGETS_DIR: &str = "/run/tproxy/targets.d";
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/tproxy";
pub const DEFAULT_MAX_TARGETS: u32 = 256;
/// Where `--metrics-addr` alone serves: loopback, as the figures name pods
/// and containers and show each one's traffic.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";
