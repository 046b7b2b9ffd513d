//! tc ingress on `--iface`: steers intercepted TCP flows to the proxy.
//!
//! rewrite mode: the destination port becomes the proxy port (checksum
//! fixed by the kernel's helper); tproxy mode: the packet gets the steer
//! mark, and policy routing + nftables `tproxy` deliver it. Either way the
//! flow's original destination goes into FLOWS for cgroup/getsockopt and
//! for the egress program.
use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::classifier,
    programs::TcContext,
};
use tproxy_common::{Counter, FlowValue, SteerMode, flags, flow_state};

use crate::{
    counters, flow,
    maps::{CONFIG, FLOWS, INTERCEPT_PORTS},
    packet::{self, TCP_ACK, TCP_DPORT, TCP_SYN},
};

#[classifier]
pub fn tproxy_steer(ctx: TcContext) -> i32 {
    try_steer(&ctx).unwrap_or(TC_ACT_UNSPEC)
}

#[inline(always)]
fn try_steer(ctx: &TcContext) -> Result<i32, ()> {
    counters::inc(Counter::IngressPackets);
    let cfg = CONFIG.get(0).ok_or(())?;
    // The proxy's own traffic (seen on ingress over loopback) is never
    // steered: that would be a loop.
    if packet::mark(ctx) == cfg.proxy_mark {
        return Ok(TC_ACT_UNSPEC);
    }
    let tcp = packet::parse_tcp(ctx).ok_or(())?;
    let dport = tcp.dport_host();
    if *INTERCEPT_PORTS.get(dport as u32).ok_or(())? == 0 {
        return Ok(TC_ACT_UNSPEC);
    }
    let key = flow::key_from_client(&tcp);

    let value = match FLOWS.get_ptr_mut(&key) {
        Some(v) => {
            // SAFETY: v points at the live map entry for key.
            let orig = unsafe { (*v).orig_port };
            if orig != tcp.dport {
                // The same client address and port towards another
                // intercepted port: after the rewrite both would be one
                // 4-tuple at the proxy. Only a new connection may replace an
                // entry; a live one wins and the newcomer is dropped.
                if !(tcp.has(TCP_SYN) && !tcp.has(TCP_ACK)) {
                    return Ok(TC_ACT_UNSPEC);
                }
                // SAFETY: as above.
                if unsafe { (*v).state } == 0 {
                    counters::inc(Counter::SteerCollisions);
                    return Ok(TC_ACT_SHOT);
                }
                new_flow(&key, &tcp, cfg.flags)?
            } else {
                v
            }
        }
        None if tcp.has(TCP_SYN) && !tcp.has(TCP_ACK) => new_flow(&key, &tcp, cfg.flags)?,
        // A flow that began before tproxy started (or was not steered):
        // leave it on its way to the app.
        None => return Ok(TC_ACT_UNSPEC),
    };

    if cfg.steer_mode == SteerMode::Tproxy as u8 {
        ctx.set_mark(cfg.steer_mark);
    } else if !packet::rewrite_port(ctx, &tcp, TCP_DPORT, tcp.dport, cfg.proxy_port.to_be()) {
        return Err(());
    }
    counters::inc(Counter::IngressSteered);
    flow::track_close(&key, value, &tcp, flow_state::FIN_FROM_CLIENT);
    Ok(TC_ACT_UNSPEC)
}

/// Records a new flow, unless steering of new flows has stopped (drain).
#[inline(always)]
fn new_flow(
    key: &tproxy_common::FlowKey,
    tcp: &packet::Tcp,
    cfg_flags: u32,
) -> Result<*mut FlowValue, ()> {
    if cfg_flags & flags::STEER_NEW == 0 {
        return Err(());
    }
    let value = FlowValue {
        orig_port: tcp.dport,
        state: 0,
        _pad0: 0,
        _pad1: 0,
    };
    FLOWS.insert(key, &value, 0).map_err(|_| ())?;
    counters::inc(Counter::FlowsCreated);
    FLOWS.get_ptr_mut(key).ok_or(())
}
