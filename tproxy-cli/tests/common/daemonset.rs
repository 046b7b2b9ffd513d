//! deploy/kubernetes/10-daemonset.yaml run with podman as a kubelet runs
//! it: the pod's host namespaces, each container's command, arguments,
//! environment, security context, memory limit and mounts (with their
//! propagation), the init containers first and to completion, the grace
//! period on stop. Every key the manifest has is read here: one this
//! runner does not know fails the test, so the manifest cannot grow a
//! setting the test silently ignores.
//!
//! The node is partly the host and partly a directory of the test's own
//! ([`Node`]): the pods' cgroups, network namespaces and /proc are the
//! host's (the agent must see the pods), while the node's /sys/fs/bpf is
//! a private bpffs, and /run/tproxy, /opt/cni/bin and /etc/cni/net.d are
//! directories below the node's root.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_norway::Value;

use super::{agent::Bpffs, podman::Podman};

pub const MANIFEST: &str = "deploy/kubernetes/10-daemonset.yaml";

/// The node's own paths.
pub struct Node {
    /// The node's /sys/fs/bpf (the agent pins below it); unmounted before
    /// the root, which holds its mount point, is removed.
    pub bpffs: Bpffs,
    pub root: tempfile::TempDir,
}

impl Node {
    pub fn new() -> Node {
        let root = tempfile::Builder::new()
            .prefix("tpx-node-")
            .tempdir()
            .unwrap();
        let bpffs = Bpffs::mount(root.path().join("sys/fs/bpf"));
        // Bidirectional propagation needs a shared source.
        tproxy_lab::run(
            std::process::Command::new("mount")
                .arg("--make-shared")
                .arg(&bpffs.path),
        )
        .unwrap();
        for d in ["run/tproxy", "opt/cni/bin", "etc/cni/net.d"] {
            std::fs::create_dir_all(root.path().join(d)).unwrap();
        }
        Node { root, bpffs }
    }

    /// The host path standing for the node's `path`.
    pub fn host_path(&self, path: &str) -> PathBuf {
        match path {
            "/sys/fs/bpf" => self.bpffs.path.clone(),
            // What the node's runtime and kernel have: the host's.
            "/sys/fs/cgroup" | "/proc" => path.into(),
            "/var/run/netns" => "/run/netns".into(),
            _ => self.root.path().join(path.trim_start_matches('/')),
        }
    }

    pub fn cni_bin(&self) -> PathBuf {
        self.host_path("/opt/cni/bin")
    }

    pub fn cni_net(&self) -> PathBuf {
        self.host_path("/etc/cni/net.d")
    }

    /// The agent's socket as the host (and a runtime's CNI plugin) reaches it.
    pub fn agent_socket(&self) -> PathBuf {
        self.host_path("/run/tproxy").join("agent.sock")
    }
}

/// The DaemonSet's pod spec.
pub fn pod_spec() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(MANIFEST);
    let ds: Value = serde_norway::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(ds["kind"].as_str(), Some("DaemonSet"));
    ds["spec"]["template"]["spec"].clone()
}

