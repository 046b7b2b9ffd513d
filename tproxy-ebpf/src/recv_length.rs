//! Raw tracepoint `sock_recv_length` (Linux >= 6.3; fires after every
//! recvmsg on any socket, with the bytes read): a reader took bytes off one
//! of our sockets (`recv.rs`).
//!
//! The read hook of kernels without fentry/fexit (tracing programs), where
//! `recv_fexit.rs` cannot attach. The cost falls on every recvmsg of the
//! host: one 8-byte hash lookup, a miss for sockets that are not ours.
use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};

// TP_PROTO(struct sock *sk, int ret, int flags)
#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn tproxy_recv_length(ctx: RawTracePointContext) -> i32 {
    let _ = try_recv_length(&ctx);
    0
}

#[inline(always)]
fn try_recv_length(ctx: &RawTracePointContext) -> Result<(), ()> {
    let sk: u64 = ctx.arg(0);
    let read = ctx.arg::<u64>(1) as i32;
    let flags = ctx.arg::<u64>(2) as i32;
    crate::recv::on_read(sk, read, flags)
}
