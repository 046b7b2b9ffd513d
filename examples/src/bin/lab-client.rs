//! The lab's checking client, for runs that must happen inside the app's
//! cgroup (socket acceleration only applies to sockets in it).
//!
//!     lab-client echo ADDR --bytes N [--conns C] [--bind IP:PORT] [--seed S]
//!
//! Each connection writes N bytes of a seeded stream in writes of 1 B to
//! 1 MiB while a second thread reads the app's echo and checks every byte;
//! prints `ok conn=I bytes=N banner=...` per connection (or `FAIL ...`) and
//! exits non-zero on any failure. `--until-stdin`: each connection writes
//! until a line arrives on stdin, then N bytes more (so a test decides when
//! a transfer may end; N in the `ok` line is then all it wrote).
//!
//!     lab-client sink ADDR --bytes N [--seed S] [--pause-every B (--pause-ms MS | --pause-stdin)]
//!         [--sndbuf BYTES] [--write-size BYTES] [--read-size BYTES] [--like-envoy]
//!
//! Writes N bytes (`SINK <seed> go` first, then waits for the app's `go`) as fast as it can, for a slow
//! reader, optionally pausing MS ms after every B bytes (bursts); prints
//! `ok bytes=N errors=…` with what the writes returned. `--pause-stdin`:
//! the pauses (and one after the `SINK` line, before the first byte, and
//! one after the last byte, before the close) last until a line arrives
//! on stdin, each announced with `paused sent=S` (S:
//! bytes written so far), so a test drives the bursts. `--sndbuf`: the
//! socket's send buffer (SO_SNDBUFFORCE), so a burst fits whole in it
//! whatever the reader does. `--write-size`: bytes per write (256 KiB).
//! `--read-size`: the app reads at most this many bytes a read.
//! `--like-envoy`:
//! a non-blocking writer that, as Envoy does, keeps buffering while TCP
//! refuses it (EAGAIN) and then writes all it holds in one call, so the
//! write after a refused one is larger than what was refused; with
//! `--hold-ms MS` it prints its line and keeps the connection open MS ms
//! more (its sockets' figures can then be read), after one last byte.
//!
//!     lab-client pingpong ADDR --bytes N [--rounds R] [--seed S]
//!
//! R rounds against the app's echo, each N bytes written and the same N
//! read back (checked) before the next: small messages, two ways. Prints
//! `ok rounds=R`.
//!
//!     lab-client request ADDR --bytes N [--timeout-s S]
//!
//! Sends `COUNT N` and N bytes, then waits (without closing) for the app's
//! answer; fails if none comes within S seconds (default 10).
//!
//!     lab-client synflood ADDR --count N [--seconds S] [--seed S]
//!
//! Sends N SYNs to ADDR (IPv4) from a raw socket, each from a random
//! source address in 198.18.0.0/15 (the benchmarking range: replies go
//! nowhere) and a random port, stopping after S seconds (default 20) if N
//! is not reached; prints `sent N in MS ms`.
//!
//!     lab-client forge ADDR --from IP:PORT --flags syn|rst|fin|ack [--seq N] [--ack N]
//!         [--payload B] [--frag N [--ip-id I]] [--dstopt B] [--listen-ms MS [--until-reply]]
//!
//! Sends one forged TCP segment from IP:PORT to ADDR (a blind RST, a
//! retransmitted FIN, a SYN), with B bytes of payload; prints `sent`.
//! `--frag N` (IPv4): as two fragments of datagram I, the first with the
//! segment's first N bytes (a multiple of 8; `--frag 8`: RFC 1858's tiny
//! fragment). `--dstopt B` (IPv6): behind a destination options header
//! of B bytes (a multiple of 8, 8 to 2048). `--listen-ms MS`: then prints
//! `reply flags=F seq=S ack=A` for each segment from ADDR's port to
//! IP:PORT that arrives within MS ms (read from a raw socket opened before
//! the send), and `replies N`; with `--until-reply` it stops listening at
//! the first reply (a long MS for an answer that must come, at once).
//!
//!     lab-client handshake ADDR --from IP:PORT --send TEXT --expect TEXT
//!         [--dstopt B] [--payload B --frag N [--ip-id I]] [--timeout-s S]
//!
//! A TCP client from a raw socket (every segment it sends carries the
//! `--dstopt` header, IPv6; the SYN carries `--payload` bytes, which are
//! not acknowledged, and goes in two fragments as with `forge --frag`,
//! IPv4): SYN, the ACK of the SYN-ACK, TEXT; acknowledges
//! what arrives until it holds `--expect`; prints `synack` and `got TEXT`
//! (escaped). The caller must keep its own kernel from answering the
//! SYN-ACK with a RST (a firewall rule in the client namespace).
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use socket2::{Domain, Socket, Type};
use tproxy_examples::{Stream, WriteSizes, packet};

