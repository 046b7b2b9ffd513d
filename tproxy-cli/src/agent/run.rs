//! `tproxy agent`'s life: checks, the pins, loading once, adopting the
//! previous agent's targets, serving the API and the target files until a
//! signal, and leaving every target attached at exit.
use std::{
    collections::HashMap as StdHashMap,
    fs::{self},
    path::Path,
    sync::Arc,
    time::Duration,
};

use tracing::{info, warn};

use super::{
    error::{Error, Result},
    files,
    registry::{self, Registry},
    server,
    service::Agent,
    settings::Settings,
};
use crate::{
    sys::{error::Chain, pins, system},
    target::{
        agent_state::{read_state, try_lock},
        loader::{LoadOptions, Loaded},
        nudger::{Netns, Nudger},
        recovery,
    },
};

/// `tproxy agent`: serves until SIGTERM/SIGINT.
pub fn run(args: &Settings) -> Result<()> {
    let Settings {
        max_targets,
        drain,
        quotas,
        sizes,
        ..
    } = args.clone();
    let state_dir = args.state_dir.clone();

    system::check_privileges_for(true)?;
    system::check_btf()?;
    crate::sys::probe::check(true)?;
    system::check_kernel_version()?;
    let lock = try_lock(&state_dir)?.ok_or_else(|| crate::target::Error::AgentRunning {
        dir: state_dir.clone(),
        pid: read_state(&state_dir).map_or(0, |s| s.pid),
    })?;
    let mounted = pins::ensure_bpffs(&args.bpffs)?;
    // A mount made for this start goes again if the start fails; once the
    // agent serves, it holds the pins and stays (`tproxy cleanup` unmounts).
    let mount = pins::MountGuard::new(&args.bpffs, mounted);
    let node = pins::node_dir(&args.bpffs);
    fs::create_dir_all(&node).map_err(|e| Error::io(format!("creating {}", node.display()), e))?;
    let previous = read_state(&state_dir).unwrap_or_default();
    let maps_pinned = node.join(tproxy_common::names::TARGETS).exists();
    if !previous.targets.is_empty() && !maps_pinned {
        // The pins are gone (bpffs unmounted, a reboot of /sys/fs/bpf):
        // the old targets' links went with them; remove what outlives.
        warn!(
            "the previous agent's pins in {} are gone: its {} target(s) are detached; removing their leftovers",
            node.display(),
            previous.targets.len()
        );
        for line in recovery::agent_leftovers(&previous) {
            info!("{line}");
        }
    }
    let mut loaded = Loaded::load_with(&LoadOptions {
        accel: true,
        max_targets,
        single: None,
        sizes,
        pin_dir: Some(node),
        same_node: args.same_node,
    })?;
    let nudge = loaded.nudge_maps()?;
    let mut reg = Registry::new(loaded, args.bpffs.clone(), max_targets, quotas);
    if maps_pinned {
        for rec in previous.targets {
            reg.adopt(rec);
        }
    }
    let agent = Arc::new(Agent::new(
        reg,
        state_dir.clone(),
        args.bpffs.clone(),
        args.socket.clone(),
        drain,
    ));
    agent.save(&agent.lock());
    agent.restore_waiting(previous.waiting);
    // A removal the previous agent had begun (it exited mid-drain) goes on:
    // else the target would refuse new connections for good, and `add` and
    // `del` of it would wait for a removal no one makes.
    let resumed: Vec<String> = agent
        .lock()
        .records()
        .into_iter()
        .filter(|r| r.draining)
        .map(|r| r.id)
        .collect();
    for id in resumed {
        let agent = agent.clone();
        std::thread::Builder::new()
            .name("resume-removal".into())
            .spawn(move || {
                info!(id, "resuming the removal the previous agent had begun");
                let r = registry::remove(agent.registry(), &id, agent.drain());
                agent.save(&agent.lock());
                if let Err(e) = r {
                    warn!("removing target {id}: {}", Chain(&e));
                }
            })
            .map_err(|e| Error::io("starting a removal thread", e))?;
    }
    // Wakes readers asleep after a short read, in their pod's namespace.
    let _nudger = match nudge {
        Some(maps) => {
            let agent = agent.clone();
            Some(Nudger::start(maps, move |cookie| {
                agent.lock().netns_of(cookie).map_or(Netns::Gone, Netns::At)
            })?)
        }
        None => None,
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the async runtime", e))?;
    let sig = rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).map_err(|e| Error::io("SIGTERM", e))?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::io("SIGINT", e))?;
        if let Some(addr) = args.metrics_addr {
            let endpoint = crate::observe::metrics::Endpoint::bind(addr).await?;
            let maps = agent.lock().maps()?;
            let a = agent.clone();
            endpoint.start_agent(
                maps,
                Arc::new(move || {
                    a.lock()
                        .records()
                        .into_iter()
                        .map(|r| {
                            let pod = r.spec.name.clone().unwrap_or_default();
                            (r.id, pod, r.installed.netns_cookie, r.slot)
                        })
                        .collect()
                }),
            )?;
        }
        let listener = server::bind(&args.socket)?;
        tokio::spawn(server::serve(listener, agent.clone()));
        {
            let agent = agent.clone();
            let dir = args.targets_dir.clone();
            std::thread::Builder::new()
                .name("targets.d".into())
                .spawn(move || watch_targets_dir(&agent, &dir))
                .map_err(|e| Error::io("starting the targets.d thread", e))?;
        }
        {
            let agent = agent.clone();
            std::thread::Builder::new()
                .name("waiting".into())
                .spawn(move || {
                    loop {
                        agent.attach_waiting();
                        std::thread::sleep(super::waiting::POLL);
                    }
                })
                .map_err(|e| Error::io("starting the waiting targets' thread", e))?;
        }
        info!(
            socket = %args.socket.display(),
            targets_dir = %args.targets_dir.display(),
            bpffs = %args.bpffs.display(),
            max_targets,
            flows_quota = quotas.flows,
            socks_quota = quotas.socks,
            targets = agent.lock().len(),
            "agent serving; SIGTERM or SIGINT exits and leaves the targets attached for the next agent"
        );
        let mut reap = tokio::time::interval(Duration::from_secs(1));
        let sig = loop {
            tokio::select! {
                _ = term.recv() => break "SIGTERM",
                _ = int.recv() => break "SIGINT",
                _ = reap.tick() => {
                    let agent = agent.clone();
                    let _ = tokio::task::spawn_blocking(move || agent.lock().reap_flows()).await;
                }
            }
        };
        Ok::<_, Error>(sig)
    })?;
    // Held to the end: no request changes anything after the state is saved.
    let reg = agent.lock();
    agent.save(&reg);
    let _ = fs::remove_file(&args.socket);
    info!(
        "{sig}: exiting with {} target(s) left attached and pinned in {}; the next agent adopts them (`tproxy cleanup` removes them if none comes)",
        reg.len(),
        args.bpffs.display()
    );
    drop(lock);
    mount.keep();
    // Nothing is dropped: dropping the owners would detach the targets.
    std::process::exit(0);
}

