//! Operating tproxy from a config file, and what it logs: `--config FILE`
//! with flags overriding it, one-line errors (with the file, line and
//! column, or the whole cause chain down to the syscall), `RUST_LOG` /
//! `-v`, `--log-format json`. Root only; each test makes its own namespace
//! and child cgroup.
use std::{path::Path, process::Output};

mod common;

use common::{BIN, STARTUP, sandbox::Sandbox};
use tproxy_lab::{Logged, Tproxy, kernel};

fn sandbox() -> Sandbox {
    Sandbox::new("tpx-cf-")
}

/// Writes `text` to a fresh config file; the directory goes on drop.
fn config_file(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tproxy.yaml");
    std::fs::write(&path, text).unwrap();
    let p = path.display().to_string();
    (dir, p)
}

/// stderr's non-empty lines.
fn stderr_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(String::from)
        .collect()
}

/// Nothing of tproxy's is on the sandbox: no cgroup programs, tc state as
/// `tc_before`, no runtime record.
fn assert_nothing_installed(sb: &Sandbox, tc_before: &str) {
    assert_eq!(kernel::cgroup_programs(sb.cgroup.path()).unwrap(), vec![]);
    assert_eq!(sb.tc_listing(), tc_before);
    assert!(!sb.record_exists(), "runtime record left");
}

/// `tproxy --config FILE` with a bad file: exit 2, one line naming the
/// file, the problem and where it is, nothing installed.
#[test]
fn bad_config_file_gets_one_line_with_its_location_and_leaves_nothing() {
    let sb = sandbox();
    let before = sb.tc_listing();
    let cg = sb.cg();
    for (body, needles) in [
        (
            // Unknown key on line 3.
            format!("iface: eth0\nports: 8000\nproxy_prot: 15001\ncgroup: {cg}\n"),
            &["unknown field `proxy_prot`", "line 3 column 1"][..],
        ),
        (
            // Wrong type on line 2.
            format!("iface: eth0\nports: {{a: 1}}\ncgroup: {cg}\n"),
            &["ports:", "line 2 column 8"][..],
        ),
        (
            // Out of range, named by its key.
            format!("iface: eth0\nports: 8000\ncgroup: {cg}\nproxy_port: 0\n"),
            &["proxy_port:", "port 0", "line 4"][..],
        ),
        (
            format!("iface: eth0\nports: [8000, \"9000-70000\"]\ncgroup: {cg}\n"),
            &["ports:", "above 65535", "line 2"][..],
        ),
        (
            format!("iface: eth0\nports: 8000\ncgroup: {cg}\nproxy_mark: 0\n"),
            &["proxy_mark:", "non-zero", "line 4"][..],
        ),
    ] {
        let (_dir, path) = config_file(&body);
        let out = sb
            .ns
            .command(BIN)
            .args(["--config", &path])
            .output()
            .unwrap();
        let lines = stderr_lines(&out);
        assert_eq!(out.status.code(), Some(2), "{body}: {lines:?}");
        assert_eq!(lines.len(), 1, "{body}: expected one line, got {lines:?}");
        assert!(lines[0].starts_with("tproxy: "), "{lines:?}");
        assert!(
            lines[0].contains(&path),
            "{:?} does not name the file",
            lines[0]
        );
        for n in needles {
            assert!(
                lines[0].contains(n),
                "{:?} does not mention {n:?}",
                lines[0]
            );
        }
        assert_nothing_installed(&sb, &before);
    }

    // No interface anywhere: still the one-line usage error.
    let (_dir, path) = config_file(&format!("ports: 8000\ncgroup: {cg}\n"));
    let out = sb
        .ns
        .command(BIN)
        .args(["--config", &path])
        .output()
        .unwrap();
    let lines = stderr_lines(&out);
    assert_eq!(out.status.code(), Some(2), "{lines:?}");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("-i") && lines[0].contains("iface"),
        "{lines:?}"
    );
    assert_nothing_installed(&sb, &before);
}

/// Started from a file that sets everything, with `--proxy-port` on the
/// command line: the flag wins over the file's `proxy_port`, and the
/// file's other keys (ports as a list, tc_mode, accel) are in force.
#[test]
fn starts_from_a_config_file_and_a_flag_overrides_one_key() {
    let sb = sandbox();
    let before = sb.tc_listing();
    let (_dir, path) = config_file(&format!(
        "iface: eth0\n\
         ports: [8000, \"9000-9001\"]\n\
         cgroup: {}\n\
         proxy_port: 15001\n\
         proxy_mark: \"0x10\"\n\
         accel: false\n\
         tc_mode: netlink\n\
         drain_timeout: 0\n",
        sb.cg()
    ));
    let t = Tproxy::start(
        BIN,
        &sb.ns,
        None,
        &["--config", &path, "--proxy-port", "15002"],
    )
    .unwrap();
    let log = t.log();
    let attached = log
        .lines()
        .find(|l| l.contains("attached") && l.contains("proxy_port="))
        .unwrap_or_else(|| panic!("no 'attached' line:\n{log}"));
    assert!(attached.contains("proxy_port=15002"), "{attached}");
    assert!(attached.contains("ports=8000,9000-9001"), "{attached}");
    assert!(attached.contains("proxy_mark=0x10"), "{attached}");
    assert!(attached.contains("accel=false"), "{attached}");
    let stats = sb.ns.exec(BIN, &["stats", "-i", "eth0", "--json"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(v[0]["iface"], "eth0", "{v}");
    // tc_mode from the file: netlink filters, not TCX links.
    let tc = sb.tc_listing();
    assert!(tc.contains("tproxy_steer"), "{tc}");
    let (status, log) = t.terminate().unwrap();
    assert!(status.success(), "{log}");
    assert_nothing_installed(&sb, &before);
}

/// `--log-format json`: every line of a short run (start, serve, SIGTERM,
/// teardown) is one JSON object with a level and a message.
#[test]
fn log_format_json_gives_one_json_object_per_line() {
    let sb = sandbox();
    let before = sb.tc_listing();
    let t = sb.start(&["--log-format", "json", "--drain-timeout", "0"]);
    let (status, log) = t.terminate().unwrap();
    assert!(status.success(), "{log}");
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 4, "{log}");
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}\nlog:\n{log}"));
        assert!(v["level"].is_string(), "{line}");
        assert!(v["fields"]["message"].is_string(), "{line}");
    }
    // Lifecycle steps at info, detail at debug (TPROXY_LOG=debug here).
    let level_of = |needle: &str| -> String {
        let line = lines
            .iter()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?}:\n{log}"));
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        v["level"].as_str().unwrap().to_string()
    };
    assert_eq!(level_of("serving"), "INFO");
    assert_eq!(level_of("attached sockops"), "DEBUG");
    assert_nothing_installed(&sb, &before);
}

