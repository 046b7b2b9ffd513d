//! One running tproxy: the loaded object, its one target, and the lock on
//! its runtime record. Built all-or-nothing: if a step fails, the owners
//! already created are dropped (detached) before the error returns.
use aya::maps::{MapData, PerCpuArray};
use tproxy_common::{Counter, flags, names};
use tracing::{info, warn};

use crate::{
    config::options::Options,
    sys::{error::Chain, system},
    target::{
        Error, Result,
        attachment::TargetAttachment,
        drain::{self, Handback},
        inspect::{FlowStats, flow_stats, socks_state, sum_counters},
        installed::Installed,
        loader::Loaded,
        nudger::{Netns, Nudger},
        probe::Probed,
        record::{InstanceLock, Record},
    },
};

/// A single run's counter slot (slot 0 counts events of no target).
const SLOT: u32 = 1;

/// A running instance. Fields drop in declaration order: the target
/// (steering first) before the object, the runtime record last.
pub struct Instance {
    /// Stopped first: it walks this namespace's sockets with the object's
    /// iterator.
    #[expect(dead_code, reason = "held for its Drop")]
    nudger: Option<Nudger>,
    target: TargetAttachment,
    accel_stopped: bool,
    loaded: Loaded,
    record: Record,
    #[expect(dead_code, reason = "held for its Drop")]
    lock: InstanceLock,
}

impl Instance {
    pub fn start(opts: &Options) -> Result<Instance> {
        opts.validate()?;
        system::check_privileges_for(opts.accel)?;
        system::check_btf()?;
        // Probed needs first: a kernel that lacks one is told which; the
        // version line is only the floor tproxy was tested on.
        crate::sys::probe::check(opts.accel)?;
        system::check_kernel_version()?;
        let probed = Probed::here(&opts.iface, opts.tc_mode)?;
        let system::CgroupDir {
            path: cgroup,
            dir: cgroup_dir,
            private_mount,
        } = system::open_cgroup(opts.cgroup.as_deref())?;
        if let Some(what) = private_mount {
            info!("{what}");
        }
        let netns_cookie = probed.netns_cookie;

        let (mut lock, stale) = InstanceLock::acquire(probed.netns_inode, &opts.iface)?;
        if let Some(stale) = stale {
            crate::target::recovery::recover_at_start(&stale);
        }
        // Mark and table checked free (or picked) before anything exists.
        let plan = crate::target::probe::plan_steering(opts, probed.ifindex)?;

        let mut loaded = Loaded::load(opts.accel, 1, Some(netns_cookie))?;
        let ids = loaded.map_ids();
        let mut record = Record {
            pid: std::process::id() as i32,
            installed: Installed::new(&probed, plan.0.clone()),
            cgroup: cgroup.clone(),
            steer: opts.steer,
            counters_map_id: ids.counters,
            flows_map_id: ids.flows,
            syns_map_id: ids.syns,
            closing_map_id: ids.closing,
            sockhash_map_id: ids.sockhash,
            socks_map_id: ids.socks,
            flows_in_use_map_id: ids.flows_in_use,
            upstream_flows_map_id: ids.upstream_flows,
            ports: opts.ports.to_string(),
            proxy_port: opts.proxy_port,
            accel: opts.accel,
            started_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            attachments: loaded.attachments().to_vec(),
            ready: false,
        };
        let env = probed.env(cgroup.clone(), cgroup_dir, plan);
        let target = TargetAttachment::attach(&mut loaded, opts, env, SLOT, |planned| {
            record.installed.plan(&planned);
            record.attachments.extend_from_slice(planned.attachments);
            // Written before the tc filters and routing exist, so a kill
            // right after leaves a record that says what to remove.
            lock.write(&record)
        })?;

        info!(
            iface = %opts.iface,
            ports = %opts.ports,
            proxy_port = opts.proxy_port,
            proxy_mark = format_args!("{:#x}", opts.proxy_mark),
            cgroup = %cgroup.display(),
            accel = opts.accel,
            tc = ?probed.tc_mode,
            steer = ?opts.steer,
            "attached"
        );
        // The links' ids, for `tproxy status` to check them.
        record.attachments = loaded.attachments().to_vec();
        crate::target::attachment::fill_link_ids(&mut record.attachments, None);
        record.attachments.extend_from_slice(target.attachments());
        // A single run serves the namespace it runs in, and only that one.
        let nudger = match loaded.nudge_maps()? {
            Some(maps) => Some(Nudger::start(maps, move |cookie| {
                if cookie == netns_cookie {
                    Netns::Here
                } else {
                    Netns::Gone
                }
            })?),
            None => None,
        };
        record.ready = true;
        lock.write(&record)?;
        Ok(Instance {
            nudger,
            target,
            accel_stopped: false,
            loaded,
            record,
            lock,
        })
    }

