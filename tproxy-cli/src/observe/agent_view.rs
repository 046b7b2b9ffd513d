//! The agent seen from another process (`tproxy status`, `tproxy stats`):
//! its state file says which targets it serves, its pinned maps hold their
//! figures (each target's counter slot, its flows by netns cookie, its
//! accelerated sockets by slot). Read-only; works while the agent lives
//! and after it died (the pins keep the maps).
use std::path::{Path, PathBuf};

use aya::maps::{Map, MapData};
use serde_json::{Value, json};
use tproxy_common::{Counter, names};

use crate::{
    observe::{Error, Result},
    sys::pins,
    target,
    target::{
        agent_state::{AgentState, TargetRecord, default_state_dir, read_state, try_lock},
        inspect::{Maps, Snapshot},
    },
};

/// An agent's targets and their figures.
pub struct AgentView {
    pub state_dir: PathBuf,
    pub state: AgentState,
    /// The agent holds its lock: it is running.
    pub running: bool,
    /// Per target, in the state file's order.
    pub targets: Vec<(TargetRecord, Snapshot)>,
    /// Every slot summed: the node's total.
    pub node: Snapshot,
}

/// Opens the agent's pinned maps (its `node` pin directory).
fn pinned_maps(bpffs: &Path) -> Result<Maps> {
    let dir = pins::node_dir(bpffs);
    let open = |name: &'static str| {
        MapData::from_pin(dir.join(name)).map_err(|source| target::Error::Map { name, source })
    };
    Ok(Maps::from_parts(
        Map::PerCpuArray(open(names::COUNTERS)?),
        Map::HashMap(open(names::FLOWS)?),
        Map::LruHashMap(open(names::SYNS)?),
        Map::LruHashMap(open(names::CLOSING)?),
        open(names::SOCKS).ok().map(Map::HashMap),
    )
    .with_counts(
        open(names::FLOWS_IN_USE).ok().map(Map::Array),
        open(names::SOCKS_IN_USE).ok().map(Map::Array),
        open(names::TARGETS).ok().map(Map::HashMap),
    ))
}

/// The agent whose state is in `state_dir`; `None` if there is none (no
/// agent ever ran there, or `tproxy cleanup` removed what it left).
pub fn view(state_dir: &Path) -> Result<Option<AgentView>> {
    let Some(state) = read_state(state_dir) else {
        return Ok(None);
    };
    // Taking the lock succeeds only if no agent holds it; dropped at once.
    let running = try_lock(state_dir)?.is_none();
    let maps = pinned_maps(&state.bpffs)?;
    let keys: Vec<(u64, u32)> = state
        .targets
        .iter()
        .map(|t| (t.installed.netns_cookie, t.slot))
        .collect();
    let snaps = maps.snapshots_by_target(&keys)?;
    let node = maps.snapshot()?;
    Ok(Some(AgentView {
        state_dir: state_dir.to_path_buf(),
        targets: state.targets.iter().cloned().zip(snaps).collect(),
        state,
        running,
        node,
    }))
}

fn counters_json(s: &Snapshot) -> serde_json::Map<String, Value> {
    s.counters
        .iter()
        .map(|(c, v)| (c.name().to_string(), (*v).into()))
        .collect()
}

fn figures_json(s: &Snapshot) -> Value {
    json!({
        "flows": s.flows.open, "flows_active": s.flows.active,
        "flows_closing": s.flows.closing, "flows_embryonic": s.flows.embryonic,
        "flows_in_use": s.flows_in_use, "flows_quota": s.flows_quota,
        "socks_in_use": s.socks_in_use, "socks_quota": s.socks_quota,
        "accel_sockets": s.accel_sockets, "accel_queued_bytes": s.accel_queued_bytes,
        "counters": counters_json(s),
    })
}

impl AgentView {
    pub fn json(&self) -> Value {
        let targets: Vec<Value> = self
            .targets
            .iter()
            .map(|(r, s)| {
                let mut v = figures_json(s);
                v["id"] = json!(r.id);
                v["name"] = json!(r.spec.name);
                v["netns"] = json!(r.spec.netns);
                v["iface"] = json!(r.spec.iface());
                v["ports"] = json!(r.spec.target.ports.as_ref().map(ToString::to_string));
                v["slot"] = json!(r.slot);
                v["draining"] = json!(r.draining);
                v
            })
            .collect();
        json!({
            "agent": {
                "pid": self.state.pid, "running": self.running,
                "state_dir": self.state_dir, "bpffs": self.state.bpffs,
                "socket": self.state.socket,
            },
            "targets": targets,
            "node": figures_json(&self.node),
        })
    }

