//! A small original-destination proxy: what Envoy's `original_dst`
//! listener filter + ORIGINAL_DST cluster, or HAProxy's `server x 0.0.0.0`,
//! do. It accepts on the proxy port, asks the kernel where the client was
//! going (SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST, which tproxy's
//! cgroup/getsockopt program answers), dials that with SO_MARK set (so
//! tproxy never steers it back), and copies bytes both ways with
//! half-close. One line per connection on stdout says what it read:
//!
//!     accepted 10.0.0.20:40212 on 192.168.178.10:15006 original-dst 192.168.178.10:8000
//!
//! Usage: origdst-proxy [--port 15006] [--mark 0x539] [--transparent]
use std::{
    io::Write as _,
    mem::{size_of, zeroed},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd as _, RawFd},
};

use anyhow::{Context as _, Result, bail};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const SO_ORIGINAL_DST: libc::c_int = 80;
const IP6T_SO_ORIGINAL_DST: libc::c_int = 80;

struct Args {
    port: u16,
    mark: u32,
    transparent: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        port: 15006,
        mark: 0x539,
        transparent: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--port" => a.port = it.next().context("--port needs a value")?.parse()?,
            "--mark" => {
                let v = it.next().context("--mark needs a value")?;
                a.mark = match v.strip_prefix("0x") {
                    Some(h) => u32::from_str_radix(h, 16)?,
                    None => v.parse()?,
                };
            }
            "--transparent" => a.transparent = true,
            other => bail!(
                "unknown argument {other:?}; usage: origdst-proxy [--port N] [--mark M] [--transparent]"
            ),
        }
    }
    Ok(a)
}

/// The original destination of an accepted connection.
fn original_dst(fd: RawFd, local: SocketAddr) -> std::io::Result<SocketAddr> {
    // SAFETY: getsockopt into a zeroed sockaddr of the size we pass.
    unsafe {
        match local {
            SocketAddr::V4(_) => {
                let mut sa: libc::sockaddr_in = zeroed();
                let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
                let r = libc::getsockopt(
                    fd,
                    libc::SOL_IP,
                    SO_ORIGINAL_DST,
                    (&raw mut sa).cast(),
                    &mut len,
                );
                if r != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
                    u16::from_be(sa.sin_port),
                )))
            }
            SocketAddr::V6(_) => {
                let mut sa: libc::sockaddr_in6 = zeroed();
                let mut len = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
                let r = libc::getsockopt(
                    fd,
                    libc::SOL_IPV6,
                    IP6T_SO_ORIGINAL_DST,
                    (&raw mut sa).cast(),
                    &mut len,
                );
                if r != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(sa.sin6_addr.s6_addr),
                    u16::from_be(sa.sin6_port),
                    0,
                    0,
                )))
            }
        }
    }
}

fn listener(addr: SocketAddr, transparent: bool) -> Result<TcpListener> {
    let l = tproxy_examples::listener(addr, transparent)
        .with_context(|| format!("listen on {addr}"))?;
    Ok(TcpListener::from_std(l)?)
}

async fn dial(orig: SocketAddr, mark: u32) -> std::io::Result<TcpStream> {
    let domain = if orig.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    // Upstream traffic carries the proxy mark: tproxy never steers it.
    s.set_mark(mark)?;
    s.set_nonblocking(true)?;
    let std_stream: std::net::TcpStream = s.into();
    TcpSocket::from_std_stream(std_stream).connect(orig).await
}

fn say(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

async fn serve(l: TcpListener, mark: u32) {
    let listen_port = l.local_addr().map(|a| a.port()).unwrap_or(0);
    loop {
        let (mut down, peer) = match l.accept().await {
            Ok(x) => x,
            Err(e) => {
                say(format!("accept error: {e}"));
                continue;
            }
        };
        tokio::spawn(async move {
            let local = match down.local_addr() {
                Ok(a) => a,
                Err(_) => return,
            };
            let orig = match original_dst(down.as_raw_fd(), local) {
                Ok(o) => o,
                Err(e) => {
                    say(format!(
                        "accepted {peer} on {local} original-dst unknown ({e}); closing"
                    ));
                    return;
                }
            };
            say(format!("accepted {peer} on {local} original-dst {orig}"));
            // A broken set-up (original destination unknown, so the
            // kernel's answer is our own listener) must not make us dial
            // ourselves in a loop.
            if orig.port() == listen_port {
                say(format!(
                    "refusing {peer}: original destination {orig} is the proxy port"
                ));
                return;
            }
            let mut up = match dial(orig, mark).await {
                Ok(s) => s,
                Err(e) => {
                    say(format!("upstream {orig} for {peer}: {e}"));
                    return;
                }
            };
            let _ = up.set_nodelay(true);
            let _ = down.set_nodelay(true);
            // Copies both ways; EOF on one side shuts down writing on the
            // other (half-close), and it returns when both are done.
            match tokio::io::copy_bidirectional(&mut down, &mut up).await {
                Ok((a, b)) => say(format!("closed {peer}: {a} bytes up, {b} bytes down")),
                Err(e) => say(format!("closed {peer}: {e}")),
            }
        });
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let a = parse_args()?;
    let v4 = listener(
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, a.port)),
        a.transparent,
    )?;
    let v6 = listener(
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, a.port)),
        a.transparent,
    )?;
    say(format!(
        "listening on :{} (IPv4 and IPv6{}), upstream mark {:#x}",
        a.port,
        if a.transparent { ", transparent" } else { "" },
        a.mark
    ));
    tokio::select! {
        _ = serve(v4, a.mark) => {}
        _ = serve(v6, a.mark) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
