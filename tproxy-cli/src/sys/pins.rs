//! bpffs pins: what keeps the agent's targets attached while no agent
//! runs (a restart, or a SIGKILL until `tproxy cleanup`).
//!
//! Layout under `--bpffs DIR`: `node/<MAP>` for the shared maps and
//! `node/link_recv_fexit` or `node/link_recv_length` for the read hook
//! (fexit or tracepoint, `ReadHook::link_pin`); `targets/<slot>/<program>`
//! for each target's bpf_links (cgroup hooks, TCX). Netlink tc filters and
//! routing outlive the process by themselves.
//!
//! DIR is used where it is on a bpffs; otherwise tproxy mounts one on DIR
//! itself, only if DIR is empty (never on its parent), and that mount stays
//! while it holds pins: `tproxy cleanup` unmounts it once they are gone.
use std::{
    fs, io,
    os::{
        fd::{AsFd as _, BorrowedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use crate::sys::{Error, Result, bpf};

/// Pins the bpf_link `link_id` at `path`: it stays attached until the pin
/// is removed, whatever happens to this process.
pub fn pin_link_id(link_id: u32, path: &Path) -> Result<()> {
    let what = || format!("pinning link {link_id} at {}", path.display());
    let fd = bpf::link_get_fd_by_id(link_id).map_err(|e| Error::io(what(), e))?;
    bpf::obj_pin(fd.as_fd(), path).map_err(|e| Error::io(what(), e))
}

/// Pins the newest link running program `prog_id` (the one just made).
pub fn pin_newest_link_of(prog_id: u32, path: &Path) -> Result<()> {
    let link = aya::programs::loaded_links()
        .flatten()
        .filter(|l| l.program_id() == prog_id)
        .map(|l| l.id())
        .max()
        .ok_or_else(|| {
            Error::io(
                format!("pinning {}", path.display()),
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no link runs program {prog_id}"),
                ),
            )
        })?;
    pin_link_id(link, path)
}

/// Swaps the program of the link pinned at `path` for `new_prog`, in one
/// step (BPF_LINK_UPDATE): no moment with neither or both attached.
pub fn update_link(path: &Path, new_prog: BorrowedFd<'_>) -> io::Result<()> {
    bpf::link_update(bpf::obj_get(path)?.as_fd(), new_prog)
}

/// `path` is on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

/// The source a bpffs mount tproxy makes carries (the first column of
/// `mount`, the source field of /proc/self/mountinfo): `tproxy cleanup`
/// unmounts only a mount that says it is tproxy's.
const MOUNT_SOURCE: &str = "tproxy";

/// Files every bpffs mount has when the kernel preloads its iterators
/// (CONFIG_BPF_PRELOAD): not pins of ours.
const PRELOADED: [&str; 2] = ["maps.debug", "progs.debug"];

/// Makes `dir` a directory on a bpf filesystem without hiding anything:
/// - on a bpffs already: used as is;
/// - missing, below an existing directory on a bpffs: created there;
/// - an empty directory, or missing in an existing directory: a bpffs is
///   mounted on exactly `dir` (created first if missing), and true returned.
///
/// Anything else is refused with one line: a mount on a non-empty
/// directory, or on its parent (as tproxy did before: with
/// /var/lib/tproxy that hid the host's /var/lib), hides what is there.
pub fn ensure_bpffs(dir: &Path) -> Result<bool> {
    let refuse = |why: String| Error::BpffsUnsafe {
        dir: dir.to_path_buf(),
        why,
    };
    match fs::metadata(dir) {
        Ok(m) if !m.is_dir() => Err(refuse("is not a directory".into())),
        Ok(_) if is_bpffs(dir) => Ok(false),
        Ok(_) => {
            let mut entries = fs::read_dir(dir)
                .map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
            if entries.next().is_some() {
                return Err(refuse("is not on a bpf filesystem and is not empty".into()));
            }
            mount_bpffs(dir)?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let parent = dir.parent().unwrap_or(Path::new("/"));
            let existing = dir
                .ancestors()
                .skip(1)
                .find(|a| a.exists())
                .unwrap_or(Path::new("/"));
            if is_bpffs(existing) {
                fs::create_dir_all(dir)
                    .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
                return Ok(false);
            }
            // Off a bpffs only the last component is made: a chain of new
            // directories would be left behind by whoever unmounts.
            if existing != parent {
                return Err(refuse(format!(
                    "does not exist, nor does {}",
                    parent.display()
                )));
            }
            fs::create_dir(dir).map_err(|e| {
                refuse(format!(
                    "is not on a bpf filesystem and cannot be created ({e})"
                ))
            })?;
            if let Err(e) = mount_bpffs(dir) {
                let _ = fs::remove_dir(dir);
                return Err(e);
            }
            Ok(true)
        }
        Err(e) => Err(Error::io(format!("reading {}", dir.display()), e)),
    }
}

fn mount_bpffs(dir: &Path) -> Result<()> {
    nix::mount::mount(
        Some(MOUNT_SOURCE),
        dir,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| {
        Error::io(
            format!("mounting a bpf filesystem on {}", dir.display()),
            e.into(),
        )
    })?;
    tracing::info!(
        "mounted a bpf filesystem on {} (`tproxy cleanup` unmounts it once no agent runs)",
        dir.display()
    );
    Ok(())
}

/// The mount on `dir` (the topmost, if several are stacked there), from a
/// /proc/self/mountinfo text: (filesystem type, source).
fn mount_at(mountinfo: &str, dir: &Path) -> Option<(String, String)> {
    let want = dir.as_os_str().as_bytes();
    mountinfo.lines().rev().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let point = unescape(left.split(' ').nth(4)?);
        let mut r = right.split(' ');
        let fstype = r.next()?.to_string();
        let source = unescape(r.next()?);
        (point == want).then(|| (fstype, String::from_utf8_lossy(&source).into_owned()))
    })
}

