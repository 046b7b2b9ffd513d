//! The Kubernetes deployment (deploy/): every manifest is valid for the
//! Kubernetes API, checked offline against its schemas
//! (`kubernetes-validate`, strict: unknown fields are errors); the facts
//! the schema cannot check (what the DaemonSet runs and mounts, the RBAC's
//! reach, the sidecar's annotations, the image's paths) are asserted here;
//! Envoy loads the sidecar's config; and the CNI install script chains
//! tproxy-cni into sample conflists, once, keeping them valid JSON, under
//! dash and under busybox alone.
use std::{
    collections::BTreeSet,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde::Deserialize as _;
use serde_json::{Value as Json, json};
use serde_norway::Value;
use tproxy::config::options::{DEFAULT_PROXY_MARK, DEFAULT_PROXY_PORT};
use tproxy_lab::{envoy, k8s_validate};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn deploy() -> PathBuf {
    repo().join("deploy")
}

/// Every `*.yaml` under deploy/kubernetes, examples included.
fn manifests() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                out.push(p);
            }
        }
    }
    let mut all = Vec::new();
    walk(&deploy().join("kubernetes"), &mut all);
    all.sort();
    all
}

/// The YAML documents of a file (`---`-separated), empty ones skipped.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// Every resource of every manifest.
fn resources() -> Vec<Value> {
    manifests().iter().flat_map(|p| documents(p)).collect()
}

/// The one resource of `kind`.
fn resource(kind: &str) -> Value {
    let mut found: Vec<Value> = resources()
        .into_iter()
        .filter(|r| r["kind"].as_str() == Some(kind))
        .collect();
    assert_eq!(found.len(), 1, "one {kind}");
    found.remove(0)
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("not a list: {v:?}"))
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect()
}

/// The element of a list whose `name` is `name`.
fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_sequence()
        .unwrap()
        .iter()
        .find(|x| x["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {name:?} in {list:?}"))
}

#[test]
fn every_manifest_is_valid_kubernetes() {
    let files = manifests();
    assert!(files.len() >= 3, "{files:?}");
    let mut kinds = BTreeSet::new();
    for file in &files {
        let docs = documents(file);
        kinds.extend(docs.iter().map(|d| d["kind"].as_str().unwrap().to_string()));
        for version in k8s_validate::KUBERNETES_VERSIONS {
            let out = k8s_validate::validate(file, version).unwrap_or_else(|e| panic!("{e:#}"));
            // One line per resource: none skipped.
            assert_eq!(
                out.lines().filter(|l| l.contains(" passed ")).count(),
                docs.len(),
                "{}: {out}",
                file.display()
            );
        }
    }
    let want: BTreeSet<String> = [
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
        "Pod",
        "ServiceAccount",
    ]
    .map(String::from)
    .into();
    assert_eq!(kinds, want);
}

