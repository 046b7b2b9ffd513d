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
/// CAP_NET_ADMIN; acceleration's raw tracepoint program and the socket
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

/// The kernel's BTF, which tproxy reads (the tracepoint probe, `struct
/// sock`'s layout for acceleration).
pub fn check_btf() -> Result<()> {
    if Path::new(crate::btf::VMLINUX).is_file() {
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
            libc::SIOCGIFHWADDR,
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
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))
        .map_err(|e| Error::io("a socket to read the network namespace's cookie", e))?;
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
        return Err(Error::io(
            "reading SO_NETNS_COOKIE (needs Linux >= 5.14)",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(cookie)
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

    #[test]
    fn tmp_is_not_cgroup2() {
        assert!(matches!(
            resolve_cgroup(Some(Path::new("/tmp"))),
            Err(Error::NotCgroup2(_))
        ));
    }
}
