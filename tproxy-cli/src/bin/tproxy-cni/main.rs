//! `tproxy-cni`: a chained CNI plugin (spec 0.4.0, 1.0.0, 1.1.0) that
//! registers each pod with the node agent ([`tproxy::api`]) and passes
//! the previous plugin's result through untouched.
//!
//! The container runtime runs it after the pod network's plugin, with the
//! command and the pod in `CNI_*` variables and the network config, with
//! `prevResult` and `runtimeConfig`, on stdin:
//! - ADD: `add` the pod's namespace, interface and cgroup to the agent, then
//!   print `prevResult` (in the config's `cniVersion`).
//! - DEL: `del` it; idempotent: an unknown pod or no agent at all (a node
//!   shutting down) is success.
//! - CHECK: `check` it with the agent.
//! - STATUS (1.1): ready when the agent answers.
//! - GC (1.1): nothing to do here (the agent removes targets whose
//!   namespace is gone); the valid attachments of one network say nothing
//!   about another network's pods the agent may serve.
//! - VERSION: the versions above.
//!
//! Failures are the spec's error object on stdout and a non-zero exit:
//! `{"cniVersion","code","msg","details"}` (codes in [`code`]).
use std::{
    collections::HashMap,
    io::{Read, Write as _},
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use serde::Deserialize;
use serde_json::{Value, json};
use tproxy::api::{
    self, ApiError, ConfigError, PortSet, Request, Steer, Target, TargetSpec, TcMode, parse_mark,
};

/// The spec versions this plugin speaks, oldest first.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.4.0", "1.0.0", "1.1.0"];
const LATEST: &str = "1.1.0";

/// How long one agent call may take unless the config says
/// (`agentTimeoutMs`): attaching is milliseconds, but a busy agent should
/// not hang the runtime; it answers `try again` when it cannot serve.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The runtime config key containerd (>= 1.7, capability
/// `io.kubernetes.cri.pod-annotations`) fills with the pod's annotations.
pub const ANNOTATIONS_KEY: &str = "io.kubernetes.cri.pod-annotations";

/// Per-pod annotations, overriding the plugin config.
pub mod annotation {
    pub const ENABLED: &str = "tproxy.io/enabled";
    pub const PORTS: &str = "tproxy.io/ports";
    pub const PROXY_PORT: &str = "tproxy.io/proxy-port";
    pub const PROXY_MARK: &str = "tproxy.io/proxy-mark";
    pub const ACCEL: &str = "tproxy.io/accel";
}

/// CNI error codes: the spec's well-known ones, then this plugin's (100+).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const DECODING: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN: u32 = 11;
    /// STATUS (1.1): the plugin cannot serve ADD now.
    pub const NOT_AVAILABLE: u32 = 50;
    /// No agent answers on the socket.
    pub const AGENT_UNREACHABLE: u32 = 100;
    /// The agent answered with an error of its own.
    pub const AGENT_FAILED: u32 = 101;
    /// CHECK: the agent does not have the pod attached, or not whole.
    pub const NOT_ATTACHED: u32 = 102;
}

/// A CNI error result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The spec's error object.
    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

/// The plugin's network config: the spec's keys and ours (camelCase, as
/// CNI configs are). Keys we do not know are ignored: the runtime passes
/// the conflist entry whole (`capabilities` …).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub prev_result: Option<Value>,
    #[serde(default)]
    pub runtime_config: RuntimeConfig,
    /// Default [`api::DEFAULT_SOCKET`].
    #[serde(default)]
    pub agent_socket: Option<PathBuf>,
    #[serde(default)]
    pub agent_timeout_ms: Option<u64>,
    /// `"8000,9000-9010"` (or one port as a number).
    #[serde(default)]
    pub ports: Option<Ports>,
    #[serde(default)]
    pub proxy_port: Option<u16>,
    #[serde(default)]
    pub proxy_mark: Option<u32>,
    #[serde(default)]
    pub accel: Option<bool>,
    #[serde(default)]
    pub steer: Option<Steer>,
    #[serde(default)]
    pub tc_mode: Option<TcMode>,
    /// `false`: pods are skipped unless annotated `tproxy.io/enabled: "true"`.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// The cgroup for runtimes that do not pass `cgroupPath`; `${NAME}`
    /// stands for the `CNI_ARGS` value NAME (`/kubepods/pod${K8S_POD_UID}`).
    #[serde(default)]
    pub cgroup: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Ports {
    List(String),
    One(u32),
}

/// `runtimeConfig`: what the runtime passes for the capabilities the
/// conflist entry declares.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeConfig {
    /// Capability `cgroupPath` (containerd >= 1.7, CRI-O): the pod's cgroup.
    #[serde(default)]
    pub cgroup_path: Option<String>,
    #[serde(default, rename = "io.kubernetes.cri.pod-annotations")]
    pub annotations: HashMap<String, String>,
}

