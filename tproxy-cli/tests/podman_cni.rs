//! A real container runtime driving tproxy-cni: podman's CNI back-end sets
//! up each pod's network with the reference `bridge` and `host-local`
//! plugins and tproxy-cni chained after them, from the conflist in its
//! config directory, which the DaemonSet's init step (the image run as
//! common/daemonset.rs runs it) extended; the agent is that DaemonSet's.
//! Two pods, as a kubelet would ask for them (podman has no kubelet: the
//! pod's uid comes through CNI_ARGS and names its cgroup parent): an app
//! with an Envoy sidecar, and a client.
//!
//! Checked: ADD comes before the runtime has made the pod's cgroup, and
//! the target waits for it; the cgroup the runtime makes is the one
//! attached (the containers' cgroups are inside it, nothing above it is
//! touched); byte-exact traffic from the client pod to the app through
//! Envoy over IPv4 and IPv6 with both legs socket to socket; removing the
//! pod drains and detaches; a failing ADD is undone by the runtime's DEL,
//! which the plugin answers for a pod the agent never had.
//!
//! Root only. podman's storage and config, the node's directories, the
//! bridge, the IPAM directory and the pods' cgroups (in every hierarchy
//! of this hybrid host) are the test's own and go however it ends.
mod common;

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::{
    STARTUP,
    daemonset::{DaemonSetPod, Node},
    eventually, example,
    podman::{Cni, Podman},
    target_by,
};
use serde_json::{Value, json};
use tproxy::api::{self, Request};
use tproxy_lab::{Netns, cgroup::cgroup2_root, cni::CNI_PATH, envoy, unique};

/// A host bridge only this test uses, deleted on drop (the bridge
/// plugin's DEL leaves bridges).
struct Bridge(String);

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

/// The pods' cgroup parent `/NAME`, below which podman makes each pod's
/// cgroup in every hierarchy (cgroup v1 controllers too, on this hybrid
/// host); removed, deepest first, on drop.
struct CgroupTree(String);

impl CgroupTree {
    fn dirs(&self) -> Vec<PathBuf> {
        let mut all = Vec::new();
        let hierarchies = std::fs::read_dir("/sys/fs/cgroup").unwrap();
        for h in hierarchies.flatten() {
            let top = h.path().join(&self.0);
            if top.is_dir() {
                walk_dirs(&top, &mut all);
            }
        }
        all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        all
    }
}

fn walk_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            walk_dirs(&e.path(), out);
        }
    }
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        for d in self.dirs() {
            if let Err(e) = std::fs::remove_dir(&d) {
                eprintln!("removing {}: {e}", d.display());
            }
        }
    }
}

/// A 10.98.X.0/24 and fd00:98:X::/64 in no address or route of the host.
fn free_subnets() -> (String, String) {
    let used = tproxy_lab::run(Command::new("ip").args(["-o", "addr"])).unwrap()
        + &tproxy_lab::run(Command::new("ip").args(["route", "show", "table", "all"])).unwrap()
        + &tproxy_lab::run(Command::new("ip").args(["-6", "route", "show", "table", "all"]))
            .unwrap();
    let x = (0..200)
        .map(|i| (i + std::process::id() % 200) % 200 + 20)
        .find(|x| {
            !used.contains(&format!("10.98.{x}.")) && !used.contains(&format!("fd00:98:{x}:"))
        })
        .expect("a free 10.98.X.0/24");
    (format!("10.98.{x}.0/24"), format!("fd00:98:{x}::/64"))
}

