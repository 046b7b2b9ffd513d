//! Fail closed, in the lab's namespaces: raw packets from the client
//! namespace (`lab-client forge` / `handshake`) across the gateway to the
//! server, where tproxy's tc ingress program must either steer a SYN to
//! the proxy or drop it: never let it reach the app around the proxy.
//! Packet by packet the same cases are in `tc_programs.rs`; here the
//! kernel on the other side shows what the app would have done with them
//! (a SYN-ACK, a RST), and a connection that was open before tproxy
//! attached keeps working (PRIOR_FLOWS). Root only.
mod common;

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    time::Duration,
};

use common::*;
use tproxy_examples::Stream;
use tproxy_lab::{Logged, Netns, topology::*};

/// Runs `lab-client ARGS…` in `ns` to completion; its output.
fn lab_client(ns: &Netns, args: &[&str]) -> String {
    ns.exec(&example("lab-client"), args)
        .unwrap_or_else(|e| panic!("lab-client {args:?}: {e:#}"))
}

/// The `reply …` lines of a `forge --listen-ms` run, checked against its
/// closing `replies N`.
fn replies(out: &str) -> Vec<String> {
    let r: Vec<String> = out
        .lines()
        .filter(|l| l.starts_with("reply "))
        .map(str::to_string)
        .collect();
    assert!(
        out.lines().any(|l| l == format!("replies {}", r.len())),
        "{out}"
    );
    r
}

/// The instance's counters.
fn counters(ns: &Netns) -> serde_json::Value {
    stats(ns)["counters"].clone()
}