/// The `CNI_*` environment.
#[derive(Clone, Debug, Default)]
pub struct CniEnv {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
}

impl CniEnv {
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> CniEnv {
        // Empty counts as unset: runtimes pass CNI_NETNS="" on DEL.
        let get = |k: &str| var(k).filter(|v| !v.is_empty());
        CniEnv {
            command: get("CNI_COMMAND"),
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            args: get("CNI_ARGS"),
        }
    }

    fn require<'a>(&'a self, name: &str, v: &'a Option<String>) -> Result<&'a str, CniError> {
        v.as_deref().ok_or_else(|| {
            CniError::new(
                code::INVALID_ENV,
                format!("{name} is not set"),
                format!(
                    "the container runtime sets {name} for CNI_COMMAND={}; run tproxy-cni from a runtime's network config, not by hand",
                    self.command.as_deref().unwrap_or("?")
                ),
            )
        })
    }

    /// `CNI_ARGS` (`K=V;K=V…`) by key.
    pub fn args(&self) -> HashMap<&str, &str> {
        self.args
            .as_deref()
            .unwrap_or("")
            .split(';')
            .filter_map(|kv| kv.split_once('='))
            .collect()
    }

    /// `K8S_POD_NAMESPACE/K8S_POD_NAME` from `CNI_ARGS`, or the pod name
    /// alone.
    pub fn pod_name(&self) -> Option<String> {
        let args = self.args();
        match (args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME")) {
            (Some(ns), Some(pod)) => Some(format!("{ns}/{pod}")),
            (None, Some(pod)) => Some(pod.to_string()),
            _ => None,
        }
    }
}

/// What one invocation prints on success (nothing for DEL, CHECK, STATUS,
/// GC).
pub type Output = Option<Value>;

/// Runs one invocation. `stdin` is read only by commands that take a
/// config (not VERSION). The error's `cniVersion` is the config's when it
/// was read.
pub fn run(env: &CniEnv, stdin: impl Read) -> Result<Output, (CniError, String)> {
    let command = env.command.as_deref().ok_or_else(|| {
        let e = CniError::new(
            code::INVALID_ENV,
            "CNI_COMMAND is not set",
            "tproxy-cni is a CNI plugin: the container runtime runs it with CNI_COMMAND=ADD, DEL, CHECK, STATUS, GC or VERSION",
        );
        (e, LATEST.to_string())
    })?;
    if command == "VERSION" {
        return Ok(Some(
            json!({"cniVersion": LATEST, "supportedVersions": SUPPORTED_VERSIONS}),
        ));
    }
    let (conf, version) = read_conf(stdin).map_err(|(e, v)| (e, v.unwrap_or(LATEST.into())))?;
    let fail = |e: CniError| (e, version.clone());
    match command {
        "ADD" => add(env, &conf).map(Some).map_err(fail),
        "DEL" => del(env, &conf).map(|()| None).map_err(fail),
        "CHECK" => check(env, &conf).map(|()| None).map_err(fail),
        "STATUS" => status(&conf).map(|()| None).map_err(fail),
        "GC" => Ok(None),
        other => Err(fail(CniError::new(
            code::INVALID_ENV,
            format!("unknown CNI_COMMAND {other:?}"),
            "tproxy-cni serves ADD, DEL, CHECK, STATUS, GC and VERSION",
        ))),
    }
}

/// The binary: runs one invocation, prints its result or error on stdout.
fn main() -> ExitCode {
    let env = CniEnv::from_env(|k| std::env::var(k).ok());
    let (out, status) = match run(&env, std::io::stdin().lock()) {
        Ok(out) => (out, ExitCode::SUCCESS),
        Err((e, version)) => {
            log(&env, &format!("error {}: {}: {}", e.code, e.msg, e.details));
            (Some(e.to_json(&version)), ExitCode::FAILURE)
        }
    };
    if let Some(out) = out {
        let mut stdout = std::io::stdout().lock();
        // Nothing to be done if the runtime stopped listening.
        let _ = serde_json::to_writer(&mut stdout, &out);
        let _ = stdout.write_all(b"\n");
    }
    status
}

/// One line on stderr, which runtimes put in their log.
fn log(env: &CniEnv, line: &str) {
    eprintln!(
        "tproxy-cni: {} {}: {line}",
        env.command.as_deref().unwrap_or("?"),
        env.container_id.as_deref().unwrap_or("-"),
    );
}

