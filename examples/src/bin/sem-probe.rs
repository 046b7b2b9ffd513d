//! The semantic-equivalence probe: one application behaviour per scenario,
//! run once on an accelerated connection and once on a plain one, so a test
//! can compare what the app and its client observed. Each side prints one
//! line, `obs <observations>`, that must be identical in both runs (bytes,
//! return values, errno, notifications, wake-ups).
//!
//!     sem-probe app --ports 9000,9001 --scenario NAME   (one connection per port)
//!     sem-probe client --dst IP:PORT --scenario NAME
//!     sem-probe list                                     (the scenarios, one a line)
//!
//! Scenarios named `r-*` are the app reading in an unusual way, `w-*` the
//! app writing in one; the other side does plain reads and writes. The
//! client waits for the app's "R" before sending what a blocked reader
//! should see arrive in parts, so a reader is really waiting when the
//! first part comes.
use std::{
    io::{Read as _, Write as _},
    mem::size_of,
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// (name, what the app does)
const SCENARIOS: &[(&str, &str)] = &[
    (
        "r-waitall",
        "recv(MSG_WAITALL) of 10 bytes sent as 5 + 5, twice",
    ),
    (
        "r-waitall-timeout",
        "MSG_WAITALL with SO_RCVTIMEO: 5 + 5 in time, then 5 and a timeout",
    ),
    ("r-read-then-waitall", "plain reads first, then MSG_WAITALL"),
    ("r-peek", "MSG_PEEK, then a read"),
    ("r-oob", "recv(MSG_OOB) with no urgent data, then a read"),
    (
        "r-oobinline",
        "SO_OOBINLINE, with the client sending x, MSG_OOB Y, z",
    ),
    ("r-trunc", "recv(MSG_TRUNC) discards, then a read"),
    (
        "r-splice",
        "reads with splice(2) only, echoes 64 KiB through a pipe",
    ),
    (
        "r-read-then-splice",
        "reads 1 KiB with read(2), then splices the rest",
    ),
    ("r-tee", "splice into a pipe, tee(2) it, splice back"),
    (
        "r-read-then-splice-later",
        "a plain request and answer, then splice(2) for the rest",
    ),
    ("r-fionread", "FIONREAD once 100 bytes are there"),
    ("r-inq", "TCP_INQ control message on recvmsg"),
    (
        "r-rcvlowat",
        "SO_RCVLOWAT 10: poll and read with 5 + 5 arriving",
    ),
    (
        "r-epoll-et",
        "edge-triggered epoll, reads until EAGAIN, 4 MiB in bursts",
    ),
    (
        "r-epoll-lt",
        "level-triggered epoll, 1000-byte reads, 1 MiB",
    ),
    (
        "r-shut-rd",
        "shutdown(SHUT_RD) with data queued, then reads",
    ),
    (
        "r-close-unread",
        "close with unread data (TCP answers with RST)",
    ),
    ("r-linger0", "SO_LINGER 0 close after reading (RST)"),
    ("w-oob", "send x, MSG_OOB Y, z"),
    (
        "w-oob-later",
        "a plain request and answer, then x, MSG_OOB Y, z",
    ),
    (
        "w-zerocopy",
        "SO_ZEROCOPY + 3 MSG_ZEROCOPY sends, completion on the error queue",
    ),
    ("w-splice", "64 KiB written through a pipe with splice(2)"),
    ("w-sendfile", "256 KiB with sendfile(2)"),
    ("w-cork", "TCP_CORK around three small writes"),
    ("w-msg-more", "MSG_MORE on two of three small sends"),
    (
        "w-shut-wr",
        "shutdown(SHUT_WR), then reads the client's answer",
    ),
    (
        "w-outq",
        "SIOCOUTQ drains to 0 once the peer took the bytes",
    ),
    (
        "w-nonblock",
        "8 MiB non-blocking with edge-triggered EPOLLOUT to a slow client",
    ),
    (
        "r-ktls",
        "a TLS handshake from the first byte, then kTLS both ways, a record queued before TLS_RX",
    ),
    (
        "r-ktls-at-once",
        "a TLS handshake, then kTLS at once after the app's last handshake send, as a library does",
    ),
    (
        "r-starttls-ktls",
        "plain exchanges, then a TLS handshake and kTLS (STARTTLS), a record queued before TLS_RX",
    ),
    (
        "r-io-uring",
        "io_uring recv, twice, with the second part arriving later",
    ),
    ("w-io-uring", "io_uring send of three messages"),
];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |k: &str| -> Option<&str> {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
            .map(String::as_str)
    };
    match args.first().map(String::as_str) {
        Some("list") => {
            for (n, what) in SCENARIOS {
                println!("{n}\t{what}");
            }
            Ok(())
        }
        Some("app") => {
            let scenario = scenario(get("--scenario"))?;
            let ports: Vec<u16> = get("--ports")
                .context("--ports needed")?
                .split(',')
                .map(|p| p.parse().context("bad port"))
                .collect::<Result<_>>()?;
            app(scenario, &ports)
        }
        Some("client") => {
            let scenario = scenario(get("--scenario"))?;
            let dst: SocketAddr = get("--dst").context("--dst needed")?.parse()?;
            let s = TcpStream::connect_timeout(&dst, Duration::from_secs(30))?;
            let obs = client(scenario, s);
            println!("obs {obs}");
            Ok(())
        }
        _ => bail!(
            "usage: sem-probe app --ports P,.. --scenario S | client --dst A --scenario S | list"
        ),
    }
}

