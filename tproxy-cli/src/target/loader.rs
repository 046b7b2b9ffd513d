//! Load once: the eBPF object, loaded and verified one time, with the
//! hooks every target shares (sk_msg on the SOCKHASH, the read hook), the
//! maps the agent pins and the check that pinned ones are
//! this build's. Targets (`attachment`) attach its programs to their
//! cgroup and interface and have an entry each in `TARGETS`, which the
//! functions at the end read and write. A single `tproxy` run is one
//! `Loaded` with one target; the node agent, one with many.
use std::os::fd::{AsFd as _, OwnedFd};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, RingBuf, SockHash},
    programs::{
        CgroupSockAddr, CgroupSockopt, FEntry, FExit, Iter, RawTracePoint, SchedClassifier, SkMsg,
        SockOps,
    },
};
use tproxy_common::{Counter, NodeConfig, SockKey, Target, names};

use crate::{
    sys::{
        object::EBPF_OBJECT,
        probe::{ReadHook, ReadHooks},
    },
    target::{
        Error, Result,
        attach::{Attachment, RecvmsgAttachment, SendAttachment, SkMsgAttachment},
        inspect::{MapIds, lingered, monotonic_coarse_ns},
        installed::{AttachKind, Attached},
        nudger::NudgeMaps,
    },
};

/// The loaded object. Fields drop in declaration order: the node-wide
/// hooks before the object.
pub struct Loaded {
    sk_msg: Option<SkMsgAttachment>,
    recvmsg: Option<RecvmsgAttachment>,
    send: Option<SendAttachment>,
    /// Kept open: the programs were relocated against this fd.
    sockhash: Option<SockHash<MapData, SockKey>>,
    /// The nudger's iterator link (acceleration), until `nudge_maps`.
    nudge_link: Option<OwnedFd>,
    ebpf: Ebpf,
    accel: bool,
    max_targets: u32,
    ids: MapIds,
    /// The node-wide hooks, for the runtime record.
    attachments: Vec<Attached>,
    /// Where the read hook's link is pinned (the agent's node directory),
    /// if anywhere.
    pin_dir: Option<std::path::PathBuf>,
}

/// The maps the agent pins: every one that carries state between its
/// programs (NODE is written at each load; the globals are per object).
pub const PINNED_MAPS: [&str; 20] = [
    names::TARGETS,
    // Pods' addresses: same-node pairing of an adopted target keeps working.
    names::TARGET_ADDRS,
    names::COUNTERS,
    names::FLOWS,
    // Each target's count of FLOWS entries goes with FLOWS.
    names::FLOWS_IN_USE,
    names::SYNS,
    names::CLOSING,
    names::SOCKHASH,
    names::SOCKS,
    names::SOCKS_IN_USE,
    names::PENDING_PEERS,
    // Connections open when an adopted target was attached still pass.
    names::PRIOR_FLOWS,
    names::PROXY_CONNECTS,
    // Where the proxies of adopted targets listen.
    names::PROXY_LISTENERS,
    names::PRIOR_LISTENERS,
    // The kept read hook (a previous agent's) reports into this one.
    names::NUDGE_EVENTS,
    // Options noted before sockets were paired, and which flow each of the
    // proxies' upstream sockets serves (`tproxy flows`).
    names::SOCK_API,
    names::LISTENER_API,
    names::ASKED,
    names::UPSTREAM_FLOWS,
];

