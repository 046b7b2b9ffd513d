//! sk_msg on the SOCKHASH: moves each sendmsg on one end of a proxy<->app
//! pair straight into the peer's receive (ingress) queue.
//!
//! Any miss means plain TCP (SK_PASS), never a drop. Ingress redirect has
//! no backpressure, so the bytes queued and unread at each socket are
//! counted (here, and by the recvmsg tracepoint in recv_length.rs); past the bound, the
//! sender leaves the fast path for good: its later bytes go by TCP, which
//! the peer reads only after its queued redirected bytes, so the switch
//! keeps the byte order.
use aya_ebpf::{
    bindings::{BPF_F_INGRESS, sk_action::SK_PASS},
    macros::sk_msg,
    programs::SkMsgContext,
};
use tproxy_common::{Counter, flags, sock_flags};

use crate::{
    atomic, counters,
    maps::{CONFIG, SOCKHASH, SOCKS},
    sockkey,
};

#[sk_msg]
pub fn tproxy_sk_msg(ctx: SkMsgContext) -> u32 {
    let _ = try_sk_msg(&ctx);
    SK_PASS
}

#[inline(always)]
fn try_sk_msg(ctx: &SkMsgContext) -> Result<(), ()> {
    counters::inc(Counter::MsgSeen);
    let cfg = CONFIG.get(0).ok_or(())?;
    // Teardown: tproxy is stopping; everything goes by TCP from here on.
    if cfg.flags & flags::ACCEL == 0 {
        counters::inc(Counter::MsgPassthrough);
        return Ok(());
    }
    let key = sockkey::from_sk_msg(ctx);
    let Some(own) = SOCKS.get_ptr_mut(&key) else {
        counters::inc(Counter::MsgMiss);
        return Ok(());
    };
    // SAFETY: own points at this socket's live SOCKS entry.
    if unsafe { (*own).flags } & sock_flags::PASSTHROUGH != 0 {
        counters::inc(Counter::MsgPassthrough);
        return Ok(());
    }
    let peer_key = key.peer();
    let Some(peer) = SOCKS.get_ptr_mut(&peer_key) else {
        counters::inc(Counter::MsgMiss);
        return Ok(());
    };
    let size = ctx.size() as i64;
    // SAFETY: peer points at the peer's live SOCKS entry; other CPUs add to
    // the counter too, so it is read whole and changed with atomic adds.
    let queued = unsafe { &raw mut (*peer).queued };
    if unsafe { core::ptr::read_volatile(queued) } + size > i64::from(cfg.accel_max_queued) {
        // SAFETY: as for `own` above.
        unsafe { (*own).flags |= sock_flags::PASSTHROUGH };
        counters::inc(Counter::AccelFallbacks);
        counters::inc(Counter::MsgPassthrough);
        return Ok(());
    }
    atomic::add(queued, size);
    if SOCKHASH.redirect_msg(ctx, peer_key, BPF_F_INGRESS as u64) == SK_PASS as i64 {
        counters::inc(Counter::MsgRedirected);
        counters::add(Counter::MsgRedirectedBytes, size as u64);
    } else {
        // The peer left the map between the lookups: plain TCP.
        atomic::add(queued, -size);
        counters::inc(Counter::MsgMiss);
    }
    Ok(())
}
