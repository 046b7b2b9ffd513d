//! `cargo xtask image`: the node agent's image, built with podman from
//! `deploy/Containerfile` on a machine that reaches only package
//! registries (crates.io, Debian's archive): nothing is pulled.
//!
//! The image is `FROM scratch`: the static (musl) release binaries, the
//! CNI install script, busybox (static, from Debian's `busybox-static`)
//! for that script and for a shell in the container, and `nft` with the
//! shared libraries it links, unpacked from Debian's `nftables` and its
//! dependencies (the tproxy back-end runs `nft -j -f -`). Static binaries
//! because `tproxy-cni` leaves the image: the init step copies it onto the
//! node, whose runtime runs it against the node's own libc, whatever that
//! is.
//!
//! The build context is assembled in `target/image/context`, its content
//! hashed; an image in podman's storage with that hash as its label is
//! reused, else an archive of it (`target/image/tproxy-<hash>.tar`, from
//! an earlier build) is loaded, else the image is built and the archive
//! written. The last line printed is the image reference.
use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use sha2::{Digest as _, Sha256};

use crate::{output, sh};

/// The image's name; the DaemonSet names it (`deploy/kubernetes/10-daemonset.yaml`).
pub const NAME: &str = "localhost/tproxy";
/// The label holding the build context's hash.
const LABEL: &str = "io.tproxy.context";
/// The musl target the static binaries are built for.
pub const MUSL: &str = "x86_64-unknown-linux-musl";
/// Debian's packages the image takes files from: `nft` (and, through
/// apt's dependency list, the libraries it links) and a static busybox.
const DEBS: &[&str] = &["nftables", "busybox-static"];

/// `localhost/tproxy:<version>`.
pub fn reference() -> String {
    format!("{NAME}:{}", env!("CARGO_PKG_VERSION"))
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
}

/// Builds the static release binaries (`tproxy`, `tproxy-cni`) and returns
/// their folder.
pub fn build_static() -> Result<PathBuf> {
    sh(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "build",
                "--release",
                "-q",
                "-p",
                "tproxy-cli",
                "--target",
                MUSL,
            ])
            .current_dir(workspace()),
    )
    .with_context(|| {
        format!("building the static binaries (the {MUSL} target: `cargo xtask setup` adds it)")
    })?;
    Ok(target_dir().join(MUSL).join("release"))
}

/// Copies `bin` to `to`, symbols stripped (the embedded eBPF object is
/// data, which stays): a quarter of the size.
pub fn copy_stripped(bin: &Path, to: &Path) -> Result<()> {
    sh(Command::new("strip")
        .arg("--strip-all")
        .arg("-o")
        .arg(to)
        .arg(bin))
    .with_context(|| format!("strip {} (binutils)", bin.display()))
}