/// Maps pinned in `dir` by an agent of another build may have another
/// layout (a struct grew, a counter was added): reusing them would fail at
/// program load with a verifier error, or read values wrong. Each pinned
/// map's key and value sizes must be this object's, and COUNTERS must hold
/// this build's counters for every slot of the pinned TARGETS.
fn check_pinned_layout(dir: &std::path::Path) -> Result<()> {
    let other = |detail: String| Error::PinnedOtherBuild {
        dir: dir.to_path_buf(),
        detail,
    };
    let Ok(obj) = aya_obj::Object::parse(EBPF_OBJECT) else {
        return Ok(());
    };
    let pinned = |name: &str| aya::maps::MapInfo::from_pin(dir.join(name)).ok();
    for name in PINNED_MAPS {
        let (Some(info), Some(ours)) = (pinned(name), obj.maps.get(name)) else {
            continue;
        };
        if (info.key_size(), info.value_size()) != (ours.key_size(), ours.value_size()) {
            return Err(other(format!(
                "{name}: {} B keys and {} B values there, {} B and {} B in this build",
                info.key_size(),
                info.value_size(),
                ours.key_size(),
                ours.value_size()
            )));
        }
    }
    if let (Some(targets), Some(counters)) = (pinned(names::TARGETS), pinned(names::COUNTERS)) {
        let want = (targets.max_entries() + 1) * Counter::COUNT;
        if counters.max_entries() != want {
            return Err(other(format!(
                "{}: {} entries there for {} targets, this build's {} counters need {want}",
                names::COUNTERS,
                counters.max_entries(),
                targets.max_entries(),
                Counter::COUNT
            )));
        }
    }
    for name in [names::FLOWS_IN_USE, names::SOCKS_IN_USE] {
        if let (Some(targets), Some(in_use)) = (pinned(names::TARGETS), pinned(name))
            && in_use.max_entries() != targets.max_entries() + 1
        {
            return Err(other(format!(
                "{name}: {} entries there for {} targets, this build needs {}",
                in_use.max_entries(),
                targets.max_entries(),
                targets.max_entries() + 1
            )));
        }
    }
    Ok(())
}

/// Table sizes (max entries); `None`: the object's default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapSizes {
    pub flows: Option<u32>,
    pub syns: Option<u32>,
    pub closing: Option<u32>,
    /// SOCKHASH and SOCKS (accelerated sockets).
    pub socks: Option<u32>,
}

/// How to load: see [`Loaded::load_with`].
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    pub accel: bool,
    pub max_targets: u32,
    pub single: Option<u64>,
    pub sizes: MapSizes,
    pub pin_dir: Option<std::path::PathBuf>,
    /// Pair clients with proxies across pods of this node (both legs).
    pub same_node: bool,
}

pub(crate) fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .unwrap_or_else(|| panic!("program {name} missing from the embedded object"));
    prog.try_into().map_err(|e| Error::load_program(name, e))
}

fn map_id(ebpf: &Ebpf, name: &'static str) -> Result<u32> {
    let map = ebpf
        .map(name)
        .unwrap_or_else(|| panic!("map {name} missing"));
    map_data(map, name)
        .info()
        .map(|i| i.id())
        .map_err(|source| Error::Map { name, source })
}

fn map_data<'a>(map: &'a aya::maps::Map, name: &str) -> &'a MapData {
    match map {
        aya::maps::Map::Array(d)
        | aya::maps::Map::PerCpuArray(d)
        | aya::maps::Map::LruHashMap(d)
        | aya::maps::Map::HashMap(d)
        | aya::maps::Map::SockHash(d) => d,
        other => panic!("unexpected map type for {name}: {other:?}"),
    }
}

/// The sockops program a mode uses: with acceleration it also pairs
/// sockets (and needs CAP_PERFMON); without, it tracks flows only.
pub fn sockops_name(accel: bool) -> &'static str {
    if accel {
        names::PROG_SOCKOPS
    } else {
        names::PROG_SOCKOPS_FLOWS
    }
}

/// A loaded program's record entry (its link id comes later).
pub(crate) fn attached(
    what: &str,
    kind: AttachKind,
    name: &'static str,
    info: std::result::Result<aya::programs::ProgramInfo, aya::programs::ProgramError>,
) -> Result<Attached> {
    let info = info.map_err(|e| Error::load_program(name, e))?;
    Ok(Attached {
        what: what.to_string(),
        kind,
        program: name.to_string(),
        prog_id: info.id(),
        link_id: None,
    })
}

impl Loaded {
    /// Loads the object for one target, the namespace `netns_cookie` (a
    /// single run), or with `single` None for up to `max_targets` (the
    /// agent), and with `accel` attaches the node-wide acceleration hooks.
    /// Every program a target needs is loaded (verified) here, so attaching
    /// a target only links.
    pub fn load(accel: bool, max_targets: u32, single: Option<u64>) -> Result<Loaded> {
        Loaded::load_with(&LoadOptions {
            accel,
            max_targets,
            single,
            ..LoadOptions::default()
        })
    }

