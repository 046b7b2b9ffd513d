//! podman in a world of its own: its containers.conf, storage, run root,
//! temp dir and CNI config dir live in a temp dir of the test's, so the
//! host's /etc/containers, /etc/cni and /var/lib/containers/storage are
//! never read or written. Dropping it removes every pod, container and
//! image it made, any mount left below its dir, and the dir; the caches
//! podman writes outside its storage whatever it is told (the image blob
//! cache under /var/lib/containers/cache, libcni's results under
//! /var/lib/cni) go too when they were not there before (the last
//! [`Podman`] of the process removes them).
//!
//! The settings are the ones this host needs (docs/testing.md): runc
//! (crun refuses hybrid cgroups), the cgroupfs manager (PID 1 is not
//! systemd), ulimits podman may set without CAP_SYS_RESOURCE, the CNI
//! back-end.
use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::Mutex,
    time::Duration,
};

use super::eventually;

/// Host paths podman writes to whatever its configuration says.
const HOST_CACHES: &[&str] = &["/var/lib/containers", "/var/lib/cni"];

/// Live [`Podman`]s of this process, and which [`HOST_CACHES`] were
/// missing before the first of them.
static LIVE: Mutex<(usize, Vec<&'static str>)> = Mutex::new((0, Vec::new()));

pub struct Podman {
    pub dir: tempfile::TempDir,
}

/// Where a pod network's CNI plugins and config are.
pub struct Cni<'a> {
    pub config_dir: &'a Path,
    pub plugin_dirs: &'a [&'a Path],
}

impl Podman {
    /// podman with private storage; with `cni`, its CNI back-end reads
    /// networks from `cni.config_dir` and runs plugins from
    /// `cni.plugin_dirs`.
    pub fn new(cni: Option<Cni<'_>>) -> Podman {
        {
            let mut live = LIVE.lock().unwrap();
            if live.0 == 0 {
                live.1 = HOST_CACHES
                    .iter()
                    .copied()
                    .filter(|p| !Path::new(p).exists())
                    .collect();
            }
            live.0 += 1;
        }
        let dir = tempfile::Builder::new()
            .prefix("tpx-podman-")
            .tempdir()
            .unwrap();
        let p = |s: &str| dir.path().join(s).display().to_string();
        let default_net = dir.path().join("net.d");
        std::fs::create_dir_all(&default_net).unwrap();
        let (net_dir, plugin_dirs) = match &cni {
            Some(c) => (
                c.config_dir.display().to_string(),
                c.plugin_dirs
                    .iter()
                    .map(|d| format!("{:?}", d.display().to_string()))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            None => (
                default_net.display().to_string(),
                format!("{:?}", tproxy_lab::cni::CNI_PATH),
            ),
        };
        std::fs::write(
            dir.path().join("containers.conf"),
            format!(
                "[containers]\n\
                 default_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"]\n\
                 [network]\n\
                 network_backend = \"cni\"\n\
                 network_config_dir = {net_dir:?}\n\
                 cni_plugin_dirs = [{plugin_dirs}]\n\
                 [engine]\n\
                 cgroup_manager = \"cgroupfs\"\n\
                 runtime = \"runc\"\n\
                 events_logger = \"file\"\n\
                 events_logfile_path = {:?}\n\
                 tmp_dir = {:?}\n\
                 volume_path = {:?}\n",
                p("events.log"),
                p("tmp"),
                p("volumes"),
            ),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("storage.conf"),
            format!(
                "[storage]\ndriver = \"overlay\"\ngraphroot = {:?}\nrunroot = {:?}\n",
                p("storage"),
                p("run"),
            ),
        )
        .unwrap();
        // No registry is reachable: none is searched.
        std::fs::write(
            dir.path().join("registries.conf"),
            "unqualified-search-registries = []\n",
        )
        .unwrap();
        Podman { dir }
    }

    /// `podman` with this world's configuration.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new("podman");
        self.env(&mut cmd);
        cmd
    }

    /// Points `cmd` (podman, or something that runs it) at this world.
    pub fn env(&self, cmd: &mut Command) {
        cmd.env("CONTAINERS_CONF", self.dir.path().join("containers.conf"))
            .env(
                "CONTAINERS_STORAGE_CONF",
                self.dir.path().join("storage.conf"),
            )
            .env(
                "CONTAINERS_REGISTRIES_CONF",
                self.dir.path().join("registries.conf"),
            );
    }

    /// `podman ARGS`, which must succeed: its stdout.
    pub fn run(&self, args: &[&str]) -> String {
        let out = self.output(args);
        assert!(
            out.status.success(),
            "podman {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn output(&self, args: &[&str]) -> Output {
        self.command().args(args).output().unwrap()
    }

    /// `cargo xtask image` into this storage; the reference it prints last.
    pub fn build_image(&self) -> String {
        let t0 = std::time::Instant::now();
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(["xtask", "image"])
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
        self.env(&mut cmd);
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "cargo xtask image: {stderr}{stdout}");
        eprintln!(
            "cargo xtask image: {:.1} s; {}",
            t0.elapsed().as_secs_f64(),
            stderr.trim()
        );
        stdout.lines().last().unwrap().trim().to_string()
    }

    /// The container `name`'s main process as the host sees it.
    pub fn pid_of(&self, name: &str) -> i32 {
        self.run(&["inspect", "--format", "{{.State.Pid}}", name])
            .trim()
            .parse()
            .unwrap()
    }

    /// Waits until `name` is no longer running; its exit code.
    pub fn wait_exited(&self, name: &str, timeout: Duration) -> i32 {
        let state = || {
            self.run(&[
                "inspect",
                "--format",
                "{{.State.Status}} {{.State.ExitCode}}",
                name,
            ])
        };
        eventually(&format!("{name} exited"), timeout, || {
            !state().starts_with("running")
        });
        state().split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Mounts below our dir, deepest first.
    fn mounts_below(&self) -> Vec<PathBuf> {
        let dir = self.dir.path().to_string_lossy().into_owned();
        let mut m: Vec<PathBuf> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&format!("{dir}/")))
            .map(PathBuf::from)
            .collect();
        m.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        m
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        for args in [
            &["pod", "rm", "--all", "--force", "--time", "0"][..],
            &["rm", "--all", "--force", "--time", "0"],
            &["rmi", "--all", "--force"],
        ] {
            let out = self.output(args);
            if !out.status.success() {
                eprintln!(
                    "podman {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        for m in self.mounts_below() {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        let mut live = LIVE.lock().unwrap();
        live.0 -= 1;
        if live.0 == 0 {
            for p in std::mem::take(&mut live.1) {
                let _ = std::fs::remove_dir_all(p);
            }
        }
    }
}