/// The check is real: copies of the DaemonSet broken in one place each
/// are refused, with the place named.
#[test]
fn the_schema_check_rejects_broken_manifests() {
    let good = std::fs::read_to_string(deploy().join("kubernetes/10-daemonset.yaml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        // A misspelt field (strict: unknown fields are errors).
        (
            "hostNetwork: true",
            "hostNetwrok: true",
            "'hostNetwrok' was unexpected",
        ),
        // A misspelt field deep down.
        (
            "mountPropagation: Bidirectional",
            "mountPropagaton: Bidirectional",
            "'mountPropagaton' was unexpected",
        ),
        // A wrong type.
        (
            "terminationGracePeriodSeconds: 45",
            "terminationGracePeriodSeconds: 45s",
            "is not of type 'integer'",
        ),
        // A kind the API does not have (kubernetes-validate alone only
        // warns, exit 0).
        (
            "kind: DaemonSet",
            "kind: DaemonSett",
            "Couldn't find schema for kind DaemonSett",
        ),
    ];
    for (from, to, want) in cases {
        assert!(good.contains(from), "{from}");
        let path = dir.path().join("broken.yaml");
        std::fs::write(&path, good.replacen(from, to, 1)).unwrap();
        let err = k8s_validate::validate(&path, k8s_validate::KUBERNETES_VERSIONS[0])
            .expect_err(to)
            .to_string();
        eprintln!("{to}: {err}");
        assert!(err.contains(want), "{to}: {err}");
    }
}

#[test]
fn daemonset_runs_the_agent_with_the_host_access_it_needs() {
    let ds = resource("DaemonSet");
    let sa = resource("ServiceAccount");
    assert_eq!(ds["metadata"]["namespace"], sa["metadata"]["namespace"]);
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], sa["metadata"]["name"]);
    assert_eq!(pod["hostNetwork"].as_bool(), Some(true));
    assert_eq!(pod["hostPID"].as_bool(), Some(true));
    // Long enough for the agent's 30 s drain.
    assert!(pod["terminationGracePeriodSeconds"].as_u64().unwrap() > 30);
    // Every node, whatever its taints.
    assert_eq!(pod["tolerations"][0]["operator"].as_str(), Some("Exists"));

    let agent = named(&pod["containers"], "agent");
    let mut argv = strs(&agent["command"]);
    argv.extend(strs(&agent["args"]));
    assert_eq!(
        argv,
        [
            "/usr/local/bin/tproxy",
            "agent",
            "--socket",
            "/run/tproxy/agent.sock",
            "--targets-dir",
            "/run/tproxy/targets.d",
            "--bpffs",
            "/sys/fs/bpf/tproxy",
            "--metrics-addr",
            "127.0.0.1:9464"
        ]
    );
    // With hostNetwork a port would be the node's: none is declared, and
    // metrics stay on the node's loopback.
    assert!(agent["ports"].is_null(), "{:?}", agent["ports"]);
    assert_eq!(agent["securityContext"]["privileged"].as_bool(), Some(true));
    assert_eq!(
        named(&agent["env"], "NODE_NAME")["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("spec.nodeName")
    );

    // Each mount: (host path, container path, propagation). The schema
    // does not check propagation values (a misspelt one passes it).
    let volumes = &pod["volumes"];
    let mounts = &agent["volumeMounts"];
    let mount_of = |host: &str| {
        let v = volumes
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["hostPath"]["path"].as_str() == Some(host))
            .unwrap_or_else(|| panic!("no hostPath volume {host}"));
        named(mounts, v["name"].as_str().unwrap()).clone()
    };
    for (host, path, propagation) in [
        ("/sys/fs/bpf", "/sys/fs/bpf", Some("Bidirectional")),
        ("/sys/fs/cgroup", "/sys/fs/cgroup", Some("HostToContainer")),
        ("/run/tproxy", "/run/tproxy", None),
        ("/var/run/netns", "/var/run/netns", Some("HostToContainer")),
        ("/proc", "/host/proc", None),
    ] {
        let m = mount_of(host);
        assert_eq!(m["mountPath"].as_str(), Some(path), "{host}");
        assert_eq!(m["mountPropagation"].as_str(), propagation, "{host}");
    }

    // The init container installs the CNI plugin with the script the image
    // ships, into the host's CNI directories, with the entry's defaults
    // being tproxy's.
    let init = named(&pod["initContainers"], "install-cni");
    assert_eq!(init["image"], agent["image"]);
    assert_eq!(
        strs(&init["command"]),
        ["/usr/local/bin/install-cni.sh", "install"]
    );
    let init_mounts = &init["volumeMounts"];
    for (host, path) in [
        ("/opt/cni/bin", "/host/opt/cni/bin"),
        ("/etc/cni/net.d", "/host/etc/cni/net.d"),
    ] {
        let v = volumes
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["hostPath"]["path"].as_str() == Some(host))
            .unwrap();
        let m = named(init_mounts, v["name"].as_str().unwrap());
        assert_eq!(m["mountPath"].as_str(), Some(path));
    }
    let env = |name| {
        named(&init["env"], name)["value"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(env("TPROXY_PROXY_PORT"), DEFAULT_PROXY_PORT.to_string());
    assert_eq!(env("TPROXY_PROXY_MARK"), DEFAULT_PROXY_MARK.to_string());
    assert_eq!(env("TPROXY_ACCEL"), "true");
}

/// Least privilege: read pods, nothing else, bound to the agent only.
#[test]
fn rbac_lets_the_agent_read_pods_and_nothing_more() {
    let role = resource("ClusterRole");
    let rules = role["rules"].as_sequence().unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(strs(&rules[0]["apiGroups"]), [""]);
    assert_eq!(strs(&rules[0]["resources"]), ["pods"]);
    assert_eq!(strs(&rules[0]["verbs"]), ["get", "list", "watch"]);
    let binding = resource("ClusterRoleBinding");
    let sa = resource("ServiceAccount");
    assert_eq!(binding["roleRef"]["kind"].as_str(), Some("ClusterRole"));
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    let subjects = binding["subjects"].as_sequence().unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0]["kind"].as_str(), Some("ServiceAccount"));
    assert_eq!(subjects[0]["name"], sa["metadata"]["name"]);
    assert_eq!(subjects[0]["namespace"], sa["metadata"]["namespace"]);
}

