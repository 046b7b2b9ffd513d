//! After a crash: removing what an instance killed without cleanup
//! (SIGKILL, OOM, a crash) left, at the next start on its interface or with
//! `tproxy cleanup`. TCX and cgroup links die with the process's file
//! descriptors; netlink tc filters, the clsact qdisc, the tproxy back-end's
//! rules, routes and nftables table, and the runtime record do not.
use tracing::{debug, warn};

use crate::{
    Error, Result,
    config::options::TcMode,
    sys::{
        netns::{self, Located},
        removal::{Removal, RemovedKind},
        routing::TproxyRouting,
        system, tc,
    },
    target::record::{AttachKind, Record, StaleRecord},
};

/// Removes, in the calling thread's network namespace, what the dead
/// instance of `stale` left: its routing (tproxy back-end) and its netlink
/// tc filters on `iface` (index `ifindex`) with the clsact qdisc it added.
/// Only what it recorded as its own: filters by program id, rules and
/// routes identical to its own, its nftables table.
pub fn clean_up_after(stale: &Record, iface: &str, ifindex: u32) -> Removal {
    let mut out = Removal::default();
    if let Some(spec) = &stale.tproxy {
        out.extend(TproxyRouting::remove(spec));
    }
    if stale.tc_mode == Some(TcMode::Netlink) {
        let tc_progs: Vec<u32> = stale
            .attachments
            .iter()
            .filter(|a| matches!(a.kind, AttachKind::TcIngress | AttachKind::TcEgress))
            .map(|a| a.prog_id)
            .collect();
        out.extend(tc::remove_stale_filters(
            iface,
            ifindex,
            &tc_progs,
            stale.created_clsact,
        ));
    }
    out
}

/// At start, on finding the record of a dead instance on our interface:
/// clean up after it and say so.
pub fn recover_at_start(stale: &Record, iface: &str, ifindex: u32) {
    let r = clean_up_after(stale, iface, ifindex);
    let pid = stale.pid;
    if let Some(spec) = &stale.tproxy {
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
    match stale.tc_mode {
        Some(TcMode::Netlink) => warn!(
            "a previous tproxy (pid {pid}) on {iface} died without cleaning up; removed {} tc filter hook(s) it left",
            r.count(RemovedKind::TcFilter)
        ),
        _ => warn!(
            "a previous tproxy (pid {pid}) on {iface} died without cleaning up; its links died with it, nothing to remove"
        ),
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

/// In the namespace the record names: its tc filters (if its interface is
/// still the one it used) and its routing.
fn clean_in_place(rec: &Record) -> (Removal, Vec<String>) {
    match system::ifindex(&rec.iface) {
        Ok(i) if i == rec.ifindex => (clean_up_after(rec, &rec.iface, rec.ifindex), Vec::new()),
        _ => {
            // Its interface is gone (or another took the name): its tc
            // filters went with it. Routing is not tied to the interface.
            let mut r = Removal::default();
            if let Some(spec) = &rec.tproxy {
                r.extend(TproxyRouting::remove(spec));
            }
            let note = format!(
                "its interface {} (index {}) no longer exists: its tc filters went with it",
                rec.iface, rec.ifindex
            );
            (r, vec![note])
        }
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
    let at = netns::locate(rec.netns_inode, rec.netns_cookie);
    let instance = describe(Some(rec.pid), &rec.iface, rec.netns_inode, &at);
    let (mut removal, notes) = match netns::run_located(&at, || clean_in_place(&rec)) {
        Some(r) => r?,
        None => (
            Removal::default(),
            vec!["its network namespace no longer exists: its tc filters, routing and nftables table went with it".into()],
        ),
    };
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

/// `tproxy cleanup`: cleans up and says what it removed, one line per
/// object; an error if anything could not be removed.
pub fn run_cleanup(scope: &Scope) -> Result<()> {
    system::check_privileges()?;
    let cleaned = cleanup(scope)?;
    // A node agent that died (SIGKILL) or exited for good: its pins, its
    // targets' filters and routing, its state. A living one is left alone.
    let agent_dir = crate::target::agent_state::default_state_dir();
    let agent = match scope {
        Scope::Iface(_) => None,
        _ => match crate::agent::cleanup(&agent_dir) {
            Ok(r) => r,
            Err(Error::AgentRunning { .. }) => None,
            Err(e) => return Err(e),
        },
    };
    if let Some(lines) = &agent {
        println!(
            "tproxy agent (state {}) is not running:",
            agent_dir.display()
        );
        for l in lines {
            println!("  {l}");
        }
    }
    if cleaned.is_empty() {
        if agent.is_none() {
            println!("nothing to clean up");
        }
        return Ok(());
    }
    let mut failed = Vec::new();
    for c in &cleaned {
        println!("{} died without cleaning up:", c.instance);
        for n in &c.notes {
            println!("  {n}");
        }
        for r in &c.removal.removed {
            println!("  removed {r}");
        }
        for f in &c.removal.failed {
            println!("  could not remove {f}");
            failed.push(f.clone());
        }
    }
    match failed.first() {
        None => Ok(()),
        Some(first) => Err(Error::CleanupFailed {
            count: failed.len(),
            first: first.clone(),
        }),
    }
}
