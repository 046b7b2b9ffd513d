//! Shared by the example programs and the tests: listeners, a
//! deterministic byte stream (so a reader can check every byte a writer
//! sent without either storing it) and the write-size pattern the
//! integrity tests use.
use std::{net::SocketAddr, os::fd::AsRawFd as _};

pub mod packet;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// A non-blocking listener on `addr` (IPv6 ones are v6-only, so IPv4 flows
/// land on the IPv4 listener and read SOL_IP options). `transparent`: the
/// listener accepts flows addressed to other addresses (IP_TRANSPARENT /
/// IPV6_TRANSPARENT), as the tproxy back-end needs.
pub fn listener(addr: SocketAddr, transparent: bool) -> std::io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    if transparent && addr.is_ipv4() {
        s.set_ip_transparent(true)?;
    } else if transparent {
        let one: libc::c_int = 1;
        // SAFETY: setsockopt with an int on our own socket.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_IPV6,
                libc::IPV6_TRANSPARENT,
                (&raw const one).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    s.set_nonblocking(true)?;
    s.bind(&SockAddr::from(addr))?;
    s.listen(1024)?;
    Ok(s.into())
}

/// xorshift64* bytes: `Stream::new(seed)` gives the same sequence on both
/// ends of a connection.
pub struct Stream {
    state: u64,
    buf: u64,
    left: u8,
}

impl Stream {
    pub fn new(seed: u64) -> Stream {
        Stream {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            buf: 0,
            left: 0,
        }
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            if self.left == 0 {
                self.buf = self.next_u64();
                self.left = 8;
            }
            *b = self.buf as u8;
            self.buf >>= 8;
            self.left -= 1;
        }
    }

    /// Checks `got` against the next bytes of the stream; the offset of the
    /// first difference, if any.
    pub fn check(&mut self, got: &[u8]) -> Option<usize> {
        let mut want = vec![0u8; got.len()];
        self.fill(&mut want);
        want.iter().zip(got).position(|(a, b)| a != b)
    }
}

/// Write sizes from 1 byte to 1 MiB, log-uniform (as many 1–10 B writes
/// as 100 KiB–1 MiB ones), from a seed.
pub struct WriteSizes(Stream);

impl WriteSizes {
    pub const MAX: usize = 1 << 20;

    pub fn new(seed: u64) -> WriteSizes {
        WriteSizes(Stream::new(seed ^ 0x5151))
    }

    pub fn next_size(&mut self) -> usize {
        let r = self.0.next_u64();
        let bits = (r % 21) as u32; // 2^0 .. 2^20
        let base = 1usize << bits;
        (base + (r >> 8) as usize % base).min(Self::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_is_deterministic_and_checkable() {
        let mut a = Stream::new(7);
        let mut b = Stream::new(7);
        let mut x = vec![0u8; 1000];
        a.fill(&mut x[..3]);
        a.fill(&mut x[3..]);
        assert_eq!(b.check(&x), None);
        let mut c = Stream::new(7);
        x[500] ^= 1;
        assert_eq!(c.check(&x), Some(500));
        assert_ne!(Stream::new(8).check(&x[..8]), None);
    }

    #[test]
    fn write_sizes_span_one_byte_to_a_mebibyte() {
        let mut w = WriteSizes::new(1);
        let sizes: Vec<usize> = (0..10_000).map(|_| w.next_size()).collect();
        assert!(sizes.iter().all(|&s| (1..=WriteSizes::MAX).contains(&s)));
        assert!(sizes.iter().any(|&s| s < 4));
        assert!(sizes.iter().any(|&s| s > 512 << 10));
    }
}
