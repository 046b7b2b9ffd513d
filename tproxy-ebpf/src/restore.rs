//! tc egress on `--iface`: replies of steered flows. In rewrite mode the
//! source port (the proxy port) goes back to the port that flow dialled;
//! in both modes the proxy's FIN/RST are tracked so the entry is removed
//! when the flow ends.
use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, programs::TcContext};
use tproxy_common::{Counter, SteerMode, flow_state};

use crate::{
    counters, flow,
    maps::{CONFIG, FLOWS, INTERCEPT_PORTS},
    packet::{self, TCP_SPORT},
};

#[classifier]
pub fn tproxy_restore(ctx: TcContext) -> i32 {
    try_restore(&ctx).unwrap_or(TC_ACT_UNSPEC)
}

#[inline(always)]
fn try_restore(ctx: &TcContext) -> Result<i32, ()> {
    counters::inc(Counter::EgressPackets);
    let cfg = CONFIG.get(0).ok_or(())?;
    if packet::mark(ctx) == cfg.proxy_mark {
        return Ok(TC_ACT_UNSPEC);
    }
    let tcp = packet::parse_tcp(ctx).ok_or(())?;
    let rewrite = cfg.steer_mode == SteerMode::Rewrite as u8;
    let sport = tcp.sport_host();
    // Replies of steered flows leave from the proxy port (rewrite) or from
    // the intercepted port itself (tproxy: the socket kept the address).
    let candidate = if rewrite {
        sport == cfg.proxy_port
    } else {
        INTERCEPT_PORTS.get(sport as u32).is_some_and(|v| *v != 0)
    };
    if !candidate {
        return Ok(TC_ACT_UNSPEC);
    }
    let key = flow::key_to_client(&tcp);
    let Some(value) = FLOWS.get_ptr_mut(&key) else {
        return Ok(TC_ACT_UNSPEC);
    };
    if rewrite {
        // SAFETY: value points at the live map entry for key.
        let orig = unsafe { (*value).orig_port };
        if !packet::rewrite_port(ctx, &tcp, TCP_SPORT, tcp.sport, orig) {
            return Err(());
        }
        counters::inc(Counter::EgressRestored);
    }
    flow::track_close(&key, value, &tcp, flow_state::FIN_FROM_PROXY);
    Ok(TC_ACT_UNSPEC)
}
