//! `cargo xtask dist`: the release tarball, `tproxy-VERSION-x86_64-linux.tar.gz`,
//! and its checksum (`….tar.gz.sha256`, for `sha256sum -c`) in OUT
//! (default `target/dist`). Inside, under `tproxy-VERSION-x86_64-linux/`:
//!
//! - `bin/tproxy`, `bin/tproxy-cni`: static (musl) and stripped, so they
//!   run on any x86_64 Linux whatever its libc (the eBPF object is inside
//!   tproxy);
//! - `completions/` (bash, zsh, fish) and `man/` (tproxy.1, tproxy-SUB.1),
//!   generated from tproxy's clap definition by the `tproxy-cli` example
//!   `dist` (xtask itself does not link the tproxy library, whose build
//!   needs the eBPF toolchain `setup` installs);
//! - `examples/`: the proxy configs and `tproxy.yaml`;
//! - `deploy/`: the Kubernetes manifests, `install-cni.sh`, the Containerfile;
//! - `README.md`.
//!
//! The same sources give the same bytes: entries sorted, owned by root,
//! dated at the last commit, gzip without a name or time.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use sha2::{Digest as _, Sha256};

use crate::{
    image::{build_static, copy_stripped, target_dir},
    output, sh,
};

/// `tproxy-VERSION-x86_64-linux`: the tarball's name and its top folder.
pub fn name() -> String {
    format!("tproxy-{}-x86_64-linux", env!("CARGO_PKG_VERSION"))
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn run(out: Option<PathBuf>) -> Result<()> {
    let out = out.unwrap_or_else(|| target_dir().join("dist"));
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let out = out.canonicalize()?;
    let name = name();
    let stage = out.join(&name);
    if stage.exists() {
        fs::remove_dir_all(&stage)?;
    }
    fs::create_dir_all(stage.join("bin"))?;

    let bins = build_static()?;
    for bin in ["tproxy", "tproxy-cni"] {
        copy_stripped(&bins.join(bin), &stage.join("bin").join(bin))?;
    }
    sh(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["run", "-q", "-p", "tproxy-cli", "--example", "dist", "--"])
            .arg(&stage)
            .current_dir(workspace())
            .stdout(Stdio::null()),
    )?;
    let ws = workspace();
    copy_tree(&ws.join("examples"), &stage.join("examples"), &|p| {
        p.extension().is_some_and(|e| e == "yaml" || e == "cfg")
    })?;
    copy_tree(&ws.join("deploy"), &stage.join("deploy"), &|_| true)?;
    fs::copy(ws.join("README.md"), stage.join("README.md"))?;

    let tarball = out.join(format!("{name}.tar.gz"));
    let mtime = output(
        Command::new("git")
            .args(["log", "-1", "--format=%ct"])
            .current_dir(&ws),
    )
    .map(|t| t.trim().to_string())
    .unwrap_or_else(|_| "0".into());
    write_tarball(&out, &name, &mtime, &tarball)?;
    let digest = format!("{:x}", Sha256::digest(fs::read(&tarball)?));
    let sums = out.join(format!("{name}.tar.gz.sha256"));
    fs::write(&sums, format!("{digest}  {name}.tar.gz\n"))?;
    eprintln!(
        "dist: {} ({:.1} MB), sha256 {digest} in {}",
        tarball.display(),
        fs::metadata(&tarball)?.len() as f64 / 1e6,
        sums.display()
    );
    println!("{}", tarball.display());
    Ok(())
}

/// Copies the files under `from` that `keep` wants (folders as needed),
/// with their modes.
fn copy_tree(from: &Path, to: &Path, keep: &dyn Fn(&Path) -> bool) -> Result<()> {
    for e in fs::read_dir(from)?.flatten() {
        let path = e.path();
        let dest = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            // The lab's own programs are no example configs.
            if path.file_name().is_some_and(|n| n == "src") {
                continue;
            }
            copy_tree(&path, &dest, keep)?;
        } else if keep(&path) {
            fs::create_dir_all(to)?;
            fs::copy(&path, &dest)?;
        }
    }
    Ok(())
}

/// `tar` of `out/name`, reproducible, through `gzip -n` into `tarball`.
fn write_tarball(out: &Path, name: &str, mtime: &str, tarball: &Path) -> Result<()> {
    let mut tar = Command::new("tar")
        .args([
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mode=go-w",
            &format!("--mtime=@{mtime}"),
            "-C",
        ])
        .arg(out)
        .args(["-cf", "-", name])
        .stdout(Stdio::piped())
        .spawn()
        .context("tar")?;
    let file = fs::File::create(tarball)?;
    let gzip = Command::new("gzip")
        .args(["-n", "-9"])
        .stdin(tar.stdout.take().expect("piped"))
        .stdout(file)
        .status()
        .context("gzip")?;
    let tar = tar.wait()?;
    if !tar.success() || !gzip.success() {
        let _ = fs::remove_file(tarball);
        bail!("writing {}: tar {tar}, gzip {gzip}", tarball.display());
    }
    Ok(())
}
