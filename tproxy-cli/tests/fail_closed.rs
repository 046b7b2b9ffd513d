//! Fail closed, as an unprivileged local user would try it: with the proxy
//! in a cgroup of its own (`--proxy-cgroup`), another process of the
//! served cgroup (uid 65534) neither learns a steered flow's original
//! destination nor gets its own loopback connections to the app paired.
//! Crafted packets (fragments, extension headers, unknown flows, drain,
//! spoofed SYNs) are in `tc_programs.rs`. Root only.
mod common;

use std::time::Duration;

use common::*;
use tproxy_lab::{Cgroup, Logged, cgroup::cgroup2_root, topology::*};

/// The lab with our proxy in `<lab cgroup>/proxy` and tproxy told so.
struct Setup {
    proxy: Option<Logged>,
    tproxy: Logged,
    proxy_cg: Cgroup,
    lab: Lab,
}

impl Setup {
    fn new() -> Setup {
        let lab = Lab::new();
        let rel = lab
            .topo
            .cgroup
            .path()
            .strip_prefix(cgroup2_root().unwrap())
            .unwrap()
            .join("proxy");
        let proxy_cg = Cgroup::create(rel.to_str().unwrap()).unwrap();
        let mut cmd = lab
            .topo
            .server
            .command_in(example("origdst-proxy"), Some(&proxy_cg));
        let mut proxy = Logged::spawn("origdst-proxy", &mut cmd).unwrap();
        proxy.wait_for("listening", Duration::from_secs(10)).unwrap();
        let pcg = proxy_cg.path().display().to_string();
        let tproxy = lab.tproxy(Steer::Rewrite, &["--proxy-cgroup", &pcg]);
        Setup {
            proxy: Some(proxy),
            tproxy,
            proxy_cg,
            lab,
        }
    }

    /// A command run as uid/gid 65534 in the server namespace and the lab's
    /// cgroup (served by tproxy's hooks, but not the proxy's).
    fn stranger(&self, program: &str) -> std::process::Command {
        // setpriv drops the ids after the namespace and cgroup are joined
        // (Command::uid would drop them first, and fail those).
        let mut cmd = self
            .lab
            .topo
            .server
            .command_in("setpriv", Some(&self.lab.topo.cgroup));
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", program]);
        cmd
    }
}

/// The proxy's own connection to the app is paired; a stranger's
/// connection from the same host to the same port is not (before: it
/// entered the SOCKHASH and `accel_pairs_app` rose for it).
#[test]
fn only_connections_the_proxy_makes_are_paired() {
    let s = Setup::new();
    let r = s
        .lab
        .topo
        .client
        .run(|| exchange(addr(SERVER_IP, 8000), b"through the proxy\n"))
        .expect("a client through the proxy");
    assert_eq!(r.echoed, b"through the proxy\n");
    let ns = &s.lab.topo.server;
    eventually("the proxy's leg paired", Duration::from_secs(5), || {
        counter(ns, "accel_pairs_app") >= 1
    });
    let pairs = counter(ns, "accel_pairs_app");
    let inserted = counter(ns, "sockhash_inserted");
    let out = s
        .stranger(&example("lab-client"))
        .args(["echo", "127.0.0.1:8000", "--bytes", "100000"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && said.starts_with("ok"), "{said}");
    assert_eq!(counter(ns, "accel_pairs_app"), pairs, "a stranger was paired");
    assert_eq!(counter(ns, "sockhash_inserted"), inserted);
    drop(s.tproxy);
    drop(s.proxy);
    drop(s.proxy_cg);
}

/// A stranger holding a steered connection (here: listening on the proxy
/// port while the proxy is down) asks for its original destination and
/// gets the kernel's own answer, ENOENT; the proxy gets it (before: the
/// stranger read 192.168.178.10:8000).
#[test]
fn only_the_proxy_learns_original_destinations() {
    let mut s = Setup::new();
    s.proxy.take().unwrap().kill9().unwrap();
    let script = "import socket,sys\n\
        s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
        s.bind(('0.0.0.0',15006)); s.listen(); print('listening', flush=True)\n\
        c,_=s.accept()\n\
        try:\n    v=c.getsockopt(socket.SOL_IP, 80, 16); print('origdst', v[2:8].hex(), flush=True)\n\
        except OSError as e:\n    print('errno', e.errno, flush=True)\n";
    let mut cmd = s.stranger("/usr/bin/python3");
    cmd.args(["-c", script]);
    let mut stranger = Logged::spawn("stranger", &mut cmd).unwrap();
    stranger
        .wait_for("listening", Duration::from_secs(10))
        .unwrap();
    let _ = s.lab.topo.client.run(|| {
        std::net::TcpStream::connect_timeout(&addr(SERVER_IP, 8000), Duration::from_secs(5))
    });
    let line = [stranger.wait_for("errno", Duration::from_secs(10)), Ok(stranger.log())]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        line.contains("errno 2"),
        "the stranger learned where the flow was going: {line}"
    );
    assert!(!line.contains("origdst"), "{line}");
}
