//! The integration suite inside a QEMU guest booted on one of Debian's
//! kernels (virtme-ng: the host's root file system over 9p, so the guest
//! runs the binaries this build made). The host half builds, boots and
//! reads the guest's report; the guest half (`cargo xtask guest-suite`,
//! run inside the guest) probes the kernel, picks the tests and runs them.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::{
    kernels::{self, Kernel},
    matrix::{self, Caps, Depth, Plan, Row},
};

/// What the host hands the guest.
#[derive(Serialize, Deserialize)]
pub struct Job {
    pub kernel: String,
    pub depth: Depth,
    /// The kernels run before this one in this run, the host first.
    pub seen: Vec<Caps>,
    /// Only these columns (keys), if any.
    pub only: Vec<String>,
    /// Only these tests (names), if any.
    #[serde(default)]
    pub tests: Vec<String>,
    /// Test binary name → its executable.
    pub bins: BTreeMap<String, PathBuf>,
    pub tproxy: PathBuf,
    pub cwd: PathBuf,
}

/// The line that carries the guest's row back to the host.
const ROW_TAG: &str = "@@kernel-matrix-row ";

/// The root integration tests' executables, built (debug, as `cargo test`
/// builds them), by test name.
pub fn build_tests() -> Result<BTreeMap<String, PathBuf>> {
    crate::build_bins(false)?;
    let out = crate::output(Command::new("cargo").args([
        "test",
        "-q",
        "--no-run",
        "-p",
        "tproxy-cli",
        "--tests",
        "--message-format=json",
    ]))?;
    let mut bins = BTreeMap::new();
    for line in out.lines() {
        let Ok(m) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if m["reason"] == "compiler-artifact"
            && m["target"]["kind"][0] == "test"
            && let Some(exe) = m["executable"].as_str()
        {
            let name = m["target"]["name"].as_str().unwrap_or("").to_string();
            bins.insert(name, PathBuf::from(exe));
        }
    }
    if bins.is_empty() {
        bail!("cargo test --no-run named no test executable");
    }
    Ok(bins)
}

/// Boots the kernel, runs its part of the suite, returns its row. The
/// guest is killed (its process group) past `limit`.
pub fn run(
    k: Kernel,
    depth: Depth,
    seen: &[Caps],
    only: &[String],
    tests: &[String],
    limit: Duration,
) -> Result<Row> {
    let (vmlinuz, release) = kernels::installed(k).with_context(|| {
        format!(
            "the {} kernel is not installed: run `cargo xtask setup`",
            k.name
        )
    })?;
    let bins = build_tests()?;
    let root = crate::repo_root();
    let job = Job {
        kernel: k.name.to_string(),
        depth,
        seen: seen.to_vec(),
        only: only.to_vec(),
        tests: tests.to_vec(),
        bins,
        tproxy: crate::target_dir().join("debug/tproxy"),
        cwd: root.join("tproxy-cli"),
    };
    let dir = crate::target_dir().join("matrix");
    std::fs::create_dir_all(&dir)?;
    let job_file = dir.join(format!("{}.job.json", k.name));
    std::fs::write(&job_file, serde_json::to_vec(&job)?)?;
    let xtask = std::env::current_exe()?;
    eprintln!(
        "\n== kernel {} ({release}): booting a guest (QEMU, software emulation) ==",
        k.name
    );
    let t0 = Instant::now();
    let mut cmd = Command::new(kernels::vng());
    cmd.arg("--run")
        .arg(&vmlinuz)
        .args([
            "--disable-kvm",
            "--force-9p",
            "--cpus",
            "2",
            "--memory",
            "4G",
        ])
        .arg("--cwd")
        .arg(&job.cwd)
        .arg("--")
        .arg(format!(
            "{} guest-suite --job {}",
            xtask.display(),
            job_file.display()
        ))
        // vng finds qemu-system-x86_64 and its own helpers on PATH.
        .env(
            "PATH",
            format!(
                "{}:{}",
                Path::new(kernels::VNG_PREFIX).join("bin").display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        // Both piped: virtme-ng reopens the console it is given, and a
        // regular file (CI's log) opened anew is truncated, losing
        // everything the host's suite printed before.
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Its own process group: a guest past its limit is ended whole (vng
    // and the qemu it started), and nothing else.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().context("starting vng")?;
    let pgid = child.id() as i32;
    let watchdog = std::thread::spawn(move || {
        let t = Instant::now();
        while t.elapsed() < limit {
            std::thread::sleep(Duration::from_secs(1));
            // SAFETY: signal 0 only asks whether the group still exists.
            if unsafe { libc::kill(-pgid, 0) } != 0 {
                return false;
            }
        }
        // SAFETY: the group is the one we made for this guest.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        true
    });
    let stderr = child.stderr.take().expect("piped");
    let name = k.name;
    let errs = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[{name}] {line}");
        }
    });
    let mut row: Option<Row> = None;
    let stdout = child.stdout.take().expect("piped");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if let Some(json) = line.strip_prefix(ROW_TAG) {
            row = Some(serde_json::from_str(json).context("the guest's row")?);
            continue;
        }
        // The guest's console pads some lines with thousands of spaces.
        let shown = if line.len() > 200 {
            line.trim()
        } else {
            line.trim_end()
        };
        println!("[{}] {shown}", k.name);
        std::io::stdout().flush()?;
    }
    let st = child.wait()?;
    let _ = errs.join();
    let killed = watchdog.join().unwrap_or(false);
    if killed {
        bail!(
            "the {} guest ran past its limit of {} s and was stopped",
            k.name,
            limit.as_secs()
        );
    }
    let mut row = row.with_context(|| format!("the {} guest reported no row ({st})", k.name))?;
    row.seconds = t0.elapsed().as_secs();
    Ok(row)
}

