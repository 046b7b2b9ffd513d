//! Library errors. Each message is one line that names the problem and,
//! where there is one, the fix.
use std::{io, path::PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "bad port list: {0}; use e.g. `-ports 8000` or `-ports 8000,8080,9000-9010` (ports 1-65535)"
    )]
    BadPorts(String),

    #[error(
        "the proxy port {0} is in the intercepted set: the proxy's own listener would be steered to itself; choose another --proxy-port or drop {0} from --ports"
    )]
    ProxyPortIntercepted(u16),

    #[error(
        "the proxy mark and the steer mark are both {0:#x}; they must differ (--proxy-mark / --steer-mark)"
    )]
    MarksCollide(u32),

    #[error(
        "--proxy-mark and --steer-mark must be non-zero: marks are how tproxy tells traffic apart"
    )]
    ZeroMark,

    #[error(
        "--route-table {0} is a reserved routing table (0 unspec, 253 default, 254 main, 255 local): tproxy's table holds its own route and nothing else; choose an unused table (e.g. 100) or leave --route-table out to have one picked"
    )]
    ReservedTable(u32),

    #[error(
        "routing table {table} is already in use ({user}); tproxy needs a table of its own: choose an unused --route-table or leave it out to have one picked"
    )]
    TableInUse { table: u32, user: String },

    #[error(
        "steer mark {mark:#x} is already matched by an ip fwmark rule ({user}); choose an unused --steer-mark or leave it out to have one picked"
    )]
    MarkInUse { mark: u32, user: String },

    #[error(
        "no free {what} among the {} values from {from:#x}: ip rules and routes use them all; pass --steer-mark and --route-table",
        crate::sys::routing::SEARCH
    )]
    NoFreeRouting { what: &'static str, from: u32 },

    #[error(
        "no interface named {0:?} in this network namespace; list them with `ip link` (or run tproxy in the namespace that has it)"
    )]
    NoSuchInterface(String),

    #[error(
        "interface {0:?} has link type {1} (ARPHRD), whose frames tproxy does not parse; it supports Ethernet, loopback and L3 devices (WireGuard, tun, ipip, sit, PPP): steer on one of those"
    )]
    UnsupportedLinkType(String, u16),

    #[error(
        "{0} is not a cgroup v2 directory; pass --cgroup with a path on the cgroup2 mount (see `mount -t cgroup2`)"
    )]
    NotCgroup2(PathBuf),

    #[error(
        "cgroup {given:?} {why}: the agent attaches only to a pod's own cgroup below the cgroup2 mount {}; give the pod's cgroup relative to that mount (e.g. kubepods/pod<uid>) or as an absolute path under it",
        .mount.display()
    )]
    AgentCgroup {
        given: PathBuf,
        why: String,
        mount: PathBuf,
    },

    #[error(
        "no cgroup v2 hierarchy is mounted; mount one (`mount -t cgroup2 none /sys/fs/cgroup/unified`) or pass --cgroup"
    )]
    NoCgroup2,

    #[error(
        "tproxy needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON) and lacks {missing}; run it with sudo or grant it {missing}"
    )]
    NotPrivileged { missing: String },

    #[error(
        "socket acceleration needs CAP_PERFMON (or CAP_SYS_ADMIN) for its tracepoint program and socket-pointer map keys, and tproxy lacks it; run it as root, grant it CAP_PERFMON, or use --no-accel"
    )]
    NoPerfmonForAccel,

    #[error(
        "socket acceleration needs the sock_recv_length tracepoint (Linux >= 6.3), which this kernel lacks; use --no-accel or a newer kernel"
    )]
    NoRecvTracepoint,

    #[error(
        "socket acceleration needs {0}, which this kernel lacks; use --no-accel or a kernel that has them (Linux >= 6.3)"
    )]
    AccelUnsupported(String),

    #[error("this kernel lacks {0}, which tproxy needs; it needs Linux >= 6.1 with BTF")]
    KernelLacks(String),

    #[error("Linux {0} is older than 6.1; tproxy needs Linux >= 6.1 with BTF: upgrade the kernel")]
    OldKernel(String),

    #[error(
        "the kernel has no BTF (/sys/kernel/btf/vmlinux); tproxy needs Linux >= 6.1 built with CONFIG_DEBUG_INFO_BTF=y"
    )]
    NoBtf,

    #[error(
        "the tproxy back-end runs `nft`, which is not on PATH; install nftables (e.g. `apt install nftables`) or use --steer rewrite"
    )]
    NoNft,

    #[error(
        "nftables refused the tproxy rule ({0}); the tproxy back-end needs the kernel's nft_tproxy module (CONFIG_NFT_TPROXY): load it (`modprobe nft_tproxy`) or use --steer rewrite"
    )]
    NftTproxyUnsupported(String),

    #[error(
        "nftables table inet {0} already exists and no tproxy record says tproxy created it; the tproxy back-end needs a table of that name of its own (it would mix its rules into this one and delete it at exit): move what it holds to a table of another name and delete it (`nft delete table inet {0}`), or use --steer rewrite"
    )]
    NftTableExists(String),

    #[error(
        "the nftables table inet {0}: the record of the tproxy that made it predates the marker that proves a table is tproxy's, so it is left; if nothing else uses it, delete it (`nft delete table inet {0}`)"
    )]
    NftTableUnmarked(String),

    #[error(
        "--bpffs {} {why}: pass a directory on a bpf filesystem (under /sys/fs/bpf; `mount -t bpf bpf /sys/fs/bpf` mounts the usual one) or an empty directory, which the agent mounts one on",
        .dir.display()
    )]
    BpffsUnsafe { dir: PathBuf, why: String },

    #[error(
        "the kernel lacks TCX (Linux >= 6.6), which --tc-mode tcx asks for; use --tc-mode auto or netlink"
    )]
    NoTcx,

    #[error(
        "{failed} of {total} requirements are not met; each failing one says why and what to do"
    )]
    ChecksFailed { failed: usize, total: usize },

    #[error(
        "no running tproxy instance{} in this network namespace (try --all)",
        iface.as_ref().map(|i| format!(" on {i}")).unwrap_or_default()
    )]
    NoInstance { iface: Option<String> },

    #[error("invalid target: {0}")]
    TargetSpec(String),

    #[error(
        "a tproxy agent (pid {pid}) already runs with the state directory {dir}; stop it first (or give this one another --state-dir)"
    )]
    AgentRunning { dir: PathBuf, pid: i32 },

    #[error(
        "the agent socket's directory {} (mode {mode:o}) may be written by other users, who could replace the socket; pass --socket a path in a directory only root writes (a missing one is created with mode 0700)",
        .dir.display()
    )]
    SocketDir { dir: PathBuf, mode: u32 },

    #[error(
        "no tproxy agent state in {dir}: start `tproxy agent`, or pass its --state-dir as --agent-state-dir"
    )]
    NoAgent { dir: std::path::PathBuf },

    #[error(
        "the tproxy agent of {dir} is not running (its targets stay attached through their pins): start it again, or run `tproxy cleanup` to remove them"
    )]
    AgentNotRunning { dir: std::path::PathBuf },

    #[error("the watched tproxy (pid {pid} on {iface}) has stopped")]
    InstanceGone { pid: i32, iface: String },

    #[error(
        "cannot serve metrics on {addr}: {source}; pass a free local address and port to --metrics-addr (e.g. 127.0.0.1:9090)"
    )]
    MetricsBind {
        addr: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },

    #[error(
        "could not remove {count} object(s) a dead tproxy left (first: {first}); their records are kept, so `tproxy cleanup` can try again"
    )]
    CleanupFailed { count: usize, first: String },

    #[error(
        "{stale} dead and {degraded} degraded tproxy instance(s) (see above): `tproxy cleanup --all` removes what dead ones left; restart degraded ones"
    )]
    Unhealthy { stale: usize, degraded: usize },

    // Errors carry their cause as `source`, not in their own text: the top
    // level prints the chain (`Chain`) down to the failing syscall's errno.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },

    /// What a target's lifecycle raised (`target::Error`).
    #[error(transparent)]
    Target(#[from] crate::target::Error),

    #[error("{what}")]
    Tc {
        what: String,
        #[source]
        source: aya::programs::tc::TcError,
    },

    #[error(
        "nftables: {what} (is the nftables package installed and the nf_tproxy module available?)"
    )]
    Nft {
        what: String,
        #[source]
        source: NftError,
    },

    #[error("reading config file {}", .path.display())]
    ConfigRead {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Unknown keys, wrong types and out-of-range values; serde_norway's
    /// message names the key, line and column.
    #[error("config file {}", .path.display())]
    Config {
        path: PathBuf,
        #[source]
        source: serde_norway::Error,
    },

    #[error("no {what} given: pass {flag} or set `{key}:` in the --config file")]
    Missing {
        what: &'static str,
        flag: &'static str,
        key: &'static str,
    },

    #[error("{var}={value:?} is not a log filter; use e.g. `info`, `debug` or `tproxy=trace`")]
    LogFilter {
        var: &'static str,
        value: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
}

/// An `nft` run that failed. nftables' own error leaves out what nft said
/// on stderr (the actual reason); this one says it, on one line.
#[derive(Debug)]
pub struct NftError(pub nftables::helper::NftablesError);

impl NftError {
    /// nft said the object does not exist (ENOENT).
    pub fn is_missing(&self) -> bool {
        matches!(&self.0, nftables::helper::NftablesError::NftFailed { stderr, .. } if stderr.contains("No such file"))
    }

    /// nft said the object already exists (EEXIST, from `create`).
    pub fn is_exists(&self) -> bool {
        matches!(&self.0, nftables::helper::NftablesError::NftFailed { stderr, .. } if stderr.contains("File exists"))
    }
}

impl std::fmt::Display for NftError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            nftables::helper::NftablesError::NftFailed {
                program, stderr, ..
            } => write!(
                f,
                "{} failed: {}",
                program.to_string_lossy(),
                one_line(stderr)
            ),
            other => other.fmt(f),
        }
    }
}

