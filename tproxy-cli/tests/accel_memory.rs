//! A slow reader's memory with and without acceleration (issue 9, item
//! 11). Its own test binary: cargo runs test binaries one after another,
//! so these runs do not share the CPUs with the other acceleration tests,
//! which changed what they measure (the proxy's client-side receive buffer
//! autotunes with how fast the proxy reads, which contention moves; two
//! runs beside the other tests failed today, one at 1.77x; alone
//! 0.63-1.00x).
//! Root only.
mod common;

use std::time::{Duration, Instant};

use common::*;
use tproxy_lab::{Logged, Netns, topology::SERVER_IP};

/// Bytes of TCP memory held by the sockets of `ns`: the sum of `ss -tm`'s
/// skmem `r` (receive queue, redirected bytes included: the kernel charges
/// them to the reader's sk_rmem_alloc) and `w` (send queue).
fn tcp_mem(ns: &Netns) -> (u64, String) {
    let out = ns.exec("ss", &["-Htmni"]).unwrap();
    let total = out
        .split("skmem:(")
        .skip(1)
        .flat_map(|s| s.split(')').next().unwrap_or("").split(','))
        .filter_map(|f| {
            let at = f.find(|c: char| c.is_ascii_digit())?;
            let (name, v) = f.split_at(at);
            matches!(name, "r" | "w").then(|| v.parse::<u64>().ok())?
        })
        .sum();
    (total, out)
}

/// `/proc/net/sockstat`'s TCP `mem` in bytes: host-wide (every namespace and
/// every other test), so reported, not asserted on.
fn sockstat_mem(ns: &Netns) -> u64 {
    let out = ns.exec("cat", &["/proc/net/sockstat"]).unwrap();
    let pages: u64 = out
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| l.split_whitespace().skip_while(|w| *w != "mem").nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    pages * 4096
}

/// A fast writer in the client namespace through `proxy` into the app
/// reading at 20 MB/s (100 MB: about 5 s), with tproxy's `extra` arguments.
/// Samples the server namespace's TCP memory every 50 ms; returns its peak
/// (and the `ss` output at that peak), checks that every byte arrived in
/// order and, with acceleration, that it was used.
fn slow_reader_memory(proxy: Proxy, extra: &[&str]) -> u64 {
    const BYTES: &str = "100000000";
    let lab = Lab::with_app(&["--sink-rate", "20000000"]);
    let _p = lab.proxy(proxy, Steer::Rewrite);
    let _t = lab.tproxy(Steer::Rewrite, extra);
    let server = &lab.topo.server;
    let base_sockstat = sockstat_mem(server);
    let mut cmd = lab.topo.client.command(example("lab-client"));
    cmd.args(["sink", &format!("{SERVER_IP}:8000"), "--bytes", BYTES]);
    let started = Instant::now();
    let mut w = Logged::spawn("lab-client", &mut cmd).unwrap();
    let (mut peak, mut at_peak, mut peak_sockstat) = (0, String::new(), 0);
    while w.proc.is_running() && started.elapsed() < Duration::from_secs(60) {
        let (m, out) = tcp_mem(server);
        if m > peak {
            (peak, at_peak) = (m, out);
        }
        peak_sockstat = peak_sockstat.max(sockstat_mem(server));
        std::thread::sleep(Duration::from_millis(50));
    }
    let st = w.proc.wait_timeout(Duration::from_secs(5)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let log = w.log();
    assert!(st.success(), "{log}");
    assert!(log.contains("errors=0"), "the writer saw errors: {log}");
    assert!(
        log.contains(&format!("reply=sink ok bytes={BYTES}")),
        "{log}"
    );
    let c = &stats(server)["counters"];
    eprintln!(
        "{proxy:?} {extra:?}: peak TCP memory in the server namespace {peak} B \
         (sockstat, host-wide: peak {peak_sockstat} B, {base_sockstat} B before), \
         {:.1} s, fallbacks {} resumed {} redirected {} B; sockets at the peak:\n{at_peak}",
        started.elapsed().as_secs_f64(),
        c["accel_fallbacks"],
        c["accel_resumed"],
        c["msg_redirected_bytes"],
    );
    if !extra.contains(&"--no-accel") {
        assert!(c["msg_redirected_bytes"].as_u64().unwrap() > 0, "{c}");
    }
    peak
}

/// Issue 9, item 11: a fast writer through the proxy into an app reading
/// at 20 MB/s holds no more than 1.5 times the TCP memory (receive and send
/// queues of every socket in the namespace) with default acceleration than
/// without it.
///
/// Medians of seven interleaved runs each, one proxy at a time: one run's
/// peak swings 2.5-3x here either way (HAProxy without acceleration:
/// 5.8-23 MB), with the proxy's client-side receive buffer autotuned high
/// or not; medians of five failed now and then (1.77x once, beside other
/// tests).
fn memory_follows_the_reader(proxy: Proxy) {
    const RUNS: usize = 7;
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (mut plains, mut accels) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        plains.push(slow_reader_memory(proxy, &["--no-accel"]));
        accels.push(slow_reader_memory(proxy, &[]));
    }
    plains.sort_unstable();
    accels.sort_unstable();
    let (plain, accel) = (plains[RUNS / 2], accels[RUNS / 2]);
    eprintln!(
        "{proxy:?}: peak TCP memory (median of {RUNS}) {accel} B accelerated {accels:?}, {plain} B without {plains:?} ({:.2}x)",
        accel as f64 / plain as f64
    );
    assert!(
        accel * 2 <= plain * 3,
        "{proxy:?}: {accel} B accelerated > 1.5 x {plain} B without"
    );
}

#[test]
fn a_slow_reader_costs_no_more_memory_than_without_acceleration_haproxy() {
    memory_follows_the_reader(Proxy::Haproxy);
}

#[test]
fn a_slow_reader_costs_no_more_memory_than_without_acceleration_ours() {
    memory_follows_the_reader(Proxy::Ours);
}
