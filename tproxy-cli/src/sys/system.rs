//! Facts about the host that tproxy checks before it installs anything.
use std::{
    ffi::CString,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use crate::sys::{Error, Result};

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
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

/// Whether --no-accel needs CAP_PERFMON too. It does today: the tc
/// programs' packet parser adds a variable offset (the IPv4 header length)
/// to the packet pointer, which the verifier allows only with CAP_PERFMON
/// (its Spectre v1 sanitation). Once the tc and sockops programs of
/// --no-accel do without, this goes false.
const NO_ACCEL_NEEDS_PERFMON: bool = true;

/// The capabilities missing from `caps` (a CapEff mask), as the kernel
/// checks them: loading needs CAP_BPF, attaching to tc and cgroups
/// CAP_NET_ADMIN; acceleration's read hook program and the socket
/// pointers its sockops/sk_msg programs use as map keys need CAP_PERFMON
/// (and so, for now, does --no-accel). CAP_SYS_ADMIN stands in for CAP_BPF
/// and CAP_PERFMON.
fn missing_caps(caps: u64, needs_perfmon: bool) -> Vec<&'static str> {
    let has = |c: u32| caps & (1u64 << c) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if needs_perfmon && !has(CAP_PERFMON) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_PERFMON");
    }
    missing
}

/// `no_accel_helps`: --no-accel would do without what is missing.
fn privilege_error(missing: &[&str], no_accel_helps: bool) -> Option<Error> {
    match missing {
        [] => None,
        ["CAP_PERFMON"] if no_accel_helps => Some(Error::NoPerfmonForAccel),
        _ => Some(Error::NotPrivileged {
            missing: missing.join(", "),
        }),
    }
}

/// The capabilities the mode needs and this process lacks, as the error
/// that names them; `None` when it has them all.
pub fn missing_privileges(accel: bool) -> Option<Error> {
    let needs_perfmon = accel || NO_ACCEL_NEEDS_PERFMON;
    let missing = missing_caps(effective_caps(), needs_perfmon);
    privilege_error(&missing, accel && !NO_ACCEL_NEEDS_PERFMON)
}

/// What the mode needs, for messages: the capabilities, and root's
/// CAP_SYS_ADMIN, which stands in for CAP_BPF and CAP_PERFMON.
pub fn needed_privileges(accel: bool) -> &'static str {
    if accel || NO_ACCEL_NEEDS_PERFMON {
        "CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON)"
    } else {
        "CAP_BPF and CAP_NET_ADMIN (CAP_SYS_ADMIN stands in for CAP_BPF)"
    }
}

/// Checks the effective capabilities against what the mode needs.
pub fn check_privileges_for(accel: bool) -> Result<()> {
    missing_privileges(accel).map_or(Ok(()), Err)
}

/// The oldest kernel tproxy supports.
pub const MIN_KERNEL: (u8, u8) = (6, 1);

/// The running kernel's version, if it is new enough.
pub fn check_kernel_version() -> Result<aya::util::KernelVersion> {
    use aya::util::KernelVersion;
    let v = KernelVersion::current().map_err(|e| {
        Error::io(
            "reading the kernel version",
            std::io::Error::other(e.to_string()),
        )
    })?;
    if v < KernelVersion::new(MIN_KERNEL.0, MIN_KERNEL.1, 0) {
        return Err(Error::OldKernel(v.to_string()));
    }
    Ok(v)
}

/// The kernel's BTF, which tproxy reads (the read hook probes, `struct
/// sock`'s layout for acceleration).
pub fn check_btf() -> Result<()> {
    if Path::new(crate::sys::btf::VMLINUX).is_file() {
        Ok(())
    } else {
        Err(Error::NoBtf)
    }
}

