//! `tproxy-cni` driven exactly as a container runtime drives a chained
//! plugin: the reference `bridge` plugin (Debian's containernetworking-
//! plugins, installed by `cargo xtask setup`) sets up a pod's interface in
//! a namespace of the test's own, then tproxy-cni gets the same `CNI_*`
//! environment, its config, `runtimeConfig` and the bridge's result as
//! `prevResult`. The agent is a fake in the test that records requests and
//! answers what the test says.
//!
//! Root only for the bridge test: the bridge plugin makes its bridge in the
//! host namespace, under a name unique to the test, which a guard removes
//! (with the IPAM directory) however the test ends. Nothing else of the
//! host's is touched.
use std::{
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use serde_json::{Value, json};
use tproxy::api::{self, Request, Response, TargetSpec};
use tproxy_lab::{Cgroup, Netns, cgroup::cgroup2_root, run, unique};

const PLUGIN: &str = env!("CARGO_BIN_EXE_tproxy-cni");
const CNI_PATH: &str = "/usr/lib/cni";
const ANNOTATIONS: &str = "io.kubernetes.cri.pod-annotations";

/// An agent that records each request and gives the answer it is told.
struct FakeAgent {
    _dir: tempfile::TempDir,
    sock: PathBuf,
    requests: Arc<Mutex<Vec<Request>>>,
    answer: Arc<Mutex<Response>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeAgent {
    fn start() -> FakeAgent {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let answer = Arc::new(Mutex::new(Response::ok()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (requests, answer, stop) = (requests.clone(), answer.clone(), stop.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let mut s = conn.unwrap();
                    let resp = match api::read_request(&mut s) {
                        Ok(req) => {
                            requests.lock().unwrap().push(req);
                            answer.lock().unwrap().clone()
                        }
                        Err(e) => Response::error(api::code::INVALID_CONFIG, e.to_string()),
                    };
                    api::write_response(&mut s, &resp).unwrap();
                }
            })
        };
        FakeAgent {
            _dir: dir,
            sock,
            requests,
            answer,
            stop,
            thread: Some(thread),
        }
    }

    fn answer(&self, resp: Response) {
        *self.answer.lock().unwrap() = resp;
    }

    fn take(&self) -> Vec<Request> {
        std::mem::take(&mut *self.requests.lock().unwrap())
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then sees the flag.
        let _ = std::os::unix::net::UnixStream::connect(&self.sock);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A host bridge the bridge plugin will create under a name only this test
/// uses; deleted on drop (the plugin's DEL leaves bridges in place).
struct BridgeGuard(String);

impl BridgeGuard {
    fn new() -> BridgeGuard {
        // IFNAMSIZ: at most 15 characters.
        let name = unique("tcb").replace('-', "");
        assert!(name.len() <= 15, "{name}");
        assert!(!link_exists(None, &name), "{name} exists already");
        BridgeGuard(name)
    }
}

impl Drop for BridgeGuard {
    fn drop(&mut self) {
        if link_exists(None, &self.0) {
            let _ = run(Command::new("ip").args(["link", "del", &self.0]));
        }
    }
}

fn link_exists(ns: Option<&Netns>, name: &str) -> bool {
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns.name()]);
    }
    cmd.args(["link", "show", "dev", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// A 10.99.X.0/24 no address or route of the host is in.
fn free_subnet() -> String {
    let used = run(Command::new("ip").args(["-4", "-o", "addr"])).unwrap()
        + &run(Command::new("ip").args(["-4", "route", "show", "table", "all"])).unwrap();
    (100..250)
        .map(|x| (x + std::process::id() % 150) % 150 + 100)
        .map(|x| format!("10.99.{x}."))
        .find(|p| !used.contains(p.as_str()))
        .map(|p| format!("{p}0/24"))
        .expect("a free 10.99.X.0/24")
}

/// Runs a CNI plugin as a runtime does: a clean environment with the
/// `CNI_*` variables, the config on stdin, the result on stdout.
fn exec_plugin(plugin: &str, cmd: &str, env: &[(&str, &str)], stdin: &Value) -> Output {
    use std::io::Write as _;
    let mut child = Command::new(plugin)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", cmd)
        .env("CNI_PATH", CNI_PATH)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.to_string().as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn stdout_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {:?}; stderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Asserts a CNI error result: exit status non-zero, the spec's error
/// object on stdout with `code`.
#[track_caller]
fn assert_cni_error(out: &Output, code: u64, version: &str) -> Value {
    assert!(!out.status.success(), "{out:?}");
    let v = stdout_json(out);
    assert_eq!(v["code"], code, "{v}");
    assert_eq!(v["cniVersion"], version, "{v}");
    assert!(v["msg"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(v["details"].is_string(), "{v}");
    v
}

fn tproxy_conf(sock: &Path, extra: Value) -> Value {
    let mut v = json!({
        "cniVersion": "1.0.0",
        "name": "pods",
        "type": "tproxy-cni",
        "agentSocket": sock,
        "agentTimeoutMs": 2000,
        "ports": "9000",
        "proxyPort": 15006,
        "capabilities": {"cgroupPath": true, ANNOTATIONS: true},
        "runtimeConfig": {"cgroupPath": "/kubepods/pod1"},
        "prevResult": {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}], "ips": []},
    });
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

const POD_ENV: &[(&str, &str)] = &[
    ("CNI_CONTAINERID", "c0ffee"),
    ("CNI_NETNS", "/var/run/netns/cni-test"),
    ("CNI_IFNAME", "eth0"),
    ("CNI_ARGS", "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0"),
];

#[test]
fn chained_after_bridge_like_a_runtime() {
    let agent = FakeAgent::start();
    let ns = Netns::create(&unique("tcni-")).unwrap();
    let netns = ns.path().to_string_lossy().into_owned();
    let bridge = BridgeGuard::new();
    let ipam = tempfile::tempdir().unwrap();
    let pod_cg = Cgroup::create(&unique("tcni-pod")).unwrap();
    let pod_cg_rel = pod_cg.path().strip_prefix(cgroup2_root().unwrap()).unwrap();
    let id = unique("ctr");
    let env = [
        ("CNI_CONTAINERID", id.as_str()),
        ("CNI_NETNS", netns.as_str()),
        ("CNI_IFNAME", "eth0"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0",
        ),
    ];
    let net = "tcni-net";
    let bridge_conf = json!({
        "cniVersion": "1.0.0", "name": net, "type": "bridge",
        "bridge": bridge.0, "isGateway": false, "ipMasq": false,
        "ipam": {"type": "host-local", "subnet": free_subnet(), "dataDir": ipam.path()},
    });

    let out = exec_plugin(&format!("{CNI_PATH}/bridge"), "ADD", &env, &bridge_conf);
    assert!(out.status.success(), "bridge ADD: {out:?}");
    let prev = stdout_json(&out);
    let ip = prev["ips"][0]["address"].as_str().unwrap().to_string();
    assert!(
        ns.ip(&["-4", "addr", "show", "eth0"])
            .unwrap()
            .contains(&ip),
        "the bridge plugin gave eth0 {ip}"
    );

    // containerd passes the pod's cgroup parent (relative to the cgroup2
    // mount, with a leading slash) and the annotations.
    let conf = tproxy_conf(
        &agent.sock,
        json!({
            "name": net,
            "prevResult": prev,
            "runtimeConfig": {
                "cgroupPath": format!("/{}", pod_cg_rel.display()),
                ANNOTATIONS: {"tproxy.io/ports": "8000,8080", "other.io/x": "y"},
            },
        }),
    );
    let out = exec_plugin(PLUGIN, "ADD", &env, &conf);
    assert!(out.status.success(), "tproxy-cni ADD: {out:?}");
    assert_eq!(stdout_json(&out), prev, "ADD passes prevResult through");
    let mut expected = TargetSpec::new(&netns, "eth0");
    expected.target.cgroup = Some(pod_cg_rel.into());
    expected.target.ports = Some("8000,8080".parse().unwrap());
    expected.target.proxy_port = Some(15006);
    expected.name = Some("shop/web-0".into());
    assert_eq!(
        agent.take(),
        vec![Request::Add {
            id: id.clone(),
            target: expected
        }]
    );
    // What the agent will attach to is there: the namespace's eth0, and
    // the cgroup under the mount.
    assert!(link_exists(Some(&ns), "eth0"));
    assert!(cgroup2_root().unwrap().join(pod_cg_rel).is_dir());

    let out = exec_plugin(PLUGIN, "CHECK", &env, &conf);
    assert!(out.status.success(), "CHECK: {out:?}");
    assert_eq!(agent.take(), vec![Request::Check { id: id.clone() }]);

    // Teardown in reverse order, as the runtime does.
    let out = exec_plugin(PLUGIN, "DEL", &env, &conf);
    assert!(out.status.success(), "tproxy-cni DEL: {out:?}");
    assert!(out.stdout.is_empty());
    assert_eq!(agent.take(), vec![Request::Del { id: id.clone() }]);
    let out = exec_plugin(&format!("{CNI_PATH}/bridge"), "DEL", &env, &bridge_conf);
    assert!(out.status.success(), "bridge DEL: {out:?}");

    assert!(!link_exists(Some(&ns), "eth0"), "eth0 left in the pod");
    let ports = run(Command::new("ip").args(["-o", "link", "show", "master", &bridge.0])).unwrap();
    assert!(ports.trim().is_empty(), "veths left on the bridge: {ports}");
    let reserved: Vec<_> = std::fs::read_dir(ipam.path().join(net))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
        .collect();
    assert!(reserved.is_empty(), "IPAM still holds {reserved:?}");

    let name = bridge.0.clone();
    drop(bridge);
    assert!(!link_exists(None, &name), "bridge {name} left on the host");
}

#[test]
fn agent_down() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");

    // No socket at all: ADD fails (code 100), DEL succeeds.
    let conf = tproxy_conf(&sock, json!({}));
    let out = exec_plugin(PLUGIN, "ADD", POD_ENV, &conf);
    let e = assert_cni_error(&out, 100, "1.0.0");
    assert!(
        e["details"].as_str().unwrap().contains("not running"),
        "{e}"
    );
    let out = exec_plugin(PLUGIN, "DEL", POD_ENV, &conf);
    assert!(out.status.success(), "DEL without an agent: {out:?}");
    assert!(out.stdout.is_empty());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nothing to remove"),
        "{out:?}"
    );

    // A socket nobody listens on (a dead agent): the same.
    drop(UnixListener::bind(&sock).unwrap());
    let out = exec_plugin(PLUGIN, "ADD", POD_ENV, &conf);
    assert_cni_error(&out, 100, "1.0.0");
    let out = exec_plugin(PLUGIN, "DEL", POD_ENV, &conf);
    assert!(out.status.success(), "DEL with a dead agent: {out:?}");

    // STATUS (1.1): not available.
    let conf = tproxy_conf(&sock, json!({"cniVersion": "1.1.0"}));
    let out = exec_plugin(PLUGIN, "STATUS", &[], &conf);
    assert_cni_error(&out, 50, "1.1.0");

    // Listening but never answering: try again later.
    std::fs::remove_file(&sock).unwrap();
    let _silent = UnixListener::bind(&sock).unwrap();
    let conf = tproxy_conf(&sock, json!({"agentTimeoutMs": 200}));
    let out = exec_plugin(PLUGIN, "ADD", POD_ENV, &conf);
    assert_cni_error(&out, 11, "1.0.0");
}

#[test]
fn agent_errors_map_to_cni_codes() {
    let agent = FakeAgent::start();
    let conf = tproxy_conf(&agent.sock, json!({}));
    for (agent_code, cni_code) in [(11, 11), (7, 7), (999, 101)] {
        agent.answer(Response::error(agent_code, "said the agent"));
        let out = exec_plugin(PLUGIN, "ADD", POD_ENV, &conf);
        let e = assert_cni_error(&out, cni_code, "1.0.0");
        assert_eq!(e["details"], "said the agent");
    }
    // DEL of a pod the agent does not know is success; CHECK of it is not.
    agent.answer(Response::error(4, "no such id"));
    let out = exec_plugin(PLUGIN, "DEL", POD_ENV, &conf);
    assert!(out.status.success(), "{out:?}");
    let out = exec_plugin(PLUGIN, "CHECK", POD_ENV, &conf);
    let e = assert_cni_error(&out, 102, "1.0.0");
    assert!(e["details"].as_str().unwrap().contains("no such id"), "{e}");

    agent.answer(Response::ok());
    let conf = tproxy_conf(&agent.sock, json!({"cniVersion": "1.1.0"}));
    let out = exec_plugin(PLUGIN, "STATUS", &[], &conf);
    assert!(out.status.success(), "{out:?}");
    assert!(agent.take().ends_with(&[Request::List]));
}

#[test]
fn bad_settings_never_reach_the_agent() {
    let agent = FakeAgent::start();
    let with_annotation =
        |k: &str, v: &str| json!({"runtimeConfig": {"cgroupPath": "/p", ANNOTATIONS: {k: v}}});
    for extra in [
        json!({"ports": "80-70"}),
        json!({"ports": "0"}),
        with_annotation("tproxy.io/ports", "http"),
        with_annotation("tproxy.io/proxy-port", "70000"),
        with_annotation("tproxy.io/accel", "yes"),
        json!({"runtimeConfig": {}}),
        json!({"proxyPort": "15006"}),
        json!({"steer": "nat"}),
    ] {
        let out = exec_plugin(
            PLUGIN,
            "ADD",
            POD_ENV,
            &tproxy_conf(&agent.sock, extra.clone()),
        );
        let e = assert_cni_error(&out, 7, "1.0.0");
        eprintln!("{extra} -> {e}");
    }
    // The missing cgroup names the fix.
    let out = exec_plugin(
        PLUGIN,
        "ADD",
        POD_ENV,
        &tproxy_conf(&agent.sock, json!({"runtimeConfig": {}})),
    );
    let e = stdout_json(&out);
    assert!(
        e["details"]
            .as_str()
            .unwrap()
            .contains("\"capabilities\": {\"cgroupPath\": true}"),
        "{e}"
    );
    assert_eq!(agent.take(), vec![]);
}

#[test]
fn prev_result_required_and_passed_through_for_skipped_pods() {
    let agent = FakeAgent::start();
    let mut conf = tproxy_conf(&agent.sock, json!({}));
    conf.as_object_mut().unwrap().remove("prevResult");
    let out = exec_plugin(PLUGIN, "ADD", POD_ENV, &conf);
    let e = assert_cni_error(&out, 7, "1.0.0");
    assert!(e["msg"].as_str().unwrap().contains("prevResult"), "{e}");

    // A pod annotated off: prevResult out, the agent not asked.
    let prev = json!({"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": "/x"}],
                      "ips": [{"address": "10.99.1.2/24", "interface": 0}], "dns": {}});
    let conf = tproxy_conf(
        &agent.sock,
        json!({"prevResult": prev,
               "runtimeConfig": {ANNOTATIONS: {"tproxy.io/enabled": "false"}}}),
    );
    let out = exec_plugin(PLUGIN, "ADD", POD_ENV, &conf);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout_json(&out), prev);
    assert_eq!(agent.take(), vec![]);

    // A 0.4.0 chain gets a 0.4.0 result.
    let conf = tproxy_conf(
        &agent.sock,
        json!({"cniVersion": "0.4.0", "prevResult": {
            "cniVersion": "0.4.0",
            "ips": [{"version": "4", "address": "10.99.1.2/24", "interface": 0}]}}),
    );
    let out = exec_plugin(PLUGIN, "ADD", POD_ENV, &conf);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout_json(&out), conf["prevResult"]);
    assert_eq!(agent.take().len(), 1);
}

