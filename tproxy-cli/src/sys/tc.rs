//! The netlink (pre-TCX) side of tc: the clsact qdisc and the filters a dead
//! instance leaves behind. TCX links need none of this: they die with their
//! last file descriptor.
use aya::programs::tc;
use futures::{StreamExt as _, TryStreamExt as _};
use netlink_packet_route::tc::{
    TcAttribute, TcFilterBpfOption, TcHandle, TcHeader, TcMessage, TcOption,
};
use rtnetlink::packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use tracing::{debug, info};

use crate::{
    config::options::TcMode,
    sys::{
        Error, Result,
        error::Chain,
        removal::{Removal, RemovedKind},
    },
};

/// Auto becomes TCX where the kernel has it (probed; by version if the
/// probe cannot tell), netlink filters elsewhere.
pub fn resolve(mode: TcMode) -> TcMode {
    match mode {
        TcMode::Auto => match crate::sys::probe::tcx_supported() {
            Some(true) => TcMode::Tcx,
            Some(false) => TcMode::Netlink,
            None if aya::util::KernelVersion::current()
                .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0)) =>
            {
                TcMode::Tcx
            }
            None => TcMode::Netlink,
        },
        m => m,
    }
}

/// The mode a run would use; an explicit `tcx` the kernel lacks is an
/// error before anything is attached.
pub fn check(mode: TcMode) -> Result<TcMode> {
    let mode = resolve(mode);
    if mode == TcMode::Tcx && crate::sys::probe::tcx_supported() == Some(false) {
        return Err(Error::NoTcx);
    }
    Ok(mode)
}

/// The clsact qdisc, when tproxy added it: removed on drop unless filters
/// that are not ours remain on it.
pub struct ClsactQdisc {
    iface: String,
    ifindex: u32,
    created: bool,
}

impl ClsactQdisc {
    pub fn ensure(iface: &str, ifindex: u32) -> Result<ClsactQdisc> {
        let created = match tc::qdisc_add_clsact(iface) {
            Ok(()) => true,
            Err(tc::TcError::IoError(e)) if e.raw_os_error() == Some(libc::EEXIST) => false,
            // aya reports the kernel's EEXIST as a netlink error. It also
            // means an `ingress` qdisc (the same handle): only a clsact one
            // is fit to use.
            Err(tc::TcError::NetlinkError(e))
                if e.raw_os_error() == Some(libc::EEXIST)
                    && has_clsact(ifindex).unwrap_or(false) =>
            {
                false
            }
            Err(source) => {
                return Err(Error::Tc {
                    what: format!("adding a clsact qdisc to {iface}"),
                    source,
                });
            }
        };
        debug!(created, "clsact qdisc on {iface}");
        Ok(ClsactQdisc {
            iface: iface.into(),
            ifindex,
            created,
        })
    }

    pub fn created(&self) -> bool {
        self.created
    }

    /// Whether it is tproxy's to remove (when unused) on drop: handed from
    /// one owner to the next when a target is replaced.
    pub fn set_created(&mut self, created: bool) {
        self.created = created;
    }
}

impl Drop for ClsactQdisc {
    fn drop(&mut self) {
        if self.created {
            match remove_clsact_if_unused(self.ifindex) {
                Ok(true) => debug!("removed the clsact qdisc tproxy added to {}", self.iface),
                Ok(false) => info!(
                    "left the clsact qdisc on {}: other filters use it",
                    self.iface
                ),
                Err(e) => tracing::warn!("removing clsact qdisc on {}: {}", self.iface, Chain(&e)),
            }
        }
    }
}

/// Runs a small netlink conversation on a private runtime, so Drop impls
/// (which may run outside any runtime) can use rtnetlink too.
pub(crate) fn with_rtnetlink<T, F>(f: F) -> std::io::Result<T>
where
    T: Send,
    F: AsyncFnOnce(rtnetlink::Handle) -> std::result::Result<T, rtnetlink::Error> + Send,
{
    let run = move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection()?;
            let task = tokio::spawn(conn);
            let out = f(handle).await.map_err(netlink_io);
            task.abort();
            out
        })
    };
    // A runtime cannot be started from inside another: use a thread then.
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|s| s.spawn(run).join().expect("netlink thread"))
    } else {
        run()
    }
}

/// rtnetlink's error as an io::Error that keeps the kernel's errno (its
/// own text would be "Received a netlink error message …"); its other
/// errors carry no errno and are kept whole.
fn netlink_io(e: rtnetlink::Error) -> std::io::Error {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.into(),
        other => std::io::Error::other(other),
    }
}

/// Number of tc filters on the clsact hooks of an interface.
pub fn clsact_filter_count(ifindex: u32) -> std::io::Result<usize> {
    with_rtnetlink(async |handle| {
        let mut n = 0;
        for egress in [false, true] {
            let req = handle.traffic_filter(ifindex as i32).get();
            let req = if egress { req.egress() } else { req.ingress() };
            n += req.execute().try_collect::<Vec<_>>().await?.len();
        }
        Ok(n)
    })
}

fn remove_clsact_if_unused(ifindex: u32) -> std::io::Result<bool> {
    if clsact_filter_count(ifindex)? > 0 {
        return Ok(false);
    }
    with_rtnetlink(async |handle| {
        let mut req = handle.qdisc().del(ifindex as i32);
        req.message_mut().header.parent = TcHandle::CLSACT;
        req.message_mut().header.handle = TcHandle {
            major: 0xffff,
            minor: 0,
        };
        req.execute().await
    })?;
    Ok(true)
}

