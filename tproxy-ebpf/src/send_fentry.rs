//! fentry on `tcp_bpf_sendmsg`: a send with MSG_OOB on one of our sockets.
//!
//! sk_msg sees a send's bytes, not its flags, and tcp_bpf_sendmsg ignores
//! MSG_OOB when it redirects: the urgent byte would arrive inline. This
//! program runs first and notes the call (`sock_api::OFF_ODD_READ`), so
//! sk_msg, in the same call, retires the pair and passes the send to TCP,
//! which marks it urgent as it would have. Where the kernel has tracing
//! programs only (Debian's 6.1 and 6.12; not this project's 6.18 build).
use aya_ebpf::{helpers::bpf_probe_read_kernel, macros::fentry, programs::FEntryContext};
use tproxy_common::{Counter, sock_api};

use crate::{
    counters,
    maps::{NODE, SOCKS},
};

const MSG_OOB: u32 = 1;

// int tcp_bpf_sendmsg(struct sock *sk, struct msghdr *msg, size_t size)
// (the same on 6.1 and 6.12).
#[fentry(function = "tcp_bpf_sendmsg")]
pub fn tproxy_send_fentry(ctx: FEntryContext) -> i32 {
    let _ = try_send_fentry(&ctx);
    0
}

#[inline(always)]
fn try_send_fentry(ctx: &FEntryContext) -> Result<(), ()> {
    let sk: u64 = ctx.arg(0);
    let msg: u64 = ctx.arg(1);
    let off = NODE.get(0).map_or(0, |c| c.msghdr_flags_offset);
    if off == 0 {
        return Err(());
    }
    // SAFETY: a read of kernel memory through the helper, which fails
    // rather than faults.
    let flags =
        unsafe { bpf_probe_read_kernel((msg + u64::from(off)) as *const u32) }.map_err(|_| ())?;
    if flags & MSG_OOB == 0 {
        return Ok(());
    }
    let st = SOCKS.get_ptr_mut(&sk).ok_or(())?;
    // SAFETY: a live SOCKS entry; one byte, stored whole (`sock_api`).
    unsafe {
        core::ptr::write_volatile(&raw mut (*st).api[sock_api::OFF_ODD_READ], 1);
        counters::inc((*st).slot, Counter::AccelApiNoted);
    }
    Ok(())
}
