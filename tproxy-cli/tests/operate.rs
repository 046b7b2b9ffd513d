//! Operating tproxy: `tproxy status` finds every instance on the host and
//! checks it against the kernel; `tproxy cleanup` removes what a killed one
//! left, and nothing else. Root only; each test makes its own namespaces and
//! cgroups. Tests that count every record (or run `cleanup --all`) use a run
//! directory of their own (TPROXY_RUN_DIR), so other tests' instances on
//! this host are never seen, let alone cleaned.
mod common;

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    os::unix::fs::MetadataExt as _,
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use common::{sandbox::Sandbox, *};
use serde_json::Value;
use tproxy_lab::{Logged, Netns, topology::SERVER_IP};

fn inode(ns: &Netns) -> u64 {
    std::fs::metadata(ns.path()).unwrap().ino()
}

/// `tproxy ARGS…` in `ns` (the host's namespace if `None`), with the run
/// directory `run_dir` if given.
fn tproxy(ns: Option<&Netns>, run_dir: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = match ns {
        Some(ns) => ns.command(BIN),
        None => Command::new(BIN),
    };
    if let Some(d) = run_dir {
        cmd.env("TPROXY_RUN_DIR", d);
    }
    cmd.args(args).output().unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// `tproxy status --json` from the host's namespace: every instance, and
/// the exit code.
fn status(run_dir: Option<&Path>) -> (Vec<Value>, Option<i32>) {
    let out = tproxy(None, run_dir, &["status", "--json"]);
    let (stdout, stderr) = text(&out);
    let v: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("status --json: {e}\nstdout:\n{stdout}\nstderr:\n{stderr}"));
    (v.as_array().unwrap().clone(), out.status.code())
}

/// The entry for the instance on `iface` in `ns`.
fn entry(all: &[Value], ns: &Netns, iface: &str) -> Value {
    let ino = inode(ns);
    let found: Vec<&Value> = all
        .iter()
        .filter(|e| e["netns_inode"] == ino && e["iface"] == iface)
        .collect();
    assert_eq!(found.len(), 1, "one entry for {iface} in {ino}: {all:#?}");
    found[0].clone()
}

/// Starts `tproxy ARGS…` in `ns` (and `cgroup`) with the run directory
/// `run_dir`, and waits until it serves.
fn start(ns: &Netns, cg: &tproxy_lab::Cgroup, run_dir: &Path, args: &[&str]) -> Logged {
    let mut cmd = ns.command(BIN);
    let cgs = cg.path().display().to_string();
    cmd.args(args)
        .args(["--cgroup", &cgs])
        .env("TPROXY_RUN_DIR", run_dir)
        .env("TPROXY_LOG", "debug");
    let mut t = Logged::spawn("tproxy", &mut cmd).unwrap();
    t.wait_for("serving", STARTUP).unwrap();
    t
}

