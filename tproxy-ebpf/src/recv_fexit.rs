//! fexit on `tcp_bpf_recvmsg`: a reader took bytes off one of our sockets
//! (`recv.rs`).
//!
//! The read hook where the kernel has tracing programs (Debian's 6.1 and
//! 6.12 do; kernels built without fentry/fexit take `recv_length.rs`).
//! tcp_bpf_recvmsg is the recvmsg of sockets in a sockmap or SOCKHASH
//! only, so the rest of the host's reads cost nothing; and it exists
//! before Linux 6.3's `sock_recv_length` tracepoint.
use aya_ebpf::{macros::fexit, programs::FExitContext};

// int tcp_bpf_recvmsg(struct sock *sk, struct msghdr *msg, size_t len,
//                     int flags, int *addr_len)
// (the same on 6.1 and 6.12); fexit's arguments are the function's, then
// its return value.
#[fexit(function = "tcp_bpf_recvmsg")]
pub fn tproxy_recv_fexit(ctx: FExitContext) -> i32 {
    let _ = try_recv_fexit(&ctx);
    0
}

#[inline(always)]
fn try_recv_fexit(ctx: &FExitContext) -> Result<(), ()> {
    let sk: u64 = ctx.arg(0);
    let flags = ctx.arg::<u64>(3) as i32;
    let read = ctx.arg::<u64>(5) as i32;
    crate::recv::on_read(sk, read, flags)
}
