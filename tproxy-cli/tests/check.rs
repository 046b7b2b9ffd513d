//! `tproxy check` (the preflight: one line per requirement, exit 0 only when
//! a run would work) and tproxy under `ip netns exec` (which remounts /sys
//! and so hides the host's cgroup2 mount). Root only; each test makes its
//! own namespaces and child cgroups.
mod common;

use std::{
    net::TcpListener,
    process::{Command, Output},
    time::Duration,
};

use common::{sandbox::Sandbox, *};
use tproxy_lab::{Logged, Netns, kernel, topology::SERVER_IP};

fn sandbox() -> Sandbox {
    Sandbox::new("tpx-ck-")
}

/// Something listening on `port` in the sandbox's namespace, for as long as
/// the listener lives (a socket stays in the namespace it was made in).
fn listen(sb: &Sandbox, port: u16) -> TcpListener {
    sb.ns.run(|| TcpListener::bind(("0.0.0.0", port))).unwrap()
}

fn check_cmd(sb: &Sandbox, args: &[&str]) -> Command {
    let mut cmd = sb.ns.command(BIN);
    cmd.arg("check").args(args);
    cmd
}

/// `tproxy check --json ARGS…`: exit code and the parsed items.
fn check_json(cmd: &mut Command) -> (i32, Vec<serde_json::Value>, Output) {
    let out = cmd.arg("--json").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let items: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "not a JSON array ({e}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), items, out)
}

fn failed(items: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    items.iter().filter(|i| i["ok"] == false).collect()
}

fn item<'a>(items: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    items
        .iter()
        .find(|i| i["name"] == name)
        .unwrap_or_else(|| panic!("no {name:?} line in {items:#?}"))
}

/// Every item has a name, a detail, and a fix exactly when it failed.
fn assert_well_formed(items: &[serde_json::Value]) {
    assert!(!items.is_empty());
    for i in items {
        assert!(i["name"].as_str().is_some_and(|s| !s.is_empty()), "{i}");
        assert!(i["detail"].as_str().is_some_and(|s| !s.is_empty()), "{i}");
        match i["ok"].as_bool() {
            Some(true) => assert!(i["fix"].is_null(), "{i}"),
            Some(false) => assert!(i["fix"].as_str().is_some_and(|s| !s.is_empty()), "{i}"),
            None => panic!("ok is not a bool: {i}"),
        }
    }
}

/// The text line of the requirement `name` ("ok   NAME: …", "FAIL NAME: …").
fn line<'a>(stdout: &'a str, name: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| {
            l.split_once(' ')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(&format!("{name}: ")))
        })
        .unwrap_or_else(|| panic!("no line for {name:?} in:\n{stdout}"))
}

/// Nothing of tproxy's in the sandbox: no cgroup programs, tc as it was, no
/// record.
fn assert_nothing_attached(sb: &Sandbox, tc_before: &str) {
    assert_eq!(kernel::cgroup_programs(sb.cgroup.path()).unwrap(), vec![]);
    assert_eq!(sb.tc_listing(), tc_before);
    assert!(!sb.record_exists());
}