/// Everything of a namespace tproxy could leave behind: tc on eth0, rules
/// and routes (both families, every table), the nftables ruleset, and the
/// namespace's runtime records.
fn leftovers(sb_ns: &Netns, run_dir: &Path) -> String {
    let ip = |args: &[&str]| sb_ns.ip(args).unwrap();
    let mut tc = sb_ns.exec("tc", &["qdisc", "show", "dev", "eth0"]).unwrap();
    for hook in ["ingress", "egress"] {
        tc += &sb_ns
            .exec("tc", &["filter", "show", "dev", "eth0", hook])
            .unwrap_or_default();
    }
    let prefix = format!("{}-", inode(sb_ns));
    let mut records: Vec<String> = std::fs::read_dir(run_dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    records.sort();
    [
        tc,
        ip(&["rule", "show"]),
        ip(&["-6", "rule", "show"]),
        ip(&["route", "show", "table", "all"]),
        ip(&["-6", "route", "show", "table", "all"]),
        sb_ns.exec("nft", &["list", "ruleset"]).unwrap(),
        records.join("\n"),
    ]
    .join("\n--\n")
}

/// `n` connections through the proxy to the app, each answered once (so
/// the proxy<->app pair exists), held open by the caller.
fn hold(port: u16, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut c = TcpStream::connect(addr(SERVER_IP, port)).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            c.write_all(format!("hold {i}\n").as_bytes()).unwrap();
            let mut b = [0u8; 1];
            c.read_exact(&mut b).unwrap();
            c
        })
        .collect()
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// status against a running instance: what it was asked (interface, ports,
/// back-end, acceleration), who runs it and since when, and what the kernel
/// has: its programs attached, its open flows and accelerated sockets
/// matching the connections this test holds through the proxy.
#[test]
fn status_reports_a_running_instance_as_the_kernel_sees_it() {
    let lab = Lab::new();
    let _p = lab.proxy(Proxy::Ours, Steer::Rewrite);
    let before = now_s();
    let t = lab.tproxy(Steer::Rewrite, &[]);
    let server = &lab.topo.server;
    const HELD: u64 = 3;
    // Sockets stay in the namespace they were made in.
    let held = lab.topo.client.run(|| hold(8000, HELD as usize));
    {
        // Only our instance's entry: the host may run others (other tests).
        let ours = || entry(&status(None).0, server, "eth0");
        eventually(
            "status shows the held flows and their accelerated sockets",
            Duration::from_secs(120),
            || {
                let e = ours();
                e["flows"]["open"] == HELD && e["accel_sockets"] == 2 * HELD
            },
        );
        let e = ours();
        assert_eq!(e["state"], "running", "{e:#}");
        assert_eq!(e["problems"], serde_json::json!([]), "{e:#}");
        assert_eq!(e["pid"], t.proc.pid(), "{e:#}");
        assert_eq!(e["pid_alive"], true, "{e:#}");
        assert_eq!(e["lock_holder"], t.proc.pid(), "{e:#}");
        assert_eq!(e["netns_name"], server.name(), "{e:#}");
        assert_eq!(e["ports"], INTERCEPTED, "{e:#}");
        assert_eq!(e["proxy_port"], 15006, "{e:#}");
        assert_eq!(e["steer"], "rewrite", "{e:#}");
        assert_eq!(e["accel"], true, "{e:#}");
        let mode = if kernel_caps().tcx { "tcx" } else { "netlink" };
        assert_eq!(e["tc_mode"], mode, "{e:#}");
        assert_eq!(e["cgroup"], lab.cg(), "{e:#}");
        let started = e["started_at"].as_u64().unwrap();
        assert!(
            (before..=now_s()).contains(&started),
            "started_at {started}"
        );
        // Nine programs, each checked attached: links by id, sk_msg by
        // its program.
        let att = e["attachments"].as_array().unwrap();
        assert_eq!(att.len(), 9, "{e:#}");
        for a in att {
            assert_eq!(a["attached"], true, "{a}");
            assert!(a["prog_id"].as_u64().unwrap() > 0, "{a}");
        }
        let links = att.iter().filter(|a| a["link_id"].is_u64()).count();
        assert_eq!(links, 8, "every attachment but sk_msg is a link: {e:#}");

        // At a glance, for people.
        let out = tproxy(None, None, &["status"]);
        let (human, _) = text(&out);
        eprintln!("tproxy status:\n{human}");
        let head = format!(
            "tproxy on eth0 in netns {} ({})",
            server.name(),
            inode(server)
        );
        let block: String = human
            .split("\n\n")
            .find(|b| b.starts_with(&head))
            .unwrap_or_else(|| panic!("no block starting {head:?}:\n{human}"))
            .into();
        for want in [
            ": OK".to_string(),
            format!("pid {}", t.proc.pid()),
            format!("ports {INTERCEPTED} -> proxy port 15006"),
            format!("{HELD} open"),
            format!("{} accelerated socket(s)", 2 * HELD),
            "9/9 attached".into(),
        ] {
            assert!(block.contains(&want), "{want:?} not in:\n{block}");
        }
    }
    drop(held);
    let (st, log) = t.terminate().unwrap();
    assert!(st.success(), "{log}");
}