fn connect(addr: SocketAddr, bind: Option<SocketAddr>) -> Result<TcpStream> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if let Some(b) = bind {
        s.set_reuse_address(true)?;
        s.bind(&b.into())?;
    }
    s.connect_timeout(&addr.into(), Duration::from_secs(5))?;
    Ok(s.into())
}

/// `read`, retrying the spurious EAGAIN that a blocking read on a socket in
/// a SOCKHASH can return when the peer closes (the kernel's
/// tcp_bpf_recvmsg, seen on 6.18: lab/experiments/sockmap_close.py).
fn read_retry(r: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut spurious = 0;
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && spurious < 100 => spurious += 1,
            other => return other,
        }
    }
}

fn echo_one(
    i: usize,
    addr: SocketAddr,
    bind: Option<SocketAddr>,
    bytes: usize,
    seed: u64,
    until: Option<&std::sync::atomic::AtomicBool>,
) -> Result<String> {
    let c = connect(addr, bind)?;
    c.set_read_timeout(Some(Duration::from_secs(60)))?;
    c.set_write_timeout(Some(Duration::from_secs(60)))?;
    let mut r = BufReader::with_capacity(1 << 20, c.try_clone()?);
    let reader = std::thread::spawn(move || -> Result<(String, usize)> {
        let mut banner = String::new();
        loop {
            match r.read_line(&mut banner) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                other => {
                    other?;
                    break;
                }
            }
        }
        let mut check = Stream::new(seed);
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        // The last reads' sizes, for the report on a difference.
        let mut reads = std::collections::VecDeque::with_capacity(16);
        loop {
            let n = read_retry(&mut r, &mut buf)?;
            if n == 0 {
                break;
            }
            if reads.len() == 16 {
                reads.pop_front();
            }
            reads.push_back((got, n));
            if let Some(off) = check.check(&buf[..n]) {
                let at = got + off;
                bail!(
                    "byte {at} differs: {}; last reads (offset, size): {reads:?}",
                    divergence(&mut r, seed, bytes, got, &buf[..n], at)
                );
            }
            got += n;
        }
        Ok((banner.trim().to_string(), got))
    });
    let mut w = c;
    let mut data = Stream::new(seed);
    let mut sizes = WriteSizes::new(seed);
    let mut buf = vec![0u8; WriteSizes::MAX];
    let mut sent = 0;
    // `--until-stdin`: the stream goes on until the line comes, then
    // `bytes` more.
    let mut end = if until.is_some() { usize::MAX } else { bytes };
    while sent < end {
        if let Some(flag) = until
            && end == usize::MAX
            && flag.load(std::sync::atomic::Ordering::SeqCst)
        {
            end = sent + bytes;
            continue;
        }
        let n = sizes.next_size().min(end - sent);
        data.fill(&mut buf[..n]);
        w.write_all(&buf[..n])?;
        sent += n;
    }
    w.shutdown(Shutdown::Write)?;
    let (banner, got) = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    if got != sent {
        bail!("sent {sent} bytes, got {got} back");
    }
    Ok(format!("ok conn={i} bytes={got} banner={banner}"))
}