fn keys(v: &Value) -> Vec<String> {
    v.as_mapping()
        .map(|m| m.keys().map(|k| k.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// Fails on a key of `v` outside `known`.
#[track_caller]
fn only(v: &Value, what: &str, known: &[&str]) {
    for k in keys(v) {
        assert!(
            known.contains(&k.as_str()),
            "{MANIFEST}: {what}.{k} is not run by tests/common/daemonset.rs: teach it the key"
        );
    }
}

/// The DaemonSet's pod on a node, its containers named `<prefix>-<name>`.
pub struct DaemonSetPod<'a> {
    pub podman: &'a Podman,
    pub node: &'a Node,
    pub prefix: String,
    /// Environment set on top of the manifest's, by container name (the
    /// node-specific values a cluster's operator would set).
    pub env: BTreeMap<String, Vec<(String, String)>>,
    spec: Value,
}

impl<'a> DaemonSetPod<'a> {
    pub fn new(podman: &'a Podman, node: &'a Node, prefix: &str) -> DaemonSetPod<'a> {
        let spec = pod_spec();
        only(
            &spec,
            "spec",
            &[
                "serviceAccountName",
                "hostNetwork",
                "hostPID",
                "dnsPolicy",
                "priorityClassName",
                "tolerations",
                "nodeSelector",
                "terminationGracePeriodSeconds",
                "initContainers",
                "containers",
                "volumes",
            ],
        );
        // The host namespaces are what the runner gives every container.
        assert_eq!(spec["hostNetwork"].as_bool(), Some(true));
        assert_eq!(spec["hostPID"].as_bool(), Some(true));
        DaemonSetPod {
            podman,
            node,
            prefix: prefix.into(),
            env: BTreeMap::new(),
            spec,
        }
    }

    pub fn name(&self, container: &str) -> String {
        format!("{}-{container}", self.prefix)
    }

    /// The image both containers run.
    pub fn image(&self) -> String {
        self.spec["containers"][0]["image"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub fn grace(&self) -> u64 {
        self.spec["terminationGracePeriodSeconds"].as_u64().unwrap()
    }

    /// podman's arguments for one container of the spec (`run` and what
    /// follows, up to and including the image and its arguments).
    fn args(&self, c: &Value, detach: bool) -> Vec<String> {
        let name = c["name"].as_str().unwrap();
        only(
            c,
            name,
            &[
                "name",
                "image",
                "imagePullPolicy",
                "command",
                "args",
                "env",
                "securityContext",
                "resources",
                "volumeMounts",
            ],
        );
        assert_eq!(c["imagePullPolicy"].as_str(), Some("IfNotPresent"));
        let mut a: Vec<String> = vec!["run".into(), "--name".into(), self.name(name)];
        a.push(if detach { "--detach" } else { "--rm" }.into());
        a.extend(["--network", "host", "--pid", "host", "--pull", "never"].map(String::from));
        let sc = &c["securityContext"];
        only(
            sc,
            &format!("{name}.securityContext"),
            &["privileged", "allowPrivilegeEscalation"],
        );
        if sc["privileged"].as_bool() == Some(true) {
            a.push("--privileged".into());
        }
        if sc["allowPrivilegeEscalation"].as_bool() == Some(false) {
            a.extend(["--security-opt", "no-new-privileges"].map(String::from));
        }
        let res = &c["resources"];
        only(res, &format!("{name}.resources"), &["requests", "limits"]);
        only(
            &res["limits"],
            &format!("{name}.resources.limits"),
            &["memory"],
        );
        if let Some(mem) = res["limits"]["memory"].as_str() {
            let mib: u64 = mem
                .strip_suffix("Mi")
                .expect("a limit in Mi")
                .parse()
                .unwrap();
            a.push(format!("--memory={}m", mib));
        }
        for e in c["env"].as_sequence().into_iter().flatten() {
            let k = e["name"].as_str().unwrap();
            let v = match (&e["value"], &e["valueFrom"]) {
                (Value::String(v), Value::Null) => v.clone(),
                (Value::Null, from) => {
                    assert_eq!(
                        from["fieldRef"]["fieldPath"].as_str(),
                        Some("spec.nodeName"),
                        "{name}.env.{k}"
                    );
                    "test-node".into()
                }
                other => panic!("{name}.env.{k}: {other:?}"),
            };
            a.extend(["--env".into(), format!("{k}={v}")]);
        }
        for (k, v) in self.env.get(name).into_iter().flatten() {
            a.extend(["--env".into(), format!("{k}={v}")]);
        }
        for m in c["volumeMounts"].as_sequence().into_iter().flatten() {
            only(
                m,
                &format!("{name}.volumeMounts"),
                &["name", "mountPath", "mountPropagation", "readOnly"],
            );
            let vol = self.volume(m["name"].as_str().unwrap());
            let propagation = match m["mountPropagation"].as_str() {
                None | Some("None") => "rprivate",
                Some("HostToContainer") => "rslave",
                Some("Bidirectional") => "rshared",
                Some(other) => panic!("mountPropagation {other}"),
            };
            let mut opt = format!(
                "type=bind,src={},dst={},bind-propagation={propagation}",
                vol.display(),
                m["mountPath"].as_str().unwrap()
            );
            if m["readOnly"].as_bool() == Some(true) {
                opt.push_str(",ro=true");
            }
            a.extend(["--mount".into(), opt]);
        }
        let command = c["command"].as_sequence().expect("a command");
        a.extend([
            "--entrypoint".into(),
            command[0].as_str().unwrap().to_string(),
        ]);
        a.push(c["image"].as_str().unwrap().into());
        a.extend(
            command[1..]
                .iter()
                .chain(c["args"].as_sequence().into_iter().flatten())
                .map(|s| s.as_str().unwrap().to_string()),
        );
        a
    }

    /// The host path of the volume `name` (made if its type says so).
    fn volume(&self, name: &str) -> PathBuf {
        let v = self.spec["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no volume {name}"));
        only(v, "volumes", &["name", "hostPath"]);
        let hp = &v["hostPath"];
        only(hp, "volumes.hostPath", &["path", "type"]);
        let path = self.node.host_path(hp["path"].as_str().unwrap());
        match hp["type"].as_str() {
            Some("Directory") => assert!(path.is_dir(), "{}", path.display()),
            Some("DirectoryOrCreate") => std::fs::create_dir_all(&path).unwrap(),
            other => panic!("hostPath type {other:?}"),
        }
        path
    }

    /// Runs the init containers to completion (their output), then starts
    /// the containers.
    pub fn start(&self) -> String {
        let mut out = String::new();
        for c in self.spec["initContainers"].as_sequence().unwrap() {
            let args = self.args(c, false);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            out += &self.podman.run(&args);
        }
        for c in self.spec["containers"].as_sequence().unwrap() {
            let args = self.args(c, true);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            self.podman.run(&args);
        }
        out
    }

    /// Stops the pod as a kubelet does (SIGTERM, SIGKILL after the grace
    /// period) and removes its containers: the agent's exit code.
    pub fn stop(&self) -> i32 {
        let agent = self.name("agent");
        self.podman
            .run(&["stop", "--time", &self.grace().to_string(), &agent]);
        let code = self
            .podman
            .wait_exited(&agent, Duration::from_secs(self.grace() + 60));
        self.podman.run(&["rm", "--force", &agent]);
        code
    }

    /// `podman exec` in the agent container: (exit code, stdout, stderr).
    pub fn exec(&self, args: &[&str]) -> (i32, String, String) {
        let agent = self.name("agent");
        let mut a = vec!["exec", agent.as_str()];
        a.extend_from_slice(args);
        let out = self.podman.output(&a);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The agent container's log.
    pub fn log(&self) -> String {
        let out = self.podman.output(&["logs", &self.name("agent")]);
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    /// `tproxy cleanup` as the node would run it: the image, the agent's
    /// mounts (what the agent left: its targets' leftovers, pins, state).
    pub fn cleanup(&self) -> String {
        let agent = self.spec["containers"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|c| c["name"].as_str() == Some("agent"))
            .unwrap()
            .clone();
        let mut c = agent;
        c["name"] = Value::String("cleanup".into());
        c["args"] = Value::Sequence(vec![Value::String("cleanup".into())]);
        let args = self.args(&c, false);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.podman.run(&args)
    }
}

impl Drop for DaemonSetPod<'_> {
    fn drop(&mut self) {
        let agent = self.name("agent");
        let _ = self
            .podman
            .output(&["rm", "--force", "--time", "0", &agent]);
    }
}