/// What reading a running instance needs (CAP_BPF and CAP_NET_ADMIN).
pub fn check_privileges() -> Result<()> {
    match privilege_error(&missing_caps(effective_caps(), false), false) {
        Some(e) => Err(e),
        None => Ok(()),
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

/// Bytes of link-layer header the tc programs see before the IP header on
/// this interface: 14 on Ethernet and loopback, 0 on L3 devices. From the
/// device type (SIOCGIFHWADDR's address family), asked in this network
/// namespace (sysfs may show another one's devices).
pub fn link_header_len(name: &str) -> Result<u8> {
    const ARPHRD_ETHER: u16 = 1;
    const ARPHRD_PPP: u16 = 512;
    const ARPHRD_RAWIP: u16 = 519;
    const ARPHRD_TUNNEL: u16 = 768;
    const ARPHRD_TUNNEL6: u16 = 769;
    const ARPHRD_LOOPBACK: u16 = 772;
    const ARPHRD_SIT: u16 = 776;
    const ARPHRD_NONE: u16 = 0xfffe;
    let kind = link_type(name)?;
    match kind {
        ARPHRD_ETHER | ARPHRD_LOOPBACK => Ok(14),
        ARPHRD_NONE | ARPHRD_TUNNEL | ARPHRD_TUNNEL6 | ARPHRD_SIT | ARPHRD_RAWIP | ARPHRD_PPP => {
            Ok(0)
        }
        other => Err(Error::UnsupportedLinkType(name.into(), other)),
    }
}

fn link_type(name: &str) -> Result<u16> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(Error::io("socket()", std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh, valid descriptor we own.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= req.ifr_name.len() {
        return Err(Error::NoSuchInterface(name.into()));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills ifr_hwaddr of the ifreq we pass.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            // The request's type is glibc's c_ulong but musl's c_int.
            libc::SIOCGIFHWADDR as libc::Ioctl,
            &mut req,
        )
    };
    if rc < 0 {
        return Err(Error::NoSuchInterface(name.into()));
    }
    // SAFETY: the kernel wrote the hardware address union.
    Ok(unsafe { req.ifr_ifru.ifru_hwaddr.sa_family })
}

/// The cookie of this process's network namespace (SO_NETNS_COOKIE, Linux
/// 5.14): what the cgroup programs compare a socket's namespace with.
pub fn netns_cookie() -> Result<u64> {
    crate::sys::netns::current_cookie()
        .map_err(|e| Error::io("reading SO_NETNS_COOKIE (needs Linux >= 5.14)", e))
}

pub fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        .unwrap_or(false)
}

/// An open cgroup v2 directory: what the cgroup programs attach to.
#[derive(Debug)]
pub struct CgroupDir {
    /// The directory as the user names it: under `ip netns exec`, the
    /// host's path (the runtime record and messages use this).
    pub path: PathBuf,
    /// Open for the attach calls.
    pub dir: fs::File,
    /// Set when no cgroup2 mount was visible and tproxy used one of its
    /// own: what it did and why (one line).
    pub private_mount: Option<String>,
}

/// A cgroup2 mount in a mountinfo listing: the cgroup it shows (its root,
/// "/" unless mounted from a cgroup namespace) and where it is mounted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup2Mount {
    pub root: PathBuf,
    pub mount_point: PathBuf,
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The first cgroup2 mount in a /proc/PID/mountinfo listing (on a hybrid
/// host /sys/fs/cgroup/unified, on a unified one /sys/fs/cgroup).
pub fn parse_cgroup2_mount(mountinfo: &str) -> Option<Cgroup2Mount> {
    mountinfo.lines().find_map(|l| {
        // ID PARENT MAJ:MIN ROOT MOUNT-POINT OPTIONS [OPTIONAL…] - FSTYPE …
        let (before, after) = l.split_once(" - ")?;
        let f: Vec<&str> = before.split_whitespace().collect();
        (after.split_whitespace().next()? == "cgroup2" && f.len() >= 5).then(|| Cgroup2Mount {
            root: PathBuf::from(unescape_mountinfo(f[3])),
            mount_point: PathBuf::from(unescape_mountinfo(f[4])),
        })
    })
}

fn cgroup2_mount_of(pid: &str) -> Option<Cgroup2Mount> {
    parse_cgroup2_mount(&fs::read_to_string(format!("/proc/{pid}/mountinfo")).ok()?)
}

/// The cgroup v2 root: the first cgroup2 mount this process sees.
pub fn cgroup2_root() -> Result<PathBuf> {
    cgroup2_mount_of("self")
        .map(|m| m.mount_point)
        .ok_or(Error::NoCgroup2)
}

/// The cgroup v2 directory process `pid` is in (its `0::` line in
/// /proc/PID/cgroup, read in the host's cgroup namespace), open.
pub fn process_cgroup(pid: u32) -> Result<fs::File> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map_err(|e| Error::io(format!("reading the cgroup of process {pid}"), e))?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| Error::NotCgroup2(PathBuf::from(format!("/proc/{pid}/cgroup"))))?;
    let host = host_cgroup2_mounts().remove(0);
    let path = host.mount_point.join(rel.trim_start_matches('/'));
    Ok(open_cgroup(Some(&path))?.dir)
}