/// Reads the config; on failure also the `cniVersion` for the error object
/// if there was one.
fn read_conf(mut stdin: impl Read) -> Result<(NetConf, String), (CniError, Option<String>)> {
    let mut buf = Vec::new();
    stdin.read_to_end(&mut buf).map_err(|e| {
        let e = CniError::new(
            code::DECODING,
            "reading the network config from stdin",
            e.to_string(),
        );
        (e, None)
    })?;
    let value: Value = serde_json::from_slice(&buf).map_err(|e| {
        let e = CniError::new(
            code::DECODING,
            "the network config on stdin is not JSON",
            e.to_string(),
        );
        (e, None)
    })?;
    let version = value
        .get("cniVersion")
        .and_then(Value::as_str)
        .map(String::from);
    let Some(v) = version.clone() else {
        let e = CniError::new(
            code::INVALID_CONFIG,
            "the network config has no cniVersion",
            format!("set \"cniVersion\" to one of {SUPPORTED_VERSIONS:?} in the .conflist"),
        );
        return Err((e, None));
    };
    if !SUPPORTED_VERSIONS.contains(&v.as_str()) {
        let e = CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("CNI version {v} is not supported"),
            format!(
                "tproxy-cni speaks {SUPPORTED_VERSIONS:?}; set \"cniVersion\" in the .conflist to one of them"
            ),
        );
        return Err((e, version));
    }
    let conf: NetConf = serde_path_to_error::deserialize(value).map_err(|e| {
        let e = CniError::new(
            code::INVALID_CONFIG,
            format!("invalid tproxy-cni network config: {}: {}", e.path(), e.inner()),
            "fix the key in the tproxy-cni entry of the .conflist; docs/agent-and-kubernetes.md (tproxy-cni) lists the keys",
        );
        (e, version.clone())
    })?;
    Ok((conf, v))
}

fn add(env: &CniEnv, conf: &NetConf) -> Result<Value, CniError> {
    let id = env.require("CNI_CONTAINERID", &env.container_id)?;
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "no prevResult: tproxy-cni is a chained plugin",
            "list it in a .conflist after the plugin that sets up the pod's interface (e.g. bridge, calico, cilium), not as a network's only plugin",
        )
    })?;
    let result = convert_result(prev, &conf.cni_version);
    let Some(target) = target_for(env, conf, cgroup2_mount().as_deref())? else {
        log(env, "pod not enabled for tproxy: passing through");
        return Ok(result);
    };
    let summary = format!(
        "{} {} ports {} cgroup {}",
        target.name.as_deref().unwrap_or("pod"),
        target.iface(),
        target
            .target
            .ports
            .as_ref()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        (target.target.cgroup.as_deref())
            .unwrap_or(Path::new(""))
            .display(),
    );
    let req = Request::Add {
        id: id.into(),
        target,
    };
    ask(conf, &req).map_err(|e| e.into_cni(conf))?;
    log(env, &format!("registered {summary}"));
    Ok(result)
}

fn del(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    let id = env.require("CNI_CONTAINERID", &env.container_id)?;
    match ask(conf, &Request::Del { id: id.into() }) {
        Ok(()) => Ok(()),
        // DEL must succeed when there is nothing to delete: nothing is
        // attached without an agent (its targets go with it, and a new one
        // finds the namespace gone).
        Err(Failure::Api(e)) if e.unreachable() => {
            log(env, &format!("nothing to remove: {e}"));
            Ok(())
        }
        Err(Failure::Agent {
            code: Some(api::code::NOT_FOUND),
            ..
        }) => Ok(()),
        Err(e) => Err(e.into_cni(conf)),
    }
}

fn check(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    let id = env.require("CNI_CONTAINERID", &env.container_id)?;
    env.require("CNI_NETNS", &env.netns)?;
    env.require("CNI_IFNAME", &env.ifname)?;
    if !enabled(conf)? {
        return Ok(());
    }
    ask(conf, &Request::Check { id: id.into() }).map_err(|e| match e {
        Failure::Agent { code, error } if code != Some(api::code::TRY_AGAIN) => CniError::new(
            code::NOT_ATTACHED,
            format!("the tproxy agent does not have container {id} attached whole"),
            format!(
                "{}; `tproxy status` on the node shows what is missing, the agent's log why",
                error.as_deref().unwrap_or("no reason given")
            ),
        ),
        e => e.into_cni(conf),
    })
}

fn status(conf: &NetConf) -> Result<(), CniError> {
    ask(conf, &Request::List).map_err(|e| {
        let e = e.into_cni(conf);
        CniError::new(code::NOT_AVAILABLE, e.msg, e.details)
    })
}

/// Why an agent call did not end in `ok: true`.
enum Failure {
    Api(ApiError),
    Agent {
        code: Option<u32>,
        error: Option<String>,
    },
}