/// The sidecar example: the annotations tproxy-cni reads, Envoy's image at
/// the version the project tests, and its config loaded by that Envoy and
/// keeping tproxy's contract.
#[test]
fn envoy_sidecar_example_is_annotated_and_envoy_loads_its_config() {
    let pod = resource("Pod");
    let ann = &pod["metadata"]["annotations"];
    assert_eq!(ann["tproxy.io/ports"].as_str(), Some("8000"));
    assert_eq!(
        ann["tproxy.io/proxy-port"].as_str(),
        Some(DEFAULT_PROXY_PORT.to_string().as_str())
    );
    assert_eq!(
        ann["tproxy.io/proxy-mark"].as_str(),
        Some(DEFAULT_PROXY_MARK.to_string().as_str())
    );
    assert_eq!(ann["tproxy.io/accel"].as_str(), Some("true"));
    let containers = &pod["spec"]["containers"];
    let app = named(containers, "app");
    assert_eq!(app["ports"][0]["containerPort"].as_u64(), Some(8000));
    let sidecar = named(containers, "envoy");
    assert_eq!(
        sidecar["image"].as_str(),
        Some(format!("envoyproxy/envoy:v{}", envoy::VERSION).as_str())
    );
    // SO_MARK needs CAP_NET_ADMIN (or CAP_NET_RAW), kept only by root.
    let sc = &sidecar["securityContext"];
    assert_eq!(sc["runAsUser"].as_u64(), Some(0));
    assert_eq!(strs(&sc["capabilities"]["add"]), ["NET_ADMIN"]);
    let args = strs(&sidecar["args"]);
    let config_path = args[args.iter().position(|a| *a == "-c").unwrap() + 1];

    // The ConfigMap the pod mounts holds the file Envoy is pointed at.
    let cm = resource("ConfigMap");
    let vol = named(&pod["spec"]["volumes"], "envoy-config");
    assert_eq!(vol["configMap"]["name"], cm["metadata"]["name"]);
    let mount = named(&sidecar["volumeMounts"], "envoy-config");
    let file = Path::new(config_path)
        .strip_prefix(mount["mountPath"].as_str().unwrap())
        .unwrap();
    let text = cm["data"][file.to_str().unwrap()].as_str().unwrap();

    let cfg: Value = serde_norway::from_str(text).unwrap();
    let l = &cfg["static_resources"]["listeners"][0];
    assert_eq!(
        l["address"]["socket_address"]["port_value"].as_u64(),
        Some(DEFAULT_PROXY_PORT.into())
    );
    assert_eq!(
        l["listener_filters"][0]["name"].as_str(),
        Some("envoy.filters.listener.original_dst")
    );
    let tcp = &l["filter_chains"][0]["filters"][0];
    assert_eq!(
        tcp["name"].as_str(),
        Some("envoy.filters.network.tcp_proxy")
    );
    let c = &cfg["static_resources"]["clusters"][0];
    assert_eq!(tcp["typed_config"]["cluster"], c["name"]);
    assert_eq!(c["type"].as_str(), Some("ORIGINAL_DST"));
    let opt = &c["upstream_bind_config"]["socket_options"][0];
    // SOL_SOCKET / SO_MARK = tproxy's proxy mark.
    assert_eq!(opt["level"].as_u64(), Some(1));
    assert_eq!(opt["name"].as_u64(), Some(36));
    assert_eq!(opt["int_value"].as_u64(), Some(DEFAULT_PROXY_MARK.into()));

    let bin = envoy::require().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("envoy.yaml");
    std::fs::write(&path, text).unwrap();
    let out = envoy::validate(&bin, &path).unwrap();
    assert!(out.contains("OK"), "{out}");
    // And Envoy would refuse a broken one.
    std::fs::write(&path, text.replace("lb_policy:", "lb_polciy:")).unwrap();
    assert!(envoy::validate(&bin, &path).is_err());
}

