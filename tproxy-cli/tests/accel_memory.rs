//! A slow reader's memory with and without acceleration (issue 9, item
//! 11), through each proxy. Its own test binary: cargo runs test binaries
//! one after another, so these runs do not share the CPUs with the other
//! acceleration tests, which changed what they measure (the proxy's
//! client-side receive buffer autotunes with how fast the proxy reads,
//! which contention moves).
//! Root only.
mod common;

use std::time::{Duration, Instant};

use common::*;
use tproxy_lab::{Logged, Netns, topology::SERVER_IP};

/// Bytes of TCP memory held by the sockets of `ns`, all of them and those
/// of the proxy<->app leg (either end on the app's `port`): the sum of
/// `ss -tm`'s skmem `r` (receive queue, redirected bytes included: the
/// kernel charges them to the reader's sk_rmem_alloc) and `w` (send queue).
fn tcp_mem(ns: &Netns, port: u16) -> (u64, u64, String) {
    let out = ns.exec("ss", &["-Htmni"]).unwrap();
    let leg_end = format!(":{port}");
    let (mut all, mut leg) = (0, 0);
    // Each socket: a line with its state and addresses, then an indented
    // one with its details (skmem among them).
    let mut head = "";
    for line in out.lines() {
        let Some(skmem) = line.split("skmem:(").nth(1) else {
            if !line.starts_with(char::is_whitespace) {
                head = line;
            }
            continue;
        };
        let m: u64 = skmem
            .split(')')
            .next()
            .unwrap_or("")
            .split(',')
            .filter_map(|f| {
                let at = f.find(|c: char| c.is_ascii_digit())?;
                let (name, v) = f.split_at(at);
                matches!(name, "r" | "w").then(|| v.parse::<u64>().ok())?
            })
            .sum();
        all += m;
        // Local and peer address: the fourth and fifth fields.
        if head
            .split_whitespace()
            .skip(3)
            .take(2)
            .any(|a| a.ends_with(&leg_end))
        {
            leg += m;
        }
    }
    (all, leg, out)
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

/// Peak TCP memory in the server namespace during one run: the proxy<->app
/// leg's sockets and all of them.
#[derive(Clone, Copy)]
struct Peak {
    leg: u64,
    all: u64,
}

/// A fast writer in the client namespace through `proxy` into the app
/// reading at 20 MB/s (100 MB: about 5 s), with tproxy's `extra` arguments.
/// Samples the server namespace's TCP memory every 50 ms; returns its peaks
/// (and prints the `ss` output at the leg's), checks that every byte
/// arrived in order and, with acceleration, that it was used.
fn slow_reader_memory(proxy: Proxy, extra: &[&str]) -> Peak {
    const BYTES: &str = "100000000";
    let port = proxy.stream_port();
    let lab = Lab::with_app(&["--sink-rate", "20000000"]);
    // A ceiling of 4 MiB for autotuned receive buffers (a new namespace
    // copies the host's, 32 MiB here): the proxy's client-side receive
    // buffer autotunes in the connection's first milliseconds to anywhere
    // from 4 MiB to the ceiling, in either mode (Envoy's in the lab:
    // 4.3-32 MiB without acceleration, 4.3-15 MiB with, in five runs
    // each), and that draw outweighed everything measured here: with 32 MiB
    // the totals' ratio swung 0.72-2.17x; with the kernel's default 6 MiB,
    // a CI-like run's medians of seven still came to 1.64x (runs of 6.8-11.3
    // MB against 5.8-10.0 MB, the difference that one socket's queue). At 4
    // MiB every run draws the same.
    lab.topo
        .server
        .exec("sysctl", &["-qw", "net.ipv4.tcp_rmem=4096 131072 4194304"])
        .unwrap();
    let _p = lab.proxy(proxy, Steer::Rewrite);
    let _t = lab.tproxy(Steer::Rewrite, extra);
    let server = &lab.topo.server;
    let base_sockstat = sockstat_mem(server);
    let mut cmd = lab.topo.client.command(example("lab-client"));
    cmd.args(["sink", &format!("{SERVER_IP}:{port}"), "--bytes", BYTES]);
    let started = Instant::now();
    let mut w = Logged::spawn("lab-client", &mut cmd).unwrap();
    let mut peak = Peak { leg: 0, all: 0 };
    let (mut at_peak, mut peak_sockstat) = (String::new(), 0);
    while w.proc.is_running() && started.elapsed() < Duration::from_secs(300) {
        let (all, leg, out) = tcp_mem(server, port);
        if leg > peak.leg {
            (peak.leg, at_peak) = (leg, out);
        }
        peak.all = peak.all.max(all);
        peak_sockstat = peak_sockstat.max(sockstat_mem(server));
        std::thread::sleep(Duration::from_millis(50));
    }
    let st = w.wait_timeout(Duration::from_secs(120)).unwrap();
    let log = w.log();
    assert!(st.success(), "{log}");
    assert!(log.contains("errors=0"), "the writer saw errors: {log}");
    assert!(
        log.contains(&format!("reply=sink ok bytes={BYTES}")),
        "{log}"
    );
    let c = &stats(server)["counters"];
    eprintln!(
        "{proxy:?} {extra:?}: peak TCP memory in the server namespace: proxy<->app leg {} B, \
         all sockets {} B (sockstat, host-wide: peak {peak_sockstat} B, {base_sockstat} B before), \
         {:.1} s, fallbacks {} resumed {} left {} redirected {} B; sockets at the leg's peak:\n{at_peak}",
        peak.leg,
        peak.all,
        started.elapsed().as_secs_f64(),
        c["accel_fallbacks"],
        c["accel_resumed"],
        c["accel_left"],
        c["msg_redirected_bytes"],
    );
    if !extra.contains(&"--no-accel") {
        assert!(c["msg_redirected_bytes"].as_u64().unwrap() > 0, "{c}");
    }
    peak
}

/// Medians of `runs` peaks, one field at a time.
fn median(runs: &[Peak], field: fn(&Peak) -> u64) -> (u64, Vec<u64>) {
    let mut v: Vec<u64> = runs.iter().map(field).collect();
    v.sort_unstable();
    (v[v.len() / 2], v)
}

/// Issue 9, item 11: a fast writer through the proxy into an app reading
/// at 20 MB/s holds no more than 1.5 times the TCP memory with default
/// acceleration than without it, both on the leg acceleration replaces
/// (the receive and send queues of the proxy's upstream socket and the
/// app's: redirected bytes are charged to the app's socket) and over every
/// socket in the namespace.
///
/// Why the leg on its own: it is where an unbounded redirect would pile
/// up, and it is free of the proxy's client-side receive queue, which the
/// redirect does not touch and whose autotuned size is the noisiest part
/// of the total even under the 6 MiB ceiling it once had (in one suite, the
/// three proxies' ratios of medians: 0.88-1.22x on totals, 1.00-1.05x on
/// legs). With the host's 32 MiB ceiling the ratio on totals swung
/// 0.72-2.17x between suites with nothing changed, while the legs stayed
/// at 1.00-1.05x.
///
/// Medians of seven interleaved runs each, one proxy at a time.
fn memory_follows_the_reader(proxy: Proxy) {
    const RUNS: usize = 7;
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (mut plains, mut accels) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        plains.push(slow_reader_memory(proxy, &["--no-accel"]));
        accels.push(slow_reader_memory(proxy, &[]));
    }
    for (what, field, times) in [
        (
            "the proxy<->app leg",
            (|p: &Peak| p.leg) as fn(&Peak) -> u64,
            1.5,
        ),
        ("all sockets", |p: &Peak| p.all, 1.5),
    ] {
        let (accel, accels) = median(&accels, field);
        let (plain, plains) = median(&plains, field);
        assert!(
            plain > 0,
            "{proxy:?}: {what}: no TCP memory seen without acceleration"
        );
        let ratio = accel as f64 / plain as f64;
        eprintln!(
            "{proxy:?}: peak TCP memory of {what} (median of {RUNS}) {accel} B accelerated \
             {accels:?}, {plain} B without {plains:?} ({ratio:.2}x)"
        );
        assert!(
            ratio <= times,
            "{proxy:?}: {what}: {accel} B accelerated > {times} x {plain} B without"
        );
    }
}

#[test]
fn a_slow_reader_costs_no_more_memory_than_without_acceleration_haproxy() {
    memory_follows_the_reader(Proxy::Haproxy);
}

#[test]
fn a_slow_reader_costs_no_more_memory_than_without_acceleration_ours() {
    memory_follows_the_reader(Proxy::Ours);
}

#[test]
fn a_slow_reader_costs_no_more_memory_than_without_acceleration_envoy() {
    memory_follows_the_reader(Proxy::Envoy);
}
