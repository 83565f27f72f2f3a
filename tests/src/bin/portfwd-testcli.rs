//! A local client for the socket-hook tests: joins a cgroup first (sockets belong to the
//! cgroup of the process that creates them), then does one thing and prints one JSON
//! object on stdout.
//!
//! ```text
//! portfwd-testcli --cgroup PATH tcp HOST:PORT          {"peername", "body", "x_peer"}
//! portfwd-testcli --cgroup PATH udp IP:PORT TEXT       {"from", "reply"}     (sendto/recvfrom)
//! portfwd-testcli --cgroup PATH udp-connected IP:PORT TEXT  {"peername", "reply"}
//! portfwd-testcli --cgroup PATH bind tcp|udp IP:PORT   {"bind": "ok"} or {"bind": "error", "errno"}
//! ```
//! Failures (connection refused, timeouts) print `{"error": "..."}` (the error and its
//! causes, outermost first: `recvfrom: Resource temporarily unavailable`) and exit 1.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket},
    process::ExitCode,
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("{}", json!({ "error": format!("{e:#}") }));
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<Value> {
    let mut args = args;
    if args.first().map(String::as_str) == Some("--cgroup") {
        let path = args.get(1).context("--cgroup needs a path")?;
        // "0" moves the writing process itself.
        std::fs::write(format!("{path}/cgroup.procs"), "0")
            .with_context(|| format!("cannot join cgroup {path}"))?;
        args = &args[2..];
    }
    match args {
        [mode, addr] if mode == "tcp" => tcp(addr),
        [mode, addr, text] if mode == "udp" => udp(addr, text),
        [mode, addr, text] if mode == "udp-connected" => udp_connected(addr, text),
        [mode, proto, addr] if mode == "bind" => bind(proto, addr),
        _ => bail!("usage: see the module docs; got {args:?}"),
    }
}

/// Like curl: every address the name resolves to, in order, until one connects.
fn tcp(addr: &str) -> Result<Value> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .with_context(|| format!("resolve {addr}"))?
        .collect();
    let mut last = anyhow!("no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, TIMEOUT) {
            Ok(mut s) => {
                s.set_read_timeout(Some(TIMEOUT))?;
                let peer = s.peer_addr()?;
                s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")?;
                let mut resp = String::new();
                s.read_to_string(&mut resp)?;
                let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
                let x_peer = head
                    .lines()
                    .find_map(|l| l.strip_prefix("X-Peer: "))
                    .unwrap_or("")
                    .to_string();
                return Ok(json!({ "peername": peer.to_string(), "body": body, "x_peer": x_peer }));
            }
            Err(e) => last = anyhow::Error::new(e).context(format!("connect {a}")),
        }
    }
    Err(last)
}

/// An unbound-port UDP socket of the family of `addr` (an IPv6 target needs an IPv6
/// socket).
fn udp_socket(addr: &str) -> Result<UdpSocket> {
    let v6 = addr
        .to_socket_addrs()
        .with_context(|| format!("resolve {addr}"))?
        .next()
        .is_some_and(|a| a.is_ipv6());
    let s = UdpSocket::bind(if v6 { "[::]:0" } else { "0.0.0.0:0" })?;
    s.set_read_timeout(Some(TIMEOUT))?;
    Ok(s)
}

fn udp(addr: &str, text: &str) -> Result<Value> {
    let s = udp_socket(addr)?;
    s.send_to(text.as_bytes(), addr)
        .with_context(|| format!("sendto {addr}"))?;
    let mut buf = [0u8; 2048];
    let (n, from) = s.recv_from(&mut buf).context("recvfrom")?;
    Ok(json!({ "from": from.to_string(), "reply": String::from_utf8_lossy(&buf[..n]) }))
}

fn udp_connected(addr: &str, text: &str) -> Result<Value> {
    let s = udp_socket(addr)?;
    s.connect(addr).with_context(|| format!("connect {addr}"))?;
    let peer = s.peer_addr()?;
    s.send(text.as_bytes())?;
    let mut buf = [0u8; 2048];
    let n = s.recv(&mut buf).context("recv")?;
    Ok(json!({ "peername": peer.to_string(), "reply": String::from_utf8_lossy(&buf[..n]) }))
}

fn bind(proto: &str, addr: &str) -> Result<Value> {
    let result = match proto {
        "tcp" => TcpListener::bind(addr).map(drop),
        "udp" => UdpSocket::bind(addr).map(drop),
        _ => bail!("unknown protocol {proto}"),
    };
    Ok(match result {
        Ok(()) => json!({ "bind": "ok" }),
        Err(e) => json!({ "bind": "error", "errno": e.raw_os_error() }),
    })
}
