//! Just enough packet parsing for the tc programs: Ethernet, IPv4 or IPv6
//! (no extension headers), TCP. Direct packet access, with one
//! bpf_skb_pull_data when the headers are not in the linear part.
use aya_ebpf::programs::TcContext;
use tproxy_common::{AF_INET, AF_INET6};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
/// Ethernet + the largest IPv4 header + TCP up to and including its flags.
const MAX_HDRS: usize = ETH_HLEN + 60 + 14;

pub const TCP_FIN: u8 = 0x01;
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
}

#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    // SAFETY: ptr_at checked the bounds against data_end.
    ptr_at::<T>(ctx, off).map(|p| unsafe { core::ptr::read_unaligned(p) })
}

/// Parses a TCP segment; `None` for anything else (or a fragment).
#[inline(always)]
pub fn parse_tcp(ctx: &TcContext) -> Option<Tcp> {
    if ctx.data() + MAX_HDRS > ctx.data_end() {
        // Headers may sit outside the linear area (or the packet is short).
        let want = core::cmp::min(ctx.len() as usize, MAX_HDRS);
        let _ = ctx.pull_data(want as u32);
    }
    let proto = u16::from_be(read::<u16>(ctx, 12)?);
    let (family, src, dst, l4_off) = match proto {
        ETH_P_IP => {
            let vihl: u8 = read(ctx, ETH_HLEN)?;
            let ihl = ((vihl & 0x0f) as usize) * 4;
            if ihl < 20 || read::<u8>(ctx, ETH_HLEN + 9)? != IPPROTO_TCP {
                return None;
            }
            // Fragment offset or more-fragments: not the first fragment's
            // full header, leave it alone.
            let frag = u16::from_be(read::<u16>(ctx, ETH_HLEN + 6)?);
            if frag & 0x3fff != 0 {
                return None;
            }
            let s: u32 = read(ctx, ETH_HLEN + 12)?;
            let d: u32 = read(ctx, ETH_HLEN + 16)?;
            (AF_INET, [s, 0, 0, 0], [d, 0, 0, 0], ETH_HLEN + ihl)
        }
        ETH_P_IPV6 => {
            if read::<u8>(ctx, ETH_HLEN + 6)? != IPPROTO_TCP {
                return None;
            }
            let s: [u32; 4] = read(ctx, ETH_HLEN + 8)?;
            let d: [u32; 4] = read(ctx, ETH_HLEN + 24)?;
            (AF_INET6, s, d, ETH_HLEN + 40)
        }
        _ => return None,
    };
    // The verifier wants a bounded offset.
    if l4_off > ETH_HLEN + 60 {
        return None;
    }
    Some(Tcp {
        family,
        src,
        dst,
        sport: read(ctx, l4_off)?,
        dport: read(ctx, l4_off + 2)?,
        flags: read(ctx, l4_off + 13)?,
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
