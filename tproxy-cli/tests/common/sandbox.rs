//! A namespace with an `eth0` and a child cgroup, for the tests that start
//! tproxy without the whole lab.
use std::{path::Path, process::Output, time::Duration};

use tproxy_lab::{Cgroup, Netns, Tproxy, unique};

use super::BIN;

pub struct Sandbox {
    // Dropped first: the cgroup (and whatever runs in it).
    pub cgroup: Cgroup,
    pub ns: Netns,
}

impl Sandbox {
    /// A veth `eth0` whose peer `peer0` stays in the namespace, so nothing
    /// touches the host's interfaces.
    pub fn new(prefix: &str) -> Sandbox {
        Sandbox::with(prefix, |ns| {
            ns.ip(&[
                "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
            ])
            .unwrap();
            ns.ip(&["link", "set", "eth0", "up"]).unwrap();
            ns.ip(&["link", "set", "peer0", "up"]).unwrap();
            wait("both link-local addresses in the local table", || {
                let t = ns.ip(&["-6", "route", "show", "table", "local"]).unwrap();
                t.matches("local fe80::").count() == 2
            });
        })
    }

    /// The namespace (with `links` adding its interfaces) and the cgroup.
    /// IPv6 duplicate address detection is off: link-local addresses and
    /// their routes appear at once, not in the middle of a test that
    /// compares route listings.
    pub fn with(prefix: &str, links: impl FnOnce(&Netns)) -> Sandbox {
        let name = unique(prefix);
        let ns = Netns::create(&name).unwrap();
        ns.exec(
            "sysctl",
            &[
                "-qw",
                "net.ipv6.conf.default.accept_dad=0",
                "net.ipv6.conf.all.accept_dad=0",
            ],
        )
        .unwrap();
        links(&ns);
        let cgroup = Cgroup::create(&name).unwrap();
        Sandbox { cgroup, ns }
    }

    pub fn cg(&self) -> String {
        self.cgroup.path().display().to_string()
    }

    /// `tproxy -i eth0 -ports 8000 --cgroup <ours> EXTRA…` in the
    /// namespace, not started (for runs expected to fail).
    pub fn command(&self, extra: &[&str]) -> std::process::Command {
        let mut cmd = self.ns.command(BIN);
        cmd.args(["-i", "eth0", "-ports", "8000", "--cgroup", &self.cg()])
            .args(extra);
        cmd
    }

    /// `tproxy -i eth0 -ports 8000 --cgroup <ours> EXTRA…`, serving.
    pub fn start(&self, extra: &[&str]) -> Tproxy {
        let cg = self.cg();
        let mut args = vec!["-i", "eth0", "-ports", "8000", "--cgroup", &cg];
        args.extend_from_slice(extra);
        Tproxy::start(BIN, &self.ns, None, &args).unwrap()
    }

    /// Runs `program ARGS…` in the namespace and in the child cgroup.
    pub fn run_in_cgroup(&self, program: &str, args: &[&str]) -> Output {
        self.ns
            .command_in(program, Some(&self.cgroup))
            .args(args)
            .output()
            .unwrap()
    }

    /// tc state of eth0 (qdiscs and filters), to compare before/after.
    pub fn tc_listing(&self) -> String {
        let mut s = self
            .ns
            .exec("tc", &["qdisc", "show", "dev", "eth0"])
            .unwrap();
        for hook in ["ingress", "egress"] {
            s += &self
                .ns
                .exec("tc", &["filter", "show", "dev", "eth0", hook])
                .unwrap_or_default();
        }
        s
    }

    /// Whether an instance's runtime record for eth0 exists.
    pub fn record_exists(&self) -> bool {
        use std::os::unix::fs::MetadataExt as _;
        let ino = std::fs::metadata(self.ns.path()).unwrap().ino();
        Path::new(&format!("/run/tproxy/{ino}-eth0.json")).exists()
    }
}

/// Polls `f` for up to 60 s (instant on an idle machine; the rest is for
/// a busy one).
fn wait(what: &str, f: impl FnMut() -> bool) {
    super::eventually(what, Duration::from_secs(60), f);
}
