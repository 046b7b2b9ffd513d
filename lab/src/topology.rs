//! The reference lab: client, gateway and server namespaces.
//!
//! ```text
//!  client               gateway                         server
//!  eth0 10.0.0.20/16 -- eth0 10.0.0.2/16
//!                       eth1 192.168.178.2/24 -- eth0 192.168.178.10/24
//! ```
//! IPv6 alongside: fd00:10::/64 on the client side, fd00:178::/64 on the
//! server side. The server namespace's processes (app, proxy) run in a child
//! cgroup, which is where tproxy attaches its cgroup programs.
use anyhow::Result;

use crate::{Cgroup, Netns, run};

pub const CLIENT_IP: &str = "10.0.0.20";
pub const GATEWAY_CLIENT_IP: &str = "10.0.0.2";
pub const GATEWAY_SERVER_IP: &str = "192.168.178.2";
pub const SERVER_IP: &str = "192.168.178.10";
pub const CLIENT_IP6: &str = "fd00:10::20";
pub const GATEWAY_CLIENT_IP6: &str = "fd00:10::2";
pub const GATEWAY_SERVER_IP6: &str = "fd00:178::2";
pub const SERVER_IP6: &str = "fd00:178::10";

pub struct Topology {
    // Dropped in this order: the cgroup (and its processes) first.
    pub cgroup: Cgroup,
    pub client: Netns,
    pub gateway: Netns,
    pub server: Netns,
}

fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])?;
    Ok(())
}

fn addr(ns: &Netns, ifname: &str, cidr: &str) -> Result<()> {
    if cidr.contains(':') {
        ns.ip(&["-6", "addr", "add", cidr, "dev", ifname, "nodad"])?;
    } else {
        ns.ip(&["addr", "add", cidr, "dev", ifname])?;
    }
    Ok(())
}

impl Topology {
    /// Names: `<prefix>-client`, `<prefix>-gateway`, `<prefix>-server`, and
    /// the cgroup `<prefix>` under the cgroup2 root.
    pub fn up(prefix: &str) -> Result<Topology> {
        let client = Netns::create(&format!("{prefix}-client"))?;
        let gateway = Netns::create(&format!("{prefix}-gateway"))?;
        let server = Netns::create(&format!("{prefix}-server"))?;
        let cgroup = Cgroup::create(prefix)?;
        // No duplicate address detection: link-local addresses (which the
        // gateway's neighbour discovery needs) are usable at once instead of
        // after ~2 s of DAD.
        for ns in [&client, &gateway, &server] {
            ns.exec(
                "sysctl",
                &[
                    "-qw",
                    "net.ipv6.conf.default.accept_dad=0",
                    "net.ipv6.conf.all.accept_dad=0",
                ],
            )?;
        }
        veth(&client, "eth0", &gateway, "eth0")?;
        veth(&server, "eth0", &gateway, "eth1")?;
        addr(&client, "eth0", &format!("{CLIENT_IP}/16"))?;
        addr(&client, "eth0", &format!("{CLIENT_IP6}/64"))?;
        addr(&gateway, "eth0", &format!("{GATEWAY_CLIENT_IP}/16"))?;
        addr(&gateway, "eth0", &format!("{GATEWAY_CLIENT_IP6}/64"))?;
        addr(&gateway, "eth1", &format!("{GATEWAY_SERVER_IP}/24"))?;
        addr(&gateway, "eth1", &format!("{GATEWAY_SERVER_IP6}/64"))?;
        addr(&server, "eth0", &format!("{SERVER_IP}/24"))?;
        addr(&server, "eth0", &format!("{SERVER_IP6}/64"))?;
        client.ip(&["route", "add", "default", "via", GATEWAY_CLIENT_IP])?;
        client.ip(&["-6", "route", "add", "default", "via", GATEWAY_CLIENT_IP6])?;
        server.ip(&["route", "add", "default", "via", GATEWAY_SERVER_IP])?;
        server.ip(&["-6", "route", "add", "default", "via", GATEWAY_SERVER_IP6])?;
        for key in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            gateway.exec("sysctl", &["-qw", key])?;
        }
        Ok(Topology {
            cgroup,
            client,
            gateway,
            server,
        })
    }

    /// Adopts a lab brought up earlier (for `down`), whatever parts exist.
    pub fn down(prefix: &str) -> Vec<String> {
        let mut removed = Vec::new();
        if let Some(c) = Cgroup::adopt(prefix) {
            removed.push(c.path().display().to_string());
        }
        for part in ["client", "gateway", "server"] {
            let name = format!("{prefix}-{part}");
            if let Some(ns) = Netns::adopt(&name) {
                drop(ns);
                removed.push(format!("netns {name}"));
            }
        }
        removed
    }

    /// Leaves everything in place on drop (the lab's `up`).
    pub fn keep(&mut self) {
        self.cgroup.keep();
        self.client.keep();
        self.gateway.keep();
        self.server.keep();
    }

    /// Checks the client reaches the server across the gateway (v4 and v6).
    pub fn check_reachability(&self) -> Result<()> {
        for dst in [SERVER_IP, SERVER_IP6] {
            run(self
                .client
                .command("ping")
                .args(["-c", "1", "-W", "2", dst]))?;
        }
        Ok(())
    }
}
