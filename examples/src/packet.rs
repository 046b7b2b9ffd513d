//! Hand-built packets with correct checksums: forged segments for the lab
//! (SYN floods, blind RSTs, retransmitted FINs from raw sockets) and crafted
//! frames for `BPF_PROG_TEST_RUN` of the tc programs.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const IPPROTO_TCP: u8 = 6;

/// One TCP segment, before addressing.
#[derive(Clone, Debug)]
pub struct Tcp {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    pub payload: Vec<u8>,
}

impl Tcp {
    pub fn new(sport: u16, dport: u16, flags: u8) -> Tcp {
        Tcp {
            sport,
            dport,
            seq: 1000,
            ack: if flags & ACK != 0 { 2000 } else { 0 },
            flags,
            window: 64240,
            payload: Vec::new(),
        }
    }

    /// The segment's bytes (20-byte header, no options) with its checksum
    /// for the given addresses.
    pub fn bytes(&self, src: IpAddr, dst: IpAddr) -> Vec<u8> {
        let mut t = Vec::with_capacity(20 + self.payload.len());
        t.extend_from_slice(&self.sport.to_be_bytes());
        t.extend_from_slice(&self.dport.to_be_bytes());
        t.extend_from_slice(&self.seq.to_be_bytes());
        t.extend_from_slice(&self.ack.to_be_bytes());
        t.push(5 << 4);
        t.push(self.flags);
        t.extend_from_slice(&self.window.to_be_bytes());
        t.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
        t.extend_from_slice(&self.payload);
        let c = l4_checksum(src, dst, IPPROTO_TCP, &t);
        t[16..18].copy_from_slice(&c.to_be_bytes());
        t
    }
}

/// Ones'-complement sum of 16-bit words, not yet folded.
fn sum(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for w in &mut chunks {
        acc += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [b] = chunks.remainder() {
        acc += u32::from(*b) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    fold(sum(data, 0))
}

fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut acc = 0;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            acc = sum(&s.octets(), acc);
            acc = sum(&d.octets(), acc);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            acc = sum(&s.octets(), acc);
            acc = sum(&d.octets(), acc);
        }
        _ => panic!("mixed address families"),
    }
    acc + u32::from(proto) + len as u32
}

