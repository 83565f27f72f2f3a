//! The live flow tables, read-only: what `portfwd-ctl flows` lists and what the metrics
//! count. [`FlowTables`] holds its own file descriptors of the kernel's flow maps (the
//! same maps, not copies), so a reader needs no lock on the daemon's state.
//!
//! Cost: the kernel has no "entry count" for hash maps, so counting an LRU table walks its
//! keys (one `BPF_MAP_GET_NEXT_KEY` each, bounded by the table's capacity); listing adds
//! one lookup per entry shown. Entries come and go during a walk (the programs insert,
//! LRU evicts): a count is a snapshot within a few entries, and a walk that loses its
//! place starts over at the first key, so a count never exceeds the capacity.
//!
//! What a flow shows: conntrack values hold the published address and the rule's counter
//! slot but no timestamp, so a flow's age is known only for NAT64 flows (their reply
//! entry records the last packet either way, `bpf_ktime_get_coarse_ns`).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use aya::maps::{HashMap, Map, MapData};
use portfwd_common::{
    proto, FlowKeyV4, FlowKeyV6, FlowV4, FlowV6, LocalPeerKeyV4, LocalPeerKeyV6, LocalPeerV4,
    LocalPeerV6, Nat64Flow, Nat64Reply, CONNTRACK_V4, CONNTRACK_V6, EMBRYONIC_V4, EMBRYONIC_V6,
    LOCAL_PEERS_V4, LOCAL_PEERS_V6, NAT64_FLOWS, NAT64_REPLIES,
};
use serde::{Deserialize, Serialize};

use crate::{
    dataplane::{Dataplane, DataplaneError},
    rule::Proto,
};

/// `flows`' default bound on the flows listed.
pub const DEFAULT_FLOW_LIMIT: u32 = 1000;

/// One flow table of the dataplane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowTable {
    /// Remote IPv4 clients' flows ([`CONNTRACK_V4`]).
    ConntrackV4,
    /// Remote IPv6 clients' flows ([`CONNTRACK_V6`]).
    ConntrackV6,
    /// Remote IPv4 clients' flows whose handshake has not completed ([`EMBRYONIC_V4`]):
    /// SYNs not yet answered past the SYN-ACK, spoofed ones included.
    EmbryonicV4,
    /// The same for IPv6 ([`EMBRYONIC_V6`]).
    EmbryonicV6,
    /// Local IPv4 clients' sockets ([`LOCAL_PEERS_V4`]).
    LocalPeersV4,
    /// Local IPv6 clients' sockets ([`LOCAL_PEERS_V6`]).
    LocalPeersV6,
    /// NAT64 flows, client side ([`NAT64_FLOWS`]).
    Nat64Flows,
    /// NAT64 flows, backend side ([`NAT64_REPLIES`]).
    Nat64Replies,
}

impl FlowTable {
    /// Every table, in the order metrics and `flows` show them.
    pub const ALL: [FlowTable; 8] = [
        FlowTable::ConntrackV4,
        FlowTable::ConntrackV6,
        FlowTable::EmbryonicV4,
        FlowTable::EmbryonicV6,
        FlowTable::LocalPeersV4,
        FlowTable::LocalPeersV6,
        FlowTable::Nat64Flows,
        FlowTable::Nat64Replies,
    ];

    /// The label value (`conntrack_v4`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            FlowTable::ConntrackV4 => "conntrack_v4",
            FlowTable::ConntrackV6 => "conntrack_v6",
            FlowTable::EmbryonicV4 => "embryonic_v4",
            FlowTable::EmbryonicV6 => "embryonic_v6",
            FlowTable::LocalPeersV4 => "local_peers_v4",
            FlowTable::LocalPeersV6 => "local_peers_v6",
            FlowTable::Nat64Flows => "nat64_flows",
            FlowTable::Nat64Replies => "nat64_replies",
        }
    }

    /// The kernel map's name.
    pub const fn map_name(self) -> &'static str {
        match self {
            FlowTable::ConntrackV4 => CONNTRACK_V4,
            FlowTable::ConntrackV6 => CONNTRACK_V6,
            FlowTable::EmbryonicV4 => EMBRYONIC_V4,
            FlowTable::EmbryonicV6 => EMBRYONIC_V6,
            FlowTable::LocalPeersV4 => LOCAL_PEERS_V4,
            FlowTable::LocalPeersV6 => LOCAL_PEERS_V6,
            FlowTable::Nat64Flows => NAT64_FLOWS,
            FlowTable::Nat64Replies => NAT64_REPLIES,
        }
    }
}

