//! The Prometheus endpoint (`portfwd --metrics ADDR:PORT`): `GET /metrics` answers in
//! OpenMetrics 1.0 (written by `prometheus-client`) when the scraper asks for it, as
//! Prometheus does, and in Prometheus' text format 0.0.4 otherwise ([`to_text_format`]).
//!
//! A scrape never slows the dataplane and holds the daemon's lock only while it copies
//! what `list` shows (one counter read per rule): the flow tables are walked afterwards
//! through descriptors of their own ([`FlowTables`]), on a blocking thread, so the
//! control socket is served meanwhile. The programs only ever see map reads.
//!
//! Metric names follow Prometheus' conventions: the `portfwd_` prefix, `_total` on
//! counters, `_bytes_total` on byte counters, label values as `list --json` writes them.

use std::{
    fmt::Write as _,
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use log::{debug, warn};
use portfwd_common::MAX_STATS_SLOTS;
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::{
    daemon::Shared,
    dataplane::Dataplane,
    flows::{FlowTables, TableUsage},
    protocol::{ListReply, RuleStatus},
};

/// Map writes the kernel refused since the daemon started (rules, counters, host
/// addresses, flows, the fast path's bridge ports, NAT64's entries).
static MAP_UPDATE_ERRORS: AtomicU64 = AtomicU64::new(0);

/// Counts `r` in `portfwd_map_update_errors_total` if it is an error; returns it.
pub fn count_map_update<T, E>(r: Result<T, E>) -> Result<T, E> {
    if r.is_err() {
        MAP_UPDATE_ERRORS.fetch_add(1, Ordering::Relaxed);
    }
    r
}

/// Map writes refused since the daemon started.
pub fn map_update_errors() -> u64 {
    MAP_UPDATE_ERRORS.load(Ordering::Relaxed)
}

/// What one scrape shows: the daemon's `list`, the flow tables' usage and the error
/// count, read at one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The rules, their counters, the reason counters and the attachments.
    pub list: ListReply,
    /// How full each flow table is.
    pub tables: Vec<TableUsage>,
    /// Map writes refused so far.
    pub map_update_errors: u64,
    /// Per attached interface: whether it still exists.
    pub iface_present: Vec<bool>,
    /// How long it took to read the flow tables.
    pub flow_walk: Duration,
}

