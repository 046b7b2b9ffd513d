//! tc ingress on `--iface`: steers intercepted TCP flows to the proxy.
//!
//! rewrite mode: the destination port becomes the proxy port (checksum
//! fixed by the kernel's helper); tproxy mode: the packet gets the steer
//! mark, and policy routing + nftables `tproxy` deliver it. A SYN opens an
//! embryonic entry (`SYNS`); later packets of the flow follow their entry
//! (see `flow.rs` for its life). Packets never end a flow.
use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::classifier,
    programs::TcContext,
};
use tproxy_common::{Counter, SteerMode, flags};

use crate::{
    counters, flow,
    packet::{self, TCP_DPORT},
};

#[classifier]
pub fn tproxy_steer(ctx: TcContext) -> i32 {
    try_steer(&ctx).unwrap_or(TC_ACT_UNSPEC)
}

#[inline(always)]
fn try_steer(ctx: &TcContext) -> Result<i32, ()> {
    // The interface's namespace: the target (pod) this packet is for.
    let Some((cookie, target)) =
        crate::netns::of_packet(ctx).and_then(|c| Some((c, counters::target(c)?)))
    else {
        // Attached, but its target is being removed: pass.
        counters::inc(0, Counter::IngressPackets);
        return Ok(TC_ACT_UNSPEC);
    };
    let cfg = &target.config;
    let slot = cfg.slot;
    counters::inc(slot, Counter::IngressPackets);
    // The proxy's own traffic (seen on ingress over loopback) is never
    // steered: that would be a loop.
    if packet::mark(ctx) == cfg.proxy_mark {
        return Ok(TC_ACT_UNSPEC);
    }
    let tcp = packet::parse_tcp(ctx, cfg.l2_len, slot).ok_or(())?;
    if !target.intercepts(tcp.dport_host()) {
        return Ok(TC_ACT_UNSPEC);
    }
    let rewrite = cfg.steer_mode == SteerMode::Rewrite as u8;
    // The flow as the proxy's socket will see it: rewritten flows all land
    // on the proxy port, transparent ones keep the dialled port.
    let local_port = if rewrite {
        cfg.proxy_port.to_be()
    } else {
        tcp.dport
    };
    let key = flow::key_from_client(&tcp, local_port, cookie);
    let steer_new = cfg.flags & flags::STEER_NEW != 0;
    let now = flow::now();
    match flow::lookup(&key) {
        Some(entry) if entry.orig_port() == tcp.dport => {
            if tcp.is_syn() && entry.closed() {
                // A new connection on a closed flow's tuple: a new flow
                // (while draining, it goes straight to the app, like every
                // new connection then).
                if !steer_new {
                    return Ok(TC_ACT_UNSPEC);
                }
                flow::remove(slot, &key, &entry);
                flow::embryonic(slot, &key, tcp.dport, now)?;
            } else {
                entry.touch(now);
            }
        }
        Some(entry) => {
            // The same client address and port to another intercepted port
            // (rewrite mode only: tproxy keys differ by port): both would be
            // one 4-tuple at the proxy. Only a new connection may take the
            // tuple, and only once the old flow is gone; until then its SYN
            // is dropped (the client retries) and counted.
            if !tcp.is_syn() || !steer_new {
                return Ok(TC_ACT_UNSPEC);
            }
            if !entry.may_take_over(now) {
                counters::inc(slot, Counter::SteerCollisions);
                return Ok(TC_ACT_SHOT);
            }
            flow::remove(slot, &key, &entry);
            flow::embryonic(slot, &key, tcp.dport, now)?;
        }
        None if tcp.is_syn() && steer_new => flow::embryonic(slot, &key, tcp.dport, now)?,
        // A flow that began before tproxy started (or was not steered):
        // leave it on its way to the app.
        None => return Ok(TC_ACT_UNSPEC),
    }

    if !rewrite {
        ctx.set_mark(cfg.steer_mark);
    } else if !packet::rewrite_port(ctx, &tcp, TCP_DPORT, tcp.dport, cfg.proxy_port.to_be()) {
        return Err(());
    }
    counters::inc(slot, Counter::IngressSteered);
    Ok(TC_ACT_UNSPEC)
}
