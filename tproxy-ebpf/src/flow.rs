//! The flow table, tproxy's conntrack, shared by the tc programs, sockops
//! and the original-destination hooks.
//!
//! A flow is embryonic (`SYNS`, LRU) from the client's SYN until the
//! proxy's accepted socket reaches ESTABLISHED, when sockops moves it to
//! `FLOWS` (a plain hash: nothing a packet does evicts it). Packets never
//! end a flow: the kernel's TCP on the proxy's socket decides that (an
//! out-of-window RST changes nothing), and when that socket reaches
//! TCP_CLOSE sockops moves the entry to `CLOSING` (LRU), where it lingers
//! (`FLOW_LINGER_NS`) for retransmitted FINs and TIME_WAIT ACKs; userspace
//! removes it after that. Every packet refreshes `last_seen`; `since`
//! (when the entry entered its table) only moves with the table.
//!
//! `PRIOR_FLOWS` lists the connections to intercepted ports that were open
//! when tproxy attached (userspace reads them from the namespace's socket
//! table): the only non-SYN packets of unknown flows that pass to the app.
use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use tproxy_common::{
    Config, Counter, EMBRYONIC_HOLD_NS, FLOW_TAKEOVER_NS, FlowKey, FlowValue, SockKey, flow_state,
};

use crate::{
    atomic, counters,
    maps::{CLOSING, FLOWS, FLOWS_IN_USE, PRIOR_FLOWS, SYNS},
    packet::Tcp,
};

/// bpf_map_update_elem flags.
const BPF_NOEXIST: u64 = 1;
const BPF_EXIST: u64 = 2;

/// The target's count of `FLOWS` entries (`FLOWS_IN_USE[slot]`).
#[inline(always)]
fn in_use(slot: u32) -> Option<*mut u64> {
    FLOWS_IN_USE.get_ptr_mut(slot)
}

/// An entry of the target left `FLOWS`.
#[inline(always)]
fn left_flows(slot: u32) {
    if let Some(p) = in_use(slot) {
        atomic::dec_count(p);
    }
}

/// CLOCK_MONOTONIC_COARSE: a tick's resolution is plenty for ages in
/// seconds, and it costs a load, not a clock read.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: no arguments, no side effects.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Key for a packet from the client (ingress); `local_port` is the port
/// the proxy's socket will have (network order).
#[inline(always)]
pub fn key_from_client(tcp: &Tcp, local_port: u16, netns_cookie: u64) -> FlowKey {
    FlowKey {
        client_addr: tcp.src,
        local_addr: tcp.dst,
        client_port: tcp.sport,
        local_port,
        family: tcp.family,
        _pad0: [0; 3],
        netns_cookie,
    }
}

/// Key for a packet to the client (egress), sent from the proxy's socket.
#[inline(always)]
pub fn key_to_client(tcp: &Tcp, netns_cookie: u64) -> FlowKey {
    FlowKey {
        client_addr: tcp.dst,
        local_addr: tcp.src,
        client_port: tcp.dport,
        local_port: tcp.sport,
        family: tcp.family,
        _pad0: [0; 3],
        netns_cookie,
    }
}

/// Key of the flow whose proxy-side socket this is (sockops' view of it:
/// host-order ports, v4-mapped addresses already folded to IPv4).
#[inline(always)]
pub fn key_of_socket(k: &SockKey) -> FlowKey {
    FlowKey {
        client_addr: k.remote_addr,
        local_addr: k.local_addr,
        client_port: (k.remote_port as u16).to_be(),
        local_port: (k.local_port as u16).to_be(),
        family: k.family as u8,
        _pad0: [0; 3],
        netns_cookie: k.netns_cookie,
    }
}

/// Which table an entry is in.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Established,
    Embryonic,
    Closing,
}

/// A flow-table entry and the table it is in.
pub struct Entry {
    pub value: *mut FlowValue,
    pub table: Table,
}

impl Entry {
    #[inline(always)]
    pub fn orig_port(&self) -> u16 {
        // SAFETY: value points at a live map entry (from get_ptr_mut).
        unsafe { (*self.value).orig_port }
    }

    #[inline(always)]
    pub fn closed(&self) -> bool {
        self.table == Table::Closing
    }

    /// Refreshes `last_seen`, writing at most once per clock tick.
    #[inline(always)]
    pub fn touch(&self, now: u64) {
        // SAFETY: as above; a racing writer stores the same kind of value.
        unsafe {
            if (*self.value).last_seen != now {
                (*self.value).last_seen = now;
            }
        }
    }

