//! `portfwd-ctl list [--json]`.

use std::{fmt::Write as _, path::Path};

use anyhow::Context as _;

use portfwd::protocol::{self, ListReply, Request};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print `{"rules":[...],"interfaces":[...],"reasons":{...},"local_clients":{...}}`
    /// instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(socket: &Path, args: Args) -> anyhow::Result<()> {
    let reply: ListReply = protocol::call(socket, &Request::List)?;
    if args.json {
        let json = serde_json::to_string_pretty(&reply).context("cannot encode the list")?;
        println!("{json}");
    } else {
        print!("{}", table(&reply));
    }
    Ok(())
}

/// `*:9000`, `0.0.0.0:9000-9009`, `[::1]:9000`.
fn ports(host: impl std::fmt::Display, start: u16, end: u16) -> String {
    if end > start {
        format!("{host}:{start}-{end}")
    } else {
        format!("{host}:{start}")
    }
}

/// `172.17.0.2:8080`, or a dual-stack backend's `172.17.0.2:8080,[2001:db8::2]:8080`.
fn backend(r: &portfwd::protocol::RuleStatus) -> String {
    let (start, end) = (r.backend_port, r.backend_port_end);
    let first = ports(portfwd::rule::ip_text(r.backend_ip), start, end);
    match r.backend_ip6 {
        Some(v6) => format!("{first},{}", ports(format!("[{v6}]"), start, end)),
        None => first,
    }
}

/// Columns PUBLISHED, BACKEND, PROTO, SOURCE (`cli`, `file`, or the owner of a plugin's
/// rule), PACKETS, BYTES (both directions; a range
/// is one row and one counter), LOCAL (connections or datagrams of local clients, served
/// at the socket), then a footer with the interfaces and their hooks.
pub fn table(reply: &ListReply) -> String {
    let header = [
        "PUBLISHED",
        "BACKEND",
        "PROTO",
        "SOURCE",
        "PACKETS",
        "BYTES",
        "LOCAL",
    ]
    .map(String::from);
    let rows: Vec<[String; 7]> = reply
        .rules
        .iter()
        .map(|r| {
            [
                ports(r.host_ip, r.host_port, r.host_port_end),
                backend(r),
                r.proto.to_string(),
                match &r.owner {
                    Some(owner) => owner.to_string(),
                    None => r.source.to_string(),
                },
                (r.packets + r.reply_packets).to_string(),
                (r.bytes + r.reply_bytes).to_string(),
                r.local.to_string(),
            ]
        })
        .collect();
    let mut width = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let line = format!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {:<w3$}  {:>w4$}  {:>w5$}  {:>w6$}",
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            row[5],
            row[6],
            w0 = width[0],
            w1 = width[1],
            w2 = width[2],
            w3 = width[3],
            w4 = width[4],
            w5 = width[5],
            w6 = width[6],
        );
        let _ = writeln!(out, "{}", line.trim_end());
    }
    let ifaces: Vec<String> = reply
        .interfaces
        .iter()
        .map(|a| format!("{} ({}, {})", a.iface, a.ingress, a.egress))
        .collect();
    let _ = writeln!(
        out,
        "{} rule{} on {}",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" },
        if ifaces.is_empty() {
            "no interface".to_string()
        } else {
            ifaces.join(", ")
        }
    );
    if !reply.nat64_entries.is_empty() {
        let _ = writeln!(
            out,
            "NAT64 entry on {} (TC ingress)",
            reply.nat64_entries.join(", ")
        );
    }
    let _ = match (&reply.local_clients.served, &reply.local_clients.cgroup) {
        (true, Some(cg)) => writeln!(out, "local clients: served (cgroup {cg})"),
        _ => writeln!(out, "local clients: not served (no cgroup2 mount)"),
    };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use portfwd::{
        dataplane::{Attachment, Hook},
        protocol::{RuleStatus, Source},
        rule::{Backend, Publish},
    };

    /// A rule as `list` reports it; `counters` are packets, bytes, reply packets, reply
    /// bytes, local.
    fn row(publish: &str, backend: &str, source: Source, counters: [u64; 5]) -> RuleStatus {
        let p: Publish = publish.parse().expect("publish");
        let b: Backend = backend.parse().expect("backend");
        let [packets, bytes, reply_packets, reply_bytes, local] = counters;
        RuleStatus {
            host_ip: p.host(),
            host_port: p.host_port(),
            host_port_end: p.ports().end(),
            proto: p.proto(),
            backend_ip: b.addrs().first(),
            backend_ip6: b.addrs().v4().and(b.addrs().v6()),
            backend_port: b.port(),
            backend_port_end: b.ports().end(),
            source,
            owner: None,
            packets,
            bytes,
            reply_packets,
            reply_bytes,
            local,
        }
    }

    #[test]
    fn renders_a_table() {
        let reply = ListReply {
            rules: vec![
                row(
                    "0.0.0.0:9000-9009",
                    "172.17.0.2:8080-8089",
                    Source::File,
                    [10, 1000, 8, 5000, 3],
                ),
                row(
                    "5353/udp",
                    "172.17.0.3:53,[2001:db8::3]:53",
                    Source::Cli,
                    [0; 5],
                ),
            ],
            interfaces: vec![Attachment {
                iface: "eth0".into(),
                ingress: Hook::TcIngress,
                egress: Hook::TcEgress,
            }],
            nat64_entries: vec!["br0".into()],
            reasons: Default::default(),
            local_clients: Default::default(),
        };
        assert_eq!(
            table(&reply),
            "PUBLISHED          BACKEND                         PROTO  SOURCE  PACKETS  BYTES  LOCAL\n\
             0.0.0.0:9000-9009  172.17.0.2:8080-8089            tcp    file         18   6000      3\n\
             *:5353             172.17.0.3:53,[2001:db8::3]:53  udp    cli           0      0      0\n\
             2 rules on eth0 (TC ingress, TC egress)\n\
             NAT64 entry on br0 (TC ingress)\n\
             local clients: not served (no cgroup2 mount)\n"
        );
    }

    #[test]
    fn a_plugins_rule_shows_its_owner() {
        let mut owned = row("[::]:9000", "172.17.0.2:8080", Source::Cli, [0; 5]);
        owned.owner = Some("docker:4711".parse().expect("owner"));
        let reply = ListReply {
            rules: vec![owned],
            ..ListReply::default()
        };
        let text = table(&reply);
        let mut lines = text.lines();
        assert_eq!(
            lines.next(),
            Some("PUBLISHED  BACKEND          PROTO  SOURCE       PACKETS  BYTES  LOCAL")
        );
        assert_eq!(
            lines.next(),
            Some("[::]:9000  172.17.0.2:8080  tcp    docker:4711        0      0      0")
        );
    }
}