type Labels = Vec<(&'static str, String)>;
/// One of a rule's counters.
type RuleCounter = fn(&RuleStatus) -> u64;

/// The exposition text of `s`.
pub fn render(s: &Snapshot) -> String {
    let mut reg = Registry::with_prefix("portfwd");

    let rule_labels = |r: &RuleStatus| -> Labels {
        let port = if r.host_port_end > r.host_port {
            format!("{}-{}", r.host_port, r.host_port_end)
        } else {
            r.host_port.to_string()
        };
        let backend_port = if r.backend_port_end > r.backend_port {
            format!("{}-{}", r.backend_port, r.backend_port_end)
        } else {
            r.backend_port.to_string()
        };
        let backend = |ip: IpAddr| match ip {
            IpAddr::V4(v4) => format!("{v4}:{backend_port}"),
            IpAddr::V6(v6) => format!("[{v6}]:{backend_port}"),
        };
        let mut b = backend(r.backend_ip);
        if let Some(v6) = r.backend_ip6 {
            b = format!("{b},{}", backend(v6.into()));
        }
        vec![
            ("host_ip", r.host_ip.to_string()),
            ("port", port),
            ("proto", r.proto.to_string()),
            ("backend", b),
            // As `list` shows it: a plugin's rule by its owner.
            (
                "source",
                r.owner
                    .as_ref()
                    .map_or_else(|| r.source.to_string(), |o| o.to_string()),
            ),
        ]
    };
    let per_rule: [(&str, &str, RuleCounter); 5] = [
        (
            "rule_packets",
            "Client-to-backend packets translated at ingress",
            |r| r.packets,
        ),
        (
            "rule_bytes",
            "Client-to-backend bytes translated at ingress",
            |r| r.bytes,
        ),
        (
            "rule_reply_packets",
            "Backend-to-client packets translated back",
            |r| r.reply_packets,
        ),
        (
            "rule_reply_bytes",
            "Backend-to-client bytes translated back",
            |r| r.reply_bytes,
        ),
        (
            "rule_local_connections",
            "Local clients served at the socket (TCP connections, UDP datagrams)",
            |r| r.local,
        ),
    ];
    for (name, help, value) in per_rule {
        let family = Family::<Labels, Counter>::default();
        for r in &s.list.rules {
            family.get_or_create(&rule_labels(r)).inc_by(value(r));
        }
        reg.register(name, help, family);
    }

    let reasons = Family::<Labels, Counter>::default();
    for (reason, n) in &s.list.reasons {
        reasons
            .get_or_create(&vec![("reason", reason.clone())])
            .inc_by(*n);
    }
    reg.register(
        "packets",
        "Packets seen by the programs, by what became of them (see `portfwd-ctl list`)",
        reasons,
    );

    let flows = Family::<Labels, Gauge>::default();
    let capacity = Family::<Labels, Gauge>::default();
    for t in &s.tables {
        let labels = vec![("table", t.table.name().to_string())];
        flows.get_or_create(&labels).set(gauge(t.entries));
        capacity.get_or_create(&labels).set(gauge(t.capacity));
    }
    reg.register("flows", "Entries in each flow table", flows);
    reg.register(
        "flows_capacity",
        "Capacity of each flow table (LRU: the least recently used entry goes beyond it)",
        capacity,
    );

    let rules = Family::<Labels, Gauge>::default();
    for source in ["cli", "file"] {
        let n = s
            .list
            .rules
            .iter()
            .filter(|r| r.source.to_string() == source)
            .count();
        rules
            .get_or_create(&vec![("source", source.to_string())])
            .set(gauge(n as u64));
    }
    reg.register("rules", "Published rules (a range is one rule)", rules);
    let slots = Gauge::<i64>::default();
    slots.set(gauge(s.list.rules.len() as u64));
    reg.register(
        "rule_slots_used",
        "Counter slots in use (one per rule)",
        slots,
    );
    let slots_capacity = Gauge::<i64>::default();
    slots_capacity.set(gauge(u64::from(MAX_STATS_SLOTS)));
    reg.register(
        "rule_slots_capacity",
        "Counter slots in all: the most rules the daemon can publish",
        slots_capacity,
    );

    let errors = Counter::<u64>::default();
    errors.inc_by(s.map_update_errors);
    reg.register(
        "map_update_errors",
        "Map writes the kernel refused since the daemon started",
        errors,
    );

    let attached = Family::<Labels, Gauge>::default();
    for (a, present) in s.list.interfaces.iter().zip(&s.iface_present) {
        let labels = vec![
            ("iface", a.iface.clone()),
            ("ingress", hook_label(a.ingress)),
            ("egress", hook_label(a.egress)),
        ];
        attached.get_or_create(&labels).set(i64::from(*present));
    }
    reg.register(
        "interface_attached",
        "1 for each --iface the programs are attached to; 0 once the interface is gone",
        attached,
    );
    let local = Gauge::<i64>::default();
    local.set(i64::from(s.list.local_clients.served));
    reg.register(
        "local_clients_served",
        "1 when the socket programs serve local clients",
        local,
    );

    let walk = Gauge::<f64, AtomicU64>::default();
    walk.set(s.flow_walk.as_secs_f64());
    reg.register(
        "flow_table_walk_seconds",
        "How long this scrape took to count the flow tables' entries",
        walk,
    );

    reg.register(
        "build",
        "The daemon's version",
        Info::new(vec![("version", env!("CARGO_PKG_VERSION").to_string())]),
    );

    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &reg);
    out
}

fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn hook_label(h: crate::dataplane::Hook) -> String {
    serde_json::to_value(h)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Reads one scrape's worth: `list` under the lock, the flow tables without it.
pub fn snapshot(state: &Shared<Dataplane>, tables: &FlowTables) -> Result<Snapshot, String> {
    let list = {
        let d = state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        d.list().map_err(|e| crate::report::Chain(&e).to_string())?
    };
    let start = Instant::now();
    let usage = tables
        .usage()
        .map_err(|e| crate::report::Chain(&e).to_string())?;
    let flow_walk = start.elapsed();
    let iface_present = list
        .interfaces
        .iter()
        .map(|a| crate::netinfo::ifindex(&a.iface).is_some())
        .collect();
    Ok(Snapshot {
        list,
        tables: usage,
        map_update_errors: map_update_errors(),
        iface_present,
        flow_walk,
    })
}

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of [`to_text_format`]'s text.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// [`render`]'s OpenMetrics text as Prometheus' older text format (0.0.4), for scrapers
/// that do not ask for OpenMetrics (`curl`, `promtool check metrics`): the two differ
/// only in that a counter's `HELP` and `TYPE` lines name its samples (`x_total`), an
/// info metric is a gauge named `x_info`, and there is no `# EOF`.
pub fn to_text_format(openmetrics: &str) -> String {
    let mut renamed = std::collections::HashMap::new();
    for line in openmetrics.lines() {
        let mut words = line.split(' ');
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        {
            match kind {
                "counter" => renamed.insert(name, (format!("{name}_total"), "counter")),
                "info" => renamed.insert(name, (format!("{name}_info"), "gauge")),
                _ => None,
            };
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let mut words = line.splitn(4, ' ');
        match (words.next(), words.next(), words.next(), words.next()) {
            (Some("#"), Some("HELP"), Some(name), rest) if renamed.contains_key(name) => {
                let _ = writeln!(out, "# HELP {} {}", renamed[name].0, rest.unwrap_or(""));
            }
            (Some("#"), Some("TYPE"), Some(name), _) if renamed.contains_key(name) => {
                let (new, kind) = &renamed[name];
                let _ = writeln!(out, "# TYPE {new} {kind}");
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}
/// How long a scraper may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest request head read.
const MAX_HEAD: usize = 8192;

/// Serves `GET /metrics` on `listener` until the runtime stops; one scrape at a time
/// (a scraper waits for the one before it), each read on a blocking thread.
pub async fn serve(listener: TcpListener, state: Shared<Dataplane>, tables: FlowTables) {
    let tables = Arc::new(tables);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!("cannot accept a metrics connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if let Err(e) = serve_one(stream, &state, &tables).await {
            debug!("metrics connection: {e}");
        }
    }
}

async fn serve_one(
    mut stream: TcpStream,
    state: &Shared<Dataplane>,
    tables: &Arc<FlowTables>,
) -> std::io::Result<()> {
    let head = tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request timeout"))??;
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next(), parts.next());
    // Prometheus asks for OpenMetrics; anything else gets the older text format.
    let openmetrics = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("accept:") && l.contains("application/openmetrics-text")
    });
    let (status, content_type, body) = match (method, path) {
        (Some("GET"), Some("/metrics")) => {
            let (state, tables) = (state.clone(), tables.clone());
            let scraped = tokio::task::spawn_blocking(move || snapshot(&state, &tables)).await;
            match scraped {
                Ok(Ok(s)) if openmetrics => ("200 OK", CONTENT_TYPE, render(&s)),
                Ok(Ok(s)) => ("200 OK", TEXT_CONTENT_TYPE, to_text_format(&render(&s))),
                Ok(Err(e)) => {
                    warn!("metrics: {e}");
                    ("500 Internal Server Error", "text/plain", format!("{e}\n"))
                }
                Err(e) => ("500 Internal Server Error", "text/plain", format!("{e}\n")),
            }
        }
        (Some("GET"), _) => (
            "404 Not Found",
            "text/plain",
            "portfwd serves /metrics\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        ),
    };
    let mut response = String::new();
    let _ = write!(
        response,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    response.push_str(&body);
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// The request line and headers, up to the blank line.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_HEAD {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        dataplane::{Attachment, Hook},
        flows::FlowTable,
        protocol::Source,
        rule::{Host, Proto},
    };

    #[test]
    fn renders_rules_reasons_tables_and_interfaces() {
        let mut s = Snapshot::default();
        s.list.rules.push(RuleStatus {
            host_ip: Host::Any,
            host_port: 9000,
            host_port_end: 9000,
            proto: Proto::Udp,
            backend_ip: "172.17.0.2".parse().expect("ip"),
            backend_ip6: Some("2001:db8::2".parse().expect("ip")),
            backend_port: 8080,
            backend_port_end: 8080,
            source: Source::File,
            owner: None,
            packets: 3,
            bytes: 300,
            reply_packets: 2,
            reply_bytes: 200,
            local: 1,
        });
        s.list.reasons.insert("pass_no_rule".to_string(), 7);
        s.list.interfaces.push(Attachment {
            iface: "eth0".to_string(),
            ingress: Hook::TcIngress,
            egress: Hook::TcEgress,
        });
        s.iface_present.push(false);
        s.tables.push(TableUsage {
            table: FlowTable::ConntrackV4,
            entries: 5,
            capacity: 131_072,
        });
        s.map_update_errors = 4;
        let text = render(&s);
        for want in [
            "portfwd_rule_packets_total{host_ip=\"*\",port=\"9000\",proto=\"udp\",backend=\"172.17.0.2:8080,[2001:db8::2]:8080\",source=\"file\"} 3",
            "portfwd_rule_reply_bytes_total{host_ip=\"*\",port=\"9000\",proto=\"udp\",backend=\"172.17.0.2:8080,[2001:db8::2]:8080\",source=\"file\"} 200",
            "portfwd_packets_total{reason=\"pass_no_rule\"} 7",
            "portfwd_flows{table=\"conntrack_v4\"} 5",
            "portfwd_flows_capacity{table=\"conntrack_v4\"} 131072",
            "portfwd_map_update_errors_total 4",
            "portfwd_interface_attached{iface=\"eth0\",ingress=\"tc-ingress\",egress=\"tc-egress\"} 0",
            "portfwd_rules{source=\"file\"} 1",
            "portfwd_rule_slots_used 1",
            "portfwd_build_info{version=\"",
            "# EOF",
        ] {
            assert!(text.contains(want), "no `{want}` in\n{text}");
        }
    }

    #[test]
    fn text_format_names_counters_by_their_samples() {
        let om = "# HELP portfwd_packets Packets.\n# TYPE portfwd_packets counter\n\
                  portfwd_packets_total{reason=\"x\"} 1\n# HELP portfwd_build Version.\n\
                  # TYPE portfwd_build info\nportfwd_build_info{version=\"1\"} 1\n\
                  # HELP portfwd_flows Flows.\n# TYPE portfwd_flows gauge\nportfwd_flows 3\n# EOF\n";
        assert_eq!(
            to_text_format(om),
            "# HELP portfwd_packets_total Packets.\n# TYPE portfwd_packets_total counter\n\
             portfwd_packets_total{reason=\"x\"} 1\n# HELP portfwd_build_info Version.\n\
             # TYPE portfwd_build_info gauge\nportfwd_build_info{version=\"1\"} 1\n\
             # HELP portfwd_flows Flows.\n# TYPE portfwd_flows gauge\nportfwd_flows 3\n"
        );
    }

    #[test]
    fn map_update_errors_count_errors_only() {
        let before = map_update_errors();
        let _ = count_map_update::<(), ()>(Ok(()));
        let _ = count_map_update::<(), ()>(Err(()));
        assert_eq!(map_update_errors(), before + 1);
    }
}
