//! `portfwd-testsrv`: the "container" the namespace tests and the demo publish.
//!
//! ```text
//! portfwd-testsrv [--http ADDR] [--body TEXT] [--udp ADDR] [--echo ADDR]
//! ```
//! - HTTP/1.1 on `--http`: `GET /` answers `--body`; `GET /bytes/N` answers N bytes of the
//!   deterministic [`Pattern`] stream. Every answer carries `X-Peer: IP:PORT`, the peer
//!   address this server saw (so a test can check the backend sees the real client), and
//!   closes the connection. `PUT /digest` with a `Content-Length` body answers
//!   `LEN DIGEST` (the body's length and FNV-1a 64 digest in hex), for uploads.
//! - UDP echo on `--udp`: answers each datagram with `peer=IP:PORT\n` followed by the
//!   datagram itself.
//! - TCP echo on `--echo`: sends back whatever each connection sends, until it closes
//!   (long-lived connections that exchange data on demand).
//!
//! Prints `ready` on stdout once every socket is bound, so a harness can wait for it.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::ExitCode,
    sync::Arc,
    thread,
};

use portfwd_tests::pattern::{Fnv64, Pattern};

struct Args {
    http: Option<SocketAddr>,
    body: String,
    udp: Option<SocketAddr>,
    echo: Option<SocketAddr>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        http: None,
        body: "hello".to_string(),
        udp: None,
        echo: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--http" => args.http = Some(parse_addr(&value()?)?),
            "--udp" => args.udp = Some(parse_addr(&value()?)?),
            "--echo" => args.echo = Some(parse_addr(&value()?)?),
            "--body" => args.body = value()?,
            "-h" | "--help" => {
                return Err(
                    "usage: portfwd-testsrv [--http ADDR] [--body TEXT] [--udp ADDR] [--echo ADDR]"
                        .into(),
                )
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    if args.http.is_none() && args.udp.is_none() && args.echo.is_none() {
        return Err("give --http ADDR, --udp ADDR or --echo ADDR".into());
    }
    Ok(args)
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|e| format!("bad address `{s}`: {e}"))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("portfwd-testsrv: {e}");
            return ExitCode::from(2);
        }
    };
    let mut workers = Vec::new();
    if let Some(addr) = args.http {
        let listener = match TcpListener::bind(addr) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("portfwd-testsrv: cannot listen on {addr}/tcp: {e}");
                return ExitCode::FAILURE;
            }
        };
        let body: Arc<str> = args.body.clone().into();
        workers.push(thread::spawn(move || serve_http(listener, body)));
    }
    if let Some(addr) = args.udp {
        let sock = match UdpSocket::bind(addr) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("portfwd-testsrv: cannot bind {addr}/udp: {e}");
                return ExitCode::FAILURE;
            }
        };
        workers.push(thread::spawn(move || serve_udp(sock)));
    }
    if let Some(addr) = args.echo {
        let listener = match TcpListener::bind(addr) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("portfwd-testsrv: cannot listen on {addr}/tcp: {e}");
                return ExitCode::FAILURE;
            }
        };
        workers.push(thread::spawn(move || serve_echo(listener)));
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    for w in workers {
        let _ = w.join();
    }
    ExitCode::SUCCESS
}

fn serve_echo(listener: TcpListener) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        thread::spawn(move || {
            let Ok(mut back) = conn.try_clone() else {
                return;
            };
            let _ = conn.set_nodelay(true);
            let _ = std::io::copy(&mut conn, &mut back);
        });
    }
}

fn serve_http(listener: TcpListener, body: Arc<str>) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let body = Arc::clone(&body);
        thread::spawn(move || {
            if let Err(e) = handle_http(conn, &body) {
                eprintln!("portfwd-testsrv: connection: {e}");
            }
        });
    }
}

fn handle_http(conn: TcpStream, body: &str) -> std::io::Result<()> {
    let peer = conn.peer_addr()?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Headers up to the blank line; only Content-Length matters here.
    let mut content_length = 0u64;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                content_length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let mut out = conn;
    let head = |status: &str, len: u64, ctype: &str| {
        format!(
            "HTTP/1.1 {status}\r\nContent-Length: {len}\r\nContent-Type: {ctype}\r\n\
             X-Peer: {peer}\r\nConnection: close\r\n\r\n"
        )
    };
    if method == "PUT" && path == "/digest" {
        let mut digest = Fnv64::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut len = 0u64;
        while len < content_length {
            let want = (content_length - len).min(buf.len() as u64) as usize;
            let k = reader.read(&mut buf[..want])?;
            if k == 0 {
                break;
            }
            digest.update(&buf[..k]);
            len += k as u64;
        }
        let answer = format!("{len} {:016x}", digest.value());
        out.write_all(head("200 OK", answer.len() as u64, "text/plain").as_bytes())?;
        out.write_all(answer.as_bytes())?;
    } else if method != "GET" {
        out.write_all(head("405 Method Not Allowed", 0, "text/plain").as_bytes())?;
    } else if path == "/" {
        out.write_all(head("200 OK", body.len() as u64, "text/plain").as_bytes())?;
        out.write_all(body.as_bytes())?;
    } else if let Some(n) = path
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<u64>().ok())
    {
        out.write_all(head("200 OK", n, "application/octet-stream").as_bytes())?;
        Pattern::new().write_to(&mut out, n)?;
    } else {
        out.write_all(head("404 Not Found", 0, "text/plain").as_bytes())?;
    }
    out.flush()?;
    let _ = out.shutdown(std::net::Shutdown::Write);
    Ok(())
}

fn serve_udp(sock: UdpSocket) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, peer)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let mut reply = format!("peer={peer}\n").into_bytes();
        reply.extend_from_slice(&buf[..n]);
        let _ = sock.send_to(&reply, peer);
    }
}
