//! The lab's checking client, for runs that must happen inside the app's
//! cgroup (socket acceleration only applies to sockets in it).
//!
//!     lab-client echo ADDR --bytes N [--conns C] [--bind IP:PORT] [--seed S]
//!
//! Each connection writes N bytes of a seeded stream in writes of 1 B to
//! 1 MiB while a second thread reads the app's echo and checks every byte;
//! prints `ok conn=I bytes=N banner=...` per connection (or `FAIL ...`) and
//! exits non-zero on any failure.
//!
//!     lab-client sink ADDR --bytes N [--seed S] [--pause-every B --pause-ms MS] [--like-envoy]
//!
//! Writes N bytes (`SINK <seed>` first) as fast as it can, for a slow
//! reader, optionally pausing MS ms after every B bytes (bursts); prints
//! `ok bytes=N errors=…` with what the writes returned. `--like-envoy`:
//! a non-blocking writer that, as Envoy does, keeps buffering while TCP
//! refuses it (EAGAIN) and then writes all it holds in one call, so the
//! write after a refused one is larger than what was refused; with
//! `--hold-ms MS` it prints its line and keeps the connection open MS ms
//! more (its sockets' figures can then be read), after one last byte.
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
//!     lab-client forge ADDR --from IP:PORT --flags rst|fin|ack [--seq N] [--ack N]
//!
//! Sends one forged TCP segment from IP:PORT to ADDR (a blind RST, a
//! retransmitted FIN); prints `sent`.
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
    while sent < bytes {
        let n = sizes.next_size().min(bytes - sent);
        data.fill(&mut buf[..n]);
        w.write_all(&buf[..n])?;
        sent += n;
    }
    w.shutdown(Shutdown::Write)?;
    let (banner, got) = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    if got != bytes {
        bail!("sent {bytes} bytes, got {got} back");
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

fn sink(addr: SocketAddr, bytes: usize, seed: u64, pause: Option<(usize, u64)>) -> Result<String> {
    let mut c = connect(addr, None)?;
    c.write_all(format!("SINK {seed}\n").as_bytes())?;
    let mut data = Stream::new(seed);
    let mut buf = vec![0u8; 256 << 10];
    let (mut sent, mut errors) = (0, Vec::new());
    let t0 = Instant::now();
    while sent < bytes {
        let n = buf.len().min(bytes - sent);
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
        if let Some((every, ms)) = pause
            && sent % every < n
            && sent < bytes
        {
            std::thread::sleep(Duration::from_millis(ms));
        }
    }
    let wrote_in = t0.elapsed();
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

/// `sink --like-envoy`: the writer side of a proxy whose upstream is slow.
/// Up to 1 MiB buffered; each write offers all of it; after a short or
/// refused write, more is buffered before the next.
fn sink_like_envoy(addr: SocketAddr, bytes: usize, seed: u64) -> Result<(String, TcpStream)> {
    use std::os::fd::AsRawFd as _;
    let mut c = connect(addr, None)?;
    c.set_nonblocking(true)?;
    // With the length, the app answers without waiting for EOF, and the
    // connection stays open until this end closes it.
    let mut pending = format!("SINK {seed} {bytes}\n").into_bytes();
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
    match mode.as_str() {
        "echo" => {
            let conns: usize = opt("--conns").map(|v| v.parse()).transpose()?.unwrap_or(1);
            let bind: Option<SocketAddr> = opt("--bind").map(|v| v.parse()).transpose()?;
            let results: Vec<Result<String>> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..conns)
                    .map(|i| s.spawn(move || echo_one(i, addr, bind, bytes, seed + i as u64)))
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
                println!("{}", sink(addr, bytes, seed, every.map(|e| (e, ms)))?)
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
                "rst" => packet::RST,
                "fin" => packet::FIN | packet::ACK,
                "ack" => packet::ACK,
                other => bail!("--flags {other:?}: rst, fin or ack"),
            };
            let mut t = packet::Tcp::new(from.port(), addr.port(), flags);
            t.seq = opt("--seq").map(|v| v.parse()).transpose()?.unwrap_or(1);
            t.ack = opt("--ack").map(|v| v.parse()).transpose()?.unwrap_or(0);
            send_raw(addr, &packet::ip_tcp(from.ip(), addr.ip(), &t))?;
            println!("sent");
        }
        other => bail!("unknown mode {other:?}"),
    }
    Ok(())
}