impl std::error::Error for NftError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// `text` on one line: its non-blank lines, trimmed, joined by spaces.
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// An error with its causes on one line, `outer: cause: root cause` (as
/// anyhow's `{:#}`), down to the errno of the syscall that failed. A cause
/// whose text the one before already includes is left out: some library
/// errors print their source in their own message too.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut last = one_line(&self.0.to_string());
        f.write_str(&last)?;
        let mut cause = self.0.source();
        while let Some(e) = cause {
            let text = one_line(&e.to_string());
            if !last.contains(&text) {
                write!(f, ": {text}")?;
            }
            last = text;
            cause = e.source();
        }
        Ok(())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A bad command line or config file (exit status 2, as clap's usage
    /// errors): nothing was tried.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Error::ConfigRead { .. }
                | Error::Config { .. }
                | Error::Missing { .. }
                | Error::LogFilter { .. }
        )
    }

    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_goes_down_to_the_errno_on_one_line() {
        let e = Error::io(
            "adding the fwmark rule",
            io::Error::from_raw_os_error(libc::EPERM),
        );
        assert_eq!(
            Chain(&e).to_string(),
            "adding the fwmark rule: Operation not permitted (os error 1)"
        );
        // aya's SyscallError names the call; its errno is its source. A
        // layer's error, wrapped, prints the same.
        let e = Error::from(crate::target::Error::Attach {
            what: "sockops to cgroup /x".into(),
            source: aya::programs::ProgramError::SyscallError(aya::sys::SyscallError {
                call: "bpf_link_create",
                io_error: io::Error::from_raw_os_error(libc::EBADF),
            }),
        });
        assert_eq!(
            Chain(&e).to_string(),
            "could not attach sockops to cgroup /x: `bpf_link_create` failed: Bad file descriptor (os error 9)"
        );
    }

    #[test]
    fn chain_skips_a_cause_already_printed_and_stays_one_line() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer: {0}")]
        struct Repeats(#[source] io::Error);
        let e = Repeats(io::Error::other("line one\nline two"));
        assert_eq!(Chain(&e).to_string(), "outer: line one line two");
    }
}