/// The image puts the binaries and the script where the DaemonSet runs
/// them, with nft, from nothing pulled (`FROM scratch`: `cargo xtask image`
/// assembles the context); both containers name the image that command
/// builds (tests/daemonset.rs builds and runs it).
#[test]
fn containerfile_ships_what_the_daemonset_runs() {
    let text = std::fs::read_to_string(deploy().join("Containerfile")).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let froms: Vec<&&str> = lines.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms, [&"FROM scratch"], "{text}");
    for l in [
        "COPY base/ /",
        "COPY nft/ /",
        "COPY tproxy tproxy-cni install-cni.sh /usr/local/bin/",
        "ENTRYPOINT [\"/usr/local/bin/tproxy\"]",
    ] {
        assert!(lines.contains(&l), "{l:?} in {text}");
    }
    assert!(
        !lines.iter().any(|l| l.starts_with("RUN ")),
        "nothing runs at build time (a scratch image has no shell to run it)"
    );
    let ds = resource("DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let agent = named(&pod["containers"], "agent");
    let init = named(&pod["initContainers"], "install-cni");
    let image = format!("localhost/tproxy:{}", env!("CARGO_PKG_VERSION"));
    assert_eq!(agent["image"].as_str(), Some(image.as_str()));
    assert_eq!(init["image"].as_str(), Some(image.as_str()));
    assert_eq!(agent["command"][0].as_str(), Some("/usr/local/bin/tproxy"));
}

// ---- deploy/install-cni.sh ----

/// A shell to run the script with: the host's dash, or busybox's sh with
/// a PATH of busybox applets only (as a busybox-based image would have).
#[derive(Clone, Copy, Debug)]
enum Shell {
    Dash,
    Busybox,
}

struct Node {
    dir: tempfile::TempDir,
    shell: Shell,
}

impl Node {
    /// A fake node: CNI bin and net dirs, a stand-in tproxy-cni binary,
    /// and for busybox a directory of its applets.
    fn new(shell: Shell) -> Node {
        let dir = tempfile::tempdir().unwrap();
        for d in ["bin", "net.d", "applets"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        std::fs::write(dir.path().join("tproxy-cni"), "#!/bin/sh\necho cni\n").unwrap();
        if let Shell::Busybox = shell {
            let st = Command::new("busybox")
                .args(["--install", "-s"])
                .arg(dir.path().join("applets"))
                .status()
                .expect("busybox (cargo xtask setup installs it)");
            assert!(st.success());
        }
        Node { dir, shell }
    }

    fn net(&self) -> PathBuf {
        self.dir.path().join("net.d")
    }

    fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let script = deploy().join("install-cni.sh");
        let mut cmd = match self.shell {
            Shell::Dash => Command::new("dash"),
            Shell::Busybox => {
                let mut c = Command::new(self.dir.path().join("applets/sh"));
                c.env("PATH", self.dir.path().join("applets"));
                c
            }
        };
        cmd.arg(script)
            .args(args)
            .env("CNI_BIN_DIR", self.dir.path().join("bin"))
            .env("CNI_NET_DIR", self.net())
            .env("TPROXY_CNI_BIN", self.dir.path().join("tproxy-cni"))
            .envs(env.iter().copied());
        cmd.output().unwrap()
    }

