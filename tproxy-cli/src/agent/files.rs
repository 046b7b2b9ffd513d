//! `targets.d`: one YAML file per target, for hosts without Kubernetes.
//! The keys are the agent API's ([`TargetSpec`]: a `--config` file's
//! target keys but `proxy_cgroup`, plus `netns` (required), `name` and
//! the quotas); a file `web.yaml` is the target `file:web`.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use crate::api::TargetSpec;

/// The id of the target file `path`.
pub fn id_of(path: &Path) -> Option<String> {
    if path.extension()? != "yaml" {
        return None;
    }
    Some(format!("file:{}", path.file_stem()?.to_string_lossy()))
}

/// A target file's spec, or one line saying what is wrong with it (its
/// key, line and column).
pub fn parse(text: &str) -> Result<TargetSpec, String> {
    serde_norway::from_str(text).map_err(|e| e.to_string())
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
        assert_eq!(s.target.ports.unwrap().to_string(), "8000,9000-9001");
        assert_eq!(s.target.proxy_mark, Some(0x539));
        assert_eq!(s.target.accel, Some(false));
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
        // With the key, line and column, as in a --config file.
        let e = parse("netns: /x\niface: eth0\nproxy_cgroup: /y\n").unwrap_err();
        assert!(e.contains("unknown field `proxy_cgroup`"), "{e}");
        assert!(e.contains("line 3 column 1"), "{e}");
        let e = parse("netns: /x\nflows_quota: -1\n").unwrap_err();
        assert!(e.starts_with("flows_quota: "), "{e}");
        assert!(e.contains("line 2 column 14"), "{e}");
        let e = parse("netns: /x\ndrain_timeout: 5\n").unwrap_err();
        assert!(e.contains("unknown field `drain_timeout`"), "{e}");
        let s = parse("netns: /x\niface: eth0\nflows_quota: 3\nsocks_quota: 4\n").unwrap();
        assert_eq!((s.flows_quota, s.socks_quota), (Some(3), Some(4)));
        assert_eq!(id_of(Path::new("/d/web.yaml")).as_deref(), Some("file:web"));
        assert_eq!(id_of(Path::new("/d/web.yml.swp")), None);
    }
}