pub fn run() -> Result<()> {
    let t0 = Instant::now();
    if which("podman").is_none() {
        bail!("podman is not installed: `cargo xtask setup` installs it");
    }
    let bins = build_static()?;
    let dir = target_dir().join("image");
    let context = dir.join("context");
    let debs = dir.join("debs");
    assemble(&bins, &debs, &context)?;
    let containerfile = workspace().join("deploy/Containerfile");
    let hash = hash_context(&containerfile, &context)?;
    let reference = reference();
    let archive = dir.join(format!("tproxy-{}.tar", &hash[..16]));
    let how = if label_of(&reference).as_deref() == Some(hash.as_str()) {
        "already in podman's storage"
    } else if archive.is_file() {
        sh(Command::new("podman")
            .args(["load", "-q", "-i"])
            .arg(&archive))?;
        "loaded from its archive"
    } else {
        sh(Command::new("podman")
            .args(["build", "-q", "--pull=never", "--label"])
            .arg(format!("{LABEL}={hash}"))
            .args(["-t", &reference, "-f"])
            .arg(&containerfile)
            .arg(&context))?;
        // One archive kept: the newest build's.
        for old in fs::read_dir(&dir)?.flatten() {
            let name = old.file_name().to_string_lossy().into_owned();
            if name.starts_with("tproxy-") && name.ends_with(".tar") {
                fs::remove_file(old.path())?;
            }
        }
        let tmp = dir.join(".archive.tmp");
        let _ = fs::remove_file(&tmp);
        sh(Command::new("podman")
            .args(["save", "-q", "--format", "docker-archive", "-o"])
            .arg(&tmp)
            .arg(&reference))?;
        fs::rename(&tmp, &archive)?;
        "built"
    };
    if label_of(&reference).as_deref() != Some(hash.as_str()) {
        bail!("{reference} does not carry the context's hash {hash} after it was {how}");
    }
    let size = output(Command::new("podman").args([
        "image",
        "inspect",
        "--format",
        "{{.Size}}",
        &reference,
    ]))?;
    eprintln!(
        "image: {how} in {:.1} s; {:.1} MB; context {}",
        t0.elapsed().as_secs_f64(),
        size.trim().parse::<f64>().unwrap_or(0.0) / 1e6,
        &hash[..16]
    );
    println!("{reference}");
    Ok(())
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

/// The label [`LABEL`] of the image `reference` in podman's storage.
fn label_of(reference: &str) -> Option<String> {
    let out = Command::new("podman")
        .args(["image", "inspect", "--format"])
        .arg(format!("{{{{index .Labels \"{LABEL}\"}}}}"))
        .arg(reference)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The build context, made again from scratch: `tproxy`, `tproxy-cni`,
/// `install-cni.sh`; `base/` (the file-system layout, busybox and its
/// applets); `nft/` (nft and its libraries).
fn assemble(bins: &Path, debs: &Path, context: &Path) -> Result<()> {
    if context.exists() {
        fs::remove_dir_all(context)?;
    }
    fs::create_dir_all(context)?;
    for bin in ["tproxy", "tproxy-cni"] {
        copy_stripped(&bins.join(bin), &context.join(bin))?;
    }
    fs::copy(
        workspace().join("deploy/install-cni.sh"),
        context.join("install-cni.sh"),
    )?;
    for f in ["tproxy", "tproxy-cni", "install-cni.sh"] {
        fs::set_permissions(context.join(f), fs::Permissions::from_mode(0o755))?;
    }

    let unpacked = debs.join("unpacked");
    if unpacked.exists() {
        fs::remove_dir_all(&unpacked)?;
    }
    for deb in fetch_debs(debs)? {
        let to = unpacked.join(deb.file_stem().expect("a .deb"));
        fs::create_dir_all(&to)?;
        sh(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&to))?;
    }

    let base = context.join("base");
    layout(&base)?;
    let busybox = fs::read_dir(&unpacked)?
        .flatten()
        .map(|e| e.path().join("bin/busybox"))
        .find(|p| p.is_file())
        .context("busybox-static has no bin/busybox")?;
    fs::copy(&busybox, base.join("usr/bin/busybox"))?;
    let applets = output(Command::new(&busybox).arg("--list"))?;
    for applet in applets.lines().map(str::trim).filter(|a| !a.is_empty()) {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", base.join("usr/bin").join(applet))?;
        }
    }

    let nft = context.join("nft");
    fs::create_dir_all(&nft)?;
    for pkg in fs::read_dir(&unpacked)?.flatten() {
        take_runtime_files(&pkg.path(), &nft)?;
    }
    if !nft.join("usr/sbin/nft").is_file() {
        bail!("nftables gave no usr/sbin/nft");
    }
    Ok(())
}

