//! The bpf(2) commands tproxy makes itself: those aya 0.14 makes only for
//! its own use (its `sys::bpf` is `pub(crate)`) and offers no public call
//! that does the same. One argument style, aya's own: the kernel's
//! `union bpf_attr` (aya-obj's bindings, the ones aya uses) zeroed, the
//! command's fields set, passed whole to one `sys_bpf`; each command is a
//! safe function returning `io::Result`, a new descriptor as `OwnedFd`.
//!
//! What aya's public API does is taken from it instead: the ids of every
//! link and the program each runs (`aya::programs::loaded_links`), a
//! program's id (`ProgramInfo::id`). Not covered there, hence here:
//! - pinning a link tproxy holds by id only (aya's `FdLink::pin` needs an
//!   `FdLink`, which only aya makes) and opening a pinned link's
//!   descriptor (`PinnedLink::from_pin` keeps it to itself);
//! - swapping a link's program (BPF_LINK_UPDATE);
//! - a program or link by id (aya's `ProgramInfo` and `LinkInfo` have no
//!   `from_id`), and where a link is attached (`LinkInfo` has no target);
//! - an iterator link that stays, and new iterators of it (aya's
//!   `Iter::attach` keeps the link and `IterLink::into_file` spends it);
//! - a trivial fexit program on a function of our choice, to probe it
//!   (aya's `is_program_supported` tries one fixed function only).
use std::{
    ffi::CString,
    fs::File,
    io, mem,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use aya_obj::generated::{
    bpf_attach_type, bpf_attr, bpf_cmd, bpf_link_info, bpf_link_type, bpf_prog_type,
};

/// `bpf(cmd, attr)`: the kernel reads (and for some commands writes)
/// `attr`, of the size of the whole union; its trailing zeroes are what
/// a kernel with a smaller union checks.
fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid, initialized bpf_attr of the size passed;
    // pointers in it (paths, info buffers) outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_int,
            std::ptr::from_mut(attr),
            mem::size_of::<bpf_attr>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `sys_bpf` for a command that returns a new descriptor.
fn fd_sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<OwnedFd> {
    let fd = sys_bpf(cmd, attr)?;
    let fd = i32::try_from(fd).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{cmd:?} returned {fd}, not a descriptor"),
        )
    })?;
    // SAFETY: callers pass only commands whose result is a new descriptor,
    // which nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn zeroed() -> bpf_attr {
    // SAFETY: plain old data; all zeroes is every command's default.
    unsafe { mem::zeroed() }
}

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

/// BPF_OBJ_PIN: pins the object of `fd` at `path` on a bpffs.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let p = cpath(path)?;
    let mut attr = zeroed();
    attr.__bindgen_anon_4.pathname = p.as_ptr() as u64;
    attr.__bindgen_anon_4.bpf_fd = fd.as_raw_fd() as u32;
    sys_bpf(bpf_cmd::BPF_OBJ_PIN, &mut attr).map(drop)
}

/// BPF_OBJ_GET: a new descriptor of the object pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let p = cpath(path)?;
    let mut attr = zeroed();
    attr.__bindgen_anon_4.pathname = p.as_ptr() as u64;
    fd_sys_bpf(bpf_cmd::BPF_OBJ_GET, &mut attr)
}

/// BPF_PROG_GET_FD_BY_ID: a descriptor of the loaded program `id`.
pub fn prog_get_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = zeroed();
    attr.__bindgen_anon_6.__bindgen_anon_1.prog_id = id;
    fd_sys_bpf(bpf_cmd::BPF_PROG_GET_FD_BY_ID, &mut attr)
}

/// BPF_LINK_GET_FD_BY_ID: a descriptor of the link `id`.
pub fn link_get_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = zeroed();
    attr.__bindgen_anon_6.__bindgen_anon_1.link_id = id;
    fd_sys_bpf(bpf_cmd::BPF_LINK_GET_FD_BY_ID, &mut attr)
}

/// BPF_LINK_UPDATE: `link` runs `new_prog` from now on, in one step: no
/// moment with neither program or both attached.
pub fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = zeroed();
    attr.link_update.link_fd = link.as_raw_fd() as u32;
    attr.link_update.__bindgen_anon_1.new_prog_fd = new_prog.as_raw_fd() as u32;
    sys_bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// Loads `return 0` as an fexit program on the kernel function whose
