//! tc ingress on `--iface`: steers intercepted TCP flows to the proxy.
//!
//! rewrite mode: the destination port becomes the proxy port (checksum
//! fixed by the kernel's helper); tproxy mode: the packet gets the steer
//! mark, and policy routing + nftables `tproxy` deliver it. A SYN opens an
//! embryonic entry (`SYNS`); later packets of the flow follow their entry
//! (see `flow.rs` for its life). Packets never end a flow.
//!
//! Fail closed: no connection to an intercepted port reaches the app
//! except through the proxy. Dropped (and counted) are: packets whose TCP
//! header cannot be read (`packet.rs`), SYNs that cannot be recorded or
//! rewritten, SYNs while the target drains, SYNs that a listener the
//! proxy did not open would take (`identity.rs`), and every other packet to an
//! intercepted port of no flow tproxy knows, unless its connection was
//! open when tproxy attached (`PRIOR_FLOWS`).
use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::classifier,
    programs::TcContext,
};
use tproxy_common::{Counter, SteerMode, flags};

use crate::{
    counters, flow, identity,
    packet::{self, Parsed, TCP_DPORT, Tcp},
};

#[classifier]
pub fn tproxy_steer(ctx: TcContext) -> i32 {
    match try_steer(&ctx) {
        Ok(verdict) => verdict,
        Err(slot) => {
            counters::inc(slot, Counter::SteerErrors);
            TC_ACT_SHOT
        }
    }
}

/// A verdict, or the counter slot of a SYN that could not be recorded or
/// rewritten (dropped).
#[inline(always)]
fn try_steer(ctx: &TcContext) -> Result<i32, u32> {
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
    let tcp = match packet::parse_tcp(ctx, cfg.l2_len, slot) {
        Parsed::Tcp(tcp) => tcp,
        Parsed::Pass => return Ok(TC_ACT_UNSPEC),
        Parsed::Unreadable => return Ok(drop(slot, Counter::IngressUnreadable)),
    };
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
                // A new connection on a closed flow's tuple: a new flow.
                if !steer_new {
                    return Ok(drop(slot, Counter::SynsRefusedDraining));
                }
                if rewrite && !identity::proxy_listens(ctx, &tcp, cfg, cookie) {
                    return Ok(drop(slot, Counter::SteerNotProxy));
                }
                flow::remove(slot, &key, &entry);
                flow::embryonic(slot, &key, tcp.dport, now).map_err(|_| slot)?;
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
            if !tcp.is_syn() {
                return Ok(unknown(slot, &tcp, cookie));
            }
            if !steer_new {
                return Ok(drop(slot, Counter::SynsRefusedDraining));
            }
            if !entry.may_take_over(now) {
                return Ok(drop(slot, Counter::SteerCollisions));
            }
            if rewrite && !identity::proxy_listens(ctx, &tcp, cfg, cookie) {
                return Ok(drop(slot, Counter::SteerNotProxy));
            }
            flow::remove(slot, &key, &entry);
            flow::embryonic(slot, &key, tcp.dport, now).map_err(|_| slot)?;
        }
        None if tcp.is_syn() => {
            if !steer_new {
                return Ok(drop(slot, Counter::SynsRefusedDraining));
            }
            if rewrite && !identity::proxy_listens(ctx, &tcp, cfg, cookie) {
                return Ok(drop(slot, Counter::SteerNotProxy));
            }
            flow::embryonic(slot, &key, tcp.dport, now).map_err(|_| slot)?;
        }
        // Not a SYN, and no flow of ours: a connection that was open when
        // tproxy attached passes on to the app; nothing else may.
        None => return Ok(unknown(slot, &tcp, cookie)),
    }

    if !rewrite {
        ctx.set_mark(cfg.steer_mark);
    } else if !packet::rewrite_port(ctx, &tcp, TCP_DPORT, tcp.dport, cfg.proxy_port.to_be()) {
        return Err(slot);
    }
    counters::inc(slot, Counter::IngressSteered);
    Ok(TC_ACT_UNSPEC)
}

#[inline(always)]
fn drop(slot: u32, why: Counter) -> i32 {
    counters::inc(slot, why);
    TC_ACT_SHOT
}

/// A non-SYN packet to an intercepted port of no flow tproxy steered.
#[inline(always)]
fn unknown(slot: u32, tcp: &Tcp, cookie: u64) -> i32 {
    if flow::prior(tcp, cookie) {
        TC_ACT_UNSPEC
    } else {
        drop(slot, Counter::IngressUnknownDropped)
    }
}
