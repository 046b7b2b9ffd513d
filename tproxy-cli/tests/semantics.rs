//! Acceleration is invisible: every scenario of `sem-probe` (an app
//! reading or writing in an unusual way: MSG_WAITALL, MSG_OOB, splice,
//! zerocopy, SO_RCVLOWAT, TCP_INQ, close with unread data, ...) runs on an
//! accelerated connection and on a plain one, through our proxy, HAProxy
//! and Envoy, and the app's and the client's observations must be the
//! same. One tproxy run serves both: `--accel-ports` accelerates one of
//! its two ports. The few differences this kernel leaves (docs/
//! how-it-works.md, "What acceleration changes") are checked to be
//! exactly the documented ones. Root only.
mod common;

use std::{collections::BTreeMap, time::Duration};

use common::*;
use tproxy_lab::{Logged, topology::*};

/// The app's ports: the first accelerated, the second plain TCP. Not the
/// lab app's.
const ACCEL: u16 = 7100;
const PLAIN: u16 = 7101;

fn scenarios() -> Vec<String> {
    let out = std::process::Command::new(example("sem-probe"))
        .arg("list")
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.split('\t').next().unwrap().to_string())
        // SEM_ONLY=a,b: only those (while working on one).
        .filter(|s| std::env::var("SEM_ONLY").map_or(true, |o| o.split(',').any(|x| x == s)))
        .collect()
}

/// What one connection showed: the app's side and the client's.
#[derive(Debug, PartialEq, Clone)]
struct Seen {
    app: String,
    client: String,
}

/// Runs scenario `s` once on each port, IPv4 or IPv6.
fn observe(lab: &Lab, s: &str, v6: bool) -> [Seen; 2] {
    let mut cmd = lab
        .topo
        .server
        .command_in(example("sem-probe"), Some(&lab.topo.cgroup));
    cmd.args([
        "app",
        "--ports",
        &format!("{ACCEL},{PLAIN}"),
        "--scenario",
        s,
    ]);
    let mut app = Logged::spawn("sem-app", &mut cmd).unwrap();
    app.wait_for("listening", STARTUP).unwrap();
    let ip = if v6 { SERVER_IP6 } else { SERVER_IP };
    let seen = [ACCEL, PLAIN].map(|port| {
        let dst = addr(ip, port).to_string();
        let out = lab
            .topo
            .client
            .command(example("sem-probe"))
            .args(["client", "--dst", &dst, "--scenario", s])
            .output()
            .unwrap();
        let client = String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("obs ").map(str::to_string))
            .unwrap_or_else(|| format!("none: {}", String::from_utf8_lossy(&out.stderr)));
        let prefix = format!("obs {port} ");
        let app = app
            .wait_for(&prefix, Duration::from_secs(60))
            .map(|l| l[l.find(&prefix).unwrap() + prefix.len()..].to_string())
            .unwrap_or_else(|e| format!("none: {e}"));
        Seen { app, client }
    });
    let _ = app.wait_timeout(Duration::from_secs(30));
    seen
}

/// The bytes of a run of `N:"text"` observations, run together.
fn bytes(fields: &[String]) -> String {
    fields
        .iter()
        .map(|f| f.split_once(':').map_or("", |x| x.1).trim_matches('"'))
        .collect()
}

/// The differences this kernel leaves, each checked to be exactly the one
/// documented: `Ok` if `accel` is `plain` or differs only that way.
fn documented(s: &str, plain: &Seen, accel: &Seen) -> Option<Result<(), String>> {
    let fields = |o: &str| o.split(" | ").map(str::to_string).collect::<Vec<_>>();
    let (p, a) = (fields(&plain.app), fields(&accel.app));
    let check = |ok: bool, what: &str| {
        if ok { Ok(()) } else { Err(what.to_string()) }
    };
    Some(match s {
        // FIONREAD counts only the bytes of one path (6.18: redirected
        // ones, tcp_bpf_ioctl; before: TCP's), and a reader's first bytes
        // come by TCP: it can read low. The bytes read are the same.
        "r-fionread" => check(
            a.len() == 2 && a[1] == p[1] && plain.client == accel.client,
            "FIONREAD aside, the same bytes",
        ),
        // A reader that made plain reads, then MSG_WAITALL: that first
        // MSG_WAITALL returns what was queued (tcp_bpf_recvmsg); the pair
        // leaves the fast path, and the next one waits for all it asked.
        "r-read-then-waitall" => check(
            a[..3] == p[..3]
                && bytes(&p).starts_with(&bytes(&a))
                && a.last().is_some_and(|l| l.starts_with("10:")),
            "the same stream, the last MSG_WAITALL whole",
        ),
        // A reader that switches from recvmsg to splice(2) with redirected
        // bytes queued: tcp_splice_read does not see them.
        "r-read-then-splice-later" => check(
            a[0] == p[0] && accel.client.contains("exact=false"),
            "splice missing the redirected bytes",
        ),
        // MSG_OOB on a send that is redirected: the urgent byte arrives
        // inline (no hook sees a send's flags before sk_msg on a kernel
        // without BPF tracing programs).
        // (Also on the connection's first sends, when the proxy read the
        // first byte before the urgent one was sent.) What the proxy does
        // with urgent data on plain TCP differs too: HAProxy resets both
        // ends, at times, Envoy and ours drop the byte; so only the app's
        // sends are compared, and that the client got x, xz (the byte
        // dropped), or xYz (inline), never anything else.
        // Where the kernel has fentry, the send hook sees MSG_OOB first and
        // the send goes by TCP: never inline (what the proxy then makes of
        // the urgent byte varies, as below).
        "w-oob" | "w-oob-later" if kernel_caps().send_hook => check(
            a[..a.len() - 1] == p[..p.len() - 1]
                && ["1:\"x\"", "2:\"xz\""]
                    .iter()
                    .any(|got| accel.client.ends_with(got)),
            "what the proxy made of urgent data, never inline",
        ),
        "w-oob" | "w-oob-later" => check(
            a[..a.len() - 1] == p[..p.len() - 1]
                && ["1:\"x\"", "2:\"xz\"", "3:\"xYz\""]
                    .iter()
                    .any(|got| accel.client.ends_with(got)),
            "the urgent byte inline",
        ),
        // The client's urgent byte meets the proxy, not the app: ours and
        // Envoy drop it from the stream, HAProxy at times resets both ends;
        // either way, with acceleration or not.
        "r-oobinline" => check(
            a[0] == p[0]
                && ["2:\"xz\"", "1:\"x\"", "ECONNRESET", "0:\"\""]
                    .iter()
                    .any(|got| accel.app.ends_with(got)),
            "what the proxy made of urgent data",
        ),
        _ => return None,
    })
}

