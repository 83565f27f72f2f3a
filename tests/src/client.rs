//! The client side of the traffic tests: HTTP/1.1 and UDP from inside a namespace.
//! Sockets are made on a thread inside the namespace ([`Netns::run`]) and used from
//! anywhere afterwards.

use std::{
    io::{Read, Write},
    net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    time::Duration,
};

use crate::{
    netns::Netns,
    pattern::{Fnv64, Pattern},
};

/// Generous limit on any one network wait: only to avoid hanging, never asserted.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// A TCP connection from inside `ns`.
pub fn connect(ns: &Netns, to: SocketAddrV4) -> std::io::Result<TcpStream> {
    let s = ns.run(|| TcpStream::connect_timeout(&to.into(), Duration::from_secs(10)))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The client's own address on this connection.
    pub local: SocketAddr,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The peer address the server saw (`X-Peer`).
    pub fn peer_seen(&self) -> SocketAddr {
        let v = self.header("X-Peer").expect("X-Peer header");
        v.parse()
            .unwrap_or_else(|e| panic!("bad X-Peer {v:?}: {e}"))
    }
}

/// Sends `GET path` on `stream` and reads the whole (Connection: close) response.
pub fn get_on(mut stream: TcpStream, path: &str) -> std::io::Result<Response> {
    let local = stream.local_addr()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: portfwd-test\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw, local)
}

/// `GET path` on a new connection from `ns` to `to`.
pub fn get(ns: &Netns, to: SocketAddrV4, path: &str) -> std::io::Result<Response> {
    get_on(connect(ns, to)?, path)
}

fn parse_response(raw: &[u8], local: SocketAddr) -> std::io::Result<Response> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad(&format!("no end of headers in {} bytes", raw.len())))?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(&format!("bad status line {status_line:?}")))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
        local,
    })
}

/// What arrived of a `/bytes/N` download, checked against the pattern as it streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Download {
    pub len: u64,
    pub digest: u64,
    /// Offset of the first byte that differs from the pattern, if any.
    pub first_mismatch: Option<u64>,
    pub content_length: Option<u64>,
}

/// Downloads `/bytes/n` from `to` (from inside `ns`) and checks every byte as it arrives.
pub fn download(ns: &Netns, to: SocketAddrV4, n: u64) -> std::io::Result<Download> {
    download_on(connect(ns, to)?, n)
}

/// As [`download`], on a connected stream (any family).
pub fn download_on(mut s: TcpStream, n: u64) -> std::io::Result<Download> {
    write!(
        s,
        "GET /bytes/{n} HTTP/1.1\r\nHost: portfwd-test\r\nConnection: close\r\n\r\n"
    )?;
    // Headers first, byte by byte up to the blank line (small).
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            break;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let content_length = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok());
    let mut expected = Pattern::new();
    let mut digest = Fnv64::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut want = vec![0u8; 256 * 1024];
    let mut len = 0u64;
    let mut first_mismatch = None;
    loop {
        let k = s.read(&mut buf)?;
        if k == 0 {
            break;
        }
        digest.update(&buf[..k]);
        expected.fill(&mut want[..k]);
        if first_mismatch.is_none() {
            if let Some(i) = buf[..k].iter().zip(&want[..k]).position(|(a, b)| a != b) {
                first_mismatch = Some(len + i as u64);
            }
        }
        len += k as u64;
    }
    Ok(Download {
        len,
        digest: digest.value(),
        first_mismatch,
        content_length,
    })
}

/// What came back from one UDP echo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Echo {
    /// The source address of the reply, as the client received it.
    pub from: SocketAddr,
    /// The client address the server saw.
    pub peer_seen: SocketAddr,
    /// The echoed payload.
    pub payload: Vec<u8>,
    /// The client's own (unconnected, so wildcard) address: compare ports.
    pub local: SocketAddr,
}

/// Sends `payload` from an unconnected UDP socket in `ns` to `to` and waits for the echo,
/// so the reply's source address is whatever the reply carried.
pub fn udp_echo(ns: &Netns, to: SocketAddrV4, payload: &[u8]) -> std::io::Result<Echo> {
    let sock = ns.run(|| UdpSocket::bind("0.0.0.0:0"))?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    let local = sock.local_addr()?;
    let mut buf = vec![0u8; 65_536];
    // UDP may lose the first datagram while ARP resolves: retry a few times.
    let mut last_err = None;
    for _ in 0..10 {
        sock.send_to(payload, to)?;
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                let reply = &buf[..n];
                let nl = reply.iter().position(|&b| b == b'\n').unwrap_or(n);
                let head = String::from_utf8_lossy(&reply[..nl]);
                let peer_seen = head
                    .strip_prefix("peer=")
                    .and_then(|p| p.parse().ok())
                    .ok_or_else(|| {
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("echo without peer line: {head:?}"),
                        )
                    })?;
                return Ok(Echo {
                    from,
                    peer_seen,
                    payload: reply[(nl + 1).min(n)..].to_vec(),
                    local,
                });
            }
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or_else(|| std::io::Error::other("no echo")))
}

/// Uploads the first `n` bytes of the pattern to `PUT /digest` on `to` (from inside
/// `ns`); returns what the server counted: (length, digest).
pub fn upload(ns: &Netns, to: SocketAddrV4, n: u64) -> std::io::Result<(u64, u64)> {
    upload_on(connect(ns, to)?, n)
}

/// As [`upload`], on a connected stream (any family).
pub fn upload_on(mut s: TcpStream, n: u64) -> std::io::Result<(u64, u64)> {
    write!(
        s,
        "PUT /digest HTTP/1.1\r\nHost: portfwd-test\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
    )?;
    Pattern::new().write_to(&mut s, n)?;
    let mut raw = Vec::new();
    let local = s.local_addr()?;
    s.read_to_end(&mut raw)?;
    let r = parse_response(&raw, local)?;
    let text = r.body_text();
    let bad = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("bad digest answer {text:?}"),
        )
    };
    let (len, digest) = text.split_once(' ').ok_or_else(bad)?;
    Ok((
        len.parse().map_err(|_| bad())?,
        u64::from_str_radix(digest, 16).map_err(|_| bad())?,
    ))
}