/// A merged-/usr layout (bin, sbin, lib, lib64 link into usr), /var/run
/// as /run (the DaemonSet mounts the node's /var/run/netns), /tmp, and
/// root in passwd and group.
fn layout(base: &Path) -> Result<()> {
    for d in [
        "usr/bin",
        "usr/sbin",
        "usr/lib",
        "usr/lib64",
        "usr/local/bin",
        "etc",
        "run",
        "var",
        "tmp",
        "root",
    ] {
        fs::create_dir_all(base.join(d))?;
    }
    fs::set_permissions(base.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    fs::set_permissions(base.join("root"), fs::Permissions::from_mode(0o700))?;
    for (link, to) in [
        ("bin", "usr/bin"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
        ("var/run", "../run"),
    ] {
        std::os::unix::fs::symlink(to, base.join(link))?;
    }
    fs::write(base.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    fs::write(base.join("etc/group"), "root:x:0:\n")?;
    Ok(())
}

/// From one unpacked package: `nft` and every shared library (`*.so*`,
/// the dynamic loader among them; not gconv's modules, which nft never
/// loads), moved into /usr as a merged-/usr system has them.
fn take_runtime_files(pkg: &Path, into: &Path) -> Result<()> {
    fn walk(root: &Path, dir: &Path, into: &Path) -> Result<()> {
        for e in fs::read_dir(dir)?.flatten() {
            let path = e.path();
            let rel = path.strip_prefix(root).expect("below root");
            let meta = fs::symlink_metadata(&path)?;
            if meta.is_dir() {
                if e.file_name() != "gconv" {
                    walk(root, &path, into)?;
                }
                continue;
            }
            let rels = rel.to_string_lossy();
            let in_lib = ["lib/", "lib64/", "usr/lib/", "usr/lib64/"]
                .iter()
                .any(|p| rels.starts_with(p));
            let wanted = rels == "usr/sbin/nft"
                || (in_lib && e.file_name().to_string_lossy().contains(".so"));
            if !wanted {
                continue;
            }
            let merged = if rels.starts_with("usr/") {
                rel.to_path_buf()
            } else {
                Path::new("usr").join(rel)
            };
            let to = into.join(merged);
            fs::create_dir_all(to.parent().expect("a file"))?;
            if meta.file_type().is_symlink() {
                std::os::unix::fs::symlink(fs::read_link(&path)?, &to)?;
            } else {
                fs::copy(&path, &to)?;
            }
        }
        Ok(())
    }
    walk(pkg, pkg, into)
}

/// The packages of [`DEBS`] and their dependencies, as .deb files in
/// `cache` (downloaded by apt once; apt's own list says which versions).
fn fetch_debs(cache: &Path) -> Result<Vec<PathBuf>> {
    fetch_debs_with(cache, false)
}

/// `fetch_debs`; `refreshed`: apt's lists were just updated.
fn fetch_debs_with(cache: &Path, refreshed: bool) -> Result<Vec<PathBuf>> {
    fs::create_dir_all(cache)?;
    let deps = output(
        Command::new("apt-cache")
            .args([
                "depends",
                "--recurse",
                "--no-recommends",
                "--no-suggests",
                "--no-conflicts",
                "--no-breaks",
                "--no-replaces",
                "--no-enhances",
            ])
            .args(DEBS),
    )?;
    // Package names start a line; dependencies are indented; virtual
    // packages are <bracketed>.
    let pkgs: BTreeSet<&str> = deps
        .lines()
        .filter(|l| !l.starts_with(' ') && !l.starts_with('<') && !l.is_empty())
        .collect();
    let uris = output(
        Command::new("apt-get")
            .args(["download", "--print-uris"])
            .args(&pkgs),
    )?;
    // 'http://…/nftables_1.0.6-2+deb12u2_amd64.deb' nftables_1.0.6-2+deb12u2_amd64.deb SIZE SHA256:…
    let files: Vec<String> = uris
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).map(String::from))
        .collect();
    let file_of = |pkg: &str| files.iter().find(|f| f.split('_').next() == Some(pkg));
    if let Some(pkg) = pkgs.iter().find(|p| file_of(p).is_none()) {
        bail!("apt-get download --print-uris names no file for {pkg}: {uris}");
    }
    let missing: Vec<&str> = pkgs
        .iter()
        .copied()
        .filter(|p| file_of(p).is_some_and(|f| !cache.join(f).is_file()))
        .collect();
    if !missing.is_empty() {
        eprintln!("image: downloading {}", missing.join(" "));
        // As root into a directory apt's sandbox user cannot write: apt
        // would warn and download as root anyway.
        let download = || {
            sh(Command::new("apt-get")
                .args(["-o", "APT::Sandbox::User=root", "download", "-q"])
                .args(&missing)
                .current_dir(cache))
        };
        if let Err(e) = download() {
            if refreshed {
                return Err(e).context("apt-get download (Debian's archive)");
            }
            // Package lists older than the archive name versions it no
            // longer has: once more with fresh ones.
            sh(Command::new("apt-get").args(["update", "-qq"]))?;
            return fetch_debs_with(cache, true);
        }
    }
    files
        .iter()
        .map(|f| {
            let p = cache.join(f);
            p.is_file()
                .then_some(p)
                .with_context(|| format!("apt-get download left no {f} in {}", cache.display()))
        })
        .collect()
}

/// sha256 over the Containerfile and every path, mode, link target and
/// file content of the context, in name order.
fn hash_context(containerfile: &Path, context: &Path) -> Result<String> {
    fn walk(root: &Path, dir: &Path, h: &mut Sha256) -> Result<()> {
        let mut entries: Vec<_> = fs::read_dir(dir)?.flatten().map(|e| e.path()).collect();
        entries.sort();
        for path in entries {
            let meta = fs::symlink_metadata(&path)?;
            let rel = path.strip_prefix(root).expect("below root");
            h.update(rel.as_os_str().as_encoded_bytes());
            h.update(meta.mode().to_le_bytes());
            if meta.file_type().is_symlink() {
                h.update(fs::read_link(&path)?.as_os_str().as_encoded_bytes());
            } else if meta.is_dir() {
                walk(root, &path, h)?;
            } else {
                h.update(fs::read(&path)?);
            }
            h.update([0]);
        }
        Ok(())
    }
    let mut h = Sha256::new();
    h.update(fs::read(containerfile)?);
    walk(context, context, &mut h)?;
    Ok(format!("{:x}", h.finalize()))
}