/// The namespace a /proc/PID/ns/mnt link names (device and inode).
fn mount_ns(pid: &str) -> Option<(u64, u64)> {
    fs::metadata(format!("/proc/{pid}/ns/mnt"))
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Whether this process is in a mount namespace of its own, as under `ip
/// netns exec`: not the one of PID 1, nor the initial one (kthreadd's).
/// False when neither can be read: only a namespace known to be private
/// gets a cgroup2 mount from tproxy.
pub fn in_private_mount_namespace() -> bool {
    is_private_mount_namespace("self")
}

fn is_private_mount_namespace(pid: &str) -> bool {
    let Some(me) = mount_ns(pid) else {
        return false;
    };
    let kthreadd = fs::read_to_string("/proc/2/comm").is_ok_and(|c| c.trim() == "kthreadd");
    let refs: Vec<(u64, u64)> = ["1", "2"]
        .into_iter()
        .filter(|pid| *pid == "1" || kthreadd)
        .filter_map(mount_ns)
        .collect();
    !refs.is_empty() && !refs.contains(&me)
}

/// The user's cgroup path relative to the cgroup2 hierarchy's root, given
/// where the host mounts it (the same relative path names the same cgroup
/// in every mount namespace). `None` if the path is not under that mount.
pub fn relative_cgroup(path: &Path, host: &Cgroup2Mount) -> Option<PathBuf> {
    let rel = path.strip_prefix(&host.mount_point).ok()?;
    // A mount of a subtree shows that subtree at its mount point.
    let under = host.root.strip_prefix("/").unwrap_or(&host.root);
    Some(under.join(rel))
}

/// Where the host mounts cgroup2: PID 1's mount, else the usual places.
fn host_cgroup2_mounts() -> Vec<Cgroup2Mount> {
    let usual = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"].map(|p| Cgroup2Mount {
        root: "/".into(),
        mount_point: p.into(),
    });
    cgroup2_mount_of("1").into_iter().chain(usual).collect()
}

/// A cgroup2 mount that is attached nowhere (fsopen + fsmount): it changes
/// no mount namespace, and goes with the last descriptor into it.
/// Read-only: tproxy only opens directories there.
fn detached_cgroup2_mount() -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    const FSOPEN_CLOEXEC: libc::c_uint = 1;
    const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
    const FSMOUNT_CLOEXEC: libc::c_uint = 1;
    const MOUNT_ATTR_RDONLY: libc::c_uint = 0x1;
    const MOUNT_ATTR_NOSUID: libc::c_uint = 0x2;
    const MOUNT_ATTR_NODEV: libc::c_uint = 0x4;
    const MOUNT_ATTR_NOEXEC: libc::c_uint = 0x8;
    let owned = |rc: libc::c_long| {
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            // SAFETY: the syscall returned a fresh descriptor we own.
            Ok(unsafe { OwnedFd::from_raw_fd(rc as i32) })
        }
    };
    // SAFETY: fsopen(2) with a NUL-terminated name.
    let fsfd =
        owned(unsafe { libc::syscall(libc::SYS_fsopen, c"cgroup2".as_ptr(), FSOPEN_CLOEXEC) })?;
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fsfd);
    // SAFETY: fsconfig(2) CMD_CREATE takes no key or value.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            raw,
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let attrs = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC;
    // SAFETY: fsmount(2) on the configured context.
    owned(unsafe { libc::syscall(libc::SYS_fsmount, raw, FSMOUNT_CLOEXEC, attrs) })
}

