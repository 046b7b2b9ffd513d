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
#[test]
fn spoofed_syns_cannot_hold_a_clients_port() {
    let lab = Lab::new();
    let _p = lab.proxy(Proxy::Ours, Steer::Rewrite);
    let _t = lab.tproxy(Steer::Rewrite, &[]);
    let stop = AtomicBool::new(false);
    let (conn, took) = std::thread::scope(|s| {
        s.spawn(|| {
            let until = Instant::now() + Duration::from_secs(20);
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
        // Let the first spoofed SYN open its entry.
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        let conn = lab.topo.client.run(|| {
            connect_from(
                addr(CLIENT_IP, 46000),
                addr(SERVER_IP, 8000),
                Duration::from_secs(15),
            )
        });
        let took = started.elapsed();
        // The spoofing goes on a little over the live connection.
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, Ordering::Relaxed);
        (conn, took)
    });
    let mut conn = conn.expect("the real client never connected while spoofed SYNs came");
    assert!(
        took < Duration::from_secs(9),
        "the real client connected only after {took:?}: more than its SYN retries at 1, 3 and 7 s"
    );
    conn.set_read_timeout(Some(Duration::from_secs(10)))
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
    let c = stats(&lab.topo.server)["counters"].clone();
    assert!(
        c["steer_collisions"].as_u64().unwrap() >= 2,
        "held off first, then the spoofer held off: {c}"
    );
}