/// What a difference at stream offset `at` is: the rest of the stream is
/// read (the reader's `read` started at `got` and returned `first`), and
/// the bytes received at `at` are looked up in the expected stream, and the
/// expected ones in what was received: lost, duplicated or moved bytes,
/// and how many.
fn divergence(
    r: &mut impl std::io::Read,
    seed: u64,
    bytes: usize,
    got: usize,
    first: &[u8],
    at: usize,
) -> String {
    const PROBE: usize = 64;
    let mut want = vec![0u8; bytes];
    Stream::new(seed).fill(&mut want);
    let mut recv = want[..got].to_vec();
    recv.extend_from_slice(first);
    let mut buf = vec![0u8; 1 << 20];
    let mut tail_err = None;
    while recv.len() < bytes + (8 << 20) {
        match read_retry(r, &mut buf) {
            Ok(0) => break,
            Ok(n) => recv.extend_from_slice(&buf[..n]),
            Err(e) => {
                tail_err = Some(e);
                break;
            }
        }
    }
    let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).position(|w| w == needle);
    let run = |a: &[u8], b: &[u8]| a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let mut out = format!("received {} B in all", recv.len());
    if let Some(e) = tail_err {
        out += &format!(" (then {e})");
    }
    let here = &recv[at..(at + PROBE).min(recv.len())];
    match find(&want, here) {
        Some(q) => {
            let len = run(&recv[at..], &want[q..]);
            out += &format!(
                "; the {len} B received from {at} are the stream's bytes {q}.. (shift {:+})",
                q as i64 - at as i64
            );
        }
        None => out += &format!("; the bytes received at {at} are nowhere in the stream"),
    }
    let expected = &want[at..(at + PROBE).min(want.len())];
    match find(&recv[at..], expected) {
        Some(q) => {
            let len = run(&recv[at + q..], &want[at..]);
            out += &format!(
                "; the stream's bytes from {at} arrived at {} ({len} B in order there)",
                at + q
            );
        }
        None => out += &format!("; the stream's bytes from {at} never arrived"),
    }
    out
}

/// How `sink` pauses between bursts.
#[derive(Clone, Copy)]
enum Pause {
    /// This many milliseconds.
    Sleep(u64),
    /// Until a line arrives on stdin (announced with `paused sent=S`).
    Stdin,
}

impl Pause {
    fn wait(self, sent: usize) -> Result<()> {
        match self {
            Pause::Sleep(ms) => std::thread::sleep(Duration::from_millis(ms)),
            Pause::Stdin => {
                println!("paused sent={sent}");
                std::io::Write::flush(&mut std::io::stdout())?;
                let mut line = String::new();
                if std::io::stdin().read_line(&mut line)? == 0 {
                    bail!("stdin closed while paused at {sent} bytes");
                }
            }
        }
        Ok(())
    }
}

