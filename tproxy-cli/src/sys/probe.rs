//! Kernel features the chosen mode needs, probed before anything is loaded
//! or attached, so a kernel that lacks one gets a line that says which and
//! what to do instead of a failure halfway through attaching.
//!
//! Every need is probed, none inferred from the kernel version: program
//! and map types, the helpers each program calls (read from the embedded
//! object, so the list cannot drift from the code), the read hook, TCX.
//! The decisions are pure functions over probe results (unit-tested); only
//! [`probe`], [`ReadHooks::probed`] and [`tcx_supported`] ask the kernel.
use std::{path::Path, sync::OnceLock};

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
    /// The calling process's cgroup in sock_ops programs: the helper
    /// (Linux 6.4), or bpf_get_current_task and BTF for the walk.
    SockopsCaller,
    /// A read hook ([`ReadHook`]): either will do.
    ReadHook,
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

/// The hook that counts the reads of our sockets (`tproxy-ebpf/src/recv.rs`
/// is their one body). Both see the same reads of sockets in the SOCKHASH.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadHook {
    /// fexit on tcp_bpf_recvmsg: runs only for sockets in a sockmap.
    Fexit,
    /// The `sock_recv_length` raw tracepoint (Linux 6.3): runs on every
    /// recvmsg of the host.
    Tracepoint,
}

impl ReadHook {
    pub fn program(self) -> &'static str {
        match self {
            ReadHook::Fexit => names::PROG_RECV_FEXIT,
            ReadHook::Tracepoint => names::PROG_RECV_LENGTH,
        }
    }

    pub fn program_type(self) -> ProgramType {
        match self {
            ReadHook::Fexit => ProgramType::Tracing,
            ReadHook::Tracepoint => ProgramType::RawTracePoint,
        }
    }

    /// Its link's pin in the agent's node directory. One name per kind: a
    /// restarted agent adopts only a link of the kind it would attach (the
    /// tracepoint's keeps the name it always had).
    pub fn link_pin(self) -> &'static str {
        match self {
            ReadHook::Fexit => "link_recv_fexit",
            ReadHook::Tracepoint => "link_recv_length",
        }
    }

    /// The other kind.
    pub fn other(self) -> ReadHook {
        match self {
            ReadHook::Fexit => ReadHook::Tracepoint,
            ReadHook::Tracepoint => ReadHook::Fexit,
        }
    }

    /// How messages name it.
    pub fn describe(self) -> String {
        match self {
            ReadHook::Fexit => format!("fexit on {}", names::RECV_FEXIT_FUNCTION),
            ReadHook::Tracepoint => format!("{} tracepoint", names::RECV_TRACEPOINT),
        }
    }
}

/// What probing found for each read hook (`Err`: could not tell, why).
#[derive(Clone, Debug, PartialEq)]
pub struct ReadHooks {
    pub fexit: Result<bool, String>,
    pub tracepoint: Result<bool, String>,
}

