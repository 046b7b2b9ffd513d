//! tc egress on `--iface`: replies of steered flows. In rewrite mode the
//! source port (the proxy port) goes back to the port that flow dialled.
//! Every reply refreshes the flow's last-seen time; the kernel's own RST
//! for an embryonic flow (nothing accepted it) ends that entry.
use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, programs::TcContext};
use tproxy_common::{Counter, SteerMode};

use crate::{
    counters, flow,
    packet::{self, TCP_RST, TCP_SPORT},
};

#[classifier]
pub fn tproxy_restore(ctx: TcContext) -> i32 {
    try_restore(&ctx).unwrap_or(TC_ACT_UNSPEC)
}

#[inline(always)]
fn try_restore(ctx: &TcContext) -> Result<i32, ()> {
    let Some((cookie, target)) =
        crate::netns::of_packet(ctx).and_then(|c| Some((c, counters::target(c)?)))
    else {
        counters::inc(0, Counter::EgressPackets);
        return Ok(TC_ACT_UNSPEC);
    };
    let cfg = &target.config;
    let slot = cfg.slot;
    counters::inc(slot, Counter::EgressPackets);
    if packet::mark(ctx) == cfg.proxy_mark {
        return Ok(TC_ACT_UNSPEC);
    }
    // Egress never drops: what we cannot read is not a reply of ours.
    let packet::Parsed::Tcp(tcp) = packet::parse_tcp(ctx, cfg.l2_len, slot) else {
        return Ok(TC_ACT_UNSPEC);
    };
    let rewrite = cfg.steer_mode == SteerMode::Rewrite as u8;
    let sport = tcp.sport_host();
    // Replies of steered flows leave from the proxy port (rewrite) or from
    // the intercepted port itself (tproxy: the socket kept the address).
    let candidate = if rewrite {
        sport == cfg.proxy_port
    } else {
        target.intercepts(sport)
    };
    if !candidate {
        return Ok(TC_ACT_UNSPEC);
    }
    let key = flow::key_to_client(&tcp, cookie);
    let Some(entry) = flow::lookup(&key) else {
        return Ok(TC_ACT_UNSPEC);
    };
    if rewrite {
        if !packet::rewrite_port(ctx, &tcp, TCP_SPORT, tcp.sport, entry.orig_port()) {
            return Err(());
        }
        counters::inc(slot, Counter::EgressRestored);
    }
    if tcp.has(TCP_RST) && entry.table == flow::Table::Embryonic {
        // Our own kernel refused the connection (the proxy is down, or its
        // listener dropped it): the entry has nothing left to serve.
        flow::remove(slot, &key, &entry);
    } else {
        entry.touch(flow::now());
    }
    Ok(TC_ACT_UNSPEC)
}