#[test]
fn passes_in_a_ready_namespace_and_attaches_nothing() {
    let sb = sandbox();
    let _proxy = listen(&sb, 15006);
    let tc = sb.tc_listing();
    let cg = sb.cg();
    let (code, items, out) = check_json(&mut check_cmd(&sb, &["-i", "eth0", "--cgroup", &cg]));
    assert_well_formed(&items);
    assert_eq!(
        failed(&items),
        Vec::<&serde_json::Value>::new(),
        "{items:#?}"
    );
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&out.stderr));
    for name in [
        "capabilities",
        "kernel",
        "btf",
        "cgroup",
        "tc attach",
        "interface",
        "proxy listener",
        "read hook",
        "sk_msg programs",
        "SOCKHASH maps",
        "sched_cls helpers",
        "sk_msg helpers",
    ] {
        item(&items, name);
    }
    // The read hook this kernel takes, probed: fexit where it runs.
    let hook = item(&items, "read hook")["detail"].as_str().unwrap();
    let want = match tproxy::sys::probe::ReadHooks::probed().chosen() {
        Some(tproxy::sys::probe::ReadHook::Fexit) => "fexit on tcp_bpf_recvmsg (probed)",
        _ => "sock_recv_length tracepoint (probed)",
    };
    assert!(hook.starts_with(want), "{hook}");
    // Probed, not assumed: the helper lines name what they probed.
    let helpers = item(&items, "sk_msg helpers")["detail"].as_str().unwrap();
    assert!(helpers.contains("bpf_msg_redirect_hash"), "{helpers}");
    let tc_mode = item(&items, "tc attach")["detail"].as_str().unwrap();
    assert_eq!(tc_mode.starts_with("TCX"), kernel_caps().tcx, "{tc_mode}");
    assert!(
        item(&items, "proxy listener")["detail"]
            .as_str()
            .unwrap()
            .contains("15006")
    );
    // The tproxy back-end has more to check: nft, its tproxy expression, a
    // free mark and table. Text output: one line each, all passing.
    let out = check_cmd(&sb, &["-i", "eth0", "--cgroup", &cg, "--steer", "tproxy"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    for name in ["nft", "nftables tproxy", "routing"] {
        assert!(line(&stdout, name).starts_with("ok"), "{stdout}");
    }
    assert!(stdout.lines().all(|l| l.starts_with("ok ")), "{stdout}");
    // Without acceleration the socket hooks are not asked for.
    let (code, items, _) = check_json(&mut check_cmd(
        &sb,
        &["-i", "eth0", "--cgroup", &cg, "--no-accel"],
    ));
    assert_eq!(code, 0, "{items:#?}");
    assert!(items.iter().all(|i| i["name"] != "sk_msg programs"));
    assert!(items.iter().all(|i| i["name"] != "read hook"));
    assert_nothing_attached(&sb, &tc);
}

#[test]
fn fails_on_a_missing_interface() {
    let sb = sandbox();
    let _proxy = listen(&sb, 15006);
    let cg = sb.cg();
    let (code, items, _) = check_json(&mut check_cmd(&sb, &["-i", "nosuch0", "--cgroup", &cg]));
    assert_well_formed(&items);
    assert_eq!(code, 1);
    let f = failed(&items);
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_eq!(f[0]["name"], "interface");
    assert!(
        f[0]["detail"].as_str().unwrap().contains("nosuch0"),
        "{f:?}"
    );
    assert!(f[0]["fix"].as_str().unwrap().contains("ip link"), "{f:?}");
    // The text form: the FAIL line with its fix.
    let out = check_cmd(&sb, &["-i", "nosuch0", "--cgroup", &cg])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let l = line(&stdout, "interface");
    assert!(
        l.starts_with("FAIL") && l.contains("nosuch0") && l.contains("fix:"),
        "{l}"
    );
}

#[test]
fn names_the_capabilities_it_lacks() {
    let sb = sandbox();
    let _proxy = listen(&sb, 15006);
    let tc = sb.tc_listing();
    let cg = sb.cg();
    // Root without CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN (which would
    // stand in for both).
    let drop = "-bpf,-perfmon,-sys_admin";
    let mut cmd = sb.ns.command("setpriv");
    cmd.args([
        &format!("--inh-caps={drop}"),
        &format!("--bounding-set={drop}"),
        BIN,
        "check",
        "-i",
        "eth0",
        "--cgroup",
        &cg,
    ]);
    let (code, items, _) = check_json(&mut cmd);
    assert_well_formed(&items);
    assert_eq!(code, 1, "{items:#?}");
    let caps = item(&items, "capabilities");
    assert_eq!(caps["ok"], false);
    let detail = caps["detail"].as_str().unwrap();
    assert!(
        detail.contains("CAP_BPF") && detail.contains("CAP_PERFMON"),
        "{detail}"
    );
    assert!(detail.contains("lacks CAP_BPF, CAP_PERFMON"), "{detail}");
    assert_nothing_attached(&sb, &tc);
}

#[test]
fn fails_when_nothing_listens_on_the_proxy_port() {
    let sb = sandbox();
    let _other = listen(&sb, 15006);
    let cg = sb.cg();
    let (code, items, _) = check_json(&mut check_cmd(
        &sb,
        &["-i", "eth0", "--cgroup", &cg, "--proxy-port", "15999"],
    ));
    assert_well_formed(&items);
    assert_eq!(code, 1);
    let f = failed(&items);
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_eq!(f[0]["name"], "proxy listener");
    assert!(f[0]["detail"].as_str().unwrap().contains("15999"), "{f:?}");
    assert!(
        f[0]["fix"].as_str().unwrap().contains("start the proxy"),
        "{f:?}"
    );
}

/// A metrics address already bound in the namespace fails its line (the
/// run would fail to bind it); a free one passes.
#[test]
fn fails_when_the_metrics_address_is_already_bound() {
    let sb = sandbox();
    let _proxy = listen(&sb, 15006);
    let taken = sb.ns.run(|| TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let cg = sb.cg();
    let (code, items, out) = check_json(&mut check_cmd(
        &sb,
        &["-i", "eth0", "--cgroup", &cg, "--metrics-addr", &addr],
    ));
    assert_well_formed(&items);
    assert_eq!(code, 1, "{}", String::from_utf8_lossy(&out.stderr));
    let f = failed(&items);
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_eq!(f[0]["name"], "metrics address");
    let detail = f[0]["detail"].as_str().unwrap();
    assert!(detail.contains(&addr) && detail.contains("in use"), "{f:?}");
    assert!(
        f[0]["fix"].as_str().unwrap().contains("--metrics-addr"),
        "{f:?}"
    );
    drop(taken);
    let (code, items, _) = check_json(&mut check_cmd(
        &sb,
        &["-i", "eth0", "--cgroup", &cg, "--metrics-addr", &addr],
    ));
    assert_eq!(code, 0, "{items:#?}");
    assert_eq!(item(&items, "metrics address")["ok"], true);
}

#[test]
fn the_tproxy_back_end_needs_nft_on_path() {
    let sb = sandbox();
    let _proxy = listen(&sb, 15006);
    let cg = sb.cg();
    let empty = tempfile::tempdir().unwrap();
    let path = empty.path().to_str().unwrap();
    let (code, items, _) = check_json(
        check_cmd(&sb, &["-i", "eth0", "--cgroup", &cg, "--steer", "tproxy"]).env("PATH", path),
    );
    assert_well_formed(&items);
    assert_eq!(code, 1);
    let f = failed(&items);
    assert!(!f.is_empty() && f[0]["name"] == "nft", "{f:#?}");
    assert!(f[0]["detail"].as_str().unwrap().contains("PATH"), "{f:?}");
    // The rewrite back-end does not use nft.
    let (code, items, _) =
        check_json(check_cmd(&sb, &["-i", "eth0", "--cgroup", &cg]).env("PATH", path));
    assert_eq!(code, 0, "{items:#?}");
}

/// A run makes the same check before it installs anything: one line, and
/// nothing attached.
#[test]
fn a_run_without_nft_is_refused_before_anything_is_attached() {
    let sb = sandbox();
    let tc = sb.tc_listing();
    let cg = sb.cg();
    let empty = tempfile::tempdir().unwrap();
    let out = sb
        .ns
        .command(BIN)
        .args(["-i", "eth0", "-ports", "8000", "--cgroup", &cg])
        .args(["--steer", "tproxy"])
        .env("PATH", empty.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("`nft`, which is not on PATH"), "{err}");
    assert_nothing_attached(&sb, &tc);
    assert_eq!(
        sb.ns.exec("ip", &["rule", "show"]).unwrap().lines().count(),
        3
    );
}

/// `ip netns exec NS tproxy check`: the host's cgroup path still names the
/// cgroup, though `/sys` was remounted.
#[test]
fn check_works_under_ip_netns_exec() {
    let sb = sandbox();
    let _proxy = listen(&sb, 15006);
    let cg = sb.cg();
    let mounts = host_mounts();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", sb.ns.name(), BIN, "check", "-i", "eth0"])
        .args(["--cgroup", &cg]);
    let (code, items, out) = check_json(&mut cmd);
    assert_eq!(
        failed(&items),
        Vec::<&serde_json::Value>::new(),
        "{items:#?}"
    );
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&out.stderr));
    let detail = item(&items, "cgroup")["detail"].as_str().unwrap();
    assert!(detail.contains("mount"), "{detail}");
    assert_eq!(host_mounts(), mounts);
}