/// How full one flow table is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableUsage {
    /// The table.
    pub table: FlowTable,
    /// Entries in it now.
    pub entries: u64,
    /// Its capacity (`max_entries`); LRU tables evict the oldest entry beyond it.
    pub capacity: u64,
}

/// Which flows `flows` lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum FlowFilter {
    /// Flows to this published port.
    Port(u16),
    /// Flows to this backend address (and port, if given).
    Backend {
        /// The backend's address.
        ip: IpAddr,
        /// The backend's port; any if absent.
        #[serde(default)]
        port: Option<u16>,
    },
}

impl FlowFilter {
    /// Parses `flows`' argument: a port (`9000`), a backend address (`172.17.0.2`,
    /// `2001:db8::2`) or a backend address and port (`172.17.0.2:8080`,
    /// `[2001:db8::2]:8080`).
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Ok(port) = s.parse::<u16>() {
            return Ok(FlowFilter::Port(port));
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(FlowFilter::Backend { ip, port: None });
        }
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Ok(FlowFilter::Backend {
                ip: sa.ip(),
                port: Some(sa.port()),
            });
        }
        Err(format!(
            "`{s}` is neither a port nor a backend address (IP or IP:PORT)"
        ))
    }

    fn matches(&self, f: &FlowStatus) -> bool {
        match *self {
            FlowFilter::Port(p) => f.published.port() == p,
            FlowFilter::Backend { ip, port } => {
                f.backend.ip() == ip && port.is_none_or(|p| f.backend.port() == p)
            }
        }
    }
}

/// One live flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowStatus {
    /// The table it is in (`conntrack_v4`, `conntrack_v6`, `nat64_replies`, or
    /// `embryonic_v4`/`embryonic_v6` before the backend's answer proves it).
    pub table: FlowTable,
    /// The protocol.
    pub proto: Proto,
    /// The client's address and port.
    pub client: SocketAddr,
    /// The published address and port the client sent to.
    pub published: SocketAddr,
    /// The backend's address and port the flow goes to.
    pub backend: SocketAddr,
    /// Seconds since the flow's last packet, where the table records it (NAT64 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_secs: Option<u64>,
}

/// The answer to `flows`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowsReply {
    /// The flows that match, at most the limit asked for.
    pub flows: Vec<FlowStatus>,
    /// How many more match than are listed.
    pub more: u64,
    /// How full each table is.
    pub tables: Vec<TableUsage>,
}

/// The tables `flows` lists, in this order (the others are counted only: local peers
/// are keyed by socket, NAT64_FLOWS is the same flows as NAT64_REPLIES). Embryonic
/// flows come last, so a SYN flood does not crowd established flows out of a listing.
const LISTED: [FlowTable; 5] = [
    FlowTable::ConntrackV4,
    FlowTable::ConntrackV6,
    FlowTable::Nat64Replies,
    FlowTable::EmbryonicV4,
    FlowTable::EmbryonicV6,
];

/// The flows a listing keeps, up to its limit.
struct Collector {
    filter: Option<FlowFilter>,
    limit: usize,
    flows: Vec<FlowStatus>,
    /// Flows that matched beyond the limit (counted with a filter only).
    more: u64,
}

impl Collector {
    fn take(&mut self, f: FlowStatus) {
        if self.filter.is_none_or(|flt| flt.matches(&f)) {
            if self.flows.len() < self.limit {
                self.flows.push(f);
            } else {
                self.more += 1;
            }
        }
    }

    /// Without a filter, nothing past the limit needs reading: the tables' counts say
    /// how many more there are.
    fn done(&self) -> bool {
        self.filter.is_none() && self.flows.len() >= self.limit
    }
}

/// The dataplane's flow maps, through descriptors of their own.
pub struct FlowTables {
    maps: Vec<(FlowTable, Map)>,
}

impl FlowTables {
    /// New descriptors of `dp`'s flow maps (duplicated: `dp` keeps its own).
    pub fn new(dp: &Dataplane) -> Result<Self, DataplaneError> {
        let mut maps = Vec::with_capacity(FlowTable::ALL.len());
        for table in FlowTable::ALL {
            let name = table.map_name();
            let map = dp
                .ebpf()
                .map(name)
                .ok_or(DataplaneError::MissingMap(name))?;
            let data = map_data(map).ok_or(DataplaneError::MissingMap(name))?;
            let owned = data
                .info()
                .and_then(|info| MapData::from_id(info.id()))
                .and_then(Map::from_map_data)
                .map_err(|source| DataplaneError::Map { name, source })?;
            maps.push((table, owned));
        }
        Ok(Self { maps })
    }

