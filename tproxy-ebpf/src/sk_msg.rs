//! sk_msg on the SOCKHASH: moves each sendmsg on one end of a proxy<->app
//! pair straight into the peer's receive (ingress) queue.
//!
//! Any miss means plain TCP (SK_PASS), never a drop. Ingress redirect has
//! no backpressure of its own, so a sender whose peer has more bytes unread
//! than the peer's receive buffer (at most `accel_max_queued`) goes by TCP
//! (which blocks it when the peer's window is full) until the peer has read
//! every byte it sent; then it redirects again. Order across the two paths: the peer's reader takes
//! its queued redirected bytes before TCP's receive queue, so a switch to
//! TCP is always safe, and a switch back only when nothing sent by TCP is
//! still unread (`SockState` in tproxy-common: `sent` against the peer's
//! `read`).
use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, sk_action::SK_PASS},
    macros::sk_msg,
    programs::SkMsgContext,
};
use tproxy_common::{Counter, flags, sock_flags::FAST};

use crate::{
    counters,
    maps::{CONFIG, SOCKHASH, SOCKS},
};

#[sk_msg]
pub fn tproxy_sk_msg(ctx: SkMsgContext) -> u32 {
    let _ = try_sk_msg(&ctx);
    SK_PASS
}

#[inline(always)]
fn try_sk_msg(ctx: &SkMsgContext) -> Result<(), ()> {
    counters::inc(Counter::MsgSeen);
    // SAFETY: the sending socket's kernel address, as a number: its key.
    let sk = unsafe { (*ctx.msg).__bindgen_anon_3.sk } as u64;
    let Some(own) = SOCKS.get_ptr_mut(&sk) else {
        counters::inc(Counter::MsgMiss);
        return Ok(());
    };
    // SAFETY (every access to *own below): this socket's live SOCKS entry.
    // `sent`, `redirected_end` and `flags` are written only here, and sk_msg
    // runs under the sending socket's lock; `peer` is one aligned 8-byte
    // word that sockops sets once.
    let sent = unsafe { (*own).sent };
    let state = unsafe { (*own).flags };
    let peer_sk = unsafe { read_volatile(&raw const (*own).peer) };
    let size = u64::from(ctx.size());
    // Every byte counts, whichever way it goes.
    unsafe { (*own).sent = sent + size };
    let pass = |counter| {
        unsafe { (*own).flags = state & !FAST };
        counters::inc(counter);
        Ok(())
    };
    let cfg = CONFIG.get(0).ok_or(())?;
    // Teardown: tproxy is stopping; everything goes by TCP from here on.
    if cfg.flags & flags::ACCEL == 0 {
        return pass(Counter::MsgPassthrough);
    }
    // The app side is not established yet: TCP until it has read this.
    let Some(peer) = (if peer_sk == 0 {
        None
    } else {
        SOCKS.get_ptr(&peer_sk)
    }) else {
        return pass(Counter::MsgPassthrough);
    };
    // SAFETY: the peer's live SOCKS entry; `read` is one aligned 8-byte
    // word its readers add to atomically (a stale value only overstates
    // what is unread).
    let unread = sent.wrapping_sub(unsafe { read_volatile(&raw const (*peer).read) }) as i64;
    // SAFETY: as above; one aligned 4-byte word.
    let peer_rcvbuf = unsafe { read_volatile(&raw const (*peer).rcvbuf) };
    if state & FAST == 0 {
        // Bytes sent by TCP still unread: a redirected byte would overtake them.
        if unread != 0 {
            return pass(Counter::MsgPassthrough);
        }
        if sent != 0 {
            counters::inc(Counter::AccelResumed);
        }
    } else if unread > 0
        && unread + size as i64 > i64::from(bound(cfg.accel_max_queued, peer_rcvbuf))
    {
        // (A reader that has read everything takes the next message whatever
        // its size, as TCP takes a write larger than the receive buffer.)
        counters::inc(Counter::AccelFallbacks);
        return pass(Counter::MsgPassthrough);
    }
    let peer_key = unsafe { (*own).peer_key };
    if SOCKHASH.redirect_msg(ctx, peer_key, BPF_F_INGRESS as u64) != SK_PASS as i64 {
        // The peer left the map (closed): plain TCP, like the rest of it.
        return pass(Counter::MsgMiss);
    }
    unsafe {
        (*own).flags = state | FAST;
        write_volatile(&raw mut (*own).redirected_end, sent + size);
    }
    counters::inc(Counter::MsgRedirected);
    counters::add(Counter::MsgRedirectedBytes, size);
    Ok(())
}

/// Unread bytes a sender may leave at its peer: the larger of what the
/// peer's receive buffer would let TCP hold there and what its reader takes
/// in a few milliseconds (`SockState::rcvbuf`, kept by the recvmsg
/// tracepoint), at most `max` (`--accel-max-queued`).
/// Redirected bytes are charged to the peer's sk_rmem_alloc but not limited
/// by its sk_rcvbuf; past it, TCP's own segments meet a full buffer and the
/// kernel grows sk_rcvbuf to what is allocated (tcp_clamp_window), for the
/// rest of the connection. 0 (not known yet): `max`.
#[inline(always)]
fn bound(max: u32, rcvbuf: u32) -> u32 {
    if rcvbuf == 0 { max } else { max.min(rcvbuf) }
}
