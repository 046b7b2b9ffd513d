//! One running tproxy: the loaded object, every attachment, and the lock on
//! its runtime record. Built all-or-nothing: if a step fails, the owners
//! already created are dropped (detached) before the error returns.
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, SockHash},
    programs::{
        CgroupAttachMode, CgroupSockAddr, CgroupSockopt, RawTracePoint, SchedClassifier, SkMsg,
        SockOps, TcAttachType,
        links::LinkOrder,
        tc::{NlOptions, TcAttachOptions},
    },
};
use tproxy_common::{Config, Counter, FlowKey, FlowValue, SockKey, flags, names};
use tracing::{info, warn};

use crate::{
    Error, Options, PortSet, Result, Steer,
    attach::{
        Attachment, GetsocknameAttachment, GetsockoptAttachment, RecvmsgAttachment,
        SkMsgAttachment, SockopsAttachment, TcAttachment,
    },
    inspect::{FlowStats, flow_stats, lingered, monotonic_coarse_ns, socks_state, sum_counters},
    options::default_steer_mark,
    routing::{self, TproxyRouting},
    state::{AttachKind, Attached, InstanceLock, Record},
    system,
    tc::{ClsactQdisc, TcMode},
};

/// The eBPF object, built by build.rs and embedded in the binary.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tproxy"));

/// A running instance. Fields drop in declaration order: steering stops
/// first, the runtime record goes last.
pub struct Instance {
    steer: Option<TcAttachment>,
    restore: Option<TcAttachment>,
    #[expect(dead_code, reason = "held for its Drop")]
    routing: Option<TproxyRouting>,
    getsockopt: Option<GetsockoptAttachment>,
    getsockname: Vec<GetsocknameAttachment>,
    sockops: Option<SockopsAttachment>,
    sk_msg: Option<SkMsgAttachment>,
    recvmsg: Option<RecvmsgAttachment>,
    accel_stopped: bool,
    #[expect(dead_code, reason = "held for its Drop")]
    clsact: Option<ClsactQdisc>,
    #[expect(dead_code, reason = "held for its Drop")]
    sockhash: Option<SockHash<MapData, SockKey>>,
    ebpf: Ebpf,
    record: Record,
    #[expect(dead_code, reason = "held for its Drop")]
    lock: InstanceLock,
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T>
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
    let data: &MapData = match map {
        aya::maps::Map::Array(d)
        | aya::maps::Map::PerCpuArray(d)
        | aya::maps::Map::LruHashMap(d)
        | aya::maps::Map::HashMap(d)
        | aya::maps::Map::SockHash(d) => d,
        other => panic!("unexpected map type for {name}: {other:?}"),
    };
    data.info()
        .map(|i| i.id())
        .map_err(|source| Error::Map { name, source })
}