/// mountinfo's octal escapes (`\040` for a space) undone.
fn unescape(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|o| b[i] == b'\\' && o.iter().all(|c| (b'0'..=b'7').contains(c)));
        match oct {
            Some(o) => {
                out.push(o.iter().fold(0u8, |n, c| n.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

/// Unmounts the bpffs tproxy mounted on `dir` (its source says so) once
/// nothing is pinned in it: while pins are there they keep targets
/// attached and the node's maps for the next agent. Ok(false): not a
/// mount of tproxy's, or pins remain. The directory itself stays.
pub fn unmount_ours(dir: &Path) -> Result<bool> {
    let Ok(dir) = dir.canonicalize() else {
        return Ok(false);
    };
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("reading /proc/self/mountinfo", e))?;
    if mount_at(&mountinfo, &dir) != Some(("bpf".into(), MOUNT_SOURCE.into())) {
        return Ok(false);
    }
    let pinned = fs::read_dir(&dir)
        .map_err(|e| Error::io(format!("reading {}", dir.display()), e))?
        .flatten()
        .any(|e| !PRELOADED.iter().any(|p| e.file_name() == *p));
    if pinned {
        return Ok(false);
    }
    nix::mount::umount(&dir).map_err(|e| {
        Error::io(
            format!(
                "unmounting the bpf filesystem tproxy mounted on {}",
                dir.display()
            ),
            e.into(),
        )
    })?;
    Ok(true)
}

/// A bpffs this run mounted: unmounted on drop (a start that failed),
/// unless kept (the agent serves: its pins must outlive it).
pub struct MountGuard {
    dir: Option<PathBuf>,
}

impl MountGuard {
    /// Guards `dir` if `mounted` (what [`ensure_bpffs`] returned).
    pub fn new(dir: &Path, mounted: bool) -> MountGuard {
        MountGuard {
            dir: mounted.then(|| dir.to_path_buf()),
        }
    }

    pub fn keep(mut self) {
        self.dir = None;
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            // Everything pinned in it is this failed start's own.
            if let Err(e) = nix::mount::umount(dir) {
                tracing::warn!(
                    "unmounting the bpf filesystem mounted on {}: {e}",
                    dir.display()
                );
            }
        }
    }
}

/// Where the shared maps and node-wide links are pinned.
pub fn node_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("node")
}

/// Where target `slot`'s links are pinned.
pub fn target_dir(bpffs: &Path, slot: u32) -> PathBuf {
    bpffs.join("targets").join(slot.to_string())
}

/// Removes every pin under `dir` and the directories: links pinned there
/// detach, maps go once no program uses them. Returns what it removed.
pub fn remove_tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(remove_tree(&p));
        } else if fs::remove_file(&p).is_ok() {
            out.push(p);
        }
    }
    let _ = fs::remove_dir(dir);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_topmost_mount_on_a_directory_is_found() {
        let info = "\
22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw
68 47 0:40 / /tmp/a\\040b rw,relatime - bpf tproxy rw
69 68 0:41 / /var/lib rw,relatime shared:9 - ext4 /dev/sda1 rw
70 69 0:42 / /var/lib rw,relatime - bpf bpf rw,mode=700
";
        assert_eq!(
            mount_at(info, Path::new("/tmp/a b")),
            Some(("bpf".into(), "tproxy".into()))
        );
        assert_eq!(
            mount_at(info, Path::new("/var/lib")),
            Some(("bpf".into(), "bpf".into()))
        );
        assert_eq!(mount_at(info, Path::new("/tmp/a")), None);
        assert_eq!(mount_at(info, Path::new("/var")), None);
    }

    /// The refusals come before anything is created or mounted.
    #[test]
    fn a_directory_that_would_hide_something_is_refused_with_one_line() {
        let tmp = tempfile::tempdir().unwrap();
        let full = tmp.path().join("lib");
        fs::create_dir(&full).unwrap();
        fs::write(full.join("keep"), "the host's").unwrap();
        let file = tmp.path().join("file");
        fs::write(&file, "").unwrap();
        let deep = tmp.path().join("no/such/dir");
        for (dir, why) in [
            (&full, "is not on a bpf filesystem and is not empty"),
            (&file, "is not a directory"),
            (&deep, "does not exist, nor does"),
        ] {
            let e = ensure_bpffs(dir).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, Error::BpffsUnsafe { .. }), "{msg}");
            assert!(
                msg.contains(why) && msg.contains("empty directory"),
                "{msg}"
            );
            assert_eq!(msg.lines().count(), 1, "{msg}");
        }
        assert!(full.join("keep").exists() && !tmp.path().join("no").exists());
        // Not a mount of tproxy's: nothing to unmount.
        assert!(!unmount_ours(tmp.path()).unwrap());
    }
}
