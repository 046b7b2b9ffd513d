//! The lab's application: listens on the given ports (IPv4 and IPv6) and
//! tells each client which port it reached and who it sees as the peer,
//! which is how the tests tell a proxied connection from a direct one.
//!
//! - HTTP: `GET …` gets `200` with "hello from the app on port P; peer A".
//!   HTTP/1.1 keep-alive: requests on one connection are answered in turn
//!   (pipelined ones too) until the client asks for `Connection: close`
//!   (or speaks HTTP/1.0 without keep-alive) or closes; so a load generator
//!   measures requests, not connection set-up.
//! - `SEND <n>` (a line): n bytes of the seeded stream (seed n), then the app
//!   closes at once (a peer that closes mid-stream).
//! - `COUNT <n>` (a line): reads n bytes, answers `count ok <n>`, and
//!   waits for the client to close (a request answered without a FIN).
//! - `SINK <seed> [<n>] [go] [read=<b>]` (a line; `go`: answer `go` first;
//!   `read=`: at most b bytes a read): a slow reader: reads at --sink-rate
//!   bytes/s, checks the seeded stream, answers `sink ok bytes=N` (or a
//!   mismatch) at EOF, or after n bytes, and then waits for the client to
//!   close (the connection stays open as long as the client wants).
//! - Anything else: the first reply line is `app port=P peer=A [tag=T]`,
//!   then every byte received is echoed back until EOF, then the app closes
//!   its side.
//!
//! - `--first-read-delay-ms MS`: wait that long after accepting before the
//!   first read (a busy app: bytes pile up before it looks).
//!
//! Usage: lab-app PORTS [--tag T] [--sink-rate BYTES_PER_S] [--first-read-delay-ms MS]
//! (PORTS: 8000,8080,9000-9002)
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{Context as _, Result};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

fn ports(spec: &str) -> Result<Vec<u16>> {
    let mut out = Vec::new();
    for item in spec.split(',') {
        match item.split_once('-') {
            Some((a, b)) => out.extend(a.parse::<u16>()?..=b.parse::<u16>()?),
            None => out.push(item.parse()?),
        }
    }
    Ok(out)
}

fn listener(addr: SocketAddr) -> Result<TcpListener> {
    let l = tproxy_examples::listener(addr, false).with_context(|| format!("bind {addr}"))?;
    Ok(TcpListener::from_std(l)?)
}

#[derive(Clone)]
struct Opts {
    tag: Option<String>,
    sink_rate: u64,
    first_read_delay: std::time::Duration,
}

/// SEND: n bytes of the stream seeded with n, then close without reading.
async fn send(mut s: TcpStream, n: usize) -> std::io::Result<()> {
    let mut data = tproxy_examples::Stream::new(n as u64);
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent = 0;
    while sent < n {
        let k = buf.len().min(n - sent);
        data.fill(&mut buf[..k]);
        s.write_all(&buf[..k]).await?;
        sent += k;
    }
    s.shutdown().await
}

/// SINK: read slowly (rate-limited), check every byte, report at EOF.
async fn sink(
    mut s: TcpStream,
    seed: u64,
    want: Option<u64>,
    rest: Vec<u8>,
    rate: u64,
    read: Option<usize>,
) -> std::io::Result<()> {
    let mut check = tproxy_examples::Stream::new(seed);
    let mut got = rest.len();
    let mut bad = check.check(&rest);
    let chunk = read
        .unwrap_or((rate / 100).clamp(1, 64 * 1024) as usize)
        .max(1);
    let mut buf = vec![0u8; chunk];
    let start = tokio::time::Instant::now();
    while want.is_none_or(|w| (got as u64) < w) {
        // Keep to `rate` bytes per second on average.
        let due = start + std::time::Duration::from_secs_f64(got as f64 / rate as f64);
        tokio::time::sleep_until(due).await;
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        if bad.is_none() {
            bad = check.check(&buf[..n]).map(|o| got + o);
        }
        got += n;
    }
    let msg = match bad {
        None => format!("sink ok bytes={got}\n"),
        Some(at) => format!("sink MISMATCH at byte {at} of {got}\n"),
    };
    s.write_all(msg.as_bytes()).await?;
    if want.is_some() {
        while s.read(&mut buf).await? != 0 {}
        return Ok(());
    }
    s.shutdown().await
}

/// COUNT: read `want` bytes (`got` came with the line), answer, and wait
/// for the client to close: a request whose sender then waits for a reply
/// without closing (no FIN to wake a reader that missed its data).
async fn count(mut s: TcpStream, want: usize, mut got: usize) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    while got < want {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    s.write_all(format!("count ok {got}\n").as_bytes()).await?;
    while s.read(&mut buf).await? != 0 {}
    Ok(())
}

/// One parsed request head: its length with the blank line, the body's
/// length, whether the client wants the connection closed after it, and
/// whether it is a HEAD.
struct Request {
    head_len: usize,
    body_len: usize,
    close: bool,
    head: bool,
}

/// The first complete request head in `buf`, if there is one.
fn request(buf: &[u8]) -> Option<Request> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let text = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let first = text.split("\r\n").next().unwrap_or("");
    let header = |name: &str| {
        text.split("\r\n")
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim() == name)
            .map(|(_, v)| v.trim().to_string())
    };
    let connection = header("connection").unwrap_or_default();
    let close = connection.contains("close")
        || (first.ends_with("http/1.0") && !connection.contains("keep-alive"));
    Some(Request {
        head_len: end,
        body_len: header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        close,
        head: first.starts_with("head "),
    })
}

