//! After a crash: removing what an owner killed without cleanup (SIGKILL,
//! OOM, a crash) left: a single run's, at the next start on its interface
//! or with `tproxy cleanup`; a dead agent's, with `tproxy cleanup` or when
//! the next agent finds its pins gone. TCX and cgroup links die with the
//! process's file descriptors (the agent's, with their pins); netlink tc
//! filters, the clsact qdisc, the tproxy back-end's rules, routes and
//! nftables table, and the records do not: each goes through the one
//! removal path, `Installed::remove`.
use std::{fs, path::Path};

use tracing::{debug, warn};

use crate::{
    config::options::TcMode,
    sys::{
        error::Chain,
        netns::{self, Located},
        pins,
        removal::{Removal, RemovedKind},
    },
    target::{
        Error, Result,
        agent_state::{AgentState, lock_path, read_state, state_path, try_lock},
        record::{Record, StaleRecord},
    },
};

/// At start, on finding the record of a dead instance on our interface:
/// clean up after it (`Installed::remove_here`: we run in its namespace)
/// and say so.
pub fn recover_at_start(stale: &Record) {
    let (r, notes) = stale.installed.remove_here();
    let pid = stale.pid;
    let iface = &stale.installed.iface;
    if let Some(spec) = &stale.installed.tproxy {
        // Its table is removed only if it is still the one it created.
        let table = if r.removed.iter().any(|x| x.what.contains("nftables table")) {
            format!("nftables table {}, ", spec.nft_table)
        } else {
            String::new()
        };
        warn!(
            "a previous tproxy (pid {pid}) on {iface} died without cleaning up; removed {} routing object(s) it left ({table}fwmark rules, table {:#x} routes)",
            r.count(RemovedKind::Routing),
            spec.table
        );
    }
    match stale.installed.tc_mode {
        Some(TcMode::Netlink) => warn!(
            "a previous tproxy (pid {pid}) on {iface} died without cleaning up; removed {} tc filter hook(s) it left",
            r.count(RemovedKind::TcFilter)
        ),
        _ => warn!(
            "a previous tproxy (pid {pid}) on {iface} died without cleaning up; its links died with it, nothing to remove"
        ),
    }
    for n in &notes {
        debug!("{n}");
    }
    for x in &r.removed {
        debug!("removed {x}");
    }
    for f in &r.failed {
        warn!("could not remove {f}");
    }
}

/// Which dead instances `tproxy cleanup` cleans up after.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Those of this network namespace.
    Here,
    /// The one on this interface in this network namespace.
    Iface(String),
    /// Every one on the host, in whatever namespace it ran.
    All,
}

impl Scope {
    /// From `--all` and `-i IFACE` (exclusive).
    pub fn new(all: bool, iface: Option<&str>) -> Scope {
        match (all, iface) {
            (true, _) => Scope::All,
            (false, Some(i)) => Scope::Iface(i.to_string()),
            (false, None) => Scope::Here,
        }
    }
}

/// What cleaning up after one dead instance did.
#[derive(Debug)]
pub struct Cleaned {
    /// "tproxy pid 1234 on eth0 in netns blue (4026532301)".
    pub instance: String,
    /// Why some things needed no removal (its namespace is gone, …).
    pub notes: Vec<String>,
    pub removal: Removal,
}

fn describe(record_pid: Option<i32>, iface: &str, inode: u64, at: &Located) -> String {
    let name = match at {
        Located::At { name: Some(n), .. } => Some(n.clone()),
        Located::Here => netns::name_of(inode),
        _ => None,
    };
    let ns = match name {
        Some(n) => format!("netns {n} ({inode})"),
        None => format!("netns {inode}"),
    };
    match record_pid {
        Some(pid) => format!("tproxy pid {pid} on {iface} in {ns}"),
        None => format!("tproxy on {iface} in {ns}"),
    }
}

/// Cleans up after one dead instance whose record we hold locked.
fn clean_one(stale: StaleRecord, iface: &str, inode: u64) -> Result<Cleaned> {
    let Some(rec) = stale.record.clone() else {
        // Killed between creating its record and writing it: nothing was
        // installed yet.
        let mut removal = Removal::default();
        let path = stale.path.clone();
        stale.remove()?;
        removal.push(
            RemovedKind::Record,
            format!("the empty runtime record {}", path.display()),
        );
        return Ok(Cleaned {
            instance: describe(None, iface, inode, &Located::Gone),
            notes: vec!["it was killed while starting, before it installed anything".into()],
            removal,
        });
    };
    let at = rec.located();
    let instance = describe(
        Some(rec.pid),
        &rec.installed.iface,
        rec.installed.netns_inode,
        &at,
    );
    let (mut removal, notes) = rec.installed.remove(&at)?;
    // Keep the record while something of it could not be removed, so a
    // later cleanup (or start) can try again.
    if removal.failed.is_empty() {
        let path = stale.path.clone();
        stale.remove()?;
        removal.push(
            RemovedKind::Record,
            format!("the runtime record {}", path.display()),
        );
    }
    Ok(Cleaned {
        instance,
        notes,
        removal,
    })
}