    pub fn record(&self) -> &Record {
        &self.record
    }

    /// What is attached, one line each (for the demo and `-v`).
    pub fn attachments(&self) -> Vec<String> {
        let mut out = self.target.hooks();
        out.extend(self.loaded.hooks());
        out
    }

    /// Counter totals over all CPUs.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>> {
        let map = self
            .loaded
            .ebpf()
            .map(names::COUNTERS)
            .expect("COUNTERS in object");
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
            self.loaded
                .ebpf()
                .map(names::FLOWS)
                .expect("FLOWS in object"),
            self.loaded.ebpf().map(names::SYNS).expect("SYNS in object"),
            self.loaded
                .ebpf()
                .map(names::CLOSING)
                .expect("CLOSING in object"),
        )
    }

    /// Removes closed flows that lingered `FLOW_LINGER_NS`; how many. Also
    /// counts down the proxy's listeners older than tproxy that closed.
    pub fn reap_flows(&mut self) -> Result<usize> {
        self.target.recount_listeners();
        self.loaded.reap_flows()
    }

    /// Stops steering new flows (flows already steered keep their state).
    pub fn stop_steering_new(&mut self) -> Result<()> {
        self.target.set_flag(flags::STEER_NEW, false)
    }

    /// Handles on this instance's maps for another task (the metrics
    /// endpoint): new descriptors, so no CAP_SYS_ADMIN is needed.
    pub fn maps(&self) -> Result<crate::target::inspect::Maps> {
        crate::target::inspect::Maps::dup(self.loaded.ebpf())
    }

    /// Accelerated sockets and the redirected bytes queued, unread, at them.
    pub fn accel_state(&self) -> Result<(usize, i64)> {
        accel_state(&self.loaded)
    }

    /// Takes acceleration down without losing a byte (`drain::accel`).
    /// On 6.18 the kernel keeps the SOCKHASH (and, through it, the now
    /// pass-through sk_msg program) alive while accelerated sockets remain
    /// in it, and frees both with the last of them, so connections still
    /// open when tproxy exits keep every byte
    /// (lab/experiments/sockmap_close.py, case map-gone).
    pub fn stop_accel(&mut self) {
        if self.accel_stopped || !self.loaded.accel() {
            return;
        }
        self.accel_stopped = true;
        let (target, loaded) = (&mut self.target, &self.loaded);
        let h = match drain::accel(
            || target.set_flag(flags::ACCEL, false),
            || accel_state(loaded),
        ) {
            Ok(h) => h,
            Err(e) => {
                warn!(
                    "accel: could not stop redirecting ({}); detaching anyway",
                    Chain(&e)
                );
                return;
            }
        };
        let Handback {
            sockets,
            at_stop,
            left,
            took,
        } = h;
        if sockets == 0 {
            info!("accel: no accelerated connection open; stopped");
        } else if left > 0 {
            warn!(
                "accel: {sockets} accelerated socket(s) handed back to plain TCP; {left} redirected byte(s) still unread after {:?} (a reader that is not reading) stay queued for it: the kernel keeps the SOCKHASH and the pass-through sk_msg program until the last of these connections closes",
                drain::ACCEL_DRAIN_TIMEOUT
            );
        } else {
            info!(
                "accel: {sockets} accelerated socket(s) handed back to plain TCP; {at_stop} queued byte(s) read by their apps in {} ms; the kernel frees the SOCKHASH and the pass-through sk_msg program when the last of them closes",
                took.as_millis()
            );
        }
    }

    /// Detaches everything, acceleration first (safely), then steering.
    pub fn shutdown(mut self) {
        let n = self.attachments().len();
        self.stop_accel();
        drop(self);
        info!("detached {n} programs; nothing of tproxy's is left attached");
    }
}

/// `Instance::accel_state`, of the object alone (borrowed beside the target).
fn accel_state(loaded: &Loaded) -> Result<(usize, i64)> {
    socks_state(loaded.ebpf().map(names::SOCKS).expect("SOCKS in object"))
}

impl Drop for Instance {
    fn drop(&mut self) {
        // Every exit path (errors included) takes acceleration down safely
        // before the map goes with the fields.
        self.stop_accel();
    }
}