impl Failure {
    fn into_cni(self, conf: &NetConf) -> CniError {
        let socket = socket(conf);
        match self {
            Failure::Api(e) if e.unreachable() => CniError::new(
                code::AGENT_UNREACHABLE,
                "the tproxy agent is unreachable",
                format!(
                    "{e}; it runs on every node as the tproxy DaemonSet (check its pod on this node)"
                ),
            ),
            Failure::Api(e @ ApiError::Timeout { .. }) => {
                CniError::new(code::TRY_AGAIN, "the tproxy agent is busy", e.to_string())
            }
            Failure::Api(e) => CniError::new(
                code::AGENT_UNREACHABLE,
                format!(
                    "no usable answer from the tproxy agent at {}",
                    socket.display()
                ),
                e.to_string(),
            ),
            Failure::Agent { code, error } => {
                let cni = match code {
                    Some(api::code::TRY_AGAIN) => code::TRY_AGAIN,
                    Some(api::code::INVALID_CONFIG) => code::INVALID_CONFIG,
                    _ => code::AGENT_FAILED,
                };
                CniError::new(
                    cni,
                    "the tproxy agent refused",
                    error.unwrap_or_else(|| "no reason given; see the agent's log".into()),
                )
            }
        }
    }
}

fn socket(conf: &NetConf) -> PathBuf {
    conf.agent_socket
        .clone()
        .unwrap_or_else(|| api::DEFAULT_SOCKET.into())
}

fn ask(conf: &NetConf, req: &Request) -> Result<(), Failure> {
    let timeout = conf
        .agent_timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_TIMEOUT);
    let resp = api::call(&socket(conf), req, timeout).map_err(Failure::Api)?;
    if resp.ok {
        Ok(())
    } else {
        Err(Failure::Agent {
            code: resp.code,
            error: resp.error,
        })
    }
}

fn annotation<'a>(conf: &'a NetConf, key: &str) -> Option<&'a str> {
    conf.runtime_config.annotations.get(key).map(String::as_str)
}

fn bad_annotation(key: &str, value: &str, why: &str, fix: &str) -> CniError {
    CniError::new(
        code::INVALID_CONFIG,
        format!("pod annotation {key}: {value:?} {why}"),
        format!("set {key} to {fix}"),
    )
}

fn parse_bool_annotation(conf: &NetConf, key: &str) -> Result<Option<bool>, CniError> {
    annotation(conf, key)
        .map(|v| match v.trim() {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(bad_annotation(
                key,
                v,
                "is not a boolean",
                "\"true\" or \"false\"",
            )),
        })
        .transpose()
}

fn enabled(conf: &NetConf) -> Result<bool, CniError> {
    Ok(parse_bool_annotation(conf, annotation::ENABLED)?
        .or(conf.enabled)
        .unwrap_or(true))
}

