//! The node agent as users run it: the image `cargo xtask image` builds,
//! started with podman exactly as deploy/kubernetes/10-daemonset.yaml says
//! (common/daemonset.rs: host network and PID, privileged, the same mounts
//! and propagation, the init step installing tproxy-cni into a node-like
//! directory), serving pods of a simulated node that the installed plugin
//! registers; `tproxy check`, `status` and `stats` run from the image, the
//! API from the host; a restart of the pod under traffic keeps an
//! established accelerated flow. Root only; podman's storage, the node's
//! directories and bpffs are the test's own.
mod common;

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use common::{
    STARTUP,
    daemonset::{DaemonSetPod, Node},
    eventually,
    podman::Podman,
    pods::{Rounds, ask, start_workload},
    target_by,
};
use serde_json::{Value, json};
use tproxy::api::{self, Request, Steer};
use tproxy_lab::{cni::SimNode, unique};

/// A pod network's config, as a node has one before tproxy is installed.
const POD_NETWORK: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "pods",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.0.0/24"}]]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
"#;

fn call(node: &Node, req: &Request) -> api::Response {
    api::call(&node.agent_socket(), req, Duration::from_secs(60)).unwrap()
}

/// `tproxy ARGS --json` in the agent's container.
fn json_from(ds: &DaemonSetPod, args: &[&str]) -> Value {
    let mut a = vec!["tproxy"];
    a.extend_from_slice(args);
    a.push("--json");
    let (code, out, err) = ds.exec(&a);
    assert_eq!(code, 0, "{args:?}: {err}{out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

fn counter(ds: &DaemonSetPod, name: &str, counter: &str) -> u64 {
    let stats = json_from(ds, &["stats", "--agent"]);
    target_by(&stats, "name", name)["counters"][counter]
        .as_u64()
        .unwrap()
}

#[test]
fn the_daemonset_runs_from_the_image_and_a_restart_keeps_established_flows() {
    let t0 = Instant::now();
    let podman = Podman::new(None);
    let image = podman.build_image();
    let node = Node::new();
    let net = node.cni_net().join("10-pods.conflist");
    std::fs::write(&net, POD_NETWORK).unwrap();
    let ds = DaemonSetPod::new(&podman, &node, &unique("tpx-ds-"));
    assert_eq!(
        ds.image(),
        image,
        "the manifest names the image xtask builds"
    );

    // The init step: the plugin onto the node, chained once into the pod
    // network's config, with the DaemonSet's defaults.
    let init = ds.start();
    assert!(
        init.contains("installed") && init.contains("chained"),
        "{init}"
    );
    let installed = node.cni_bin().join("tproxy-cni");
    let bytes = std::fs::read(&installed).unwrap();
    assert!(
        !bytes.windows(8).any(|w| w == b"ld-linux"),
        "tproxy-cni on the node is static: it runs with any libc"
    );
    let conf: Value = serde_json::from_str(&std::fs::read_to_string(&net).unwrap()).unwrap();
    let plugins = conf["plugins"].as_array().unwrap();
    assert_eq!(plugins.len(), 3, "{conf}");
    assert_eq!(plugins[2]["type"], "tproxy-cni");
    assert_eq!(plugins[2]["agentSocket"], api::DEFAULT_SOCKET);
    assert_eq!(plugins[2]["proxyPort"], 15006);
    assert!(
        node.cni_net()
            .join("10-pods.conflist.tproxy-orig")
            .is_file()
    );

    // The agent serves its API on the node's /run/tproxy.
    eventually("the agent's API", STARTUP, || {
        node.agent_socket().exists()
            && api::call(&node.agent_socket(), &Request::List, Duration::from_secs(5))
                .is_ok_and(|r| r.ok)
    });
    let status = json_from(&ds, &["status", "--agent"]);
    assert_eq!(status["agent"]["running"], true, "{status}");

    // Pods of a node, registered by the plugin the init step installed.
    let sim = SimNode::new(
        &installed,
        &node.agent_socket(),
        json!({"ports": "8000", "proxyPort": 15006, "accel": true}),
    )
    .unwrap();
    let web = sim.add_pod("web", json!({})).unwrap();
    let _web = start_workload(&web, &[]);
    // The tproxy back-end (nft in the image), through the API: the pod is
    // left alone by the plugin, then added by hand.
    let tp = sim
        .add_pod("web-t", json!({"tproxy.io/enabled": "false"}))
        .unwrap();
    let _tp = start_workload(&tp, &["--transparent"]);
    let mut spec = api::TargetSpec::new(tp.ns.path(), "eth0");
    spec.target.cgroup = Some(tp.cgroup.path().into());
    spec.target.ports = Some("8000".parse().unwrap());
    spec.target.steer = Some(Steer::Tproxy);
    spec.name = Some("default/web-t".into());
    let r = call(
        &node,
        &Request::Add {
            id: "web-t".into(),
            target: spec,
        },
    );
    assert!(r.ok, "{r:?}");
    let tables = tp.ns.exec("nft", &["list", "tables"]).unwrap();
    assert!(tables.contains("inet tproxy_eth0"), "{tables}");
    for pod in [&web, &tp] {
        for ip in [IpAddr::V4(pod.ip4), IpAddr::V6(pod.ip6)] {
            let (tag, peer) = ask(&sim.outside, ip);
            assert_eq!((tag.as_str(), peer), (pod.name.as_str(), ip), "-> {ip}");
        }
    }

    // `tproxy check` from the image, in a pod's namespace, for the
    // tproxy back-end: nft found and the kernel taking its table, every
    // line ok.
    let ns = format!("--net={}", tp.ns.path().display());
    let cg = tp.cgroup.path().display().to_string();
    let (code, out, err) = ds.exec(&[
        "nsenter", &ns, "tproxy", "check", "-i", "eth0", "-p", "8000", "--cgroup", &cg, "--steer",
        "tproxy",
    ]);
    eprintln!("tproxy check (exit {code}):\n{out}{err}");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ok   nft: /usr/sbin/nft"), "{out}{err}");
    let status = json_from(&ds, &["status", "--agent"]);
    for name in ["default/web", "default/web-t"] {
        assert_eq!(target_by(&status, "name", name)["state"], "OK", "{status}");
    }

    // A restart under traffic: a connection held open through web's proxy,
    // accelerated on the proxy->app leg, round after round while the pod
    // is stopped (SIGTERM: the agent exits and leaves every target
    // attached) and started again (the init step again, then an agent
    // that adopts the targets).
    let mut rounds = Rounds::start(&sim.outside, None, IpAddr::V4(web.ip4));
    let redirected = counter(&ds, "default/web", "msg_redirected_bytes");
    assert!(redirected > 0, "the proxy->app leg is accelerated");
    assert_eq!(ds.stop(), 0, "the agent's exit on SIGTERM: {}", ds.log());
    assert!(rounds.running(), "{}", rounds.client.log());
    let init = ds.start();
    assert!(init.contains("unchanged"), "{init}");
    eventually("the new agent adopted both pods", STARTUP, || {
        api::call(&node.agent_socket(), &Request::List, Duration::from_secs(5))
            .is_ok_and(|r| r.targets.is_some_and(|t| t.len() == 2))
    });
    eventually(
        "the flow goes on socket to socket under the new agent",
        STARTUP,
        || counter(&ds, "default/web", "msg_redirected_bytes") > redirected,
    );
    let log = rounds.finish();
    eprintln!("held connection: {log}");
    let (tag, _) = ask(&sim.outside, IpAddr::V6(web.ip6));
    assert_eq!(tag, "web", "new connections after the restart");

    // The pods go: the plugin's DEL and the API's del drain and detach.
    let mut web = web;
    sim.del_pod(&mut web).unwrap();
    let r = call(&node, &Request::Del { id: "web-t".into() });
    assert!(r.ok, "{r:?}");
    let tables = tp.ns.exec("nft", &["list", "tables"]).unwrap();
    assert!(!tables.contains("inet tproxy_eth0"), "{tables}");
    let status = json_from(&ds, &["status", "--agent"]);
    assert_eq!(
        status["targets"].as_array().map(Vec::len),
        Some(0),
        "{status}"
    );
    assert_eq!(ds.stop(), 0, "{}", ds.log());
    let pins = node.bpffs.path.join("tproxy/node");
    assert!(pins.is_dir(), "the maps stay pinned for the next agent");
    let out = ds.cleanup();
    eprintln!("tproxy cleanup:\n{out}");
    assert!(!pins.exists(), "cleanup from the image unpinned the maps");
    eprintln!("daemonset test: {:.1} s", t0.elapsed().as_secs_f64());
}