/// This (the host's) mount namespace's mounts, without the mount ids, which
/// say nothing about what is mounted where, and without the named network
/// namespaces (`ip netns add` mounts them; tests running alongside add and
/// remove theirs).
fn host_mounts() -> Vec<String> {
    let s = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    s.lines()
        .filter(|l| !l.contains(" - nsfs "))
        .map(|l| l.split_whitespace().skip(2).collect::<Vec<_>>().join(" "))
        .collect()
}

/// `ip netns exec SERVER tproxy -i eth0 -ports …` serves the lab's client
/// through the proxy, `tproxy stats` works the same way, and SIGTERM
/// removes everything; nothing is ever mounted in the host's namespace.
#[test]
fn serves_under_ip_netns_exec_and_tears_down() {
    let lab = Lab::new();
    let p = lab.proxy(Proxy::Ours, Steer::Rewrite);
    let mounts = host_mounts();
    let cg = lab.cg();
    let tc = |ns: &Netns| {
        ["ingress", "egress"]
            .map(|h| {
                ns.exec("tc", &["filter", "show", "dev", "eth0", h])
                    .unwrap()
            })
            .join("")
    };
    let tc_before = tc(&lab.topo.server);
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", lab.topo.server.name(), BIN])
        .args(["-i", "eth0", "-ports", INTERCEPTED, "--cgroup", &cg])
        .env("TPROXY_LOG", "debug");
    let mut t = Logged::spawn("tproxy", &mut cmd).unwrap();
    if let Err(e) = t.wait_for("serving", STARTUP) {
        panic!("{e}");
    }
    assert_eq!(host_mounts(), mounts, "mounted in the host's namespace");

    let r = lab
        .topo
        .client
        .run(|| exchange(addr(SERVER_IP, 8080), b"via ip netns exec\n"))
        .unwrap();
    assert_eq!(r.port, 8080);
    let orig = reported_origdst(Proxy::Ours, &p.lines());
    assert_eq!(
        orig.get(&r.local),
        Some(&vec![addr(SERVER_IP, 8080)]),
        "{}",
        p.log()
    );

    // What is attached, as the kernel sees it: the cgroup programs on the
    // cgroup the host path names, TCX links on eth0.
    let mut cg_progs: Vec<String> = kernel::cgroup_programs(lab.topo.cgroup.path())
        .unwrap()
        .into_iter()
        .map(|(_, name)| name)
        .collect();
    cg_progs.sort();
    assert_eq!(
        cg_progs,
        [
            "tproxy_getsockname4",
            "tproxy_getsockname6",
            "tproxy_getsockopt",
            "tproxy_setsockopt",
            "tproxy_sockops"
        ]
    );
    // `tproxy stats` under ip netns exec too.
    let out = Command::new("ip")
        .args(["netns", "exec", lab.topo.server.name(), BIN])
        .args(["stats", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v[0]["pid"], t.proc.pid(), "{v}");
    assert!(
        v[0]["counters"]["flows_created"].as_u64().unwrap() >= 1,
        "{v}"
    );
    // `tproxy status` under ip netns exec: the cgroup is found the way the
    // run found it (it said "its cgroup is gone" before).
    let out = Command::new("ip")
        .args(["netns", "exec", lab.topo.server.name(), BIN])
        .args(["status", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(out.status.success(), "{v} {out:?}");
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .any(|s| s["pid"] == t.proc.pid()
                && s["state"] == "running"
                && s["problems"] == serde_json::json!([])),
        "{v}"
    );
    assert_eq!(
        host_mounts(),
        mounts,
        "status mounted in the host's namespace"
    );
    let map_id = record(&lab.topo.server)["counters_map_id"]
        .as_u64()
        .unwrap();
    let progs: Vec<u64> = kernel::programs_using_map(map_id)
        .unwrap()
        .iter()
        .map(|p| p.id)
        .collect();
    let links = kernel::links().unwrap();
    let tc_links = links
        .iter()
        .filter(|l| progs.contains(&l["prog_id"].as_u64().unwrap_or(0)))
        .filter(|l| l["type"] == "tcx" || l["type"] == 11)
        .count();
    // Netlink filters where the kernel has no TCX: no links then.
    let want = if kernel_caps().tcx { 2 } else { 0 };
    assert_eq!(tc_links, want, "{links:?}");

    let (st, log) = t.terminate().unwrap();
    assert!(st.success(), "{log}");
    assert!(
        log.contains("cgroup2") && log.contains("ip netns exec"),
        "no line says what was mounted:\n{log}"
    );
    eventually("programs freed", Duration::from_secs(60), || {
        let live = kernel::programs().unwrap();
        !live.iter().any(|p| progs.contains(&p.id))
    });
    assert_eq!(
        kernel::cgroup_programs(lab.topo.cgroup.path()).unwrap(),
        vec![]
    );
    assert_eq!(tc(&lab.topo.server), tc_before);
    assert!(
        !record_path(&lab.topo.server).exists(),
        "runtime record left"
    );
    assert_eq!(host_mounts(), mounts, "mounted in the host's namespace");
}

fn record_path(ns: &Netns) -> std::path::PathBuf {
    use std::os::unix::fs::MetadataExt as _;
    let ino = std::fs::metadata(ns.path()).unwrap().ino();
    format!("/run/tproxy/{ino}-eth0.json").into()
}

fn record(ns: &Netns) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(record_path(ns)).unwrap()).unwrap()
}

