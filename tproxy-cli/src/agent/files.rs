//! `targets.d`: one YAML file per target, for hosts without Kubernetes.
//! The keys are a `--config` file's target keys plus `netns` (required)
//! and `name`; a file `web.yaml` is the target `file:web`.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use crate::{api::TargetSpec, config::file::TargetConfig};

/// The id of the target file `path`.
pub fn id_of(path: &Path) -> Option<String> {
    if path.extension()? != "yaml" {
        return None;
    }
    Some(format!("file:{}", path.file_stem()?.to_string_lossy()))
}

/// A target file's spec, or one line saying what is wrong with it.
pub fn parse(text: &str) -> Result<TargetSpec, String> {
    let mut v: serde_norway::Value = serde_norway::from_str(text).map_err(|e| e.to_string())?;
    let map = v
        .as_mapping_mut()
        .ok_or("not a YAML mapping of target keys")?;
    let take_str = |map: &mut serde_norway::Mapping, key: &str| -> Result<Option<String>, String> {
        match map.remove(key) {
            None => Ok(None),
            Some(serde_norway::Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(format!("{key}: expected a string")),
        }
    };
    let netns = take_str(map, "netns")?
        .ok_or("netns: missing (the path of the network namespace, e.g. /run/netns/web)")?;
    let name = take_str(map, "name")?;
    // The agent's own keys (a single run's tables are all its target's).
    let mut quota = |key: &str| -> Result<Option<u32>, String> {
        match map.remove(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or(format!("{key}: expected a number (0: no quota)")),
        }
    };
    let flows_quota = quota("flows_quota")?;
    let socks_quota = quota("socks_quota")?;
    // The rest is a --config file's target part, checked the same way.
    let text = serde_norway::to_string(&v).map_err(|e| e.to_string())?;
    let t = TargetConfig::parse(&text).map_err(|e| e.to_string())?;
    let iface = t
        .iface
        .ok_or("iface: missing (the pod's interface, e.g. eth0)")?;
    Ok(TargetSpec {
        cgroup: t.cgroup,
        ports: t.ports,
        proxy_port: t.proxy_port,
        proxy_mark: t.proxy_mark,
        accel: t.accel,
        steer: t.steer,
        tc_mode: t.tc_mode,
        accel_max_queued: t.accel_max_queued,
        accel_retire_ms: t.accel_retire_ms,
        steer_mark: t.steer_mark,
        route_table: t.route_table,
        flows_quota,
        socks_quota,
        name,
        ..TargetSpec::new(netns, iface)
    })
}

/// Every `*.yaml` in `dir`: id -> (path, spec or the problem).
pub fn scan(dir: &Path) -> BTreeMap<String, (PathBuf, Result<TargetSpec, String>)> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let path = e.path();
        let Some(id) = id_of(&path) else { continue };
        let spec = std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|t| parse(&t));
        out.insert(id, (path, spec));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_file_is_the_config_keys_plus_netns() {
        let s = parse(
            "netns: /run/netns/web\nname: web\niface: eth0\nports: [8000, \"9000-9001\"]\ncgroup: pods/web\nproxy_mark: \"0x539\"\naccel: false\n",
        )
        .unwrap();
        assert_eq!(s.netns, Path::new("/run/netns/web"));
        assert_eq!(s.name.as_deref(), Some("web"));
        assert_eq!(s.ports.unwrap().to_string(), "8000,9000-9001");
        assert_eq!(s.proxy_mark, Some(0x539));
        assert_eq!(s.accel, Some(false));
        assert!(
            parse("iface: eth0\nports: 8000\n")
                .unwrap_err()
                .contains("netns")
        );
        assert!(
            parse("netns: /x\niface: eth0\nprots: 8000\n")
                .unwrap_err()
                .contains("prots")
        );
        assert!(
            parse("netns: /x\niface: eth0\nproxy_port: 0\n")
                .unwrap_err()
                .contains("proxy_port")
        );
        assert_eq!(id_of(Path::new("/d/web.yaml")).as_deref(), Some("file:web"));
        assert_eq!(id_of(Path::new("/d/web.yml.swp")), None);
    }
}