/// TCP/UDP checksum over the pseudo-header and `l4` (checksum field zero).
pub fn l4_checksum(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> u16 {
    fold(sum(l4, pseudo(src, dst, proto, l4.len())))
}

/// True when `l4`'s own checksum field is right for these addresses.
pub fn l4_checksum_ok(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> bool {
    fold(sum(l4, pseudo(src, dst, proto, l4.len()))) == 0
}

/// An IPv4 header (with `options`, padded to 4 bytes) and `payload`.
/// `frag` is the flags+offset field (0x2000 = more fragments).
pub fn ipv4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    options: &[u8],
    frag: u16,
    proto: u8,
    payload: &[u8],
) -> Vec<u8> {
    ipv4_id(src, dst, 0x1234, options, frag, proto, payload)
}

/// [`ipv4`] with the given identification (fragments of one datagram
/// share it; the receiver reassembles by addresses, protocol and id).
pub fn ipv4_id(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    id: u16,
    options: &[u8],
    frag: u16,
    proto: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut opts = options.to_vec();
    while !opts.len().is_multiple_of(4) {
        opts.push(0); // end of options list
    }
    let ihl = 5 + opts.len() / 4;
    let total = ihl * 4 + payload.len();
    let mut h = vec![(4 << 4) | ihl as u8, 0];
    h.extend_from_slice(&(total as u16).to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[64, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(&opts);
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// An IPv6 extension header chain element: (its type, its bytes after the
/// next-header byte is filled in).
pub struct Ext {
    pub kind: u8,
    pub body: Vec<u8>,
}

impl Ext {
    /// Hop-by-hop (0) or destination options (60) with `n` 8-byte units of
    /// padding (PadN).
    pub fn options(kind: u8, units: usize) -> Ext {
        let len = 8 * units;
        let mut body = vec![0, (units - 1) as u8];
        // PadN covering the rest.
        body.push(1);
        body.push((len - 4) as u8);
        body.resize(len, 0);
        Ext { kind, body }
    }

    /// Hop-by-hop (0) or destination options (60) of `units` 8-byte units
    /// that a receiving kernel accepts: filled with options of the
    /// experimental type 0x1e (RFC 4727), whose top bits say "skip it if
    /// unknown" (Linux drops a header with more than 7 bytes of padding,
    /// so [`Ext::options`] longer than 8 bytes never reaches its TCP).
    /// At most 8 options (Linux's default `max_dst_opts_number`): up to
    /// 2048 bytes.
    pub fn skippable(kind: u8, units: usize) -> Ext {
        let len = 8 * units;
        assert!((1..=256).contains(&units), "{units} units");
        let mut body = vec![0, (units - 1) as u8];
        let mut left = len - 2;
        while left > 0 {
            if left == 1 {
                body.push(0); // Pad1
                break;
            }
            let mut take = left.min(2 + 255);
            if left - take == 1 {
                take -= 1;
            }
            body.push(0x1e);
            body.push((take - 2) as u8);
            body.resize(body.len() + take - 2, 0);
            left -= take;
        }
        Ext { kind, body }
    }

    /// A fragment header (44): `offset` in 8-byte units, `more` fragments.
    pub fn fragment(offset: u16, more: bool) -> Ext {
        let mut body = vec![0, 0];
        body.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
        body.extend_from_slice(&0xabcd_u32.to_be_bytes());
        Ext { kind: 44, body }
    }
}

/// An IPv6 header, extension headers in order, then `proto`'s payload.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, exts: &[Ext], proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut chain = Vec::new();
    for (i, e) in exts.iter().enumerate() {
        let mut b = e.body.clone();
        b[0] = exts.get(i + 1).map_or(proto, |n| n.kind);
        chain.extend_from_slice(&b);
    }
    let first = exts.first().map_or(proto, |e| e.kind);
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&((chain.len() + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[first, 64]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(&chain);
    h.extend_from_slice(payload);
    h
}

/// An Ethernet frame (made-up MACs) around `payload`; with `vlan`, an
/// 802.1Q tag in the frame.
pub fn ether(ethertype: u16, vlan: Option<u16>, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    if let Some(id) = vlan {
        f.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
        f.extend_from_slice(&id.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A whole IP packet (no link header) carrying `tcp` from `src` to `dst`.
pub fn ip_tcp(src: IpAddr, dst: IpAddr, tcp: &Tcp) -> Vec<u8> {
    let seg = tcp.bytes(src, dst);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4(s, d, &[], 0x4000, IPPROTO_TCP, &seg),
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6(s, d, &[], IPPROTO_TCP, &seg),
        _ => panic!("mixed address families"),
    }
}

/// `l4` (a whole TCP segment, say) in two IPv4 fragments of datagram
/// `id`: the first carries `l4[..first]` (more fragments set; `first` a
/// multiple of 8), the second the rest at offset `first`.
pub fn ipv4_fragments(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    id: u16,
    proto: u8,
    l4: &[u8],
    first: usize,
) -> [Vec<u8>; 2] {
    assert!(
        first.is_multiple_of(8) && first > 0 && first < l4.len(),
        "a first fragment of {first} bytes of {}",
        l4.len()
    );
    [
        ipv4_id(src, dst, id, &[], 0x2000, proto, &l4[..first]),
        ipv4_id(src, dst, id, &[], (first / 8) as u16, proto, &l4[first..]),
    ]
}

/// A small, fast, seeded generator for forged sources (no crypto needed).
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_verify() {
        let s: IpAddr = "10.0.0.20".parse().unwrap();
        let d: IpAddr = "192.168.178.10".parse().unwrap();
        let mut t = Tcp::new(40000, 8000, PSH | ACK);
        t.payload = b"hello".to_vec();
        let seg = t.bytes(s, d);
        assert!(l4_checksum_ok(s, d, IPPROTO_TCP, &seg));
        let pkt = ip_tcp(s, d, &t);
        assert_eq!(checksum(&pkt[..20]), 0);
        let s6: IpAddr = "fd00::20".parse().unwrap();
        let d6: IpAddr = "fd00:1::10".parse().unwrap();
        let seg6 = t.bytes(s6, d6);
        assert!(l4_checksum_ok(s6, d6, IPPROTO_TCP, &seg6));
        let mut broken = seg6.clone();
        broken[2] ^= 1;
        assert!(!l4_checksum_ok(s6, d6, IPPROTO_TCP, &broken));
    }

    #[test]
    fn fragments_split_the_segment() {
        let (s, d) = (
            Ipv4Addr::new(10, 0, 0, 20),
            Ipv4Addr::new(192, 168, 178, 10),
        );
        let seg = Tcp::new(40000, 8000, SYN).bytes(s.into(), d.into());
        let [a, b] = ipv4_fragments(s, d, 7, IPPROTO_TCP, &seg, 8);
        assert_eq!((a.len(), b.len()), (28, 32));
        assert_eq!(checksum(&a[..20]), 0);
        assert_eq!(checksum(&b[..20]), 0);
        assert_eq!(&a[4..8], &[0, 7, 0x20, 0]); // id 7, more fragments, offset 0
        assert_eq!(&b[4..8], &[0, 7, 0, 1]); // id 7, offset 8 bytes
        assert_eq!([&a[20..], &b[20..]].concat(), seg);
    }

    #[test]
    fn skippable_options_fill_the_header() {
        for units in [1, 2, 25, 32, 33, 256] {
            let e = Ext::skippable(60, units);
            assert_eq!(e.body.len(), 8 * units);
            assert_eq!(usize::from(e.body[1]), units - 1);
            // Walk the options: each fits, none is padding over 7 bytes.
            let (mut i, mut opts) = (2, 0);
            while i < e.body.len() {
                if e.body[i] == 0 {
                    i += 1;
                    continue;
                }
                assert_eq!(e.body[i], 0x1e);
                i += 2 + usize::from(e.body[i + 1]);
                opts += 1;
            }
            assert_eq!(i, e.body.len(), "{units} units");
            assert!(opts <= 8, "{units} units: {opts} options");
        }
    }

    #[test]
    fn extension_headers_chain() {
        let p = ipv6(
            Ipv6Addr::LOCALHOST,
            Ipv6Addr::LOCALHOST,
            &[Ext::options(0, 1), Ext::fragment(0, true)],
            IPPROTO_TCP,
            &[0; 20],
        );
        assert_eq!(p[6], 0); // first: hop-by-hop
        assert_eq!(p[40], 44); // hop-by-hop's next: fragment
        assert_eq!(p[48], IPPROTO_TCP); // fragment's next: TCP
        assert_eq!(u16::from_be_bytes([p[4], p[5]]), 8 + 8 + 20);
    }
}