/// HTTP/1.1 with keep-alive: answers each request in `buf` and on the
/// connection, until the client asks to close or closes.
async fn http(
    mut s: TcpStream,
    mut buf: Vec<u8>,
    port: u16,
    peer: SocketAddr,
) -> std::io::Result<()> {
    // One write per response; no Nagle wait behind an unacked one.
    s.set_nodelay(true)?;
    let body = format!("hello from the app on port {port}; peer {peer}\n");
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        while let Some(req) = request(&buf) {
            if buf.len() < req.head_len + req.body_len {
                break;
            }
            buf.drain(..req.head_len + req.body_len);
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{}",
                body.len(),
                if req.close {
                    "Connection: close\r\n"
                } else {
                    ""
                },
                if req.head { "" } else { body.as_str() },
            );
            s.write_all(resp.as_bytes()).await?;
            if req.close {
                return s.shutdown().await;
            }
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return s.shutdown().await;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn handle(mut s: TcpStream, peer: SocketAddr, opts: Opts) -> std::io::Result<()> {
    let port = s.local_addr()?.port();
    let mut buf = vec![0u8; 64 * 1024];
    tokio::time::sleep(opts.first_read_delay).await;
    let n = s.read(&mut buf).await?;
    if n == 0 {
        return Ok(());
    }
    let first_line = buf[..n]
        .split(|&b| b == b'\n')
        .next()
        .unwrap_or(&[])
        .to_vec();
    let first_line = String::from_utf8_lossy(&first_line).into_owned();
    if let Some(v) = first_line.strip_prefix("SEND ") {
        let n: usize = v.trim().parse().unwrap_or(0);
        return send(s, n).await;
    }
    if let Some(v) = first_line.strip_prefix("COUNT ") {
        let want: usize = v.trim().parse().unwrap_or(0);
        return count(s, want, n - (first_line.len() + 1)).await;
    }
    if let Some(v) = first_line.strip_prefix("SINK ") {
        let mut words = v.split_whitespace().filter_map(|w| w.parse::<u64>().ok());
        let seed = words.next().unwrap_or(0);
        let want = words.next();
        // `go`: the writer waits for this word before its stream, so this
        // reader has made its first (plain) read by then, and its
        // connection is accelerated from the stream's first byte.
        if v.split_whitespace().any(|w| w == "go") {
            s.write_all(b"go\n").await?;
        }
        let read = v
            .split_whitespace()
            .find_map(|w| w.strip_prefix("read=")?.parse::<usize>().ok());
        let rest = buf[first_line.len() + 1..n].to_vec();
        return sink(s, seed, want, rest, opts.sink_rate, read).await;
    }
    if buf[..n].starts_with(b"GET ") || buf[..n].starts_with(b"HEAD ") {
        buf.truncate(n);
        return http(s, buf, port, peer).await;
    }
    let tag = opts
        .tag
        .as_deref()
        .map(|t| format!(" tag={t}"))
        .unwrap_or_default();
    s.write_all(format!("app port={port} peer={peer}{tag}\n").as_bytes())
        .await?;
    s.write_all(&buf[..n]).await?;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n]).await?;
    }
    s.shutdown().await
}

async fn serve(l: TcpListener, opts: Opts) {
    loop {
        if let Ok((s, peer)) = l.accept().await {
            let opts = opts.clone();
            tokio::spawn(async move {
                let _ = handle(s, peer, opts).await;
            });
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let spec = args
        .first()
        .context("usage: lab-app PORTS [--tag T] [--sink-rate BYTES_PER_S]")?
        .clone();
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let opts = Opts {
        tag: opt("--tag"),
        sink_rate: opt("--sink-rate")
            .map(|v| v.parse())
            .transpose()?
            .unwrap_or(1 << 20),
        first_read_delay: std::time::Duration::from_millis(
            opt("--first-read-delay-ms")
                .map(|v| v.parse())
                .transpose()?
                .unwrap_or(0),
        ),
    };
    let mut tasks = Vec::new();
    for port in ports(&spec)? {
        for ip in [
            std::net::IpAddr::from(Ipv4Addr::UNSPECIFIED),
            Ipv6Addr::UNSPECIFIED.into(),
        ] {
            let l = listener(SocketAddr::new(ip, port))?;
            tasks.push(tokio::spawn(serve(l, opts.clone())));
        }
    }
    println!("lab-app listening on {spec} (IPv4 and IPv6)");
    tokio::signal::ctrl_c().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads() {
        assert!(request(b"GET / HTTP/1.1\r\nHost: x\r\n").is_none());
        let r = request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /2").unwrap();
        assert_eq!(
            (r.head_len, r.body_len, r.close, r.head),
            (27, 0, false, false)
        );
        let r = request(b"HEAD / HTTP/1.1\r\nConnection: Close\r\n\r\n").unwrap();
        assert!(r.close && r.head);
        assert!(request(b"GET / HTTP/1.0\r\n\r\n").unwrap().close);
        let r = request(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap();
        assert!(!r.close);
        let r = request(b"GET / HTTP/1.1\r\ncontent-length: 5\r\n\r\nhello").unwrap();
        assert_eq!(r.body_len, 5);
    }
}
