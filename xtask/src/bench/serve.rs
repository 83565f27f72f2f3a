//! The container's servers, run as `xtask bench --serve ADDR` inside the container
//! namespace: a minimal HTTP/1.1 server (fixed 64-byte-body answer, keep-alive or
//! `Connection: close` as the client asks) and a 64-byte echo server for request latency.
//! Identical for every variant; a pool of blocking threads each accepting on the shared
//! listener keeps the per-connection cost to accept + one read + one write.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::OwnedFd,
    thread,
};

use anyhow::{Context, Result};
use nix::sys::socket::{
    bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
    SockaddrIn,
};

/// Size of the echo server's messages (and the latency client's requests).
pub const ECHO_LEN: usize = 64;
/// Threads serving HTTP: more than the clients' connection count, so keep-alive
/// connections never wait for a thread.
const HTTP_THREADS: usize = 96;

fn listener(addr: SocketAddr) -> Result<TcpListener> {
    let SocketAddr::V4(v4) = addr else {
        anyhow::bail!("IPv4 only");
    };
    let fd: OwnedFd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(v4))
        .with_context(|| format!("bind {addr}"))?;
    listen(&fd, Backlog::MAXCONN)?;
    Ok(TcpListener::from(fd))
}

/// Serves HTTP on `http` and echo on `echo` until killed.
pub fn serve(http: SocketAddr, echo: SocketAddr) -> Result<()> {
    let h = listener(http)?;
    let e = listener(echo)?;
    for _ in 0..HTTP_THREADS {
        let h = h.try_clone()?;
        thread::spawn(move || loop {
            if let Ok((s, _)) = h.accept() {
                let _ = http_conn(s);
            }
        });
    }
    loop {
        let (s, _) = e.accept()?;
        thread::spawn(move || echo_conn(s));
    }
}

const BODY: &[u8] = b"portfwd bench: 64-byte body, the same for every variant...... ok\n";

fn http_conn(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut buf = [0u8; 4096];
    let mut have = 0;
    loop {
        let n = s.read(&mut buf[have..])?;
        if n == 0 {
            return Ok(());
        }
        have += n;
        // Answer every complete request in the buffer (wrk does not pipeline, but be safe).
        while let Some(end) = find(&buf[..have], b"\r\n\r\n") {
            let req = &buf[..end];
            let close = contains_ci(req, b"connection: close");
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n{}\r\n",
                BODY.len(),
                if close { "Connection: close\r\n" } else { "" }
            );
            let mut resp = Vec::with_capacity(head.len() + BODY.len());
            resp.extend_from_slice(head.as_bytes());
            resp.extend_from_slice(BODY);
            s.write_all(&resp)?;
            if close {
                return Ok(());
            }
            buf.copy_within(end + 4..have, 0);
            have -= end + 4;
        }
        if have == buf.len() {
            return Ok(()); // oversized request: drop it
        }
    }
}

fn echo_conn(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut buf = [0u8; ECHO_LEN];
    loop {
        if s.read_exact(&mut buf).is_err() {
            return Ok(());
        }
        s.write_all(&buf)?;
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn contains_ci(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}