/// A tproxy run on the lab, `ACCEL` accelerated and `PLAIN` not.
fn start(lab: &Lab) -> Logged {
    let cg = lab.cg();
    let ports = format!("{ACCEL},{PLAIN}");
    let accel = ACCEL.to_string();
    let args = [
        "-i",
        "eth0",
        "-ports",
        &ports,
        "--accel-ports",
        &accel,
        "--cgroup",
        &cg,
    ];
    Logged::start(BIN, &lab.topo.server, None, &args).unwrap()
}

fn equivalence(proxy: Proxy) {
    let lab = Lab::new();
    let _p = lab.proxy(proxy, Steer::Rewrite);
    let _t = start(&lab);
    let mut results = BTreeMap::new();
    for (i, s) in scenarios().iter().enumerate() {
        let [a, p] = observe(&lab, s, i % 2 == 1);
        eprintln!("{s}\n  plain: {p:?}\n  accel: {a:?}");
        results.insert(s.clone(), (p, a));
    }
    let c = stats(&lab.topo.server)["counters"].clone();
    eprintln!("counters: {c}");
    let mut wrong = Vec::new();
    for (s, (p, a)) in &results {
        match documented(s, p, a) {
            None if p == a => {}
            None => wrong.push(format!("{s}: differs")),
            Some(Ok(())) if p == a => eprintln!("{s}: the documented difference did not show"),
            Some(Ok(())) => eprintln!("{s}: differs as documented"),
            Some(Err(what)) => wrong.push(format!("{s}: not only {what}")),
        }
    }
    assert!(wrong.is_empty(), "{proxy:?}: {wrong:?}");
    // Every scenario's connection on the accelerated port was paired, and
    // none on the other.
    let n = results.len() as u64;
    assert_eq!(c["accel_pairs_app"].as_u64().unwrap(), n, "{c}");
    assert_eq!(c["sockhash_inserted"].as_u64().unwrap(), 2 * n, "{c}");
}

#[test]
fn an_app_cannot_tell_acceleration_through_our_proxy() {
    equivalence(Proxy::Ours);
}

#[test]
fn an_app_cannot_tell_acceleration_through_haproxy() {
    equivalence(Proxy::Haproxy);
}

#[test]
fn an_app_cannot_tell_acceleration_through_envoy() {
    equivalence(Proxy::Envoy);
}

/// A send that opens a TLS handshake record takes its pair off the fast
/// path before any of it is redirected: the app may turn kTLS on next,
/// with the peer's first records already queued, and kTLS reads redirected
/// bytes without decrypting them (the guests' kernels, which have kTLS,
/// show that in `r-starttls-ktls` above; this kernel has no CONFIG_TLS).
/// The pair was on the fast path just before: the second plain round
/// ("hello", "hi") is redirected, and not one byte after it.
#[test]
fn a_tls_handshake_leaves_the_fast_path_before_its_first_byte() {
    let lab = Lab::new();
    let _p = lab.proxy(Proxy::Ours, Steer::Rewrite);
    let _t = start(&lab);
    let [a, p] = observe(&lab, "r-starttls-ktls", false);
    assert_eq!(a, p);
    let c = stats(&lab.topo.server)["counters"].clone();
    assert_eq!(
        c["msg_redirected_bytes"].as_u64().unwrap(),
        "hello".len() as u64 + "hi".len() as u64,
        "{a:?}\n{c}"
    );
    assert!(c["accel_api_retired"].as_u64().unwrap() >= 1, "{c}");
}
