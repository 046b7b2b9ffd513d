//! Kernel features the chosen mode needs, probed before anything is loaded
//! or attached, so a kernel that lacks one gets a line that says which and
//! what to do instead of a failure halfway through attaching.
//!
//! Every need is probed, none inferred from the kernel version: program
//! and map types, the helpers each program calls (read from the embedded
//! object, so the list cannot drift from the code), the tracepoint, TCX.
//! The decisions are pure functions over probe results (unit-tested); only
//! [`probe`] and [`tcx_supported`] ask the kernel.
use std::path::Path;

use aya::{
    maps::MapType,
    programs::{ProgramType, TcAttachType, tc::SchedClassifier},
    sys::{self, BpfHelper},
};
use aya_obj::btf::{Btf, BtfKind};
use tproxy_common::names;
use tracing::debug;

use crate::sys::{Error, Result, error::Chain};

/// Something the kernel must offer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Feature {
    Program(ProgramType),
    Map(MapType),
    /// A helper, called from a program of this type.
    Helper(ProgramType, BpfHelper),
    /// The `sock_recv_length` tracepoint (Linux 6.3).
    RecvTracepoint,
    /// The calling process's cgroup in sock_ops programs: the helper
    /// (Linux 6.4), or bpf_get_current_task and BTF for the walk.
    SockopsCaller,
}

/// Helpers a program calls only where a read-only global says the kernel
/// has them (the verifier never sees the call elsewhere): not needs.
/// pid_tgid in sock_ops and cgroup/getsockopt (6.10: `tproxy flows`'
/// upstream link); the cgroup helper in sock_ops (6.4), which
/// [`Feature::SockopsCaller`] stands for with the walk it falls back to.
const GATED: &[(ProgramType, BpfHelper)] = &[
    (
        ProgramType::SockOps,
        BpfHelper::BPF_FUNC_get_current_pid_tgid,
    ),
    (
        ProgramType::CgroupSockopt,
        BpfHelper::BPF_FUNC_get_current_pid_tgid,
    ),
    (
        ProgramType::SockOps,
        BpfHelper::BPF_FUNC_get_current_ancestor_cgroup_id,
    ),
    (ProgramType::SockOps, BpfHelper::BPF_FUNC_get_current_task),
];

fn has_helper(t: ProgramType, h: BpfHelper) -> bool {
    sys::is_helper_supported(t, h).unwrap_or(false)
}

/// Whether sockops and cgroup/getsockopt may both call
/// bpf_get_current_pid_tgid (Linux 6.10).
pub fn pid_tgid_everywhere() -> bool {
    has_helper(
        ProgramType::SockOps,
        BpfHelper::BPF_FUNC_get_current_pid_tgid,
    ) && has_helper(
        ProgramType::CgroupSockopt,
        BpfHelper::BPF_FUNC_get_current_pid_tgid,
    )
}

/// Whether sock_ops may call bpf_get_current_ancestor_cgroup_id (6.4).
pub fn sockops_has_cgroup_helper() -> bool {
    has_helper(
        ProgramType::SockOps,
        BpfHelper::BPF_FUNC_get_current_ancestor_cgroup_id,
    )
}

/// A feature, its name in messages, and whether only acceleration needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct Need {
    pub feature: Feature,
    pub name: String,
    pub accel_only: bool,
}

fn need(feature: Feature, name: impl Into<String>, accel_only: bool) -> Need {
    Need {
        feature,
        name: name.into(),
        accel_only,
    }
}

/// The programs a mode loads, with their types.
pub fn programs(accel: bool) -> Vec<(&'static str, ProgramType)> {
    let mut v = vec![
        (names::PROG_STEER, ProgramType::SchedClassifier),
        (names::PROG_RESTORE, ProgramType::SchedClassifier),
        (names::PROG_GETSOCKOPT, ProgramType::CgroupSockopt),
        (names::PROG_GETSOCKNAME4, ProgramType::CgroupSockAddr),
        (names::PROG_GETSOCKNAME6, ProgramType::CgroupSockAddr),
    ];
    if accel {
        v.extend([
            (names::PROG_SOCKOPS, ProgramType::SockOps),
            (names::PROG_SK_MSG, ProgramType::SkMsg),
            (names::PROG_RECV_LENGTH, ProgramType::RawTracePoint),
        ]);
    } else {
        v.push((names::PROG_SOCKOPS_FLOWS, ProgramType::SockOps));
    }
    v
}

/// How messages name a program type.
pub fn type_name(t: ProgramType) -> &'static str {
    match t {
        ProgramType::SchedClassifier => "sched_cls",
        ProgramType::CgroupSockopt => "cgroup/getsockopt",
        ProgramType::CgroupSockAddr => "cgroup sock_addr",
        ProgramType::SockOps => "sock_ops",
        ProgramType::SkMsg => "sk_msg",
        ProgramType::RawTracePoint => "raw tracepoint",
        _ => "other",
    }
}

/// `BPF_FUNC_msg_redirect_hash` -> `bpf_msg_redirect_hash`.
pub fn helper_name(h: BpfHelper) -> String {
    let s = format!("{h:?}");
    match s.strip_prefix("BPF_FUNC_") {
        Some(rest) => format!("bpf_{rest}"),
        None => s,
    }
}