impl ReadHooks {
    /// Probed once per process: the kernel does not change under it, and
    /// `check`, the loader and `tproxy check` must agree.
    pub fn probed() -> &'static ReadHooks {
        static PROBED: OnceLock<ReadHooks> = OnceLock::new();
        PROBED.get_or_init(|| {
            let hooks = ReadHooks {
                fexit: fexit_probe(names::RECV_FEXIT_FUNCTION),
                tracepoint: probe_tracepoint(names::RECV_TRACEPOINT),
            };
            debug!("probe read hooks: {hooks:?}");
            hooks
        })
    }

    /// The hook a run attaches: fexit where the kernel runs it (it costs
    /// the host's other reads nothing), else the tracepoint. A probe that
    /// could not tell counts as present (loading will say what is wrong),
    /// the tracepoint's first, as before there was a choice.
    pub fn chosen(&self) -> Option<ReadHook> {
        match (self.fexit.as_ref().ok(), self.tracepoint.as_ref().ok()) {
            (Some(true), _) => Some(ReadHook::Fexit),
            (_, Some(true) | None) => Some(ReadHook::Tracepoint),
            (None, Some(false)) => Some(ReadHook::Fexit),
            (Some(false), Some(false)) => None,
        }
    }

    /// For `tproxy check`: the chosen hook and how it was found.
    pub fn detail(&self) -> Option<String> {
        let hook = self.chosen()?;
        let (r, other) = match hook {
            ReadHook::Fexit => (&self.fexit, &self.tracepoint),
            ReadHook::Tracepoint => (&self.tracepoint, &self.fexit),
        };
        let how = match r {
            Ok(_) => "probed".to_string(),
            Err(why) => format!("could not probe ({why}); a run assumes it"),
        };
        let why = match (hook, other) {
            (ReadHook::Fexit, _) => "it runs only for sockets in the SOCKHASH".to_string(),
            (ReadHook::Tracepoint, Ok(false)) => format!(
                "this kernel runs no {}; it runs on every recvmsg of the host",
                hook.other().describe()
            ),
            (ReadHook::Tracepoint, Err(why)) => format!(
                "{} could not be probed ({why}); it runs on every recvmsg of the host",
                hook.other().describe()
            ),
            (ReadHook::Tracepoint, Ok(true)) => "it runs on every recvmsg of the host".to_string(),
        };
        Some(format!("{} ({how}); {why}", hook.describe()))
    }
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

/// The programs a mode loads, with their types; `hook`: the read hook
/// acceleration attaches (none: only its other programs).
pub fn programs(accel: bool, hook: Option<ReadHook>) -> Vec<(&'static str, ProgramType)> {
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
        ]);
        if let Some(h) = hook {
            v.push((h.program(), h.program_type()));
        }
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
        ProgramType::Tracing => "tracing",
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

/// (program type, helper) pairs the mode's programs call, each once. Not
/// those of tracing programs (the fexit read hook): aya probes helpers
/// only by loading a program that needs no attach target, and the fexit
/// probe has loaded one on its function already; what it calls (map
/// lookups, bpf_probe_read_kernel, bpf_ktime_get_ns, the ring buffer) every
/// kernel with fexit offers tracing programs.
fn helper_needs(accel: bool, hook: Option<ReadHook>) -> Vec<(ProgramType, BpfHelper)> {
    let progs: Vec<_> = programs(accel, hook)
        .into_iter()
        .filter(|(_, t)| *t != ProgramType::Tracing)
        .collect();
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

/// Everything a mode needs, in the order it is probed, with `hook` the
/// read hook probing chose ([`ReadHooks::chosen`]; none: the read hook
/// need fails). The eBPF object creates all its maps (SOCKHASH included)
/// whatever the mode.
pub fn needs(accel: bool, hook: Option<ReadHook>) -> Vec<Need> {
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
                Feature::ReadHook,
                format!(
                    "a read hook ({} or the {})",
                    ReadHook::Fexit.describe(),
                    ReadHook::Tracepoint.describe()
                ),
                true,
            ),
        ]);
        // The fexit probe loaded a tracing program already.
        if hook == Some(ReadHook::Tracepoint) {
            v.push(need(
                Program(ProgramType::RawTracePoint),
                "raw tracepoint programs",
                true,
            ));
        }
    }
    let base = if accel {
        helper_needs(false, None)
    } else {
        Vec::new()
    };
    for (t, h) in helper_needs(accel, hook) {
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
        (Feature::ReadHook, _) => Error::NoReadHook,
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

/// Whether the raw tracepoint `name` (of the `sock` group) exists.
fn probe_tracepoint(name: &str) -> Result<bool, String> {
    tracepoint_verdict(tracepoint_in_btf(name), tracepoint_in_tracefs("sock", name))
        .ok_or_else(|| "neither BTF nor tracefs lists tracepoints".to_string())
}

/// What an answer of the fexit probe means: refusals that say the kernel
/// cannot trace there are `false`; a missing privilege or anything
/// unexpected, could not tell.
pub fn fexit_verdict(
    r: &std::result::Result<(), crate::sys::bpf::FexitProbeError>,
) -> Result<bool, String> {
    use crate::sys::bpf::FexitProbeError::{Attach, Load};
    const ENOTSUPP: i32 = 524;
    match r {
        Ok(()) => Ok(true),
        Err(Load(e) | Attach(e)) => match e.raw_os_error() {
            // No tracing programs or no trampolines (EINVAL, ENOTSUPP,
            // EOPNOTSUPP), or the function cannot be traced (ESRCH: not in
            // kallsyms; ENOENT, EBUSY: not an ftrace site).
            Some(
                libc::EINVAL
                | ENOTSUPP
                | libc::EOPNOTSUPP
                | libc::ESRCH
                | libc::ENOENT
                | libc::EBUSY,
            ) => Ok(false),
            _ => Err(r
                .as_ref()
                .err()
                .map(ToString::to_string)
                .unwrap_or_default()),
        },
    }
}

/// Whether the kernel runs an fexit program on `function`: it must be in
/// the kernel's BTF, and a trivial program must load on it and attach.
fn fexit_probe(function: &str) -> Result<bool, String> {
    let btf = Btf::from_sys_fs().map_err(|e| format!("no kernel BTF ({e})"))?;
    let Ok(id) = btf.id_by_type_name_kind(function, BtfKind::Func) else {
        debug!("probe fexit: {function} is not in the kernel's BTF");
        return Ok(false);
    };
    let r = crate::sys::bpf::fexit_attaches(id);
    if let Err(e) = &r {
        debug!("probe fexit on {function}: {e}");
    }
    fexit_verdict(&r)
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
        Feature::ReadHook => Ok(ReadHooks::probed().chosen().is_some()),
    };
    result.inspect_err(|e| debug!("probe {feature:?}: could not tell ({e})"))
}