fn scenario(s: Option<&str>) -> Result<&'static str> {
    let s = s.context("--scenario needed")?;
    SCENARIOS
        .iter()
        .find(|(n, _)| *n == s)
        .map(|(n, _)| *n)
        .with_context(|| format!("unknown scenario {s:?} (sem-probe list)"))
}

/// One listener per port (v4 and v6), one connection each, observed in
/// its own thread; prints `obs PORT ...` per connection.
fn app(scenario: &'static str, ports: &[u16]) -> Result<()> {
    let mut listeners = Vec::new();
    for &p in ports {
        let v4 = TcpListener::bind(("0.0.0.0", p))?;
        let v6 = tproxy_examples::listener(SocketAddr::from(([0u16; 8], p)), false)?;
        v6.set_nonblocking(false)?;
        listeners.push((p, v4, v6));
    }
    println!("listening");
    std::io::stdout().flush()?;
    std::thread::scope(|sc| {
        for (p, v4, v6) in &listeners {
            sc.spawn(move || {
                let s = accept_either(v4, v6);
                let obs = match s {
                    Ok(s) => app_side(scenario, s),
                    Err(e) => format!("accept: {e}"),
                };
                println!("obs {p} {obs}");
                let _ = std::io::stdout().flush();
            });
        }
    });
    Ok(())
}