    fn map(&self, table: FlowTable) -> Option<&Map> {
        self.maps.iter().find(|(t, _)| *t == table).map(|(_, m)| m)
    }

    /// How full every table is.
    pub fn usage(&self) -> Result<Vec<TableUsage>, DataplaneError> {
        FlowTable::ALL
            .into_iter()
            .map(|t| self.usage_of(t))
            .collect()
    }

    /// How full `table` is.
    pub fn usage_of(&self, table: FlowTable) -> Result<TableUsage, DataplaneError> {
        let name = table.map_name();
        let map = self.map(table).ok_or(DataplaneError::MissingMap(name))?;
        let capacity = map_data(map)
            .ok_or(DataplaneError::MissingMap(name))?
            .info()
            .map_err(|source| DataplaneError::Map { name, source })?
            .max_entries();
        let entries = match table {
            FlowTable::ConntrackV4 => count::<FlowKeyV4, FlowV4>(map, name)?,
            FlowTable::ConntrackV6 => count::<FlowKeyV6, FlowV6>(map, name)?,
            FlowTable::EmbryonicV4 => count::<FlowKeyV4, FlowV4>(map, name)?,
            FlowTable::EmbryonicV6 => count::<FlowKeyV6, FlowV6>(map, name)?,
            FlowTable::LocalPeersV4 => count::<LocalPeerKeyV4, LocalPeerV4>(map, name)?,
            FlowTable::LocalPeersV6 => count::<LocalPeerKeyV6, LocalPeerV6>(map, name)?,
            FlowTable::Nat64Flows => count::<FlowKeyV6, Nat64Flow>(map, name)?,
            FlowTable::Nat64Replies => count::<FlowKeyV4, Nat64Reply>(map, name)?,
        };
        Ok(TableUsage {
            table,
            entries: entries.min(u64::from(capacity)),
            capacity: u64::from(capacity),
        })
    }

    /// The live flows of remote clients that match `filter`, at most `limit` of them, and
    /// how full every table is. Without a filter the walk stops at the limit; with one it
    /// reads every flow to count the matches beyond it.
    pub fn list(
        &self,
        filter: Option<FlowFilter>,
        limit: u32,
    ) -> Result<FlowsReply, DataplaneError> {
        let tables = self.usage()?;
        let mut c = Collector {
            filter,
            limit: usize::try_from(limit).unwrap_or(usize::MAX),
            flows: Vec::new(),
            more: 0,
        };
        self.collect_v4(FlowTable::ConntrackV4, &mut c)?;
        self.collect_v6(FlowTable::ConntrackV6, &mut c)?;
        let now = monotonic_coarse_ns();
        let nat64 = self.typed::<FlowKeyV4, Nat64Reply>(FlowTable::Nat64Replies)?;
        for (k, v) in nat64.iter().filter_map(Result::ok) {
            if c.done() {
                break;
            }
            let Some(proto) = proto_of(k.proto()) else {
                continue;
            };
            let (backend, backend_port) = k.backend();
            c.take(FlowStatus {
                table: FlowTable::Nat64Replies,
                proto,
                client: SocketAddr::new(
                    Ipv6Addr::from(v.client_addr).into(),
                    u16::from_be_bytes(v.client_port),
                ),
                published: SocketAddr::new(
                    Ipv6Addr::from(v.host_addr).into(),
                    u16::from_be_bytes(v.host_port),
                ),
                backend: SocketAddr::new(backend.into(), backend_port),
                idle_secs: now.map(|now| now.saturating_sub(v.last_seen_ns) / 1_000_000_000),
            });
        }
        self.collect_v4(FlowTable::EmbryonicV4, &mut c)?;
        self.collect_v6(FlowTable::EmbryonicV6, &mut c)?;
        let more = if filter.is_none() {
            // The walk stopped at the limit: the rest is what the tables hold beyond it.
            let listed: u64 = tables
                .iter()
                .filter(|t| LISTED.contains(&t.table))
                .map(|t| t.entries)
                .sum();
            listed.saturating_sub(c.flows.len() as u64)
        } else {
            c.more
        };
        Ok(FlowsReply {
            flows: c.flows,
            more,
            tables,
        })
    }

    /// Lists an IPv4 table of conntrack's layout (established or embryonic).
    fn collect_v4(&self, table: FlowTable, c: &mut Collector) -> Result<(), DataplaneError> {
        let m = self.typed::<FlowKeyV4, FlowV4>(table)?;
        for (k, v) in m.iter().filter_map(Result::ok) {
            if c.done() {
                break;
            }
            if let Some(f) = conntrack_flow(table, k.proto(), k.client(), v.host(), k.backend()) {
                c.take(f);
            }
        }
        Ok(())
    }