    /// One line for the agent, one per target, one for the node total.
    pub fn render(&self) -> String {
        let get = |s: &Snapshot, c: Counter| {
            s.counters
                .iter()
                .find(|(k, _)| *k == c)
                .map_or(0, |(_, v)| *v)
        };
        let mut out = format!(
            "agent pid {} ({}), state {}, pins {}: {} target(s)\n",
            self.state.pid,
            if self.running {
                "running"
            } else {
                "not running"
            },
            self.state_dir.display(),
            self.state.bpffs.display(),
            self.targets.len()
        );
        out += &format!(
            "  {:<24} {:<16} {:<10} {:>6} {:>13} {:>6} {:>12} {:>14}\n",
            "TARGET", "NAME", "PORTS", "FLOWS", "IN USE/QUOTA", "ACCEL", "STEERED", "REDIRECTED B"
        );
        // FLOWS entries held (the programs' count) against the quota.
        let quota = |s: &Snapshot| {
            let used = s.flows_in_use.map_or("-".to_string(), |n| n.to_string());
            match s.flows_quota {
                Some(0) => format!("{used}/none"),
                Some(q) => format!("{used}/{q}"),
                None => used,
            }
        };
        let row = |id: &str, name: &str, ports: &str, s: &Snapshot| {
            format!(
                "  {:<24} {:<16} {:<10} {:>6} {:>13} {:>6} {:>12} {:>14}\n",
                id,
                name,
                ports,
                s.flows.open,
                quota(s),
                s.accel_sockets,
                get(s, Counter::IngressSteered),
                get(s, Counter::MsgRedirectedBytes)
            )
        };
        for (r, s) in &self.targets {
            let ports = r.spec.target.ports.as_ref().map(ToString::to_string);
            out += &row(
                &r.id,
                r.spec.name.as_deref().unwrap_or("-"),
                ports.as_deref().unwrap_or("-"),
                s,
            );
        }
        out += &row("(node total)", "", "", &self.node);
        out
    }
}

/// The agent's view, or the one-line error saying there is no agent.
fn require(dir: Option<&Path>) -> Result<AgentView> {
    crate::sys::system::check_privileges()?;
    let dir = dir.map_or_else(default_state_dir, Path::to_path_buf);
    view(&dir)?.ok_or(Error::NoAgent { dir })
}

/// `tproxy stats --agent`: per-target counters and flows, and the node's.
pub fn run_stats(dir: Option<&Path>, json: bool) -> Result<()> {
    let v = require(dir)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&v.json()).expect("JSON values serialize")
        );
        return Ok(());
    }
    print!("{}", v.render());
    for (r, s) in &v.targets {
        println!("target {}:", r.id);
        for (c, n) in &s.counters {
            if *n != 0 {
                println!("  {:<22} {n}", c.name());
            }
        }
    }
    Ok(())
}

/// `tproxy status --agent`: the agent, its targets and their state; exit 1
/// if the agent is not running or a target is not whole.
pub fn run_status(dir: Option<&Path>, json: bool) -> Result<()> {
    let v = require(dir)?;
    let degraded: Vec<(String, String)> = v
        .targets
        .iter()
        .filter_map(|(r, _)| {
            let why = if r.located() == crate::sys::netns::Located::Gone {
                "its network namespace is gone"
            } else if r
                .links
                .iter()
                .any(|l| !pins::target_dir(&v.state.bpffs, r.slot).join(l).exists())
            {
                "a link is not pinned"
            } else {
                return None;
            };
            Some((r.id.clone(), why.to_string()))
        })
        .collect();
    if json {
        let mut j = v.json();
        for t in j["targets"].as_array_mut().into_iter().flatten() {
            let id = t["id"].as_str().unwrap_or_default().to_string();
            t["state"] = json!(
                degraded
                    .iter()
                    .find(|(d, _)| *d == id)
                    .map_or("OK".to_string(), |(_, why)| format!("DEGRADED: {why}"))
            );
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&j).expect("JSON values serialize")
        );
    } else {
        print!("{}", v.render());
        for (id, why) in &degraded {
            println!("  DEGRADED {id}: {why}");
        }
    }
    if !v.running {
        return Err(Error::AgentNotRunning {
            dir: v.state_dir.clone(),
        });
    }
    if !degraded.is_empty() {
        return Err(Error::Unhealthy {
            stale: 0,
            degraded: degraded.len(),
        });
    }
    Ok(())
}