fn accept_either(v4: &TcpListener, v6: &TcpListener) -> std::io::Result<TcpStream> {
    let mut fds = [
        libc::pollfd {
            fd: v4.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: v6.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: two pollfds of ours.
    if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if fds[0].revents != 0 {
        v4.accept().map(|(s, _)| s)
    } else {
        v6.accept().map(|(s, _)| s)
    }
}

// ---- small syscall wrappers: results as text, errno by name ----

fn errno_name(e: i32) -> String {
    match e {
        libc::EAGAIN => "EAGAIN".into(),
        libc::EINVAL => "EINVAL".into(),
        libc::ECONNRESET => "ECONNRESET".into(),
        libc::EPIPE => "EPIPE".into(),
        libc::ENOENT => "ENOENT".into(),
        libc::ENOTCONN => "ENOTCONN".into(),
        libc::EFAULT => "EFAULT".into(),
        libc::ENOPROTOOPT => "ENOPROTOOPT".into(),
        libc::EOPNOTSUPP => "EOPNOTSUPP".into(),
        libc::EBADMSG => "EBADMSG".into(),
        libc::EIO => "EIO".into(),
        e => format!("errno{e}"),
    }
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn fd(s: &TcpStream) -> i32 {
    s.as_raw_fd()
}

fn recv(s: &TcpStream, len: usize, flags: i32) -> Result<Vec<u8>, i32> {
    let mut buf = vec![0u8; len];
    // SAFETY: recv into our buffer of `len` bytes.
    let n = unsafe { libc::recv(fd(s), buf.as_mut_ptr().cast(), len, flags) };
    if n < 0 {
        return Err(last_errno());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

fn send(s: &TcpStream, data: &[u8], flags: i32) -> Result<usize, i32> {
    // SAFETY: send from our buffer.
    let n = unsafe {
        libc::send(
            fd(s),
            data.as_ptr().cast(),
            data.len(),
            flags | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(last_errno())
    } else {
        Ok(n as usize)
    }
}

fn show(r: &Result<Vec<u8>, i32>) -> String {
    match r {
        Ok(v) if v.len() <= 32 => format!("{}:{:?}", v.len(), String::from_utf8_lossy(v)),
        Ok(v) => format!("{}:#{:016x}", v.len(), fnv(v)),
        Err(e) => errno_name(*e),
    }
}

fn fnv(v: &[u8]) -> u64 {
    v.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn setsockopt_int(s: &TcpStream, level: i32, name: i32, v: i32) -> Result<(), i32> {
    // SAFETY: setsockopt with an int on our own socket.
    let r = unsafe {
        libc::setsockopt(
            fd(s),
            level,
            name,
            (&raw const v).cast(),
            size_of::<i32>() as u32,
        )
    };
    if r == 0 { Ok(()) } else { Err(last_errno()) }
}

fn ioctl_int(s: &TcpStream, req: libc::c_ulong) -> Result<i32, i32> {
    let mut v: i32 = 0;
    // SAFETY: an int-valued socket ioctl into our int.
    let r = unsafe { libc::ioctl(fd(s), req, &raw mut v) };
    if r == 0 { Ok(v) } else { Err(last_errno()) }
}

/// Waits for `events` on `fd`; returns revents (0 on timeout) and the wait.
fn poll(fd: i32, events: i16, timeout: Duration) -> (i16, Duration) {
    let t0 = Instant::now();
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one pollfd of ours.
    let _ = unsafe { libc::poll(&raw mut p, 1, timeout.as_millis() as i32) };
    (p.revents, t0.elapsed())
}

fn readable(s: &TcpStream) {
    poll(fd(s), libc::POLLIN, Duration::from_secs(30));
}

/// The deterministic stream both ends check long transfers against.
fn pattern(off: usize, len: usize) -> Vec<u8> {
    (off..off + len)
        .map(|i| (i.wrapping_mul(7) ^ (i >> 9)) as u8)
        .collect()
}

fn read_to_end(mut s: &TcpStream) -> Result<Vec<u8>, i32> {
    let mut all = Vec::new();
    match s.read_to_end(&mut all) {
        Ok(_) => Ok(all),
        Err(e) => Err(e.raw_os_error().unwrap_or(0)),
    }
}

fn read_exact(mut s: &TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    let mut got = 0;
    while got < n {
        match s.read(&mut buf[got..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => got += k,
        }
    }
    buf.truncate(got);
    buf
}

fn wait_r(s: &TcpStream) {
    let _ = read_exact(s, 1);
}

fn pause(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

// ---- the app side ----

fn app_side(scenario: &str, s: TcpStream) -> String {
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let mut o: Vec<String> = Vec::new();
    match scenario {
        "r-waitall" => {
            for _ in 0..2 {
                let _ = send(&s, b"R", 0);
                o.push(show(&recv(&s, 10, libc::MSG_WAITALL)));
            }
        }
        "r-waitall-timeout" => {
            let _ = s.set_read_timeout(Some(Duration::from_millis(1500)));
            let _ = send(&s, b"R", 0);
            o.push(show(&recv(&s, 10, libc::MSG_WAITALL)));
            let _ = send(&s, b"R", 0);
            let t0 = Instant::now();
            o.push(show(&recv(&s, 10, libc::MSG_WAITALL)));
            o.push(format!(
                "waited-for-timeout={}",
                t0.elapsed() >= Duration::from_millis(1200)
            ));
        }
        "r-read-then-waitall" => {
            for _ in 0..3 {
                let _ = send(&s, b"R", 0);
                readable(&s);
                pause(50);
                o.push(show(&recv(&s, 64, 0)));
            }
            for _ in 0..2 {
                let _ = send(&s, b"R", 0);
                o.push(show(&recv(&s, 10, libc::MSG_WAITALL)));
            }
        }
        "r-peek" => {
            readable(&s);
            pause(50);
            o.push(show(&recv(&s, 64, libc::MSG_PEEK)));
            o.push(show(&recv(&s, 64, 0)));
        }
        "r-oob" => {
            readable(&s);
            pause(50);
            o.push(show(&recv(&s, 1, libc::MSG_OOB)));
            o.push(show(&recv(&s, 64, 0)));
        }
        "r-oobinline" => {
            o.push(format!(
                "{:?}",
                setsockopt_int(&s, libc::SOL_SOCKET, libc::SO_OOBINLINE, 1)
            ));
            let _ = send(&s, b"R", 0);
            o.push(show(&read_to_end(&s)));
        }
        "r-trunc" => {
            readable(&s);
            pause(50);
            let mut buf = [b'#'; 5];
            // SAFETY: recv into our 5-byte buffer.
            let n = unsafe { libc::recv(fd(&s), buf.as_mut_ptr().cast(), 5, libc::MSG_TRUNC) };
            let r = if n < 0 {
                errno_name(last_errno())
            } else {
                n.to_string()
            };
            o.push(format!("{r} buf={:?}", String::from_utf8_lossy(&buf)));
            o.push(show(&recv(&s, 64, 0)));
        }
        "r-splice" => o.push(splice_echo(&s, 0)),
        "r-read-then-splice" => o.push(splice_echo(&s, 1024)),
        "r-tee" => o.push(tee_echo(&s)),
        "r-read-then-splice-later" => {
            o.push(exchange_first(&s));
            o.push(splice_echo(&s, 0));
        }
        "r-fionread" => {
            readable(&s);
            pause(50);
            o.push(format!("fionread={:?}", ioctl_int(&s, libc::FIONREAD)));
            o.push(show(&recv(&s, 200, 0)));
        }
        "r-inq" => {
            o.push(format!(
                "{:?}",
                setsockopt_int(&s, libc::IPPROTO_TCP, libc::TCP_INQ, 1)
            ));
            readable(&s);
            pause(50);
            o.push(recv_inq(&s, 40));
            o.push(recv_inq(&s, 100));
        }
        "r-rcvlowat" => {
            o.push(format!(
                "{:?}",
                setsockopt_int(&s, libc::SOL_SOCKET, libc::SO_RCVLOWAT, 10)
            ));
            let _ = send(&s, b"R", 0);
            let (ev, waited) = poll(fd(&s), libc::POLLIN, Duration::from_secs(5));
            o.push(format!(
                "poll={ev} after-second-part={}",
                waited >= Duration::from_millis(200)
            ));
            o.push(show(&recv(&s, 64, 0)));
        }
        "r-epoll-et" => o.push(epoll_read(&s, true, 4 << 20, 1 << 16)),
        "r-epoll-lt" => o.push(epoll_read(&s, false, 1 << 20, 1000)),
        "r-shut-rd" => {
            readable(&s);
            pause(50);
            o.push(format!(
                "{:?}",
                s.shutdown(Shutdown::Read).map_err(|e| e.raw_os_error())
            ));
            o.push(show(&recv(&s, 64, 0)));
            o.push(show(&recv(&s, 64, 0)));
            let _ = send(&s, b"bye", 0);
        }
        "r-close-unread" => {
            readable(&s);
            pause(100);
            drop(s);
            return "closed".into();
        }
        "r-linger0" => {
            o.push(show(&recv(&s, 64, 0)));
            let l = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: setsockopt with a struct linger on our socket.
            unsafe {
                libc::setsockopt(
                    fd(&s),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&raw const l).cast(),
                    size_of::<libc::linger>() as u32,
                )
            };
            drop(s);
            return o.join(" | ");
        }
        "w-oob" => {
            o.push(format!("{:?}", send(&s, b"x", 0)));
            o.push(format!("{:?}", send(&s, b"Y", libc::MSG_OOB)));
            o.push(format!("{:?}", send(&s, b"z", 0)));
            let _ = s.shutdown(Shutdown::Write);
            o.push(show(&read_to_end(&s)));
        }
        "w-oob-later" => {
            o.push(exchange_first(&s));
            // Until the proxy has read the answer: later sends are
            // redirected.
            pause(100);
            o.push(format!("{:?}", send(&s, b"x", 0)));
            o.push(format!("{:?}", send(&s, b"Y", libc::MSG_OOB)));
            o.push(format!("{:?}", send(&s, b"z", 0)));
            let _ = s.shutdown(Shutdown::Write);
            o.push(show(&read_to_end(&s)));
        }
        "w-zerocopy" => o.push(zerocopy(&s)),
        "w-splice" => o.push(splice_write(&s)),
        "w-sendfile" => o.push(sendfile(&s)),
        "w-cork" => {
            o.push(format!(
                "{:?}",
                setsockopt_int(&s, libc::IPPROTO_TCP, libc::TCP_CORK, 1)
            ));
            for b in [b"a", b"b", b"c"] {
                let _ = send(&s, b, 0);
            }
            o.push(format!(
                "{:?}",
                setsockopt_int(&s, libc::IPPROTO_TCP, libc::TCP_CORK, 0)
            ));
            let _ = s.shutdown(Shutdown::Write);
            o.push(show(&read_to_end(&s)));
        }
        "w-msg-more" => {
            let _ = send(&s, b"a", libc::MSG_MORE);
            let _ = send(&s, b"b", libc::MSG_MORE);
            let _ = send(&s, b"c", 0);
            let _ = s.shutdown(Shutdown::Write);
            o.push(show(&read_to_end(&s)));
        }
        "w-shut-wr" => {
            let _ = send(&s, b"hello", 0);
            o.push(format!(
                "{:?}",
                s.shutdown(Shutdown::Write).map_err(|e| e.raw_os_error())
            ));
            o.push(show(&read_to_end(&s)));
        }
        "w-outq" => {
            let _ = send(&s, &pattern(0, 1000), 0);
            let t0 = Instant::now();
            let mut q = ioctl_int(&s, libc::TIOCOUTQ);
            while q != Ok(0) && t0.elapsed() < Duration::from_secs(5) {
                pause(5);
                q = ioctl_int(&s, libc::TIOCOUTQ);
            }
            o.push(format!("outq-drained={:?}", q));
            let _ = s.shutdown(Shutdown::Write);
            o.push(show(&read_to_end(&s)));
        }
        "w-nonblock" => o.push(nonblock_write(&s, 8 << 20)),
        "r-io-uring" => {
            for _ in 0..2 {
                let _ = send(&s, b"R", 0);
                o.push(uring(&s, None));
            }
        }
        "w-io-uring" => {
            for part in [&b"one"[..], b"two", b"three"] {
                o.push(uring(&s, Some(part)));
            }
            let _ = s.shutdown(Shutdown::Write);
            o.push(show(&read_to_end(&s)));
        }
        "r-ktls" | "r-starttls-ktls" => {
            if scenario == "r-starttls-ktls" {
                // Twice: the second round is redirected.
                o.push(exchange_first(&s));
                o.push(exchange_first(&s));
            }
            // The handshake in userspace, with plain calls.
            let hello = read_exact(&s, handshake_record(b"client").len());
            o.push(show(&Ok(hello)));
            let _ = send(&s, &handshake_record(b"server"), 0);
            // The client's first record is on its way meanwhile: queued
            // before this socket reads records (as a TLS 1.3 client's data
            // may follow its Finished at once).
            pause(300);
            o.push(ktls(&s, KEY_APP, KEY_CLIENT));
            o.push(show(&recv(&s, 64, 0)));
            let _ = send(&s, b"answer", 0);
            o.push(show(&read_to_end(&s)));
        }
        "r-ktls-at-once" => {
            let hello = read_exact(&s, handshake_record(b"client").len());
            o.push(show(&Ok(hello)));
            // The handshake's last send and kTLS right behind it, before
            // the pair can have left the SOCKHASH.
            let _ = send(&s, &handshake_record(b"server"), 0);
            o.push(ktls(&s, KEY_APP, KEY_CLIENT));
            let _ = send(&s, b"answer", 0);
            o.push(show(&recv(&s, 64, 0)));
            o.push(show(&read_to_end(&s)));
        }
        _ => unreachable!(),
    }
    o.join(" | ")
}

/// A record like the one a TLS handshake opens with (handshake, version
/// 3.1, its length), carrying `body`.
fn handshake_record(body: &[u8]) -> Vec<u8> {
    let mut r = vec![0x16, 0x03, 0x01, 0, body.len() as u8];
    r.extend_from_slice(body);
    r
}

/// The key each end sends with (the other receives with it).
const KEY_CLIENT: u8 = 1;
const KEY_APP: u8 = 2;

/// kTLS on `s` as a TLS library enables it after its handshake: the ULP,
/// then fixed AES-GCM-128 keys (TLS 1.2) for sending and for receiving.
/// "ktls=ok", or the first call's errno (ENOENT where the kernel has no
/// CONFIG_TLS).
fn ktls(s: &TcpStream, tx: u8, rx: u8) -> String {
    // SAFETY: setsockopt TCP_ULP with its name; the length excludes the NUL.
    let r = unsafe {
        libc::setsockopt(
            fd(s),
            libc::IPPROTO_TCP,
            libc::TCP_ULP,
            c"tls".as_ptr().cast(),
            3,
        )
    };
    if r != 0 {
        return format!("ulp={}", errno_name(last_errno()));
    }
    const SOL_TLS: i32 = 282;
    for (dir, name, k) in [(1, "tx", tx), (2, "rx", rx)] {
        // struct tls12_crypto_info_aes_gcm_128: version (TLS 1.2), cipher
        // (AES-GCM-128 = 51), iv[8], key[16], salt[4], rec_seq[8].
        let mut info = vec![0x03, 0x03, 51, 0];
        info.extend([k; 8]);
        info.extend([k.wrapping_add(0x10); 16]);
        info.extend([k.wrapping_add(0x20); 4]);
        info.extend([0u8; 8]);
        // SAFETY: setsockopt with our buffer and its length.
        let r = unsafe {
            libc::setsockopt(fd(s), SOL_TLS, dir, info.as_ptr().cast(), info.len() as u32)
        };
        if r != 0 {
            return format!("{name}={}", errno_name(last_errno()));
        }
    }
    "ktls=ok".into()
}

/// A first request and answer with plain calls (the client sends "hello",
/// the app answers "hi"), so both ends of the accelerated leg have read
/// once before the scenario's own calls.
fn exchange_first(s: &TcpStream) -> String {
    let got = read_exact(s, 5);
    let _ = send(s, b"hi", 0);
    format!("first={:?}", String::from_utf8_lossy(&got))
}

/// One io_uring recv of up to 64 bytes (`data`: None) or send of `data`;
/// its completion's result.
fn uring(s: &TcpStream, data: Option<&[u8]>) -> String {
    use io_uring::{IoUring, opcode, types};
    let Ok(mut ring) = IoUring::new(4) else {
        return "no io_uring".into();
    };
    let mut buf = [0u8; 64];
    let fd = types::Fd(fd(s));
    let entry = match data {
        None => opcode::Recv::new(fd, buf.as_mut_ptr(), buf.len() as u32).build(),
        Some(d) => opcode::Send::new(fd, d.as_ptr(), d.len() as u32).build(),
    };
    // SAFETY: the buffer outlives the operation: we wait for its completion
    // below before returning.
    if unsafe { ring.submission().push(&entry) }.is_err() || ring.submit_and_wait(1).is_err() {
        return "submit failed".into();
    }
    match ring.completion().next().map(|c| c.result()) {
        Some(n) if n >= 0 && data.is_none() => show(&Ok(buf[..n as usize].to_vec())),
        Some(n) if n >= 0 => n.to_string(),
        Some(e) => errno_name(-e),
        None => "no completion".into(),
    }
}

fn pipe() -> (i32, i32) {
    let mut p = [0i32; 2];
    // SAFETY: pipe2 into our array.
    unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) };
    (p[0], p[1])
}

/// Echoes what the client sends: `first` bytes with read(2)/write(2), the
/// rest socket -> pipe -> socket with splice(2), until EOF.
fn splice_echo(s: &TcpStream, first: usize) -> String {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut o = Vec::new();
    if first > 0 {
        let b = read_exact(s, first);
        o.push(format!("read={}", b.len()));
        let mut w = s;
        let _ = w.write_all(&b);
    }
    let (r, w) = pipe();
    let mut total = 0usize;
    let mut errors = Vec::new();
    loop {
        // SAFETY: splice between our socket and our pipe.
        let n = unsafe {
            libc::splice(
                fd(s),
                std::ptr::null_mut(),
                w,
                std::ptr::null_mut(),
                65536,
                0,
            )
        };
        if n < 0 {
            errors.push(errno_name(last_errno()));
            break;
        }
        if n == 0 {
            break;
        }
        total += n as usize;
        let mut left = n as usize;
        while left > 0 {
            // SAFETY: as above, pipe to socket.
            let m = unsafe {
                libc::splice(
                    r,
                    std::ptr::null_mut(),
                    fd(s),
                    std::ptr::null_mut(),
                    left,
                    0,
                )
            };
            if m <= 0 {
                errors.push(format!("out:{}", errno_name(last_errno())));
                break;
            }
            left -= m as usize;
        }
    }
    let _ = s.shutdown(Shutdown::Write);
    // SAFETY: our pipe's fds.
    unsafe {
        libc::close(r);
        libc::close(w);
    }
    o.push(format!("spliced={total} errors={errors:?}"));
    o.join(" ")
}

fn tee_echo(s: &TcpStream) -> String {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let (r1, w1) = pipe();
    let (r2, w2) = pipe();
    let mut teed = Vec::new();
    let mut err = String::new();
    loop {
        // SAFETY: splice/tee/read between our fds.
        let n = unsafe {
            libc::splice(
                fd(s),
                std::ptr::null_mut(),
                w1,
                std::ptr::null_mut(),
                65536,
                0,
            )
        };
        if n <= 0 {
            if n < 0 {
                err = errno_name(last_errno());
            }
            break;
        }
        // SAFETY: as above.
        let t = unsafe { libc::tee(r1, w2, n as usize, 0) };
        let mut buf = vec![0u8; t.max(0) as usize];
        // SAFETY: read from our pipe into our buffer.
        let k = unsafe { libc::read(r2, buf.as_mut_ptr().cast(), buf.len()) };
        teed.extend_from_slice(&buf[..k.max(0) as usize]);
        let mut left = n as usize;
        while left > 0 {
            // SAFETY: as above.
            let m = unsafe {
                libc::splice(
                    r1,
                    std::ptr::null_mut(),
                    fd(s),
                    std::ptr::null_mut(),
                    left,
                    0,
                )
            };
            if m <= 0 {
                break;
            }
            left -= m as usize;
        }
    }
    let _ = s.shutdown(Shutdown::Write);
    // SAFETY: our pipes' fds.
    unsafe {
        for f in [r1, w1, r2, w2] {
            libc::close(f);
        }
    }
    format!(
        "teed={} exact={} err={err:?}",
        teed.len(),
        teed == pattern(0, teed.len())
    )
}

/// recvmsg of `len` bytes; the TCP_CM_INQ control message's value, if any.
fn recv_inq(s: &TcpStream, len: usize) -> String {
    let mut buf = vec![0u8; len];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    };
    let mut cbuf = [0u64; 16];
    // SAFETY: a zeroed msghdr pointing at our buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<[u64; 16]>();
    // SAFETY: recvmsg with the msghdr above.
    let n = unsafe { libc::recvmsg(fd(s), &raw mut msg, 0) };
    if n < 0 {
        return errno_name(last_errno());
    }
    let mut inq = None;
    // SAFETY: walking the control messages the kernel wrote into cbuf.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::IPPROTO_TCP && (*c).cmsg_type == libc::TCP_CM_INQ {
                inq = Some(std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<i32>()));
            }
            c = libc::CMSG_NXTHDR(&raw const msg, c);
        }
    }
    format!("{n} inq={inq:?}")
}

fn epoll_read(s: &TcpStream, edge: bool, total: usize, chunk: usize) -> String {
    let _ = s.set_nonblocking(true);
    // SAFETY: a new epoll fd with our socket in it.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    let mut ev = libc::epoll_event {
        events: (libc::EPOLLIN | if edge { libc::EPOLLET } else { 0 }) as u32,
        u64: 0,
    };
    // SAFETY: as above.
    unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd(s), &raw mut ev) };
    let mut got = 0usize;
    let mut ok = true;
    let mut buf = vec![0u8; chunk];
    let mut stalled = false;
    while got < total {
        let mut out = [libc::epoll_event { events: 0, u64: 0 }; 1];
        // SAFETY: wait on our epoll fd.
        let n = unsafe { libc::epoll_wait(ep, out.as_mut_ptr(), 1, 5000) };
        if n == 0 {
            stalled = true;
            break;
        }
        loop {
            // SAFETY: read into our buffer.
            let k = unsafe { libc::read(fd(s), buf.as_mut_ptr().cast(), chunk) };
            if k <= 0 {
                break;
            }
            ok &= buf[..k as usize] == pattern(got, k as usize)[..];
            got += k as usize;
            if !edge {
                break;
            }
        }
    }
    // SAFETY: our epoll fd.
    unsafe { libc::close(ep) };
    let _ = s.set_nonblocking(false);
    let _ = send(s, b"done", 0);
    format!("got={got} exact={ok} stalled={stalled}")
}