/// Removes what dead instances in `scope` left, and nothing of a live one
/// (a record is only touched under its lock, which a live instance holds).
pub fn cleanup(scope: &Scope) -> Result<Vec<Cleaned>> {
    let here = netns::current_inode()?;
    let files = crate::target::record::record_files()?;
    let mut out = Vec::new();
    for f in files {
        let in_scope = match scope {
            Scope::All => true,
            Scope::Here => f.netns_inode == here,
            Scope::Iface(i) => f.netns_inode == here && &f.iface == i,
        };
        if !in_scope {
            continue;
        }
        let Some(stale) = StaleRecord::take(&f.path)? else {
            if let Scope::Iface(iface) = scope
                && f.path.exists()
            {
                return Err(Error::CleanupLive {
                    iface: iface.clone(),
                    pid: f.record.map(|r| r.pid).unwrap_or(0),
                });
            }
            continue; // a live instance: none of our business
        };
        if stale.record.is_none() && !f.is_stale() {
            continue; // just created by a start about to lock it
        }
        out.push(clean_one(stale, &f.iface, f.netns_inode)?);
    }
    Ok(out)
}

/// Removes what a dead agent's targets have outside its pins (netlink tc
/// filters, routing), in their namespaces (`Installed::remove`); lines
/// that say what, each naming its target.
pub fn agent_leftovers(state: &AgentState) -> Vec<String> {
    let mut out = Vec::new();
    for rec in &state.targets {
        let ns = rec.spec.netns.display();
        let at = rec.located();
        if at == Located::Gone {
            out.push(format!(
                "target {} ({ns}): its network namespace is gone, and its filters and routing with it",
                rec.id
            ));
            continue;
        }
        let mut said = Vec::new();
        match rec.installed.remove(&at) {
            Ok((r, notes)) => {
                said.extend(notes);
                said.extend(r.removed.iter().map(|x| format!("removed {x}")));
                said.extend(r.failed.iter().map(|f| format!("could not remove {f}")));
            }
            Err(e) => said.push(format!("could not enter it: {}", Chain(&e))),
        }
        if said.is_empty() {
            out.push(format!(
                "target {} ({ns}): no netlink filters or routing to remove",
                rec.id
            ));
        }
        for what in said {
            out.push(format!("target {} ({ns}): {what}", rec.id));
        }
    }
    out
}

/// `tproxy cleanup`: what a dead agent (state in `dir`) left: its targets'
/// filters and routing, its pins (the links detach, the maps go), its state.
/// `None` if no agent state is there; an error if the agent lives.
pub fn cleanup_agent(dir: &Path) -> Result<Option<Vec<String>>> {
    if !state_path(dir).exists() && !lock_path(dir).exists() {
        return Ok(None);
    }
    let Some(_lock) = try_lock(dir)? else {
        return Err(Error::AgentRunning {
            dir: dir.to_path_buf(),
            pid: read_state(dir).map_or(0, |s| s.pid),
        });
    };
    let state = read_state(dir).unwrap_or_default();
    let mut out = agent_leftovers(&state);
    if !state.bpffs.as_os_str().is_empty() {
        for p in pins::remove_tree(&state.bpffs.join("targets")) {
            out.push(format!("unpinned {}", p.display()));
        }
        for p in pins::remove_tree(&pins::node_dir(&state.bpffs)) {
            out.push(format!("unpinned {}", p.display()));
        }
        let _ = fs::remove_dir(&state.bpffs);
        match pins::unmount_ours(&state.bpffs) {
            Ok(true) => out.push(format!(
                "unmounted the bpf filesystem tproxy mounted on {}",
                state.bpffs.display()
            )),
            Ok(false) => {}
            Err(e) => out.push(format!("could not unmount: {}", Chain(&e))),
        }
    }
    if fs::remove_file(state_path(dir)).is_ok() {
        out.push(format!(
            "removed the agent state {}",
            state_path(dir).display()
        ));
    }
    let _ = fs::remove_file(&state.socket);
    let _ = fs::remove_file(lock_path(dir));
    let _ = fs::remove_dir(dir);
    Ok(Some(out))
}