    /// Runs the script; it must succeed. Its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args, &[]);
        assert!(
            out.status.success(),
            "{:?} install-cni.sh {args:?}: {}",
            self.shell,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the script; it must fail with exit 1. Its stderr.
    fn fails(&self, args: &[&str], env: &[(&str, &str)]) -> String {
        let out = self.run(args, env);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{:?} {args:?} {env:?}",
            self.shell
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// The names in the net dir.
    fn files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.net())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

/// The entry the DaemonSet's defaults produce (the issue's contract with
/// tproxy-cni).
fn expected_entry() -> Json {
    json!({
        "type": "tproxy-cni",
        "agentSocket": "/run/tproxy/agent.sock",
        "ports": "8000",
        "proxyPort": 15006,
        "proxyMark": 1337,
        "accel": true,
        "capabilities": {"io.kubernetes.cri.pod-annotations": true, "cgroupPath": true}
    })
}

/// Conflists as pod networks write them, and awkward ones.
const CONFLISTS: &[(&str, &str)] = &[
    (
        "10-calico.conflist",
        r#"{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {
      "type": "calico",
      "log_level": "info",
      "log_file_path": "/var/log/calico/cni/cni.log",
      "datastore_type": "kubernetes",
      "nodename": "node-1",
      "mtu": 0,
      "ipam": {
          "type": "calico-ipam"
      },
      "policy": {
          "type": "k8s"
      },
      "kubernetes": {
          "kubeconfig": "/etc/cni/net.d/calico-kubeconfig"
      }
    },
    {
      "type": "portmap",
      "snat": true,
      "capabilities": {"portMappings": true}
    },
    {
      "type": "bandwidth",
      "capabilities": {"bandwidth": true}
    }
  ]
}
"#,
    ),
    (
        "10-flannel.conflist",
        r#"{
  "name": "cbr0",
  "cniVersion": "0.3.1",
  "plugins": [
    {
      "type": "flannel",
      "delegate": {
        "hairpinMode": true,
        "isDefaultGateway": true
      }
    },
    {
      "type": "portmap",
      "capabilities": {
        "portMappings": true
      }
    }
  ]
}
"#,
    ),
    // One line, no trailing newline; brackets, braces, escaped quotes, a
    // "plugins" key and a "tproxy-cni" plugin inside strings and nested
    // objects (before the real list), which must not be taken for the
    // real ones.
    (
        "05-tricky.conflist",
        r#"{"name":"x ] } [ {","odd":"a \" ] b","meta":{"plugins":[{"type":"tproxy-cni"}]},"cniVersion":"1.0.0","note":"\"plugins\": [\\","plugins":[{"type":"bridge","bridge":"cni0","ipam":{"type":"host-local","plugins":[{"type":"tproxy-cni"}],"ranges":[[{"subnet":"10.1.0.0/16"}]]},"comment":"type: \"tproxy-cni\"]"}],"tail":{"plugins":[]}}"#,
    ),
    // Tabs and CRLF line ends.
    (
        "20-crlf.conflist",
        "{\r\n\t\"cniVersion\": \"0.4.0\",\r\n\t\"name\": \"crlf\",\r\n\t\"plugins\": [\r\n\t\t{\"type\": \"ptp\"}\r\n\t]\r\n}\r\n",
    ),
    // An empty list.
    (
        "30-empty.conflist",
        r#"{"cniVersion": "1.0.0", "name": "empty", "plugins": []}"#,
    ),
];

fn parse(path: &Path) -> Json {
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}\n{text}", path.display()))
}

fn chains_once_and_uninstalls(shell: Shell) {
    for (name, text) in CONFLISTS {
        let node = Node::new(shell);
        let conf = node.net().join(name);
        std::fs::write(&conf, text).unwrap();
        // A mode of its own, which the rewrite must keep.
        std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o640)).unwrap();
        let original: Json = serde_json::from_str(text).unwrap();

        let out = node.ok(&[]);
        assert!(out.contains("chained tproxy-cni"), "{name}: {out}");
        let installed = node.dir.path().join("bin/tproxy-cni");
        assert_eq!(
            std::fs::read(&installed).unwrap(),
            std::fs::read(node.dir.path().join("tproxy-cni")).unwrap()
        );
        assert_eq!(
            std::fs::metadata(&installed).unwrap().permissions().mode() & 0o777,
            0o755
        );
        let after = parse(&conf);
        // Appended last, everything else as it was.
        let mut want = original.clone();
        want["plugins"]
            .as_array_mut()
            .unwrap()
            .push(expected_entry());
        assert_eq!(after, want, "{shell:?} {name}");
        assert_eq!(
            std::fs::metadata(&conf).unwrap().permissions().mode() & 0o777,
            0o640,
            "{name}"
        );
        // The original kept, byte for byte, under a name libcni ignores;
        // no temp file left.
        let backup = format!("{name}.tproxy-orig");
        assert_eq!(
            std::fs::read_to_string(node.net().join(&backup)).unwrap(),
            *text
        );
        assert_eq!(node.files(), [name.to_string(), backup.clone()]);

        // Idempotent: nothing changes on a second run.
        let bytes = std::fs::read(&conf).unwrap();
        let out = node.ok(&["install"]);
        assert!(out.contains("unchanged"), "{name}: {out}");
        assert_eq!(std::fs::read(&conf).unwrap(), bytes, "{shell:?} {name}");
        assert_eq!(node.files(), [name.to_string(), backup.clone()]);

        // Uninstall: the pod network's config again, then a no-op.
        let out = node.ok(&["uninstall"]);
        assert!(out.contains("removed tproxy-cni"), "{name}: {out}");
        assert_eq!(parse(&conf), original, "{shell:?} {name}");
        let out = node.ok(&["uninstall"]);
        assert!(out.contains("unchanged"), "{name}: {out}");
        assert_eq!(parse(&conf), original);
    }
}

