//! After a crash: removing what an instance killed without cleanup left.
use tracing::warn;

use crate::{
    routing::TproxyRouting,
    state::Record,
    tc::{self, TcMode},
};

/// Removes what an instance killed without cleanup left behind. TCX and
/// cgroup links went with its file descriptors; netlink tc filters did not.
pub fn clean_up_after(stale: &Record, iface: &str, ifindex: u32) {
    if let Some(spec) = &stale.tproxy {
        let n = TproxyRouting::remove(spec);
        warn!(
            "a previous tproxy (pid {}) on {iface} died without cleaning up; removed {n} routing object(s) it left (nftables table {}, fwmark rules, table {:#x} routes)",
            stale.pid, spec.nft_table, spec.table
        );
    }
    match stale.tc_mode {
        Some(TcMode::Netlink) => {
            let n = tc::remove_stale_filters(iface, ifindex, stale.created_clsact);
            warn!(
                "a previous tproxy (pid {}) on {iface} died without cleaning up; removed {n} tc filter hook(s) it left",
                stale.pid
            );
        }
        _ => warn!(
            "a previous tproxy (pid {}) on {iface} died without cleaning up; its links died with it, nothing to remove",
            stale.pid
        ),
    }
}
