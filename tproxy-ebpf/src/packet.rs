//! Just enough packet parsing for the tc programs: an optional Ethernet
//! header, IPv4 (with options) or IPv6 (with extension headers), TCP.
//! Direct packet access for the common case, with one bpf_skb_pull_data
//! when the headers are not in the linear part; `bpf_skb_load_bytes` for
//! IPv6 extension header chains, which may be long.
//!
//! Fail closed: tc ingress sees fragments and header chains before the
//! kernel reassembles or walks them (nftables matches after conntrack's
//! defragmentation; we cannot), so a packet that may carry TCP but whose
//! header the parser cannot read is `Unreadable`, and steering drops it
//! (`ingress_unreadable`). Defined behaviour for the odd ones
//! (docs/fail-closed.md has the table):
//! - VLAN: a frame with a tag (in the frame, or taken off by the device
//!   into skb metadata) belongs to a VLAN interface: passed and counted;
//!   run tproxy there (without a VLAN device the kernel drops it).
//! - IPv4 options: parsed past (IHL).
//! - IPv6 extension headers: hop-by-hop, routing, destination options,
//!   fragment and AH are walked, at any length, up to `MAX_EXT` of them;
//!   a longer chain is `Unreadable`. ESP, "no next header" and any other
//!   next header are not TCP to the kernel either: passed.
//! - Fragments: a first fragment that holds the TCP header up to its
//!   checksum is handled like any segment (the port rewrite's checksum
//!   delta stays valid for the reassembled segment); one too short for it
//!   (RFC 1858's tiny fragment) is `Unreadable`. Later fragments have no
//!   ports and pass (without their first fragment they never reassemble),
//!   except an IPv4 TCP fragment at offset 8, which can only serve to
//!   overwrite a first fragment's TCP flags (RFC 3128): `Unreadable`.
//! - A TCP header cut short (the packet ends before its checksum):
//!   `Unreadable` (the kernel would drop it too).
//! - L3 devices (WireGuard, tun, ipip): `Config::l2_len` is 0 and the
//!   packet starts at the IP header.
use aya_ebpf::programs::TcContext;
use tproxy_common::{AF_INET, AF_INET6, Counter};

use crate::counters;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
/// Extension headers walked at most (IPv6); a longer chain is `Unreadable`.
pub const MAX_EXT: usize = 8;
/// Bytes after the link-layer header that direct packet access may need:
/// the largest IPv4 header (60) + TCP up to its checksum (18).
const HDR_ROOM: usize = 80;
/// The longest link-layer header (Ethernet).
const MAX_L2: usize = 14;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A TCP segment's addressing. Addresses and ports as they are in the
/// packet (network order); IPv4 addresses in `[0]`.
pub struct Tcp {
    pub family: u8,
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub flags: u8,
    /// Offset of the TCP header from the start of the packet.
    pub l4_off: usize,
}

impl Tcp {
    pub fn dport_host(&self) -> u16 {
        u16::from_be(self.dport)
    }

    pub fn sport_host(&self) -> u16 {
        u16::from_be(self.sport)
    }

    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// A connection request: SYN without ACK.
    pub fn is_syn(&self) -> bool {
        self.flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN
    }
}

#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    // At least 2 bytes: LLVM turns `p + 1 > end` into `p >= end`, a bounds
    // check the verifier cannot use. Every field read here is followed by
    // more header, so the extra byte is always there in a valid packet.
    let need = if core::mem::size_of::<T>() < 2 {
        2
    } else {
        core::mem::size_of::<T>()
    };
    if start + off + need > end {
        return None;
    }
    Some((start + off) as *const T)
}

/// Makes the first `n` bytes (or the whole packet, if shorter) linear,
/// unless they are already. Call it with a constant (it is inlined): the
/// verifier can use a packet range only from a constant offset, and LLVM
/// may let a later read lean on this test.
#[inline(always)]
fn pull(ctx: &TcContext, n: usize) {
    if ctx.data() + n > ctx.data_end() {
        let _ = ctx.pull_data(core::cmp::min(ctx.len() as usize, n) as u32);
    }
}

#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    // SAFETY: ptr_at checked the bounds against data_end.
    ptr_at::<T>(ctx, off).map(|p| unsafe { core::ptr::read_unaligned(p) })
}

/// What the parser made of a packet.
pub enum Parsed {
    /// A TCP segment whose header (up to its checksum) was read.
    Tcp(Tcp),
    /// Nothing the kernel will deliver to TCP with ports we did not see:
    /// not IP, not TCP, a later fragment, a VLAN frame.
    Pass,
    /// May carry TCP, but its header cannot be read here (see the module's
    /// list): steering drops it.
    Unreadable,
}