/// Opens `dir` (relative) under the descriptor `at`, as a directory.
fn open_dir_at(at: &impl std::os::fd::AsRawFd, dir: &Path) -> std::io::Result<fs::File> {
    use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
    let rel = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let c = CString::new(rel.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: openat(2) with a valid directory fd and a NUL-terminated path.
    let fd = unsafe {
        libc::openat(
            at.as_raw_fd(),
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { fs::File::from_raw_fd(fd) })
}

fn fd_is_cgroup2(f: &fs::File) -> bool {
    nix::sys::statfs::fstatfs(f)
        .map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        .unwrap_or(false)
}

/// A cgroup v2 directory's id (what `bpf_get_current_cgroup_id` and
/// `bpf_sk_cgroup_id` return: its kernfs inode number) and level (depth
/// below the root, whose id is 1), found by walking `..` up to the root.
pub fn cgroup_identity(dir: &fs::File) -> Result<(u64, u32)> {
    use std::os::unix::fs::MetadataExt as _;
    const ROOT_ID: u64 = 1;
    let ino = |f: &fs::File| {
        f.metadata()
            .map(|m| m.ino())
            .map_err(|e| Error::io("reading a cgroup's id", e))
    };
    let id = ino(dir)?;
    let mut cur = dir
        .try_clone()
        .map_err(|e| Error::io("reading a cgroup's id", e))?;
    let mut level = 0u32;
    while ino(&cur)? != ROOT_ID {
        let parent = open_dir_at(&cur, Path::new(".."))
            .map_err(|e| Error::io("walking up to the cgroup v2 root", e))?;
        // Above a mount of part of the hierarchy (a cgroup namespace's):
        // the absolute level is unknown.
        if !fd_is_cgroup2(&parent) || level > 128 {
            return Err(Error::io(
                "walking up to the cgroup v2 root",
                std::io::Error::other(
                    "the cgroup2 mount does not show the root cgroup (a cgroup namespace?)",
                ),
            ));
        }
        cur = parent;
        level += 1;
    }
    Ok((id, level))
}

/// Is cgroup `inner` (an open directory) `outer` or below it?
pub fn cgroup_within(inner: &fs::File, outer: &fs::File) -> Result<bool> {
    use std::os::unix::fs::MetadataExt as _;
    let (outer_id, outer_level) = cgroup_identity(outer)?;
    let (_, inner_level) = cgroup_identity(inner)?;
    if inner_level < outer_level {
        return Ok(false);
    }
    let mut cur = inner
        .try_clone()
        .map_err(|e| Error::io("reading a cgroup", e))?;
    for _ in outer_level..inner_level {
        cur = open_dir_at(&cur, Path::new(".."))
            .map_err(|e| Error::io("walking up the cgroup v2 hierarchy", e))?;
    }
    Ok(cur.metadata().map(|m| m.ino()).unwrap_or(0) == outer_id)
}

/// Opens a --cgroup directory (default: the cgroup v2 root); it must be a
/// directory on a cgroup v2 mount.
///
/// `ip netns exec` runs tproxy in a mount namespace of its own with a
/// fresh /sys, where the host's cgroup2 mount is gone. There, and only in
/// a mount namespace that is not the host's, tproxy mounts cgroup2 itself,
/// attached nowhere, and finds the path the user wrote (the host's) in it.
pub fn open_cgroup(path: Option<&Path>) -> Result<CgroupDir> {
    if let Some(mount) = cgroup2_mount_of("self") {
        let path = path.map_or(mount.mount_point, Path::to_path_buf);
        let dir = fs::File::open(&path)
            .ok()
            .filter(|f| f.metadata().is_ok_and(|m| m.is_dir()) && fd_is_cgroup2(f))
            .ok_or_else(|| Error::NotCgroup2(path.clone()))?;
        return Ok(CgroupDir {
            path,
            dir,
            private_mount: None,
        });
    }
    if !in_private_mount_namespace() {
        return Err(Error::NoCgroup2);
    }
    let hosts = host_cgroup2_mounts();
    let (path, rel) = match path {
        Some(p) => {
            let rel = hosts
                .iter()
                .find_map(|h| relative_cgroup(p, h))
                .ok_or_else(|| Error::NotCgroup2(p.to_path_buf()))?;
            (p.to_path_buf(), rel)
        }
        None => (hosts[0].mount_point.clone(), PathBuf::new()),
    };
    let mnt = detached_cgroup2_mount().map_err(|e| Error::io(
        "no cgroup2 mount is visible in this mount namespace (`ip netns exec` remounts /sys), and mounting one failed (it needs CAP_SYS_ADMIN)",
        e,
    ))?;
    let dir = open_dir_at(&mnt, &rel)
        .ok()
        .filter(fd_is_cgroup2)
        .ok_or_else(|| Error::NotCgroup2(path.clone()))?;
    let note = format!(
        "no cgroup2 mount is visible in this mount namespace (as under `ip netns exec`, which remounts /sys): mounted cgroup2 privately, read-only and attached nowhere, gone when tproxy exits; {} is cgroup /{} there",
        path.display(),
        rel.display()
    );
    Ok(CgroupDir {
        path,
        dir,
        private_mount: Some(note),
    })
}

/// A target's cgroup as the agent takes it (a single run's `--cgroup`
/// keeps `open_cgroup`, whose default is the root): `given` relative to the
/// cgroup2 `mount` or absolute, resolved (`.`, `..`, symlinks), and refused
/// when it is the mount itself (the root cgroup holds every process of the
/// host) or lies outside it.
pub fn resolve_agent_cgroup(given: &Path, mount: &Path) -> Result<PathBuf> {
    let refuse = |why: String| Error::AgentCgroup {
        given: given.to_path_buf(),
        why,
        mount: mount.to_path_buf(),
    };
    let mount_real = fs::canonicalize(mount).map_err(|e| {
        refuse(format!(
            "cannot be checked: the cgroup2 mount is unreadable ({e})"
        ))
    })?;
    // "" and "." join to the mount itself: refused below like "/sys/fs/cgroup".
    let real = fs::canonicalize(mount.join(given))
        .map_err(|e| refuse(format!("does not resolve to a directory ({e})")))?;
    if real == mount_real {
        return Err(refuse(format!(
            "resolves to {}, the cgroup2 root, which holds every process of the host",
            real.display()
        )));
    }
    if !real.starts_with(&mount_real) {
        return Err(refuse(format!(
            "resolves to {}, outside the cgroup2 mount",
            real.display()
        )));
    }
    Ok(real)
}

/// Opens a target's cgroup for the agent: resolved and checked by
/// [`resolve_agent_cgroup`], then the opened directory is checked again
/// by device and inode, so nothing swapped in between makes it the root.
pub fn open_agent_cgroup(given: &Path) -> Result<CgroupDir> {
    let mount = cgroup2_root()?;
    let path = resolve_agent_cgroup(given, &mount)?;
    let cg = open_cgroup(Some(&path))?;
    let id = |m: fs::Metadata| (m.dev(), m.ino());
    let opened = cg.dir.metadata().map(id);
    let root = fs::metadata(&mount).map(id);
    match (opened, root) {
        (Ok(a), Ok(b)) if a != b => Ok(cg),
        _ => Err(Error::AgentCgroup {
            given: given.to_path_buf(),
            why: format!("opened as {}, the cgroup2 root", path.display()),
            mount,
        }),
    }
}

/// Inode of this process's network namespace: names what belongs to this
/// instance, so instances in different namespaces never share a name.
pub fn netns_inode() -> Result<u64> {
    fs::metadata("/proc/self/ns/net")
        .map(|m| m.ino())
        .map_err(|e| Error::io("reading /proc/self/ns/net", e))
}

/// How many CPUs the kernel keeps per-CPU counts for (its possible CPUs);
/// 256 if that cannot be read (a count too high only makes sk_msg's
/// memory margin wider).
pub fn possible_cpus() -> u32 {
    aya::util::nr_cpus().map_or(256, |n| n as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_on_hybrid_and_unified_hosts() {
        let at = |p: &str| {
            Some(Cgroup2Mount {
                root: "/".into(),
                mount_point: p.into(),
            })
        };
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                      32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(parse_cgroup2_mount(hybrid), at("/sys/fs/cgroup/unified"));
        // Optional fields (propagation) before the separator.
        let unified =
            "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(parse_cgroup2_mount(unified), at("/sys/fs/cgroup"));
        let v1_only = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n";
        assert_eq!(parse_cgroup2_mount(v1_only), None);
        // A subtree mounted at a path with a space.
        let odd = "50 23 0:38 /a\\040b /mnt/my\\040cg rw - cgroup2 none rw\n";
        assert_eq!(
            parse_cgroup2_mount(odd),
            Some(Cgroup2Mount {
                root: "/a b".into(),
                mount_point: "/mnt/my cg".into(),
            })
        );
    }

    #[test]
    fn the_hosts_cgroup_path_is_found_relative_to_its_mount() {
        let hybrid = Cgroup2Mount {
            root: "/".into(),
            mount_point: "/sys/fs/cgroup/unified".into(),
        };
        let rel = |p: &str, m: &Cgroup2Mount| relative_cgroup(Path::new(p), m);
        assert_eq!(
            rel("/sys/fs/cgroup/unified/x/y", &hybrid),
            Some("x/y".into())
        );
        assert_eq!(rel("/sys/fs/cgroup/unified", &hybrid), Some("".into()));
        assert_eq!(rel("/sys/fs/cgroup/cpu/x", &hybrid), None);
        assert_eq!(rel("/sys/fs/cgroup/unifiedx", &hybrid), None);
        let subtree = Cgroup2Mount {
            root: "/lab".into(),
            mount_point: "/mnt/cg".into(),
        };
        assert_eq!(rel("/mnt/cg/app", &subtree), Some("lab/app".into()));
    }

    /// The test runs in the host's mount namespace; `unshare -m` makes a
    /// private one.
    #[test]
    fn the_hosts_mount_namespace_is_not_private_and_unshares_is() {
        assert!(!in_private_mount_namespace());
        let mut child = std::process::Command::new("unshare")
            .args(["-m", "--propagation", "private", "sleep", "infinity"])
            .spawn()
            .unwrap();
        let pid = child.id().to_string();
        // unshare execs sleep in the new namespace (no fork): wait for it,
        // however long a busy machine takes to run it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut private = false;
        while !private && std::time::Instant::now() < deadline {
            private = is_private_mount_namespace(&pid);
            if !private {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(private);
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
    fn loopback_has_an_ethernet_sized_header() {
        assert_eq!(link_header_len("lo").unwrap(), 14);
        assert!(netns_cookie().unwrap() != 0);
    }

    #[test]
    fn capabilities_each_mode_needs() {
        let caps = |cs: &[u32]| cs.iter().fold(0u64, |m, c| m | 1 << c);
        let all = caps(&[CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON]);
        assert!(missing_caps(all, true).is_empty());
        // Root: CAP_SYS_ADMIN covers CAP_BPF and CAP_PERFMON.
        assert!(missing_caps(caps(&[CAP_SYS_ADMIN, CAP_NET_ADMIN]), true).is_empty());
        // CAP_BPF + CAP_NET_ADMIN is not enough where CAP_PERFMON is needed.
        let bpf_net = caps(&[CAP_BPF, CAP_NET_ADMIN]);
        assert_eq!(missing_caps(bpf_net, true), ["CAP_PERFMON"]);
        assert!(missing_caps(bpf_net, false).is_empty());
        assert_eq!(
            missing_caps(caps(&[CAP_BPF, CAP_PERFMON]), true),
            ["CAP_NET_ADMIN"]
        );
        assert_eq!(
            missing_caps(0, true),
            ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"]
        );
        assert_eq!(missing_caps(0, false), ["CAP_BPF", "CAP_NET_ADMIN"]);
    }

    #[test]
    fn privilege_errors_name_the_capability_and_the_fix() {
        assert!(privilege_error(&[], true).is_none());
        let perfmon = privilege_error(&["CAP_PERFMON"], true).unwrap().to_string();
        assert!(perfmon.contains("CAP_PERFMON"), "{perfmon}");
        assert!(perfmon.contains("--no-accel"), "{perfmon}");
        // Where --no-accel needs it too, the line does not offer it.
        let perfmon = privilege_error(&["CAP_PERFMON"], false)
            .unwrap()
            .to_string();
        assert!(perfmon.contains("lacks CAP_PERFMON"), "{perfmon}");
        assert!(!perfmon.contains("--no-accel"), "{perfmon}");
        let net = privilege_error(&["CAP_NET_ADMIN"], true)
            .unwrap()
            .to_string();
        assert!(net.contains("lacks CAP_NET_ADMIN"), "{net}");
        assert!(net.contains("sudo"), "{net}");
        let both = privilege_error(&["CAP_BPF", "CAP_PERFMON"], true)
            .unwrap()
            .to_string();
        assert!(both.contains("lacks CAP_BPF, CAP_PERFMON"), "{both}");
    }

    /// The agent's cgroup paths, against a stand-in mount in a temp dir
    /// (the path logic; the real mount is checked below).
    #[test]
    fn the_agent_refuses_the_cgroup_root_and_paths_outside_the_mount() {
        let tmp = tempfile::tempdir().unwrap();
        let base = fs::canonicalize(tmp.path()).unwrap();
        let mount = base.join("unified");
        fs::create_dir_all(mount.join("kubepods/pod1")).unwrap();
        fs::create_dir(base.join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(&mount, base.join("to-root")).unwrap();
        std::os::unix::fs::symlink(mount.join("kubepods/pod1"), base.join("to-pod")).unwrap();
        let resolve = |p: &Path| resolve_agent_cgroup(p, &mount);
        let refused = |p: &Path, why: &str| {
            let e = resolve(p).expect_err(&p.display().to_string());
            let line = e.to_string();
            assert!(matches!(e, Error::AgentCgroup { .. }), "{line}");
            assert!(line.contains(why), "{}: {line}", p.display());
            // Names the path as given, and the fix.
            assert!(line.contains(&format!("{p:?}")), "{line}");
            assert!(line.contains("give the pod's cgroup"), "{line}");
            assert!(!line.contains('\n'), "{line}");
        };
        let root = "the cgroup2 root";
        let outside = "outside the cgroup2 mount";
        for p in [
            "".into(),
            ".".into(),
            "./".into(),
            "kubepods/..".into(),
            mount.clone(),
            mount.join("../unified"),
            mount.join("kubepods/pod1/../.."),
            base.join("to-root"),
        ] {
            refused(&p, root);
        }
        for p in [
            "/".into(),
            "..".into(),
            "../elsewhere".into(),
            base.join("elsewhere"),
            "/tmp".into(),
        ] {
            refused(&p, outside);
        }
        refused(Path::new("kubepods/missing"), "does not resolve");
        let pod = mount.join("kubepods/pod1");
        for p in [
            PathBuf::from("kubepods/pod1"),
            "./kubepods/pod1/".into(),
            "kubepods/../kubepods/pod1".into(),
            pod.clone(),
            base.join("to-pod"),
        ] {
            assert_eq!(resolve(&p).unwrap(), pod, "{}", p.display());
        }
    }

    /// The same refusals against this host's cgroup2 mount, and the
    /// opened directory is checked too.
    #[test]
    fn the_agent_refuses_this_hosts_cgroup2_root() {
        let mount = cgroup2_root().unwrap();
        for p in [
            PathBuf::from(""),
            ".".into(),
            mount.clone(),
            mount.join("../").join(mount.file_name().unwrap()),
        ] {
            let e = open_agent_cgroup(&p).unwrap_err();
            assert!(
                e.to_string().contains("the cgroup2 root"),
                "{}: {e}",
                p.display()
            );
        }
        let e = open_agent_cgroup(Path::new("/")).unwrap_err();
        assert!(e.to_string().contains("outside"), "{e}");
    }

    #[test]
    fn tmp_is_not_cgroup2_and_the_root_is() {
        assert!(matches!(
            open_cgroup(Some(Path::new("/tmp"))),
            Err(Error::NotCgroup2(_))
        ));
        let root = open_cgroup(None).unwrap();
        assert_eq!(root.path, cgroup2_root().unwrap());
        assert!(root.private_mount.is_none());
    }
}