impl Instance {
    pub fn start(opts: &Options) -> Result<Instance> {
        opts.validate()?;
        system::check_privileges_for(opts.accel)?;
        system::check_kernel_version()?;
        system::check_btf()?;
        crate::probe::check(opts.accel)?;
        let ifindex = system::ifindex(&opts.iface)?;
        let system::CgroupDir {
            path: cgroup,
            dir: cgroup_fd,
            private_mount,
        } = system::open_cgroup(opts.cgroup.as_deref())?;
        if let Some(what) = private_mount {
            info!("{what}");
        }
        let tc_mode = opts.tc_mode.check()?;
        let netns_inode = system::netns_inode()?;
        let l2_len = system::link_header_len(&opts.iface)?;
        let netns_cookie = system::netns_cookie()?;

        let (mut lock, stale) = InstanceLock::acquire(netns_inode, &opts.iface)?;
        if let Some(stale) = stale {
            crate::recovery::recover_at_start(&stale, &opts.iface, ifindex);
        }
        // Mark and table checked free (or picked) before anything exists.
        let tproxy_spec = match opts.steer {
            Steer::Tproxy => {
                let spec = routing::plan(opts, ifindex)?;
                routing::check_nft(&spec)?;
                Some(spec)
            }
            Steer::Rewrite => None,
        };
        let steer_mark = tproxy_spec.as_ref().map_or_else(
            || {
                opts.steer_mark
                    .unwrap_or_else(|| default_steer_mark(ifindex))
            },
            |s| s.mark,
        );
        if steer_mark == opts.proxy_mark {
            return Err(Error::MarksCollide(steer_mark));
        }

        let mut ebpf = EbpfLoader::new()
            .load(EBPF_OBJECT)
            .map_err(Error::LoadObject)?;
        let config = Config {
            proxy_port: opts.proxy_port,
            steer_mode: opts.steer.mode() as u8,
            l2_len,
            proxy_mark: opts.proxy_mark,
            steer_mark,
            flags: flags::STEER_NEW | if opts.accel { flags::ACCEL } else { 0 },
            accel_max_queued: opts.accel_max_queued,
            accel_retire_ms: opts.accel_retire_ms,
            _pad0: 0,
            sk_rcvbuf_offset: crate::btf::sk_rcvbuf_offset(),
            netns_cookie,
        };
        write_config(&mut ebpf, &config, &opts.ports)?;

        let mut record = Record {
            pid: std::process::id() as i32,
            iface: opts.iface.clone(),
            ifindex,
            netns_inode,
            cgroup: cgroup.clone(),
            tc_mode: None,
            created_clsact: false,
            steer: opts.steer,
            tproxy: tproxy_spec.clone(),
            counters_map_id: map_id(&ebpf, names::COUNTERS)?,
            flows_map_id: map_id(&ebpf, names::FLOWS)?,
            syns_map_id: map_id(&ebpf, names::SYNS)?,
            closing_map_id: map_id(&ebpf, names::CLOSING)?,
            sockhash_map_id: map_id(&ebpf, names::SOCKHASH)?,
            socks_map_id: map_id(&ebpf, names::SOCKS)?,
            ports: opts.ports.to_string(),
            proxy_port: opts.proxy_port,
            accel: opts.accel,
            started_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            netns_cookie,
            attachments: Vec::new(),
            ready: false,
        };

        // Cgroup attachments are bpf_links, which the kernel always stacks
        // (multi mode): `Single` only means "no BPF_F_ALLOW_* flags", which
        // link_create requires. Other programs on the cgroup are untouched.
        //
        // Attach from the inside out, steering last: by the time a flow is
        // steered, everything that serves it is in place.
        let mut inst_sk_msg = None;
        let mut inst_sockhash = None;
        let mut inst_recvmsg = None;
        if opts.accel {
            // Reads of redirected bytes, counted before any byte is redirected.
            let prog: &mut RawTracePoint = program(&mut ebpf, names::PROG_RECV_LENGTH)?;
            prog.load()
                .map_err(|e| Error::load_program(names::PROG_RECV_LENGTH, e))?;
            let what = format!(
                "raw tracepoint {} on {}",
                names::PROG_RECV_LENGTH,
                names::RECV_TRACEPOINT
            );
            record.attachments.push(attached(
                &what,
                AttachKind::Tracepoint,
                names::PROG_RECV_LENGTH,
                prog.info(),
            )?);
            let id = prog
                .attach(names::RECV_TRACEPOINT)
                .map_err(|source| Error::Attach {
                    what: format!("raw tracepoint {}", names::RECV_TRACEPOINT),
                    source,
                })?;
            inst_recvmsg = Some(RecvmsgAttachment::new(
                what,
                prog.take_link(id).expect("fresh link"),
            ));

            let sockhash: SockHash<MapData, SockKey> =
                SockHash::try_from(ebpf.take_map(names::SOCKHASH).expect("SOCKHASH in object"))
                    .map_err(|source| Error::Map {
                        name: names::SOCKHASH,
                        source,
                    })?;
            let prog: &mut SkMsg = program(&mut ebpf, names::PROG_SK_MSG)?;
            prog.load()
                .map_err(|e| Error::load_program(names::PROG_SK_MSG, e))?;
            let what = format!("sk_msg {} to SOCKHASH", names::PROG_SK_MSG);
            record.attachments.push(attached(
                &what,
                AttachKind::SkMsg,
                names::PROG_SK_MSG,
                prog.info(),
            )?);
            let id = prog.attach(sockhash.fd()).map_err(|source| Error::Attach {
                what: "sk_msg to the SOCKHASH".into(),
                source,
            })?;
            let link = prog.take_link(id).expect("fresh link");
            inst_sk_msg = Some(SkMsgAttachment::new(what, link));
            // Kept open: the programs were relocated against this fd.
            inst_sockhash = Some(sockhash);
        }

        // sockops tells the flow table when the proxy's socket is
        // established and when it closes, so it is attached in every mode;
        // with acceleration the same program pairs the sockets.
        let sockops_name = if opts.accel {
            names::PROG_SOCKOPS
        } else {
            names::PROG_SOCKOPS_FLOWS
        };
        let prog: &mut SockOps = program(&mut ebpf, sockops_name)?;
        prog.load()
            .map_err(|e| Error::load_program(sockops_name, e))?;
        let what = format!("sockops {sockops_name} to {}", cgroup.display());
        record.attachments.push(attached(
            &what,
            AttachKind::Cgroup,
            sockops_name,
            prog.info(),
        )?);
        let id = prog
            .attach(&cgroup_fd, CgroupAttachMode::Single)
            .map_err(|source| Error::Attach {
                what: format!("sockops to cgroup {}", cgroup.display()),
                source,
            })?;
        let inst_sockops = Some(SockopsAttachment::new(
            what,
            prog.take_link(id).expect("fresh link"),
        ));

        let prog: &mut CgroupSockopt = program(&mut ebpf, names::PROG_GETSOCKOPT)?;
        prog.load()
            .map_err(|e| Error::load_program(names::PROG_GETSOCKOPT, e))?;
        let what = format!(
            "cgroup/getsockopt {} to {}",
            names::PROG_GETSOCKOPT,
            cgroup.display()
        );
        record.attachments.push(attached(
            &what,
            AttachKind::Cgroup,
            names::PROG_GETSOCKOPT,
            prog.info(),
        )?);
        let id = prog
            .attach(&cgroup_fd, CgroupAttachMode::Single)
            .map_err(|source| Error::Attach {
                what: format!("cgroup/getsockopt to {}", cgroup.display()),
                source,
            })?;
        let inst_getsockopt = Some(GetsockoptAttachment::new(
            what,
            prog.take_link(id).expect("fresh link"),
        ));
        let mut inst_getsockname = Vec::new();
        for (name, hook) in [
            (names::PROG_GETSOCKNAME4, "getsockname4"),
            (names::PROG_GETSOCKNAME6, "getsockname6"),
        ] {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(|e| Error::load_program(name, e))?;
            let what = format!("cgroup/{hook} {name} to {}", cgroup.display());
            record
                .attachments
                .push(attached(&what, AttachKind::Cgroup, name, prog.info())?);
            let id = prog
                .attach(&cgroup_fd, CgroupAttachMode::Single)
                .map_err(|source| Error::Attach {
                    what: format!("cgroup/{hook} to {}", cgroup.display()),
                    source,
                })?;
            inst_getsockname.push(GetsocknameAttachment::new(
                what,
                prog.take_link(id).expect("fresh link"),
            ));
        }

        let clsact = match tc_mode {
            TcMode::Netlink => Some(ClsactQdisc::ensure(&opts.iface, ifindex)?),
            _ => None,
        };
        record.tc_mode = Some(tc_mode);
        record.created_clsact = clsact.as_ref().is_some_and(ClsactQdisc::created);
        // Loaded (so their ids are known) before the record is written: a
        // netlink filter left by a kill is found by its program's id.
        for (name, hook) in [
            (names::PROG_RESTORE, TcAttachType::Egress),
            (names::PROG_STEER, TcAttachType::Ingress),
        ] {
            let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
            prog.load().map_err(|e| Error::load_program(name, e))?;
            let kind = if hook == TcAttachType::Ingress {
                AttachKind::TcIngress
            } else {
                AttachKind::TcEgress
            };
            let what = tc_what(name, &opts.iface, hook, tc_mode);
            record
                .attachments
                .push(attached(&what, kind, name, prog.info())?);
        }
        // Written before the tc filters and routing exist, so a kill right
        // after leaves a record that says what to remove.
        lock.write(&record)?;
        let routing = tproxy_spec.map(TproxyRouting::install).transpose()?;

        let inst_restore = Some(attach_tc(
            &mut ebpf,
            names::PROG_RESTORE,
            &opts.iface,
            TcAttachType::Egress,
            tc_mode,
        )?);
        let inst_steer = Some(attach_tc(
            &mut ebpf,
            names::PROG_STEER,
            &opts.iface,
            TcAttachType::Ingress,
            tc_mode,
        )?);

        info!(
            iface = %opts.iface,
            ports = %opts.ports,
            proxy_port = opts.proxy_port,
            proxy_mark = format_args!("{:#x}", opts.proxy_mark),
            cgroup = %cgroup.display(),
            accel = opts.accel,
            tc = ?tc_mode,
            steer = ?opts.steer,
            "attached"
        );
        // The links' ids, for `tproxy status` to check them.
        fill_link_ids(&mut record.attachments);
        record.ready = true;
        lock.write(&record)?;
        Ok(Instance {
            steer: inst_steer,
            restore: inst_restore,
            routing,
            getsockopt: inst_getsockopt,
            getsockname: inst_getsockname,
            sockops: inst_sockops,
            sk_msg: inst_sk_msg,
            recvmsg: inst_recvmsg,
            accel_stopped: false,
            clsact,
            sockhash: inst_sockhash,
            ebpf,
            record,
            lock,
        })
    }