fn zerocopy(s: &TcpStream) -> String {
    let mut o = Vec::new();
    o.push(format!(
        "{:?}",
        setsockopt_int(s, libc::SOL_SOCKET, libc::SO_ZEROCOPY, 1)
    ));
    let data = pattern(0, 4096);
    for _ in 0..3 {
        o.push(format!("{:?}", send(s, &data, libc::MSG_ZEROCOPY)));
    }
    // The notifications: ranges of completed sends, on the error queue.
    let mut done: Vec<(u32, u32)> = Vec::new();
    let t0 = Instant::now();
    while !done.iter().any(|d| d.1 == 2) && t0.elapsed() < Duration::from_secs(3) {
        let (ev, _) = poll(fd(s), 0, Duration::from_millis(200));
        if ev & libc::POLLERR == 0 {
            continue;
        }
        let mut cbuf = [0u64; 16];
        // SAFETY: a zeroed msghdr with only a control buffer.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = size_of::<[u64; 16]>();
        // SAFETY: recvmsg of the error queue into the msghdr above.
        if unsafe { libc::recvmsg(fd(s), &raw mut msg, libc::MSG_ERRQUEUE) } < 0 {
            continue;
        }
        // SAFETY: the control messages the kernel wrote.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&raw const msg);
            if !c.is_null() {
                let e =
                    std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::sock_extended_err>());
                if e.ee_origin == 5
                /* SO_EE_ORIGIN_ZEROCOPY */
                {
                    done.push((e.ee_info, e.ee_data));
                }
            }
        }
    }
    // The kernel may report the three in one range or several.
    let covered: Vec<u32> = (0..3)
        .filter(|i| done.iter().any(|&(lo, hi)| lo <= *i && *i <= hi))
        .collect();
    o.push(format!("completed={covered:?}"));
    let _ = s.shutdown(Shutdown::Write);
    o.push(show(&read_to_end(s)));
    o.join(" | ")
}

