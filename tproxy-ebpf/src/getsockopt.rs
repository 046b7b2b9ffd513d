//! cgroup/getsockopt on `--cgroup`: answers SO_ORIGINAL_DST (SOL_IP, 80)
//! and IP6T_SO_ORIGINAL_DST (SOL_IPV6, 80) for sockets the steering
//! delivered to the proxy, from the flow table. Every other call, and every
//! socket without a flow entry, keeps the kernel's own answer (including a
//! real conntrack answer from an unrelated NAT rule, and answers larger
//! than the page the program sees).
use aya_ebpf::{
    EbpfContext as _, bindings::bpf_sockopt, helpers::bpf_get_netns_cookie, macros::cgroup_sockopt,
    programs::SockoptContext,
};
use tproxy_common::{AF_INET, AF_INET6, Asked, Counter};

use crate::{accepted, counters, identity, maps::ASKED};

/// 1 = the call returns (with whatever we changed); 0 would be EPERM.
const PROCEED: i32 = 1;
const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
const SO_ORIGINAL_DST: i32 = 80;
const SOCKADDR_IN_LEN: usize = 16;
const SOCKADDR_IN6_LEN: usize = 28;

/// The smallest page size: the buffer a program sees is at most a page.
const SMALLEST_PAGE: i32 = 4096;

#[cgroup_sockopt(getsockopt)]
pub fn tproxy_getsockopt(ctx: SockoptContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sockopt for the program's run.
    let so = unsafe { &mut *ctx.sockopt };
    if is_original_dst(so) {
        let _ = try_getsockopt(&ctx, so);
        // A sockaddr answer (ours, the kernel's or an earlier program's)
        // never fills a page; an optlen that long is the caller's buffer
        // size on an error, which the kernel must keep (see below).
        if so.optlen > SMALLEST_PAGE {
            so.optlen = 0;
        }
    } else {
        // Not a call tproxy answers: hand it back untouched. The kernel shows
        // a program at most a page of the answer and afterwards copies
        // `optlen` bytes of that buffer back; an optlen past the buffer (an
        // answer over a page, e.g. IPT_SO_GET_ENTRIES, or one longer than the
        // caller's buffer, e.g. NETLINK_LIST_MEMBERSHIPS) fails the call with
        // EFAULT (before 6.5 always, since then unless above a page, where it
        // warns and ignores the buffer). `optlen = 0` makes every kernel since
        // 5.8 copy nothing and keep its own answer and return value. Checking
        // optlen against the buffer instead would need pointer arithmetic
        // the verifier allows only with CAP_PERFMON, which --no-accel must
        // not need.
        so.optlen = 0;
    }
    PROCEED
}

#[inline(always)]
fn is_original_dst(so: &bpf_sockopt) -> bool {
    so.optname == SO_ORIGINAL_DST && (so.level == SOL_IP || so.level == SOL_IPV6)
}

#[inline(always)]
fn try_getsockopt(ctx: &SockoptContext, so: &mut bpf_sockopt) -> Result<(), ()> {
    // SAFETY: reading a ctx field the verifier allows for this program type.
    let sk = unsafe { so.__bindgen_anon_1.sk };
    // SAFETY: the helper takes this program's own context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // Only a target's sockets: one of another namespace in the cgroup is
    // not tproxy's to answer for.
    let Some(target) = counters::target(cookie) else {
        counters::inc(0, Counter::GetsockoptCalls);
        return Err(());
    };
    let slot = target.config.slot;
    counters::inc(slot, Counter::GetsockoptCalls);
    // Only the proxy learns where a steered flow was going: another
    // process holding such a socket (passed to it, or inherited) gets the
    // kernel's own answer.
    if !identity::caller_is_proxy(&target.config) {
        return Err(());
    }
    let orig = accepted::original_dst(sk, cookie).ok_or(())?;
    let (family, local, orig_port) = (orig.family, orig.addr, orig.port);

    // SAFETY: optval/optval_end are the kernel's bounds for the buffer.
    let optval = unsafe { so.__bindgen_anon_2.optval } as usize;
    let optval_end = unsafe { so.__bindgen_anon_3.optval_end } as usize;
    // SOL_IP answers an IPv4 flow, SOL_IPV6 an IPv6 one, as netfilter does.
    let len = if family == AF_INET {
        if so.level != SOL_IP {
            return Ok(());
        }
        if optval + SOCKADDR_IN_LEN > optval_end {
            return Ok(());
        }
        let p = optval as *mut u8;
        // SAFETY: 16 bytes at optval are in bounds (checked just above).
        unsafe {
            core::ptr::write_unaligned(p as *mut u16, AF_INET as u16);
            core::ptr::write_unaligned(p.add(2) as *mut u16, orig_port);
            core::ptr::write_unaligned(p.add(4) as *mut u32, local[0]);
            core::ptr::write_unaligned(p.add(8) as *mut u64, 0);
        }
        SOCKADDR_IN_LEN
    } else {
        if so.level != SOL_IPV6 || optval + SOCKADDR_IN6_LEN > optval_end {
            return Ok(());
        }
        let p = optval as *mut u8;
        // SAFETY: 28 bytes at optval are in bounds (checked just above).
        unsafe {
            core::ptr::write_unaligned(p as *mut u16, AF_INET6 as u16);
            core::ptr::write_unaligned(p.add(2) as *mut u16, orig_port);
            core::ptr::write_unaligned(p.add(4) as *mut u32, 0); // flowinfo
            core::ptr::write_unaligned(p.add(8) as *mut [u32; 4], local);
            core::ptr::write_unaligned(p.add(24) as *mut u32, 0); // scope id
        }
        SOCKADDR_IN6_LEN
    };
    so.optlen = len as i32;
    so.retval = 0;
    counters::inc(slot, Counter::GetsockoptAnswered);
    // The proxy's next connect from this thread is this flow's upstream
    // (`tproxy flows`).
    if let Some(t) = identity::thread() {
        let asked = Asked {
            flow: orig.key,
            port: u16::from_be(orig_port),
            _pad0: [0; 3],
        };
        let _ = ASKED.insert(&t, &asked, 0);
    }
    Ok(())
}
