//! cgroup/getsockname4 and getsockname6 on `--cgroup`: the proxy's end of
//! a steered flow reports the address the client dialled as its local
//! address, as a transparent (tproxy back-end) socket does by nature.
//!
//! Why: a proxy that finds the original destination with getsockname()
//! instead of SO_ORIGINAL_DST (HAProxy 2.6 on IPv6 sockets does exactly
//! that) would otherwise dial its own listener, in a loop.
use aya_ebpf::{
    EbpfContext as _, helpers::bpf_get_netns_cookie, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use tproxy_common::Counter;

use crate::{accepted, counters, identity};

/// 1 = carry on (with the address we may have changed).
const PROCEED: i32 = 1;

#[cgroup_sock_addr(getsockname4)]
pub fn tproxy_getsockname4(ctx: SockAddrContext) -> i32 {
    try_getsockname(&ctx);
    PROCEED
}

#[cgroup_sock_addr(getsockname6)]
pub fn tproxy_getsockname6(ctx: SockAddrContext) -> i32 {
    try_getsockname(&ctx);
    PROCEED
}

#[inline(always)]
fn try_getsockname(ctx: &SockAddrContext) {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: reading a ctx field the verifier allows for this program type.
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    // SAFETY: the helper takes this program's own context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(target) = counters::target(cookie) else {
        return;
    };
    // Only the proxy learns where a steered flow was going.
    if !identity::caller_is_proxy(&target.config) {
        return;
    }
    if let Some(orig) = accepted::original_dst(sk, cookie) {
        // user_port holds a network-order port in its low 16 bits.
        sa.user_port = u32::from(orig.port);
        counters::inc(target.config.slot, Counter::GetsocknameAnswered);
    }
}
