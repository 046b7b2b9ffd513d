//! The flow table under attack and at the edges of a connection's life,
//! held to conntrack's promises: a SYN flood evicts no live flow, a blind
//! RST ends nothing, a closed flow lingers for retransmitted FINs and
//! TIME_WAIT ACKs, drain counts only live flows, and a newcomer reusing a
//! client port never breaks the connection that holds it. In the lab's
//! namespaces, with forged packets from raw sockets. Root only.
mod common;

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, TcpStream},
    time::{Duration, Instant},
};

use common::*;
use tproxy_examples::Stream;
use tproxy_lab::{Logged, Netns, topology::*};

/// Runs `lab-client ARGS…` in `ns` to completion; its output.
fn lab_client(ns: &Netns, args: &[&str]) -> String {
    ns.exec(&example("lab-client"), args)
        .unwrap_or_else(|e| panic!("lab-client {args:?}: {e:#}"))
}

/// Sends a line and reads the app's banner and the echo of that line.
fn ping(c: &mut TcpStream, line: &str) -> std::io::Result<String> {
    c.write_all(line.as_bytes())?;
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(line.as_bytes()) {
        c.read_exact(&mut b)?;
        got.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&got).into_owned())
}

/// Writes `SINK <seed>` and `bytes` of the seeded stream to the app's slow
/// reader; its verdict (`sink ok bytes=N` when every byte arrived in order).
/// Half way, it says so on `halfway` and waits for a word on `go` before
/// writing the rest: the transfer is under way, whatever the machine's
/// speed, until the test lets it end.
fn sink_through(
    mut c: TcpStream,
    bytes: usize,
    seed: u64,
    halfway: std::sync::mpsc::Sender<()>,
    go: std::sync::mpsc::Receiver<()>,
) -> Result<String, String> {
    c.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    c.set_write_timeout(Some(Duration::from_secs(300))).unwrap();
    c.write_all(format!("SINK {seed}\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut data = Stream::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent = 0;
    let mut paused = false;
    while sent < bytes {
        if !paused && sent >= bytes / 2 {
            paused = true;
            let _ = halfway.send(());
            go.recv()
                .map_err(|_| "the test never let the transfer go on")?;
        }
        let n = buf.len().min(bytes - sent);
        data.fill(&mut buf[..n]);
        c.write_all(&buf[..n])
            .map_err(|e| format!("write after {sent} bytes: {e}"))?;
        sent += n;
    }
    c.shutdown(Shutdown::Write).unwrap();
    let mut reply = String::new();
    c.read_to_string(&mut reply)
        .map_err(|e| format!("reading the verdict: {e}"))?;
    Ok(reply.trim().to_string())
}

/// 200,000 spoofed SYNs with random sources to the intercepted port, while
/// a slow byte-exact transfer runs (half written before the flood, half
/// after: it is under way throughout) and a keep-alive connection idles:
/// both survive, and a new connection still works.
#[test]
fn a_syn_flood_evicts_no_live_flow() {
    let lab = Lab::new(); // the app's sink reads at 1 MiB/s
    let _p = lab.proxy(Proxy::Ours, Steer::Rewrite);
    let _t = lab.tproxy(Steer::Rewrite, &[]);
    // Forged sources come from 198.18.0.0/15: the gateway must forward them.
    lab.topo
        .gateway
        .exec(
            "sysctl",
            &[
                "-qw",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.eth0.rp_filter=0",
            ],
        )
        .unwrap();
    let client = &lab.topo.client;
    let dst = addr(SERVER_IP, 8000);
    let (verdict, idle_after, fresh) = client.run(|| {
        std::thread::scope(|s| {
            let mut idle = TcpStream::connect_timeout(&dst, Duration::from_secs(5)).unwrap();
            idle.set_read_timeout(Some(Duration::from_secs(60)))
                .unwrap();
            ping(&mut idle, "before\n").unwrap();
            let long = TcpStream::connect_timeout(&dst, Duration::from_secs(5)).unwrap();
            let (halfway_tx, halfway) = std::sync::mpsc::channel();
            let (go, go_rx) = std::sync::mpsc::channel();
            let transfer = s.spawn(move || sink_through(long, 6 << 20, 9, halfway_tx, go_rx));
            halfway.recv().expect("the transfer broke before half way");
            // Seconds; the limit only ends a flood that cannot finish.
            let out = lab_client(
                &lab.topo.client,
                &[
                    "synflood",
                    "192.168.178.10:8000",
                    "--count",
                    "200000",
                    "--seconds",
                    "300",
                ],
            );
            eprintln!("flood: {out}");
            let _ = go.send(());
            assert!(out.starts_with("sent 200000 "), "{out}");
            let idle_after = ping(&mut idle, "after\n");
            let fresh = exchange(dst, b"fresh\n");
            (transfer.join().unwrap(), idle_after, fresh)
        })
    });
    let c = &stats(&lab.topo.server)["counters"];
    eprintln!("counters after the flood: {c}");
    assert_eq!(
        verdict,
        Ok(format!("sink ok bytes={}", 6 << 20)),
        "the transfer broke"
    );
    let idle_after = idle_after.expect("the idle keep-alive connection broke");
    assert!(idle_after.ends_with("after\n"), "{idle_after}");
    let fresh = fresh.expect("a new connection after the flood failed");
    assert_eq!(
        (fresh.port, fresh.echoed.as_slice()),
        (8000, &b"fresh\n"[..])
    );
    assert!(c["ingress_steered"].as_u64().unwrap() >= 200_000, "{c}");
}

/// The client's address and port of a connection (for forging its packets).
fn from(c: &TcpStream) -> String {
    c.local_addr().unwrap().to_string()
}

/// RSTs with the right 4-tuple and a wrong sequence number, during a
/// transfer (half written before them, half after) and on an idle
/// connection: the kernel's TCP on the proxy's socket ignores them, and so
/// must the flow table.
#[test]
fn a_blind_rst_ends_nothing() {
    let lab = Lab::new();
    let _p = lab.proxy(Proxy::Ours, Steer::Rewrite);
    let _t = lab.tproxy(Steer::Rewrite, &[]);
    let dst = addr(SERVER_IP, 8000);
    let (verdict, idle_after) = lab.topo.client.run(|| {
        std::thread::scope(|s| {
            let mut idle = TcpStream::connect_timeout(&dst, Duration::from_secs(5)).unwrap();
            idle.set_read_timeout(Some(Duration::from_secs(60)))
                .unwrap();
            ping(&mut idle, "before\n").unwrap();
            let long = TcpStream::connect_timeout(&dst, Duration::from_secs(5)).unwrap();
            let long_from = from(&long);
            let (halfway_tx, halfway) = std::sync::mpsc::channel();
            let (go, go_rx) = std::sync::mpsc::channel();
            let transfer = s.spawn(move || sink_through(long, 3 << 20, 4, halfway_tx, go_rx));
            halfway.recv().expect("the transfer broke before half way");
            for (who, seq) in [
                (&long_from, "7"),
                (&from(&idle), "7"),
                (&long_from, "2147483648"),
            ] {
                lab_client(
                    &lab.topo.client,
                    &[
                        "forge",
                        "192.168.178.10:8000",
                        "--from",
                        who,
                        "--flags",
                        "rst",
                        "--seq",
                        seq,
                    ],
                );
            }
            // The RSTs went out before these bytes, on the same path.
            let idle_after = ping(&mut idle, "after\n");
            let _ = go.send(());
            (transfer.join().unwrap(), idle_after)
        })
    });
    assert_eq!(
        verdict,
        Ok(format!("sink ok bytes={}", 3 << 20)),
        "a blind RST broke the transfer"
    );
    let idle_after = idle_after.expect("a blind RST broke the idle connection");
    assert!(idle_after.ends_with("after\n"), "{idle_after}");
}

/// Captures TCP from the server in the client namespace while `f` runs,
/// until a captured line contains `until` (or 120 s): tcpdump's lines.
/// Started once tcpdump says it listens (its filter is attached then).
fn capture(ns: &Netns, until: &str, f: impl FnOnce()) -> String {
    let mut cmd = ns.command("tcpdump");
    cmd.args([
        "-i",
        "eth0",
        "-n",
        "-l",
        "-U",
        "tcp and src host 192.168.178.10",
    ]);
    let mut dump = Logged::spawn("tcpdump", &mut cmd).unwrap();
    dump.wait_for("listening on", STARTUP)
        .unwrap_or_else(|e| panic!("tcpdump: {e}"));
    f();
    let _ = dump.wait_for(until, Duration::from_secs(120));
    let (_, log) = dump.terminate().unwrap();
    log
}

/// The proxy closes first and sits in TIME_WAIT; a FIN the client
/// retransmits then gets the TIME_WAIT's ACK, which must leave with the
/// port the client dialled (8000), never the proxy's own (15006).
#[test]
fn a_retransmitted_fin_after_close_is_answered_from_the_dialled_port() {
    let lab = Lab::new();
    let _p = lab.proxy(Proxy::Ours, Steer::Rewrite);
    let _t = lab.tproxy(Steer::Rewrite, &[]);
    let client = &lab.topo.client;
    let who = client.run(|| {
        let mut c =
            TcpStream::connect_timeout(&addr(SERVER_IP, 8000), Duration::from_secs(5)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let who = from(&c);
        // The app sends 100 bytes and closes: the proxy then closes
        // towards us first, and our close after it puts it in TIME_WAIT.
        c.write_all(b"SEND 100\n").unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), 100);
        drop(c);
        who
    });
    let port = who.rsplit_once(':').unwrap().1.to_string();
    eventually(
        "the proxy's socket in TIME_WAIT",
        Duration::from_secs(60),
        || {
            let out = lab
                .topo
                .server
                .exec("ss", &["-Htan", "state", "time-wait"])
                .unwrap();
            out.contains(&format!("{CLIENT_IP}:{port}"))
        },
    );
    // Whatever answers the FIN comes to the client's port.
    let seen = capture(client, &format!("> {CLIENT_IP}.{port}:"), || {
        lab_client(
            client,
            &[
                "forge",
                "192.168.178.10:8000",
                "--from",
                &who,
                "--flags",
                "fin",
                "--seq",
                "1",
                "--ack",
                "1",
            ],
        );
    });
    eprintln!("{seen}");
    let to_us = |sport: &str, flags: &str| {
        seen.lines()
            .filter(|l| l.contains(&format!("192.168.178.10.{sport} > {CLIENT_IP}.{port}:")))
            .filter(|l| l.contains(flags))
            .count()
    };
    assert_eq!(
        to_us("15006", ""),
        0,
        "the proxy's port leaked to the client:\n{seen}"
    );
    // Not the app's kernel refusing a segment it has no socket for.
    assert_eq!(
        to_us("8000", "Flags [R"),
        0,
        "the FIN reached the app, not the proxy:\n{seen}"
    );
    assert!(
        to_us("8000", "Flags [.]") >= 1,
        "no TIME_WAIT ACK for the retransmitted FIN:\n{seen}"
    );
}

/// A connection whose client went silent still holds its entry (the
/// proxy's socket is open), but drain counts only flows seen lately, so
/// SIGTERM does not wait out the whole --drain-timeout for it.
#[test]
fn drain_does_not_wait_for_a_silent_client() {
    let lab = Lab::new();
    let _p = lab.proxy(Proxy::Ours, Steer::Rewrite);
    let t = lab.tproxy(Steer::Rewrite, &["--drain-timeout", "30"]);
    let client = &lab.topo.client;
    let _silent = client.run(|| {
        let mut c =
            TcpStream::connect_timeout(&addr(SERVER_IP, 8000), Duration::from_secs(5)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        ping(&mut c, "hello\n").unwrap();
        c
    });
    // The client vanishes: its packets no longer reach the server.
    client.ip(&["link", "set", "eth0", "down"]).unwrap();
    let st = stats(&lab.topo.server);
    assert_eq!(st["flows"], 1, "{st}");
    // Idle once no packet came for FLOW_ACTIVE_NS (10 s).
    eventually("the silent flow idle", Duration::from_secs(120), || {
        stats(&lab.topo.server)["flows_active"] == 0
    });
    let st = stats(&lab.topo.server);
    eprintln!("after the silence: {st}");
    assert_eq!(st["flows"], 1, "the proxy's socket is still open: {st}");
    let started = Instant::now();
    let (status, log) = t.terminate().unwrap();
    assert!(status.success(), "{log}");
    eprintln!("SIGTERM to exit: {:?}", started.elapsed());
    // It did not drain at all: it says it cut no active flow and left the
    // idle one, instead of "draining 1 active steered flow" (which would
    // hold it for the 30 s --drain-timeout). The log, not the time it
    // took: a busy machine may take seconds to detach.
    assert!(
        log.contains("detaching (0 active steered flow(s) cut; 1 idle)"),
        "{log}"
    );
    assert!(!log.contains("draining"), "{log}");
}

/// Two connections from one client port: A to 8000, half-closed while the
/// app still sends; B to 8080 while A lives. Rewritten to the proxy they
/// would be one 4-tuple, so B is held off (its SYNs dropped and counted)
/// until A is gone, then served; A is never broken. With the tproxy
/// back-end the proxy's sockets differ and B is served at once. A's reader
/// stops after its first mebibyte and reads on only once B has been held
/// off (or, with the tproxy back-end, served): A lives until then however
/// slow the machine. Returns the counters and B's SYN retransmissions.
fn port_reuse(steer: Steer, half_close: bool) -> (serde_json::Value, u32) {
    let lab = Lab::new();
    let _p = lab.proxy(Proxy::Ours, steer);
    let _t = lab.tproxy(steer, &[]);
    const A_BYTES: usize = 16 << 20;
    let local = addr(CLIENT_IP, 45000);
    let server = &lab.topo.server;
    let (a, b) = lab.topo.client.run(|| {
        std::thread::scope(|s| {
            let mut a = connect_from(local, addr(SERVER_IP, 8000), Duration::from_secs(5)).unwrap();
            a.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
            a.write_all(format!("SEND {A_BYTES}\n").as_bytes()).unwrap();
            if half_close {
                a.shutdown(Shutdown::Write).unwrap();
            }
            let (first_tx, first_rx) = std::sync::mpsc::channel::<()>();
            let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
            let reader = s.spawn(move || -> Result<usize, String> {
                let mut check = Stream::new(A_BYTES as u64);
                let mut buf = vec![0u8; 64 * 1024];
                let mut got = 0;
                let mut told = false;
                loop {
                    if !told && got >= 1 << 20 {
                        told = true;
                        let _ = first_tx.send(());
                        go_rx.recv().map_err(|_| "never told to read on")?;
                    }
                    let n = a
                        .read(&mut buf)
                        .map_err(|e| format!("A broke after {got} bytes: {e}"))?;
                    if n == 0 {
                        return Ok(got);
                    }
                    if let Some(off) = check.check(&buf[..n]) {
                        return Err(format!("A: byte {} differs", got + off));
                    }
                    got += n;
                }
            });
            first_rx.recv().expect("A broke in its first mebibyte");
            let collisions = || counter(server, "steer_collisions");
            let before = collisions();
            let b = s.spawn(move || {
                connect_from(local, addr(SERVER_IP, 8080), Duration::from_secs(120)).map(|mut b| {
                    let retrans = syn_retransmissions(&b);
                    (ping(&mut b, "B\n"), retrans)
                })
            });
            // B is held off (a SYN of it dropped), or served at once.
            eventually("B held off or served", Duration::from_secs(120), || {
                collisions() > before || b.is_finished()
            });
            let _ = go_tx.send(());
            (reader.join().unwrap(), b.join().unwrap())
        })
    });
    eprintln!("{steer:?}: A {a:?}, B {b:?}");
    assert_eq!(
        a,
        Ok(A_BYTES),
        "the older connection was broken by the newcomer"
    );
    let (line, retrans) = b.expect("the newcomer was never served");
    let line = line.expect("the newcomer's exchange failed");
    assert!(line.starts_with("app port=8080 "), "{line}");
    let c = stats(server)["counters"].clone();
    eprintln!("{steer:?}: B connected after {retrans} SYN retransmission(s); counters {c}");
    (c, retrans)
}

#[test]
fn a_newcomer_on_a_reused_client_port_never_breaks_the_live_flow() {
    let (c, retrans) = port_reuse(Steer::Rewrite, true);
    assert!(
        c["steer_collisions"].as_u64().unwrap() >= 1,
        "B was not held off: {c}"
    );
    assert!(retrans >= 1, "B got through on its first SYN: {c}");
}

#[test]
fn reused_client_ports_do_not_collide_with_the_tproxy_backend() {
    // A still open both ways: no FIN has been seen on its flow.
    let (c, retrans) = port_reuse(Steer::Tproxy, false);
    assert_eq!(c["steer_collisions"], 0, "{c}");
    // Served on its first SYN, not after a retransmission (its socket
    // counts them; a bound on the time said the same on an idle machine).
    assert_eq!(retrans, 0, "B's SYN was retransmitted: {c}");
}

/// While tproxy drains (SIGTERM with a steered connection still active),
/// no new connection reaches the app around the proxy: every SYN to the
/// intercepted port is dropped and counted (`syns_refused_draining`), so
/// the client's attempts time out; the connection being drained keeps
/// flowing. Once tproxy has exited nothing steers: a connection reaches the
/// app directly (docs/fail-closed.md has the rule that keeps it closed).
#[test]
fn while_draining_no_new_connection_reaches_the_app() {
    let lab = Lab::new();
    let _p = lab.proxy(Proxy::Ours, Steer::Rewrite);
    // A drain longer than the test needs, however slow: it ends when the
    // held connection closes.
    let mut t = lab.tproxy(Steer::Rewrite, &["--drain-timeout", "900"]);
    let client = &lab.topo.client;
    let dst = addr(SERVER_IP, 8000);
    let mut held = client.run(|| {
        let c = TcpStream::connect_timeout(&dst, Duration::from_secs(5)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        c
    });
    // Through the proxy: the app sees the proxy's address, not ours.
    let banner = ping(&mut held, "before\n").unwrap();
    assert!(banner.contains(&format!("peer={SERVER_IP}:")), "{banner}");
    t.proc.signal(libc::SIGTERM);
    t.wait_for("draining 1 active steered flow", Duration::from_secs(120))
        .unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let progress = Progress::default();
    let (attempts, during) = client.run(|| {
        std::thread::scope(|s| {
            let h = s
                .spawn(|| Attempts::run_watched(dst, Duration::from_millis(300), &stop, &progress));
            // The drained connection keeps talking (and so keeps the drain
            // going, however long the attempts take) until at least three
            // attempts were refused, and five times at least.
            let mut during = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(300);
            while during.len() < 5 || progress.refused() < 3 {
                assert!(Instant::now() < deadline, "too few attempts: {progress:?}");
                std::thread::sleep(Duration::from_millis(500));
                let i = during.len();
                during.push(ping(&mut held, &format!("during {i}\n")));
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            (h.join().unwrap(), during)
        })
    });
    eprintln!("attempts while draining: {attempts:?}");
    // Still draining all along: the attempts were made during the drain.
    assert!(t.proc.is_running(), "tproxy exited early:\n{}", t.log());
    assert!(!t.log().contains("drained"), "{}", t.log());
    let refused = counter(&lab.topo.server, "syns_refused_draining");
    eprintln!("syns_refused_draining={refused}");
    assert_eq!(
        attempts.direct(SERVER_IP),
        Vec::<std::net::IpAddr>::new(),
        "new connections reached the app around the proxy while draining: {attempts:?}"
    );
    // Refused: not even a handshake with the app's listener.
    assert_eq!(
        attempts.broken,
        Vec::<String>::new(),
        "connections were made while draining"
    );
    assert!(
        attempts.refused.len() >= 3,
        "too few attempts were refused: {attempts:?}"
    );
    assert!(
        refused >= attempts.refused.len() as u64,
        "{refused} SYNs counted as refused for {} refused attempts",
        attempts.refused.len()
    );
    // The drained connection was never cut.
    for (i, line) in during.into_iter().enumerate() {
        let line = line.unwrap_or_else(|e| panic!("the drained connection broke: {e}"));
        assert!(line.ends_with(&format!("during {i}\n")), "{line}");
    }
    drop(held);
    let st = t.proc.wait_timeout(Duration::from_secs(120)).unwrap();
    assert!(st.success(), "{}", t.log());
    // Exited: nothing steers any more; the app answers the client itself.
    let after = client.run(|| exchange(dst, b"after\n")).unwrap();
    assert_eq!(after.peer.to_string(), CLIENT_IP, "{after:?}");
}
