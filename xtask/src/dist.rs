//! `cargo xtask dist`: shell completions and man pages for packaging,
//! generated from tproxy's clap definition (`tproxy::cmd::dist`) by the
//! `tproxy-cli` example `dist`: xtask itself does not link the tproxy
//! library, whose build needs the eBPF toolchain `setup` installs.
use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result};

/// The default output folder: `target/dist` (or `$CARGO_TARGET_DIR/dist`).
pub fn default_out() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("dist")
}

pub fn run(out: Option<PathBuf>) -> Result<()> {
    let out = out.unwrap_or_else(default_out);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let out = out.canonicalize()?;
    crate::sh(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["run", "-q", "-p", "tproxy-cli", "--example", "dist", "--"])
            .arg(&out),
    )?;
    println!(
        "completions in {0}/completions (bash: tproxy.bash, zsh: _tproxy, fish: tproxy.fish), man pages in {0}/man",
        out.display()
    );
    Ok(())
}
