//! Loads one many-target object, as the node agent does, and attaches it to
//! each pod named on the command line; detaches everything when stdin
//! closes. For lab/experiments/pod_to_pod.sh (the single `tproxy` run
//! serves one namespace, so it cannot pair sockets of two pods).
//!
//!     attach-pods NETNS_PATH:CGROUP:PORTS:accel|noaccel …
use std::{io::Read as _, path::PathBuf};

use anyhow::{Context as _, Result, bail};
use tproxy::{
    Options, PortSet, Steer,
    config::options::TcMode,
    sys::netns::run_in,
    target::{attachment::TargetAttachment, loader::Loaded, probe::TargetEnv},
};

fn main() -> Result<()> {
    let specs: Vec<String> = std::env::args().skip(1).collect();
    if specs.is_empty() {
        bail!("usage: attach-pods NETNS_PATH:CGROUP:PORTS:accel|noaccel …");
    }
    let mut loaded = Loaded::load_with(&tproxy::target::loader::LoadOptions {
        accel: true,
        max_targets: 8,
        same_node: true,
        ..Default::default()
    })?;
    let mut targets = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let f: Vec<&str> = spec.split(':').collect();
        let [ns, cgroup, ports, accel] = f[..] else {
            bail!("bad pod {spec:?}: NETNS_PATH:CGROUP:PORTS:accel|noaccel");
        };
        let opts = Options {
            iface: "eth0".into(),
            ports: ports.parse::<PortSet>()?,
            cgroup: None,
            proxy_cgroup: None,
            proxy_port: 15006,
            proxy_mark: 0x539,
            accel: accel == "accel",
            accel_ports: None,
            tc_mode: TcMode::Auto,
            steer: Steer::Rewrite,
            steer_mark: None,
            route_table: None,
            accel_max_queued: 16 << 20,
            accel_retire_ms: 100,
            flows_quota: 0,
            socks_quota: 0,
            accel_min_message: 0,
        };
        let ns = PathBuf::from(ns);
        let cgroup = PathBuf::from(cgroup);
        let l = &mut loaded;
        let t = run_in(&ns, move || -> tproxy::target::Result<TargetAttachment> {
            let env = TargetEnv::here("eth0", &cgroup)?;
            TargetAttachment::attach(l, &opts, env, i as u32 + 1, |_| Ok(()))
        })?
        .with_context(|| format!("attaching {spec}"))?;
        targets.push((ns, t));
    }
    println!("attached");
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    for (ns, t) in targets.into_iter().rev() {
        run_in(&ns, move || drop(t))?;
    }
    Ok(())
}
