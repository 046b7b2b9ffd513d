//! A simulated Kubernetes node (lab/src/cni.rs): pods wired by the
//! reference CNI plugins (`bridge`, `host-local`) with `tproxy-cni` chained
//! after them, driven exactly as a container runtime drives them, and one
//! `tproxy agent` serving every pod. Root only; everything lives in
//! namespaces, child cgroups and a temp dir of the test's own.
mod common;

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{IpAddr, TcpStream},
    path::Path,
    time::Duration,
};

use common::{
    agent::Agent,
    eventually, example,
    pods::{Rounds, ask, start_workload},
};
use serde_json::{Value, json};
use tproxy_lab::{Logged, cni::SimNode};

const CNI: &str = env!("CARGO_BIN_EXE_tproxy-cni");
const PROXY_PORT: u16 = 15006;

/// The simulated node itself: pods get dual-stack addresses on the
/// bridge, reach each other and are reached from outside the node; DEL
/// takes their interfaces away. (tproxy-cni is told to leave these pods
/// alone: no agent needed.)
#[test]
fn pods_on_the_simulated_node_reach_each_other_and_the_outside() {
    let node = SimNode::new(
        Path::new(CNI),
        Path::new("/nonexistent/agent.sock"),
        json!({"ports": "8000", "enabled": false}),
    )
    .unwrap();
    let mut a = node.add_pod("a", json!({})).unwrap();
    let b = node.add_pod("b", json!({})).unwrap();
    assert_ne!(a.ip4, b.ip4);
    for ip in [b.ip4.to_string(), b.ip6.to_string()] {
        // (-W: how long to wait for a reply that must come; generous.)
        a.ns.exec("ping", &["-c1", "-W30", &ip]).unwrap();
        node.outside.exec("ping", &["-c1", "-W30", &ip]).unwrap();
    }
    node.del_pod(&mut a).unwrap();
    assert!(a.ns.ip(&["link", "show", "eth0"]).is_err(), "eth0 gone");
    assert!(
        node.outside
            .exec("ping", &["-c1", "-W1", &a.ip4.to_string()])
            .is_err()
    );
}