/// vmlinux BTF id is `btf_id` and attaches it (which builds the
/// trampoline), then lets both go: whether the kernel runs tracing
/// programs there. `Err` of the load or of the attach, with the errno.
pub fn fexit_attaches(btf_id: u32) -> Result<(), FexitProbeError> {
    // r0 = 0; exit
    let insns: [u64; 2] = [0xb7, 0x95];
    let license = c"GPL";
    let mut attr = zeroed();
    // SAFETY: writing plain fields of the BPF_PROG_LOAD member.
    let u = unsafe { &mut attr.__bindgen_anon_3 };
    u.prog_type = bpf_prog_type::BPF_PROG_TYPE_TRACING as u32;
    u.expected_attach_type = bpf_attach_type::BPF_TRACE_FEXIT as u32;
    u.attach_btf_id = btf_id;
    u.insns = insns.as_ptr() as u64;
    u.insn_cnt = insns.len() as u32;
    u.license = license.as_ptr() as u64;
    let prog = fd_sys_bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr).map_err(FexitProbeError::Load)?;
    let mut attr = zeroed();
    attr.raw_tracepoint.prog_fd = prog.as_raw_fd() as u32;
    fd_sys_bpf(bpf_cmd::BPF_RAW_TRACEPOINT_OPEN, &mut attr)
        .map(drop)
        .map_err(FexitProbeError::Attach)
}

/// Which step of [`fexit_attaches`] the kernel refused.
#[derive(Debug)]
pub enum FexitProbeError {
    Load(io::Error),
    Attach(io::Error),
}

impl std::fmt::Display for FexitProbeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FexitProbeError::Load(e) => write!(f, "loading an fexit program: {e}"),
            FexitProbeError::Attach(e) => write!(f, "attaching an fexit program: {e}"),
        }
    }
}

/// What the kernel says about one link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub prog_id: u32,
    pub target: LinkTarget,
}

/// Where a link is attached; 0 once it is detached (its cgroup or
/// interface gone, or detached by hand).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkTarget {
    /// A cgroup link: the cgroup's id.
    Cgroup(u64),
    /// A TCX link: the interface's index.
    Tcx(u32),
    /// Another kind of link: its target is not read.
    Other,
}

/// BPF_OBJ_GET_INFO_BY_FD on a link: its program and where it is attached.
pub fn link_info(link: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    // SAFETY: plain old data; all zeroes is valid.
    let mut info: bpf_link_info = unsafe { mem::zeroed() };
    let mut attr = zeroed();
    attr.info.bpf_fd = link.as_raw_fd() as u32;
    attr.info.info_len = mem::size_of::<bpf_link_info>() as u32;
    attr.info.info = std::ptr::from_mut(&mut info) as u64;
    sys_bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    // SAFETY: the union member read is the one the link's type selects.
    let target = unsafe {
        if info.type_ == bpf_link_type::BPF_LINK_TYPE_CGROUP as u32 {
            LinkTarget::Cgroup(info.__bindgen_anon_1.cgroup.cgroup_id)
        } else if info.type_ == bpf_link_type::BPF_LINK_TYPE_TCX as u32 {
            LinkTarget::Tcx(info.__bindgen_anon_1.tcx.ifindex)
        } else {
            LinkTarget::Other
        }
    };
    Ok(LinkInfo {
        prog_id: info.prog_id,
        target,
    })
}

/// BPF_LINK_CREATE for an iterator program (attach type BPF_TRACE_ITER,
/// no parameters: the iterators over every TCP socket, for one).
pub fn iter_link_create(prog: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let mut attr = zeroed();
    attr.link_create.__bindgen_anon_1.prog_fd = prog.as_raw_fd() as u32;
    attr.link_create.attach_type = bpf_attach_type::BPF_TRACE_ITER as u32;
    fd_sys_bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr)
}

/// BPF_ITER_CREATE: a new iterator of the iterator link `link`, read as a
/// file (each read runs the program over the next objects). The kernel
/// takes the calling thread's network namespace for socket iterators.
pub fn iter_create(link: BorrowedFd<'_>) -> io::Result<File> {
    let mut attr = zeroed();
    attr.iter_create.link_fd = link.as_raw_fd() as u32;
    fd_sys_bpf(bpf_cmd::BPF_ITER_CREATE, &mut attr).map(File::from)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;

    use super::*;

    #[test]
    fn ids_nobody_uses_and_paths_off_a_bpffs_are_errors() {
        // Ids count up from 1; the largest is never handed out this early.
        // (Without privileges the kernel says EPERM: an error all the same.)
        assert!(prog_get_fd_by_id(u32::MAX - 1).is_err());
        assert!(link_get_fd_by_id(u32::MAX - 1).is_err());
        let tmp = tempfile::tempdir().unwrap();
        assert!(obj_get(&tmp.path().join("none")).is_err());
        let e = obj_get(Path::new("a\0b")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        // A descriptor that is no bpf object.
        let f = File::open(tmp.path()).unwrap();
        assert!(link_info(f.as_fd()).is_err());
        assert!(iter_create(f.as_fd()).is_err());
        assert!(obj_pin(f.as_fd(), &tmp.path().join("pin")).is_err());
    }
}