/// The agent's target for this pod, or None if it is not to be steered.
/// Every setting is checked here, so a typo fails ADD with its name.
pub fn target_for(
    env: &CniEnv,
    conf: &NetConf,
    cgroup2: Option<&Path>,
) -> Result<Option<TargetSpec>, CniError> {
    if !enabled(conf)? {
        return Ok(None);
    }
    let netns = env.require("CNI_NETNS", &env.netns)?;
    let ifname = env.require("CNI_IFNAME", &env.ifname)?;

    let ports = match annotation(conf, annotation::PORTS) {
        Some(v) => port_list(v).map_err(|why| {
            CniError::new(
                code::INVALID_CONFIG,
                format!("pod annotation {}: {why}", annotation::PORTS),
                format!(
                    "set {} to a list like \"8000\" or \"8000,9000-9010\"",
                    annotation::PORTS
                ),
            )
        })?,
        None => {
            let list = match &conf.ports {
                Some(Ports::List(s)) => s.clone(),
                Some(Ports::One(n)) => n.to_string(),
                None => {
                    return Err(CniError::new(
                        code::INVALID_CONFIG,
                        "no ports to intercept for this pod",
                        format!(
                            "set \"ports\" in the tproxy-cni entry of the .conflist, or annotate the pod {}: \"8000,9000-9010\"",
                            annotation::PORTS
                        ),
                    ));
                }
            };
            port_list(&list).map_err(|why| {
                CniError::new(
                    code::INVALID_CONFIG,
                    format!("\"ports\": {why}"),
                    "fix \"ports\" in the tproxy-cni entry of the .conflist: a string like \"8000,9000-9010\"",
                )
            })?
        }
    };
    let proxy_port = match annotation(conf, annotation::PROXY_PORT) {
        Some(v) => Some(match v.trim().parse::<u16>() {
            Ok(p) if p != 0 => p,
            _ => {
                return Err(bad_annotation(
                    annotation::PROXY_PORT,
                    v,
                    "is not a port",
                    "a port number 1-65535",
                ));
            }
        }),
        None => conf.proxy_port,
    };
    let proxy_mark = match annotation(conf, annotation::PROXY_MARK) {
        Some(v) => Some(parse_mark(v.trim()).map_err(|why| {
            bad_annotation(
                annotation::PROXY_MARK,
                v,
                &format!("is not a mark ({why})"),
                "a 32-bit number, decimal or 0x hex",
            )
        })?),
        None => conf.proxy_mark,
    };
    let accel = parse_bool_annotation(conf, annotation::ACCEL)?.or(conf.accel);

    let given = |p: &Option<String>| p.clone().filter(|p| !p.is_empty());
    // The entry's only when the runtime passes none.
    let given_cgroup = match given(&conf.runtime_config.cgroup_path) {
        Some(p) => Some(p),
        None => given(&conf.cgroup)
            .map(|c| expand_cni_args(&c, env))
            .transpose()?,
    };
    let cgroup = match given_cgroup {
        // The root ("/" with the cgroupfs driver, "-.slice" with systemd's)
        // holds every process of the node. The agent refuses it whatever
        // the spelling; this names the value the runtime or entry gave.
        Some(p) if is_cgroup_root(&p, cgroup2) => {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!(
                    "the pod's cgroup {p:?} is the cgroup2 root, which holds every process of the node"
                ),
                "tproxy attaches only to a pod's own cgroup: have the runtime pass it (\"capabilities\": {\"cgroupPath\": true}, containerd >= 1.7 or CRI-O) or set \"cgroup\" in the tproxy-cni entry to a pod's cgroup, not the root",
            ));
        }
        Some(p) => pod_cgroup(&p, cgroup2),
        None => {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "the pod's cgroup is unknown: no runtimeConfig.cgroupPath",
                "add \"capabilities\": {\"cgroupPath\": true} to the tproxy-cni entry of the .conflist (containerd >= 1.7 and CRI-O then pass the pod's cgroup), or set \"cgroup\" in it",
            ));
        }
    };

    Ok(Some(TargetSpec {
        target: Target {
            cgroup: Some(cgroup),
            ports: Some(ports),
            proxy_port,
            proxy_mark,
            accel,
            steer: conf.steer,
            tc_mode: conf.tc_mode,
            ..Target::on(ifname)
        },
        name: env.pod_name(),
        ..TargetSpec::new(netns, ifname)
    }))
}

