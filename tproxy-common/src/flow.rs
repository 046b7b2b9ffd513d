//! The flow tables (`SYNS`, `FLOWS`, `CLOSING`, and `PRIOR_FLOWS` for the
//! connections open before tproxy attached): where each steered connection
//! was going and how long its entry lives (`tproxy-ebpf/src/flow.rs`,
//! `accepted.rs`).
use core::mem::{offset_of, size_of};

/// Established flows (`FLOWS`): a plain hash, never evicted. An entry
/// enters when the proxy's accepted socket reaches ESTABLISHED (sockops)
/// and leaves for `CLOSING` when that socket closes, so it holds open
/// flows only. When full, new flows stay in `SYNS` (still served, but
/// evictable) and are counted.
pub const FLOWS_MAX: u32 = 65_536;
/// Closed flows lingering (`CLOSING`): LRU, so at connection rates above
/// CLOSING_MAX / linger (about 1,000/s) the oldest lingerers go early;
/// never an open flow.
pub const CLOSING_MAX: u32 = 65_536;
/// Embryonic flows (`SYNS`): SYN seen, the proxy's socket not yet
/// established. LRU: a SYN flood churns this table and no other.
pub const SYNS_MAX: u32 = 65_536;
/// A closed flow's entry stays this long, so retransmitted FINs and the
/// proxy's TIME_WAIT ACKs are still steered and restored (TCP_TIMEWAIT_LEN).
pub const FLOW_LINGER_NS: u64 = 60_000_000_000;
/// A newcomer to another port may take a closed flow's tuple (rewrite
/// mode: both are one 4-tuple at the proxy) this long after it closed.
pub const FLOW_TAKEOVER_NS: u64 = 1_000_000_000;
/// An embryonic flow seen this recently holds its tuple against a
/// newcomer to another port (its SYN may still be retransmitted).
pub const EMBRYONIC_HOLD_NS: u64 = 3_000_000_000;
/// An open flow seen this recently is active: drain waits for active flows
/// only (a client that went silent would hold it for its whole timeout).
pub const FLOW_ACTIVE_NS: u64 = 10_000_000_000;

/// Flow-table key (`SYNS`, `FLOWS`): the connection exactly as the proxy's
/// accepted socket sees it: client address and port, the local address the
/// client dialled, and the local port (the proxy port with rewrite
/// steering, the dialled port with the tproxy back-end). Addresses in
/// network order, IPv4 in `[0]` with the rest zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub client_addr: [u32; 4],
    pub local_addr: [u32; 4],
    /// Network order.
    pub client_port: u16,
    /// Network order.
    pub local_port: u16,
    pub family: u8,
    pub _pad0: [u8; 3],
    /// The namespace the flow is in (the target's): identical tuples in two
    /// pods are two flows.
    pub netns_cookie: u64,
}

/// Flow-table value: where the flow was going, and its life.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowValue {
    /// The destination port the client dialled, network order.
    pub orig_port: u16,
    /// `flow_state::*` bits.
    pub state: u8,
    pub _pad0: u8,
    pub _pad1: u32,
    /// `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC_COARSE) of the last
    /// packet of the flow, either way.
    pub last_seen: u64,
    /// When the entry entered its table (CLOCK_MONOTONIC_COARSE): an
    /// embryonic flow's first SYN, an established flow's promotion, a
    /// closing flow's close. Hold-offs and the linger run from here, and no
    /// packet moves it (a spoofed SYN cannot extend a hold-off).
    pub since: u64,
}

pub mod flow_state {
    /// The proxy's socket of this flow has closed (sockops saw TCP_CLOSE):
    /// the entry lingers for retransmissions, then goes.
    pub const CLOSED: u8 = 1 << 0;
}

// Layout checks: the eBPF side reads these structs through raw map values,
// so a silent change of size or offset would be a wrong answer, not an error.
const _: () = {
    assert!(size_of::<FlowKey>() == 48);
    assert!(offset_of!(FlowKey, netns_cookie) == 40);
    assert!(offset_of!(FlowKey, local_addr) == 16);
    assert!(offset_of!(FlowKey, client_port) == 32);
    assert!(offset_of!(FlowKey, local_port) == 34);
    assert!(offset_of!(FlowKey, family) == 36);
    assert!(size_of::<FlowValue>() == 24);
    assert!(offset_of!(FlowValue, last_seen) == 8);
    assert!(offset_of!(FlowValue, since) == 16);
};