/// The helpers each named program of `object` calls (after linking in the
/// functions it calls), by helper id.
pub fn helpers_called(object: &[u8], programs: &[&str]) -> Vec<(String, Vec<u32>)> {
    const CALL: u8 = 0x85; // BPF_JMP | BPF_CALL
    let Ok(mut obj) = aya_obj::Object::parse(object) else {
        return Vec::new();
    };
    let text_sections = obj.functions.keys().map(|(s, _)| *s).collect();
    if obj.relocate_calls(&text_sections).is_err() {
        return Vec::new();
    }
    programs
        .iter()
        .filter_map(|name| {
            let prog = obj.programs.get(*name)?;
            let f = obj.functions.get(&prog.function_key())?;
            let mut ids: Vec<u32> = f
                .instructions
                .iter()
                // src_reg 0: a helper (1 is a bpf-to-bpf call, 2 a kfunc).
                .filter(|i| i.code == CALL && i.src_reg() == 0)
                .map(|i| i.imm as u32)
                .collect();
            ids.sort_unstable();
            ids.dedup();
            Some(((*name).to_string(), ids))
        })
        .collect()
}

/// A helper id as aya's enum; `None` past the last id aya knows.
fn helper(id: u32) -> Option<BpfHelper> {
    (id < BpfHelper::__BPF_FUNC_MAX_ID as u32).then(|| {
        // SAFETY: bpf_func_id is #[repr(u32)] with every value from 0 to
        // __BPF_FUNC_MAX_ID a variant (the UAPI numbers them densely).
        unsafe { std::mem::transmute::<u32, BpfHelper>(id) }
    })
}

/// (program type, helper) pairs the mode's programs call, each once.
fn helper_needs(accel: bool) -> Vec<(ProgramType, BpfHelper)> {
    let progs = programs(accel);
    let names: Vec<&str> = progs.iter().map(|(n, _)| *n).collect();
    let mut out: Vec<(ProgramType, BpfHelper)> = Vec::new();
    for (name, ids) in helpers_called(crate::sys::object::EBPF_OBJECT, &names) {
        let t = progs.iter().find(|(n, _)| *n == name).expect("asked for").1;
        for h in ids.into_iter().filter_map(helper) {
            if !out.contains(&(t, h)) && !GATED.contains(&(t, h)) {
                out.push((t, h));
            }
        }
    }
    out
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
        need(Map(MapType::RingBuf), "ring buffer maps", false),
    ];
    if accel {
        v.extend([
            need(Program(ProgramType::SkMsg), "sk_msg programs", true),
            need(
                Program(ProgramType::RawTracePoint),
                "raw tracepoint programs",
                true,
            ),
            need(
                Feature::RecvTracepoint,
                format!("the {} tracepoint", names::RECV_TRACEPOINT),
                true,
            ),
        ]);
    }
    let base = if accel {
        helper_needs(false)
    } else {
        Vec::new()
    };
    for (t, h) in helper_needs(accel) {
        v.push(need(
            Feature::Helper(t, h),
            format!("the {} helper in {} programs", helper_name(h), type_name(t)),
            accel && !base.contains(&(t, h)),
        ));
    }
    v.push(need(
        Feature::SockopsCaller,
        "the caller's cgroup in sock_ops programs (bpf_get_current_ancestor_cgroup_id, Linux >= 6.4, or BTF for the task's cgroups, Linux >= 6.0)",
        false,
    ));
    // What steering needs first: a kernel that lacks one of those is told
    // so, not sent to --no-accel first.
    v.sort_by_key(|n| n.accel_only);
    v
}

/// The first need `has` says is missing. `has` answers `None` when a probe
/// could not tell (an unexpected error): that need is assumed present and
/// loading it will say what is wrong.
pub fn first_missing(
    needs: &[Need],
    mut has: impl FnMut(Feature) -> Option<bool>,
) -> Option<&Need> {
    needs.iter().find(|n| has(n.feature) == Some(false))
}

/// The one-line error for a missing need.
pub fn error_for(need: &Need) -> Error {
    match (need.feature, need.accel_only) {
        (Feature::RecvTracepoint, _) => Error::NoRecvTracepoint,
        (_, true) => Error::AccelUnsupported(need.name.clone()),
        (_, false) => Error::KernelLacks(need.name.clone()),
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

/// Asks the kernel (loads a tiny program or creates a tiny map). `Err`:
/// the probe could not tell, and why.
pub fn probe(feature: Feature) -> Result<bool, String> {
    let result = match feature {
        // For the debug log only: the whole cause chain, errno included.
        Feature::Program(t) => sys::is_program_supported(t).map_err(|e| Chain(&e).to_string()),
        Feature::Map(t) => sys::is_map_supported(t).map_err(|e| Chain(&e).to_string()),
        Feature::Helper(t, h) => sys::is_helper_supported(t, h).map_err(|e| Chain(&e).to_string()),
        Feature::SockopsCaller => Ok(sockops_has_cgroup_helper()
            || (has_helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_get_current_task)
                && has_helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_probe_read_kernel)
                && crate::sys::btf::task_cgroup_offsets().is_some())),
        Feature::RecvTracepoint => {
            let name = names::RECV_TRACEPOINT;
            tracepoint_verdict(tracepoint_in_btf(name), tracepoint_in_tracefs("sock", name))
                .ok_or_else(|| "neither BTF nor tracefs lists tracepoints".to_string())
        }
    };
    result.inspect_err(|e| debug!("probe {feature:?}: could not tell ({e})"))
}