fn splice_write(s: &TcpStream) -> String {
    let (r, w) = pipe();
    let data = pattern(0, 65536);
    let mut sent = 0usize;
    while sent < data.len() {
        let part = &data[sent..(sent + 16384).min(data.len())];
        // SAFETY: write to our pipe, splice it to our socket.
        let k = unsafe { libc::write(w, part.as_ptr().cast(), part.len()) };
        let m = unsafe {
            libc::splice(
                r,
                std::ptr::null_mut(),
                fd(s),
                std::ptr::null_mut(),
                k as usize,
                0,
            )
        };
        if m <= 0 {
            break;
        }
        sent += m as usize;
    }
    // SAFETY: our pipe's fds.
    unsafe {
        libc::close(r);
        libc::close(w);
    }
    let _ = s.shutdown(Shutdown::Write);
    format!("spliced={sent} | {}", show(&read_to_end(s)))
}

fn sendfile(s: &TcpStream) -> String {
    let path = std::env::temp_dir().join(format!("sem-probe-{}", std::process::id()));
    let data = pattern(0, 256 << 10);
    let _ = std::fs::write(&path, &data);
    let f = std::fs::File::open(&path);
    let _ = std::fs::remove_file(&path);
    let Ok(f) = f else { return "no file".into() };
    let mut off: libc::off_t = 0;
    let mut sent = 0usize;
    while sent < data.len() {
        // SAFETY: sendfile from our file to our socket.
        let n = unsafe { libc::sendfile(fd(s), f.as_raw_fd(), &raw mut off, data.len() - sent) };
        if n <= 0 {
            break;
        }
        sent += n as usize;
    }
    let _ = s.shutdown(Shutdown::Write);
    format!("sent={sent} | {}", show(&read_to_end(s)))
}