/// An image of nothing but a merged-/usr skeleton: the workload's
/// containers bind the host's /usr (read-only) for their programs'
/// libraries, and the programs themselves.
fn host_usr_image(podman: &Podman) -> String {
    let tree = tempfile::tempdir().unwrap();
    for d in ["usr", "etc", "tmp", "proc", "sys", "dev", "run", "opt", "x"] {
        std::fs::create_dir_all(tree.path().join(d)).unwrap();
    }
    for (link, to) in [
        ("bin", "usr/bin"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ] {
        std::os::unix::fs::symlink(to, tree.path().join(link)).unwrap();
    }
    let reference = "localhost/tpx-host-usr:test";
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(tree.path())
        .args(["-c", "."])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = podman
        .command()
        .args(["import", "-q", "-", reference])
        .stdin(tar.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(tar.wait().unwrap().success());
    assert!(out.status.success(), "{out:?}");
    reference.into()
}

/// The pod's network namespace, by podman's path for it (kept: podman
/// removes it with the pod).
fn pod_netns(podman: &Podman, infra: &str) -> Netns {
    let path = podman.run(&[
        "inspect",
        "--format",
        "{{.NetworkSettings.SandboxKey}}",
        infra,
    ]);
    let name = Path::new(path.trim())
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let mut ns = Netns::adopt(&name).unwrap_or_else(|| panic!("no netns {path}"));
    ns.keep();
    ns
}

/// Waits until no IPv6 address in `ns` is tentative.
fn wait_dad(ns: &Netns) {
    eventually("IPv6 duplicate address detection done", STARTUP, || {
        ns.ip(&["-6", "addr", "show", "tentative"])
            .unwrap()
            .trim()
            .is_empty()
    });
}

struct Pod {
    name: String,
    uid: String,
    infra: String,
    ns: Netns,
    ip4: IpAddr,
    ip6: IpAddr,
}

/// The pod's addresses on eth0 (IPv4, IPv6), as IPAM gave them.
fn pod_addresses(ns: &Netns) -> (IpAddr, IpAddr) {
    let addrs = ns.ip(&["-o", "addr", "show", "eth0"]).unwrap();
    let find = |fam: &str| -> IpAddr {
        addrs
            .lines()
            .filter(|l| l.contains(&format!(" {fam} ")) && l.contains("scope global"))
            .find_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                let i = w.iter().position(|x| *x == fam)?;
                w.get(i + 1)?.split('/').next()?.parse().ok()
            })
            .unwrap_or_else(|| panic!("no {fam} address: {addrs}"))
    };
    (find("inet"), find("inet6"))
}

struct World {
    podman: Podman,
    network: String,
    parent: String,
}

impl World {
    /// `podman pod create` and `pod start` (the infra container: CNI ADD),
    /// with the uid in CNI_ARGS as a kubelet passes it; podman's stderr if
    /// the start fails.
    fn start_pod(&self, name: &str, uid: Option<&str>) -> Result<Pod, String> {
        let cg_uid = uid.unwrap_or("none");
        self.podman.run(&[
            "pod",
            "create",
            "--name",
            name,
            "--network",
            &self.network,
            "--cgroup-parent",
            &format!("/{}/pod{cg_uid}", self.parent),
        ]);
        let mut args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default".to_string();
        if let Some(uid) = uid {
            args += &format!(";K8S_POD_UID={uid}");
        }
        let out = self
            .podman
            .command()
            .env("CNI_ARGS", args)
            .args(["pod", "start", name])
            .output()
            .unwrap();
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let infra = self
            .podman
            .run(&["pod", "inspect", "--format", "{{.InfraContainerID}}", name])
            .trim()
            .to_string();
        let ns = pod_netns(&self.podman, &infra);
        wait_dad(&ns);
        let (ip4, ip6) = pod_addresses(&ns);
        Ok(Pod {
            name: name.into(),
            uid: cg_uid.into(),
            infra,
            ns,
            ip4,
            ip6,
        })
    }

    /// The pod's cgroup: what the runtime makes below the parent.
    fn cgroup(&self, pod: &Pod) -> PathBuf {
        cgroup2_root()
            .unwrap()
            .join(&self.parent)
            .join(format!("pod{}", pod.uid))
    }

    /// A container of `pod` from the host-/usr image.
    fn run_in(&self, pod: &Pod, image: &str, name: &str, extra: &[&str], cmd: &[&str]) {
        let examples = Path::new(&example("lab-app"))
            .parent()
            .unwrap()
            .display()
            .to_string();
        let mut args = vec![
            "run",
            "--detach",
            "--pod",
            &pod.name,
            "--name",
            name,
            "--pull",
            "never",
            "--volume",
            "/usr:/usr:ro",
        ];
        let x = format!("{examples}:/x:ro");
        args.extend(["--volume", &x]);
        args.extend_from_slice(extra);
        args.push(image);
        args.extend_from_slice(cmd);
        self.podman.run(&args);
    }

