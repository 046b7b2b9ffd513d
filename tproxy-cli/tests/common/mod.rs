//! Shared by the root integration tests: the lab with the app, proxies and
//! tproxy in it, and small clients.
#![allow(dead_code)]
use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{IpAddr, Shutdown, SocketAddr, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

use tproxy_lab::{Logged, Netns, Topology, envoy, sibling_bin, unique};

pub mod agent;
pub mod daemonset;
pub mod podman;
pub mod pods;
pub mod sandbox;

pub const BIN: &str = env!("CARGO_BIN_EXE_tproxy");
pub const APP_PORTS: &str = "7000,8000,8080,8081,9000-9002";
pub const INTERCEPTED: &str = "8000,8080,9000-9002";
pub const INTERCEPTED_LIST: [u16; 5] = [8000, 8080, 9000, 9001, 9002];

/// How long a helper process (the app, a proxy, a client) may take to say
/// it is up. Seconds at most on an idle machine; generous, because a busy
/// one (a build beside the suite) is slower, and a wait returns as soon as
/// the process is up.
pub const STARTUP: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Proxy {
    Ours,
    Haproxy,
    /// The real Envoy (`tproxy_lab::envoy::find`) with the shipped configs.
    Envoy,
}

impl Proxy {
    /// A steered port the proxy carries as a plain byte stream: Envoy
    /// serves the app's HTTP port (8000) with `http_connection_manager`,
    /// every other port with `tcp_proxy`.
    pub fn stream_port(self) -> u16 {
        match self {
            Proxy::Envoy => 8080,
            Proxy::Ours | Proxy::Haproxy => 8000,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Steer {
    Rewrite,
    Tproxy,
}

impl Steer {
    pub fn arg(self) -> &'static str {
        match self {
            Steer::Rewrite => "rewrite",
            Steer::Tproxy => "tproxy",
        }
    }
}

pub fn example(name: &str) -> String {
    sibling_bin(name, Path::new(BIN))
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

pub fn repo_file(rel: &str) -> String {
    format!("{}/../{rel}", env!("CARGO_MANIFEST_DIR"))
}

/// The lab with the app running in the server namespace's cgroup.
pub struct Lab {
    pub topo: Topology,
    pub app: Logged,
}

impl Lab {
    pub fn new() -> Lab {
        Lab::with_app(&[])
    }

    /// The lab, with `extra` arguments for the app.
    pub fn with_app(extra: &[&str]) -> Lab {
        let topo = Topology::up(&unique("tpx-in-")).unwrap();
        let mut cmd = topo
            .server
            .command_in(example("lab-app"), Some(&topo.cgroup));
        cmd.arg(APP_PORTS).args(extra);
        let mut app = Logged::spawn("lab-app", &mut cmd).unwrap();
        app.wait_for("listening", STARTUP).unwrap();
        Lab { topo, app }
    }

    pub fn cg(&self) -> String {
        self.topo.cgroup.path().display().to_string()
    }

    /// Starts the proxy on 15006 in the server namespace and cgroup.
    pub fn proxy(&self, proxy: Proxy, steer: Steer) -> Logged {
        self.proxy_in(&self.topo.server, proxy, steer)
    }

    pub fn proxy_in(&self, ns: &Netns, proxy: Proxy, steer: Steer) -> Logged {
        let cg = Some(&self.topo.cgroup);
        let mut p = match proxy {
            Proxy::Ours => {
                let mut cmd = ns.command_in(example("origdst-proxy"), cg);
                if steer == Steer::Tproxy {
                    cmd.arg("--transparent");
                }
                Logged::spawn("origdst-proxy", &mut cmd).unwrap()
            }
            Proxy::Haproxy => {
                let cfg = match steer {
                    Steer::Rewrite => repo_file("examples/haproxy/haproxy.cfg"),
                    Steer::Tproxy => repo_file("examples/haproxy/haproxy-transparent.cfg"),
                };
                let mut cmd = ns.command_in("haproxy", cg);
                cmd.args(["-db", "-f", &cfg]);
                Logged::spawn("haproxy", &mut cmd).unwrap()
            }
            // Started and waited for (admin /ready) by the lab crate, as
            // the demo, the lab and the bench do.
            Proxy::Envoy => {
                return envoy::start(
                    ns,
                    cg,
                    &envoy::example_config(steer == Steer::Tproxy),
                    15006,
                    &envoy::Opts::default(),
                )
                .unwrap();
            }
        };
        match proxy {
            Proxy::Ours => {
                p.wait_for("listening", STARTUP).unwrap();
            }
            // HAProxy says nothing when it is up: wait for the port.
            _ => ns.wait_listening(15006, STARTUP).unwrap(),
        }
        p
    }

    pub fn tproxy(&self, steer: Steer, extra: &[&str]) -> Logged {
        let cg = self.cg();
        let mut args = vec![
            "-i",
            "eth0",
            "-ports",
            INTERCEPTED,
            "--cgroup",
            &cg,
            "--steer",
            steer.arg(),
        ];
        args.extend_from_slice(extra);
        Logged::start(BIN, &self.topo.server, None, &args).unwrap()
    }
}

/// What the app told one client.
#[derive(Debug)]
pub struct Reply {
    pub port: u16,
    pub peer: IpAddr,
    /// The client's own address (to find the proxy's log line).
    pub local: SocketAddr,
    pub echoed: Vec<u8>,
}

/// Connects, sends `payload`, half-closes, reads everything back. (The
/// timeouts only end an exchange that went wrong; milliseconds are enough,
/// the rest is for a busy machine.)
pub fn exchange(dst: SocketAddr, payload: &[u8]) -> std::io::Result<Reply> {
    let s = TcpStream::connect_timeout(&dst, Duration::from_secs(30))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    talk(s, payload)
}

/// `exchange` on a connected socket.
pub fn talk(mut s: TcpStream, payload: &[u8]) -> std::io::Result<Reply> {
    let local = s.local_addr()?;
    s.write_all(payload)?;
    s.shutdown(Shutdown::Write)?;
    let mut all = Vec::new();
    s.read_to_end(&mut all)?;
    let nl = all.iter().position(|&b| b == b'\n').ok_or_else(|| {
        std::io::Error::other(format!("no banner in {:?}", String::from_utf8_lossy(&all)))
    })?;
    let banner = String::from_utf8_lossy(&all[..nl]).into_owned();
    // "app port=8000 peer=10.0.0.20:4711" / "peer=[fd00::1]:4711"
    let port = banner
        .split_whitespace()
        .find_map(|w| w.strip_prefix("port="))
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad banner {banner:?}")))?;
    let peer: SocketAddr = banner
        .split_whitespace()
        .find_map(|w| w.strip_prefix("peer="))
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad banner {banner:?}")))?;
    Ok(Reply {
        port,
        peer: peer.ip(),
        local,
        echoed: all[nl + 1..].to_vec(),
    })
}

/// One HTTP/1.1 GET (the app's HTTP port): the port and peer the app
/// names in its answer; `echoed` is the body.
pub fn http_get(dst: SocketAddr) -> std::io::Result<Reply> {
    let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(30))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let local = s.local_addr()?;
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {dst}\r\nConnection: close\r\n\r\n"
    )?;
    let mut all = String::new();
    s.read_to_string(&mut all)?;
    let bad = || std::io::Error::other(format!("bad HTTP answer {all:?}"));
    if !all.starts_with("HTTP/1.1 200 ") {
        return Err(bad());
    }
    let body = all.split_once("\r\n\r\n").ok_or_else(bad)?.1;
    // "hello from the app on port 8000; peer 192.168.178.10:4711"
    let rest = body
        .trim()
        .strip_prefix("hello from the app on port ")
        .ok_or_else(bad)?;
    let (port, peer) = rest.split_once("; peer ").ok_or_else(bad)?;
    let peer: SocketAddr = peer.parse().map_err(|_| bad())?;
    Ok(Reply {
        port: port.parse().map_err(|_| bad())?,
        peer: peer.ip(),
        local,
        echoed: body.as_bytes().to_vec(),
    })
}

pub fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// Original destinations the proxy reported, by client address and port
/// (a client may reuse a port towards another destination, and with the
/// tproxy back-end both are served at once: every one is kept).
pub fn reported_origdst(proxy: Proxy, log: &[String]) -> HashMap<SocketAddr, Vec<SocketAddr>> {
    let mut out = HashMap::new();
    for line in log {
        let (client, orig) = match proxy {
            // accepted 10.0.0.20:4711 on 192.168.178.10:15006 original-dst 192.168.178.10:8000
            Proxy::Ours => {
                let w: Vec<&str> = line.split_whitespace().collect();
                if w.first() != Some(&"accepted") || w.len() < 6 {
                    continue;
                }
                (w[1].parse().ok(), w[5].parse().ok())
            }
            // haproxy: client 10.0.0.20:4711 -> 192.168.178.10:8000, upstream …
            Proxy::Haproxy => {
                let Some(rest) = line.strip_prefix("haproxy: client ") else {
                    continue;
                };
                let mut parts = rest.split(" -> ");
                let c = parts.next().unwrap_or("");
                let f = parts.next().unwrap_or("").split(',').next().unwrap_or("");
                (haproxy_addr(c), haproxy_addr(f))
            }
            // envoy: client 10.0.0.20:4711 -> 192.168.178.10:8000, upstream …
            // (Envoy brackets IPv6 addresses.)
            Proxy::Envoy => {
                let Some(rest) = line.strip_prefix("envoy: client ") else {
                    continue;
                };
                let mut parts = rest.split(" -> ");
                let c = parts.next().unwrap_or("");
                let f = parts.next().unwrap_or("").split(',').next().unwrap_or("");
                (c.parse().ok(), f.parse().ok())
            }
        };
        if let (Some(c), Some(o)) = (client, orig) {
            out.entry(c).or_insert_with(Vec::new).push(o);
        }
    }
    out
}

/// HAProxy logs IPv6 addresses without brackets: `fd00::1:8000`.
pub fn haproxy_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.rsplit_once(':')?;
    Some(SocketAddr::new(ip.parse().ok()?, port.parse().ok()?))
}

pub fn flows(ns: &Netns) -> u64 {
    let out = ns.exec(BIN, &["stats", "--json"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["flows"].as_u64().unwrap()
}

/// The entry of `v["targets"]` (`tproxy stats|status --agent --json`)
/// whose `key` is `value`.
#[track_caller]
pub fn target_by<'a>(v: &'a serde_json::Value, key: &str, value: &str) -> &'a serde_json::Value {
    v["targets"]
        .as_array()
        .unwrap_or_else(|| panic!("no targets in {v}"))
        .iter()
        .find(|t| t[key] == value)
        .unwrap_or_else(|| panic!("no target with {key} {value} in {v}"))
}

pub fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out: {what}");
}

