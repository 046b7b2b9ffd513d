//! Facts about the host that tproxy checks before it installs anything.
use std::{
    ffi::CString,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use crate::{Error, Result};

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Effective capabilities of this process, from /proc/self/status.
fn effective_caps() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// Loading and attaching needs CAP_BPF (or the older CAP_SYS_ADMIN) and
/// CAP_NET_ADMIN (tc, sockops, cgroup sockopt).
pub fn check_privileges() -> Result<()> {
    let caps = effective_caps();
    let has = |c: u32| caps & (1u64 << c) != 0;
    if (has(CAP_BPF) || has(CAP_SYS_ADMIN)) && has(CAP_NET_ADMIN) {
        Ok(())
    } else {
        Err(Error::NotPrivileged)
    }
}

/// The interface's index in this network namespace.
pub fn ifindex(name: &str) -> Result<u32> {
    let c = CString::new(name).map_err(|_| Error::NoSuchInterface(name.into()))?;
    // SAFETY: c is a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(Error::NoSuchInterface(name.into())),
        i => Ok(i),
    }
}

pub fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        .unwrap_or(false)
}

/// The cgroup v2 root: the first cgroup2 mount in /proc/self/mounts (on a
/// hybrid host that is /sys/fs/cgroup/unified, on a unified one
/// /sys/fs/cgroup).
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts")
        .map_err(|e| Error::io("reading /proc/self/mounts", e))?;
    parse_cgroup2_mount(&mounts).ok_or(Error::NoCgroup2)
}

fn parse_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        // /proc/mounts escapes spaces etc. as octal.
        (fstype == "cgroup2").then(|| PathBuf::from(dir.replace("\\040", " ")))
    })
}

/// Checks a --cgroup path: it must be a directory on a cgroup v2 mount.
pub fn resolve_cgroup(path: Option<&Path>) -> Result<PathBuf> {
    let path = match path {
        Some(p) => p.to_path_buf(),
        None => cgroup2_root()?,
    };
    if path.is_dir() && is_cgroup2(&path) {
        Ok(path)
    } else {
        Err(Error::NotCgroup2(path))
    }
}

/// Inode of this process's network namespace: names what belongs to this
/// instance, so instances in different namespaces never share a name.
pub fn netns_inode() -> Result<u64> {
    fs::metadata("/proc/self/ns/net")
        .map(|m| m.ino())
        .map_err(|e| Error::io("reading /proc/self/ns/net", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_on_hybrid_and_unified_hosts() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            parse_cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(
            parse_cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let v1_only = "cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n";
        assert_eq!(parse_cgroup2_mount(v1_only), None);
    }

    #[test]
    fn loopback_exists_and_junk_does_not() {
        assert!(ifindex("lo").is_ok());
        assert!(matches!(
            ifindex("no-such-if0"),
            Err(Error::NoSuchInterface(_))
        ));
    }

    #[test]
    fn tmp_is_not_cgroup2() {
        assert!(matches!(
            resolve_cgroup(Some(Path::new("/tmp"))),
            Err(Error::NotCgroup2(_))
        ));
    }
}
