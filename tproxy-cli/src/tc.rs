//! The netlink (pre-TCX) side of tc: the clsact qdisc and the filters a dead
//! instance leaves behind. TCX links need none of this: they die with their
//! last file descriptor.
use aya::programs::tc::{self, TcAttachType};
use futures::TryStreamExt as _;
use netlink_packet_route::tc::TcHandle;
use tracing::{debug, info};

use crate::{Error, Result};

/// How the tc programs are attached.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum TcMode {
    /// TCX links where the kernel has them (>= 6.6), netlink filters before.
    Auto,
    /// TCX links: detached by the kernel when tproxy exits, however it exits.
    Tcx,
    /// clsact qdisc + netlink filters: they outlive a killed tproxy, which
    /// removes them on its next start.
    Netlink,
}

impl TcMode {
    pub fn resolve(self) -> TcMode {
        match self {
            TcMode::Auto
                if aya::util::KernelVersion::current()
                    .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0)) =>
            {
                TcMode::Tcx
            }
            TcMode::Auto => TcMode::Netlink,
            m => m,
        }
    }
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
                Err(e) => tracing::warn!(
                    "removing clsact qdisc on {}: {}",
                    self.iface,
                    crate::error::Chain(&e)
                ),
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

/// Removes netlink filters a killed instance left on `iface` (found by
/// program name) and its clsact qdisc if it added one and nothing else uses
/// it. Returns how many filters it removed.
pub fn remove_stale_filters(iface: &str, ifindex: u32, remove_qdisc: bool) -> usize {
    use tproxy_common::names::{PROG_RESTORE, PROG_STEER};
    let mut removed = 0;
    for (hook, name) in [
        (TcAttachType::Ingress, PROG_STEER),
        (TcAttachType::Egress, PROG_RESTORE),
    ] {
        // qdisc_detach_program removes every filter running `name` there.
        if tc::qdisc_detach_program(iface, hook, name).is_ok() {
            removed += 1;
        }
    }
    if remove_qdisc {
        let _ = remove_clsact_if_unused(ifindex);
    }
    removed
}