    /// May a newcomer's SYN to another port take this tuple? Only once the
    /// old flow is gone: its proxy socket closed a moment ago (so a late
    /// retransmission no longer needs the entry), or, embryonic, its first
    /// SYN came a while ago and no handshake completed. Both run from
    /// `since`, which no packet moves: retransmitted (or spoofed) SYNs and
    /// the proxy's SYN-ACK retransmissions cannot hold a tuple for good.
    #[inline(always)]
    pub fn may_take_over(&self, now: u64) -> bool {
        // SAFETY: as above.
        let v = unsafe { &*self.value };
        match self.table {
            Table::Established => false,
            Table::Closing => now.wrapping_sub(v.since) >= FLOW_TAKEOVER_NS,
            Table::Embryonic => now.wrapping_sub(v.since) >= EMBRYONIC_HOLD_NS,
        }
    }
}

/// The flow's entry: established first (one lookup for the packets of
/// open flows), then embryonic, then closing.
#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<Entry> {
    let found = |value, table| Some(Entry { value, table });
    if let Some(v) = FLOWS.get_ptr_mut(key) {
        return found(v, Table::Established);
    }
    if let Some(v) = SYNS.get_ptr_mut(key) {
        return found(v, Table::Embryonic);
    }
    CLOSING
        .get_ptr_mut(key)
        .and_then(|v| found(v, Table::Closing))
}

/// Was this connection open when tproxy attached (`PRIOR_FLOWS`)? Key as
/// the app's socket sees it: the dialled port, not the proxy's.
#[inline(always)]
pub fn prior(tcp: &Tcp, netns_cookie: u64) -> bool {
    let key = key_from_client(tcp, tcp.dport, netns_cookie);
    // SAFETY: a plain lookup; nothing is kept.
    unsafe { PRIOR_FLOWS.get(&key) }.is_some()
}

/// Removes the entry from whichever table holds it.
#[inline(always)]
pub fn remove(slot: u32, key: &FlowKey, entry: &Entry) {
    let gone = match entry.table {
        Table::Established => FLOWS.remove(key).inspect(|_| left_flows(slot)),
        Table::Embryonic => SYNS.remove(key),
        Table::Closing => CLOSING.remove(key),
    };
    if gone.is_ok() {
        counters::inc(slot, Counter::FlowsRemoved);
    }
}

/// Records a new embryonic flow.
#[inline(always)]
pub fn embryonic(slot: u32, key: &FlowKey, orig_port: u16, now: u64) -> Result<(), ()> {
    let value = FlowValue {
        orig_port,
        state: 0,
        _pad0: 0,
        _pad1: 0,
        last_seen: now,
        since: now,
    };
    SYNS.insert(key, &value, 0).map_err(|_| ())?;
    counters::inc(slot, Counter::FlowsCreated);
    Ok(())
}

/// sockops, PASSIVE_ESTABLISHED of a socket in the served namespace: if it
/// is the proxy's end of a steered flow, the flow is established. Returns
/// whether it was (the caller then asks for state callbacks).
///
/// A target holding its quota of `FLOWS` entries (`Config::flows_quota`)
/// gets no more: the flow stays embryonic (served, but evictable), like
/// one refused by a full table. The check and the count are not one
/// atomic step: CPUs promoting at the same moment may take a target a few
/// entries past its quota, never further.
#[inline(always)]
pub fn established(cfg: &Config, key: &FlowKey) -> bool {
    let slot = cfg.slot;
    // SAFETY: a plain lookup; the value is copied out at once.
    let Some(v) = (unsafe { SYNS.get(key) }) else {
        return false;
    };
    let now = now();
    let value = FlowValue {
        state: 0,
        last_seen: now,
        since: now,
        ..*v
    };
    let count = in_use(slot);
    if cfg.flows_quota != 0
        && let Some(p) = count
        && atomic::count_reached(p, cfg.flows_quota)
    {
        counters::inc(slot, Counter::FlowsQuotaFull);
        return false;
    }
    if FLOWS.insert(key, &value, BPF_NOEXIST).is_ok() {
        if let Some(p) = count {
            atomic::add(p, 1);
        }
    } else if FLOWS.insert(key, &value, BPF_EXIST).is_err() {
        // Full (not an entry of this tuple already there, which is
        // replaced and counted once): it stays embryonic (served, but
        // evictable).
        counters::inc(slot, Counter::FlowsTableFull);
        return false;
    }
    let _ = SYNS.remove(key);
    counters::inc(slot, Counter::FlowsEstablished);
    true
}

/// sockops, TCP_CLOSE of a socket in the served namespace: if it is the
/// proxy's end of an established flow, the flow moves to CLOSING to linger.
#[inline(always)]
pub fn closed(slot: u32, key: &FlowKey) {
    // SAFETY: a plain lookup; the value is copied out at once.
    let Some(v) = (unsafe { FLOWS.get(key) }) else {
        return;
    };
    let now = now();
    let value = FlowValue {
        state: v.state | flow_state::CLOSED,
        last_seen: now,
        since: now,
        ..*v
    };
    // Into CLOSING first: a packet in between finds one or the other.
    let _ = CLOSING.insert(key, &value, 0);
    if FLOWS.remove(key).is_ok() {
        left_flows(slot);
    }
    counters::inc(slot, Counter::FlowsClosed);
}
