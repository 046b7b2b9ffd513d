//! tc egress on `--iface`: restores the port the client dialled on replies.
use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, programs::TcContext};
use tproxy_common::Counter;

use crate::counters;

#[classifier]
pub fn tproxy_restore(ctx: TcContext) -> i32 {
    try_restore(&ctx).unwrap_or(TC_ACT_UNSPEC)
}

#[inline(always)]
fn try_restore(_ctx: &TcContext) -> Result<i32, ()> {
    counters::inc(Counter::EgressPackets);
    Ok(TC_ACT_UNSPEC)
}