#[test]
fn versions_and_environment() {
    // VERSION reads no config.
    let out = Command::new(PLUGIN)
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout_json(&out),
        json!({"cniVersion": "1.1.0", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]})
    );

    let agent = FakeAgent::start();
    let out = exec_plugin(
        PLUGIN,
        "ADD",
        POD_ENV,
        &tproxy_conf(&agent.sock, json!({"cniVersion": "0.3.1"})),
    );
    assert_cni_error(&out, 1, "0.3.1");

    let no_netns: Vec<_> = POD_ENV
        .iter()
        .copied()
        .filter(|(k, _)| *k != "CNI_NETNS")
        .collect();
    let out = exec_plugin(
        PLUGIN,
        "ADD",
        &no_netns,
        &tproxy_conf(&agent.sock, json!({})),
    );
    let e = assert_cni_error(&out, 4, "1.0.0");
    assert!(e["msg"].as_str().unwrap().contains("CNI_NETNS"), "{e}");

    let out = exec_plugin(
        PLUGIN,
        "GC",
        &[],
        &tproxy_conf(&agent.sock, json!({"cniVersion": "1.1.0"})),
    );
    assert!(out.status.success() && out.stdout.is_empty(), "{out:?}");
    assert_eq!(agent.take(), vec![]);

    // Not JSON: a decoding failure, in the newest version's format.
    let mut child = Command::new(PLUGIN)
        .env_clear()
        .env("CNI_COMMAND", "ADD")
        .envs(POD_ENV.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        child.stdin.take().unwrap().write_all(b"{not json").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert_cni_error(&out, 6, "1.1.0");
}