/// Whatever the kernel, `tproxy check` and a run agree: where check finds a
/// kernel need missing, the run refuses with one line that names a missing
/// need and its fix, and attaches nothing; where none is missing, the same
/// run attaches and serves, and SIGTERM removes it all. With acceleration
/// and without. The kernel matrix runs this on every kernel: on 5.10 the
/// refusal is what it tests, elsewhere the run.
#[test]
fn the_kernels_needs_decide_between_a_run_and_a_one_line_refusal() {
    for accel in [false, true] {
        let sb = sandbox();
        let _proxy = listen(&sb, 15006);
        let cg = sb.cg();
        let mode: &[&str] = if accel { &[] } else { &["--no-accel"] };
        let mut args = vec!["-i", "eth0", "--cgroup", &cg];
        args.extend_from_slice(mode);
        let (_, items, _) = check_json(&mut check_cmd(&sb, &args));
        assert_well_formed(&items);
        let missing: Vec<&serde_json::Value> = failed(&items);
        let tc = sb.tc_listing();
        if missing.is_empty() {
            let t = sb.start(mode);
            assert_ne!(
                kernel::cgroup_programs(sb.cgroup.path()).unwrap(),
                vec![],
                "accel {accel}: check passed, the run attached nothing"
            );
            let (st, log) = t.terminate().unwrap();
            assert!(st.success(), "accel {accel}: {log}");
            assert_nothing_attached(&sb, &tc);
            continue;
        }
        let out = sb.command(mode).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "accel {accel}: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "accel {accel}: {err}");
        // The line names one of the needs check found missing (by the
        // helpers, program or tracepoint it lists, or the kernel's version)
        // and what to do.
        let named = missing.iter().any(|i| {
            let detail = i["detail"].as_str().unwrap_or("");
            let name = i["name"].as_str().unwrap_or("");
            detail
                .split([' ', ',', ';'])
                .filter(|w| w.starts_with("bpf_") || w.starts_with("sock_"))
                .any(|w| lines[0].contains(w))
                || lines[0].contains(name)
                || (name == "kernel" && lines[0].contains("Linux"))
        });
        assert!(
            named,
            "accel {accel}: {:?} names none of {missing:#?}",
            lines[0]
        );
        assert!(
            lines[0].contains("Linux") || lines[0].contains("--no-accel"),
            "accel {accel}: no fix in {:?}",
            lines[0]
        );
        assert_nothing_attached(&sb, &tc);
    }
}