/// The skb's protocol (host order) and whether the device took a VLAN tag
/// off it: both from the skb, so they hold for L3 devices too.
#[inline(always)]
fn skb_protocol(ctx: &TcContext) -> (u16, bool) {
    let skb = ctx.skb.skb;
    // One load per field: the verifier refuses wider loads of the context.
    (
        u16::from_be(read_field!(skb, protocol) as u16),
        read_field!(skb, vlan_present) != 0,
    )
}

/// Walks IPv6 extension headers from `off` (the first one's type `next`)
/// with `bpf_skb_load_bytes` (any length, no pull); the offset of the TCP
/// header, or what to do with the packet instead.
#[inline(always)]
fn ipv6_l4(ctx: &TcContext, slot: u32, mut next: u8, mut off: usize) -> Result<usize, Parsed> {
    for _ in 0..MAX_EXT {
        let len = match next {
            IPPROTO_TCP => return Ok(off),
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let h: [u8; 2] = ctx.load(off).map_err(|_| Parsed::Unreadable)?;
                next = h[0];
                (h[1] as usize + 1) * 8
            }
            NEXTHDR_FRAGMENT => {
                let h: [u8; 4] = ctx.load(off).map_err(|_| Parsed::Unreadable)?;
                if u16::from_be_bytes([h[2], h[3]]) & 0xfff8 != 0 {
                    // A later fragment: no ports; Linux drops overlapping
                    // IPv6 fragments (RFC 5722), so it cannot rewrite a
                    // first fragment's header either.
                    counters::inc(slot, Counter::Fragments);
                    return Err(Parsed::Pass);
                }
                next = h[0];
                8
            }
            NEXTHDR_AUTH => {
                let h: [u8; 2] = ctx.load(off).map_err(|_| Parsed::Unreadable)?;
                next = h[0];
                (h[1] as usize + 2) * 4
            }
            // ESP, no next header, ICMPv6, UDP, ...: not TCP to the kernel.
            _ => return Err(Parsed::Pass),
        };
        off += len;
    }
    match next {
        IPPROTO_TCP => Ok(off),
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_FRAGMENT | NEXTHDR_AUTH => {
            Err(Parsed::Unreadable)
        }
        _ => Err(Parsed::Pass),
    }
}

/// Parses a TCP segment after `l2_len` bytes of link-layer header (14 or
/// 0). `slot`: the target's counter slot.
#[inline(always)]
pub fn parse_tcp(ctx: &TcContext, l2_len: u8, slot: u32) -> Parsed {
    let (proto, vlan) = skb_protocol(ctx);
    if vlan || proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        counters::inc(slot, Counter::VlanPassed);
        return Parsed::Pass;
    }
    // Constant offsets only: the verifier loses the packet range of a
    // pointer moved by a value it reads from a map.
    let r = match l2_len {
        0 => parse_ip::<0>(ctx, proto, slot),
        14 => parse_ip::<14>(ctx, proto, slot),
        _ => Err(Parsed::Pass),
    };
    match r {
        Ok(tcp) => Parsed::Tcp(tcp),
        Err(p) => p,
    }
}

