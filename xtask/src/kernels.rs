//! The guest kernels of the kernel matrix: Debian's packaged kernels,
//! installed like any package (into /boot and /lib/modules, where
//! virtme-ng finds them), and virtme-ng itself (PyPI, pinned, in a venv of
//! its own). `setup` installs what is missing; with everything present it
//! only looks at /boot.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::output;

/// A kernel the matrix boots.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Kernel {
    /// What `--kernel` takes and the table shows.
    pub name: &'static str,
    /// The release prefix of its package (`/boot/vmlinuz-<prefix>…`).
    prefix: &'static str,
    /// The metapackage that names the newest ABI package, and the suite it
    /// is in (`None`: the machine's own apt sources, bookworm).
    meta: &'static str,
    suite: Option<&'static str>,
    /// Who runs it.
    pub who: &'static str,
}

pub const KERNELS: &[Kernel] = &[
    Kernel {
        name: "6.1",
        prefix: "6.1.0-",
        meta: "linux-image-amd64",
        suite: None,
        who: "Debian 12, Amazon Linux 2023",
    },
    Kernel {
        name: "6.12",
        prefix: "6.12.",
        meta: "linux-image-6.12-amd64",
        suite: None,
        who: "Debian 13, RHEL 10",
    },
    Kernel {
        name: "5.10",
        prefix: "5.10.0-",
        meta: "linux-image-amd64",
        suite: Some("bullseye"),
        who: "Debian 11 (the generation of RHEL 8, Ubuntu 20.04)",
    },
];

pub fn by_name(name: &str) -> Option<Kernel> {
    KERNELS.iter().copied().find(|k| k.name == name)
}

/// virtme-ng, pinned, and where its venv lives.
pub const VNG_VERSION: &str = "1.42";
pub const VNG_PREFIX: &str = "/opt/tproxy/virtme-ng";

pub fn vng() -> PathBuf {
    Path::new(VNG_PREFIX).join("bin/vng")
}

/// Debian packages the guests need: QEMU (software emulation: nested KVM
/// does not boot here), a static busybox for virtme-ng's init, and
/// initramfs-tools for the kernel packages' postinst.
pub const PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "initramfs-tools"];

/// The installed kernel of this line, newest first by release: its
/// vmlinuz and release string. Only one whose modules are installed too
/// (virtme-ng loads virtio and 9p from them).
pub fn installed(k: Kernel) -> Option<(PathBuf, String)> {
    let mut found: Vec<String> = std::fs::read_dir("/boot")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let rel = name.strip_prefix("vmlinuz-")?.to_string();
            (rel.starts_with(k.prefix)
                && rel.ends_with("-amd64")
                && Path::new("/lib/modules")
                    .join(&rel)
                    .join("modules.dep")
                    .exists())
            .then_some(rel)
        })
        .collect();
    // "6.1.0-57" > "6.1.0-9": compare the numbers, not the text.
    let key = |r: &String| -> Vec<u64> {
        r.split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect()
    };
    found.sort_by_key(key);
    let rel = found.pop()?;
    Some((Path::new("/boot").join(format!("vmlinuz-{rel}")), rel))
}

/// apt options for a suite the machine's sources do not have: lists and
/// cache of its own, so the host's apt configuration is left as it was.
fn apt_opts(suite: &str) -> Result<Vec<String>> {
    let dir = Path::new("/var/lib/tproxy/apt").join(suite);
    std::fs::create_dir_all(dir.join("lists/partial"))?;
    std::fs::create_dir_all(dir.join("cache/archives/partial"))?;
    let list = dir.join("sources.list");
    let key = "signed-by=/usr/share/keyrings/debian-archive-keyring.gpg";
    std::fs::write(
        &list,
        format!(
            "deb [{key}] http://deb.debian.org/debian {suite} main\n\
             deb [{key}] http://deb.debian.org/debian-security {suite}-security main\n"
        ),
    )?;
    Ok(vec![
        format!("-oDir::Etc::SourceList={}", list.display()),
        "-oDir::Etc::SourceParts=/nonexistent".into(),
        format!("-oDir::State::Lists={}", dir.join("lists").display()),
        format!("-oDir::Cache={}", dir.join("cache").display()),
    ])
}

/// `apt-get OPTS ARGS`, non-interactive; fails on a non-zero exit.
pub fn apt(args: &[&str], opts: &[String]) -> Result<()> {
    let st = Command::new("apt-get")
        .args(opts)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("apt-get")?;
    if !st.success() {
        bail!("apt-get {} failed", args.join(" "));
    }
    Ok(())
}

/// Installs the newest ABI package the kernel's metapackage names (not the
/// metapackage: an archive update must not make setup install another).
pub fn install(k: Kernel) -> Result<String> {
    let opts = match k.suite {
        Some(s) => {
            let o = apt_opts(s)?;
            apt(&["update", "-qq"], &o)?;
            o
        }
        None => Vec::new(),
    };
    let deps = output(
        Command::new("apt-cache")
            .args(&opts)
            .args(["depends", k.meta]),
    )?;
    let pkg = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .with_context(|| format!("apt-cache depends {} names no linux-image", k.meta))?
        .to_string();
    eprintln!(
        "setup: installing {pkg} for the {} guest (about 30 s)",
        k.name
    );
    match k.suite {
        None => apt(
            &["install", "-y", "-qq", "--no-install-recommends", &pkg],
            &[],
        )?,
        Some(_) => {
            // Downloaded from its suite, installed with the machine's own
            // sources answering its dependencies (kmod, initramfs-tools).
            let dir = tempdir()?;
            let st = Command::new("apt-get")
                .args(&opts)
                .args(["download", "-qq", &pkg])
                .current_dir(&dir)
                .status()?;
            if !st.success() {
                let _ = std::fs::remove_dir_all(&dir);
                bail!("apt-get download {pkg} failed");
            }
            let deb = std::fs::read_dir(&dir)?
                .flatten()
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|x| x == "deb"))
                .context("apt-get download left no .deb")?;
            let r = apt(
                &[
                    "install",
                    "-y",
                    "-qq",
                    "--no-install-recommends",
                    &deb.to_string_lossy(),
                ],
                &[],
            );
            let _ = std::fs::remove_dir_all(&dir);
            r?;
        }
    }
    Ok(pkg)
}

fn tempdir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("tproxy-kernel-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// virtme-ng into its venv, if missing.
pub fn install_vng() -> Result<()> {
    let prefix = Path::new(VNG_PREFIX);
    if !prefix.join("bin/python3").exists() {
        crate::sh(Command::new("python3").args(["-m", "venv"]).arg(prefix))?;
    }
    crate::sh(
        Command::new(prefix.join("bin/pip"))
            .args(["install", "-q", "--disable-pip-version-check"])
            .arg(format!("virtme-ng=={VNG_VERSION}")),
    )
}

pub fn vng_installed() -> bool {
    Command::new(vng())
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(VNG_VERSION))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_has_a_distinct_name_and_prefix() {
        for (i, a) in KERNELS.iter().enumerate() {
            for b in &KERNELS[i + 1..] {
                assert_ne!(a.name, b.name);
                assert!(!a.prefix.starts_with(b.prefix) && !b.prefix.starts_with(a.prefix));
            }
        }
        assert_eq!(by_name("6.12").unwrap().prefix, "6.12.");
        assert!(by_name("4.19").is_none());
    }
}
