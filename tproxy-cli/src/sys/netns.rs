//! Network namespaces by inode, as runtime records name them: their
//! `ip netns` name, finding the one a dead instance ran in (which may not be
//! ours), and running code inside it.
use std::{
    fs::{self, File},
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use nix::sched::{CloneFlags, setns};

use crate::sys::{Error, Result};

/// Where `ip netns` keeps its named namespaces.
const NAMED: &str = "/run/netns";

/// (device, inode) of a namespace file; nsfs files share one device, which
/// tells them from plain files that happen to have the same inode number.
fn id_of(path: &Path) -> Option<(u64, u64)> {
    fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

fn nsfs_dev() -> Option<u64> {
    id_of(Path::new("/proc/self/ns/net")).map(|(dev, _)| dev)
}

/// Files that refer to the namespace `inode`: its `ip netns` name, then
/// `/proc/<pid>/ns/net` of processes in it.
fn candidates(inode: u64) -> Vec<(PathBuf, Option<String>)> {
    let Some(dev) = nsfs_dev() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in fs::read_dir(NAMED).into_iter().flatten().flatten() {
        if id_of(&e.path()) == Some((dev, inode)) {
            out.push((e.path(), Some(e.file_name().to_string_lossy().into_owned())));
        }
    }
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let p = e.path().join("ns/net");
        if id_of(&p) == Some((dev, inode)) {
            out.push((p, None));
            break; // one process is enough
        }
    }
    out
}

/// The `ip netns` name of the namespace `inode`, if it has one.
pub fn name_of(inode: u64) -> Option<String> {
    let dev = nsfs_dev()?;
    fs::read_dir(NAMED)
        .ok()?
        .flatten()
        .find(|e| id_of(&e.path()) == Some((dev, inode)))
        .map(|e| e.file_name().to_string_lossy().into_owned())
}

/// Inode of the calling thread's network namespace.
pub fn current_inode() -> Result<u64> {
    fs::metadata("/proc/thread-self/ns/net")
        .map(|m| m.ino())
        .map_err(|e| Error::io("reading /proc/thread-self/ns/net", e))
}

/// SO_NETNS_COOKIE of the calling thread's network namespace, from a
/// socket that needs no address (Linux >= 5.14).
pub fn current_cookie() -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: plain socket(2); the fd is owned right after.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie and len are valid for the kernel to write.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Where a namespace named in a record is now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Located {
    /// The caller's own namespace.
    Here,
    /// Another one, entered through `path`.
    At { path: PathBuf, name: Option<String> },
    /// Gone: nothing refers to it any more (or only a newer namespace that
    /// reuses its inode, told apart by the cookie).
    Gone,
}

/// Finds the namespace with `inode` and, if known (non-zero), `cookie`.
pub fn locate(inode: u64, cookie: u64) -> Located {
    let cookie_matches = |c: std::io::Result<u64>| cookie == 0 || c.is_ok_and(|c| c == cookie);
    if current_inode().is_ok_and(|i| i == inode) {
        // Two live namespaces never share an inode: if this one is not the
        // recorded one, that one is gone.
        return if cookie_matches(current_cookie()) {
            Located::Here
        } else {
            Located::Gone
        };
    }
    for (path, name) in candidates(inode) {
        if cookie == 0 || run_in(&path, current_cookie).is_ok_and(cookie_matches) {
            return Located::At { path, name };
        }
    }
    Located::Gone
}

/// Runs `f` in the namespace `path` refers to, on a thread of its own
/// (setns changes only the calling thread; sockets `f` opens, and
/// processes it starts, live in that namespace).
pub fn run_in<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    let ns = File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
                Error::io(
                    format!("entering the network namespace {}", path.display()),
                    e.into(),
                )
            })?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// Runs `f` where `at` says: here, or in another namespace.
pub fn run_located<T: Send>(at: &Located, f: impl FnOnce() -> T + Send) -> Option<Result<T>> {
    match at {
        Located::Here => Some(Ok(f())),
        Located::At { path, .. } => Some(run_in(path, f)),
        Located::Gone => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_namespace_is_here_and_a_foreign_cookie_is_gone() {
        let ino = current_inode().unwrap();
        let cookie = current_cookie().unwrap();
        assert_ne!(cookie, 0);
        assert_eq!(locate(ino, cookie), Located::Here);
        assert_eq!(locate(ino, 0), Located::Here);
        assert_eq!(locate(ino, cookie + 1), Located::Gone);
        // Entering our own namespace by path gives the same cookie.
        let path = Path::new("/proc/self/ns/net");
        assert_eq!(run_in(path, current_cookie).unwrap().unwrap(), cookie);
        // No namespace has inode 1.
        assert_eq!(locate(1, 0), Located::Gone);
    }
}
