//! One record of what a target installed, and one way to remove it.
//!
//! `Installed` is the part of a runtime record that says where a target
//! is and what of it outlives its owner: netlink tc filters and the clsact
//! qdisc tproxy added, and the tproxy back-end's routing (TCX and cgroup
//! links die with their last file descriptor or pin). A single run's
//! record (`record::Record`) and each target of the agent's state file
//! (`agent_state::TargetRecord`) embed it, flattened: their JSON keeps its
//! fields where they always were. With it, the entries those records list
//! the attached programs by (`Attached`), and what an attach says it is
//! about to install before it touches the interface (`Planned`).
//!
//! `Installed::remove` is the removal path for every owner that is gone: a
//! single run killed (at the next start on its interface, and `tproxy
//! cleanup`), a dead agent's targets (`tproxy cleanup`, the next agent),
//! and a target the agent adopted and now removes.
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{
    config::options::TcMode,
    sys::{
        netns::{self, Located},
        removal::Removal,
        routing::{TproxyRouting, TproxySpec},
        system, tc,
    },
    target::{Result, probe::Probed},
};

/// Where a target is, and what of it outlives its owner.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Installed {
    /// Its interface (absent from agent state files of earlier builds,
    /// whose readers fill it in from the target's spec).
    #[serde(default)]
    pub iface: String,
    pub ifindex: u32,
    pub netns_inode: u64,
    /// SO_NETNS_COOKIE of its namespace. Unlike the inode it is never
    /// reused, so a namespace created after this one died is never taken
    /// for it. 0: not recorded (a single run of an early build).
    #[serde(default)]
    pub netns_cookie: u64,
    /// `None` until the tc programs are attached.
    pub tc_mode: Option<TcMode>,
    /// tproxy added the clsact qdisc (netlink mode).
    pub created_clsact: bool,
    /// What the tproxy back-end installs (rule, routes, nftables table).
    pub tproxy: Option<TproxySpec>,
    /// Program ids of its tc programs: its netlink filters are found by
    /// them (absent from single-run records of earlier builds, whose
    /// readers take them from the record's attachments).
    #[serde(default)]
    pub tc_progs: Vec<u32>,
}

/// What a target looks like before its tc programs are attached: what the
/// runtime record must say before anything on the interface exists.
pub struct Planned<'a> {
    pub attachments: &'a [Attached],
    pub tc_mode: TcMode,
    pub created_clsact: bool,
}

impl Installed {
    /// What a target probed as `probed` will install, before anything is:
    /// its routing plan (`tproxy`); its tc programs once `planned` says.
    pub fn new(probed: &Probed, tproxy: Option<TproxySpec>) -> Installed {
        Installed {
            iface: probed.iface.clone(),
            ifindex: probed.ifindex,
            netns_inode: probed.netns_inode,
            netns_cookie: probed.netns_cookie,
            tc_mode: None,
            created_clsact: false,
            tproxy,
            tc_progs: Vec::new(),
        }
    }

    /// What the attach is about to install on the interface (called from
    /// `TargetAttachment::attach`'s `before_steering`).
    pub fn plan(&mut self, planned: &Planned<'_>) {
        self.tc_mode = Some(planned.tc_mode);
        self.created_clsact = planned.created_clsact;
        self.tc_progs = tc_progs(planned.attachments);
    }

    /// Removes what is left of the target in the calling thread's
    /// namespace: its netlink tc filters (by program id) and the clsact
    /// qdisc it added, if its interface is still the one it used; then its
    /// routing (rules and routes identical to its own, its nftables table
    /// if it still carries its marker). Nothing that is not its own. Notes
    /// say what needed no removal.
    pub fn remove_here(&self) -> (Removal, Vec<String>) {
        let mut out = Removal::default();
        let mut notes = Vec::new();
        match system::ifindex(&self.iface) {
            Ok(i) if i == self.ifindex => {
                if self.tc_mode == Some(TcMode::Netlink) {
                    out.extend(tc::remove_stale_filters(
                        &self.iface,
                        self.ifindex,
                        &self.tc_progs,
                        self.created_clsact,
                    ));
                }
            }
            // Gone (or another took the name): its tc filters went with
            // it. Routing is not tied to the interface.
            _ => notes.push(format!(
                "its interface {} (index {}) no longer exists: its tc filters went with it",
                self.iface, self.ifindex
            )),
        }
        if let Some(spec) = &self.tproxy {
            out.extend(TproxyRouting::remove(spec));
        }
        (out, notes)
    }

    /// `remove_here` in the target's namespace, where `at` says it is now;
    /// an error if it cannot be entered.
    pub fn remove(&self, at: &Located) -> Result<(Removal, Vec<String>)> {
        match netns::run_located(at, || self.remove_here()) {
            Some(r) => Ok(r?),
            None => Ok((
                Removal::default(),
                vec!["its network namespace no longer exists: its tc filters, routing and nftables table went with it".into()],
            )),
        }
    }
}

/// One attached program, as the kernel knows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Attached {
    /// For people: "tc ingress tproxy_steer on eth0 (Tcx)".
    pub what: String,
    pub kind: AttachKind,
    pub program: String,
    pub prog_id: u32,
    /// Its bpf_link: TCX, cgroup, tracepoint and fexit attachments are links;
    /// netlink tc filters and sk_msg (attached to the SOCKHASH) are not.
    #[serde(default)]
    pub link_id: Option<u32>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AttachKind {
    TcIngress,
    TcEgress,
    Cgroup,
    SkMsg,
    Tracepoint,
    /// An fexit (tracing) link: the read hook where the kernel has fexit.
    Fexit,
    /// An fentry (tracing) link: the send hook, with the fexit read hook.
    Fentry,
}

/// The program ids of the tc attachments among `attachments`.
pub fn tc_progs(attachments: &[Attached]) -> Vec<u32> {
    attachments
        .iter()
        .filter(|a| matches!(a.kind, AttachKind::TcIngress | AttachKind::TcEgress))
        .map(|a| a.prog_id)
        .collect()
}

/// The namespace at `path` is still the one with `cookie`.
pub fn netns_alive(path: &Path, cookie: u64) -> bool {
    netns::run_in(path, netns::current_cookie).is_ok_and(|c| c.is_ok_and(|c| c == cookie))
}

/// Where a namespace named by `path` (as the agent's targets name theirs)
/// is now: there if it is still the one with `cookie`, else gone.
pub fn netns_at(path: &Path, cookie: u64) -> Located {
    if netns_alive(path, cookie) {
        Located::At {
            path: path.to_path_buf(),
            name: None,
        }
    } else {
        Located::Gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gone_namespace_needs_no_removal() {
        let inst = Installed {
            iface: "eth9".into(),
            ifindex: 9,
            netns_inode: 1,
            netns_cookie: 2,
            tc_mode: Some(TcMode::Netlink),
            created_clsact: true,
            tproxy: None,
            tc_progs: vec![7, 8],
        };
        let (r, notes) = inst.remove(&Located::Gone).unwrap();
        assert!(r.removed.is_empty() && r.failed.is_empty());
        assert_eq!(notes.len(), 1);
        assert!(notes[0].contains("no longer exists"), "{notes:?}");
    }
}
