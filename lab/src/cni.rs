//! A simulated Kubernetes node: a "node" namespace holding a bridge that
//! the reference CNI plugins (Debian's containernetworking-plugins:
//! `bridge`, `host-local`) make, pods wired to it exactly as a container
//! runtime wires them (the plugins executed with the `CNI_*` environment
//! and their config on stdin, `tproxy-cni` chained after `bridge` with its
//! `prevResult`), and a client namespace "outside the node", routed to the
//! pods through it.
//!
//! Everything lives in namespaces and a temporary directory of its own:
//! the plugins run inside the node namespace (so the bridge is made there,
//! never on the host), and dropping the node removes all of it.
use std::{
    io::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::Stdio,
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::{Cgroup, Netns, cgroup::cgroup2_root, unique};

/// Where Debian installs the reference plugins.
pub const CNI_PATH: &str = "/usr/lib/cni";

/// Pod addresses: the node namespace is private, so fixed ranges collide
/// with nothing of the host's.
const POD_SUBNET4: &str = "10.244.0.0/24";
const POD_GW4: &str = "10.244.0.1";
const POD_SUBNET6: &str = "fd00:244::/64";
const POD_GW6: &str = "fd00:244::1";
/// The link between the node and the client outside it.
const NODE_OUT4: &str = "10.250.0.1";
const OUTSIDE4: &str = "10.250.0.2";
const NODE_OUT6: &str = "fd00:250::1";
const OUTSIDE6: &str = "fd00:250::2";

pub struct SimNode {
    /// The node's own namespace: the bridge, the agent.
    pub node: Netns,
    /// A client outside the node.
    pub outside: Netns,
    ipam: PathBuf,
    tproxy_cni: PathBuf,
    /// `tproxy-cni`'s entry in the conflist (without `prevResult`).
    tproxy_conf: Value,
}

/// One pod: its namespace, its cgroup and the addresses IPAM gave it.
pub struct SimPod {
    pub id: String,
    pub name: String,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    /// Dropped after the namespace (fields drop in order): processes first.
    pub cgroup: Cgroup,
    pub ns: Netns,
    /// The bridge plugin's result: `prevResult` for the chained plugins.
    result: Value,
    deleted: bool,
}

impl SimNode {
    /// A node whose pods get `tproxy-cni` (at `tproxy_cni`) chained after
    /// the bridge, talking to the agent at `agent_socket`; `tproxy` is the
    /// plugin entry's own keys (`ports`, `proxyPort`, …).
    pub fn new(tproxy_cni: &Path, agent_socket: &Path, tproxy: Value) -> Result<SimNode> {
        let node = Netns::create(&unique("tpx-node-"))?;
        let outside = Netns::create(&unique("tpx-out-"))?;
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
        ] {
            node.exec("sysctl", &["-qw", &format!("{k}={v}")])?;
        }
        outside.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "uplink",
            "netns",
            node.name(),
        ])?;
        outside.exec("sysctl", &["-qw", "net.ipv6.conf.eth0.accept_dad=0"])?;
        node.exec("sysctl", &["-qw", "net.ipv6.conf.uplink.accept_dad=0"])?;
        for (ns, dev, a4, a6) in [
            (&node, "uplink", NODE_OUT4, NODE_OUT6),
            (&outside, "eth0", OUTSIDE4, OUTSIDE6),
        ] {
            ns.ip(&["addr", "add", &format!("{a4}/24"), "dev", dev])?;
            ns.ip(&["addr", "add", &format!("{a6}/64"), "dev", dev, "nodad"])?;
            ns.ip(&["link", "set", dev, "up"])?;
        }
        outside.ip(&["route", "add", POD_SUBNET4, "via", NODE_OUT4])?;
        outside.ip(&["-6", "route", "add", POD_SUBNET6, "via", NODE_OUT6])?;
        let ipam = std::env::temp_dir().join(unique("tpx-ipam-"));
        std::fs::create_dir_all(&ipam)?;
        let mut tproxy_conf = json!({"type": "tproxy-cni", "agentSocket": agent_socket});
        for (k, v) in tproxy.as_object().context("tproxy-cni keys: an object")? {
            tproxy_conf[k] = v.clone();
        }
        Ok(SimNode {
            node,
            outside,
            ipam,
            tproxy_cni: tproxy_cni.to_path_buf(),
            tproxy_conf,
        })
    }

    /// The bridge plugin's config: a bridge in the node namespace that is
    /// the pods' gateway, dual-stack addresses from host-local.
    fn bridge_conf(&self) -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": "pods",
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": true,
            "isDefaultGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "dataDir": self.ipam,
                "ranges": [
                    [{"subnet": POD_SUBNET4, "gateway": POD_GW4}],
                    [{"subnet": POD_SUBNET6, "gateway": POD_GW6}],
                ],
            },
        })
    }

    /// Runs one plugin as a runtime does, inside the node namespace.
    fn exec_plugin(
        &self,
        plugin: &Path,
        command: &str,
        pod: (&str, &Netns, &str),
        conf: &Value,
    ) -> Result<Value> {
        let (id, ns, name) = pod;
        let mut child = self
            .node
            .command(plugin)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_PATH", CNI_PATH)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", ns.path())
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_ARGS",
                // As kubelet passes them, IgnoreUnknown first.
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={name}"),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", plugin.display()))?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(conf.to_string().as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "{} {command} failed ({}): {} {}",
                plugin.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        if out.stdout.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&out.stdout).context("plugin result is not JSON")
    }

    /// `tproxy-cni`'s config for one call: the entry, the runtime's
    /// `runtimeConfig` (the pod's cgroup, its annotations), `prevResult`.
    fn tproxy_call(&self, cgroup: &Cgroup, annotations: &Value, prev: &Value) -> Result<Value> {
        let mut conf = self.tproxy_conf.clone();
        conf["cniVersion"] = json!("1.0.0");
        conf["name"] = json!("pods");
        // As containerd passes it with the cgroupfs driver: relative to the
        // cgroup2 mount.
        let rel = cgroup.path().strip_prefix(cgroup2_root()?)?.to_path_buf();
        conf["runtimeConfig"] = json!({
            "cgroupPath": Path::new("/").join(rel),
            "io.kubernetes.cri.pod-annotations": annotations,
        });
        conf["prevResult"] = prev.clone();
        Ok(conf)
    }

    /// Creates a pod (namespace, cgroup) and runs ADD for the bridge, then
    /// for `tproxy-cni` with the bridge's result. `annotations`: the pod's.
    pub fn add_pod(&self, name: &str, annotations: Value) -> Result<SimPod> {
        let ns = Netns::create(&unique(&format!("tpx-{name}-")))?;
        let cgroup = Cgroup::create(&unique(&format!("tpx-pod-{name}-")))?;
        let id = unique("c0ffee");
        let result = self.exec_plugin(
            Path::new(&format!("{CNI_PATH}/bridge")),
            "ADD",
            (&id, &ns, name),
            &self.bridge_conf(),
        )?;
        let mut pod = SimPod {
            id,
            name: name.into(),
            ip4: Ipv4Addr::UNSPECIFIED,
            ip6: Ipv6Addr::UNSPECIFIED,
            cgroup,
            ns,
            result,
            deleted: false,
        };
        for ip in pod.result["ips"].as_array().into_iter().flatten() {
            let addr = ip["address"].as_str().unwrap_or_default();
            let addr = addr.split('/').next().unwrap_or_default();
            if let Ok(a) = addr.parse() {
                pod.ip4 = a;
            } else if let Ok(a) = addr.parse() {
                pod.ip6 = a;
            }
        }
        if pod.ip4.is_unspecified() || pod.ip6.is_unspecified() {
            bail!("bridge gave no dual-stack addresses: {}", pod.result);
        }
        // IPv6 DAD holds a new address back for a second or two: the pod's
        // and the bridge's (the pods' gateway) must be usable first.
        wait_dad(&pod.ns)?;
        wait_dad(&self.node)?;
        let conf = self.tproxy_call(&pod.cgroup, &annotations, &pod.result)?;
        let out = self.exec_plugin(&self.tproxy_cni, "ADD", (&pod.id, &pod.ns, name), &conf)?;
        if out["ips"] != pod.result["ips"] {
            bail!("tproxy-cni changed the result: {out} (was {})", pod.result);
        }
        Ok(pod)
    }

    /// CHECK for a pod through `tproxy-cni`: Ok if the agent has it whole.
    pub fn check_pod(&self, pod: &SimPod) -> Result<()> {
        let conf = self.tproxy_call(&pod.cgroup, &json!({}), &pod.result)?;
        self.exec_plugin(
            &self.tproxy_cni,
            "CHECK",
            (&pod.id, &pod.ns, &pod.name),
            &conf,
        )
        .map(drop)
    }

    /// DEL in the runtime's order (the chain reversed): `tproxy-cni`, then
    /// the bridge. The namespace and cgroup go when the pod is dropped.
    pub fn del_pod(&self, pod: &mut SimPod) -> Result<()> {
        let conf = self.tproxy_call(&pod.cgroup, &json!({}), &pod.result)?;
        self.exec_plugin(
            &self.tproxy_cni,
            "DEL",
            (&pod.id, &pod.ns, &pod.name),
            &conf,
        )?;
        let mut bridge = self.bridge_conf();
        bridge["prevResult"] = pod.result.clone();
        self.exec_plugin(
            Path::new(&format!("{CNI_PATH}/bridge")),
            "DEL",
            (&pod.id, &pod.ns, &pod.name),
            &bridge,
        )?;
        pod.deleted = true;
        Ok(())
    }

    /// The address the outside client has, per family.
    pub fn outside_addrs() -> (Ipv4Addr, Ipv6Addr) {
        (
            OUTSIDE4.parse().expect("literal"),
            OUTSIDE6.parse().expect("literal"),
        )
    }
}

/// Waits until no IPv6 address in `ns` is tentative (DAD done).
fn wait_dad(ns: &Netns) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !ns
        .ip(&["-6", "addr", "show", "tentative"])?
        .trim()
        .is_empty()
    {
        if std::time::Instant::now() > deadline {
            bail!("IPv6 addresses in {} still tentative after 60 s", ns.name());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(())
}

impl SimPod {
    /// Whether DEL ran for it.
    pub fn deleted(&self) -> bool {
        self.deleted
    }
}

impl Drop for SimNode {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.ipam);
    }
}
