//! The lab's application: listens on the given ports (IPv4 and IPv6) and
//! tells each client which port it reached and who it sees as the peer,
//! which is how the tests tell a proxied connection from a direct one.
//!
//! - HTTP: `GET …` gets `200` with "hello from the app on port P; peer A".
//! - Anything else: the first reply line is `app port=P peer=A`, then every
//!   byte received is echoed back until EOF, then the app closes its side.
//!
//! Usage: lab-app 8000,8080,9000-9002
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{Context as _, Result};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
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
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&SockAddr::from(addr))
        .with_context(|| format!("bind {addr}"))?;
    s.listen(1024)?;
    Ok(TcpListener::from_std(s.into())?)
}

async fn handle(mut s: TcpStream, peer: SocketAddr) -> std::io::Result<()> {
    let port = s.local_addr()?.port();
    let mut buf = vec![0u8; 64 * 1024];
    let n = s.read(&mut buf).await?;
    if n == 0 {
        return Ok(());
    }
    if buf[..n].starts_with(b"GET ") || buf[..n].starts_with(b"HEAD ") {
        let body = format!("hello from the app on port {port}; peer {peer}\n");
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(resp.as_bytes()).await?;
        return s.shutdown().await;
    }
    s.write_all(format!("app port={port} peer={peer}\n").as_bytes())
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

async fn serve(l: TcpListener) {
    loop {
        if let Ok((s, peer)) = l.accept().await {
            tokio::spawn(async move {
                let _ = handle(s, peer).await;
            });
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let spec = std::env::args()
        .nth(1)
        .context("usage: lab-app PORTS (e.g. 8000,8080,9000-9002)")?;
    let mut tasks = Vec::new();
    for port in ports(&spec)? {
        tasks.push(tokio::spawn(serve(listener(SocketAddr::from((
            Ipv4Addr::UNSPECIFIED,
            port,
        )))?)));
        tasks.push(tokio::spawn(serve(listener(SocketAddr::from((
            Ipv6Addr::UNSPECIFIED,
            port,
        )))?)));
    }
    println!("lab-app listening on {spec} (IPv4 and IPv6)");
    tokio::signal::ctrl_c().await?;
    Ok(())
}
