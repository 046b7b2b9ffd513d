//! The shipped proxy configurations keep the contract tproxy relies on,
//! and Envoy itself loads every Envoy config. Both proxies also serve the
//! ingress and accel tests with them.
use std::path::PathBuf;

use serde_norway::Value;
use tproxy::config::options::{DEFAULT_PROXY_MARK, DEFAULT_PROXY_PORT};
use tproxy_lab::envoy;

fn load(rel: &str) -> Value {
    let path = format!("{}/../examples/{rel}", env!("CARGO_MANIFEST_DIR"));
    serde_norway::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn check_envoy(cfg: &Value, transparent: bool) {
    let l = &cfg["static_resources"]["listeners"][0];
    assert_eq!(
        l["address"]["socket_address"]["port_value"].as_u64(),
        Some(DEFAULT_PROXY_PORT.into())
    );
    assert_eq!(
        l["additional_addresses"][0]["address"]["socket_address"]["address"].as_str(),
        Some("::"),
        "IPv6 listener"
    );
    assert_eq!(l["transparent"].as_bool().unwrap_or(false), transparent);
    assert_eq!(
        l["listener_filters"][0]["name"].as_str(),
        Some("envoy.filters.listener.original_dst")
    );
    // HTTP on the app's HTTP port, tcp_proxy for every other port, both
    // to the ORIGINAL_DST cluster.
    let http = &l["filter_chains"][0];
    assert_eq!(
        http["filter_chain_match"]["destination_port"].as_u64(),
        Some(envoy::HTTP_PORT.into())
    );
    let hcm = &http["filters"][0];
    assert_eq!(
        hcm["name"].as_str(),
        Some("envoy.filters.network.http_connection_manager")
    );
    let route = &hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0];
    assert_eq!(route["route"]["cluster"].as_str(), Some("original_dst"));
    let tcp = &l["default_filter_chain"]["filters"][0];
    assert_eq!(
        tcp["name"].as_str(),
        Some("envoy.filters.network.tcp_proxy")
    );
    assert_eq!(
        tcp["typed_config"]["cluster"].as_str(),
        Some("original_dst")
    );
    assert_eq!(
        cfg["admin"]["address"]["socket_address"]["port_value"].as_u64(),
        Some(envoy::ADMIN_PORT.into())
    );
    let c = &cfg["static_resources"]["clusters"][0];
    assert_eq!(c["name"].as_str(), Some("original_dst"));
    assert_eq!(c["type"].as_str(), Some("ORIGINAL_DST"));
    assert_eq!(c["lb_policy"].as_str(), Some("CLUSTER_PROVIDED"));
    let opt = &c["upstream_bind_config"]["socket_options"][0];
    // SOL_SOCKET / SO_MARK = tproxy's default proxy mark.
    assert_eq!(opt["level"].as_u64(), Some(1));
    assert_eq!(opt["name"].as_u64(), Some(36));
    assert_eq!(opt["int_value"].as_u64(), Some(DEFAULT_PROXY_MARK.into()));
}

#[test]
fn envoy_configs_keep_the_contract() {
    check_envoy(&load("envoy/envoy.yaml"), false);
    check_envoy(&load("envoy/envoy-transparent.yaml"), true);
}

/// Every `*.yaml` in examples/envoy.
fn envoy_configs() -> Vec<PathBuf> {
    let mut all: Vec<PathBuf> = std::fs::read_dir(envoy::examples_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    all.sort();
    all
}

/// `envoy --mode validate -c …` on every shipped Envoy config, and on each
/// without its access logs (as a benchmark would run it): Envoy resolves
/// every typed extension and checks every field. A misspelt field fails.
#[test]
fn envoy_loads_every_shipped_config() {
    let bin = envoy::require().unwrap();
    let configs = envoy_configs();
    assert_eq!(configs.len(), 2, "{configs:?}");
    let dir = tempfile::tempdir().unwrap();
    for cfg in &configs {
        let out = envoy::validate(&bin, cfg).unwrap();
        assert!(out.contains("OK"), "{}: {out}", cfg.display());
        let text = std::fs::read_to_string(cfg).unwrap();
        let quiet = envoy::without_access_log(&text);
        assert!(!quiet.contains("access_log") && quiet.len() < text.len());
        let path = dir.path().join(cfg.file_name().unwrap());
        std::fs::write(&path, quiet).unwrap();
        envoy::validate(&bin, &path).unwrap();
    }
    // And a broken one is refused (the check is real).
    let bad = dir.path().join("bad.yaml");
    let text = std::fs::read_to_string(&configs[0]).unwrap();
    std::fs::write(&bad, text.replace("lb_policy:", "lb_polciy:")).unwrap();
    assert!(envoy::validate(&bin, &bad).is_err());
}

#[test]
fn haproxy_configs_dial_the_original_destination() {
    for (f, transparent) in [
        ("haproxy/haproxy.cfg", false),
        ("haproxy/haproxy-transparent.cfg", true),
    ] {
        let path = format!("{}/../examples/{f}", env!("CARGO_MANIFEST_DIR"));
        let cfg = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = cfg
            .lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#'))
            .collect();
        assert!(lines.contains(&"server original 0.0.0.0"), "{f}");
        let binds: Vec<&&str> = lines.iter().filter(|l| l.starts_with("bind ")).collect();
        assert_eq!(binds.len(), 2, "{f}: IPv4 and IPv6 binds");
        for b in binds {
            assert!(b.contains(&format!(":{DEFAULT_PROXY_PORT}")), "{f}: {b}");
            assert_eq!(b.ends_with("transparent"), transparent, "{f}: {b}");
        }
    }
}