    pub fn record(&self) -> &Record {
        &self.record
    }

    /// What is attached, one line each (for the demo and `-v`).
    pub fn attachments(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(a) = &self.steer {
            out.push(a.what().to_string());
        }
        if let Some(a) = &self.restore {
            out.push(a.what().to_string());
        }
        if let Some(a) = &self.getsockopt {
            out.push(a.what().to_string());
        }
        out.extend(self.getsockname.iter().map(|a| a.what().to_string()));
        if let Some(a) = &self.sockops {
            out.push(a.what().to_string());
        }
        if let Some(a) = &self.sk_msg {
            out.push(a.what().to_string());
        }
        if let Some(a) = &self.recvmsg {
            out.push(a.what().to_string());
        }
        out
    }

    /// Counter totals over all CPUs.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>> {
        let map = self.ebpf.map(names::COUNTERS).expect("COUNTERS in object");
        let arr: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(|source| Error::Map {
                name: names::COUNTERS,
                source,
            })?;
        sum_counters(&arr)
    }

    /// The flow table at a glance (open, active, closing, embryonic).
    pub fn flows(&self) -> Result<FlowStats> {
        flow_stats(
            self.ebpf.map(names::FLOWS).expect("FLOWS in object"),
            self.ebpf.map(names::SYNS).expect("SYNS in object"),
            self.ebpf.map(names::CLOSING).expect("CLOSING in object"),
        )
    }

    /// Removes closed flows that lingered `FLOW_LINGER_NS`; how many.
    pub fn reap_flows(&mut self) -> Result<usize> {
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
        let mut n = 0;
        for k in done {
            // The same tuple may have closed again since the read: look
            // again just before removing.
            if m.get(&k, 0).is_ok_and(|v| lingered(&v, now)) && m.remove(&k).is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Stops steering new flows (flows already steered keep their state).
    pub fn stop_steering_new(&mut self) -> Result<()> {
        self.set_flag(flags::STEER_NEW, false)
    }

    /// Handles on this instance's maps for another task (the metrics
    /// endpoint): new descriptors, so no CAP_SYS_ADMIN is needed.
    pub fn maps(&self) -> Result<crate::inspect::Maps> {
        crate::inspect::Maps::dup(&self.ebpf)
    }

    /// Accelerated sockets and the redirected bytes queued, unread, at them.
    pub fn accel_state(&self) -> Result<(usize, i64)> {
        let map = self.ebpf.map(names::SOCKS).expect("SOCKS in object");
        socks_state(map)
    }

    /// Takes acceleration down without losing a byte.
    ///
    /// No new sockets enter (sockops detached) and no new bytes are
    /// redirected (sk_msg passes everything to TCP, which each reader sees
    /// only after its queued redirected bytes: order is kept). Then a
    /// bounded wait for the readers to read what is queued: a psock that is
    /// destroyed frees its unread ingress queue. On 6.18 the kernel keeps
    /// the SOCKHASH (and, through it, the now pass-through sk_msg program)
    /// alive while accelerated sockets remain in it, and frees both with
    /// the last of them, so connections still open when tproxy exits keep
    /// every byte (lab/experiments/sockmap_close.py, case map-gone).
    pub fn stop_accel(&mut self) {
        if self.accel_stopped || self.sk_msg.is_none() {
            return;
        }
        self.accel_stopped = true;
        if let Err(e) = self.set_flag(flags::ACCEL, false) {
            warn!(
                "accel: could not stop redirecting ({}); detaching anyway",
                crate::error::Chain(&e)
            );
            return;
        }
        // A sender that read the flag just before it changed may still be
        // between its verdict and the enqueue: let it finish.
        std::thread::sleep(ACCEL_GRACE);
        let start = std::time::Instant::now();
        let (sockets, at_stop) = self.accel_state().unwrap_or((0, 0));
        let mut left = at_stop;
        while left > 0 && start.elapsed() < ACCEL_DRAIN_TIMEOUT {
            std::thread::sleep(std::time::Duration::from_millis(10));
            left = self.accel_state().map(|(_, q)| q).unwrap_or(0);
        }
        if sockets == 0 {
            info!("accel: no accelerated connection open; stopped");
        } else if left > 0 {
            warn!(
                "accel: {sockets} accelerated socket(s) handed back to plain TCP; {left} redirected byte(s) still unread after {:?} (a reader that is not reading) stay queued for it: the kernel keeps the SOCKHASH and the pass-through sk_msg program until the last of these connections closes",
                ACCEL_DRAIN_TIMEOUT
            );
        } else {
            info!(
                "accel: {sockets} accelerated socket(s) handed back to plain TCP; {at_stop} queued byte(s) read by their apps in {} ms; the kernel frees the SOCKHASH and the pass-through sk_msg program when the last of them closes",
                start.elapsed().as_millis()
            );
        }
    }

    fn set_flag(&mut self, flag: u32, on: bool) -> Result<()> {
        let map = self.ebpf.map_mut(names::CONFIG).expect("CONFIG in object");
        let mut arr: Array<&mut MapData, Config> =
            Array::try_from(map).map_err(|source| Error::Map {
                name: names::CONFIG,
                source,
            })?;
        let mut cfg = arr.get(&0, 0).map_err(|source| Error::Map {
            name: names::CONFIG,
            source,
        })?;
        if on {
            cfg.flags |= flag;
        } else {
            cfg.flags &= !flag;
        }
        arr.set(0, cfg, 0).map_err(|source| Error::Map {
            name: names::CONFIG,
            source,
        })
    }

    /// Detaches everything, acceleration first (safely), then steering.
    pub fn shutdown(mut self) {
        let n = self.attachments().len();
        self.stop_accel();
        drop(self);
        info!("detached {n} programs; nothing of tproxy's is left attached");
    }
}

/// After the redirect flag is cleared, time for a sender that read it just
/// before to finish its enqueue.
const ACCEL_GRACE: std::time::Duration = std::time::Duration::from_millis(100);
/// How long teardown waits for readers to read their queued redirected bytes.
pub const ACCEL_DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

impl Drop for Instance {
    fn drop(&mut self) {
        // Every exit path (errors included) takes acceleration down safely
        // before the map goes with the fields.
        self.stop_accel();
    }
}

fn attach_tc(
    ebpf: &mut Ebpf,
    name: &'static str,
    iface: &str,
    hook: TcAttachType,
    mode: TcMode,
) -> Result<TcAttachment> {
    let prog: &mut SchedClassifier = program(ebpf, name)?;
    let options = match mode {
        TcMode::Netlink => TcAttachOptions::Netlink(NlOptions::default()),
        _ => TcAttachOptions::TcxOrder(LinkOrder::default()),
    };
    let hook_s = hook_name(hook);
    let id = prog
        .attach_with_options(iface, hook, options)
        .map_err(|source| Error::Attach {
            what: format!("tc {hook_s} ({mode:?}) on {iface}"),
            source,
        })?;
    Ok(Attachment::new(
        tc_what(name, iface, hook, mode),
        prog.take_link(id).expect("fresh link"),
    ))
}

fn hook_name(hook: TcAttachType) -> &'static str {
    if hook == TcAttachType::Ingress {
        "ingress"
    } else {
        "egress"
    }
}