    /// As [`Self::collect_v4`], IPv6.
    fn collect_v6(&self, table: FlowTable, c: &mut Collector) -> Result<(), DataplaneError> {
        let m = self.typed::<FlowKeyV6, FlowV6>(table)?;
        for (k, v) in m.iter().filter_map(Result::ok) {
            if c.done() {
                break;
            }
            if let Some(f) = conntrack_flow(table, k.proto(), k.client(), v.host(), k.backend()) {
                c.take(f);
            }
        }
        Ok(())
    }

    fn typed<K: aya::Pod, V: aya::Pod>(
        &self,
        table: FlowTable,
    ) -> Result<HashMap<&MapData, K, V>, DataplaneError> {
        let name = table.map_name();
        let map = self.map(table).ok_or(DataplaneError::MissingMap(name))?;
        HashMap::try_from(map).map_err(|source| DataplaneError::Map { name, source })
    }
}

/// A conntrack entry as a flow; `None` for a protocol portfwd does not translate.
fn conntrack_flow<A: Into<IpAddr>>(
    table: FlowTable,
    proto: u8,
    client: (A, u16),
    published: (A, u16),
    backend: (A, u16),
) -> Option<FlowStatus> {
    let sa = |(ip, port): (A, u16)| SocketAddr::new(ip.into(), port);
    Some(FlowStatus {
        table,
        proto: proto_of(proto)?,
        client: sa(client),
        published: sa(published),
        backend: sa(backend),
        idle_secs: None,
    })
}

fn proto_of(n: u8) -> Option<Proto> {
    match n {
        proto::TCP => Some(Proto::Tcp),
        proto::UDP => Some(Proto::Udp),
        _ => None,
    }
}

/// The entries of an LRU hash map, counted by walking its keys.
fn count<K: aya::Pod, V: aya::Pod>(map: &Map, name: &'static str) -> Result<u64, DataplaneError> {
    let m: HashMap<&MapData, K, V> =
        HashMap::try_from(map).map_err(|source| DataplaneError::Map { name, source })?;
    Ok(m.keys().filter(Result::is_ok).count() as u64)
}

/// The `MapData` behind any map kind the flow tables use.
fn map_data(map: &aya::maps::Map) -> Option<&MapData> {
    match map {
        aya::maps::Map::HashMap(d) | aya::maps::Map::LruHashMap(d) => Some(d),
        _ => None,
    }
}

/// `CLOCK_MONOTONIC_COARSE` now, the clock of `bpf_ktime_get_coarse_ns`.
fn monotonic_coarse_ns() -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    if rc != 0 {
        return None;
    }
    let secs = u64::try_from(ts.tv_sec).ok()?;
    let nanos = u64::try_from(ts.tv_nsec).ok()?;
    Some(secs * 1_000_000_000 + nanos)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn filter_parses_ports_and_backends() {
        assert_eq!(FlowFilter::parse("9000"), Ok(FlowFilter::Port(9000)));
        assert_eq!(
            FlowFilter::parse("172.17.0.2"),
            Ok(FlowFilter::Backend {
                ip: Ipv4Addr::new(172, 17, 0, 2).into(),
                port: None
            })
        );
        assert_eq!(
            FlowFilter::parse("[2001:db8::2]:8080"),
            Ok(FlowFilter::Backend {
                ip: "2001:db8::2".parse().expect("an address"),
                port: Some(8080)
            })
        );
        assert!(FlowFilter::parse("host:80").is_err());
        assert!(FlowFilter::parse("70000").is_err());
    }

    #[test]
    fn filter_matches_published_port_or_backend() {
        let f = FlowStatus {
            table: FlowTable::ConntrackV4,
            proto: Proto::Tcp,
            client: "10.0.0.1:40000".parse().expect("addr"),
            published: "10.0.0.2:9000".parse().expect("addr"),
            backend: "172.17.0.2:8080".parse().expect("addr"),
            idle_secs: None,
        };
        assert!(FlowFilter::Port(9000).matches(&f));
        assert!(!FlowFilter::Port(8080).matches(&f));
        assert!(FlowFilter::parse("172.17.0.2").expect("ok").matches(&f));
        assert!(FlowFilter::parse("172.17.0.2:8080")
            .expect("ok")
            .matches(&f));
        assert!(!FlowFilter::parse("172.17.0.2:9000")
            .expect("ok")
            .matches(&f));
        assert!(!FlowFilter::parse("172.17.0.3").expect("ok").matches(&f));
    }
}
