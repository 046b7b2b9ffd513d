//! The sys layer's errors: what the kernel and the host refuse or lack.
//! Each message is one line that names the problem and, where there is
//! one, the fix. The crate's `Error` takes them whole (`Error::Sys`).
//!
//! A target's settings reach these checks from the command line, a
//! `--config` file, and the agent (its API and target files), which all
//! key a setting alike: a fix names the setting by that key, its flag
//! after it (`steer_mark` (--steer-mark), `accel: false` (--no-accel)).
//! Only a setting that has a flag alone is named by it (`--bpffs`).
use std::{io, path::PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "routing table {table} is already in use ({user}); tproxy needs a table of its own: choose an unused `route_table` (--route-table) or leave it out to have one picked"
    )]
    TableInUse { table: u32, user: String },

    #[error(
        "steer mark {mark:#x} is already matched by an ip fwmark rule ({user}); choose an unused `steer_mark` (--steer-mark) or leave it out to have one picked"
    )]
    MarkInUse { mark: u32, user: String },

    #[error(
        "no free {what} among the {searched} values from {from:#x}: ip rules and routes use them all; set `steer_mark` and `route_table` (--steer-mark, --route-table)"
    )]
    NoFreeRouting {
        what: &'static str,
        from: u32,
        searched: u32,
    },

    #[error(
        "no interface named {0:?} in this network namespace; list them with `ip link` (or run tproxy in the namespace that has it)"
    )]
    NoSuchInterface(String),

    #[error(
        "interface {0:?} has link type {1} (ARPHRD), whose frames tproxy does not parse; it supports Ethernet, loopback and L3 devices (WireGuard, tun, ipip, sit, PPP): steer on one of those"
    )]
    UnsupportedLinkType(String, u16),

    #[error(
        "{0} is not a cgroup v2 directory; set `cgroup` (--cgroup) to a path on the cgroup2 mount (see `mount -t cgroup2`)"
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
        "no cgroup v2 hierarchy is mounted; mount one (`mount -t cgroup2 none /sys/fs/cgroup/unified`) or set `cgroup` (--cgroup)"
    )]
    NoCgroup2,

    #[error(
        "tproxy needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON) and lacks {missing}; run it with sudo or grant it {missing}"
    )]
    NotPrivileged { missing: String },

    #[error(
        "socket acceleration needs CAP_PERFMON (or CAP_SYS_ADMIN) for its read hook program and socket-pointer map keys, and tproxy lacks it; run it as root, grant it CAP_PERFMON, or turn acceleration off (`accel: false`, --no-accel)"
    )]
    NoPerfmonForAccel,

    #[error(
        "socket acceleration needs a read hook, fexit on tcp_bpf_recvmsg (a kernel with fentry/fexit) or the sock_recv_length tracepoint (Linux >= 6.3), and this kernel has neither; turn acceleration off (`accel: false`, --no-accel) or use a kernel with either"
    )]
    NoReadHook,

    #[error(
        "socket acceleration needs {0}, which this kernel lacks; turn acceleration off (`accel: false`, --no-accel) or use a kernel that has them"
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
        "the tproxy back-end runs `nft`, which is not on PATH; install nftables (e.g. `apt install nftables`) or use `steer: rewrite` (--steer rewrite)"
    )]
    NoNft,

    #[error(
        "nftables refused the tproxy rule ({0}); the tproxy back-end needs the kernel's nft_tproxy module (CONFIG_NFT_TPROXY): load it (`modprobe nft_tproxy`) or use `steer: rewrite` (--steer rewrite)"
    )]
    NftTproxyUnsupported(String),

    #[error(
        "nftables table inet {0} already exists and no tproxy record says tproxy created it; the tproxy back-end needs a table of that name of its own (it would mix its rules into this one and delete it at exit): move what it holds to a table of another name and delete it (`nft delete table inet {0}`), or use `steer: rewrite` (--steer rewrite)"
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
        "the kernel lacks TCX (Linux >= 6.6), which `tc_mode: tcx` (--tc-mode tcx) asks for; use `tc_mode: auto` or `netlink`"
    )]
    NoTcx,

    /// A setting the config layer refuses, met again here (`routing::pick`
    /// checks the explicit mark and table it is given).
    #[error(transparent)]
    Config(#[from] crate::config::Error),

    // Errors carry their cause as `source`, not in their own text: the top
    // level prints the chain (`Chain`) down to the failing syscall's errno.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },

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
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

/// An `nft` run that failed. nftables' own error leaves out what nft said
/// on stderr (the actual reason); this one says it, on one line.
#[derive(Debug)]
pub struct NftError(pub Box<nftables::helper::NftablesError>);

impl NftError {
    /// nft said the object does not exist (ENOENT).
    pub fn is_missing(&self) -> bool {
        matches!(&*self.0, nftables::helper::NftablesError::NftFailed { stderr, .. } if stderr.contains("No such file"))
    }

    /// nft said the object already exists (EEXIST, from `create`).
    pub fn is_exists(&self) -> bool {
        matches!(&*self.0, nftables::helper::NftablesError::NftFailed { stderr, .. } if stderr.contains("File exists"))
    }
}

impl std::fmt::Display for NftError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &*self.0 {
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
/// errors print their source in their own message too. Here, in the
/// lowest layer that prints chains, so that every layer above can.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_skips_a_cause_already_printed_and_stays_one_line() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer: {0}")]
        struct Repeats(#[source] io::Error);
        let e = Repeats(io::Error::other("line one\nline two"));
        assert_eq!(Chain(&e).to_string(), "outer: line one line two");
    }

    /// The settings a target shares between flags, config file and agent
    /// are named by their key wherever a message names their flag.
    #[test]
    fn a_target_setting_is_named_by_its_key_before_its_flag() {
        let user = || "x".to_string();
        let all = [
            Error::TableInUse {
                table: 100,
                user: user(),
            },
            Error::MarkInUse {
                mark: 0x99,
                user: user(),
            },
            Error::NoFreeRouting {
                what: "steer mark",
                from: 1,
                searched: 4096,
            },
            Error::NotCgroup2("/x".into()),
            Error::NoCgroup2,
            Error::NoPerfmonForAccel,
            Error::NoReadHook,
            Error::AccelUnsupported("sk_msg".into()),
            Error::NoNft,
            Error::NftTproxyUnsupported(user()),
            Error::NftTableExists(user()),
            Error::NoTcx,
        ];
        let named = [
            ("--route-table", "`route_table`"),
            ("--steer-mark", "`steer_mark`"),
            ("--cgroup", "`cgroup` (--cgroup)"),
            ("--no-accel", "`accel: false`"),
            ("--steer rewrite", "`steer: rewrite` (--steer rewrite)"),
            ("--tc-mode", "`tc_mode: tcx` (--tc-mode tcx)"),
        ];
        for e in all {
            let msg = e.to_string();
            assert_eq!(msg.lines().count(), 1, "{msg}");
            let flags: Vec<_> = named.iter().filter(|(f, _)| msg.contains(f)).collect();
            assert!(!flags.is_empty(), "names no setting: {msg}");
            for (flag, key) in flags {
                assert!(msg.contains(key), "{flag} without {key}: {msg}");
            }
        }
    }
}