/// `template` with each `${NAME}` replaced by the `CNI_ARGS` value NAME:
/// a pod's cgroup for runtimes that pass its uid but not its cgroup
/// (podman with `CNI_ARGS=K8S_POD_UID=…`). A value must be one path
/// component: it cannot lead elsewhere.
fn expand_cni_args(template: &str, env: &CniEnv) -> Result<String, CniError> {
    let args = env.args();
    let bad = |msg: String| {
        CniError::new(
            code::INVALID_CONFIG,
            msg,
            "have the runtime pass the pod's cgroup (\"capabilities\": {\"cgroupPath\": true}), or the CNI_ARGS the \"cgroup\" of the tproxy-cni entry names",
        )
    };
    let mut out = String::new();
    let mut rest = template;
    while let Some(at) = rest.find("${") {
        out.push_str(&rest[..at]);
        let Some(end) = rest[at..].find('}') else {
            return Err(bad(format!("\"cgroup\": {template:?} has an unclosed ${{")));
        };
        let name = &rest[at + 2..at + end];
        let value = args.get(name).ok_or_else(|| {
            bad(format!(
                "\"cgroup\": {template:?} names ${{{name}}}, which CNI_ARGS does not have"
            ))
        })?;
        if value.is_empty() || value.contains('/') || *value == "." || *value == ".." {
            return Err(bad(format!(
                "\"cgroup\": CNI_ARGS {name}={value:?} is not one path component"
            )));
        }
        out.push_str(value);
        rest = &rest[at + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A port list, its error without the command line's hint (`-ports …`):
/// the fix here is a key or an annotation.
fn port_list(s: &str) -> Result<PortSet, String> {
    s.parse().map_err(|e| match e {
        ConfigError::BadPorts(why) => why,
        e => e.to_string(),
    })
}

/// The cgroup as the agent takes it: an absolute path on the cgroup2 mount
/// stays absolute; anything else is relative to the mount. Runtimes pass
/// the pod's cgroup parent: `/kubepods/burstable/pod…` with the cgroupfs
/// driver (relative to the mount despite the slash) or
/// `kubepods-burstable-pod….slice` with the systemd driver (a slice name,
/// nested by its dashes).
pub fn pod_cgroup(value: &str, cgroup2: Option<&Path>) -> PathBuf {
    let path = Path::new(value);
    if let Some(mount) = cgroup2
        && path.starts_with(mount)
    {
        return path.into();
    }
    if !value.contains('/') && value.ends_with(".slice") && value != "-.slice" {
        return systemd_slice_path(value);
    }
    PathBuf::from(value.trim_start_matches('/'))
}

/// `value` names the cgroup2 root as a runtime or the entry may write it.
fn is_cgroup_root(value: &str, cgroup2: Option<&Path>) -> bool {
    let path = pod_cgroup(value, cgroup2);
    value == "-.slice"
        || cgroup2.is_some_and(|m| path == m)
        || path
            .components()
            .all(|c| matches!(c, std::path::Component::CurDir))
}

/// `a-b-c.slice` is `a.slice/a-b.slice/a-b-c.slice` (systemd.slice(5)).
fn systemd_slice_path(slice: &str) -> PathBuf {
    let stem = slice.trim_end_matches(".slice");
    let mut path = PathBuf::new();
    for (i, _) in stem.match_indices('-') {
        path.push(format!("{}.slice", &stem[..i]));
    }
    path.push(slice);
    path
}

/// The cgroup2 mount from /proc/self/mounts (`/sys/fs/cgroup` or, on
/// hybrid hosts, `/sys/fs/cgroup/unified`).
fn cgroup2_mount() -> Option<PathBuf> {
    std::fs::read_to_string("/proc/self/mounts")
        .ok()?
        .lines()
        .find_map(|l| {
            let f: Vec<_> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
}

/// `prevResult` in `version`. 1.0.0 and 1.1.0 results are the same
/// shape; 0.4.0's `ips` entries carry a `version` ("4"/"6") that 1.x
/// dropped. Nothing else differs for what a result holds.
pub fn convert_result(prev: &Value, version: &str) -> Value {
    let mut out = prev.clone();
    let Some(obj) = out.as_object_mut() else {
        return out;
    };
    let from_04 = obj.get("cniVersion").and_then(Value::as_str) == Some("0.4.0");
    let to_04 = version == "0.4.0";
    if from_04 != to_04
        && let Some(ips) = obj.get_mut("ips").and_then(Value::as_array_mut)
    {
        for ip in ips.iter_mut().filter_map(Value::as_object_mut) {
            if to_04 {
                let v6 = ip
                    .get("address")
                    .and_then(Value::as_str)
                    .is_some_and(|a| a.contains(':'));
                ip.insert("version".into(), (if v6 { "6" } else { "4" }).into());
            } else {
                ip.remove("version");
            }
        }
    }
    obj.insert("cniVersion".into(), version.into());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(cmd: &str) -> CniEnv {
        CniEnv {
            command: Some(cmd.into()),
            container_id: Some("c0ffee".into()),
            netns: Some("/var/run/netns/cni-1".into()),
            ifname: Some("eth0".into()),
            args: Some(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=c0ffee"
                    .into(),
            ),
        }
    }

    fn conf(v: Value) -> NetConf {
        serde_json::from_value(v).unwrap()
    }

    fn base(extra: Value) -> Value {
        let mut v = json!({
            "cniVersion": "1.0.0", "name": "pods", "type": "tproxy-cni",
            "ports": "9000", "proxyPort": 15001,
            "capabilities": {"cgroupPath": true},
            "runtimeConfig": {"cgroupPath": "/kubepods/besteffort/pod1"},
        });
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    }

    fn mount() -> Option<&'static Path> {
        Some(Path::new("/sys/fs/cgroup"))
    }

    #[test]
    fn target_from_config_and_cni_env() {
        let t = target_for(&env("ADD"), &conf(base(json!({}))), mount())
            .unwrap()
            .unwrap();
        assert_eq!(t.netns, Path::new("/var/run/netns/cni-1"));
        assert_eq!(t.iface(), "eth0");
        assert_eq!(
            t.target.cgroup.as_deref(),
            Some(Path::new("kubepods/besteffort/pod1"))
        );
        assert_eq!(t.target.ports.unwrap().to_string(), "9000");
        assert_eq!(t.target.proxy_port, Some(15001));
        assert_eq!(t.target.proxy_mark, None);
        assert_eq!(t.name.as_deref(), Some("shop/web-0"));
    }

    #[test]
    fn annotations_override_the_config() {
        let c = conf(base(json!({
            "accel": true, "proxyMark": 1,
            "runtimeConfig": {
                "cgroupPath": "/sys/fs/cgroup/kubepods/pod2",
                ANNOTATIONS_KEY: {
                    "tproxy.io/ports": "8000,8080", "tproxy.io/proxy-port": "15006",
                    "tproxy.io/proxy-mark": "0x539", "tproxy.io/accel": "false",
                    "unrelated": "x"}}})));
        let t = target_for(&env("ADD"), &c, mount()).unwrap().unwrap();
        assert_eq!(t.target.ports.unwrap().to_string(), "8000,8080");
        assert_eq!(t.target.proxy_port, Some(15006));
        assert_eq!(t.target.proxy_mark, Some(1337));
        assert_eq!(t.target.accel, Some(false));
        assert_eq!(
            t.target.cgroup.as_deref(),
            Some(Path::new("/sys/fs/cgroup/kubepods/pod2"))
        );
    }

    #[test]
    fn enabled_by_config_or_annotation() {
        let off = |extra| target_for(&env("ADD"), &conf(base(extra)), mount()).unwrap();
        assert!(off(json!({"enabled": false})).is_none());
        let ann = |v: &str| json!({"cgroupPath": "/p", ANNOTATIONS_KEY: {"tproxy.io/enabled": v}});
        assert!(off(json!({"runtimeConfig": ann("false")})).is_none());
        assert!(off(json!({"enabled": false, "runtimeConfig": ann("true")})).is_some());
        let e = target_for(
            &env("ADD"),
            &conf(base(json!({"runtimeConfig": ann("yes")}))),
            mount(),
        )
        .unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
        assert!(e.msg.contains("tproxy.io/enabled"), "{e:?}");
    }

    #[test]
    fn bad_settings_name_themselves() {
        let err = |extra| target_for(&env("ADD"), &conf(base(extra)), mount()).unwrap_err();
        let e = err(json!({"ports": "80-70"}));
        assert_eq!(e.code, code::INVALID_CONFIG);
        assert!(
            e.msg.contains("\"ports\"") && e.msg.contains("backwards"),
            "{e:?}"
        );
        let ann = |k: &str, v: &str| json!({"cgroupPath": "/p", ANNOTATIONS_KEY: {k: v}});
        for (k, v) in [
            ("tproxy.io/ports", "http"),
            ("tproxy.io/proxy-port", "0"),
            ("tproxy.io/proxy-mark", "-1"),
            ("tproxy.io/accel", "on"),
        ] {
            let e = err(json!({"runtimeConfig": ann(k, v)}));
            assert_eq!(e.code, code::INVALID_CONFIG);
            assert!(e.msg.contains(k) && e.details.contains(k), "{e:?}");
        }
        let e = err(json!({"ports": null}));
        assert!(e.details.contains("tproxy.io/ports"), "{e:?}");
        let e = err(json!({"runtimeConfig": {}}));
        assert_eq!(e.code, code::INVALID_CONFIG);
        assert!(e.details.contains("\"cgroupPath\": true"), "{e:?}");
    }

    #[test]
    fn cgroup_from_config_when_the_runtime_passes_none() {
        let c = conf(base(json!({"runtimeConfig": {}, "cgroup": "tproxy/pods"})));
        let t = target_for(&env("ADD"), &c, mount()).unwrap().unwrap();
        assert_eq!(t.target.cgroup.as_deref(), Some(Path::new("tproxy/pods")));
    }

    /// `${NAME}` in the entry's cgroup: from CNI_ARGS, one path component,
    /// or ADD fails naming it; the runtime's cgroupPath still wins.
    #[test]
    fn cgroup_from_config_names_cni_args() {
        let mut e = env("ADD");
        e.args = Some("IgnoreUnknown=1;K8S_POD_NAME=web;K8S_POD_UID=1234-ab".into());
        let entry = |cg: &str| conf(base(json!({"runtimeConfig": {}, "cgroup": cg})));
        let t = target_for(&e, &entry("/tpx/kubepods/pod${K8S_POD_UID}"), mount())
            .unwrap()
            .unwrap();
        assert_eq!(
            t.target.cgroup.as_deref(),
            Some(Path::new("tpx/kubepods/pod1234-ab"))
        );
        let t = target_for(&e, &entry("${K8S_POD_NAME}/${K8S_POD_UID}"), mount())
            .unwrap()
            .unwrap();
        assert_eq!(t.target.cgroup.as_deref(), Some(Path::new("web/1234-ab")));
        for (cg, args, want) in [
            (
                "/pod${K8S_POD_UID}",
                "K8S_POD_NAME=web",
                "which CNI_ARGS does not have",
            ),
            ("/pod${K8S_POD_UID", "K8S_POD_UID=1", "unclosed"),
            (
                "/pod${K8S_POD_UID}",
                "K8S_POD_UID=../../x",
                "not one path component",
            ),
            (
                "/pod${K8S_POD_UID}",
                "K8S_POD_UID=",
                "not one path component",
            ),
        ] {
            e.args = Some(args.into());
            let err = target_for(&e, &entry(cg), mount()).unwrap_err();
            assert_eq!(err.code, code::INVALID_CONFIG, "{cg} {args}");
            assert!(err.msg.contains(want), "{cg} {args}: {err:?}");
            assert!(err.details.contains("cgroupPath"), "{err:?}");
        }
        let c = conf(base(json!({"cgroup": "/pod${K8S_POD_UID}"})));
        let t = target_for(&e, &c, mount()).unwrap().unwrap();
        assert_eq!(
            t.target.cgroup.as_deref(),
            Some(Path::new("kubepods/besteffort/pod1")),
            "runtimeConfig.cgroupPath wins, the entry's template unread"
        );
    }

    #[test]
    fn cgroup_paths_as_runtimes_pass_them() {
        let m = Some(Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(
            pod_cgroup("/kubepods/burstable/podab", m),
            Path::new("kubepods/burstable/podab")
        );
        assert_eq!(
            pod_cgroup("/sys/fs/cgroup/unified/kubepods/podab", m),
            Path::new("/sys/fs/cgroup/unified/kubepods/podab")
        );
        assert_eq!(
            pod_cgroup("kubepods-burstable-pod12_34.slice", m),
            Path::new("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12_34.slice")
        );
        assert_eq!(pod_cgroup("kubepods.slice", m), Path::new("kubepods.slice"));
    }

    /// The root however a runtime or the entry writes it is refused here
    /// already (code 7), naming the value; the agent refuses it too.
    #[test]
    fn the_cgroup_root_is_refused_before_the_agent_is_asked() {
        for root in ["/", ".", "./", "-.slice", "/sys/fs/cgroup/"] {
            for c in [
                base(json!({"runtimeConfig": {"cgroupPath": root}})),
                base(json!({"runtimeConfig": {}, "cgroup": root})),
            ] {
                let e = target_for(&env("ADD"), &conf(c), mount()).unwrap_err();
                assert_eq!(e.code, code::INVALID_CONFIG, "{root}: {e:?}");
                assert!(
                    e.msg.contains(&format!("{root:?}")) && e.msg.contains("cgroup2 root"),
                    "{root}: {e:?}"
                );
                assert!(e.details.contains("\"cgroup\""), "{e:?}");
            }
        }
        let c = conf(base(
            json!({"runtimeConfig": {"cgroupPath": "/kubepods/pod1"}}),
        ));
        assert!(target_for(&env("ADD"), &c, mount()).is_ok());
    }

    #[test]
    fn pod_name_from_cni_args() {
        let mut e = env("ADD");
        assert_eq!(e.pod_name().as_deref(), Some("shop/web-0"));
        e.args = Some("K8S_POD_NAME=solo".into());
        assert_eq!(e.pod_name().as_deref(), Some("solo"));
        e.args = None;
        assert_eq!(e.pod_name(), None);
    }

    #[test]
    fn results_convert_between_04_and_1x() {
        let r1 = json!({"cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0"}],
            "ips": [{"address": "10.0.0.2/24", "interface": 0},
                    {"address": "fd00::2/64", "interface": 0}]});
        let r04 = convert_result(&r1, "0.4.0");
        assert_eq!(r04["cniVersion"], "0.4.0");
        assert_eq!(r04["ips"][0]["version"], "4");
        assert_eq!(r04["ips"][1]["version"], "6");
        assert_eq!(convert_result(&r04, "1.0.0"), r1);
        let r11 = convert_result(&r1, "1.1.0");
        assert_eq!(r11["cniVersion"], "1.1.0");
        assert_eq!(r11["ips"], r1["ips"]);
    }

    #[test]
    fn commands_without_an_agent() {
        let run_with = |cmd: &str, stdin: &str| run(&env(cmd), stdin.as_bytes());
        let v = run_with("VERSION", "").unwrap().unwrap();
        assert_eq!(v["supportedVersions"], json!(SUPPORTED_VERSIONS));
        let (e, v) = run_with("ADD", r#"{"cniVersion":"0.3.1"}"#).unwrap_err();
        assert_eq!((e.code, v.as_str()), (code::INCOMPATIBLE_VERSION, "0.3.1"));
        let (e, _) = run_with("ADD", "{").unwrap_err();
        assert_eq!(e.code, code::DECODING);
        let (e, _) = run_with("ADD", r#"{"cniVersion":"1.0.0","proxyPort":"x"}"#).unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
        assert!(e.msg.contains("proxyPort: invalid type"), "{e:?}");
        let (e, _) = run_with("ADD", r#"{"cniVersion":"1.0.0"}"#).unwrap_err();
        assert!(e.msg.contains("prevResult"), "{e:?}");
        let (e, _) = run_with("FROB", r#"{"cniVersion":"1.0.0"}"#).unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        assert_eq!(run_with("GC", r#"{"cniVersion":"1.1.0"}"#).unwrap(), None);
        let (e, _) = run(&CniEnv::default(), &b""[..]).unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
    }
}