#[inline(always)]
fn parse_ip<const L2: usize>(ctx: &TcContext, proto: u16, slot: u32) -> Result<Tcp, Parsed> {
    let l2 = L2;
    // Only the bytes read must be in the linear area, and they are pulled
    // only when they are not: bpf_skb_pull_data makes the skb writable,
    // which copies the head of every cloned skb (all of TCP's transmits,
    // whose linear part is just the headers), so a pull that is not needed
    // costs an allocation and a copy per packet. The common case: IP with
    // no options or extension headers, and TCP up to its checksum (every
    // whole TCP segment is at least that long).
    if proto == ETH_P_IPV6 {
        pull(ctx, L2 + 40 + TCP_CSUM + 2);
    } else {
        pull(ctx, L2 + 20 + TCP_CSUM + 2);
    }
    // A packet shorter than its IP header is no packet to the kernel: Pass.
    match proto {
        ETH_P_IP => {
            let vihl: u8 = read(ctx, l2).ok_or(Parsed::Pass)?;
            let ihl = ((vihl & 0x0f) as usize) * 4;
            let l4: u8 = read(ctx, l2 + 9).ok_or(Parsed::Pass)?;
            if vihl >> 4 != 4 || ihl < 20 || l4 != IPPROTO_TCP {
                return Err(Parsed::Pass);
            }
            if ihl > 20 {
                // Options: room for the longest header.
                pull(ctx, L2 + 60 + TCP_CSUM + 2);
            }
            let frag = u16::from_be(read::<u16>(ctx, l2 + 6).ok_or(Parsed::Pass)?);
            match frag & 0x1fff {
                0 => {}
                // Offset 8: only good for overwriting a first fragment's
                // TCP flags (RFC 3128); Linux would merge it.
                1 => return Err(Parsed::Unreadable),
                _ => {
                    counters::inc(slot, Counter::Fragments);
                    return Err(Parsed::Pass);
                }
            }
            let s: u32 = read(ctx, l2 + 12).ok_or(Parsed::Pass)?;
            let d: u32 = read(ctx, l2 + 16).ok_or(Parsed::Pass)?;
            tcp_direct(ctx, AF_INET, [s, 0, 0, 0], [d, 0, 0, 0], l2 + ihl)
        }
        ETH_P_IPV6 => {
            let v: u8 = read(ctx, l2).ok_or(Parsed::Pass)?;
            if v >> 4 != 6 {
                return Err(Parsed::Pass);
            }
            let next: u8 = read(ctx, l2 + 6).ok_or(Parsed::Pass)?;
            let s: [u32; 4] = read(ctx, l2 + 8).ok_or(Parsed::Pass)?;
            let d: [u32; 4] = read(ctx, l2 + 24).ok_or(Parsed::Pass)?;
            if next == IPPROTO_TCP {
                return tcp_direct(ctx, AF_INET6, s, d, l2 + 40);
            }
            let l4_off = ipv6_l4(ctx, slot, next, l2 + 40)?;
            // The header up to its checksum, wherever the chain put it.
            let h: [u8; TCP_CSUM + 2] = ctx.load(l4_off).map_err(|_| Parsed::Unreadable)?;
            Ok(Tcp {
                family: AF_INET6,
                src: s,
                dst: d,
                sport: u16::from_ne_bytes([h[0], h[1]]),
                dport: u16::from_ne_bytes([h[2], h[3]]),
                flags: h[13],
                l4_off,
            })
        }
        _ => Err(Parsed::Pass),
    }
}

/// The TCP header at `l4_off`, by direct packet access (pulled already).
#[inline(always)]
fn tcp_direct(
    ctx: &TcContext,
    family: u8,
    src: [u32; 4],
    dst: [u32; 4],
    l4_off: usize,
) -> Result<Tcp, Parsed> {
    // The verifier wants a bounded offset.
    if l4_off > MAX_L2 + HDR_ROOM {
        return Err(Parsed::Unreadable);
    }
    // The whole header up to the checksum must be here: the pull made that
    // much linear if the packet has it, so a miss is a packet cut short (a
    // tiny first fragment, RFC 1858). One read, one bounds check the
    // verifier can follow.
    let h: [u8; TCP_CSUM + 2] = read(ctx, l4_off).ok_or(Parsed::Unreadable)?;
    Ok(Tcp {
        family,
        src,
        dst,
        sport: u16::from_ne_bytes([h[0], h[1]]),
        dport: u16::from_ne_bytes([h[2], h[3]]),
        flags: h[13],
        l4_off,
    })
}

/// Offsets inside the TCP header.
pub const TCP_SPORT: usize = 0;
pub const TCP_DPORT: usize = 2;
pub const TCP_CSUM: usize = 16;
/// `bpf_l4_csum_replace` flag: the replaced field is 2 bytes wide.
const CSUM_FIELD_2: u64 = 2;

/// Replaces a port (network order) and fixes the TCP checksum with the
/// kernel's helpers (which also handle CHECKSUM_PARTIAL / COMPLETE skbs).
#[inline(always)]
pub fn rewrite_port(ctx: &TcContext, tcp: &Tcp, field: usize, old: u16, new: u16) -> bool {
    ctx.l4_csum_replace(tcp.l4_off + TCP_CSUM, old as u64, new as u64, CSUM_FIELD_2)
        .is_ok()
        && ctx.store(tcp.l4_off + field, &new, 0).is_ok()
}

/// The socket mark of the skb (SO_MARK of the sending socket on egress,
/// and on loopback ingress).
#[inline(always)]
pub fn mark(ctx: &TcContext) -> u32 {
    // SAFETY: the context pointer is valid for the program's lifetime.
    unsafe { (*ctx.skb.skb).mark }
}