fn nonblock_write(s: &TcpStream, total: usize) -> String {
    let _ = s.set_nonblocking(true);
    // SAFETY: a new epoll fd with our socket in it.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    let mut ev = libc::epoll_event {
        events: (libc::EPOLLOUT | libc::EPOLLET) as u32,
        u64: 0,
    };
    // SAFETY: as above.
    unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd(s), &raw mut ev) };
    let mut sent = 0usize;
    let mut stalled = false;
    while sent < total {
        let part = pattern(sent, (total - sent).min(1 << 16));
        match send(s, &part, 0) {
            Ok(n) => sent += n,
            Err(libc::EAGAIN) => {
                let mut out = [libc::epoll_event { events: 0, u64: 0 }; 1];
                // SAFETY: wait on our epoll fd.
                if unsafe { libc::epoll_wait(ep, out.as_mut_ptr(), 1, 10_000) } == 0 {
                    stalled = true;
                    break;
                }
            }
            Err(_) => break,
        }
    }
    // SAFETY: our epoll fd.
    unsafe { libc::close(ep) };
    let _ = s.set_nonblocking(false);
    let _ = s.shutdown(Shutdown::Write);
    format!("sent={sent} stalled={stalled} | {}", show(&read_to_end(s)))
}

// ---- the client side: plain reads and writes ----

