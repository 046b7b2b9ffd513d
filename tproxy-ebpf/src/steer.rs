//! tc ingress on `--iface`: steers intercepted TCP flows to the proxy.
use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, programs::TcContext};
use tproxy_common::Counter;

use crate::counters;

#[classifier]
pub fn tproxy_steer(ctx: TcContext) -> i32 {
    try_steer(&ctx).unwrap_or(TC_ACT_UNSPEC)
}

#[inline(always)]
fn try_steer(_ctx: &TcContext) -> Result<i32, ()> {
    counters::inc(Counter::IngressPackets);
    // TC_ACT_UNSPEC (TCX_NEXT): let any later program on the hook run too.
    Ok(TC_ACT_UNSPEC)
}
