//! The shipped proxy configurations keep the contract tproxy relies on.
//! HAProxy's are also run by the ingress tests; Envoy cannot be installed
//! here, so its configs are checked for the pieces that matter.
use serde_norway::Value;
use tproxy::cli::{DEFAULT_PROXY_MARK, DEFAULT_PROXY_PORT};

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
    let c = &cfg["static_resources"]["clusters"][0];
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
