//! The first step of a target's lifecycle: what its network namespace says
//! about it, found once, inside that namespace (the calling thread's),
//! before anything is attached. The same probe for a single run (its own
//! namespace), the agent (a pod's, entered with `netns::run_in`) and tools
//! and tests that attach targets themselves (`TargetEnv::here`).
use std::{fs::File, path::PathBuf};

use crate::{
    Result,
    config::options::TcMode,
    sys::{netns, routing::TproxySpec, system, tc},
    target::attachment::TargetEnv,
};

/// The target's facts in its namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probed {
    pub iface: String,
    pub ifindex: u32,
    /// Link-layer header bytes before the IP header on `iface`.
    pub l2_len: u8,
    pub netns_cookie: u64,
    pub netns_inode: u64,
    /// The tc mode asked for, checked against the kernel (`Auto` resolved).
    pub tc_mode: TcMode,
}

impl Probed {
    /// Probes the interface `iface` of the calling thread's namespace, and
    /// the tc mode `tc_mode` against the kernel. The interface is looked
    /// up first: a wrong name is the likeliest mistake.
    pub fn here(iface: &str, tc_mode: TcMode) -> Result<Probed> {
        let ifindex = system::ifindex(iface)?;
        let tc_mode = tc::check(tc_mode)?;
        Ok(Probed {
            iface: iface.to_string(),
            ifindex,
            l2_len: system::link_header_len(iface)?,
            netns_cookie: system::netns_cookie()?,
            netns_inode: netns::current_inode()?,
            tc_mode,
        })
    }

    /// What the target attaches with: these facts, its cgroup (as named,
    /// and open) and the steering plan (`attachment::plan_steering`: the
    /// tproxy back-end's routing, and the mark steered packets get).
    pub fn env(
        &self,
        cgroup: PathBuf,
        cgroup_dir: File,
        (tproxy, steer_mark): (Option<TproxySpec>, u32),
    ) -> TargetEnv {
        TargetEnv {
            ifindex: self.ifindex,
            l2_len: self.l2_len,
            netns_cookie: self.netns_cookie,
            cgroup,
            cgroup_dir,
            tc_mode: self.tc_mode,
            tproxy,
            steer_mark,
        }
    }
}