    /// `load` with the node agent's extras: table sizes, and maps and the
    /// node-wide read hook pinned under `pin_dir` (reused when already
    /// there: an agent restart keeps every flow and accelerated socket).
    pub fn load_with(o: &LoadOptions) -> Result<Loaded> {
        let (accel, single) = (o.accel, o.single);
        let max_targets = if single.is_some() {
            1
        } else {
            o.max_targets.max(1)
        };
        let (tcp_write_seq_offset, tcp_copied_seq_offset) = crate::sys::btf::tcp_seq_offsets();
        if accel && (tcp_write_seq_offset == 0 || tcp_copied_seq_offset == 0) {
            // Without them a non-blocking sender's unseen sends could be
            // overtaken (tcpseq.rs): no acceleration rather than disorder.
            return Err(crate::sys::Error::AccelUnsupported(
                "BTF for struct tcp_sock.write_seq and copied_seq (byte order between the redirect and TCP is kept by them)".into(),
            )
            .into());
        }
        let mem = match (crate::sys::btf::socket_memory_offsets(), accel) {
            (Some(m), _) => m,
            (None, false) => [0; 7],
            // Without them a redirect could meet a reader whose memory is
            // short, and the kernel would hand the sender ENOMEM
            // (tproxy-ebpf/src/memory.rs): no acceleration then.
            (None, true) => {
                return Err(crate::sys::Error::AccelUnsupported(
                    "BTF for the kernel's socket memory accounting (struct proto.memory_allocated, sock.sk_memcg, mem_cgroup.tcpmem)".into(),
                )
                .into());
            }
        };
        let cpus = crate::sys::system::possible_cpus();
        let mut node = NodeConfig {
            sk_prot_offset: mem[0],
            proto_memory_allocated_offset: mem[1],
            proto_memory_pressure_offset: mem[2],
            proto_sysctl_mem_offset: mem[3],
            sk_memcg_offset: mem[4],
            memcg_tcpmem_offset: mem[5],
            page_counter_max_offset: mem[6],
            // 2 MiB in 4 KiB pages per CPU (`NodeConfig::mem_margin_pages`).
            mem_margin_pages: cpus * 512,
            possible_cpus: cpus,
            sk_rcvbuf_offset: crate::sys::btf::sk_rcvbuf_offset(),
            tcp_write_seq_offset,
            tcp_copied_seq_offset,
            msghdr_flags_offset: crate::sys::btf::msghdr_flags_offset(),
            single_netns_cookie: single.unwrap_or(0),
            flags: if o.same_node {
                tproxy_common::node_flags::SAME_NODE
            } else {
                0
            },
            ..NodeConfig::default()
        };
        let multi: u8 = if single.is_none() {
            let (nd_net, cookie) = crate::sys::btf::netns_offsets().ok_or_else(|| {
                crate::sys::Error::KernelLacks(
                    "BTF for struct net_device.nd_net and struct net.net_cookie (the agent's tc programs read a packet's namespace through them)".into(),
                )
            })?;
            node.dev_nd_net_offset = nd_net;
            node.net_cookie_offset = cookie;
            1
        } else {
            0
        };
        // bpf_get_current_pid_tgid in sockops and cgroup/getsockopt
        // (6.10), probed: where it is missing the calls are dead code.
        let pid_tgid: u8 = crate::sys::probe::pid_tgid_everywhere().into();
        // bpf_get_current_ancestor_cgroup_id in sock_ops (6.4); before,
        // sockops walks the task's cgroups with offsets from BTF.
        let sockops_cgroup: u8 = crate::sys::probe::sockops_has_cgroup_helper().into();
        if sockops_cgroup == 0 {
            let o = crate::sys::btf::task_cgroup_offsets().ok_or_else(|| {
                crate::sys::Error::KernelLacks(
                    "bpf_get_current_ancestor_cgroup_id in sock_ops programs (Linux >= 6.4), or BTF for the task's cgroups to read the caller's cgroup without it".into(),
                )
            })?;
            node.task_cgroups_offset = o[0];
            node.css_set_dfl_cgrp_offset = o[1];
            node.cgroup_level_offset = o[2];
            node.cgroup_ancestors_offset = o[3];
            node.cgroup_kn_offset = o[4];
            node.kernfs_node_id_offset = o[5];
        }
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(names::TARGETS, max_targets)
            .map_max_entries(
                names::TARGET_ADDRS,
                max_targets * tproxy_common::ADDRS_PER_TARGET,
            )
            // Slot 0 counts events of no target.
            .map_max_entries(names::COUNTERS, (max_targets + 1) * Counter::COUNT)
            .map_max_entries(names::FLOWS_IN_USE, max_targets + 1)
            .map_max_entries(names::SOCKS_IN_USE, max_targets + 1)
            .override_global(tproxy_common::MULTI_TARGET_GLOBAL, &multi, true)
            .override_global(tproxy_common::PID_TGID_GLOBAL, &pid_tgid, true)
            .override_global(tproxy_common::SOCKOPS_CGROUP_GLOBAL, &sockops_cgroup, true);
        for (name, size) in [
            (names::FLOWS, o.sizes.flows),
            (names::SYNS, o.sizes.syns),
            (names::CLOSING, o.sizes.closing),
            (names::SOCKHASH, o.sizes.socks),
            (names::SOCKS, o.sizes.socks),
        ] {
            if let Some(n) = size {
                loader.map_max_entries(name, n);
            }
        }
        let pins: Vec<(&str, std::path::PathBuf)> = match &o.pin_dir {
            Some(dir) => PINNED_MAPS.iter().map(|&n| (n, dir.join(n))).collect(),
            None => Vec::new(),
        };
        if let Some(dir) = &o.pin_dir {
            check_pinned_layout(dir)?;
        }
        for (name, path) in &pins {
            // aya opens the pin if it exists, else creates the map and pins it.
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(Error::LoadObject)?;
        let mut arr: Array<&mut MapData, NodeConfig> = Array::try_from(
            ebpf.map_mut(names::NODE).expect("NODE in object"),
        )
        .map_err(|source| Error::Map {
            name: names::NODE,
            source,
        })?;
        arr.set(0, node, 0).map_err(|source| Error::Map {
            name: names::NODE,
            source,
        })?;
        let ids = MapIds {
            targets: map_id(&ebpf, names::TARGETS)?,
            counters: map_id(&ebpf, names::COUNTERS)?,
            flows: map_id(&ebpf, names::FLOWS)?,
            syns: map_id(&ebpf, names::SYNS)?,
            closing: map_id(&ebpf, names::CLOSING)?,
            sockhash: map_id(&ebpf, names::SOCKHASH)?,
            socks: map_id(&ebpf, names::SOCKS)?,
            flows_in_use: map_id(&ebpf, names::FLOWS_IN_USE)?,
            socks_in_use: map_id(&ebpf, names::SOCKS_IN_USE)?,
            upstream_flows: map_id(&ebpf, names::UPSTREAM_FLOWS)?,
        };
        for name in [names::PROG_RESTORE, names::PROG_STEER] {
            let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
            prog.load().map_err(|e| Error::load_program(name, e))?;
        }
        let name = sockops_name(accel);
        let prog: &mut SockOps = program(&mut ebpf, name)?;
        prog.load().map_err(|e| Error::load_program(name, e))?;
        let prog: &mut CgroupSockopt = program(&mut ebpf, names::PROG_GETSOCKOPT)?;
        prog.load()
            .map_err(|e| Error::load_program(names::PROG_GETSOCKOPT, e))?;
        if accel {
            let prog: &mut CgroupSockopt = program(&mut ebpf, names::PROG_SETSOCKOPT)?;
            prog.load()
                .map_err(|e| Error::load_program(names::PROG_SETSOCKOPT, e))?;
        }
        for name in [names::PROG_GETSOCKNAME4, names::PROG_GETSOCKNAME6] {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(|e| Error::load_program(name, e))?;
        }

        let mut loaded = Loaded {
            sk_msg: None,
            recvmsg: None,
            send: None,
            sockhash: None,
            nudge_link: None,
            ebpf,
            accel,
            max_targets,
            ids,
            attachments: Vec::new(),
            pin_dir: o.pin_dir.clone(),
        };
        if accel {
            loaded.attach_accel()?;
        }
        Ok(loaded)
    }

    /// The read hook (reads of redirected bytes, counted before any byte
    /// is redirected), then sk_msg on the SOCKHASH.
    fn attach_accel(&mut self) -> Result<()> {
        let hook = ReadHooks::probed()
            .chosen()
            .ok_or(crate::sys::Error::NoReadHook)?;
        let btf = Btf::from_sys_fs().map_err(|e| {
            crate::sys::Error::KernelLacks(format!(
                "readable kernel BTF for the read hook and the {} iterator ({e})",
                names::PROG_NUDGE_ITER
            ))
        })?;
        self.attach_read_hook(hook, &btf)?;
        if hook == ReadHook::Fexit {
            self.attach_send_hook(&btf)?;
        }
        let ebpf = &mut self.ebpf;
        let sockhash: SockHash<MapData, SockKey> =
            SockHash::try_from(ebpf.take_map(names::SOCKHASH).expect("SOCKHASH in object"))
                .map_err(|source| Error::Map {
                    name: names::SOCKHASH,
                    source,
                })?;
        let prog: &mut SkMsg = program(ebpf, names::PROG_SK_MSG)?;
        prog.load()
            .map_err(|e| Error::load_program(names::PROG_SK_MSG, e))?;
        let what = format!("sk_msg {} to SOCKHASH", names::PROG_SK_MSG);
        self.attachments.push(attached(
            &what,
            AttachKind::SkMsg,
            names::PROG_SK_MSG,
            prog.info(),
        )?);
        let id = prog.attach(sockhash.fd()).map_err(|source| Error::Attach {
            what: "sk_msg to the SOCKHASH".into(),
            source,
        })?;
        self.sk_msg = Some(SkMsgAttachment::new(
            what,
            prog.take_link(id).expect("fresh link"),
        ));
        self.sockhash = Some(sockhash);

        // The nudger's hand: loaded and linked now, so a kernel that
        // refuses it fails the start, not the first stall.
        let prog: &mut Iter = program(ebpf, names::PROG_NUDGE_ITER)?;
        prog.load(names::NUDGE_ITER_TYPE, &btf)
            .map_err(|e| Error::load_program(names::PROG_NUDGE_ITER, e))?;
        self.nudge_link = Some(crate::target::nudger::iter_link(prog)?);
        Ok(())
    }

    /// Loads the read hook's program and attaches it, or adopts the link
    /// a previous agent pinned: a link cannot swap its program for one of
    /// another load here (a raw tracepoint link not at all), and two hooks
    /// would count every read twice.
    fn attach_read_hook(&mut self, hook: ReadHook, btf: &Btf) -> Result<()> {
        let name = hook.program();
        let ebpf = &mut self.ebpf;
        let load = |e| Error::load_program(name, e);
        let info = match hook {
            ReadHook::Fexit => {
                let prog: &mut FExit = program(ebpf, name)?;
                prog.load(names::RECV_FEXIT_FUNCTION, btf).map_err(load)?;
                prog.info()
            }
            ReadHook::Tracepoint => {
                let prog: &mut RawTracePoint = program(ebpf, name)?;
                prog.load().map_err(load)?;
                prog.info()
            }
        };
        let pin = self.pin_dir.as_ref().map(|d| d.join(hook.link_pin()));
        let other = self
            .pin_dir
            .as_ref()
            .map(|d| d.join(hook.other().link_pin()));
        if let Some(other) = other.filter(|p| p.exists()) {
            // The previous agent counted with the other hook (another build,
            // or the kernel's choice changed). It goes before ours comes:
            // a read counted twice could end a drain with bytes unread; one
            // missed in between only keeps its sender on TCP.
            std::fs::remove_file(&other)
                .map_err(|e| Error::io(format!("removing {}", other.display()), e))?;
            tracing::warn!(
                "removed the previous agent's read hook {} ({}): this one attaches {}",
                other.display(),
                hook.other().describe(),
                hook.describe()
            );
        }
        if let Some(pin) = pin.as_ref().filter(|p| p.exists()) {
            tracing::info!(
                "kept the pinned read hook {} ({}) of the previous agent",
                pin.display(),
                hook.describe()
            );
            return Ok(());
        }
        let (what, kind) = match hook {
            ReadHook::Fexit => (
                format!("fexit {name} on {}", names::RECV_FEXIT_FUNCTION),
                AttachKind::Fexit,
            ),
            ReadHook::Tracepoint => (
                format!("raw tracepoint {name} on {}", names::RECV_TRACEPOINT),
                AttachKind::Tracepoint,
            ),
        };
        let info = info.map_err(load)?;
        let prog_id = info.id();
        self.attachments
            .push(attached(&what, kind, name, Ok(info))?);
        let attach_err = |source| Error::Attach {
            what: hook.describe(),
            source,
        };
        self.recvmsg = Some(match hook {
            ReadHook::Fexit => {
                let prog: &mut FExit = program(ebpf, name)?;
                let id = prog.attach().map_err(attach_err)?;
                let link = prog.take_link(id).expect("fresh link");
                RecvmsgAttachment::Fexit(Attachment::new(what, link))
            }
            ReadHook::Tracepoint => {
                let prog: &mut RawTracePoint = program(ebpf, name)?;
                let id = prog.attach(names::RECV_TRACEPOINT).map_err(attach_err)?;
                let link = prog.take_link(id).expect("fresh link");
                RecvmsgAttachment::Tracepoint(Attachment::new(what, link))
            }
        });
        if let Some(pin) = &pin {
            crate::sys::pins::pin_newest_link_of(prog_id, pin)?;
        }
        Ok(())
    }

    /// The send hook, where the kernel has fentry (the fexit read hook's
    /// probe found tracing programs): it notes MSG_OOB sends, which sk_msg
    /// cannot see, before sk_msg runs. Not pinned: while no agent runs,
    /// such a send is redirected (its urgent byte inline), no byte lost.
    fn attach_send_hook(&mut self, btf: &Btf) -> Result<()> {
        let name = names::PROG_SEND_FENTRY;
        let prog: &mut FEntry = program(&mut self.ebpf, name)?;
        prog.load(names::SEND_FENTRY_FUNCTION, btf)
            .map_err(|e| Error::load_program(name, e))?;
        let what = format!("fentry {name} on {}", names::SEND_FENTRY_FUNCTION);
        self.attachments
            .push(attached(&what, AttachKind::Fentry, name, prog.info())?);
        let id = prog.attach().map_err(|source| Error::Attach {
            what: what.clone(),
            source,
        })?;
        let link = prog.take_link(id).expect("fresh link");
        self.send = Some(Attachment::new(what, link));
        Ok(())
    }

    /// The read hook this object attaches (or adopted), if acceleration.
    pub fn read_hook(&self) -> Option<ReadHook> {
        self.accel.then(|| ReadHooks::probed().chosen()).flatten()
    }

    /// What the nudger needs (with acceleration, once): the report ring
    /// buffer, new handles on SOCKS and NUDGE, the iterator's link.
    pub fn nudge_maps(&mut self) -> Result<Option<NudgeMaps>> {
        let Some(link) = self.nudge_link.take() else {
            return Ok(None);
        };
        let name = names::NUDGE_EVENTS;
        let events = RingBuf::try_from(self.ebpf.take_map(name).expect("NUDGE_EVENTS in object"))
            .map_err(|source| Error::Map { name, source })?;
        let socks =
            HashMap::try_from(self.hash_map(names::SOCKS)?).map_err(|source| Error::Map {
                name: names::SOCKS,
                source,
            })?;
        let nudge =
            HashMap::try_from(self.hash_map(names::NUDGE)?).map_err(|source| Error::Map {
                name: names::NUDGE,
                source,
            })?;
        Ok(Some(NudgeMaps {
            events,
            socks,
            nudge,
            link,
        }))
    }

    pub fn accel(&self) -> bool {
        self.accel
    }

    pub fn max_targets(&self) -> u32 {
        self.max_targets
    }

    pub fn map_ids(&self) -> MapIds {
        self.ids
    }

    /// Record entries of the node-wide hooks.
    pub fn attachments(&self) -> &[Attached] {
        &self.attachments
    }

    /// What the node-wide hooks are, one line each.
    pub fn hooks(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(a) = &self.sk_msg {
            out.push(a.what().to_string());
        }
        if let Some(a) = &self.recvmsg {
            out.push(a.what().to_string());
        }
        out
    }

    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    pub(crate) fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Removes closed flows that lingered `FLOW_LINGER_NS`; how many.
    pub fn reap_flows(&mut self) -> Result<usize> {
        use tproxy_common::{FlowKey, FlowValue};

        let map = self
            .ebpf
            .map_mut(names::CLOSING)
            .expect("CLOSING in object");
        let mut m: HashMap<&mut MapData, FlowKey, FlowValue> =
            HashMap::try_from(map).map_err(|source| Error::Map {
                name: names::CLOSING,
                source,
            })?;
        let now = monotonic_coarse_ns();
        let done: Vec<FlowKey> = m
            .iter()
            .flatten()
            .filter(|(_, v)| lingered(v, now))
            .map(|(k, _)| k)
            .collect();
        // The same tuple may have closed again since the read: look again
        // just before removing.
        Ok(done
            .into_iter()
            .filter(|k| m.get(k, 0).is_ok_and(|v| lingered(&v, now)) && m.remove(k).is_ok())
            .count())
    }

    /// A new descriptor of the `TARGETS` map: what a target's owner keeps
    /// to take its entry out when it goes.
    pub(crate) fn targets_map(&self) -> Result<Map> {
        self.hash_map(names::TARGETS)
    }

    /// New descriptors of the maps a removed target's entries are swept
    /// from (`sweep.rs`): what a target's owner keeps to sweep when it goes.
    pub(crate) fn sweep_maps(&self) -> Result<crate::target::sweep::SweepMaps> {
        crate::target::sweep::SweepMaps::of(&self.ebpf, self.sockhash.as_ref())
    }

    /// A new descriptor of the `PRIOR_FLOWS` map, for the same reason.
    pub(crate) fn prior_flows_map(&self) -> Result<Map> {
        self.hash_map(names::PRIOR_FLOWS)
    }

    /// A new descriptor of the `PRIOR_LISTENERS` map, for the same reason.
    pub(crate) fn prior_listeners_map(&self) -> Result<Map> {
        self.hash_map(names::PRIOR_LISTENERS)
    }

    /// A new descriptor of the `TARGET_ADDRS` map, for the same reason.
    pub(crate) fn target_addrs_map(&self) -> Result<Map> {
        self.hash_map(names::TARGET_ADDRS)
    }

    fn hash_map(&self, name: &'static str) -> Result<Map> {
        let map = self
            .ebpf
            .map(name)
            .unwrap_or_else(|| panic!("{name} in object"));
        let fd = map_data(map, name)
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::io(format!("duplicating map {name}"), e))?;
        MapData::from_fd(fd)
            .map(Map::HashMap)
            .map_err(|source| Error::Map { name, source })
    }
}