/// SO_SNDBUFFORCE (root): a send buffer of `bytes`, past net.core.wmem_max.
fn force_sndbuf(c: &TcpStream, bytes: usize) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    let v = libc::c_int::try_from(bytes)?;
    // SAFETY: setsockopt with a valid fd and a c_int of the given size.
    let rc = unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            (&raw const v).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!(
            "SO_SNDBUFFORCE {bytes}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn sink(
    addr: SocketAddr,
    bytes: usize,
    seed: u64,
    pause: Option<(usize, Pause)>,
    sndbuf: Option<usize>,
    write_size: usize,
    read_size: Option<usize>,
) -> Result<String> {
    let mut c = connect(addr, None)?;
    if let Some(b) = sndbuf {
        force_sndbuf(&c, b)?;
    }
    let read = read_size.map_or(String::new(), |r| format!(" read={r}"));
    c.write_all(format!("SINK {seed} go{read}\n").as_bytes())?;
    wait_go(&mut c)?;
    if let Some((_, p @ Pause::Stdin)) = pause {
        p.wait(0)?;
    }
    let mut data = Stream::new(seed);
    let mut buf = vec![0u8; write_size.max(1)];
    let (mut sent, mut errors) = (0, Vec::new());
    let t0 = Instant::now();
    while sent < bytes {
        let mut n = buf.len().min(bytes - sent);
        if let Some((every, _)) = pause {
            // Bursts end exactly at their boundary.
            n = n.min(every - sent % every);
        }
        data.fill(&mut buf[..n]);
        let mut off = 0;
        while off < n {
            match c.write(&buf[off..n]) {
                Ok(k) => off += k,
                Err(e) => {
                    errors.push(e.to_string());
                    if errors.len() > 100 {
                        bail!("writes keep failing: {e}");
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        sent += n;
        if let Some((every, p)) = pause
            && sent % every == 0
            && sent < bytes
        {
            p.wait(sent)?;
        }
    }
    let wrote_in = t0.elapsed();
    // Driven from stdin: one pause more, after the last byte, so the test
    // says when the stream ends.
    if let Some((_, p @ Pause::Stdin)) = pause {
        p.wait(sent)?;
    }
    c.shutdown(Shutdown::Write)?;
    c.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = read_retry(&mut c, &mut buf)?;
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n]);
    }
    let reply = String::from_utf8_lossy(&reply);
    Ok(format!(
        "ok bytes={sent} wrote_in_ms={} errors={} reply={}",
        wrote_in.as_millis(),
        errors.len(),
        reply.trim()
    ))
}

/// `pingpong`: the app answers its banner to the first byte and echoes it,
/// then echoes each round.
fn pingpong(addr: SocketAddr, rounds: usize, size: usize, seed: u64) -> Result<String> {
    use std::io::Read as _;
    let mut c = connect(addr, None)?;
    c.set_read_timeout(Some(Duration::from_secs(60)))?;
    c.write_all(b"x")?;
    let mut b = [0u8; 1];
    while b[0] != b'\n' {
        c.read_exact(&mut b).context("banner")?;
    }
    c.read_exact(&mut b).context("echo of the first byte")?;
    let (mut data, mut check) = (Stream::new(seed), Stream::new(seed));
    let (mut out, mut back) = (vec![0u8; size], vec![0u8; size]);
    for round in 0..rounds {
        data.fill(&mut out);
        c.write_all(&out)?;
        c.read_exact(&mut back)
            .with_context(|| format!("round {round}"))?;
        if let Some(off) = check.check(&back) {
            bail!("round {round}: byte {off} differs");
        }
    }
    Ok(format!("ok rounds={rounds}"))
}

/// Reads the app's `go` (its answer to a `SINK … go` line): the app has
/// read the line, so the stream that follows is the accelerated one.
fn wait_go(c: &mut TcpStream) -> Result<()> {
    use std::io::Read as _;
    let mut go = [0u8; 3];
    c.read_exact(&mut go).context("waiting for the app's go")?;
    if &go != b"go\n" {
        bail!(
            "the app answered {:?}, not go",
            String::from_utf8_lossy(&go)
        );
    }
    Ok(())
}

/// `sink --like-envoy`: the writer side of a proxy whose upstream is slow.
/// Up to 1 MiB buffered; each write offers all of it; after a short or
/// refused write, more is buffered before the next.
fn sink_like_envoy(addr: SocketAddr, bytes: usize, seed: u64) -> Result<(String, TcpStream)> {
    use std::os::fd::AsRawFd as _;
    let mut c = connect(addr, None)?;
    // With the length, the app answers without waiting for EOF, and the
    // connection stays open until this end closes it.
    c.write_all(format!("SINK {seed} {bytes} go\n").as_bytes())?;
    wait_go(&mut c)?;
    c.set_nonblocking(true)?;
    let mut pending = Vec::new();
    let mut data = Stream::new(seed);
    let (mut made, mut short) = (0, 0);
    let t0 = Instant::now();
    while made < bytes || !pending.is_empty() {
        while made < bytes && pending.len() < 1 << 20 {
            let n = (64 << 10).min(bytes - made);
            let at = pending.len();
            pending.resize(at + n, 0);
            data.fill(&mut pending[at..]);
            made += n;
        }
        match c.write(&pending) {
            Ok(k) => {
                if k < pending.len() {
                    short += 1;
                }
                pending.drain(..k);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                short += 1;
                let mut p = libc::pollfd {
                    fd: c.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut p, 1, 1000) };
            }
            Err(e) => bail!("write: {e}"),
        }
        if t0.elapsed() > Duration::from_secs(120) {
            bail!(
                "stuck: {} bytes still to write",
                pending.len() + bytes - made
            );
        }
    }
    let wrote_in = t0.elapsed();
    c.set_nonblocking(false)?;
    c.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    while !reply.ends_with(b"\n") {
        let n = read_retry(&mut c, &mut buf)?;
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n]);
    }
    // One byte more, so a send follows the last refused one (tproxy trues
    // its count of what went by TCP up at each send it sees).
    c.write_all(b".")?;
    let line = format!(
        "ok bytes={made} wrote_in_ms={} errors=0 short_writes={short} reply={}",
        wrote_in.as_millis(),
        String::from_utf8_lossy(&reply).trim()
    );
    Ok((line, c))
}

/// A raw IP socket that takes whole packets (IP header included).
fn raw_socket(dst: SocketAddr) -> Result<Socket> {
    let s = Socket::new(
        Domain::for_address(dst),
        Type::RAW,
        Some(socket2::Protocol::from(libc::IPPROTO_RAW)),
    )
    .context("raw socket (needs CAP_NET_RAW)")?;
    if dst.is_ipv6() {
        // IPPROTO_RAW implies IP_HDRINCL for IPv4 only.
        s.set_header_included_v6(true)?;
    }
    Ok(s)
}

