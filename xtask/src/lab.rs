//! `cargo xtask lab up|down|shell|status`: the three-namespace lab of
//! DESIGN.md, kept up between commands for a person to play in.
use std::{os::unix::process::CommandExt as _, process::Command};

use anyhow::{Result, bail};
use clap::Subcommand;
use tproxy_lab::{Netns, Topology, topology};

pub const PREFIX: &str = "tproxy-lab";

#[derive(Subcommand)]
pub enum LabCmd {
    /// Create the client, gateway and server namespaces (replaces a stale lab).
    Up,
    /// Remove everything `up` made.
    Down,
    /// Open a shell in one namespace: client, gateway or server.
    Shell { ns: String },
    /// Show what exists.
    Status,
}

pub fn run(cmd: LabCmd) -> Result<()> {
    match cmd {
        LabCmd::Up => {
            Topology::down(PREFIX);
            let mut t = Topology::up(PREFIX)?;
            t.check_reachability()?;
            t.keep();
            println!(
                "lab up: namespaces {PREFIX}-client ({}), {PREFIX}-gateway, {PREFIX}-server ({}); cgroup {}",
                topology::CLIENT_IP,
                topology::SERVER_IP,
                t.cgroup.path().display()
            );
            println!("open a shell: cargo xtask lab shell server");
            Ok(())
        }
        LabCmd::Down => {
            let removed = Topology::down(PREFIX);
            if removed.is_empty() {
                println!("lab down: nothing to remove");
            } else {
                println!("lab down: removed {}", removed.join(", "));
            }
            Ok(())
        }
        LabCmd::Shell { ns } => {
            let name = format!("{PREFIX}-{ns}");
            let Some(mut netns) = Netns::adopt(&name) else {
                bail!("no namespace {name}: run `cargo xtask lab up` first");
            };
            netns.keep();
            let shell = std::env::var("SHELL").unwrap_or_else(|_| "/bin/bash".into());
            let err = netns
                .command(&shell)
                .env("PS1", format!("[{ns}] \\w# "))
                .exec();
            bail!("exec {shell}: {err}")
        }
        LabCmd::Status => {
            let out = Command::new("ip").args(["netns", "list"]).output()?;
            let ns = String::from_utf8_lossy(&out.stdout);
            let ours: Vec<&str> = ns.lines().filter(|l| l.starts_with(PREFIX)).collect();
            println!(
                "namespaces: {}",
                if ours.is_empty() {
                    "none".into()
                } else {
                    ours.join(", ")
                }
            );
            Ok(())
        }
    }
}
