//! `portfwd-ctl trace [--iface IF] [--json] CLIENT_IP[:PORT] HOST_IP:PORT[/udp]`: what the
//! ingress program does with one packet, run by the kernel on a private copy of the
//! programs (BPF_PROG_RUN) against the live rules; nothing live changes.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
};

use anyhow::Context as _;

use portfwd::{
    protocol::{self, Request},
    trace::{TraceQuery, TraceReply, DEFAULT_CLIENT_PORT},
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The interface the packet arrives on (default: the first attached).
    #[arg(long, value_name = "IF")]
    iface: Option<String>,
    /// Print the verdict as JSON.
    #[arg(long)]
    json: bool,
    /// The client: `IP`, `IP:PORT` or `[IPv6]:PORT` (port 40000 if none).
    #[arg(value_name = "CLIENT_IP[:PORT]", value_parser = parse_client)]
    client: (IpAddr, u16),
    /// The destination: `HOST_IP:PORT` or `[IPv6]:PORT`, `/udp` for UDP (TCP otherwise).
    #[arg(value_name = "HOST_IP:PORT[/udp]", value_parser = parse_dest)]
    dest: (SocketAddr, bool),
}

fn parse_client(s: &str) -> Result<(IpAddr, u16), String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok((a.ip(), a.port()));
    }
    s.parse::<IpAddr>()
        .map(|ip| (ip, DEFAULT_CLIENT_PORT))
        .map_err(|_| format!("`{s}` is not IP, IP:PORT or [IPv6]:PORT"))
}

fn parse_dest(s: &str) -> Result<(SocketAddr, bool), String> {
    let (addr, udp) = match s.rsplit_once('/') {
        Some((a, "udp")) => (a, true),
        Some((a, "tcp")) => (a, false),
        Some((_, p)) => return Err(format!("unknown protocol `{p}` (tcp or udp)")),
        None => (s, false),
    };
    addr.parse::<SocketAddr>()
        .map(|a| (a, udp))
        .map_err(|_| format!("`{addr}` is not HOST_IP:PORT or [IPv6]:PORT"))
}

pub fn run(socket: &Path, args: Args) -> anyhow::Result<()> {
    let (client, client_port) = args.client;
    let (dest, udp) = args.dest;
    if client.is_ipv4() != dest.is_ipv4() {
        anyhow::bail!("the client and the destination must be of the same family");
    }
    let reply: TraceReply = protocol::call(
        socket,
        &Request::Trace {
            query: TraceQuery {
                iface: args.iface,
                client,
                client_port,
                host: dest.ip(),
                port: dest.port(),
                udp,
            },
        },
    )?;
    if args.json {
        let json = serde_json::to_string_pretty(&reply).context("cannot encode the trace")?;
        println!("{json}");
    } else {
        print!("{reply}");
    }
    Ok(())
}
