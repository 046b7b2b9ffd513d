//! Kernel features the chosen mode needs, probed before anything is loaded
//! or attached, so a kernel that lacks one gets a line that says which and
//! what to do instead of a failure halfway through attaching.
//!
//! The decisions are pure functions over probe results (unit-tested); only
//! [`check`] asks the kernel.
use std::path::Path;

use aya::{maps::MapType, programs::ProgramType, sys};
use aya_obj::btf::{Btf, BtfKind};
use tproxy_common::names;
use tracing::debug;

use crate::{Error, Result};

/// Something the kernel must offer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Feature {
    Program(ProgramType),
    Map(MapType),
    /// The `sock_recv_length` tracepoint (Linux 6.3).
    RecvTracepoint,
}

/// A feature, its name in messages, and whether only acceleration needs it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Need {
    pub feature: Feature,
    pub name: &'static str,
    pub accel_only: bool,
}

const fn need(feature: Feature, name: &'static str, accel_only: bool) -> Need {
    Need {
        feature,
        name,
        accel_only,
    }
}

/// Everything a mode needs, in the order it is probed. The eBPF object
/// creates all its maps (SOCKHASH included) whatever the mode.
pub fn needs(accel: bool) -> Vec<Need> {
    use Feature::{Map, Program};
    let mut v = vec![
        need(
            Program(ProgramType::SchedClassifier),
            "sched_cls programs",
            false,
        ),
        need(
            Program(ProgramType::CgroupSockopt),
            "cgroup/getsockopt programs",
            false,
        ),
        need(
            Program(ProgramType::CgroupSockAddr),
            "cgroup sock_addr programs",
            false,
        ),
        need(Program(ProgramType::SockOps), "sock_ops programs", false),
        need(Map(MapType::Array), "array maps", false),
        need(Map(MapType::PerCpuArray), "per-CPU array maps", false),
        need(Map(MapType::Hash), "hash maps", false),
        need(Map(MapType::LruHash), "LRU hash maps", false),
        need(Map(MapType::SockHash), "SOCKHASH maps", false),
    ];
    if accel {
        v.extend([
            need(Program(ProgramType::SkMsg), "sk_msg programs", true),
            need(
                Program(ProgramType::RawTracePoint),
                "raw tracepoint programs",
                true,
            ),
            need(Feature::RecvTracepoint, names::RECV_TRACEPOINT, true),
        ]);
    }
    v
}

/// The first need `has` says is missing. `has` answers `None` when a probe
/// could not tell (an unexpected error): that need is assumed present and
/// loading it will say what is wrong.
pub fn first_missing(needs: &[Need], mut has: impl FnMut(Feature) -> Option<bool>) -> Option<Need> {
    needs
        .iter()
        .copied()
        .find(|n| has(n.feature) == Some(false))
}

/// The one-line error for a missing need.
pub fn error_for(need: Need) -> Error {
    match (need.feature, need.accel_only) {
        (Feature::RecvTracepoint, _) => Error::NoRecvTracepoint,
        (_, true) => Error::AccelUnsupported(need.name),
        (_, false) => Error::KernelLacks(need.name),
    }
}

/// Whether the tracepoint exists: BTF names every raw tracepoint
/// (`btf_trace_<name>`); without BTF, tracefs lists it if mounted. `None`:
/// neither could tell.
pub fn tracepoint_verdict(in_btf: Option<bool>, in_tracefs: Option<bool>) -> Option<bool> {
    in_btf.or(in_tracefs)
}

fn tracepoint_in_btf(name: &str) -> Option<bool> {
    let btf = Btf::from_sys_fs()
        .inspect_err(|e| debug!("probe: no kernel BTF ({e})"))
        .ok()?;
    Some(
        btf.id_by_type_name_kind(&format!("btf_trace_{name}"), BtfKind::Typedef)
            .is_ok(),
    )
}

fn tracepoint_in_tracefs(group: &str, name: &str) -> Option<bool> {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .map(Path::new)
        .find(|root| root.join("events").is_dir())
        .map(|root| root.join("events").join(group).join(name).is_dir())
}

