//! Spoofed SYNs cannot lock a client out: a SYN forged from a client's
//! address and port to another intercepted port opens an embryonic flow
//! that holds that tuple off (a newcomer could otherwise take a live
//! flow's tuple at the proxy), but the hold-off runs from that first SYN:
//! repeating the spoof does not extend it, and the real client connects
//! within its own SYN retries. In the lab's namespaces, with forged SYNs
//! from a raw socket in the client's. Root only.
mod common;

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use common::*;
use tproxy_lab::topology::*;

/// One forged SYN every 0.5 s from the client's 10.0.0.20:46000 to :8080
/// while the real client, from the same port, connects to :8000. Before,
/// every spoofed SYN renewed the entry's hold-off and the real connection
/// failed for as long as the spoofing lasted; now it connects once 3 s
/// (EMBRYONIC_HOLD_NS) have passed since the first spoofed SYN, on its
/// retransmission at 3 s, and the spoofer's later SYNs are the ones held
/// off.
///
/// Driven, not timed: the real client connects once the first spoofed SYN
/// has made its entry (the counters say so), it must connect within its
/// SYN retransmissions at 1, 3 and 7 s (its socket counts them), and the
/// spoofing goes on until one of its SYNs has been held off by the live
/// connection.
#[test]
fn spoofed_syns_cannot_hold_a_clients_port() {
    let lab = Lab::new();
    let _p = lab.proxy(Proxy::Ours, Steer::Rewrite);
    let _t = lab.tproxy(Steer::Rewrite, &[]);
    let server = &lab.topo.server;
    let stop = AtomicBool::new(false);
    let (conn, held_off) = std::thread::scope(|s| {
        s.spawn(|| {
            let until = Instant::now() + Duration::from_secs(600);
            while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                lab.topo
                    .client
                    .exec(
                        &example("lab-client"),
                        &[
                            "forge",
                            "192.168.178.10:8080",
                            "--from",
                            "10.0.0.20:46000",
                            "--flags",
                            "syn",
                        ],
                    )
                    .expect("a spoofed SYN");
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        // The first spoofed SYN has opened its entry.
        eventually("the spoofed SYN's flow", Duration::from_secs(120), || {
            counter(server, "flows_created") >= 1
        });
        let conn = lab.topo.client.run(|| {
            connect_from(
                addr(CLIENT_IP, 46000),
                addr(SERVER_IP, 8000),
                Duration::from_secs(60),
            )
        });
        let held_off = counter(server, "steer_collisions");
        // The spoofing goes on until the live connection holds one off.
        if conn.is_ok() {
            eventually("a spoofed SYN held off", Duration::from_secs(120), || {
                counter(server, "steer_collisions") > held_off
            });
        }
        stop.store(true, Ordering::Relaxed);
        (conn, held_off)
    });
    let mut conn = conn.expect("the real client never connected while spoofed SYNs came");
    let retrans = syn_retransmissions(&conn);
    assert!(
        retrans <= 3,
        "the real client connected only after {retrans} SYN retransmissions: more than its retries at 1, 3 and 7 s"
    );
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    // The app's banner and the echo of a line, through the proxy.
    std::io::Write::write_all(&mut conn, b"spoofed around\n").unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(b"spoofed around\n") {
        std::io::Read::read_exact(&mut conn, &mut b).expect("the app's answer");
        got.push(b[0]);
    }
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("app port=8000 "), "{got}");
    let c = stats(server)["counters"].clone();
    // Held off first (its SYN came within 3 s of the spoofed one), then
    // the spoofer held off (waited for above).
    assert!(held_off >= 1, "the real client was never held off: {c}");
    assert!(
        c["steer_collisions"].as_u64().unwrap() >= 2,
        "held off first, then the spoofer held off: {c}"
    );
}