/// Starts tproxy in `sb` with `env` (and no TPROXY_LOG of the lab's) and
/// extra `args`; returns its log after SIGTERM.
fn run_with_env(sb: &Sandbox, env: &[(&str, &str)], args: &[&str]) -> String {
    let cg = sb.cg();
    let mut cmd = sb.ns.command(BIN);
    cmd.args([
        "-i",
        "eth0",
        "-ports",
        "8000",
        "--cgroup",
        &cg,
        "--drain-timeout",
        "0",
    ])
    .args(args)
    .env_remove("TPROXY_LOG")
    .env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut t = Logged::spawn("tproxy", &mut cmd).unwrap();
    t.wait_for("serving", STARTUP).unwrap();
    let (status, log) = t.terminate().unwrap();
    assert!(status.success(), "{log}");
    log
}

/// `-v` raises the default level to debug; `RUST_LOG` wins when set (over
/// `-v` and over `TPROXY_LOG`, which stays as an alias).
#[test]
fn rust_log_and_verbose_set_the_level() {
    let sb = sandbox();
    let debug_line = "attached sockops";
    let plain = run_with_env(&sb, &[], &[]);
    assert!(!plain.contains(debug_line), "{plain}");
    let v = run_with_env(&sb, &[], &["-v"]);
    assert!(v.contains(debug_line), "-v: {v}");
    let rust_log = run_with_env(&sb, &[("RUST_LOG", "debug")], &[]);
    assert!(rust_log.contains(debug_line), "RUST_LOG=debug: {rust_log}");
    let alias = run_with_env(&sb, &[("TPROXY_LOG", "debug")], &[]);
    assert!(alias.contains(debug_line), "TPROXY_LOG=debug: {alias}");
    let wins = run_with_env(
        &sb,
        &[("RUST_LOG", "info"), ("TPROXY_LOG", "debug")],
        &["-v"],
    );
    assert!(!wins.contains(debug_line), "RUST_LOG=info must win: {wins}");
    assert!(wins.contains("serving"), "{wins}");
}

/// A failure deep in netlink keeps its cause chain down to the errno, on
/// the one error line: an `ingress` qdisc on the interface makes adding
/// the clsact qdisc fail (EEXIST with an extack message).
#[test]
fn error_line_carries_the_cause_chain_down_to_the_errno() {
    let sb = sandbox();
    sb.ns
        .exec("tc", &["qdisc", "add", "dev", "eth0", "ingress"])
        .unwrap();
    let before = sb.tc_listing();
    let out = sb
        .command(&["--tc-mode", "netlink"])
        .env_remove("TPROXY_LOG")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let lines = stderr_lines(&out);
    assert_eq!(out.status.code(), Some(1), "{lines:?}");
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert!(line.starts_with("tproxy: "), "{line}");
    assert!(
        line.contains("clsact qdisc") && line.contains("eth0"),
        "{line}"
    );
    assert!(line.contains("Exclusivity flag on"), "{line}");
    // The errno the kernel answered, at the end of the chain.
    assert!(line.ends_with("File exists (os error 17)"), "{line}");
    assert_nothing_installed(&sb, &before);

    // The same in JSON: the error is a JSON line too, for log shippers.
    let out = sb
        .command(&["--tc-mode", "netlink"])
        .args(["--log-format", "json"])
        .env_remove("TPROXY_LOG")
        .output()
        .unwrap();
    let lines = stderr_lines(&out);
    assert_eq!(out.status.code(), Some(1), "{lines:?}");
    let last: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(last["level"], "ERROR", "{last}");
    let msg = last["fields"]["message"].as_str().unwrap();
    assert!(msg.ends_with("File exists (os error 17)"), "{msg}");
    assert_nothing_installed(&sb, &before);
}

/// `examples/tproxy.yaml` is what the README points to: tproxy accepts it
/// (here with the interface and cgroup of the sandbox given as flags).
#[test]
fn the_example_config_runs() {
    let sb = sandbox();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tproxy.yaml");
    let cg = sb.cg();
    let mut t = Tproxy::start(
        BIN,
        &sb.ns,
        None,
        &[
            "--config",
            example.to_str().unwrap(),
            "-i",
            "eth0",
            "--cgroup",
            &cg,
            "--log-format",
            "text",
        ],
    )
    .unwrap();
    assert!(t.proc.is_running());
    let (status, log) = t.terminate().unwrap();
    assert!(status.success(), "{log}");
}
