//! The first step of a target's lifecycle: what its network namespace says
//! about it, found once, inside that namespace (the calling thread's),
//! before anything is attached (`Probed`); the steering plan checked free
//! there (`plan_steering`); and what the target attaches with, those facts
//! with its cgroup and plan (`TargetEnv`). The same probe for a single run
//! (its own namespace), the agent (a pod's, entered with `netns::run_in`)
//! and tools and tests that attach targets themselves (`TargetEnv::here`).
use std::{
    fs::File,
    path::{Path, PathBuf},
};

use crate::{
    config::{
        self,
        options::{Options, Steer, TcMode, default_steer_mark},
    },
    sys::{
        netns,
        routing::{self, TproxySpec},
        system, tc,
    },
    target::Result,
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
    /// and open) and the steering plan (`plan_steering`: the tproxy
    /// back-end's routing, and the mark steered packets get).
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

/// The tproxy back-end's plan (mark and table checked free, or picked)
/// and the mark steered packets get, for a target on `ifindex`, before
/// anything exists: run in the target's namespace.
pub fn plan_steering(opts: &Options, ifindex: u32) -> Result<(Option<TproxySpec>, u32)> {
    let tproxy = match opts.steer {
        Steer::Tproxy => {
            let spec = routing::plan(opts, ifindex)?;
            routing::check_nft_table_free(&spec)?;
            routing::check_nft(&spec)?;
            Some(spec)
        }
        Steer::Rewrite => None,
    };
    let steer_mark = tproxy.as_ref().map_or_else(
        || {
            opts.steer_mark
                .unwrap_or_else(|| default_steer_mark(ifindex))
        },
        |s| s.mark,
    );
    if steer_mark == opts.proxy_mark {
        return Err(config::Error::MarksCollide {
            mark: steer_mark,
            via: config::Via::FlagsOrFile,
        }
        .into());
    }
    Ok((tproxy, steer_mark))
}

/// What the caller found out about the target, in its namespace, before
/// attaching (checks that can fail with a clear message come first).
pub struct TargetEnv {
    pub ifindex: u32,
    pub l2_len: u8,
    pub netns_cookie: u64,
    /// The cgroup as the user names it, and open for the attach calls.
    pub cgroup: PathBuf,
    pub cgroup_dir: File,
    /// Checked against the kernel (`TcMode::check`).
    pub tc_mode: TcMode,
    /// The tproxy back-end's plan (mark and table checked free).
    pub tproxy: Option<TproxySpec>,
    pub steer_mark: u32,
}

impl TargetEnv {
    /// The current namespace's interface `iface` and the cgroup `cgroup`,
    /// with the defaults a run without flags takes (tc mode checked, no
    /// tproxy back-end, the default steer mark): for tools and tests that
    /// attach targets themselves (the agent and a single run check more,
    /// each with its own message).
    pub fn here(iface: &str, cgroup: &Path) -> Result<TargetEnv> {
        let dir = system::open_cgroup(Some(cgroup))?;
        let probed = Probed::here(iface, TcMode::Auto)?;
        let steer_mark = default_steer_mark(probed.ifindex);
        Ok(probed.env(dir.path, dir.dir, (None, steer_mark)))
    }
}