fn tc_what(name: &str, iface: &str, hook: TcAttachType, mode: TcMode) -> String {
    format!("tc {} {name} on {iface} ({mode:?})", hook_name(hook))
}

/// A loaded program's record entry (its link id comes later).
fn attached(
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

/// Sets each attachment's link id: the kernel's link running its program
/// (each program of ours is attached once). sk_msg and netlink filters
/// have none.
fn fill_link_ids(attachments: &mut [Attached]) {
    let links: Vec<(u32, u32)> = aya::programs::loaded_links()
        .flatten()
        .map(|l| (l.program_id(), l.id()))
        .collect();
    for a in attachments {
        a.link_id = links
            .iter()
            .find(|(prog, _)| *prog == a.prog_id)
            .map(|(_, link)| *link);
    }
}

fn write_config(ebpf: &mut Ebpf, config: &Config, ports: &PortSet) -> Result<()> {
    let map_err = |name| move |source| Error::Map { name, source };
    let mut cfg: Array<&mut MapData, Config> =
        Array::try_from(ebpf.map_mut(names::CONFIG).expect("CONFIG"))
            .map_err(map_err(names::CONFIG))?;
    cfg.set(0, *config, 0).map_err(map_err(names::CONFIG))?;
    let mut intercept: Array<&mut MapData, u8> = Array::try_from(
        ebpf.map_mut(names::INTERCEPT_PORTS)
            .expect("INTERCEPT_PORTS"),
    )
    .map_err(map_err(names::INTERCEPT_PORTS))?;
    for port in ports.iter() {
        intercept
            .set(u32::from(port), 1, 0)
            .map_err(map_err(names::INTERCEPT_PORTS))?;
    }
    Ok(())
}