/// Reads, writes and removes `TARGETS` entries through any handle on it.
pub(crate) fn write_target(map: &mut Map, cookie: u64, target: &Target) -> Result<()> {
    let mut m: HashMap<&mut MapData, u64, Target> =
        HashMap::try_from(map).map_err(|source| Error::Map {
            name: names::TARGETS,
            source,
        })?;
    m.insert(cookie, target, 0).map_err(|source| Error::Map {
        name: names::TARGETS,
        source,
    })
}

pub(crate) fn read_target(map: &Map, cookie: u64) -> Result<Target> {
    let m: HashMap<&MapData, u64, Target> =
        HashMap::try_from(map).map_err(|source| Error::Map {
            name: names::TARGETS,
            source,
        })?;
    m.get(&cookie, 0).map_err(|source| Error::Map {
        name: names::TARGETS,
        source,
    })
}

/// Sets or clears a `flags::*` bit of the target `cookie`'s entry: the one
/// way a target's flags change (a single run's drain, the agent's).
pub(crate) fn set_flag(map: &mut Map, cookie: u64, flag: u32, on: bool) -> Result<()> {
    let mut t = read_target(map, cookie)?;
    if on {
        t.config.flags |= flag;
    } else {
        t.config.flags &= !flag;
    }
    write_target(map, cookie, &t)
}

pub(crate) fn remove_target(map: &mut Map, cookie: u64) -> Result<()> {
    let mut m: HashMap<&mut MapData, u64, Target> =
        HashMap::try_from(map).map_err(|source| Error::Map {
            name: names::TARGETS,
            source,
        })?;
    m.remove(&cookie).map_err(|source| Error::Map {
        name: names::TARGETS,
        source,
    })
}