/// The runtime record (/run/tproxy) of the instance on `iface` in `ns`.
pub fn runtime_record_of(ns: &Netns, iface: &str) -> serde_json::Value {
    use std::os::unix::fs::MetadataExt as _;
    let ino = std::fs::metadata(ns.path()).unwrap().ino();
    let path = format!("/run/tproxy/{ino}-{iface}.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// `tproxy stats --json` of the one instance in `ns`.
pub fn stats(ns: &Netns) -> serde_json::Value {
    let out = ns.exec(BIN, &["stats", "--json"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0].clone()
}

/// Waits until the proxy's log has `n` lines starting with `prefix` (Envoy
/// writes its access log out every 0.1 s, and the lines reach the test
/// through a reader thread); returns how many it has.
pub fn wait_lines(p: &Logged, prefix: &str, n: usize, timeout: Duration) -> usize {
    let count = || p.lines().iter().filter(|l| l.starts_with(prefix)).count();
    let deadline = Instant::now() + timeout;
    while count() < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    count()
}

/// One counter of the instance in `ns`.
pub fn counter(ns: &Netns, name: &str) -> u64 {
    stats(ns)["counters"][name].as_u64().unwrap()
}

/// Connection attempts made one after another (in the calling thread's
/// namespace) until told to stop: the peer the app saw for each one that
/// reached it (the proxy's address if steered, the client's own if it went
/// straight to the app); why each one that never connected failed; and
/// what went wrong with each one that connected but got no proper answer.
#[derive(Debug, Default)]
pub struct Attempts {
    pub peers: Vec<IpAddr>,
    pub refused: Vec<String>,
    pub broken: Vec<String>,
}

/// How far running [`Attempts`] have got, for a test that waits for them
/// (instead of sleeping and hoping they made some): attempts finished, and
/// of those, the ones that reached the app and the ones refused.
#[derive(Debug, Default)]
pub struct Progress {
    pub made: std::sync::atomic::AtomicUsize,
    pub reached: std::sync::atomic::AtomicUsize,
    pub refused: std::sync::atomic::AtomicUsize,
}

impl Progress {
    pub fn made(&self) -> usize {
        self.made.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn reached(&self) -> usize {
        self.reached.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn refused(&self) -> usize {
        self.refused.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Attempts {
    /// Attempts to `dst`, each connect given up after `connect` (an answer
    /// after 20 s), until `stop` is set (and at least one was made).
    pub fn run(
        dst: SocketAddr,
        connect: Duration,
        stop: &std::sync::atomic::AtomicBool,
    ) -> Attempts {
        Attempts::run_watched(dst, connect, stop, &Progress::default())
    }

    /// `run`, counting each finished attempt in `progress`.
    pub fn run_watched(
        dst: SocketAddr,
        connect: Duration,
        stop: &std::sync::atomic::AtomicBool,
        progress: &Progress,
    ) -> Attempts {
        use std::sync::atomic::Ordering::SeqCst;
        let mut out = Attempts::default();
        loop {
            match TcpStream::connect_timeout(&dst, connect) {
                Err(e) => {
                    out.refused.push(e.to_string());
                    progress.refused.fetch_add(1, SeqCst);
                }
                Ok(s) => {
                    let r = s
                        .set_read_timeout(Some(Duration::from_secs(20)))
                        .and_then(|()| talk(s, b"attempt\n"));
                    match r {
                        Ok(r) if r.echoed == b"attempt\n" => {
                            out.peers.push(r.peer);
                            progress.reached.fetch_add(1, SeqCst);
                        }
                        Ok(r) => out.broken.push(format!("echo {:?}", r.echoed)),
                        Err(e) => out.broken.push(e.to_string()),
                    }
                }
            }
            progress.made.fetch_add(1, SeqCst);
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return out;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Peers of the attempts that reached the app other than through the
    /// proxy at `proxy` (the address the proxy connects to the app from).
    pub fn direct(&self, proxy: &str) -> Vec<IpAddr> {
        let proxy: IpAddr = proxy.parse().unwrap();
        self.peers.iter().copied().filter(|p| *p != proxy).collect()
    }
}

/// SYN retransmissions of a connected socket (TCP_INFO's total_retrans:
/// a connect answered on its first SYN has none).
pub fn syn_retransmissions(c: &TcpStream) -> u32 {
    use std::os::fd::AsRawFd as _;
    // SAFETY: tcp_info is plain data; getsockopt fills at most `len`.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid socket, buffer and length.
    let rc = unsafe {
        libc::getsockopt(
            c.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    info.tcpi_total_retrans
}

/// A connection from a chosen client port (SO_REUSEADDR, so two
/// connections to different ports may share it, as NATs and Linux do).
pub fn connect_from(
    local: SocketAddr,
    dst: SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(dst),
        socket2::Type::STREAM,
        None,
    )?;
    s.set_reuse_address(true)?;
    s.bind(&local.into())?;
    s.connect_timeout(&dst.into(), timeout)?;
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(s)
}

/// What this kernel offers tproxy, as `tproxy check` probes it (cached):
/// tests follow it rather than this machine's kernel.
pub struct KernelCaps {
    /// TCX links (else tproxy's `auto` tc mode uses netlink filters).
    pub tcx: bool,
    /// The send hook (fentry on tcp_bpf_sendmsg, with the fexit read
    /// hook): MSG_OOB sends are seen.
    pub send_hook: bool,
}

pub fn kernel_caps() -> &'static KernelCaps {
    static CAPS: std::sync::OnceLock<KernelCaps> = std::sync::OnceLock::new();
    CAPS.get_or_init(|| {
        let line = |args: &[&str], name: &str| -> String {
            let out = std::process::Command::new(BIN)
                .args(["check", "--json"])
                .args(args)
                .output()
                .expect("tproxy check");
            let items: serde_json::Value =
                serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
                    panic!(
                        "tproxy check --json: {e}: {}",
                        String::from_utf8_lossy(&out.stderr)
                    )
                });
            items
                .as_array()
                .and_then(|a| a.iter().find(|i| i["name"] == name))
                .and_then(|i| i["detail"].as_str())
                .map(str::to_string)
                .unwrap_or_default()
        };
        let tc = line(&["--no-accel"], "tc attach");
        assert!(!tc.is_empty(), "tproxy check has no tc attach line");
        KernelCaps {
            tcx: tc.starts_with("TCX"),
            send_hook: line(&[], "read hook").starts_with("fexit"),
        }
    })
}