/// A live instance whose attachments are gone (a filter deleted by hand, a
/// link detached with bpftool) is flagged, naming what is missing.
#[test]
fn status_flags_a_live_instance_whose_attachments_are_gone() {
    let a = Sandbox::new("tpx-op-");
    let b = Sandbox::new("tpx-op-");
    let ta = a.start(&["--tc-mode", "netlink"]);
    let tb = b.start(&[]);
    let (all, _) = status(None);
    assert_eq!(entry(&all, &a.ns, "eth0")["state"], "running");
    let eb = entry(&all, &b.ns, "eth0");
    assert_eq!(eb["state"], "running");

    a.ns.exec("tc", &["filter", "del", "dev", "eth0", "ingress"])
        .unwrap();
    let sockops = eb["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["what"].as_str().unwrap().starts_with("sockops"))
        .unwrap_or_else(|| panic!("no sockops attachment: {eb:#}"))
        .clone();
    let link = sockops["link_id"].as_u64().unwrap().to_string();
    let st = Command::new("bpftool")
        .args(["link", "detach", "id", &link])
        .status()
        .unwrap();
    assert!(st.success(), "bpftool link detach id {link}");

    let (all, _) = status(None);
    let ea = entry(&all, &a.ns, "eth0");
    assert_eq!(ea["state"], "degraded", "{ea:#}");
    let problems = ea["problems"].to_string();
    assert!(
        problems.contains("tproxy_steer") && !problems.contains("tproxy_restore"),
        "{ea:#}"
    );
    let eb = entry(&all, &b.ns, "eth0");
    assert_eq!(eb["state"], "degraded", "{eb:#}");
    assert!(eb["problems"].to_string().contains("sockops"), "{eb:#}");
    assert_eq!(eb["problems"].as_array().unwrap().len(), 1, "{eb:#}");
    for t in [ta, tb] {
        let (st, log) = t.terminate().unwrap();
        assert!(st.success(), "{log}");
    }
}

/// SIGKILL with netlink tc and the tproxy back-end leaves filters, the
/// clsact qdisc, the fwmark rules, the local routes, the nftables table and
/// the record. status flags the record stale; `cleanup --all`, run from the
/// host's namespace, enters the dead instance's namespace and returns it to
/// exactly its state before the run, while an instance of the same kind in
/// another namespace keeps serving, untouched. A second cleanup is a no-op.
#[test]
fn cleanup_after_sigkill_restores_the_namespace_and_spares_a_live_instance() {
    let run_dir = tempfile::tempdir().unwrap();
    let rd = run_dir.path();
    let kind = ["--tc-mode", "netlink", "--steer", "tproxy"];

    // The live one: the lab, traffic through the transparent proxy.
    let lab = Lab::new();
    let _p = lab.proxy(Proxy::Ours, Steer::Tproxy);
    let mut args = vec!["-i", "eth0", "-ports", INTERCEPTED];
    args.extend(kind);
    let live = start(&lab.topo.server, &lab.topo.cgroup, rd, &args);
    let served = || {
        lab.topo
            .client
            .run(|| exchange(addr(SERVER_IP, 8000), b"still there\n"))
            .map(|r| (r.port, r.echoed))
    };
    assert_eq!(served().unwrap(), (8000, b"still there\n".to_vec()));
    let live_before = leftovers(&lab.topo.server, rd);

    // The one that dies.
    let sb = Sandbox::new("tpx-op-");
    let before = leftovers(&sb.ns, rd);
    let mut args = vec!["-i", "eth0", "-ports", "8000"];
    args.extend(kind);
    let dead = start(&sb.ns, &sb.cgroup, rd, &args);
    let dead_pid = dead.proc.pid();
    dead.kill9().unwrap();
    let left = leftovers(&sb.ns, rd);
    for want in [
        "clsact",
        "tproxy_steer",
        "tproxy_restore",
        "fwmark",
        "tproxy_eth0",
    ] {
        assert!(
            left.contains(want),
            "{want} not left after SIGKILL:\n{left}"
        );
    }

    let (all, code) = status(Some(rd));
    assert_eq!(all.len(), 2, "{all:#?}");
    let e = entry(&all, &sb.ns, "eth0");
    assert_eq!(e["state"], "stale", "{e:#}");
    assert_eq!(e["pid"], dead_pid, "{e:#}");
    assert_eq!(e["lock_holder"], Value::Null, "{e:#}");
    assert!(e["problems"].to_string().contains("died"), "{e:#}");
    assert_eq!(entry(&all, &lab.topo.server, "eth0")["state"], "running");
    assert_eq!(code, Some(1), "an unhealthy instance is exit 1");
    let (human, _) = text(&tproxy(None, Some(rd), &["status"]));
    eprintln!("tproxy status:\n{human}");
    assert!(human.contains(": STALE"), "{human}");
    assert!(human.contains("tproxy cleanup"), "{human}");

    let out = tproxy(None, Some(rd), &["cleanup", "--all"]);
    let (said, err) = text(&out);
    eprintln!("tproxy cleanup --all:\n{said}{err}");
    assert!(out.status.success(), "{said}\n{err}");
    // One line per object: 2 filters, the qdisc, the nftables table, a rule
    // and a route per family, the record.
    let removed: Vec<&str> = said
        .lines()
        .filter(|l| l.trim_start().starts_with("removed "))
        .collect();
    assert_eq!(removed.len(), 9, "{said}");
    for want in [
        "tproxy_steer",
        "tproxy_restore",
        "clsact",
        "tproxy_eth0",
        "rule",
        "route",
        "record",
    ] {
        assert!(said.contains(want), "{want} not said:\n{said}");
    }
    assert_eq!(leftovers(&sb.ns, rd), before, "cleanup left or took more");

    // The live instance: untouched, serving, healthy.
    assert_eq!(leftovers(&lab.topo.server, rd), live_before);
    assert_eq!(served().unwrap(), (8000, b"still there\n".to_vec()));
    let (all, code) = status(Some(rd));
    assert_eq!(all.len(), 1, "{all:#?}");
    let e = entry(&all, &lab.topo.server, "eth0");
    assert_eq!(
        (e["state"].as_str(), code),
        (Some("running"), Some(0)),
        "{e:#}"
    );

    let out = tproxy(None, Some(rd), &["cleanup", "--all"]);
    let (said, err) = text(&out);
    assert!(out.status.success(), "{said}\n{err}");
    assert_eq!(said.trim(), "nothing to clean up");
    assert_eq!(leftovers(&lab.topo.server, rd), live_before);

    let (st, log) = live.terminate().unwrap();
    assert!(st.success(), "{log}");
}

/// In the instance's own namespace: `cleanup -i` refuses a live instance
/// (and changes nothing), and after SIGKILL plain `cleanup` (this
/// namespace's stale records) removes what it left; then nothing is left to
/// clean. The real run directory: only this namespace's record is touched.
#[test]
fn cleanup_in_the_namespace_refuses_a_live_instance_and_cleans_a_dead_one() {
    let sb = Sandbox::new("tpx-op-");
    let rd = Path::new("/run/tproxy");
    let before = leftovers(&sb.ns, rd);
    let t = sb.start(&["--tc-mode", "netlink", "--steer", "tproxy"]);
    let running = leftovers(&sb.ns, rd);

    let out = tproxy(Some(&sb.ns), None, &["cleanup", "-i", "eth0"]);
    let (said, err) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}\n{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("running") && lines[0].contains(&t.proc.pid().to_string()),
        "{err}"
    );
    assert_eq!(leftovers(&sb.ns, rd), running);
    let out = tproxy(Some(&sb.ns), None, &["cleanup"]);
    assert!(out.status.success());
    assert_eq!(text(&out).0.trim(), "nothing to clean up");
    assert_eq!(leftovers(&sb.ns, rd), running);

    t.kill9().unwrap();
    let out = tproxy(Some(&sb.ns), None, &["cleanup", "-i", "eth1"]);
    assert!(out.status.success());
    assert_eq!(text(&out).0.trim(), "nothing to clean up");
    let out = tproxy(Some(&sb.ns), None, &["cleanup"]);
    let (said, err) = text(&out);
    assert!(out.status.success(), "{said}\n{err}");
    assert!(said.contains("removed"), "{said}");
    assert_eq!(leftovers(&sb.ns, rd), before);
    let out = tproxy(Some(&sb.ns), None, &["cleanup", "-i", "eth0"]);
    assert!(out.status.success());
    assert_eq!(text(&out).0.trim(), "nothing to clean up");
}