fn tproxy_json(agent: &Agent, args: &[&str]) -> Value {
    let out = agent.command(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Scrapes the agent's metrics: `name{labels}` -> value.
fn scrape(port: u16) -> HashMap<String, f64> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.lines()
        .filter(|l| !l.starts_with('#') && l.starts_with("tproxy_"))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// Pods registered by tproxy-cni (chained after the bridge, as a runtime
/// calls it) are served by one agent: traffic from outside the node and
/// from pod to pod is steered through each pod's own proxy, byte-exact
/// over IPv4 and IPv6; pods added and deleted while another carries a
/// stream leave that stream intact; status, stats and metrics show each
/// pod's figures and the node total.
#[test]
fn one_agent_serves_the_pods_tproxy_cni_registers() {
    let metrics = free_port();
    let agent = Agent::new(&["--metrics-addr", &format!("127.0.0.1:{metrics}")]);
    let node = SimNode::new(
        Path::new(CNI),
        &agent.socket(),
        json!({"ports": "9000", "proxyPort": PROXY_PORT, "accel": true}),
    )
    .unwrap();
    // The pods' annotation names the port (it overrides the conflist's).
    let ann = json!({"tproxy.io/ports": "8000"});
    let mut a = node.add_pod("web-a", ann.clone()).unwrap();
    let b = node.add_pod("web-b", ann.clone()).unwrap();
    let _wa = start_workload(&a, &[]);
    let _wb = start_workload(&b, &[]);
    let mut ids = agent.ids();
    ids.sort();
    let mut want = vec![a.id.clone(), b.id.clone()];
    want.sort();
    assert_eq!(ids, want, "the agent has exactly the two pods");
    node.check_pod(&a).unwrap();

    // From outside the node and from the other pod, both families: the
    // pod's own proxy is the app's peer (steered), and the right pod
    // answers.
    for pod in [&a, &b] {
        for ip in [IpAddr::V4(pod.ip4), IpAddr::V6(pod.ip6)] {
            let (tag, peer) = ask(&node.outside, ip);
            assert_eq!(
                (tag.as_str(), peer),
                (pod.name.as_str(), ip),
                "outside -> {ip}"
            );
        }
    }
    for ip in [IpAddr::V4(b.ip4), IpAddr::V6(b.ip6)] {
        let (tag, peer) = ask(&a.ns, ip);
        assert_eq!((tag.as_str(), peer), ("web-b", ip), "web-a -> {ip}");
    }

    // Pod to pod, byte-exact, from a client in web-a's cgroup (a
    // container of the pod): both legs socket to socket (the agent pairs
    // a pod's client with another pod's proxy by default).
    for ip in [b.ip4.to_string(), format!("[{}]", b.ip6)] {
        let mut cmd = a.ns.command_in(example("lab-client"), Some(&a.cgroup));
        cmd.args(["echo", &format!("{ip}:8000"), "--bytes", "8388608"]);
        let out = tproxy_lab::run(&mut cmd).unwrap();
        assert!(out.contains("ok conn=0 bytes=8388608"), "{out}");
    }

    // A long stream from outside to web-b while web-c comes and web-a goes.
    let mut cmd = node.outside.command(example("lab-client"));
    cmd.args(["echo", &format!("{}:8000", b.ip4), "--bytes", "268435456"]);
    let mut stream = Logged::spawn("stream", &mut cmd).unwrap();
    let c = node.add_pod("web-c", ann.clone()).unwrap();
    let _wc = start_workload(&c, &[]);
    let (tag, peer) = ask(&node.outside, IpAddr::V4(c.ip4));
    assert_eq!((tag.as_str(), peer), ("web-c", IpAddr::V4(c.ip4)));
    node.del_pod(&mut a).unwrap();
    assert!(!agent.ids().contains(&a.id), "web-a removed");
    let st = stream.wait_timeout(Duration::from_secs(600)).unwrap();
    let log = stream.log();
    assert!(
        st.success() && log.contains("ok conn=0 bytes=268435456"),
        "{log}"
    );

    // Per pod and node total, from another process.
    let stats = tproxy_json(&agent, &["stats", "--agent", "--json"]);
    let targets = stats["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 2, "{stats}");
    let steered = |t: &Value| t["counters"]["ingress_steered"].as_u64().unwrap();
    let by_name = |n: &str| {
        targets
            .iter()
            .find(|t| t["name"] == n)
            .unwrap_or_else(|| panic!("{n} in {stats}"))
    };
    assert!(steered(by_name("default/web-b")) > 0 && steered(by_name("default/web-c")) > 0);
    let node_steered = stats["node"]["counters"]["ingress_steered"]
        .as_u64()
        .unwrap();
    assert!(
        node_steered >= steered(by_name("default/web-b")) + steered(by_name("default/web-c")),
        "{stats}"
    );
    assert!(
        by_name("default/web-b")["counters"]["accel_pairs_pods"]
            .as_u64()
            .unwrap()
            >= 2,
        "web-a's client legs to web-b (IPv4, IPv6) paired: {stats}"
    );
    let redirected = by_name("default/web-b")["counters"]["msg_redirected_bytes"]
        .as_u64()
        .unwrap();
    assert!(
        redirected > 0,
        "web-b's proxy->app leg accelerated: {stats}"
    );
    let status = tproxy_json(&agent, &["status", "--agent", "--json"]);
    assert!(status["agent"]["running"].as_bool().unwrap(), "{status}");
    assert!(
        status["targets"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["state"] == "OK"),
        "{status}"
    );
    let m = scrape(metrics);
    let key = format!(
        "tproxy_ingress_steered_total{{target=\"{}\",pod=\"default/web-b\"}}",
        b.id
    );
    assert!(m.get(&key).is_some_and(|v| *v > 0.0), "{key} in {m:?}");

    // DEL of every pod leaves the agent with nothing.
    let mut b = b;
    let mut c = c;
    node.del_pod(&mut b).unwrap();
    node.del_pod(&mut c).unwrap();
    eventually("no targets left", Duration::from_secs(30), || {
        agent.ids().is_empty()
    });
}

/// Removing a pod drains its flows, and a flow from another pod of the
/// node with both legs socket to socket counts as active although no
/// packet of it crosses tc after the handshake (the drain sees its reads
/// on the proxy's accepted socket). A client in web-a holds an echo
/// connection to web-b, one 64 KiB round every 100 ms until told to stop;
/// web-b is deleted once tc last saw the flow more than 10 s ago (the
/// drain's idea of "active"). The DEL waits: the target is draining, and
/// the DEL still blocked, while the client goes on; once the client is
/// told to stop and closes, the DEL returns, every round came back intact,
/// and the agent says it drained one flow. (The client used to run for a
/// fixed 14 s and the DEL to come at 11.5 s: a busy machine could make the
/// DEL late enough to find the client gone.)
#[test]
fn deleting_a_pod_waits_for_a_same_node_flow_on_the_fast_path() {
    // A drain as long as the flow lasts (it ends when the client stops).
    let agent = Agent::new(&["--drain-timeout", "600"]);
    let node = SimNode::new(
        Path::new(CNI),
        &agent.socket(),
        json!({"ports": "8000", "proxyPort": PROXY_PORT, "accel": true}),
    )
    .unwrap();
    let a = node.add_pod("web-a", json!({})).unwrap();
    let mut b = node.add_pod("web-b", json!({})).unwrap();
    let _wa = start_workload(&a, &[]);
    let _wb = start_workload(&b, &[]);
    let mut rounds = Rounds::start(&a.ns, Some(&a.cgroup), IpAddr::V4(b.ip4));
    let held = std::time::Instant::now();
    let stats = tproxy_json(&agent, &["stats", "--agent", "--json"]);
    let web_b = stats["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "default/web-b")
        .unwrap_or_else(|| panic!("web-b in {stats}"));
    assert_eq!(web_b["counters"]["accel_pairs_pods"], 1, "{stats}");
    // tc saw the flow last at its handshake, before "held": more than
    // 10 s ago once this has passed (a sleep is a lower bound).
    std::thread::sleep(Duration::from_millis(11_500).saturating_sub(held.elapsed()));
    let id = b.id.clone();
    std::thread::scope(|s| {
        let del = s.spawn(|| node.del_pod(&mut b));
        eventually("web-b draining", Duration::from_secs(120), || {
            let r = agent.call(&tproxy::api::Request::Check { id: id.clone() });
            r.state.as_deref() == Some("DRAINING")
        });
        // The client is still at it, and the DEL waits for it.
        assert!(rounds.running(), "{}", rounds.client.log());
        assert!(!del.is_finished(), "the DEL did not wait for the flow");
        // Every round came back intact; the client closed, and the DEL ends.
        rounds.finish();
        del.join().unwrap().unwrap();
    });
    let agent_log = agent.proc.as_ref().unwrap().log();
    assert!(
        agent_log.contains("drained 1 flow(s), cut 0"),
        "{agent_log}"
    );
}
