//! Raw tracepoint `sock_recv_length` (fires after every recvmsg on any
//! socket, with the bytes read): a reader took bytes off one of our
//! sockets. Keeps SOCKS[..].read exact, which is what bounds a slow reader,
//! what lets a sender come back to the fast path without reordering, and
//! what teardown waits on.
//!
//! Why a tracepoint: fentry/fexit (tracing programs) and kprobes are not
//! available on every kernel tproxy runs on (not on the CI's); raw
//! tracepoints are. The cost falls on every recvmsg of the host: one
//! 8-byte hash lookup, a miss for sockets that are not ours.
use aya_ebpf::{
    helpers::bpf_probe_read_kernel, macros::raw_tracepoint, programs::RawTracePointContext,
};
use tproxy_common::Counter;

use crate::{
    atomic, counters,
    maps::{CONFIG, SOCKS},
};

const MSG_PEEK: i32 = 2;
const MSG_ERRQUEUE: i32 = 0x2000;

// TP_PROTO(struct sock *sk, int ret, int flags)
#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn tproxy_recv_length(ctx: RawTracePointContext) -> i32 {
    let _ = try_recv_length(&ctx);
    0
}

#[inline(always)]
fn try_recv_length(ctx: &RawTracePointContext) -> Result<(), ()> {
    let sk: u64 = ctx.arg(0);
    let st = SOCKS.get_ptr_mut(&sk).ok_or(())?;
    let read = ctx.arg::<u64>(1) as i32;
    let flags = ctx.arg::<u64>(2) as i32;
    // A peek takes nothing off the stream, nor does a read of the error
    // queue (timestamps, zerocopy notices). Counting either would let a
    // sender think its TCP bytes were read and redirect past them.
    if read <= 0 || flags & (MSG_PEEK | MSG_ERRQUEUE) != 0 {
        return Ok(());
    }
    // SAFETY: st points at a live SOCKS entry; two readers of one socket
    // may add at once.
    atomic::add(unsafe { &raw mut (*st).read }, u64::from(read as u32));
    counters::add(Counter::MsgReadBytes, read as u64);
    // The reader's receive buffer, which bounds what its sender may leave
    // queued here: TCP autotunes it while the sender goes by TCP, an app
    // may set SO_RCVBUF. Its offset in struct sock is from the kernel's BTF.
    let off = CONFIG.get(0).map_or(0, |c| c.sk_rcvbuf_offset);
    if off != 0 {
        // SAFETY: sk is the live socket the tracepoint fired for; the helper
        // checks the read. One aligned 4-byte store into our entry.
        if let Ok(v) = unsafe { bpf_probe_read_kernel((sk + u64::from(off)) as *const i32) }
            && v > 0
        {
            unsafe { core::ptr::write_volatile(&raw mut (*st).rcvbuf, v as u32) };
        }
    }
    Ok(())
}