#[test]
fn install_cni_chains_once_and_uninstalls_with_dash() {
    chains_once_and_uninstalls(Shell::Dash);
}

#[test]
fn install_cni_chains_once_and_uninstalls_with_busybox_alone() {
    chains_once_and_uninstalls(Shell::Busybox);
}

/// It edits the file the runtime uses (libcni: the first *.conf,
/// *.conflist, *.json in byte order) or the one named; it refuses what it
/// cannot chain into, changing nothing.
#[test]
fn install_cni_picks_the_runtimes_config_and_refuses_what_it_cannot_chain() {
    let node = Node::new(Shell::Dash);
    let fail = node.fails(&[], &[]);
    assert!(fail.contains("no CNI config"), "{fail}");

    let flannel = CONFLISTS[1].1;
    let calico = CONFLISTS[0].1;
    std::fs::write(node.net().join("10-flannel.conflist"), flannel).unwrap();
    std::fs::write(node.net().join("20-calico.conflist"), calico).unwrap();
    // A single-plugin .conf first: that is what the runtime would use.
    let single = r#"{"cniVersion": "0.3.1", "name": "b", "type": "bridge"}"#;
    std::fs::write(node.net().join("05-bridge.conf"), single).unwrap();
    let fail = node.fails(&[], &[]);
    assert!(fail.contains("05-bridge.conf is not a conflist"), "{fail}");
    assert_eq!(
        node.files(),
        [
            "05-bridge.conf",
            "10-flannel.conflist",
            "20-calico.conflist"
        ]
    );
    std::fs::remove_file(node.net().join("05-bridge.conf")).unwrap();

    // Bad settings never reach the JSON.
    for (k, v) in [
        ("TPROXY_PORTS", "8000\","),
        ("TPROXY_PROXY_PORT", "15006,"),
        ("TPROXY_ACCEL", "yes"),
        ("TPROXY_AGENT_SOCKET", "relative.sock"),
        ("TPROXY_CGROUP", "/pod\",\"x"),
    ] {
        let fail = node.fails(&[], &[(k, v)]);
        assert!(fail.contains(k), "{fail}");
    }
    assert_eq!(node.files(), ["10-flannel.conflist", "20-calico.conflist"]);

    // The first in byte order.
    node.ok(&[]);
    let plugins = |f: &str| {
        parse(&node.net().join(f))["plugins"]
            .as_array()
            .unwrap()
            .len()
    };
    assert_eq!(plugins("10-flannel.conflist"), 3);
    assert_eq!(plugins("20-calico.conflist"), 3);

    // Or the named one, with other settings.
    let out = node.run(
        &[],
        &[
            ("CNI_CONF_NAME", "20-calico.conflist"),
            ("TPROXY_PORTS", "8000,9000-9010"),
            ("TPROXY_ACCEL", "false"),
            // For runtimes that pass no cgroupPath (tproxy-cni expands it).
            ("TPROXY_CGROUP", "/kubepods/pod${K8S_POD_UID}"),
        ],
    );
    assert!(out.status.success());
    let entry = parse(&node.net().join("20-calico.conflist"))["plugins"][3].clone();
    assert_eq!(entry["ports"], "8000,9000-9010");
    assert_eq!(entry["accel"], false);
    assert_eq!(entry["cgroup"], "/kubepods/pod${K8S_POD_UID}");
    // Without it, no "cgroup" key: the runtime's cgroupPath is the one.
    assert!(
        parse(&node.net().join("10-flannel.conflist"))["plugins"][2]
            .get("cgroup")
            .is_none()
    );
}