/// Inside the guest: probe, plan, run, report.
pub fn suite(job_file: &Path) -> Result<()> {
    let job: Job = serde_json::from_slice(&std::fs::read(job_file)?)?;
    // virtme-ng mounts no bpffs; tproxy and the tests pin there.
    let bpffs = Path::new("/sys/fs/bpf");
    if !is_mount(bpffs) {
        let _ = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(bpffs)
            .status();
    }
    let caps = matrix::Caps {
        // Nested KVM does not boot here: every guest is emulated (TCG).
        emulated: true,
        ..matrix::probe(&job.tproxy)?
    };
    println!(
        "kernel {} ({}): steering {}, acceleration {}, tc {}, read hook {}",
        job.kernel,
        caps.release,
        caps.steering_missing.as_deref().unwrap_or("ok"),
        caps.lacks(matrix::Need::Accel).unwrap_or("ok"),
        caps.tc,
        caps.read_hook
    );
    let plan = matrix::plan(&caps, &job.seen, job.depth, &job.only, &job.tests);
    let mut row = Row {
        kernel: job.kernel.clone(),
        caps: caps.clone(),
        depth: format!("{:?}", job.depth).to_lowercase(),
        date: crate::output(Command::new("date").args(["-u", "+%Y-%m-%d"]))?
            .trim()
            .to_string(),
        ..Default::default()
    };
    let mut to_run: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (col, tests) in &plan {
        for (bin, name, p) in tests {
            let key = format!("{bin}::{name}");
            match p {
                Plan::Run => to_run.entry(bin).or_default().push(name),
                Plan::Covered => {
                    row.tests
                        .insert(key, "not run: its code path ran on a kernel before".into());
                }
                Plan::NotApplicable(why) => {
                    println!(
                        "not applicable on Linux {}: {key} ({}): {why}",
                        caps.release, col.title
                    );
                    row.tests.insert(key, format!("not applicable: {why}"));
                }
            }
        }
    }
    for (bin, names) in to_run {
        let exe = job
            .bins
            .get(bin)
            .with_context(|| format!("no test executable named {bin}"))?;
        println!("\n-- {bin}: {} tests", names.len());
        // Tests that change the machine (`Need::OwnMachine`, ignored on the
        // host) run after the rest, one at a time.
        let (alone, together): (Vec<&str>, Vec<&str>) =
            names.iter().partition(|n| matrix::runs_alone(n));
        for (group, threads) in [(&together, "2"), (&alone, "1")] {
            if group.is_empty() {
                continue;
            }
            let mut child = Command::new(exe)
                .args(["--exact", "--include-ignored", "--test-threads", threads])
                .args(group)
                .env("TPROXY_GUEST", "1")
                .current_dir(&job.cwd)
                .stdout(Stdio::piped())
                .spawn()
                .with_context(|| format!("running {}", exe.display()))?;
            let stdout = child.stdout.take().expect("piped");
            for line in BufReader::new(stdout).lines() {
                let line = line?;
                println!("{line}");
                if let Some((name, outcome)) = test_line(&line) {
                    row.tests
                        .insert(format!("{bin}::{name}"), outcome.to_string());
                }
            }
            child.wait()?;
        }
        for name in names {
            row.tests
                .entry(format!("{bin}::{name}"))
                .or_insert_with(|| "FAILED".into());
        }
    }
    println!("{ROW_TAG}{}", serde_json::to_string(&row)?);
    Ok(())
}

/// `test NAME ... ok` (or FAILED, ignored, and `ignored, REASON` for a
/// test whose #[ignore] gives one).
pub fn test_line(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix("test ")?;
    let (name, outcome) = rest.rsplit_once(" ... ")?;
    match outcome {
        "ok" | "FAILED" | "ignored" => Some((name, outcome)),
        o if o.starts_with("ignored, ") => Some((name, "ignored")),
        _ => None,
    }
}

fn is_mount(p: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|m| {
        m.lines()
            .any(|l| l.split_whitespace().nth(1) == Some(&*p.to_string_lossy()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_lines_are_read_and_others_are_not() {
        assert_eq!(test_line("test a_b ... ok"), Some(("a_b", "ok")));
        assert_eq!(test_line("test x ... FAILED"), Some(("x", "FAILED")));
        assert_eq!(
            test_line("test m ... ignored, changes the machine-wide tcp_mem"),
            Some(("m", "ignored"))
        );
        assert_eq!(test_line("test result: ok. 3 passed"), None);
        assert_eq!(test_line("running 3 tests"), None);
    }
}