/// How much counter `name` rose from `before` to `after`.
fn rise(before: &serde_json::Value, after: &serde_json::Value, name: &str) -> u64 {
    let get = |v: &serde_json::Value| {
        v[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {name} in {v}"))
    };
    get(after) - get(before)
}

/// The lab with our proxy and tproxy in front of the app.
fn steered_lab(steer: Steer) -> (Lab, Logged, Logged) {
    let lab = Lab::new();
    let p = lab.proxy(Proxy::Ours, steer);
    // Raw-socket handshakes leave steered flows open: no drain to wait
    // out when the guard stops tproxy (it would be killed mid-drain, and
    // leave its runtime record behind).
    let t = lab.tproxy(steer, &["--drain-timeout", "0"]);
    (lab, p, t)
}

/// Keeps the client namespace's kernel from answering the SYN-ACK that a
/// raw-socket handshake from `port` gets with a RST (it has no socket for
/// it). The rule dies with the namespace.
fn no_resets_from(ns: &Netns, port: u16) {
    for cmd in [
        "add table inet tpx_lab_handshake".to_string(),
        "add chain inet tpx_lab_handshake out { type filter hook output priority 0; }".to_string(),
        format!("add rule inet tpx_lab_handshake out tcp sport {port} tcp flags rst drop"),
    ] {
        let args: Vec<&str> = cmd.split(' ').collect();
        ns.exec("nft", &args).unwrap();
    }
}

/// What the app told a raw-socket handshake from `lab-client handshake`:
/// `app port=P peer=A`, then the echo.
fn handshake_banner(out: &str) -> (u16, SocketAddr) {
    assert!(out.lines().any(|l| l == "synack"), "{out}");
    let got = out
        .lines()
        .find_map(|l| l.strip_prefix("got "))
        .unwrap_or_else(|| panic!("{out}"));
    let banner = got.split("\\n").next().unwrap();
    let field = |k: &str| {
        banner
            .split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in {banner:?}"))
    };
    (
        field("port=").parse().unwrap(),
        field("peer=").parse().unwrap(),
    )
}

/// A raw-socket handshake from `from` to the app's port 8000 at `dst`
/// (`lab-client handshake` with the options `shape`; the client kernel's
/// RSTs held back) that must reach the proxy: the app names the proxy as
/// its peer, not the client, and the proxy reports `dst` as the original
/// destination.
fn handshake_via_proxy(lab: &Lab, p: &Logged, from: &str, dst: &str, shape: &[&str]) {
    let me: SocketAddr = from.parse().unwrap();
    let orig: SocketAddr = dst.parse().unwrap();
    no_resets_from(&lab.topo.client, me.port());
    let mut args = vec![
        "handshake",
        dst,
        "--from",
        from,
        "--send",
        "hello\n",
        "--expect",
        "hello\n",
        "--timeout-s",
        "120",
    ];
    args.extend_from_slice(shape);
    let out = lab_client(&lab.topo.client, &args);
    eprintln!("handshake from {from} {shape:?}:\n{out}");
    let (port, peer) = handshake_banner(&out);
    assert_eq!(port, 8000, "{out}");
    assert_ne!(
        peer.ip(),
        me.ip(),
        "the app saw the client itself: the SYN went around the proxy\n{out}"
    );
    eventually(
        "the proxy's line for the handshake",
        Duration::from_secs(120),
        || reported_origdst(Proxy::Ours, &p.lines()).contains_key(&me),
    );
    assert_eq!(
        reported_origdst(Proxy::Ours, &p.lines()).get(&me),
        Some(&vec![orig]),
        "{}",
        p.log()
    );
}

/// A SYN to the app's port 8000 in two IPv4 fragments whose first holds
/// only 8 bytes of TCP (RFC 1858's tiny fragment: the ports, not the
/// flags). tc ingress sees it before the kernel reassembles it; before
/// tproxy dropped what it cannot read, both fragments passed, the app's
/// kernel reassembled the SYN and answered it with a SYN-ACK from 8000:
/// a connection to the app the proxy never saw. Now nothing answers and
/// both fragments are counted. A first fragment of 16 bytes (ports and
/// sequence number, no flags) likewise. The control: a SYN split after 24
/// bytes (its header whole in the first fragment) is steered, and its
/// handshake is the proxy's; and an answer would have been seen.
fn tiny_first_fragment(steer: Steer) {
    let (lab, p, _t) = steered_lab(steer);
    let client = &lab.topo.client;
    let server = &lab.topo.server;
    // `listen`: how long to listen for replies. An answer that must come
    // (the control) is waited for up to 60 s and ends the listening; one
    // that must not is listened for 3 s (a late answer would come from
    // the app's kernel at once if it came at all, and this can only miss
    // one, never make one up).
    let forge = |port: u16, frag: &str, payload: &str, id: &str, must_answer: bool| {
        let from = format!("{CLIENT_IP}:{port}");
        let mut args = vec![
            "forge",
            "192.168.178.10:8000",
            "--from",
            &from,
            "--flags",
            "syn",
            "--frag",
            frag,
            "--payload",
            payload,
            "--ip-id",
            id,
        ];
        if must_answer {
            args.extend(["--listen-ms", "60000", "--until-reply"]);
        } else {
            args.extend(["--listen-ms", "3000"]);
        }
        let out = lab_client(client, &args);
        eprintln!("--frag {frag} from {from}:\n{out}");
        replies(&out)
    };

    let c0 = counters(server);
    // 20 bytes of header and 16 of payload: 24 in the first fragment.
    let control = forge(41000, "24", "16", "100", true);
    assert!(
        control.iter().any(|r| r.starts_with("reply flags=SA ")),
        "no SYN-ACK for a SYN whose header fits the first fragment: {control:?}"
    );
    handshake_via_proxy(
        &lab,
        &p,
        &format!("{CLIENT_IP}:41001"),
        "192.168.178.10:8000",
        &["--frag", "24", "--payload", "16", "--ip-id", "101"],
    );
    let c1 = counters(server);
    assert!(rise(&c0, &c1, "ingress_steered") >= 2, "{c1}");
    assert_eq!(rise(&c0, &c1, "ingress_unreadable"), 0, "{c1}");

    let tiny = forge(41002, "8", "0", "102", false);
    let c2 = counters(server);
    assert_eq!(
        tiny,
        Vec::<String>::new(),
        "the SYN in a tiny first fragment was answered (it reached the app)"
    );
    // Both fragments: the first too short, the second at offset 8 (which
    // could only overwrite the first's flags, RFC 3128).
    assert!(rise(&c1, &c2, "ingress_unreadable") >= 2, "{c2}");
    assert_eq!(rise(&c1, &c2, "ingress_steered"), 0, "{c2}");

    let sixteen = forge(41003, "16", "0", "103", false);
    let c3 = counters(server);
    assert_eq!(
        sixteen,
        Vec::<String>::new(),
        "the SYN whose first fragment stops before the flags was answered"
    );
    assert!(rise(&c2, &c3, "ingress_unreadable") >= 1, "{c3}");
    eprintln!("counters: {c3}");
}

#[test]
fn a_syn_in_a_tiny_first_fragment_gets_no_answer() {
    tiny_first_fragment(Steer::Rewrite);
}

#[test]
fn a_syn_in_a_tiny_first_fragment_gets_no_answer_with_the_tproxy_backend() {
    tiny_first_fragment(Steer::Tproxy);
}

/// An IPv6 SYN to port 8000 behind a 200-byte destination options header
/// (one option the kernel skips). Before tproxy walked extension headers
/// of any length, its parser gave up past ~100 bytes of them and passed
/// the SYN: the app answered it itself. Now the whole handshake (every
/// segment behind the same header) goes to the proxy: tc counts them
/// steered, the proxy accepts the client with original destination
/// [fd00:178::10]:8000, and the app's banner names the proxy as its peer,
/// not the client.
fn long_destination_options(steer: Steer) {
    let (lab, p, _t) = steered_lab(steer);
    let server = &lab.topo.server;
    let c0 = counters(server);
    handshake_via_proxy(
        &lab,
        &p,
        &format!("[{CLIENT_IP6}]:41010"),
        "[fd00:178::10]:8000",
        &["--dstopt", "200"],
    );
    let c1 = counters(server);
    eprintln!("counters: {c1}");
    // SYN, ACK, data (and the ACKs of what came back).
    assert!(rise(&c0, &c1, "ingress_steered") >= 3, "{c1}");
    assert!(rise(&c0, &c1, "flows_created") >= 1, "{c1}");
    assert_eq!(rise(&c0, &c1, "ingress_unreadable"), 0, "{c1}");
    assert_eq!(rise(&c0, &c1, "ingress_unknown_dropped"), 0, "{c1}");
}

#[test]
fn an_ipv6_syn_behind_200_bytes_of_destination_options_reaches_the_proxy() {
    long_destination_options(Steer::Rewrite);
}

#[test]
fn an_ipv6_syn_behind_200_bytes_of_destination_options_reaches_the_tproxy_backend() {
    long_destination_options(Steer::Tproxy);
}

/// Sends a line and reads back the echo of that line (the banner came
/// before).
fn ping(c: &mut TcpStream, line: &str) -> std::io::Result<()> {
    c.write_all(line.as_bytes())?;
    let mut got = vec![0u8; line.len()];
    c.read_exact(&mut got)?;
    if got != line.as_bytes() {
        return Err(std::io::Error::other(format!(
            "sent {line:?}, got {:?}",
            String::from_utf8_lossy(&got)
        )));
    }
    Ok(())
}

/// A connection straight to the app (no tproxy yet), which has sent its
/// first line (the app answers with its banner once it reads one): the
/// banner.
fn direct(dst: SocketAddr) -> (TcpStream, String) {
    let mut c = TcpStream::connect_timeout(&dst, Duration::from_secs(60)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    c.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
    c.write_all(b"hello\n").unwrap();
    let mut banner = Vec::new();
    let mut b = [0u8; 1];
    while !banner.ends_with(b"\n") {
        c.read_exact(&mut b).unwrap();
        banner.push(b[0]);
    }
    (c, String::from_utf8_lossy(&banner).trim().to_string())
}

/// `bytes` of a seeded stream through the echo, written and read at once;
/// an error on the first difference.
fn echo_bulk(c: &TcpStream, bytes: usize, seed: u64) -> Result<(), String> {
    std::thread::scope(|s| {
        let mut w = c.try_clone().unwrap();
        let writer = s.spawn(move || {
            let mut data = Stream::new(seed);
            let mut buf = vec![0u8; 64 << 10];
            let mut sent = 0;
            while sent < bytes {
                let n = buf.len().min(bytes - sent);
                data.fill(&mut buf[..n]);
                w.write_all(&buf[..n])
                    .map_err(|e| format!("write after {sent} bytes: {e}"))?;
                sent += n;
            }
            Ok::<_, String>(())
        });
        let mut r = c.try_clone().unwrap();
        let mut check = Stream::new(seed);
        let mut buf = vec![0u8; 64 << 10];
        let mut got = 0;
        while got < bytes {
            let n = r
                .read(&mut buf[..(bytes - got).min(64 << 10)])
                .map_err(|e| format!("read after {got} bytes: {e}"))?;
            if n == 0 {
                return Err(format!("EOF after {got} bytes"));
            }
            if let Some(off) = check.check(&buf[..n]) {
                return Err(format!("byte {} differs", got + off));
            }
            got += n;
        }
        writer.join().unwrap()
    })
}

/// Connections to the app's port 8000 (IPv4 and IPv6) opened before
/// tproxy attaches: tproxy lists them in PRIOR_FLOWS, so their packets,
/// which steering has no flow for, pass on to the app. Several round
/// trips and a mebibyte each way after the attach, then a clean close.
/// Without the list the first packet after the attach is dropped as of
/// an unknown flow and the connections stall. New connections go to the
/// proxy, and a forged ACK from a client port of no connection is
/// dropped: before tproxy dropped unknown non-SYNs the app's kernel
/// answered it with a RST (the app's port was reachable around the
/// proxy); now nothing answers.
#[test]
fn connections_open_before_tproxy_attached_keep_working() {
    let lab = Lab::new();
    let _p = lab.proxy(Proxy::Ours, Steer::Rewrite);
    let client = &lab.topo.client;
    let server = &lab.topo.server;
    let dsts = [addr(SERVER_IP, 8000), addr(SERVER_IP6, 8000)];
    let mut conns = client.run(|| {
        dsts.map(|d| {
            let (mut c, banner) = direct(d);
            // Straight to the app: it sees the client itself.
            let me = c.local_addr().unwrap();
            assert_eq!(banner, format!("app port=8000 peer={me}"));
            let mut echo = [0u8; 6];
            c.read_exact(&mut echo).unwrap();
            assert_eq!(&echo, b"hello\n");
            ping(&mut c, "before\n").unwrap();
            c
        })
    });
    let _t = lab.tproxy(Steer::Rewrite, &["--drain-timeout", "0"]);
    let c0 = counters(server);
    for round in 0..5 {
        for (c, d) in conns.iter_mut().zip(dsts) {
            ping(c, &format!("round {round}\n"))
                .unwrap_or_else(|e| panic!("{d}, round {round} after the attach: {e}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for (i, (c, d)) in conns.iter().zip(dsts).enumerate() {
        echo_bulk(c, 1 << 20, 7 + i as u64).unwrap_or_else(|e| panic!("{d}: {e}"));
    }
    // A clean close: the FINs pass too.
    for (c, d) in conns.iter_mut().zip(dsts) {
        c.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        c.read_to_end(&mut rest)
            .unwrap_or_else(|e| panic!("{d}: closing: {e}"));
        assert!(rest.is_empty(), "{d}: {rest:?}");
    }
    let c1 = counters(server);
    eprintln!("after the prior connections: {c1}");
    assert_eq!(rise(&c0, &c1, "ingress_unknown_dropped"), 0, "{c1}");
    assert_eq!(
        rise(&c0, &c1, "ingress_steered"),
        0,
        "a prior connection's packets were steered: {c1}"
    );

    // tproxy does steer: a new connection goes through the proxy.
    for d in dsts {
        let r = client
            .run(|| exchange(d, b"new\n"))
            .unwrap_or_else(|e| panic!("{d}: a new connection: {e}"));
        assert_eq!((r.port, r.echoed.as_slice()), (8000, &b"new\n"[..]));
        assert_ne!(
            r.peer,
            r.local.ip(),
            "{d}: a new connection skipped the proxy"
        );
    }

    // An ACK of no connection, from a fresh client port: what came back
    // and how many were dropped, per family.
    let seen: Vec<(String, Vec<String>, u64)> = [
        (format!("{CLIENT_IP}:41020"), "192.168.178.10:8000"),
        (format!("[{CLIENT_IP6}]:41021"), "[fd00:178::10]:8000"),
    ]
    .into_iter()
    .map(|(from, dst)| {
        let c2 = counters(server);
        let out = lab_client(
            client,
            &[
                "forge",
                dst,
                "--from",
                &from,
                "--flags",
                "ack",
                "--seq",
                "5000",
                "--ack",
                "6000",
                "--listen-ms",
                "2000",
            ],
        );
        let c3 = counters(server);
        eprintln!("ACK from {from}:\n{out}");
        (
            from,
            replies(&out),
            rise(&c2, &c3, "ingress_unknown_dropped"),
        )
    })
    .collect();
    for (from, answers, dropped) in &seen {
        assert!(
            answers.is_empty() && *dropped == 1,
            "a forged ACK from {from} reached the app (its kernel answered); all: {seen:?}"
        );
    }
}
