//! Owners of attachments: each holds one kernel attachment and detaches it
//! when dropped, so every exit path (error, signal, panic unwinding) tears
//! down what was set up.
use aya::programs::{
    Link, cgroup_sock_addr::CgroupSockAddrLink, cgroup_sockopt::CgroupSockoptLink,
    fentry::FEntryLink, fexit::FExitLink, raw_trace_point::RawTracePointLink, sk_msg::SkMsgLink,
    sock_ops::SockOpsLink, tc::SchedClassifierLink,
};
use tracing::{debug, warn};

/// One attachment (a link or a prog_attach) with a human name for the logs.
pub struct Attachment<L: Link> {
    what: String,
    link: Option<L>,
}

/// tc ingress/egress program on the interface (TCX link or netlink filter).
pub type TcAttachment = Attachment<SchedClassifierLink>;
/// cgroup/getsockopt on the cgroup.
pub type GetsockoptAttachment = Attachment<CgroupSockoptLink>;
/// cgroup/getsockname4 and getsockname6 on the cgroup.
pub type GetsocknameAttachment = Attachment<CgroupSockAddrLink>;
/// sockops on the cgroup.
pub type SockopsAttachment = Attachment<SockOpsLink>;
/// sk_msg on the SOCKHASH.
pub type SkMsgAttachment = Attachment<SkMsgLink>;
/// The send hook: fentry on tcp_bpf_sendmsg (MSG_OOB sends), where the
/// kernel has fentry.
pub type SendAttachment = Attachment<FEntryLink>;
/// The read hook (reads of our sockets): whichever the kernel offers.
pub enum RecvmsgAttachment {
    /// raw tracepoint sock_recv_length.
    Tracepoint(Attachment<RawTracePointLink>),
    /// fexit on tcp_bpf_recvmsg.
    Fexit(Attachment<FExitLink>),
}

impl RecvmsgAttachment {
    pub fn what(&self) -> &str {
        match self {
            RecvmsgAttachment::Tracepoint(a) => a.what(),
            RecvmsgAttachment::Fexit(a) => a.what(),
        }
    }
}

impl<L: Link> Attachment<L> {
    pub fn new(what: String, link: L) -> Self {
        debug!("attached {what}");
        Attachment {
            what,
            link: Some(link),
        }
    }

    pub fn what(&self) -> &str {
        &self.what
    }
}

impl<L: Link> Drop for Attachment<L> {
    fn drop(&mut self) {
        if let Some(link) = self.link.take() {
            match link.detach() {
                Ok(()) => debug!("detached {}", self.what),
                Err(e) => warn!("detaching {}: {}", self.what, crate::sys::error::Chain(&e)),
            }
        }
    }
}
