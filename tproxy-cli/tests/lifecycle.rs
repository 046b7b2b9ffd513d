//! Lifecycle of a tproxy instance, checked with the kernel: everything it
//! attaches is where it should be, and after SIGTERM nothing of it is left.
//! Root only; each test makes its own namespace and child cgroup.
use std::{process::Command, time::Duration};

mod common;

use common::{BIN, kernel_caps, sandbox::Sandbox};
use tproxy_lab::{Netns, kernel};

/// The lifecycle tests' sandbox.
fn sandbox() -> Sandbox {
    Sandbox::new("tpx-lc-")
}

/// The runtime record a running instance wrote (its map ids).
fn record_of(ns: &Netns) -> serde_json::Value {
    use std::os::unix::fs::MetadataExt as _;
    let ino = std::fs::metadata(ns.path()).unwrap().ino();
    let p = format!("/run/tproxy/{ino}-eth0.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// Polls `f` for up to 120 s: the kernel frees programs after the last
/// reference goes (RCU), not at the instant the process exits (and a busy
/// machine takes longer).
fn eventually(what: &str, f: impl FnMut() -> bool) {
    common::eventually(what, Duration::from_secs(120), f);
}

/// Stands for the read hook's program in `ALL_PROGS`.
const READ_HOOK: &str = "(read hook)";

/// The read hook's program and its kind, as this kernel offers it: probed
/// the way tproxy probes (fexit where it runs, else the tracepoint).
fn read_hook() -> (&'static str, &'static str) {
    use tproxy::sys::probe::{ReadHook, ReadHooks};
    match ReadHooks::probed().chosen().expect("a read hook") {
        h @ ReadHook::Fexit => (h.program(), "tracing"),
        h @ ReadHook::Tracepoint => (h.program(), "raw_tracepoint"),
    }
}

/// Without acceleration, the first five.
const ALL_PROGS: [&str; 10] = [
    "tproxy_steer",
    "tproxy_restore",
    "tproxy_getsockopt",
    "tproxy_getsockname4",
    "tproxy_getsockname6",
    "tproxy_sockops",
    "tproxy_sk_msg",
    // The options the fast path cannot honour (cgroup/setsockopt).
    "tproxy_setsockopt",
    // The read hook: tproxy_recv_fexit or tproxy_recv_length (`read_hook`).
    READ_HOOK,
    // The nudger's iter/tcp walk (loaded and attached, run on demand).
    "tproxy_nudge_iter",
];

/// Checks every program of the instance whose COUNTERS map is `map_id` is
/// loaded and attached where it should be; returns the program ids.
fn assert_attached(sb: &Sandbox, map_id: u64, accel: bool, tcx: bool) -> Vec<u64> {
    let progs = kernel::programs_using_map(map_id).unwrap();
    let names: Vec<&str> = progs.iter().map(|p| p.name.as_str()).collect();
    // Without acceleration: the flow-tracking sockops and no socket
    // programs (no SOCKHASH, sk_msg or read hook).
    let (hook, hook_kind) = read_hook();
    let expected: Vec<&str> = if accel {
        let mut v: Vec<&str> = ALL_PROGS
            .iter()
            .map(|&p| if p == READ_HOOK { hook } else { p })
            .collect();
        // The send hook comes with the fexit read hook (tracing programs).
        if hook_kind == "tracing" {
            v.push(tproxy_common::names::PROG_SEND_FENTRY);
        }
        v
    } else {
        let mut v = ALL_PROGS[..5].to_vec();
        v.push("tproxy_sockops_flows");
        v
    };
    for name in &expected {
        assert!(names.contains(name), "{name} not loaded; loaded: {names:?}");
    }
    assert_eq!(
        progs.len(),
        expected.len(),
        "unexpected programs: {names:?}"
    );
    let kind = |n: &str| progs.iter().find(|p| p.name == n).unwrap().kind.clone();
    assert_eq!(kind("tproxy_steer"), "sched_cls");
    assert_eq!(kind("tproxy_getsockopt"), "cgroup_sockopt");
    if accel {
        assert_eq!(kind("tproxy_sockops"), "sock_ops");
        assert_eq!(kind("tproxy_sk_msg"), "sk_msg");
        assert_eq!(kind(hook), hook_kind);
        assert_eq!(kind("tproxy_nudge_iter"), "tracing");
        if hook_kind == "tracing" {
            assert_eq!(kind(tproxy_common::names::PROG_SEND_FENTRY), "tracing");
        }
    }

    // Cgroup: attached to the child cgroup, nowhere else we can see.
    let mut cg: Vec<(String, String)> = kernel::cgroup_programs(sb.cgroup.path()).unwrap();
    cg.sort();
    let mut want: Vec<(String, String)> = [
        ("cgroup_getsockopt", "tproxy_getsockopt"),
        ("cgroup_inet4_getsockname", "tproxy_getsockname4"),
        ("cgroup_inet6_getsockname", "tproxy_getsockname6"),
    ]
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .into();
    let sockops = if accel {
        "tproxy_sockops"
    } else {
        "tproxy_sockops_flows"
    };
    want.push(("cgroup_sock_ops".into(), sockops.into()));
    if accel {
        want.push(("cgroup_setsockopt".into(), "tproxy_setsockopt".into()));
    }
    want.sort();
    assert_eq!(cg, want, "cgroup attachments");

    // tc: TCX links for both hooks, or netlink filters on clsact.
    let ids: Vec<u64> = progs.iter().map(|p| p.id).collect();
    let id_of = |n: &str| progs.iter().find(|p| p.name == n).unwrap().id;
    if tcx {
        // bpftool 7.1 names no TCX details, only the link type (11 = TCX).
        let links = kernel::links().unwrap();
        for prog in ["tproxy_steer", "tproxy_restore"] {
            let pid = id_of(prog);
            let link = links
                .iter()
                .find(|l| l["prog_id"].as_u64() == Some(pid))
                .unwrap_or_else(|| panic!("no link for {prog}: {links:?}"));
            assert!(
                link["type"] == 11 || link["type"] == "tcx",
                "{prog}: {link}"
            );
        }
    } else {
        let tc = sb.tc_listing();
        assert!(tc.contains("clsact"), "{tc}");
        assert!(
            tc.contains("tproxy_steer") && tc.contains("tproxy_restore"),
            "{tc}"
        );
    }
    assert_tc_runs_on_eth0(sb);
    ids
}

/// The tc programs run on eth0's hooks: packets sent out of eth0 and into it
/// (ARP from unanswered pings across the veth) move the counters.
fn assert_tc_runs_on_eth0(sb: &Sandbox) {
    let counters = || -> (u64, u64) {
        let out = sb.ns.exec(BIN, &["stats", "-i", "eth0", "--json"]).unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
        let c = &v[0]["counters"];
        (
            c["ingress_packets"].as_u64().unwrap(),
            c["egress_packets"].as_u64().unwrap(),
        )
    };
    let _ = sb.ns.ip(&["addr", "add", "10.99.0.1/24", "dev", "eth0"]);
    let _ = sb.ns.ip(&["addr", "add", "10.98.0.1/24", "dev", "peer0"]);
    let (in0, out0) = counters();
    // Out of eth0 (egress), then out of peer0 into eth0 (ingress). A fresh
    // target each time: a failed neighbour entry would send no new ARP.
    static HOST: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(2);
    let h = HOST.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let _ = sb
        .ns
        .exec("ping", &["-c", "1", "-W", "1", &format!("10.99.0.{h}")]);
    let _ = sb
        .ns
        .exec("ping", &["-c", "1", "-W", "1", &format!("10.98.0.{h}")]);
    // The ARP requests were sent while ping ran; the one into eth0 is
    // received in a softirq that a busy machine may run later: polled.
    eventually("eth0's tc counters moved", || {
        let (in1, out1) = counters();
        in1 > in0 && out1 > out0
    });
}

/// After the instance is gone: none of its programs, links, cgroup
/// attachments or runtime record remain.
fn assert_gone(sb: &Sandbox, prog_ids: &[u64], tc_before: &str) {
    eventually("programs freed", || {
        let live = kernel::programs().unwrap();
        !live.iter().any(|p| prog_ids.contains(&p.id))
    });
    let links = kernel::links().unwrap();
    for l in &links {
        let pid = l["prog_id"].as_u64().unwrap_or(0);
        assert!(!prog_ids.contains(&pid), "link left: {l}");
    }
    assert_eq!(kernel::cgroup_programs(sb.cgroup.path()).unwrap(), vec![]);
    assert_eq!(sb.tc_listing(), tc_before, "tc state changed");
    assert!(!sb.record_exists(), "runtime record left behind");
    let pins = Command::new("sh")
        .args(["-c", "find /sys/fs/bpf -name '*tproxy*' 2>/dev/null"])
        .output()
        .unwrap();
    assert!(pins.stdout.is_empty(), "pins left: {:?}", pins.stdout);
}

#[test]
fn attaches_everything_and_sigterm_removes_it_all() {
    let sb = sandbox();
    let before = sb.tc_listing();
    let t = sb.start(&[]);
    let rec = record_of(&sb.ns);
    // `auto`: TCX where the kernel has it, netlink filters elsewhere.
    let tcx = kernel_caps().tcx;
    let mode = if tcx { "tcx" } else { "netlink" };
    assert_eq!(rec["tc_mode"], mode, "{rec}");
    let ids = assert_attached(&sb, rec["counters_map_id"].as_u64().unwrap(), true, tcx);
    let (status, log) = t.terminate().unwrap();
    assert!(status.success(), "exit {status}; log:\n{log}");
    assert!(log.contains("detached 9 programs"), "{log}");
    assert_gone(&sb, &ids, &before);
}

#[test]
fn sigint_works_too_and_no_accel_loads_no_socket_programs() {
    // (--no-accel still tracks flows with sockops, but loads no SOCKHASH,
    // sk_msg or read hook program.)
    let sb = sandbox();
    let before = sb.tc_listing();
    let mut t = sb.start(&["--no-accel"]);
    let rec = record_of(&sb.ns);
    let ids = assert_attached(
        &sb,
        rec["counters_map_id"].as_u64().unwrap(),
        false,
        kernel_caps().tcx,
    );
    t.proc.signal(libc::SIGINT);
    let status = t.proc.wait_timeout(Duration::from_secs(120)).unwrap();
    assert!(status.success(), "exit {status}");
    assert_gone(&sb, &ids, &before);
}

#[test]
fn netlink_mode_adds_and_removes_its_clsact_qdisc() {
    let sb = sandbox();
    let before = sb.tc_listing();
    assert!(!before.contains("clsact"));
    let t = sb.start(&["--tc-mode", "netlink"]);
    let rec = record_of(&sb.ns);
    assert_eq!(rec["created_clsact"], true);
    let ids = assert_attached(&sb, rec["counters_map_id"].as_u64().unwrap(), true, false);
    let (status, log) = t.terminate().unwrap();
    assert!(status.success(), "{log}");
    assert_gone(&sb, &ids, &before);
}

/// SIGKILL runs no cleanup. What remains, by attachment kind:
/// - TCX links and cgroup bpf_links: nothing; the kernel detaches a link
///   when its last fd closes, and a killed process's fds all close.
/// - the runtime record /run/tproxy/<netns>-<iface>.json: stays, unlocked;
///   the next start sees the free lock, says so, and takes over.
#[test]
fn sigkill_with_tcx_leaves_only_the_record_and_next_start_recovers() {
    // A kernel without TCX has nothing of this to show: the kernel matrix
    // does not run it there (and says so).
    assert!(kernel_caps().tcx, "this test needs TCX (Linux >= 6.6)");
    let sb = sandbox();
    let before = sb.tc_listing();
    let t = sb.start(&[]);
    let rec = record_of(&sb.ns);
    let ids = assert_attached(&sb, rec["counters_map_id"].as_u64().unwrap(), true, true);
    t.kill9().unwrap();
    eventually("programs freed after SIGKILL", || {
        !kernel::programs()
            .unwrap()
            .iter()
            .any(|p| ids.contains(&p.id))
    });
    assert_eq!(kernel::cgroup_programs(sb.cgroup.path()).unwrap(), vec![]);
    assert_eq!(sb.tc_listing(), before);
    assert!(
        sb.record_exists(),
        "the record is expected to survive SIGKILL"
    );

    let mut t = sb.start(&[]);
    t.wait_for("", Duration::from_millis(1)).ok();
    assert!(t.log().contains("died without cleaning up"), "{}", t.log());
    let rec = record_of(&sb.ns);
    let ids = assert_attached(&sb, rec["counters_map_id"].as_u64().unwrap(), true, true);
    let (status, _) = t.terminate().unwrap();
    assert!(status.success());
    assert_gone(&sb, &ids, &before);
}

/// Netlink tc filters (and the clsact qdisc) outlive a killed process; the
/// next start removes them before attaching its own.
#[test]
fn sigkill_with_netlink_filters_next_start_removes_them() {
    let sb = sandbox();
    let before = sb.tc_listing();
    let t = sb.start(&["--tc-mode", "netlink"]);
    t.kill9().unwrap();
    let left = sb.tc_listing();
    assert!(
        left.contains("tproxy_steer") && left.contains("tproxy_restore"),
        "{left}"
    );

    let t = sb.start(&["--tc-mode", "netlink"]);
    assert!(
        t.log().contains("removed 2 tc filter hook(s)"),
        "{}",
        t.log()
    );
    let rec = record_of(&sb.ns);
    let ids = assert_attached(&sb, rec["counters_map_id"].as_u64().unwrap(), true, false);
    // Exactly one filter per hook: the old ones are gone.
    let tc = sb.tc_listing();
    assert_eq!(tc.matches("name tproxy_steer").count(), 1, "{tc}");
    let (status, _) = t.terminate().unwrap();
    assert!(status.success());
    assert_gone(&sb, &ids, &before);
}

#[test]
fn instances_in_two_namespaces_do_not_collide_and_one_per_interface() {
    let a = sandbox();
    let b = sandbox();
    let ta = a.start(&[]);
    let tb = b.start(&[]);
    // A second instance on the same interface and namespace is refused.
    let cg = a.cg();
    let out =
        a.ns.command(BIN)
            .args(["-i", "eth0", "-ports", "9000", "--cgroup", &cg])
            .output()
            .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already serves eth0"), "{err}");

    let ra = record_of(&a.ns);
    let rb = record_of(&b.ns);
    assert_ne!(ra["counters_map_id"], rb["counters_map_id"]);
    let tcx = kernel_caps().tcx;
    let ids_a = assert_attached(&a, ra["counters_map_id"].as_u64().unwrap(), true, tcx);
    assert_attached(&b, rb["counters_map_id"].as_u64().unwrap(), true, tcx);
    let (st, _) = ta.terminate().unwrap();
    assert!(st.success());
    assert_gone(&a, &ids_a, &a.tc_listing());
    // b is untouched by a's exit.
    let ids_b = assert_attached(&b, rb["counters_map_id"].as_u64().unwrap(), true, tcx);
    let (st, _) = tb.terminate().unwrap();
    assert!(st.success());
    assert_gone(&b, &ids_b, &b.tc_listing());
}

/// Runs tproxy with `args` in a fresh sandbox; it must fail with exactly
/// one line containing `needle`, and leave nothing installed.
fn refused(args: &[&str], needle: &str, as_nobody: bool) {
    let sb = sandbox();
    let before = sb.tc_listing();
    let cg = sb.cg();
    let mut full: Vec<&str> = args.to_vec();
    if !args.contains(&"--cgroup") {
        full.extend(["--cgroup", &cg]);
    }
    let out = if as_nobody {
        sb.ns
            .command("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                BIN,
            ])
            .args(&full)
            .output()
            .unwrap()
    } else {
        sb.ns.command(BIN).args(&full).output().unwrap()
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got:\n{err}");
    assert!(
        lines[0].contains(needle),
        "{args:?}: {:?} does not mention {needle:?}",
        lines[0]
    );
    assert_eq!(kernel::cgroup_programs(sb.cgroup.path()).unwrap(), vec![]);
    assert_eq!(sb.tc_listing(), before);
    assert!(!sb.record_exists());
}

#[test]
fn bad_input_gets_one_line_and_leaves_nothing() {
    refused(
        &["-i", "nosuch0", "-ports", "8000"],
        "no interface named \"nosuch0\"",
        false,
    );
    refused(&["-i", "eth0", "-ports", ""], "empty", false);
    refused(&["-i", "eth0", "-ports", "0"], "port 0", false);
    refused(&["-i", "eth0", "-ports", "65536"], "above 65535", false);
    refused(&["-i", "eth0", "-ports", "80,,90"], "bad port list", false);
    refused(
        &["-i", "eth0", "-ports", "15000-15010"],
        "proxy port 15006",
        false,
    );
    refused(
        &["-i", "eth0", "-ports", "8000", "--cgroup", "/tmp"],
        "not a cgroup v2",
        false,
    );
    refused(
        &[
            "-i",
            "eth0",
            "-ports",
            "8000",
            "--cgroup",
            "/sys/fs/cgroup/cpu",
        ],
        "not a cgroup v2",
        false,
    );
    refused(&["-i", "eth0", "-ports", "8000"], "needs root", true);
}

/// All-or-nothing: an `ingress` qdisc (not clsact) on the interface makes
/// the netlink tc attach fail after the cgroup programs are attached; they
/// must be gone when the error is printed.
#[test]
fn failure_late_in_attach_rolls_back_everything() {
    let sb = sandbox();
    sb.ns
        .exec("tc", &["qdisc", "add", "dev", "eth0", "ingress"])
        .unwrap();
    let before = sb.tc_listing();
    let out = sb
        .command(&["--tc-mode", "netlink"])
        .env("TPROXY_LOG", "debug")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    // The cgroup programs were attached before tc failed, and detached after.
    assert!(err.contains("attached sockops"), "{err}");
    assert!(err.contains("detached sockops"), "{err}");
    assert!(err.contains("detached cgroup/getsockopt"), "{err}");
    assert!(err.lines().last().unwrap().starts_with("tproxy: "), "{err}");
    assert_eq!(kernel::cgroup_programs(sb.cgroup.path()).unwrap(), vec![]);
    assert_eq!(sb.tc_listing(), before);
    assert!(!sb.record_exists());
}

/// The tproxy back-end's rule, routes and nftables table outlive a killed
/// process (they are not tied to any fd); the next start removes them
/// before installing its own, and SIGTERM removes those.
#[test]
fn sigkill_in_tproxy_mode_next_start_removes_the_routing_it_left() {
    let sb = sandbox();
    let routing = |sb: &Sandbox| {
        format!(
            "{}{}{}{}",
            sb.ns.exec("nft", &["list", "ruleset"]).unwrap(),
            sb.ns.ip(&["rule", "show"]).unwrap(),
            sb.ns.ip(&["-6", "rule", "show"]).unwrap(),
            sb.ns.ip(&["route", "show", "table", "all"]).unwrap()
        )
    };
    let before = routing(&sb);
    let t = sb.start(&["--steer", "tproxy"]);
    t.kill9().unwrap();
    let left = routing(&sb);
    assert!(left.contains("table inet tproxy_eth0"), "{left}");
    assert!(left.contains("fwmark"), "{left}");

    let t = sb.start(&["--steer", "tproxy"]);
    assert!(
        t.log().contains("removed 5 routing object(s)"),
        "{}",
        t.log()
    );
    let now = routing(&sb);
    assert_eq!(now.matches("table inet tproxy_eth0").count(), 1, "{now}");
    assert_eq!(
        now.matches("fwmark").count(),
        2,
        "one rule per family: {now}"
    );
    let (st, _) = t.terminate().unwrap();
    assert!(st.success());
    assert_eq!(routing(&sb), before);
}
