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
        crate::routing::SEARCH
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
        "the kernel lacks TCX (Linux >= 6.6), which --tc-mode tcx asks for; use --tc-mode auto or netlink"
    )]
    NoTcx,

    #[error(
        "{failed} of {total} requirements are not met; each failing one says why and what to do"
    )]
    ChecksFailed { failed: usize, total: usize },

    #[error(
        "another tproxy (pid {pid}) already serves {iface} in this network namespace; stop it first"
    )]
    AlreadyRunning { pid: i32, iface: String },

    #[error(
        "no running tproxy instance{} in this network namespace (try --all)",
        iface.as_ref().map(|i| format!(" on {i}")).unwrap_or_default()
    )]
    NoInstance { iface: Option<String> },

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
        "tproxy (pid {pid}) on {iface} is running: cleanup only removes what dead instances left; stop it with SIGTERM (`kill {pid}`), which removes everything it installed"
    )]
    CleanupLive { iface: String, pid: i32 },

    #[error(
        "could not remove {count} object(s) a dead tproxy left (first: {first}); their records are kept, so `tproxy cleanup` can try again"
    )]
    CleanupFailed { count: usize, first: String },

    #[error(
        "{stale} dead and {degraded} degraded tproxy instance(s) (see above): `tproxy cleanup --all` removes what dead ones left; restart degraded ones"
    )]
    Unhealthy { stale: usize, degraded: usize },

    #[error(
        "the kernel refused to load the eBPF object: {0}; tproxy needs Linux >= 6.1 with BTF (6.3 for acceleration)"
    )]
    LoadObject(#[source] aya::EbpfError),

    #[error(
        "the kernel refused program {name}: {reason}; tproxy needs Linux >= 6.1 with BTF, 6.3 for acceleration (run with -v for the verifier log)"
    )]
    LoadProgram { name: &'static str, reason: String },

    #[error("could not attach {what}: {source}")]
    Attach {
        what: String,
        #[source]
        source: aya::programs::ProgramError,
    },

    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },

    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A program the kernel would not load. The verifier log is many lines:
    /// it goes to the debug log (-v), the error stays one line.
    pub fn load_program(name: &'static str, err: aya::programs::ProgramError) -> Self {
        let reason = match err {
            aya::programs::ProgramError::LoadError {
                io_error,
                verifier_log,
            } => {
                tracing::debug!("verifier log for {name}:\n{verifier_log}");
                format!("BPF_PROG_LOAD failed: {io_error}")
            }
            other => other.to_string(),
        };
        Error::LoadProgram { name, reason }
    }

    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}