/// A bpf filter on one of an interface's clsact hooks.
#[derive(Clone, Debug)]
pub struct BpfFilter {
    pub egress: bool,
    /// The program's name as the filter reports it (`tproxy_steer`).
    pub name: String,
    pub prog_id: u32,
    header: TcHeader,
}

impl BpfFilter {
    pub fn hook(&self) -> &'static str {
        if self.egress { "egress" } else { "ingress" }
    }

    /// Filter priority (`pref` in `tc filter show`).
    pub fn pref(&self) -> u16 {
        (self.header.info >> 16) as u16
    }
}

/// The bpf filters on the clsact hooks of `ifindex` (in the calling
/// thread's namespace).
pub fn bpf_filters(ifindex: u32) -> std::io::Result<Vec<BpfFilter>> {
    with_rtnetlink(async |handle| {
        let mut out = Vec::new();
        for egress in [false, true] {
            let req = handle.traffic_filter(ifindex as i32).get();
            let req = if egress { req.egress() } else { req.ingress() };
            let msgs: Vec<TcMessage> = req.execute().try_collect().await?;
            for m in msgs {
                let (mut name, mut prog_id) = (None, None);
                for a in &m.attributes {
                    if let TcAttribute::Options(opts) = a {
                        for o in opts {
                            match o {
                                TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => {
                                    name = Some(n.clone())
                                }
                                TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => prog_id = Some(*id),
                                _ => {}
                            }
                        }
                    }
                }
                // The first message of each priority only names the
                // classifier; the filters carry the program.
                if let (Some(name), Some(prog_id)) = (name, prog_id) {
                    out.push(BpfFilter {
                        egress,
                        name,
                        prog_id,
                        header: m.header.clone(),
                    });
                }
            }
        }
        Ok(out)
    })
}

/// Deletes exactly this filter (hook, priority, protocol, handle).
async fn delete_filter(
    mut handle: rtnetlink::Handle,
    f: BpfFilter,
) -> std::result::Result<(), rtnetlink::Error> {
    let mut msg = TcMessage::with_index(f.header.index);
    msg.header.parent = f.header.parent;
    msg.header.handle = f.header.handle;
    msg.header.info = f.header.info;
    msg.attributes.push(TcAttribute::Kind("bpf".into()));
    let mut req = NetlinkMessage::from(
        netlink_packet_route::RouteNetlinkMessage::DelTrafficFilter(msg),
    );
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    let mut resp = handle.request(req)?;
    while let Some(m) = resp.next().await {
        if let NetlinkPayload::Error(e) = m.payload
            && e.code.is_some()
        {
            return Err(rtnetlink::Error::NetlinkError(e));
        }
    }
    Ok(())
}

/// Removes the netlink filters a killed instance left on `iface`: those
/// running one of `prog_ids` (the programs it recorded), or, from a record
/// that has none, those running a program named like tproxy's on its hook.
/// Then its clsact qdisc, if it added it and nothing else uses it.
pub fn remove_stale_filters(
    iface: &str,
    ifindex: u32,
    prog_ids: &[u32],
    remove_qdisc: bool,
) -> Removal {
    use tproxy_common::names::{PROG_RESTORE, PROG_STEER};
    let mut out = Removal::default();
    let filters = match bpf_filters(ifindex) {
        Ok(f) => f,
        Err(e) => {
            out.failed
                .push(format!("listing the tc filters on {iface}: {e}"));
            return out;
        }
    };
    let ours = |f: &BpfFilter| {
        if prog_ids.is_empty() {
            f.name == if f.egress { PROG_RESTORE } else { PROG_STEER }
        } else {
            prog_ids.contains(&f.prog_id)
        }
    };
    for f in filters.into_iter().filter(ours) {
        let what = format!(
            "tc {} filter {} (program id {}, pref {}) on {iface}",
            f.hook(),
            f.name,
            f.prog_id,
            f.pref()
        );
        match with_rtnetlink(async move |h| delete_filter(h, f).await) {
            Ok(()) => out.push(RemovedKind::TcFilter, what),
            Err(e) => out.failed.push(format!("{what}: {e}")),
        }
    }
    // Gone already (a cleanup before, or someone removed it): nothing to do.
    if remove_qdisc && has_clsact(ifindex).unwrap_or(false) {
        match remove_clsact_if_unused(ifindex) {
            Ok(true) => out.push(RemovedKind::Qdisc, format!("the clsact qdisc on {iface}")),
            Ok(false) => info!("left the clsact qdisc on {iface}: other filters use it"),
            Err(e) => out.failed.push(format!("the clsact qdisc on {iface}: {e}")),
        }
    }
    out
}

fn has_clsact(ifindex: u32) -> std::io::Result<bool> {
    with_rtnetlink(async |handle| {
        let qdiscs: Vec<TcMessage> = handle
            .qdisc()
            .get()
            .index(ifindex as i32)
            .execute()
            .try_collect()
            .await?;
        Ok(qdiscs.iter().any(|q| {
            q.header.index == ifindex as i32
                && q.attributes
                    .iter()
                    .any(|a| matches!(a, TcAttribute::Kind(k) if k == "clsact"))
        }))
    })
}
