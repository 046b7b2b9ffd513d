//! What the kernel says is attached, through bpftool's JSON output.
use std::process::Command;

use anyhow::Result;
use serde_json::Value;

use crate::run;

/// bpftool lists ids first and then asks for each object; one that goes
/// away in between (another test detaching) makes the listing fail, so a
/// failed listing is retried (often: on a busy machine with tests
/// attaching and detaching in parallel a listing can lose that race
/// several times in a row).
fn bpftool(args: &[&str]) -> Result<Value> {
    let mut tries = 0;
    let out = loop {
        match run(Command::new("bpftool").arg("-j").args(args)) {
            Ok(out) => break out,
            Err(_) if tries < 50 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    };
    if out.trim().is_empty() {
        return Ok(Value::Array(vec![]));
    }
    Ok(serde_json::from_str(&out)?)
}

/// A loaded program: id, name, type, map ids.
#[derive(Clone, Debug)]
pub struct Prog {
    pub id: u64,
    pub name: String,
    pub kind: String,
    pub map_ids: Vec<u64>,
}

pub fn programs() -> Result<Vec<Prog>> {
    let v = bpftool(&["prog", "show"])?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .map(|p| Prog {
            id: p["id"].as_u64().unwrap_or(0),
            name: p["name"].as_str().unwrap_or("").into(),
            kind: p["type"].as_str().unwrap_or("").into(),
            map_ids: p["map_ids"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_u64)
                .collect(),
        })
        .collect())
}

/// Programs that use the map `map_id` (one tproxy instance's programs all
/// share its COUNTERS map).
pub fn programs_using_map(map_id: u64) -> Result<Vec<Prog>> {
    Ok(programs()?
        .into_iter()
        .filter(|p| p.map_ids.contains(&map_id))
        .collect())
}

/// All bpf links, raw.
pub fn links() -> Result<Vec<Value>> {
    Ok(bpftool(&["link", "show"])?
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// Program names attached to a cgroup directory (effective = false: only
/// what is attached there itself).
pub fn cgroup_programs(path: &std::path::Path) -> Result<Vec<(String, String)>> {
    let v = bpftool(&["cgroup", "show", &path.to_string_lossy()])?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["attach_type"].as_str().unwrap_or("").into(),
                p["name"].as_str().unwrap_or("").into(),
            )
        })
        .collect())
}
