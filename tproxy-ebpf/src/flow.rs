//! Flow-table bookkeeping shared by the two tc programs: an entry lives from
//! the client's SYN to the last ACK after both FINs, or to an RST. The LRU
//! bound covers flows that vanish silently.
use tproxy_common::{Counter, FlowKey, FlowValue, flow_state};

use crate::{
    counters,
    maps::FLOWS,
    packet::{TCP_ACK, TCP_FIN, TCP_RST, Tcp},
};

/// Key for a packet from the client (ingress).
#[inline(always)]
pub fn key_from_client(tcp: &Tcp) -> FlowKey {
    FlowKey {
        client_addr: tcp.src,
        local_addr: tcp.dst,
        client_port: tcp.sport,
        family: tcp.family,
        _pad0: 0,
    }
}

/// Key for a packet to the client (egress).
#[inline(always)]
pub fn key_to_client(tcp: &Tcp) -> FlowKey {
    FlowKey {
        client_addr: tcp.dst,
        local_addr: tcp.src,
        client_port: tcp.dport,
        family: tcp.family,
        _pad0: 0,
    }
}

/// Updates the entry after a packet of its flow was handled; `fin_bit` is
/// this direction's FIN flag. Removes it on RST, and on the final ACK once
/// both sides have sent FIN.
#[inline(always)]
pub fn track_close(key: &FlowKey, value: *mut FlowValue, tcp: &Tcp, fin_bit: u8) {
    // SAFETY: value points into the map entry for key (from get_ptr_mut).
    let state = unsafe { (*value).state };
    let both = flow_state::FIN_FROM_CLIENT | flow_state::FIN_FROM_PROXY;
    let done = tcp.has(TCP_RST) || (state & both == both && tcp.has(TCP_ACK) && !tcp.has(TCP_FIN));
    if done {
        if FLOWS.remove(key).is_ok() {
            counters::inc(Counter::FlowsRemoved);
        }
    } else if tcp.has(TCP_FIN) && state & fin_bit == 0 {
        // SAFETY: as above.
        unsafe { (*value).state = state | fin_bit };
    }
}
