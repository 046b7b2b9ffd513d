//! Pods of the simulated node (`tproxy_lab::cni`): their workload, a
//! client asking who answers, and a connection held open round after
//! round.
use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    path::PathBuf,
    time::Duration,
};

use tproxy_lab::{Cgroup, Logged, Netns, cni::SimPod};

use super::{STARTUP, example};

/// A pod's workload: lab-app on `ports`, tagged `tag`, and origdst-proxy
/// (with `proxy_args`) on 15006, both in `cgroup`, as containers of one
/// pod share its cgroup; started and listening. The proxy first.
pub fn start_app_and_proxy(
    ns: &Netns,
    cgroup: &Cgroup,
    ports: &str,
    tag: &str,
    proxy_args: &[&str],
) -> Vec<Logged> {
    let mut cmd = ns.command_in(example("lab-app"), Some(cgroup));
    cmd.args([ports, "--tag", tag]);
    let mut app = Logged::spawn("lab-app", &mut cmd).unwrap();
    app.wait_for("listening", STARTUP).unwrap();
    let mut cmd = ns.command_in(example("origdst-proxy"), Some(cgroup));
    cmd.args(proxy_args);
    let mut proxy = Logged::spawn("origdst-proxy", &mut cmd).unwrap();
    proxy.wait_for("listening", STARTUP).unwrap();
    vec![proxy, app]
}

/// A simulated pod's workload: the app on 8000 tagged with the pod's name.
pub fn start_workload(pod: &SimPod, proxy_args: &[&str]) -> Vec<Logged> {
    start_app_and_proxy(&pod.ns, &pod.cgroup, "8000", &pod.name, proxy_args)
}

/// From inside `from`'s namespace: the app that answered (its tag) and
/// the peer it saw. Steered: the pod's own proxy is the app's peer.
pub fn ask(from: &Netns, ip: IpAddr) -> (String, IpAddr) {
    let dst = SocketAddr::new(ip, 8000);
    let all = from
        .run(|| {
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(20)))?;
            s.write_all(b"hello")?;
            s.shutdown(std::net::Shutdown::Write)?;
            let mut all = String::new();
            s.read_to_string(&mut all)?;
            Ok::<_, std::io::Error>(all)
        })
        .unwrap();
    // "app port=8000 peer=10.244.0.2:4711 tag=web-a", then the echo.
    let (banner, echoed) = all.split_once('\n').unwrap_or((&all, ""));
    assert_eq!(echoed, "hello", "{all:?}");
    let field = |k: &str| {
        banner
            .split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or_default()
            .to_string()
    };
    let peer: SocketAddr = field("peer=").parse().unwrap();
    (field("tag="), peer.ip())
}

/// One echo connection to the app (port 8000), held open: a 64 KiB round
/// every 100 ms, each checked byte for byte, until told to stop.
pub struct Rounds {
    pub client: Logged,
    stop: tempfile::TempDir,
}

/// python3: connect, read the app's banner and echo, say `held BANNER`,
/// then rounds until the file argv[2] exists; `rounds N ok` at the end.
const ROUNDS: &str = "import os,socket,sys,time\n\
    s=socket.create_connection((sys.argv[1],8000));s.settimeout(60)\n\
    def readn(n):\n\
    \x20 b=b''\n\
    \x20 while len(b)<n:\n\
    \x20   c=s.recv(n-len(b))\n\
    \x20   if not c: sys.exit('closed after %d bytes' % len(b))\n\
    \x20   b+=c\n\
    \x20 return b\n\
    s.sendall(b'hold\\n')\n\
    line=b''\n\
    while not line.endswith(b'\\n'): line+=readn(1)\n\
    assert readn(5)==b'hold\\n'\n\
    print('held',line.decode().strip(),flush=True)\n\
    n=0\n\
    while not os.path.exists(sys.argv[2]):\n\
    \x20 d=os.urandom(65536);s.sendall(d)\n\
    \x20 if readn(65536)!=d: sys.exit('round %d differs' % n)\n\
    \x20 n+=1;time.sleep(0.1)\n\
    s.close();print('rounds',n,'ok',flush=True)\n";

impl Rounds {
    /// Connects from `ns` (in `cgroup`, if given) to `ip`:8000 and waits
    /// until the first round trip is done.
    pub fn start(ns: &Netns, cgroup: Option<&Cgroup>, ip: IpAddr) -> Rounds {
        let stop = tempfile::tempdir().unwrap();
        let mut cmd = ns.command_in("python3", cgroup);
        cmd.args(["-c", ROUNDS, &ip.to_string()])
            .arg(stop.path().join("stop"));
        let mut client = Logged::spawn("rounds", &mut cmd).unwrap();
        client
            .wait_for("held app port=8000", STARTUP)
            .unwrap_or_else(|e| panic!("{e}: {}", client.log()));
        Rounds { client, stop }
    }

    pub fn stop_file(&self) -> PathBuf {
        self.stop.path().join("stop")
    }

    /// The client is still at it (it exits at the first broken round).
    pub fn running(&mut self) -> bool {
        self.client.proc.is_running()
    }

    /// Tells the client to stop and waits for it: every round came back
    /// intact, or this panics with its log.
    pub fn finish(&mut self) -> String {
        std::fs::write(self.stop_file(), "").unwrap();
        let st = self
            .client
            .wait_timeout(Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("the flow was cut ({e}): {}", self.client.log()));
        let log = self.client.log();
        assert!(st.success() && log.contains(" ok"), "{log}");
        log
    }
}