/// Probes every need of the mode, in order.
pub fn probe_all(accel: bool) -> Vec<(Need, Result<bool, String>)> {
    needs(accel)
        .into_iter()
        .map(|n| {
            let r = probe(n.feature);
            (n, r)
        })
        .collect()
}

/// Probes what `accel` (or not) needs; the first missing feature is the
/// error. Runs after the privilege check (probes load tiny programs).
pub fn check(accel: bool) -> Result<()> {
    match first_missing(&needs(accel), |f| probe(f).ok()) {
        Some(need) => Err(error_for(need)),
        None => Ok(()),
    }
}

/// Whether the kernel has TCX (Linux 6.6): a TCX query on loopback is
/// answered by kernels that have it and refused (EINVAL) by the others.
/// `None`: the query failed otherwise (no CAP_NET_ADMIN, say).
pub fn tcx_supported() -> Option<bool> {
    match SchedClassifier::query_tcx("lo", TcAttachType::Ingress) {
        Ok(_) => Some(true),
        Err(aya::programs::ProgramError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::EINVAL) =>
        {
            Some(false)
        }
        Err(e) => {
            debug!("probe TCX: could not tell ({e})");
            None
        }
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
        // What only the accelerated mode's programs call is accel_only.
        let redirect = Feature::Helper(ProgramType::SkMsg, BpfHelper::BPF_FUNC_msg_redirect_hash);
        let n = needs(true)
            .into_iter()
            .find(|n| n.feature == redirect)
            .unwrap();
        assert!(n.accel_only);
        assert_eq!(
            n.name,
            "the bpf_msg_redirect_hash helper in sk_msg programs"
        );
        let cookie = Feature::Helper(
            ProgramType::CgroupSockopt,
            BpfHelper::BPF_FUNC_get_netns_cookie,
        );
        let n = needs(true)
            .into_iter()
            .find(|n| n.feature == cookie)
            .unwrap();
        assert!(!n.accel_only);
        assert!(without.contains(&cookie));
    }

    /// The helper list is read from the object the binary embeds: the
    /// helpers the sources call are in it, for the right program.
    #[test]
    fn helpers_are_read_from_the_embedded_object() {
        let progs = programs(true);
        let names: Vec<&str> = progs.iter().map(|(n, _)| *n).collect();
        let called = helpers_called(crate::sys::object::EBPF_OBJECT, &names);
        assert_eq!(called.len(), names.len(), "{called:?}");
        let of = |prog: &str| -> Vec<String> {
            called
                .iter()
                .find(|(n, _)| n == prog)
                .unwrap()
                .1
                .iter()
                .filter_map(|&id| helper(id))
                .map(helper_name)
                .collect()
        };
        let has = |prog: &str, h: &str| {
            let hs = of(prog);
            assert!(hs.iter().any(|x| x == h), "{prog} calls {hs:?}, not {h}");
        };
        has(names::PROG_SK_MSG, "bpf_msg_redirect_hash");
        has(names::PROG_GETSOCKOPT, "bpf_get_netns_cookie");
        has(names::PROG_GETSOCKNAME4, "bpf_get_netns_cookie");
        has(names::PROG_RECV_LENGTH, "bpf_probe_read_kernel");
        has(names::PROG_SOCKOPS, "bpf_sock_hash_update");
        has(names::PROG_STEER, "bpf_map_lookup_elem");
        // Every program calls at least one helper (map lookups at least).
        assert!(called.iter().all(|(_, ids)| !ids.is_empty()), "{called:?}");
        assert_eq!(helper(u32::MAX), None);
    }

    /// This kernel (6.18) has everything either mode needs, probed.
    #[test]
    fn this_kernel_has_every_need() {
        for accel in [true, false] {
            for (n, r) in probe_all(accel) {
                assert_eq!(r, Ok(true), "{}", n.name);
            }
        }
        assert_eq!(tcx_supported(), Some(true));
        // A helper no sock_ops program may call is refused, not unknown.
        assert_eq!(
            probe(Feature::Helper(
                ProgramType::SockOps,
                BpfHelper::BPF_FUNC_xdp_adjust_head
            )),
            Ok(false)
        );
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
        let msg = error_for(&sk_msg).to_string();
        assert!(
            msg.contains("sk_msg") && msg.contains("--no-accel"),
            "{msg}"
        );
        let sockopt = needs(false)
            .into_iter()
            .find(|n| n.feature == Feature::Program(ProgramType::CgroupSockopt))
            .unwrap();
        let msg = error_for(&sockopt).to_string();
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