/// A dead instance whose namespace is gone took its tc filters and routing
/// with it: status says so, cleanup removes the record and says why.
#[test]
fn a_record_whose_namespace_is_gone_is_only_removed() {
    let run_dir = tempfile::tempdir().unwrap();
    let rd = run_dir.path();
    let sb = Sandbox::new("tpx-op-");
    let ino = inode(&sb.ns);
    let t = start(
        &sb.ns,
        &sb.cgroup,
        rd,
        &["-i", "eth0", "-ports", "8000", "--tc-mode", "netlink"],
    );
    t.kill9().unwrap();
    drop(sb);

    let (all, code) = status(Some(rd));
    assert_eq!(all.len(), 1, "{all:#?}");
    let e = &all[0];
    assert_eq!(
        (e["netns_inode"].as_u64(), e["state"].as_str()),
        (Some(ino), Some("stale"))
    );
    assert_eq!(e["netns_exists"], false, "{e:#}");
    assert_eq!(code, Some(1));

    let out = tproxy(None, Some(rd), &["cleanup", "--all"]);
    let (said, err) = text(&out);
    assert!(out.status.success(), "{said}\n{err}");
    assert!(said.contains("no longer exists"), "{said}");
    let removed: Vec<&str> = said
        .lines()
        .filter(|l| l.trim_start().starts_with("removed "))
        .collect();
    assert_eq!(removed.len(), 1, "only the record: {said}");
    assert_eq!(std::fs::read_dir(rd).map(|d| d.count()).unwrap_or(0), 0);
    let out = tproxy(None, Some(rd), &["cleanup", "--all"]);
    assert_eq!(text(&out).0.trim(), "nothing to clean up");
}
