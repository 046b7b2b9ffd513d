//! sockops on `--cgroup`: puts the proxy<->app socket pairs in the SOCKHASH.
use aya_ebpf::{macros::sock_ops, programs::SockOpsContext};
use tproxy_common::Counter;

use crate::counters;

#[sock_ops]
pub fn tproxy_sockops(ctx: SockOpsContext) -> u32 {
    try_sockops(&ctx).unwrap_or(1)
}

#[inline(always)]
fn try_sockops(_ctx: &SockOpsContext) -> Result<u32, ()> {
    counters::inc(Counter::SockopsEvents);
    Ok(1)
}