    /// `lab-client echo` from a one-shot container of `pod`.
    fn echo(&self, pod: &Pod, image: &str, dst: &str, bytes: usize) -> String {
        let examples = Path::new(&example("lab-client"))
            .parent()
            .unwrap()
            .display()
            .to_string();
        let x = format!("{examples}:/x:ro");
        let n = bytes.to_string();
        self.podman.run(&[
            "run",
            "--rm",
            "--pod",
            &pod.name,
            "--pull",
            "never",
            "--volume",
            "/usr:/usr:ro",
            "--volume",
            &x,
            image,
            "/x/lab-client",
            "echo",
            dst,
            "--bytes",
            &n,
        ])
    }
}

fn agent_list(node: &Node) -> Vec<api::TargetStatus> {
    api::call(
        &node.agent_socket(),
        &Request::List,
        Duration::from_secs(30),
    )
    .unwrap()
    .targets
    .unwrap()
}

fn stats_of(ds: &DaemonSetPod, id: &str) -> Value {
    let (code, out, err) = ds.exec(&["tproxy", "stats", "--agent", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    target_by(&v, "id", id).clone()
}

/// The unified-hierarchy path of a process's cgroup (relative to the mount).
fn cgroup_of(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap()
        .to_string()
}

#[test]
fn podman_runs_pods_through_tproxy_cni_and_the_agent_serves_them() {
    let t0 = Instant::now();
    let forwarding = || {
        (
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
            std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/forwarding").unwrap(),
        )
    };
    let forwarding_before = forwarding();
    // The host's own tables and rules: nothing of this test's lands there
    // (no gateway, no masquerade, no port mappings in the pod network).
    let host_tables = || {
        tproxy_lab::run(Command::new("nft").args(["list", "tables"])).unwrap()
            + &tproxy_lab::run(Command::new("iptables").arg("-S")).unwrap()
            + &tproxy_lab::run(Command::new("ip6tables").arg("-S")).unwrap()
    };
    let tables_before = host_tables();
    let node = Node::new();
    let parent = CgroupTree(unique("tpx-kubepods-"));
    let bridge = Bridge(unique("tpb").replace('-', ""));
    assert!(bridge.0.len() <= 15, "{}", bridge.0);
    let plugin_dirs = [node.cni_bin(), PathBuf::from(CNI_PATH)];
    let plugin_dirs: Vec<&Path> = plugin_dirs.iter().map(PathBuf::as_path).collect();
    let network = unique("tpx-pods-");
    let world = World {
        podman: Podman::new(Some(Cni {
            config_dir: &node.cni_net(),
            plugin_dirs: &plugin_dirs,
        })),
        network: network.clone(),
        parent: parent.0.clone(),
    };
    let image = world.podman.build_image();
    let usr = host_usr_image(&world.podman);

    // The node's pod network: the bridge plugin on a bridge of our own
    // (no gateway: the host's forwarding stays as it is), host-local
    // addresses from a directory of our own.
    let (v4, v6) = free_subnets();
    let ipam = node.root.path().join("var/lib/cni/networks");
    let conflist = json!({
        "cniVersion": "1.0.0",
        "name": network,
        "plugins": [{
            "type": "bridge", "bridge": bridge.0, "isGateway": false, "ipMasq": false,
            "ipam": {"type": "host-local", "dataDir": ipam,
                     "ranges": [[{"subnet": v4}], [{"subnet": v6}]]},
        }],
    });
    let conf_path = node.cni_net().join("10-pods.conflist");
    std::fs::write(&conf_path, serde_json::to_string_pretty(&conflist).unwrap()).unwrap();

    // The DaemonSet: its init step chains tproxy-cni in; the operator's
    // settings for this node: the agent's socket as the host reaches it,
    // the ports, and the pods' cgroup (podman passes no cgroupPath).
    let mut ds = DaemonSetPod::new(&world.podman, &node, &unique("tpx-ds-"));
    ds.env.insert(
        "install-cni".into(),
        vec![
            (
                "TPROXY_AGENT_SOCKET".into(),
                node.agent_socket().display().to_string(),
            ),
            ("TPROXY_PORTS".into(), "8000,8080".into()),
            (
                "TPROXY_CGROUP".into(),
                format!("/{}/pod${{K8S_POD_UID}}", parent.0),
            ),
        ],
    );
    assert_eq!(ds.image(), image);
    let init = ds.start();
    assert!(init.contains("chained tproxy-cni"), "{init}");
    eventually("the agent's API", STARTUP, || {
        node.agent_socket().exists()
            && api::call(&node.agent_socket(), &Request::List, Duration::from_secs(5))
                .is_ok_and(|r| r.ok)
    });
    // The app and its Envoy sidecar. The pod's cgroup is not there when
    // the runtime runs ADD: the target waits, and is attached once the
    // runtime has made it.
    let web_uid = unique("uid-web-");
    let web_cg = cgroup2_root()
        .unwrap()
        .join(&parent.0)
        .join(format!("pod{web_uid}"));
    let web = world
        .start_pod(&unique("tpx-web-"), Some(&web_uid))
        .unwrap();
    assert_eq!(world.cgroup(&web), web_cg);
    let client = world
        .start_pod(&unique("tpx-client-"), Some(&unique("uid-client-")))
        .unwrap();
    eventually("both pods attached", STARTUP, || {
        let l = agent_list(&node);
        l.len() == 2 && l.iter().all(|t| t.state == "OK")
    });
    let log = ds.log();
    for pod in [&web, &client] {
        assert!(
            log.lines()
                .any(|l| l.contains(&pod.infra) && l.contains("waits for its cgroup")),
            "ADD came before the runtime made {}'s cgroup: {log}",
            pod.name
        );
    }
    let cfg = envoy::example_config(false);
    let cfg_mount = format!("{}:/etc/envoy/envoy.yaml:ro", cfg.display());
    world.run_in(
        &web,
        &usr,
        &format!("{}-app", web.name),
        &[],
        &["/x/lab-app", "8000,8080", "--tag", "web"],
    );
    let envoy_name = format!("{}-envoy", web.name);
    world.run_in(
        &web,
        &usr,
        &envoy_name,
        &[
            "--volume",
            &format!("{0}:{0}:ro", envoy::PREFIX),
            "--volume",
            &cfg_mount,
            // SO_MARK (the proxy mark), as the sidecar example's NET_ADMIN.
            "--cap-add",
            "NET_ADMIN",
        ],
        &[
            &format!("{}/envoy", envoy::PREFIX),
            "-c",
            "/etc/envoy/envoy.yaml",
            "--concurrency",
            "2",
            "--disable-hot-restart",
            "--file-flush-interval-msec",
            "100",
            "-l",
            "warning",
        ],
    );
    envoy::wait_ready(&web.ns, 15006, STARTUP).unwrap();
    web.ns.wait_listening(8080, STARTUP).unwrap();

    // The pod's own cgroup is the one attached: the runtime made it, the
    // pod's containers are inside it, and nothing above it has programs.
    let mount = cgroup2_root().unwrap();
    assert!(
        !tproxy_lab::kernel::cgroup_programs(&web_cg)
            .unwrap()
            .is_empty()
    );
    assert!(
        tproxy_lab::kernel::cgroup_programs(&mount.join(&parent.0))
            .unwrap()
            .is_empty()
    );
    let web_rel = format!("/{}/pod{web_uid}/", parent.0);
    for c in [format!("{}-app", web.name), envoy_name.clone()] {
        let cg = cgroup_of(world.podman.pid_of(&c));
        assert!(cg.starts_with(&web_rel), "{c} runs in {cg}");
    }
    assert_ne!(world.cgroup(&client), web_cg);

    // Client pod -> app through Envoy, byte-exact, both families; Envoy
    // read each original destination; both legs socket to socket.
    let before = stats_of(&ds, &web.infra);
    for dst in [format!("{}:8080", web.ip4), format!("[{}]:8080", web.ip6)] {
        let out = world.echo(&client, &usr, &dst, 8 << 20);
        assert!(out.contains("ok conn=0 bytes=8388608"), "{dst}: {out}");
    }
    let envoy_log = || {
        let out = world.podman.output(&["logs", &envoy_name]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for ip in [web.ip4.to_string(), format!("[{}]", web.ip6)] {
        let want = format!("-> {ip}:8080, upstream {ip}:8080 (original_dst), tcp");
        eventually("Envoy's access log line", STARTUP, || {
            envoy_log().contains(&want)
        });
    }
    let after = stats_of(&ds, &web.infra);
    let grew =
        |k: &str| after["counters"][k].as_u64().unwrap() - before["counters"][k].as_u64().unwrap();
    assert!(grew("ingress_steered") > 0, "{after}");
    assert!(
        grew("accel_pairs_pods") >= 2,
        "the client pod's legs (IPv4, IPv6) paired with web's Envoy: {after}"
    );
    // Some of it: a sender may fall back to TCP while its reader lags
    // (docs/how-it-works.md), so not every byte need go socket to socket.
    assert!(
        grew("msg_redirected_bytes") > 0,
        "Envoy->app leg socket to socket: {after}"
    );
    eprintln!(
        "web's counters over the two transfers: ingress_steered +{}, accel_pairs_pods +{}, msg_redirected_bytes +{}",
        grew("ingress_steered"),
        grew("accel_pairs_pods"),
        grew("msg_redirected_bytes")
    );

    // A failing ADD (the cgroup names a uid CNI_ARGS lacks): the runtime
    // reports tproxy-cni's error, runs DEL down the chain (tproxy-cni's DEL
    // of a pod the agent never had succeeds), and nothing of the pod is
    // left: no address, no target.
    let ips_before = std::fs::read_dir(ipam.join(&world.network))
        .unwrap()
        .count();
    let err = world
        .start_pod(&unique("tpx-bad-"), None)
        .err()
        .expect("ADD without K8S_POD_UID fails");
    eprintln!("podman on the failing ADD: {err}");
    assert!(
        err.contains("tproxy-cni") && err.contains("K8S_POD_UID"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(ipam.join(&world.network))
            .unwrap()
            .count(),
        ips_before,
        "the bridge's DEL released the failed pod's addresses"
    );
    assert_eq!(agent_list(&node).len(), 2);

    // Removing the pod: DEL drains and detaches it; the other pod stays.
    let out = world.podman.run(&["pod", "rm", "--force", &web.name]);
    eprintln!("pod rm: {}", out.trim());
    eventually("web removed from the agent", STARTUP, || {
        agent_list(&node).iter().all(|t| t.id != web.infra)
    });
    let log = ds.log();
    assert!(
        log.lines()
            .any(|l| l.contains(&web.infra) && l.contains("drained")),
        "{log}"
    );
    if web_cg.exists() {
        assert!(
            tproxy_lab::kernel::cgroup_programs(&web_cg)
                .unwrap()
                .is_empty()
        );
    }
    world.podman.run(&["pod", "rm", "--force", &client.name]);
    eventually("no target left", STARTUP, || agent_list(&node).is_empty());
    let agent_log = ds.log();
    assert_eq!(ds.stop(), 0, "{agent_log}");
    ds.cleanup();
    assert_eq!(forwarding(), forwarding_before, "the host's forwarding");
    assert_eq!(host_tables(), tables_before, "the host's firewall");
    let ids = [web.infra.as_str(), client.infra.as_str()];
    eprintln!("the agent on the two pods:");
    for l in agent_log
        .lines()
        .filter(|l| ids.iter().any(|id| l.contains(id)))
    {
        eprintln!("  {l}");
    }
    eprintln!("podman_cni test: {:.1} s", t0.elapsed().as_secs_f64());
}
