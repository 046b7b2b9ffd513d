//! bpffs pins: what keeps the agent's targets attached while no agent
//! runs (a restart, or a SIGKILL until `tproxy cleanup`).
//!
//! Layout under `--bpffs DIR`: `node/<MAP>` for the shared maps and
//! `node/link_recv_length` for the recv tracepoint; `targets/<slot>/<program>`
//! for each target's bpf_links (cgroup hooks, TCX). Netlink tc filters and
//! routing outlive the process by themselves.
use std::{
    ffi::CString,
    fs, io,
    os::{
        fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use crate::{Error, Result};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// `bpf(cmd, attr)` with a zeroed attr of the union's size; `fill` sets the
/// command's fields (u32 words).
fn bpf(cmd: libc::c_long, fill: impl FnOnce(&mut [u32; 36])) -> io::Result<libc::c_long> {
    let mut attr = [0u32; 36];
    fill(&mut attr);
    // SAFETY: attr is a valid, zero-padded bpf_attr of 144 bytes.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel just returned this fd to us.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

fn pin_fd(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let p = cpath(path)?;
    let ptr = p.as_ptr() as u64;
    bpf(BPF_OBJ_PIN, |a| {
        a[0] = ptr as u32;
        a[1] = (ptr >> 32) as u32;
        a[2] = fd.as_raw_fd() as u32;
    })
    .map(drop)
}

/// A new descriptor of the object pinned at `path`.
pub fn open_pin(path: &Path) -> io::Result<OwnedFd> {
    let p = cpath(path)?;
    let ptr = p.as_ptr() as u64;
    bpf(BPF_OBJ_GET, |a| {
        a[0] = ptr as u32;
        a[1] = (ptr >> 32) as u32;
    })
    .map(owned)
}

/// Pins the bpf_link `link_id` at `path`: it stays attached until the pin
/// is removed, whatever happens to this process.
pub fn pin_link_id(link_id: u32, path: &Path) -> Result<()> {
    let what = || format!("pinning link {link_id} at {}", path.display());
    let fd = bpf(BPF_LINK_GET_FD_BY_ID, |a| a[0] = link_id)
        .map(owned)
        .map_err(|e| Error::io(what(), e))?;
    pin_fd(fd.as_fd(), path).map_err(|e| Error::io(what(), e))
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
    let link = open_pin(path)?;
    bpf(BPF_LINK_UPDATE, |a| {
        a[0] = link.as_raw_fd() as u32;
        a[1] = new_prog.as_raw_fd() as u32;
    })
    .map(drop)
}

/// `path` is on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Makes `dir` a directory on a bpf filesystem: as is if it is one (or
/// its parent is), else mounts bpffs on its parent (as Cilium does for
/// /sys/fs/bpf) when the parent is not one.
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    if dir.exists() && is_bpffs(dir) {
        return Ok(());
    }
    let parent = dir.parent().unwrap_or(Path::new("/"));
    if !is_bpffs(parent) {
        fs::create_dir_all(parent)
            .map_err(|e| Error::io(format!("creating {}", parent.display()), e))?;
        nix::mount::mount(
            Some("bpf"),
            parent,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| {
            Error::io(
                format!(
                    "mounting a bpf filesystem on {} (needed to keep targets attached across agent restarts; mount one there, or pass --bpffs on one)",
                    parent.display()
                ),
                e.into(),
            )
        })?;
        tracing::info!("mounted a bpf filesystem on {}", parent.display());
    }
    fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))
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
