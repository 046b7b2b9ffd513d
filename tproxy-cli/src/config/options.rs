//! What one instance is asked to do, resolved ([`Target::resolve`]):
//! interface, ports, proxy, back-end; with the defaults and the value
//! tables the settings are read and checked against. Used by the run, the
//! agent, the runtime record and the instance.
//!
//! [`Target::resolve`]: super::Target::resolve
use std::path::PathBuf;

use tproxy_common::SteerMode;

use super::{Error, PortSet, Via};

/// Everything `tproxy -i IFACE -ports …` is asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    pub iface: String,
    pub ports: PortSet,
    pub cgroup: Option<PathBuf>,
    /// The proxy's cgroup (v2), inside `cgroup`: who the proxy is (default:
    /// `cgroup` itself). Only its processes get original destinations or
    /// pair with the app.
    pub proxy_cgroup: Option<PathBuf>,
    pub proxy_port: u16,
    pub proxy_mark: u32,
    pub accel: bool,
    /// The intercepted ports whose connections are accelerated; None: all.
    pub accel_ports: Option<PortSet>,
    pub tc_mode: TcMode,
    pub steer: Steer,
    /// tproxy back-end: the mark tc sets and the routing table it selects.
    pub steer_mark: Option<u32>,
    pub route_table: Option<u32>,
    /// Bound on redirected-but-unread bytes at one socket (slow reader).
    pub accel_max_queued: u32,
    /// A sender on TCP this long (ms) without its reader catching up leaves
    /// the fast path for good (0: never).
    pub accel_retire_ms: u32,
    /// A one-way stream whose redirects average fewer bytes than this
    /// leaves the fast path for good (0: never).
    pub accel_min_message: u32,
    /// Most FLOWS entries (open steered flows) the target may hold; past
    /// it, its new flows stay embryonic. 0: no quota (the whole table).
    pub flows_quota: u32,
    /// Most sockets the target may have accelerated; past it, its new
    /// connections stay plain TCP. 0: no quota.
    pub socks_quota: u32,
}

/// The steering back-end.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Steer {
    /// tc rewrites the destination port to the proxy port and restores it
    /// on replies. Flows addressed to this host only.
    Rewrite,
    /// tc marks; a fwmark rule, a local route and an nftables `tproxy` rule
    /// deliver the flow to a transparent listener, destination intact.
    Tproxy,
}

impl Steer {
    pub(crate) fn mode(self) -> SteerMode {
        match self {
            Steer::Rewrite => SteerMode::Rewrite,
            Steer::Tproxy => SteerMode::Tproxy,
        }
    }
}

/// Default steer mark / routing table for an interface: distinct per
/// interface (the whole ifindex, not its low byte) so instances in one
/// namespace never share them; `routing::plan` moves on if it is taken.
pub fn default_steer_mark(ifindex: u32) -> u32 {
    0x7400u32.wrapping_add(ifindex)
}

impl Options {
    /// Checks that need no privileges and touch nothing, for options from
    /// flags (`tproxy check`, and a run's [`Target::resolve`] already made
    /// them).
    ///
    /// [`Target::resolve`]: super::Target::resolve
    pub fn validate(&self) -> Result<(), Error> {
        self.validate_as(Via::Flags)
    }

    /// `validate`, its errors naming the settings as `via` spells them.
    pub fn validate_as(&self, via: Via) -> Result<(), Error> {
        if self.ports.contains(self.proxy_port) {
            return Err(Error::ProxyPortIntercepted {
                port: self.proxy_port,
                via,
            });
        }
        if let Some(port) = self
            .accel_ports
            .iter()
            .flat_map(PortSet::iter)
            .find(|&p| !self.ports.contains(p))
        {
            return Err(Error::AccelPortNotIntercepted { port, via });
        }
        if self.proxy_mark == 0 || self.steer_mark == Some(0) {
            return Err(Error::ZeroMark { via });
        }
        if self.steer_mark == Some(self.proxy_mark) {
            return Err(Error::MarksCollide {
                mark: self.proxy_mark,
                via,
            });
        }
        match self.route_table {
            Some(table) if RESERVED_TABLES.contains(&table) => {
                Err(Error::ReservedTable { table, via })
            }
            _ => Ok(()),
        }
    }
}

/// How the tc programs are attached.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum TcMode {
    /// TCX links where the kernel has them (>= 6.6), netlink filters before.
    Auto,
    /// TCX links: detached by the kernel when tproxy exits, however it exits.
    Tcx,
    /// clsact qdisc + netlink filters: they outlive a killed tproxy, which
    /// removes them on its next start.
    Netlink,
}

pub const DEFAULT_PROXY_PORT: u16 = 15006;

/// Istio's mark for the proxy's own traffic; Envoy configs commonly use it.
pub const DEFAULT_PROXY_MARK: u32 = 0x539;

/// How long a run drains on SIGTERM/SIGINT (--drain-timeout), in seconds.
pub const DEFAULT_DRAIN_TIMEOUT: u64 = 30;

/// Longest --drain-timeout: a day (a longer wait is a mistake, and the
/// deadline must stay representable).
pub const MAX_DRAIN_TIMEOUT: u64 = 86_400;

/// How log lines are written (to stderr).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object per line: timestamp, level, fields.message.
    Json,
}

/// A mark or table id: decimal or 0x hex.
pub fn parse_mark(s: &str) -> std::result::Result<u32, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("{s:?} is not a 32-bit mark (decimal or 0x hex)"))
}

/// Routing tables the kernel and every host use: unspec, default, main, local.
pub const RESERVED_TABLES: [u32; 4] = [0, 253, 254, 255];

/// Refuses a reserved routing table (no privileges needed). Options made
/// by [`Target::resolve`] never hold one; the error names the flag.
///
/// [`Target::resolve`]: super::Target::resolve
pub fn check_table_not_reserved(table: u32) -> Result<(), Error> {
    if RESERVED_TABLES.contains(&table) {
        return Err(Error::ReservedTable {
            table,
            via: Via::Flags,
        });
    }
    Ok(())
}