/// The needs of a mode on this kernel (its read hook probed).
pub fn needs_here(accel: bool) -> Vec<Need> {
    needs(accel, ReadHooks::probed().chosen())
}

/// Probes every need of the mode, in order.
pub fn probe_all(accel: bool) -> Vec<(Need, Result<bool, String>)> {
    needs_here(accel)
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
    match first_missing(&needs_here(accel), |f| probe(f).ok()) {
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

    const TP: Option<ReadHook> = Some(ReadHook::Tracepoint);
    const FEXIT: Option<ReadHook> = Some(ReadHook::Fexit);

    #[test]
    fn accel_needs_the_socket_hooks_and_no_accel_does_not() {
        let with: Vec<_> = needs(true, TP).iter().map(|n| n.feature).collect();
        let without: Vec<_> = needs(false, TP).iter().map(|n| n.feature).collect();
        for f in [
            Feature::Program(ProgramType::SkMsg),
            Feature::Program(ProgramType::RawTracePoint),
            Feature::ReadHook,
        ] {
            assert!(with.contains(&f), "{f:?}");
            assert!(!without.contains(&f), "{f:?}");
        }
        for f in &without {
            assert!(with.contains(f), "{f:?}");
        }
        assert!(needs(false, TP).iter().all(|n| !n.accel_only));
        // What only the accelerated mode's programs call is accel_only.
        let redirect = Feature::Helper(ProgramType::SkMsg, BpfHelper::BPF_FUNC_msg_redirect_hash);
        let n = needs(true, TP)
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
        let n = needs(true, TP)
            .into_iter()
            .find(|n| n.feature == cookie)
            .unwrap();
        assert!(!n.accel_only);
        assert!(without.contains(&cookie));
    }

    /// With the fexit hook, nothing of the tracepoint's is asked for, and
    /// the tracing program's helpers are not probed (aya cannot).
    #[test]
    fn the_fexit_hook_needs_nothing_of_the_tracepoint() {
        let f: Vec<_> = needs(true, FEXIT).iter().map(|n| n.feature).collect();
        assert!(f.contains(&Feature::ReadHook));
        assert!(!f.iter().any(|f| matches!(
            f,
            Feature::Program(ProgramType::RawTracePoint | ProgramType::Tracing)
                | Feature::Helper(ProgramType::RawTracePoint | ProgramType::Tracing, _)
        )));
        let t: Vec<_> = needs(true, TP).iter().map(|n| n.feature).collect();
        let tp_helper = Feature::Helper(
            ProgramType::RawTracePoint,
            BpfHelper::BPF_FUNC_probe_read_kernel,
        );
        assert!(t.contains(&tp_helper), "{t:?}");
        // No hook: the need is there (and fails), no read program's.
        let none: Vec<_> = needs(true, None).iter().map(|n| n.feature).collect();
        assert!(none.contains(&Feature::ReadHook));
        assert!(!none.contains(&tp_helper));
        assert_eq!(
            programs(true, FEXIT).last().unwrap().0,
            names::PROG_RECV_FEXIT
        );
    }

    #[test]
    fn fexit_is_chosen_where_it_runs_else_the_tracepoint() {
        let h = |fexit: Result<bool, String>, tracepoint: Result<bool, String>| {
            ReadHooks { fexit, tracepoint }.chosen()
        };
        let unknown = || Err::<bool, String>("EPERM".into());
        assert_eq!(h(Ok(true), Ok(true)), FEXIT);
        assert_eq!(h(Ok(true), Ok(false)), FEXIT);
        assert_eq!(h(Ok(true), unknown()), FEXIT);
        assert_eq!(h(Ok(false), Ok(true)), TP);
        assert_eq!(h(unknown(), Ok(true)), TP);
        // Could not tell: assumed there, the tracepoint first.
        assert_eq!(h(Ok(false), unknown()), TP);
        assert_eq!(h(unknown(), unknown()), TP);
        assert_eq!(h(unknown(), Ok(false)), FEXIT);
        assert_eq!(h(Ok(false), Ok(false)), None);
        let d = ReadHooks {
            fexit: Ok(true),
            tracepoint: Ok(true),
        }
        .detail()
        .unwrap();
        assert!(d.starts_with("fexit on tcp_bpf_recvmsg (probed)"), "{d}");
        let d = ReadHooks {
            fexit: Ok(false),
            tracepoint: Ok(true),
        }
        .detail()
        .unwrap();
        assert!(d.starts_with("sock_recv_length tracepoint (probed)"), "{d}");
        assert!(d.contains("no fexit on tcp_bpf_recvmsg"), "{d}");
        assert_eq!(
            ReadHooks {
                fexit: Ok(false),
                tracepoint: Ok(false)
            }
            .detail(),
            None
        );
    }

    #[test]
    fn fexit_refusals_are_no_and_other_errors_unknown() {
        use crate::sys::bpf::FexitProbeError::{Attach, Load};
        let e = |n| std::io::Error::from_raw_os_error(n);
        assert_eq!(fexit_verdict(&Ok(())), Ok(true));
        assert_eq!(fexit_verdict(&Err(Load(e(libc::EINVAL)))), Ok(false));
        assert_eq!(fexit_verdict(&Err(Attach(e(524)))), Ok(false));
        assert_eq!(fexit_verdict(&Err(Load(e(libc::ESRCH)))), Ok(false));
        assert!(fexit_verdict(&Err(Load(e(libc::EPERM)))).is_err());
        assert!(fexit_verdict(&Err(Attach(e(libc::ENOMEM)))).is_err());
    }

    /// The helper list is read from the object the binary embeds: the
    /// helpers the sources call are in it, for the right program.
    #[test]
    fn helpers_are_read_from_the_embedded_object() {
        let mut progs = programs(true, TP);
        progs.extend(programs(true, FEXIT).last());
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
        // One body for both read hooks (recv.rs): the same helpers.
        assert_eq!(of(names::PROG_RECV_LENGTH), of(names::PROG_RECV_FEXIT));
        has(names::PROG_SOCKOPS, "bpf_sock_hash_update");
        has(names::PROG_STEER, "bpf_map_lookup_elem");
        // Every program calls at least one helper (map lookups at least).
        assert!(called.iter().all(|(_, ids)| !ids.is_empty()), "{called:?}");
        assert_eq!(helper(u32::MAX), None);
    }

    /// This kernel has everything either mode needs, probed.
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
        let n = needs(true, TP);
        assert_eq!(first_missing(&n, |_| Some(true)), None);
        // A probe that could not tell blocks nothing.
        assert_eq!(first_missing(&n, |_| None), None);
        let no_hook = first_missing(&n, |f| Some(f != Feature::ReadHook)).unwrap();
        assert_eq!(no_hook.feature, Feature::ReadHook);
        // The first of several in probe order.
        let m = first_missing(&n, |f| {
            Some(!matches!(
                f,
                Feature::Map(MapType::LruHash) | Feature::ReadHook
            ))
        })
        .unwrap();
        assert_eq!(m.feature, Feature::Map(MapType::LruHash));
    }

    #[test]
    fn a_kernel_without_a_read_hook_is_told_both_and_no_accel() {
        let n = needs(true, None);
        let missing = first_missing(&n, |f| Some(f != Feature::ReadHook)).unwrap();
        let msg = error_for(missing).to_string();
        assert!(msg.contains("6.3"), "{msg}");
        assert!(msg.contains("--no-accel"), "{msg}");
        assert!(msg.contains("sock_recv_length"), "{msg}");
        assert!(msg.contains("fexit on tcp_bpf_recvmsg"), "{msg}");
        assert!(!msg.contains('\n'));
        // Without acceleration no read hook is asked for.
        assert_eq!(
            first_missing(&needs(false, None), |f| Some(f != Feature::ReadHook)),
            None
        );
    }

    #[test]
    fn accel_only_features_suggest_no_accel_and_the_rest_do_not() {
        let sk_msg = needs(true, TP)
            .into_iter()
            .find(|n| n.feature == Feature::Program(ProgramType::SkMsg))
            .unwrap();
        let msg = error_for(&sk_msg).to_string();
        assert!(
            msg.contains("sk_msg") && msg.contains("--no-accel"),
            "{msg}"
        );
        let sockopt = needs(false, TP)
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

    /// Every kernel tproxy runs on (Linux >= 6.1 with BTF) has the
    /// tracepoint from 6.3 on; a name no kernel has is absent.
    #[test]
    fn this_kernels_btf_has_sock_recv_length() {
        let v = aya::util::KernelVersion::current().unwrap();
        let want = v >= aya::util::KernelVersion::new(6, 3, 0);
        assert_eq!(tracepoint_in_btf(names::RECV_TRACEPOINT), Some(want));
        assert_eq!(tracepoint_in_btf("no_such_tracepoint_x"), Some(false));
    }

    /// The fexit probe answers (yes or no) on this kernel, and no for a
    /// function no kernel has; a hook is chosen. This CI host's 6.18 (a
    /// Firecracker build, no fentry/fexit) refuses the load to root with
    /// EPERM: could not tell, so the tracepoint.
    #[test]
    fn the_fexit_probe_answers_here() {
        let r = fexit_probe(names::RECV_FEXIT_FUNCTION);
        assert!(
            r.is_ok() || r.as_ref().is_err_and(|e| e.contains("os error 1)")),
            "{r:?}"
        );
        assert_eq!(fexit_probe("no_such_function_x"), Ok(false));
        assert!(ReadHooks::probed().chosen().is_some());
    }
}