fn probe(feature: Feature) -> Option<bool> {
    let result = match feature {
        // For the debug log only: the whole cause chain, errno included.
        Feature::Program(t) => {
            sys::is_program_supported(t).map_err(|e| crate::error::Chain(&e).to_string())
        }
        Feature::Map(t) => {
            sys::is_map_supported(t).map_err(|e| crate::error::Chain(&e).to_string())
        }
        Feature::RecvTracepoint => {
            let name = names::RECV_TRACEPOINT;
            return tracepoint_verdict(
                tracepoint_in_btf(name),
                tracepoint_in_tracefs("sock", name),
            );
        }
    };
    result
        .inspect_err(|e| debug!("probe {feature:?}: could not tell ({e})"))
        .ok()
}

/// Probes what `accel` (or not) needs; the first missing feature is the
/// error. Runs after the privilege check (probes load tiny programs).
pub fn check(accel: bool) -> Result<()> {
    match first_missing(&needs(accel), probe) {
        Some(need) => Err(error_for(need)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accel_needs_the_socket_hooks_and_no_accel_does_not() {
        let with: Vec<_> = needs(true).iter().map(|n| n.feature).collect();
        let without: Vec<_> = needs(false).iter().map(|n| n.feature).collect();
        for f in [
            Feature::Program(ProgramType::SkMsg),
            Feature::Program(ProgramType::RawTracePoint),
            Feature::RecvTracepoint,
        ] {
            assert!(with.contains(&f), "{f:?}");
            assert!(!without.contains(&f), "{f:?}");
        }
        for f in &without {
            assert!(with.contains(f), "{f:?}");
        }
        assert!(needs(false).iter().all(|n| !n.accel_only));
    }

    #[test]
    fn first_missing_skips_what_is_present_or_unknown() {
        let n = needs(true);
        assert_eq!(first_missing(&n, |_| Some(true)), None);
        // A probe that could not tell blocks nothing.
        assert_eq!(first_missing(&n, |_| None), None);
        let no_tp = first_missing(&n, |f| Some(f != Feature::RecvTracepoint)).unwrap();
        assert_eq!(no_tp.feature, Feature::RecvTracepoint);
        // The first of several in probe order.
        let m = first_missing(&n, |f| {
            Some(!matches!(
                f,
                Feature::Map(MapType::LruHash) | Feature::RecvTracepoint
            ))
        })
        .unwrap();
        assert_eq!(m.feature, Feature::Map(MapType::LruHash));
    }

    #[test]
    fn a_kernel_without_the_tracepoint_is_told_6_3_and_no_accel() {
        let n = needs(true);
        let missing = first_missing(&n, |f| Some(f != Feature::RecvTracepoint)).unwrap();
        let msg = error_for(missing).to_string();
        assert!(msg.contains("6.3"), "{msg}");
        assert!(msg.contains("--no-accel"), "{msg}");
        assert!(msg.contains("sock_recv_length"), "{msg}");
        assert!(!msg.contains('\n'));
        // Without acceleration the tracepoint is not asked for.
        assert_eq!(
            first_missing(&needs(false), |f| Some(f != Feature::RecvTracepoint)),
            None
        );
    }

    #[test]
    fn accel_only_features_suggest_no_accel_and_the_rest_do_not() {
        let sk_msg = needs(true)
            .into_iter()
            .find(|n| n.feature == Feature::Program(ProgramType::SkMsg))
            .unwrap();
        let msg = error_for(sk_msg).to_string();
        assert!(
            msg.contains("sk_msg") && msg.contains("--no-accel"),
            "{msg}"
        );
        let sockopt = needs(false)
            .into_iter()
            .find(|n| n.feature == Feature::Program(ProgramType::CgroupSockopt))
            .unwrap();
        let msg = error_for(sockopt).to_string();
        assert!(msg.contains("cgroup/getsockopt"), "{msg}");
        assert!(!msg.contains("--no-accel"), "{msg}");
    }

    #[test]
    fn btf_decides_and_tracefs_is_the_fallback() {
        assert_eq!(tracepoint_verdict(Some(false), Some(true)), Some(false));
        assert_eq!(tracepoint_verdict(Some(true), None), Some(true));
        assert_eq!(tracepoint_verdict(None, Some(false)), Some(false));
        assert_eq!(tracepoint_verdict(None, None), None);
    }

    /// This machine (Linux 6.18 with BTF) has the tracepoint; a name no
    /// kernel has is absent.
    #[test]
    fn this_kernels_btf_has_sock_recv_length() {
        assert_eq!(tracepoint_in_btf(names::RECV_TRACEPOINT), Some(true));
        assert_eq!(tracepoint_in_btf("no_such_tracepoint_x"), Some(false));
    }
}