fn send_raw(dst: SocketAddr, pkt: &[u8]) -> Result<()> {
    let s = raw_socket(dst)?;
    // The kernel wants port 0 in the address of a raw socket.
    let to = SocketAddr::new(dst.ip(), 0);
    s.send_to(pkt, &to.into()).context("sendto")?;
    Ok(())
}

/// The flag letters tcpdump uses (`S`, `SA`, `R`, `.` for a bare ACK).
fn flag_letters(flags: u8) -> String {
    let mut out = String::new();
    for (bit, c) in [
        (packet::FIN, 'F'),
        (packet::SYN, 'S'),
        (packet::RST, 'R'),
        (packet::PSH, 'P'),
        (packet::ACK, 'A'),
    ] {
        if flags & bit != 0 {
            out.push(c);
        }
    }
    if out.is_empty() { ".".into() } else { out }
}

/// One TCP segment received on a raw socket.
struct Segment {
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: Vec<u8>,
}

/// Receives TCP segments addressed to this namespace from a raw socket
/// (IPv4: with the IP header; IPv6: from the TCP header on). The kernel
/// hands raw sockets a copy and handles the segment as usual.
struct Tap {
    sock: Socket,
    v6: bool,
}

impl Tap {
    fn open(v6: bool) -> Result<Tap> {
        let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
        let sock = Socket::new(domain, Type::RAW, Some(socket2::Protocol::TCP))
            .context("raw TCP socket (needs CAP_NET_RAW)")?;
        Ok(Tap { sock, v6 })
    }

    /// The next segment from port `sport` to port `dport` before
    /// `deadline`.
    fn next(&self, sport: u16, dport: u16, deadline: Instant) -> Result<Option<Segment>> {
        use std::io::Read as _;
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.sock
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
            let n = match (&self.sock).read(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(e).context("recv"),
            };
            let l4 = if self.v6 {
                0
            } else {
                usize::from(buf[0] & 0x0f) * 4
            };
            let t = &buf[l4.min(n)..n];
            if t.len() < 20 {
                continue;
            }
            let be16 = |i: usize| u16::from_be_bytes([t[i], t[i + 1]]);
            let be32 = |i: usize| u32::from_be_bytes([t[i], t[i + 1], t[i + 2], t[i + 3]]);
            let seg = Segment {
                sport: be16(0),
                dport: be16(2),
                seq: be32(4),
                ack: be32(8),
                flags: t[13],
                payload: t[(usize::from(t[12] >> 4) * 4).min(t.len())..].to_vec(),
            };
            if seg.sport == sport && seg.dport == dport {
                return Ok(Some(seg));
            }
        }
    }
}

/// The whole packet(s) carrying `t` from `src` to `dst`: behind a
/// destination options header of `dstopt` bytes (IPv6), or in two
/// fragments of `frag` = (first fragment's TCP bytes, id) (IPv4).
fn forge_packets(
    src: std::net::IpAddr,
    dst: std::net::IpAddr,
    t: &packet::Tcp,
    dstopt: Option<usize>,
    frag: Option<(usize, u16)>,
) -> Result<Vec<Vec<u8>>> {
    use std::net::IpAddr;
    let seg = t.bytes(src, dst);
    Ok(match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            if dstopt.is_some() {
                bail!("--dstopt: IPv6 only");
            }
            match frag {
                Some((first, id)) => {
                    if first == 0 || !first.is_multiple_of(8) || first >= seg.len() {
                        bail!(
                            "--frag {first}: a multiple of 8 below the segment's {} bytes",
                            seg.len()
                        );
                    }
                    packet::ipv4_fragments(s, d, id, packet::IPPROTO_TCP, &seg, first).to_vec()
                }
                None => vec![packet::ip_tcp(src, dst, t)],
            }
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            if frag.is_some() {
                bail!("--frag: IPv4 only");
            }
            let exts: Vec<packet::Ext> = match dstopt {
                Some(b) if (8..=2048).contains(&b) && b.is_multiple_of(8) => {
                    vec![packet::Ext::skippable(60, b / 8)]
                }
                Some(b) => bail!("--dstopt {b}: a multiple of 8 from 8 to 2048"),
                None => Vec::new(),
            };
            vec![packet::ipv6(s, d, &exts, packet::IPPROTO_TCP, &seg)]
        }
        _ => bail!("--from and ADDR: one address family"),
    })
}