fn client(scenario: &str, s: TcpStream) -> String {
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let mut w = &s;
    let mut o: Vec<String> = Vec::new();
    match scenario {
        "r-waitall" => {
            for _ in 0..2 {
                wait_r(&s);
                let _ = w.write_all(b"01234");
                pause(300);
                let _ = w.write_all(b"56789");
            }
        }
        "r-waitall-timeout" => {
            wait_r(&s);
            let _ = w.write_all(b"01234");
            pause(300);
            let _ = w.write_all(b"56789");
            wait_r(&s);
            let _ = w.write_all(b"abcde");
        }
        "r-read-then-waitall" => {
            for i in 0..3 {
                wait_r(&s);
                let _ = w.write_all(format!("plain{i}").as_bytes());
            }
            for _ in 0..2 {
                wait_r(&s);
                let _ = w.write_all(b"01234");
                pause(300);
                let _ = w.write_all(b"56789");
            }
        }
        "r-peek" | "r-oob" | "r-trunc" => {
            let _ = w.write_all(b"0123456789");
        }
        "r-read-then-splice-later" => {
            let _ = w.write_all(b"hello");
            o.push(show(&Ok(read_exact(&s, 2))));
            // The rest in parts, as a stream: the proxy's later sends are
            // the redirected ones.
            let data = pattern(0, 65536);
            for part in data.chunks(4096) {
                let _ = w.write_all(part);
                pause(1);
            }
            let _ = s.shutdown(Shutdown::Write);
            let back = read_to_end(&s);
            let exact = back.as_ref().map(|b| *b == data).unwrap_or(false);
            o.push(format!("{} exact={exact}", show(&back)));
        }
        "r-splice" | "r-read-then-splice" | "r-tee" => {
            let data = pattern(0, 65536);
            let _ = w.write_all(&data);
            let _ = s.shutdown(Shutdown::Write);
            let back = read_to_end(&s);
            let exact = back.as_ref().map(|b| *b == data).unwrap_or(false);
            o.push(format!("{} exact={exact}", show(&back)));
        }
        "r-fionread" | "r-inq" => {
            let _ = w.write_all(&pattern(0, 100));
        }
        "r-rcvlowat" => {
            wait_r(&s);
            let _ = w.write_all(b"01234");
            pause(300);
            let _ = w.write_all(b"56789");
        }
        "r-epoll-et" | "r-epoll-lt" => {
            let total = if scenario == "r-epoll-et" {
                4 << 20
            } else {
                1 << 20
            };
            let mut off = 0;
            let mut i = 0usize;
            while off < total {
                let n = [1, 100, 4096, 65536, 200_000, 7][i % 6].min(total - off);
                let _ = w.write_all(&pattern(off, n));
                off += n;
                i += 1;
                if i.is_multiple_of(16) {
                    pause(2);
                }
            }
            o.push(show(&Ok(read_exact(&s, 4))));
        }
        "r-shut-rd" => {
            let _ = w.write_all(b"hello");
        }
        "r-oobinline" => {
            wait_r(&s);
            let _ = send(&s, b"x", 0);
            let _ = send(&s, b"Y", libc::MSG_OOB);
            let _ = send(&s, b"z", 0);
        }
        "r-io-uring" => {
            for part in [&b"hello"[..], b"world"] {
                wait_r(&s);
                let _ = w.write_all(part);
            }
        }
        "r-close-unread" => {
            let _ = w.write_all(&pattern(0, 100));
            // What the app's close looks like from here: EOF or a reset.
            pause(300);
            o.push(show(&read_to_end(&s)));
        }
        "r-linger0" => {
            let _ = w.write_all(b"hello");
            o.push(show(&read_to_end(&s)));
        }
        "w-oob" | "w-zerocopy" | "w-splice" | "w-sendfile" | "w-cork" | "w-msg-more" | "w-outq"
        | "w-io-uring" => {
            let got = read_to_end(&s);
            o.push(show(&got));
        }
        "w-oob-later" => {
            let _ = w.write_all(b"hello");
            o.push(show(&Ok(read_exact(&s, 2))));
            pause(50);
            o.push(show(&read_to_end(&s)));
        }
        "w-shut-wr" => {
            o.push(show(&read_to_end(&s)));
            let _ = w.write_all(b"reply");
        }
        "w-nonblock" => {
            // A slow reader: small reads with pauses, checking every byte.
            let mut got = 0usize;
            let mut ok = true;
            let mut buf = vec![0u8; 1 << 16];
            let mut reads = 0u32;
            loop {
                let n = match w.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                ok &= buf[..n] == pattern(got, n)[..];
                got += n;
                reads += 1;
                if reads.is_multiple_of(64) {
                    pause(1);
                }
            }
            o.push(format!("got={got} exact={ok}"));
        }
        "r-ktls" | "r-starttls-ktls" => {
            if scenario == "r-starttls-ktls" {
                for _ in 0..2 {
                    let _ = w.write_all(b"hello");
                    o.push(show(&Ok(read_exact(&s, 2))));
                }
            }
            let _ = w.write_all(&handshake_record(b"client"));
            o.push(show(&Ok(read_exact(&s, handshake_record(b"server").len()))));
            o.push(ktls(&s, KEY_CLIENT, KEY_APP));
            let _ = w.write_all(b"request");
            o.push(show(&recv(&s, 64, 0)));
        }
        "r-ktls-at-once" => {
            let _ = w.write_all(&handshake_record(b"client"));
            o.push(show(&Ok(read_exact(&s, handshake_record(b"server").len()))));
            o.push(ktls(&s, KEY_CLIENT, KEY_APP));
            o.push(show(&recv(&s, 64, 0)));
            let _ = w.write_all(b"request");
        }
        _ => unreachable!(),
    }
    if !o.is_empty() || scenario.starts_with('r') {
        // Close our side and take whatever else the app says.
        let _ = s.shutdown(Shutdown::Write);
    }
    o.join(" | ")
}
