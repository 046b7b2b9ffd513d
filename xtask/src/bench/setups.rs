//! The set-ups compared side by side. Each is entered and left once per
//! repetition, interleaved with the others.
use std::time::Duration;

use anyhow::Result;
use tproxy_lab::{Logged, Topology};

pub const INTERCEPTED: &str = "5201,8000,11111";

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Setup {
    /// client -> app, no proxy.
    Base,
    /// client -> HAProxy -> app, steered by tproxy (rewrite), no acceleration.
    Proxy,
    /// The same with sockops/sk_msg acceleration of the proxy<->app leg.
    ProxyAccel,
    /// The same proxy behind an nftables REDIRECT rule (the iptables way).
    NftRedirect,
    /// tproxy's tproxy back-end (mark + policy routing + nft tproxy), no accel.
    TproxyBackend,
}

impl Setup {
    pub const ALL: [Setup; 5] = [
        Setup::Base,
        Setup::Proxy,
        Setup::ProxyAccel,
        Setup::NftRedirect,
        Setup::TproxyBackend,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Setup::Base => "base",
            Setup::Proxy => "proxy",
            Setup::ProxyAccel => "proxy+accel",
            Setup::NftRedirect => "nft-redirect",
            Setup::TproxyBackend => "proxy-tproxy-backend",
        }
    }

    pub fn parse(s: &str) -> Option<Setup> {
        Setup::ALL.into_iter().find(|x| x.name() == s)
    }
}

/// What a set-up holds while it is in force; leaving it undoes it.
pub enum Active {
    Nothing,
    Tproxy(Logged),
    Nft,
}

const NFT_TABLE: &str = "tproxy_bench_redirect";

/// Starts `setup`; `accel_args`: more tproxy arguments for proxy+accel.
pub fn enter(
    setup: Setup,
    lab: &Topology,
    tproxy_bin: &str,
    accel_args: &[String],
) -> Result<Active> {
    let cg = lab.cgroup.path().display().to_string();
    let base = [
        "-i",
        "eth0",
        "-ports",
        INTERCEPTED,
        "--cgroup",
        &cg,
        "--drain-timeout",
        "0",
    ];
    let tproxy = |extra: &[&str]| -> Result<Active> {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        Ok(Active::Tproxy(Logged::start(
            tproxy_bin,
            &lab.server,
            None,
            &args,
        )?))
    };
    match setup {
        Setup::Base => Ok(Active::Nothing),
        Setup::Proxy => tproxy(&["--no-accel"]),
        Setup::ProxyAccel => tproxy(&accel_args.iter().map(String::as_str).collect::<Vec<_>>()),
        Setup::TproxyBackend => tproxy(&["--no-accel", "--steer", "tproxy"]),
        Setup::NftRedirect => {
            let rules = format!(
                "add table inet {NFT_TABLE}; \
                 add chain inet {NFT_TABLE} pre {{ type nat hook prerouting priority dstnat; }}; \
                 add rule inet {NFT_TABLE} pre tcp dport {{ {INTERCEPTED} }} redirect to :15006"
            );
            lab.server.exec("nft", &[&rules])?;
            Ok(Active::Nft)
        }
    }
}

pub fn leave(active: Active, lab: &Topology) -> Result<()> {
    match active {
        Active::Nothing => {}
        Active::Tproxy(t) => {
            let (st, log) = t.terminate()?;
            anyhow::ensure!(st.success(), "tproxy failed: {log}");
        }
        Active::Nft => {
            lab.server
                .exec("nft", &["delete", "table", "inet", NFT_TABLE])?;
        }
    }
    // Let TIME_WAIT and conntrack settle a moment between set-ups.
    std::thread::sleep(Duration::from_millis(200));
    Ok(())
}