/// How `handshake` sends its segments: every one behind a destination
/// options header of `dstopt` bytes (IPv6); the SYN with `syn_payload`
/// bytes, in two fragments (its first `frag.0` bytes in the first) of
/// datagram `frag.1` (IPv4).
struct Shape {
    dstopt: Option<usize>,
    frag: Option<(usize, u16)>,
    syn_payload: usize,
}

/// `handshake`: a TCP client on raw sockets; the data received (from the
/// first byte after the SYN-ACK) once it holds `expect`.
fn handshake(
    dst: SocketAddr,
    from: SocketAddr,
    shape: &Shape,
    send: &[u8],
    expect: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>> {
    let tap = Tap::open(dst.is_ipv6())?;
    let out = raw_socket(dst)?;
    let to: socket2::SockAddr = SocketAddr::new(dst.ip(), 0).into();
    let emit_as = |t: &packet::Tcp, frag: Option<(usize, u16)>| -> Result<()> {
        for p in forge_packets(from.ip(), dst.ip(), t, shape.dstopt, frag)? {
            out.send_to(&p, &to).context("sendto")?;
        }
        Ok(())
    };
    let emit = |t: &packet::Tcp| emit_as(t, None);
    let deadline = Instant::now() + timeout;
    let isn: u32 = 0x1000_0000;
    let mut syn = packet::Tcp::new(from.port(), dst.port(), packet::SYN);
    syn.seq = isn;
    // Data in a SYN is not acknowledged (no TCP Fast Open): it only makes
    // the segment long enough to fragment.
    syn.payload = vec![b'x'; shape.syn_payload];
    // Once a second until answered, as a kernel would retransmit (each
    // time a datagram of its own).
    let mut attempt: u16 = 0;
    let synack = loop {
        emit_as(
            &syn,
            shape.frag.map(|(n, id)| (n, id.wrapping_add(attempt))),
        )?;
        attempt += 1;
        let wait = (Instant::now() + Duration::from_secs(1)).min(deadline);
        if let Some(s) = tap.next(dst.port(), from.port(), wait)? {
            if s.flags & (packet::SYN | packet::ACK) == packet::SYN | packet::ACK {
                break s;
            }
            bail!(
                "answered with flags {} instead of SYN-ACK",
                flag_letters(s.flags)
            );
        }
        if Instant::now() >= deadline {
            bail!("no SYN-ACK within {timeout:?}");
        }
    };
    if synack.ack != isn.wrapping_add(1) {
        bail!("SYN-ACK acknowledges {}, not {}", synack.ack, isn + 1);
    }
    println!("synack");
    let irs = synack.seq.wrapping_add(1);
    let mut t = packet::Tcp::new(from.port(), dst.port(), packet::ACK);
    t.seq = isn.wrapping_add(1);
    t.ack = irs;
    emit(&t)?;
    t.flags = packet::PSH | packet::ACK;
    t.payload = send.to_vec();
    emit(&t)?;
    let data_sent = t.clone();
    t.seq = t.seq.wrapping_add(send.len() as u32);
    t.flags = packet::ACK;
    t.payload.clear();
    // What arrived, in sequence order (retransmissions overwrite).
    let mut got: Vec<u8> = Vec::new();
    let mut acked = false;
    while find(&got, expect).is_none() {
        let wait = (Instant::now() + Duration::from_secs(1)).min(deadline);
        match tap.next(dst.port(), from.port(), wait)? {
            Some(s) if s.flags & packet::RST != 0 => {
                bail!("reset after {:?}", String::from_utf8_lossy(&got))
            }
            Some(s) => {
                if s.flags & packet::ACK != 0 && s.ack.wrapping_sub(t.seq) as i32 >= 0 {
                    acked = true;
                }
                let off = s.seq.wrapping_sub(irs) as usize;
                if !s.payload.is_empty() && off <= got.len() {
                    let end = off + s.payload.len();
                    if end > got.len() {
                        got.resize(end, 0);
                    }
                    got[off..end].copy_from_slice(&s.payload);
                }
                t.ack = irs.wrapping_add(got.len() as u32);
                emit(&t)?;
            }
            None => {
                if Instant::now() >= deadline {
                    bail!(
                        "no {:?} within {timeout:?}; got {:?}",
                        String::from_utf8_lossy(expect),
                        String::from_utf8_lossy(&got)
                    );
                }
                if !acked {
                    emit(&data_sent)?;
                }
            }
        }
    }
    Ok(got)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

fn synflood(dst: SocketAddr, count: u64, limit: Duration, seed: u64) -> Result<String> {
    let std::net::IpAddr::V4(d) = dst.ip() else {
        bail!("synflood: IPv4 only");
    };
    let s = raw_socket(dst)?;
    let to: socket2::SockAddr = SocketAddr::new(dst.ip(), 0).into();
    let mut rng = packet::XorShift::new(seed);
    let start = Instant::now();
    let mut sent = 0;
    let mut t = packet::Tcp::new(0, dst.port(), packet::SYN);
    while sent < count && start.elapsed() < limit {
        let r = rng.next_u64();
        // 198.18.0.0/15
        let src = std::net::Ipv4Addr::from(0xc612_0000 | (r as u32 & 0x1_ffff));
        t.sport = 1024 + ((r >> 17) as u16 % 64000);
        t.seq = (r >> 33) as u32;
        let pkt = packet::ip_tcp(src.into(), d.into(), &t);
        match s.send_to(&pkt, &to) {
            Ok(_) => sent += 1,
            // The device queue is full: let it drain.
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => std::thread::yield_now(),
            Err(e) => return Err(e).context("sendto"),
        }
    }
    Ok(format!("sent {sent} in {} ms", start.elapsed().as_millis()))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args
        .first()
        .context("usage: lab-client echo|sink ADDR [options]")?
        .clone();
    let addr: SocketAddr = args.get(1).context("ADDR")?.parse()?;
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let bytes: usize = opt("--bytes")
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(1 << 20);
    let seed: u64 = opt("--seed").map(|v| v.parse()).transpose()?.unwrap_or(1);
    // forge and handshake: the payload of the (SYN) segment, and the IPv4
    // identification of a fragmented one.
    let payload: usize = opt("--payload")
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(0);
    let id: u16 = opt("--ip-id")
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(0x1234);
    match mode.as_str() {
        "pingpong" => {
            let rounds: usize = opt("--rounds")
                .map(|v| v.parse())
                .transpose()?
                .unwrap_or(1000);
            println!("{}", pingpong(addr, rounds, bytes, seed)?);
        }
        "echo" => {
            let conns: usize = opt("--conns").map(|v| v.parse()).transpose()?.unwrap_or(1);
            let bind: Option<SocketAddr> = opt("--bind").map(|v| v.parse()).transpose()?;
            // `--until-stdin`: set once a line arrives (the thread ends
            // with the process).
            let told = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let until = args.iter().any(|a| a == "--until-stdin").then_some(&*told);
            if until.is_some() {
                let told = told.clone();
                std::thread::spawn(move || {
                    let mut line = String::new();
                    let _ = std::io::stdin().read_line(&mut line);
                    told.store(true, std::sync::atomic::Ordering::SeqCst);
                });
            }
            let results: Vec<Result<String>> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..conns)
                    .map(|i| {
                        s.spawn(move || echo_one(i, addr, bind, bytes, seed + i as u64, until))
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let mut failed = false;
            for (i, r) in results.into_iter().enumerate() {
                match r {
                    Ok(line) => println!("{line}"),
                    Err(e) => {
                        failed = true;
                        println!("FAIL conn={i}: {e:#}");
                    }
                }
            }
            if failed {
                std::process::exit(1);
            }
        }
        "sink" => {
            let every: Option<usize> = opt("--pause-every").map(|v| v.parse()).transpose()?;
            let ms: u64 = opt("--pause-ms")
                .map(|v| v.parse())
                .transpose()?
                .unwrap_or(0);
            let how = if args.iter().any(|a| a == "--pause-stdin") {
                Pause::Stdin
            } else {
                Pause::Sleep(ms)
            };
            let sndbuf: Option<usize> = opt("--sndbuf").map(|v| v.parse()).transpose()?;
            let write_size: usize = opt("--write-size")
                .map(|v| v.parse())
                .transpose()?
                .unwrap_or(256 << 10);
            let read_size: Option<usize> = opt("--read-size").map(|v| v.parse()).transpose()?;
            if args.iter().any(|a| a == "--like-envoy") {
                let hold: u64 = opt("--hold-ms")
                    .map(|v| v.parse())
                    .transpose()?
                    .unwrap_or(0);
                let (line, conn) = sink_like_envoy(addr, bytes, seed)?;
                println!("{line}");
                std::io::Write::flush(&mut std::io::stdout())?;
                std::thread::sleep(Duration::from_millis(hold));
                drop(conn);
            } else {
                println!(
                    "{}",
                    sink(
                        addr,
                        bytes,
                        seed,
                        every.map(|e| (e, how)),
                        sndbuf,
                        write_size,
                        read_size
                    )?
                )
            }
        }
        "request" => {
            // COUNT <n>, n bytes, then wait for the answer without closing.
            let mut c = connect(addr, None)?;
            c.set_read_timeout(Some(Duration::from_secs(
                opt("--timeout-s")
                    .map(|v| v.parse())
                    .transpose()?
                    .unwrap_or(10),
            )))?;
            c.write_all(format!("COUNT {bytes}\n").as_bytes())?;
            let mut data = Stream::new(seed);
            let mut buf = vec![0u8; 64 * 1024];
            let mut sent = 0;
            while sent < bytes {
                let n = buf.len().min(bytes - sent);
                data.fill(&mut buf[..n]);
                c.write_all(&buf[..n])?;
                sent += n;
            }
            let mut line = String::new();
            BufReader::new(&c)
                .read_line(&mut line)
                .context("no answer (the app never read what was sent)")?;
            println!("{}", line.trim());
        }
        "synflood" => {
            let count: u64 = opt("--count").context("--count")?.parse()?;
            let secs: u64 = opt("--seconds")
                .map(|v| v.parse())
                .transpose()?
                .unwrap_or(20);
            println!(
                "{}",
                synflood(addr, count, Duration::from_secs(secs), seed)?
            );
        }
        "forge" => {
            let from: SocketAddr = opt("--from").context("--from")?.parse()?;
            let flags = match opt("--flags").context("--flags")?.as_str() {
                "syn" => packet::SYN,
                "rst" => packet::RST,
                "fin" => packet::FIN | packet::ACK,
                "ack" => packet::ACK,
                other => bail!("--flags {other:?}: syn, rst, fin or ack"),
            };
            let mut t = packet::Tcp::new(from.port(), addr.port(), flags);
            t.seq = opt("--seq").map(|v| v.parse()).transpose()?.unwrap_or(1);
            t.ack = opt("--ack").map(|v| v.parse()).transpose()?.unwrap_or(0);
            t.payload = vec![b'x'; payload];
            let frag: Option<usize> = opt("--frag").map(|v| v.parse()).transpose()?;
            let dstopt: Option<usize> = opt("--dstopt").map(|v| v.parse()).transpose()?;
            let listen: Option<u64> = opt("--listen-ms").map(|v| v.parse()).transpose()?;
            let until_reply = args.iter().any(|a| a == "--until-reply");
            let pkts = forge_packets(from.ip(), addr.ip(), &t, dstopt, frag.map(|f| (f, id)))?;
            // Open before sending: no answer can slip by.
            let tap = listen.map(|_| Tap::open(addr.is_ipv6())).transpose()?;
            for p in &pkts {
                send_raw(addr, p)?;
            }
            println!("sent");
            if let (Some(tap), Some(ms)) = (tap, listen) {
                let deadline = Instant::now() + Duration::from_millis(ms);
                let mut n = 0;
                while let Some(s) = tap.next(addr.port(), from.port(), deadline)? {
                    n += 1;
                    println!(
                        "reply flags={} seq={} ack={}",
                        flag_letters(s.flags),
                        s.seq,
                        s.ack
                    );
                    if until_reply {
                        break;
                    }
                }
                println!("replies {n}");
            }
        }
        "handshake" => {
            let from: SocketAddr = opt("--from").context("--from")?.parse()?;
            let send = opt("--send").context("--send")?;
            let expect = opt("--expect").context("--expect")?;
            let shape = Shape {
                dstopt: opt("--dstopt").map(|v| v.parse()).transpose()?,
                frag: opt("--frag")
                    .map(|v| v.parse())
                    .transpose()?
                    .map(|n| (n, id)),
                syn_payload: payload,
            };
            let secs: u64 = opt("--timeout-s")
                .map(|v| v.parse())
                .transpose()?
                .unwrap_or(20);
            let got = handshake(
                addr,
                from,
                &shape,
                send.as_bytes(),
                expect.as_bytes(),
                Duration::from_secs(secs),
            )?;
            println!("got {}", String::from_utf8_lossy(&got).escape_debug());
        }
        other => bail!("unknown mode {other:?}"),
    }
    Ok(())
}