/// Rescans `dir` every second: new and changed files add or replace their
/// target, removed ones remove it; a broken file is one log line, once.
fn watch_targets_dir(agent: &Agent, dir: &Path) {
    let mut reported: StdHashMap<String, String> = StdHashMap::new();
    loop {
        let found = files::scan(dir);
        for (id, (path, spec)) in &found {
            let outcome = match spec {
                Err(problem) => Err(format!(
                    "target file {}: {problem}; skipped (fix the file; other targets are unaffected)",
                    path.display()
                )),
                Ok(spec) => agent.add(id, spec).map_err(|f| {
                    format!(
                        "target file {}: {}; will retry when the file changes",
                        path.display(),
                        f.error
                    )
                }),
            };
            match outcome {
                Ok(()) => {
                    reported.remove(id);
                }
                Err(line) => {
                    if reported.get(id) != Some(&line) {
                        warn!("{line}");
                        reported.insert(id.clone(), line);
                    }
                }
            }
        }
        let gone: Vec<String> = agent
            .lock()
            .ids()
            .into_iter()
            .filter(|id| id.starts_with("file:") && !found.contains_key(id))
            .collect();
        for id in gone {
            info!(id, "target file removed: removing the target");
            if let Err(f) = agent.del(&id) {
                warn!("removing target {id}: {}", f.error);
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}
