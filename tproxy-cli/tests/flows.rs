//! `tproxy flows`: each steered flow with its client, the address it
//! dialled, its state and what became of its proxy<->app pair, read back
//! from a run with two connections held open: one on an accelerated port,
//! one on a port `--accel-ports` leaves out. Root only.
mod common;

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

use common::*;
use tproxy_lab::{Logged, topology::*};

/// Connects to `port`, sends lines and reads their echoes (the first
/// request and answer by TCP, the later ones redirected where the pair is
/// accelerated); returns the connection, still open.
fn held(port: u16, v6: bool) -> TcpStream {
    let ip = if v6 { SERVER_IP6 } else { SERVER_IP };
    let mut s = TcpStream::connect(addr(ip, port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut banner = Vec::new();
    let mut b = [0u8; 1];
    s.write_all(b"hello\n").unwrap();
    while b[0] != b'\n' {
        s.read_exact(&mut b).unwrap();
        banner.push(b[0]);
    }
    for round in 0..20 {
        let line = format!("round {round:04}\n");
        let want = if round == 0 {
            6 + line.len()
        } else {
            line.len()
        };
        s.write_all(line.as_bytes()).unwrap();
        let mut got = vec![0u8; want];
        s.read_exact(&mut got).unwrap();
    }
    s
}

#[test]
fn flows_lists_each_steered_flow_and_what_became_of_its_pair() {
    let lab = Lab::new();
    let _p = lab.proxy(Proxy::Ours, Steer::Rewrite);
    let cg = lab.cg();
    let args = [
        "-i",
        "eth0",
        "-ports",
        "8000,8080",
        "--accel-ports",
        "8000",
        "--cgroup",
        &cg,
    ];
    let _t = Logged::start(BIN, &lab.topo.server, None, &args).unwrap();
    let (fast, plain) = lab
        .topo
        .client
        .run(|| (held(8000, false), held(8080, true)));
    let out = lab.topo.server.exec(BIN, &["flows", "--json"]).unwrap();
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    eprintln!("{out}");
    let find = |s: &TcpStream| {
        let me = lab.topo.client.run(|| s.local_addr().unwrap()).to_string();
        rows.iter()
            .find(|r| r["client"] == me.as_str())
            .unwrap_or_else(|| panic!("no flow of {me}: {out}"))
            .clone()
    };
    let (f, p) = (find(&fast), find(&plain));
    assert_eq!(f["state"], "established", "{f}");
    assert_eq!(f["dialled"], format!("{SERVER_IP}:8000").as_str(), "{f}");
    assert_eq!(f["pair"], "fast path", "{f}");
    // The later rounds were redirected both ways.
    assert!(f["to_app_bytes"].as_u64().unwrap() > 0, "{f}");
    assert!(f["from_app_bytes"].as_u64().unwrap() > 0, "{f}");
    assert_eq!(p["state"], "established", "{p}");
    assert_eq!(p["dialled"], format!("[{SERVER_IP6}]:8080").as_str(), "{p}");
    assert_eq!(p["pair"], "refused", "{p}");
    assert_eq!(p["why"], "port not in accel_ports", "{p}");
    assert_eq!(p["to_app_bytes"], 0, "{p}");
    // The table form says the same, one line each.
    let table = lab.topo.server.exec(BIN, &["flows"]).unwrap();
    assert!(
        table.contains("fast path") && table.contains("refused"),
        "{table}"
    );
    drop((fast, plain));
}
