//! The daemon: its rule table (the source of truth for what is published), the counter
//! slot allocator, the request handler (add, del, list, apply), and the control-socket
//! server.
//!
//! Invariants:
//! - Every rule in [`RuleTable`] is in the kernel's rule maps, one entry per published
//!   port and family served (see `map_entries`), with the rule's backend port for that
//!   port and the rule's one counter slot (a range shares it); nothing else is. Every change goes through
//!   [`Daemon::commit`], which changes the table only after the kernel accepted every
//!   write, and undoes the writes it made when one fails: a failed request leaves both
//!   untouched.
//! - Conflicts follow Docker, per port: one (address, port, protocol) at a time; a
//!   family's wildcard (`0.0.0.0`, `[::]`) excludes every address of its family on the
//!   same port and protocol, and `*` (no host address) every address of both. A range conflicts at its first common port, which the error names.
//! - Each rule has a source: `cli` (`portfwd-ctl add`) or `file` (a declarations file).
//!   `apply` replaces the file rules only, keeps the ones the file still declares
//!   untouched (same map entries, so their flows go on), and refuses, changing nothing,
//!   when a file rule would conflict with a runtime rule.
//! - When a rule goes (del, or apply removing or changing it), the tracked flows to its
//!   backends are forgotten unless another rule still sends there, so no reply is
//!   translated from stale state and the next datagram follows the rules as they are.
//! - Nothing a client sends can stop the daemon: each connection is its own task with a
//!   read timeout and a size limit, every failure becomes an error response, and the
//!   code has no `unwrap`.
//!
//! - Families: `*` writes both maps' wildcard keys, an address its family's map. IPv4
//!   clients need a backend IPv4 address (the model refuses an IPv4 host address
//!   without one; `*` then serves IPv6 only); IPv6 clients go to the backend's IPv6
//!   address, or to its IPv4 one as `::ffff:a.b.c.d`, which only local clients reach.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    fs::{self, File, OpenOptions},
    future::Future,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use log::{debug, info, warn};
use nix::fcntl::{Flock, FlockArg};
use portfwd_common::{
    BackendV4, BackendV6, Reason, RuleKeyV4, RuleKeyV6, RuleStats, MAX_STATS_SLOTS,
};
use thiserror::Error;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::Semaphore,
};

use crate::{
    dataplane::{self, Attachment, Dataplane, DataplaneError},
    protocol::{
        self, ApplyReply, FileDeclaration, ListReply, LocalClients, Request, RuleReply, RuleStatus,
        Source, MAX_REQUEST,
    },
    rule::{
        self, Backend, Declaration, Host, HostPorts, PortRange, Proto, Publish, Rule, RuleError,
    },
};

/// How long a client may take to send its request (and to read the answer).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are refused with an error response.
pub const MAX_CONNECTIONS: usize = 64;
/// How often the host's addresses are re-read for wildcard rules.
pub const HOST_ADDR_REFRESH: Duration = Duration::from_secs(1);

/// Why a request failed. Each message is one line; the first two are Docker's words.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// `holder` is the published rule the port belongs to (not shown: Docker's words).
    #[error("Bind for {addr_port} failed: port is already allocated")]
    PortAllocated {
        addr_port: String,
        port: u16,
        holder: Publish,
    },
    #[error("No published port {publish}")]
    NotPublished { publish: Publish },
    #[error("No published port {publish}: it is part of {rule}, which is removed whole")]
    PartOfRange { publish: Publish, rule: Publish },
    /// `del` of one address or family where rules of others hold the port (`del 9000`
    /// with `0.0.0.0:9000` published, or the reverse).
    #[error("No published port {publish} (published there: {})", others.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))]
    PublishedOtherwise {
        publish: Publish,
        others: Vec<Publish>,
    },
    #[error("cannot publish {publish}: all {max} counter slots are in use", max = MAX_STATS_SLOTS)]
    NoSlot { publish: Publish },
    #[error("cannot {action} {publish}: {source}")]
    Kernel {
        action: &'static str,
        publish: Publish,
        #[source]
        source: Box<DataplaneError>,
    },
    #[error(
        "cannot publish {publish}: a local process already uses {what} (address already in use)"
    )]
    HeldLocally { publish: Publish, what: String },
    #[error("cannot publish {declaration}: {why}")]
    NoFreePort {
        declaration: Box<Declaration>,
        why: String,
    },
    #[error("{0}")]
    Invalid(#[from] RuleError),
    #[error("Bind for {addr_port} failed: port is already allocated (by line {line})")]
    AllocatedInFile { addr_port: String, line: u32 },
    #[error(
        "{publish} conflicts with the runtime rule {runtime} at port {port} \
         (added with portfwd-ctl add; del it first or drop it from the file)"
    )]
    RuntimeConflict {
        publish: String,
        runtime: Publish,
        port: u16,
    },
    /// An error of one entry of a declarations file.
    #[error("{file}:{line}: entry `{entry}`: {source}")]
    InFile {
        file: String,
        line: u32,
        entry: String,
        #[source]
        source: Box<DaemonError>,
    },
    #[error("cannot read the counters: {0}")]
    Stats(#[source] Box<DataplaneError>),
}

/// The dataplane as the daemon uses it: a trait so that the rule logic is testable
/// without BPF. [`Dataplane`] is the real one.
pub trait Kernel {
    fn insert_rule(&mut self, key: RuleKeyV4, backend: BackendV4) -> Result<(), DataplaneError>;
    fn remove_rule(&mut self, key: &RuleKeyV4) -> Result<(), DataplaneError>;
    fn reset_rule_stats(&mut self, slot: u32) -> Result<(), DataplaneError>;
    fn rule_stats(&self, slot: u32) -> Result<RuleStats, DataplaneError>;
    /// Forgets every tracked flow to one of `backends` (address, port, protocol number),
    /// in one pass over the flow table; returns how many.
    fn forget_flows(
        &mut self,
        backends: &BTreeSet<(Ipv4Addr, u16, u8)>,
    ) -> Result<usize, DataplaneError>;
    fn reason_stats(&self) -> Result<Vec<(Reason, u64)>, DataplaneError>;
    fn attachments(&self) -> Vec<Attachment>;
    fn sync_host_addrs(&mut self, addrs: &BTreeSet<Ipv4Addr>) -> Result<(), DataplaneError>;
    fn insert_rule_v6(&mut self, key: RuleKeyV6, backend: BackendV6) -> Result<(), DataplaneError>;
    fn remove_rule_v6(&mut self, key: &RuleKeyV6) -> Result<(), DataplaneError>;
    /// As [`Kernel::forget_flows`], for the IPv6 flow table.
    fn forget_flows_v6(
        &mut self,
        backends: &BTreeSet<(Ipv6Addr, u16, u8)>,
    ) -> Result<usize, DataplaneError>;
    fn sync_host_addrs_v6(&mut self, addrs: &BTreeSet<Ipv6Addr>) -> Result<(), DataplaneError>;
    /// Puts NAT64's entry where the IPv4 `backends` of IPv6 rules need it (see
    /// [`Dataplane::sync_nat64`]); the interfaces newly attached.
    fn sync_nat64(&mut self, backends: &BTreeSet<Ipv4Addr>) -> Result<Vec<String>, DataplaneError>;
    /// Interfaces where NAT64's entry runs.
    fn nat64_entries(&self) -> Vec<String>;
    /// The cgroup whose processes are served as local clients, if any.
    fn local_cgroup(&self) -> Option<PathBuf>;
    /// Whether a local process already holds `ip:port` for `proto` (a TCP listener, a
    /// bound UDP socket): publishing it would silently take its traffic.
    fn held_locally(&self, ip: IpAddr, port: u16, proto: Proto) -> bool;
    /// The host's ephemeral ports (`net.ipv4.ip_local_port_range` of the daemon's
    /// namespace), where "any free port" is chosen.
    fn ephemeral_ports(&self) -> PortRange;
    /// Re-reads what the fast path needs from the host (the bridges' forwarding
    /// databases); nothing when the fast path is off.
    fn refresh_fast_path(&mut self) -> Result<(), DataplaneError> {
        Ok(())
    }
}

impl Kernel for Dataplane {
    fn insert_rule(&mut self, key: RuleKeyV4, backend: BackendV4) -> Result<(), DataplaneError> {
        Dataplane::insert_rule(self, key, backend)
    }
    fn remove_rule(&mut self, key: &RuleKeyV4) -> Result<(), DataplaneError> {
        Dataplane::remove_rule(self, key)
    }
    fn reset_rule_stats(&mut self, slot: u32) -> Result<(), DataplaneError> {
        Dataplane::reset_rule_stats(self, slot)
    }
    fn rule_stats(&self, slot: u32) -> Result<RuleStats, DataplaneError> {
        Dataplane::rule_stats(self, slot)
    }
    fn forget_flows(
        &mut self,
        backends: &BTreeSet<(Ipv4Addr, u16, u8)>,
    ) -> Result<usize, DataplaneError> {
        Dataplane::forget_flows(self, backends)
    }
    fn reason_stats(&self) -> Result<Vec<(Reason, u64)>, DataplaneError> {
        Dataplane::reason_stats(self)
    }
    fn attachments(&self) -> Vec<Attachment> {
        Dataplane::attachments(self).to_vec()
    }
    fn sync_host_addrs(&mut self, addrs: &BTreeSet<Ipv4Addr>) -> Result<(), DataplaneError> {
        Dataplane::sync_host_addrs(self, addrs)
    }
    fn insert_rule_v6(&mut self, key: RuleKeyV6, backend: BackendV6) -> Result<(), DataplaneError> {
        Dataplane::insert_rule_v6(self, key, backend)
    }
    fn remove_rule_v6(&mut self, key: &RuleKeyV6) -> Result<(), DataplaneError> {
        Dataplane::remove_rule_v6(self, key)
    }
    fn forget_flows_v6(
        &mut self,
        backends: &BTreeSet<(Ipv6Addr, u16, u8)>,
    ) -> Result<usize, DataplaneError> {
        Dataplane::forget_flows_v6(self, backends)
    }
    fn sync_host_addrs_v6(&mut self, addrs: &BTreeSet<Ipv6Addr>) -> Result<(), DataplaneError> {
        Dataplane::sync_host_addrs_v6(self, addrs)
    }
    fn sync_nat64(&mut self, backends: &BTreeSet<Ipv4Addr>) -> Result<Vec<String>, DataplaneError> {
        Dataplane::sync_nat64(self, backends)
    }
    fn nat64_entries(&self) -> Vec<String> {
        Dataplane::nat64_entries(self).to_vec()
    }
    fn local_cgroup(&self) -> Option<PathBuf> {
        Dataplane::local_cgroup(self).map(Path::to_path_buf)
    }
    fn held_locally(&self, ip: IpAddr, port: u16, proto: Proto) -> bool {
        port_held_locally(ip, port, proto)
    }
    fn ephemeral_ports(&self) -> PortRange {
        ephemeral_ports()
    }
    fn refresh_fast_path(&mut self) -> Result<(), DataplaneError> {
        if self.fast_path() {
            // A failed read keeps the last known ports: stale entries only fall back.
            if let Ok(ports) = dataplane::bridge_ports() {
                self.sync_bridge_ports(&ports)?;
            }
        }
        Ok(())
    }
}

/// Tries to bind `ip:port` in this namespace. TCP uses `SO_REUSEADDR`, so only a
/// listener (not a connection in TIME_WAIT or a client's ephemeral port) counts. An
/// address that is not the host's (`EADDRNOTAVAIL`) is held by no local process, and
/// neither is a port the daemon publishes (its bind4 program refuses with `EPERM`).
pub fn port_held_locally(ip: IpAddr, port: u16, proto: Proto) -> bool {
    use nix::sys::socket::{
        bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn,
        SockaddrIn6,
    };
    use std::os::fd::AsRawFd;
    let ty = match proto {
        Proto::Tcp => SockType::Stream,
        Proto::Udp => SockType::Datagram,
    };
    let family = match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    let Ok(fd) = socket(family, ty, SockFlag::SOCK_CLOEXEC, None) else {
        return false;
    };
    if ty == SockType::Stream {
        let _ = setsockopt(&fd, sockopt::ReuseAddr, &true);
    }
    let bound = match ip {
        IpAddr::V4(v4) => bind(
            fd.as_raw_fd(),
            &SockaddrIn::from(std::net::SocketAddrV4::new(v4, port)),
        ),
        IpAddr::V6(v6) => bind(
            fd.as_raw_fd(),
            &SockaddrIn6::from(std::net::SocketAddrV6::new(v6, port, 0, 0)),
        ),
    };
    matches!(bound, Err(nix::errno::Errno::EADDRINUSE))
}

/// `net.ipv4.ip_local_port_range` of this network namespace, or Linux's default.
pub fn ephemeral_ports() -> PortRange {
    let read = || -> Option<PortRange> {
        let text = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
        let mut it = text.split_whitespace().map(str::parse::<u16>);
        let (lo, hi) = (it.next()?.ok()?, it.next()?.ok()?);
        PortRange::new(lo, hi).ok()
    };
    read().unwrap_or(PortRange::LINUX_EPHEMERAL)
}

/// Hands out counter slots `0..MAX_STATS_SLOTS`. Fresh slots go first and freed ones are
/// reused oldest first, so a slot rests as long as possible before reuse (a deleted
/// rule's last packets may still be counted in it).
#[derive(Debug, Default)]
pub struct SlotAllocator {
    next: u32,
    free: VecDeque<u32>,
}

impl SlotAllocator {
    pub fn alloc(&mut self) -> Option<u32> {
        if self.next < MAX_STATS_SLOTS {
            self.next += 1;
            Some(self.next - 1)
        } else {
            self.free.pop_front()
        }
    }
    pub fn release(&mut self, slot: u32) {
        self.free.push_back(slot);
    }
}

/// One published rule as the daemon holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub backend: Backend,
    pub stats_slot: u32,
    pub source: Source,
}

/// The published rules, keyed by what is published. Pure: no kernel calls.
#[derive(Clone, Debug, Default)]
pub struct RuleTable {
    rules: BTreeMap<Publish, Entry>,
}

impl RuleTable {
    /// The rule `publish` would conflict with at its first common port, if any (when
    /// several would, the one with the lowest such port).
    pub fn first_conflict(&self, publish: &Publish) -> Option<(u16, Publish)> {
        self.rules
            .keys()
            .filter_map(|p| publish.conflict(p).map(|port| (port, *p)))
            .min()
    }
    /// Docker's conflict check: the error `add` gives if `publish` cannot be added.
    pub fn check_free(&self, publish: &Publish) -> Result<(), DaemonError> {
        match self.first_conflict(publish) {
            Some((port, holder)) => Err(DaemonError::PortAllocated {
                addr_port: rule::addr_port(publish.host(), port),
                port,
                holder,
            }),
            None => Ok(()),
        }
    }
    pub fn get(&self, publish: &Publish) -> Option<&Entry> {
        self.rules.get(publish)
    }
    pub fn iter(&self) -> impl Iterator<Item = (&Publish, &Entry)> {
        self.rules.iter()
    }
    pub fn len(&self) -> usize {
        self.rules.len()
    }
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
    /// Whether any rule sends `proto` traffic to `ip:port`.
    pub fn uses_backend(&self, ip: IpAddr, port: u16, proto: Proto) -> bool {
        self.rules.iter().any(|(p, e)| {
            p.proto() == proto
                && e.backend.addrs().ips().any(|b| b == ip)
                && e.backend.ports().contains(port)
        })
    }
    /// Whether one of the rules holds `port` of `ip`/`proto` for local binds (exactly
    /// that address, or `*` for either wildcard).
    fn publishes(&self, ip: IpAddr, port: u16, proto: Proto) -> bool {
        self.rules.keys().any(|p| {
            p.host().bind_addrs().contains(&ip) && p.proto() == proto && p.ports().contains(port)
        })
    }
    fn insert(&mut self, publish: Publish, entry: Entry) {
        self.rules.insert(publish, entry);
    }
    fn remove(&mut self, publish: &Publish) -> Option<Entry> {
        self.rules.remove(publish)
    }
}

/// A key of `RULES_V4` or `RULES_V6`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum MapKey {
    V4(RuleKeyV4),
    V6(RuleKeyV6),
}

impl MapKey {
    fn port(&self) -> u16 {
        match self {
            MapKey::V4(k) => k.port(),
            MapKey::V6(k) => k.port(),
        }
    }
}

/// One kernel rule entry, key and value of the same family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MapEntry {
    V4(RuleKeyV4, BackendV4),
    V6(RuleKeyV6, BackendV6),
}

impl MapEntry {
    fn key(&self) -> MapKey {
        match self {
            MapEntry::V4(k, _) => MapKey::V4(*k),
            MapEntry::V6(k, _) => MapKey::V6(*k),
        }
    }
}

/// One write to a rules map: `key` set to `new` (or deleted), and what it held before
/// (to undo it).
struct Write {
    key: MapKey,
    new: Option<MapEntry>,
    old: Option<MapEntry>,
    /// The rule it belongs to, for messages.
    owner: Publish,
}

/// Sets `key` to `entry` (same key), or deletes it.
fn write_entry<K: Kernel>(
    kernel: &mut K,
    key: MapKey,
    entry: Option<MapEntry>,
) -> Result<(), DataplaneError> {
    match (entry, key) {
        (Some(MapEntry::V4(k, b)), _) => kernel.insert_rule(k, b),
        (Some(MapEntry::V6(k, b)), _) => kernel.insert_rule_v6(k, b),
        (None, MapKey::V4(k)) => kernel.remove_rule(&k),
        (None, MapKey::V6(k)) => kernel.remove_rule_v6(&k),
    }
}

/// The kernel's view of a rule: one entry per port and family served, all with its
/// slot. IPv4 clients go to the backend's IPv4 address (`RULES_V4`); IPv6 clients to its
/// IPv6 address, or to its IPv4 one as `::ffff:a.b.c.d`, which the socket hooks serve and
/// the packet path passes (`RULES_V6`). `*` takes each family's wildcard key.
fn map_entries(
    publish: &Publish,
    backend: &Backend,
    slot: u32,
) -> Result<Vec<MapEntry>, DaemonError> {
    let proto = publish.proto().number();
    let host = publish.host();
    let addrs = backend.addrs();
    let pairs = || publish.ports().ports().zip(backend.ports().ports());
    let mut entries = Vec::new();
    if host.serves_v4() {
        let h = match host.ip() {
            Some(IpAddr::V4(h)) => h,
            _ => Ipv4Addr::UNSPECIFIED,
        };
        match addrs.v4() {
            Some(b) => entries.extend(pairs().map(|(hp, bp)| {
                MapEntry::V4(
                    RuleKeyV4::from_parts(h, hp, proto),
                    BackendV4::new(b, bp, slot),
                )
            })),
            // `*` to an IPv6-only backend: no IPv4 client can reach it.
            None if host == Host::Any => {}
            None => {
                return Err(DaemonError::Invalid(RuleError::FamilyMismatch {
                    host: IpAddr::V4(h),
                    backend: addrs,
                }))
            }
        }
    }
    if host.serves_v6() {
        let h = match host.ip() {
            Some(IpAddr::V6(h)) => h,
            _ => Ipv6Addr::UNSPECIFIED,
        };
        let b = addrs.for_v6_clients();
        entries.extend(pairs().map(|(hp, bp)| {
            MapEntry::V6(
                RuleKeyV6::from_parts(h, hp, proto),
                BackendV6::new(b, bp, slot),
            )
        }));
    }
    Ok(entries)
}

/// The daemon's state: the kernel side and the table that mirrors it.
pub struct Daemon<K> {
    kernel: K,
    table: RuleTable,
    slots: SlotAllocator,
    host_addrs: Option<BTreeSet<Ipv4Addr>>,
    host_addrs_failing: bool,
    host_addrs_v6: Option<BTreeSet<Ipv6Addr>>,
    host_addrs_v6_failing: bool,
    nat64_failing: bool,
}

impl<K: Kernel> Daemon<K> {
    pub fn new(kernel: K) -> Self {
        Self {
            kernel,
            table: RuleTable::default(),
            slots: SlotAllocator::default(),
            host_addrs: None,
            host_addrs_failing: false,
            host_addrs_v6: None,
            host_addrs_v6_failing: false,
            nat64_failing: false,
        }
    }

    pub fn kernel(&self) -> &K {
        &self.kernel
    }

    pub fn table(&self) -> &RuleTable {
        &self.table
    }

    /// Publishes `decl` as a runtime (`cli`) rule, choosing its host ports if it leaves
    /// them open, or fails leaving everything as it was.
    pub fn add(&mut self, decl: Declaration) -> Result<RuleReply, DaemonError> {
        let rule = self.resolve(&decl, &self.table)?;
        self.commit(&[], &[rule], Source::Cli)?;
        info!("published {rule} (source cli)");
        Ok(RuleReply {
            publish: rule.publish,
            backend: rule.backend,
        })
    }

    /// The concrete rule for `decl` given the rules in `view`: exact ports if free, else
    /// the first free port of a range, else any free block of the ephemeral range.
    fn resolve(&self, decl: &Declaration, view: &RuleTable) -> Result<Rule, DaemonError> {
        let (ip, proto, backend) = (decl.host(), decl.proto(), decl.backend());
        match decl.host_ports() {
            HostPorts::Exact(ports) => {
                let publish = Publish::new(ip, ports, proto)?;
                view.check_free(&publish)?;
                if let Some(port) = self.first_held(&publish) {
                    return Err(DaemonError::HeldLocally {
                        publish,
                        what: if ports.is_single() {
                            "it".to_string()
                        } else {
                            format!("port {port}")
                        },
                    });
                }
                Ok(Rule::new(publish, backend)?)
            }
            HostPorts::FirstFree(range) => {
                for port in range.ports() {
                    let publish = Publish::single(ip, port, proto)?;
                    if view.first_conflict(&publish).is_none()
                        && self.first_held(&publish).is_none()
                    {
                        return Ok(Rule::new(publish, backend)?);
                    }
                }
                Err(DaemonError::NoFreePort {
                    declaration: Box::new(*decl),
                    why: format!("every port of {range} is already allocated or in use"),
                })
            }
            HostPorts::Any => {
                let eph = self.kernel.ephemeral_ports();
                let n = backend.ports().len();
                let mut start = eph.start();
                while let Some(ports) =
                    PortRange::from_len(start, n).filter(|r| r.end() <= eph.end())
                {
                    let publish = Publish::new(ip, ports, proto)?;
                    let taken = view
                        .first_conflict(&publish)
                        .map(|(port, _)| port)
                        .or_else(|| self.first_held(&publish));
                    match taken {
                        None => return Ok(Rule::new(publish, backend)?),
                        Some(port) if port < u16::MAX => start = port + 1,
                        Some(_) => break,
                    }
                }
                Err(DaemonError::NoFreePort {
                    declaration: Box::new(*decl),
                    why: format!(
                        "no {n} free consecutive port{} in the ephemeral range {eph}",
                        if n == 1 { "" } else { "s" }
                    ),
                })
            }
        }
    }

    /// The first port of `publish` a local process holds. Ports the daemon publishes
    /// itself are skipped (their rule was checked when published).
    fn first_held(&self, publish: &Publish) -> Option<u16> {
        let (addrs, proto) = (publish.host().bind_addrs(), publish.proto());
        publish.ports().ports().find(|&port| {
            addrs.iter().any(|&ip| {
                !self.table.publishes(ip, port, proto) && self.kernel.held_locally(ip, port, proto)
            })
        })
    }

    /// Removes the rules `remove` and publishes `add` (with `source`) in one step: every
    /// kernel write succeeds and the table follows, or the writes made are undone and
    /// nothing changes. New entries are written before stale ones are deleted, so a port
    /// whose backend changes is overwritten in place and never unpublished in between.
    /// Entries of rules in neither list are not touched.
    pub fn commit(
        &mut self,
        remove: &[Publish],
        add: &[Rule],
        source: Source,
    ) -> Result<(), DaemonError> {
        // Counter slots first: running out changes nothing.
        let mut slots = Vec::with_capacity(add.len());
        for rule in add {
            match self.slots.alloc() {
                Some(s) => slots.push(s),
                None => {
                    for s in slots {
                        self.slots.release(s);
                    }
                    return Err(DaemonError::NoSlot {
                        publish: rule.publish,
                    });
                }
            }
        }
        let release = |d: &mut Self, slots: &[u32]| {
            for &s in slots {
                d.slots.release(s);
            }
        };
        // The writes, with what each key holds now.
        let mut old: HashMap<MapKey, (MapEntry, Publish)> = HashMap::new();
        for p in remove {
            let Some(e) = self.table.get(p) else {
                release(self, &slots);
                return Err(DaemonError::NotPublished { publish: *p });
            };
            for v in map_entries(p, &e.backend, e.stats_slot)? {
                old.insert(v.key(), (v, *p));
            }
        }
        let mut writes = Vec::new();
        for (rule, &slot) in add.iter().zip(&slots) {
            let entries = match map_entries(&rule.publish, &rule.backend, slot) {
                Ok(e) => e,
                Err(e) => {
                    release(self, &slots);
                    return Err(e);
                }
            };
            for v in entries {
                let key = v.key();
                writes.push(Write {
                    key,
                    new: Some(v),
                    old: old.remove(&key).map(|(b, _)| b),
                    owner: rule.publish,
                });
            }
        }
        let mut deletes: Vec<Write> = old
            .into_iter()
            .map(|(key, (b, owner))| Write {
                key,
                new: None,
                old: Some(b),
                owner,
            })
            .collect();
        deletes.sort_by_key(|w| (w.owner, w.key.port()));
        writes.extend(deletes);

        let mut failed = None;
        for (rule, &slot) in add.iter().zip(&slots) {
            if let Err(e) = self.kernel.reset_rule_stats(slot) {
                failed = Some((0, "publish", rule.publish, e));
                break;
            }
        }
        let mut done = 0;
        if failed.is_none() {
            for w in &writes {
                let r = write_entry(&mut self.kernel, w.key, w.new);
                if let Err(e) = r {
                    let action = if w.new.is_some() {
                        "publish"
                    } else {
                        "unpublish"
                    };
                    failed = Some((done, action, w.owner, e));
                    break;
                }
                done += 1;
            }
        }
        if let Some((done, action, publish, source)) = failed {
            // Roll back, newest first; a failing undo is logged (the kernel refuses
            // writes only when something is badly wrong).
            for w in writes[..done].iter().rev() {
                let r = write_entry(&mut self.kernel, w.key, w.old);
                if let Err(e) = r {
                    warn!(
                        "cannot undo a change to {} port {}: {e}",
                        w.owner,
                        w.key.port()
                    );
                }
            }
            release(self, &slots);
            return Err(DaemonError::Kernel {
                action,
                publish,
                source: Box::new(source),
            });
        }

        // The kernel has it all: the table follows.
        let mut gone = Vec::new();
        for p in remove {
            if let Some(e) = self.table.remove(p) {
                self.slots.release(e.stats_slot);
                gone.push((*p, e.backend));
                info!("unpublished {p} -> {}", e.backend);
            }
        }
        for (rule, &slot) in add.iter().zip(&slots) {
            self.table.insert(
                rule.publish,
                Entry {
                    backend: rule.backend,
                    stats_slot: slot,
                    source,
                },
            );
        }
        self.forget_stale_flows(&gone);
        self.sync_nat64();
        Ok(())
    }

    /// Keeps NAT64's entry program where the rules' IPv4-only backends need it (a rule
    /// serving IPv6 clients with a backend that has no IPv6 address); logs once when this
    /// starts or stops failing. Called after every change and every refresh.
    pub fn sync_nat64(&mut self) {
        let backends: BTreeSet<Ipv4Addr> = self
            .table
            .iter()
            .filter(|(p, e)| p.host().serves_v6() && e.backend.addrs().v6().is_none())
            .filter_map(|(_, e)| e.backend.addrs().v4())
            .collect();
        match self.kernel.sync_nat64(&backends) {
            Ok(attached) => {
                for iface in attached {
                    info!("NAT64 entry attached to {iface} (TC ingress)");
                }
                if self.nat64_failing {
                    info!("NAT64 entries attached again");
                }
                self.nat64_failing = false;
            }
            Err(e) => {
                if !self.nat64_failing {
                    warn!("cannot attach NAT64's entry: {e}");
                }
                self.nat64_failing = true;
            }
        }
    }

    /// Forgets the tracked flows to the backends of rules that went, unless another rule
    /// still sends to them.
    fn forget_stale_flows(&mut self, gone: &[(Publish, Backend)]) {
        let (mut stale, mut stale_v6) = (BTreeSet::new(), BTreeSet::new());
        for (p, b) in gone {
            for ip in b.addrs().ips() {
                for port in b.ports().ports() {
                    if self.table.uses_backend(ip, port, p.proto()) {
                        continue;
                    }
                    match ip {
                        IpAddr::V4(ip) => stale.insert((ip, port, p.proto().number())),
                        IpAddr::V6(ip) => stale_v6.insert((ip, port, p.proto().number())),
                    };
                }
            }
        }
        if !stale.is_empty() {
            match self.kernel.forget_flows(&stale) {
                Ok(n) => debug!("forgot {n} tracked flows to {} backend ports", stale.len()),
                Err(e) => warn!("cannot forget the tracked flows of removed rules: {e}"),
            }
        }
        if !stale_v6.is_empty() {
            match self.kernel.forget_flows_v6(&stale_v6) {
                Ok(n) => debug!(
                    "forgot {n} tracked IPv6 flows to {} backend ports",
                    stale_v6.len()
                ),
                Err(e) => warn!("cannot forget the tracked IPv6 flows of removed rules: {e}"),
            }
        }
    }

    /// Unpublishes `publish` (a whole rule, as `list` shows it): new flows stop at once;
    /// tracked flows to its backend are forgotten unless another rule still sends there.
    pub fn del(&mut self, publish: Publish) -> Result<RuleReply, DaemonError> {
        let Some(entry) = self.table.get(&publish).copied() else {
            let part_of = self.table.iter().find(|(p, _)| {
                p.host() == publish.host()
                    && p.proto() == publish.proto()
                    && p.ports().first_common(&publish.ports()).is_some()
            });
            let others: Vec<Publish> = self
                .table
                .iter()
                .map(|(p, _)| *p)
                .filter(|p| p.conflict(&publish).is_some())
                .collect();
            return Err(match part_of {
                Some((rule, _)) => DaemonError::PartOfRange {
                    publish,
                    rule: *rule,
                },
                None if !others.is_empty() => DaemonError::PublishedOtherwise { publish, others },
                None => DaemonError::NotPublished { publish },
            });
        };
        self.commit(&[publish], &[], entry.source)
            .map_err(|e| match e {
                DaemonError::Kernel {
                    publish, source, ..
                } => DaemonError::Kernel {
                    action: "unpublish",
                    publish,
                    source,
                },
                other => other,
            })?;
        Ok(RuleReply {
            publish,
            backend: entry.backend,
        })
    }

    /// Replaces the file-sourced rules with `declarations` (from `file`), atomically:
    /// every entry is validated and every port resolved before anything changes; rules
    /// the file still declares stay as they are (same map entries, same counters); a
    /// file rule that would conflict with a runtime rule refuses the whole apply. With
    /// `dry_run`, only says what would change.
    pub fn apply(
        &mut self,
        file: &str,
        declarations: &[FileDeclaration],
        dry_run: bool,
    ) -> Result<ApplyReply, DaemonError> {
        let in_file = |d: &FileDeclaration, e: DaemonError| DaemonError::InFile {
            file: file.to_string(),
            line: d.line,
            entry: d.entry.clone(),
            source: Box::new(e),
        };
        let mut decls = Vec::with_capacity(declarations.len());
        for d in declarations {
            let decl = Declaration::new(d.publish, d.backend).map_err(|e| in_file(d, e.into()))?;
            decls.push(decl);
        }
        // Rules the file still declares stay; the other file rules go.
        let mut unclaimed: BTreeSet<Publish> = self
            .table
            .iter()
            .filter(|(_, e)| e.source == Source::File)
            .map(|(p, _)| *p)
            .collect();
        let mut unchanged = Vec::new();
        let mut pending = Vec::new();
        let mut lines: BTreeMap<Publish, u32> = BTreeMap::new();
        for (d, decl) in declarations.iter().zip(&decls) {
            let kept = unclaimed.iter().copied().find(|p| {
                self.table.get(p).is_some_and(|e| {
                    decl.satisfied_by(&Rule {
                        publish: *p,
                        backend: e.backend,
                    })
                })
            });
            match kept {
                Some(p) => {
                    unclaimed.remove(&p);
                    lines.insert(p, d.line);
                    unchanged.push(p);
                }
                None => pending.push((d, decl)),
            }
        }
        let removed: Vec<Publish> = unclaimed.into_iter().collect();
        let mut view = self.table.clone();
        for p in &removed {
            view.remove(p);
        }
        let mut added = Vec::new();
        for (d, decl) in pending {
            let rule = self.resolve(decl, &view).map_err(|e| {
                let e = match e {
                    DaemonError::PortAllocated {
                        addr_port,
                        port,
                        holder,
                    } => match (view.get(&holder).map(|e| e.source), lines.get(&holder)) {
                        (Some(Source::Cli), _) => DaemonError::RuntimeConflict {
                            publish: decl.to_string(),
                            runtime: holder,
                            port,
                        },
                        (_, Some(&line)) => DaemonError::AllocatedInFile { addr_port, line },
                        _ => DaemonError::PortAllocated {
                            addr_port,
                            port,
                            holder,
                        },
                    },
                    other => other,
                };
                in_file(d, e)
            })?;
            view.insert(
                rule.publish,
                Entry {
                    backend: rule.backend,
                    stats_slot: u32::MAX,
                    source: Source::File,
                },
            );
            lines.insert(rule.publish, d.line);
            added.push(rule);
        }
        let reply_of = |p: &Publish| {
            self.table.get(p).map(|e| RuleReply {
                publish: *p,
                backend: e.backend,
            })
        };
        let mut reply = ApplyReply {
            dry_run,
            added: added
                .iter()
                .map(|r| RuleReply {
                    publish: r.publish,
                    backend: r.backend,
                })
                .collect(),
            removed: removed.iter().filter_map(reply_of).collect(),
            unchanged: unchanged.iter().filter_map(reply_of).collect(),
        };
        for list in [&mut reply.added, &mut reply.removed, &mut reply.unchanged] {
            list.sort_by_key(|r| r.publish);
        }
        if dry_run {
            return Ok(reply);
        }
        self.commit(&removed, &added, Source::File)?;
        info!(
            "applied {file}: {} added, {} removed, {} unchanged",
            reply.added.len(),
            reply.removed.len(),
            reply.unchanged.len()
        );
        Ok(reply)
    }

    /// Every rule with its counters, the attachments and the reason counters.
    pub fn list(&self) -> Result<ListReply, DaemonError> {
        let rules = self
            .table
            .iter()
            .map(|(p, e)| {
                let s = self
                    .kernel
                    .rule_stats(e.stats_slot)
                    .map_err(|e| DaemonError::Stats(Box::new(e)))?;
                Ok(RuleStatus {
                    host_ip: p.host(),
                    host_port: p.host_port(),
                    host_port_end: p.ports().end(),
                    proto: p.proto(),
                    backend_ip: e.backend.addrs().first(),
                    backend_ip6: e.backend.addrs().v4().and(e.backend.addrs().v6()),
                    backend_port: e.backend.port(),
                    backend_port_end: e.backend.ports().end(),
                    source: e.source,
                    packets: s.packets,
                    bytes: s.bytes,
                    reply_packets: s.reply_packets,
                    reply_bytes: s.reply_bytes,
                    local: s.local,
                })
            })
            .collect::<Result<_, DaemonError>>()?;
        let reasons = self
            .kernel
            .reason_stats()
            .map_err(|e| DaemonError::Stats(Box::new(e)))?
            .into_iter()
            .map(|(r, n)| (r.name().to_string(), n))
            .collect();
        let cgroup = self.kernel.local_cgroup();
        Ok(ListReply {
            rules,
            interfaces: self.kernel.attachments(),
            nat64_entries: self.kernel.nat64_entries(),
            reasons,
            local_clients: LocalClients {
                served: cgroup.is_some(),
                cgroup: cgroup.map(|c| c.display().to_string()),
            },
        })
    }

    /// Answers one request line with one response line (`\n` included).
    pub fn handle_line(&mut self, line: &[u8]) -> Vec<u8> {
        let req = match serde_json::from_slice::<Request>(line) {
            Ok(req) => req,
            Err(e) => return protocol::encode_err(&format!("invalid request: {e}")),
        };
        let reply = match req {
            Request::Add { publish, backend } => Declaration::new(publish, backend)
                .map_err(DaemonError::from)
                .and_then(|d| self.add(d))
                .map(|r| protocol::encode_ok(&r)),
            Request::Del { publish } => self.del(publish).map(|r| protocol::encode_ok(&r)),
            Request::List => self.list().map(|r| protocol::encode_ok(&r)),
            Request::Apply {
                file,
                dry_run,
                declarations,
            } => self
                .apply(&file, &declarations, dry_run)
                .map(|r| protocol::encode_ok(&r)),
        };
        reply.unwrap_or_else(|e| {
            debug!("request failed: {e}");
            protocol::encode_err(&e.to_string())
        })
    }

    /// Makes the kernel's host addresses (what wildcard rules match) equal to `addrs`;
    /// logs once when this starts or stops failing.
    pub fn set_host_addrs(&mut self, addrs: BTreeSet<Ipv4Addr>) {
        if self.host_addrs.as_ref() == Some(&addrs) {
            return;
        }
        match self.kernel.sync_host_addrs(&addrs) {
            Ok(()) => {
                debug!("host addresses: {addrs:?}");
                if self.host_addrs_failing {
                    info!("host addresses updated again");
                }
                self.host_addrs_failing = false;
                self.host_addrs = Some(addrs);
            }
            Err(e) => {
                if !self.host_addrs_failing {
                    warn!("cannot update the host addresses: {e}");
                }
                self.host_addrs_failing = true;
                self.host_addrs = None;
            }
        }
    }

    /// As [`Self::set_host_addrs`], for the IPv6 addresses (what `::` rules match).
    pub fn set_host_addrs_v6(&mut self, addrs: BTreeSet<Ipv6Addr>) {
        if self.host_addrs_v6.as_ref() == Some(&addrs) {
            return;
        }
        match self.kernel.sync_host_addrs_v6(&addrs) {
            Ok(()) => {
                debug!("host IPv6 addresses: {addrs:?}");
                if self.host_addrs_v6_failing {
                    info!("host IPv6 addresses updated again");
                }
                self.host_addrs_v6_failing = false;
                self.host_addrs_v6 = Some(addrs);
            }
            Err(e) => {
                if !self.host_addrs_v6_failing {
                    warn!("cannot update the host IPv6 addresses: {e}");
                }
                self.host_addrs_v6_failing = true;
                self.host_addrs_v6 = None;
            }
        }
    }
}

/// The daemon shared between connection tasks. The lock is never held across an await.
pub type Shared<K> = Arc<Mutex<Daemon<K>>>;

/// Locks, recovering from poisoning: every operation keeps the table consistent before
/// it can fail, so the state behind a poisoned lock is still good.
fn lock<K>(d: &Mutex<Daemon<K>>) -> MutexGuard<'_, Daemon<K>> {
    d.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Serves the control socket and refreshes the host addresses until `shutdown`
/// completes. Returns without touching the daemon's state.
pub async fn serve<K: Kernel + Send + 'static>(
    listener: UnixListener,
    daemon: Shared<K>,
    shutdown: impl Future<Output = ()>,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut refresh = tokio::time::interval(HOST_ADDR_REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = refresh.tick() => {
                let mut d = lock(&daemon);
                d.set_host_addrs(dataplane::local_ipv4_addrs());
                d.set_host_addrs_v6(dataplane::local_ipv6_addrs());
                d.sync_nat64();
                if let Err(e) = d.kernel.refresh_fast_path() {
                    debug!("cannot refresh the fast path's bridge ports: {e}");
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match limit.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let daemon = daemon.clone();
                        tokio::spawn(async move {
                            serve_connection(stream, &daemon).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        let _ = stream.try_write(&protocol::encode_err(
                            "too many connections to the daemon; try again",
                        ));
                    }
                },
                Err(e) => {
                    // E.g. out of file descriptors: wait instead of spinning.
                    warn!("cannot accept a control connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Reads one request (bounded in time and size), answers it, closes.
async fn serve_connection<K: Kernel>(mut stream: UnixStream, daemon: &Mutex<Daemon<K>>) {
    let reply = match tokio::time::timeout(CLIENT_TIMEOUT, read_request(&mut stream)).await {
        Err(_) => Some(protocol::encode_err(&format!(
            "no complete request within {} s",
            CLIENT_TIMEOUT.as_secs()
        ))),
        Ok(Err(ReadError::TooLarge)) => Some(protocol::encode_err(&format!(
            "request larger than {MAX_REQUEST} bytes"
        ))),
        Ok(Err(ReadError::Io(e))) => {
            debug!("control connection: {e}");
            None
        }
        // Connected and closed without a word: nothing to answer.
        Ok(Ok(None)) => None,
        Ok(Ok(Some(line))) => Some(lock(daemon).handle_line(&line)),
    };
    if let Some(reply) = reply {
        match tokio::time::timeout(CLIENT_TIMEOUT, stream.write_all(&reply)).await {
            Ok(Ok(())) => {
                let _ = stream.shutdown().await;
            }
            Ok(Err(e)) => debug!("cannot answer a control connection: {e}"),
            Err(_) => debug!("a control client did not read its answer"),
        }
    }
}

enum ReadError {
    TooLarge,
    Io(io::Error),
}

/// One line, without its `\n`. A request the client ended by closing its side (no
/// newline) is taken as is; the JSON parser judges it.
async fn read_request(stream: &mut UnixStream) -> Result<Option<Vec<u8>>, ReadError> {
    let mut buf = Vec::new();
    let mut reader = BufReader::new(stream.take(MAX_REQUEST as u64 + 1));
    reader
        .read_until(b'\n', &mut buf)
        .await
        .map_err(ReadError::Io)?;
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > MAX_REQUEST {
        return Err(ReadError::TooLarge);
    }
    Ok((!buf.is_empty()).then_some(buf))
}

/// Why the daemon could not start its control socket.
#[derive(Debug, Error)]
pub enum SocketError {
    #[error("cannot create the socket directory {}: {source}", dir.display())]
    Dir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open the lock file {}: {source}", path.display())]
    LockFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("another portfwd daemon is already running on {}", socket.display())]
    AlreadyRunning { socket: PathBuf },
    #[error("cannot lock {}: {source}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("{} exists and is not a socket: refusing to replace it", path.display())]
    NotASocket { path: PathBuf },
    #[error("cannot use the control socket {}: {source}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The daemon's claim on a control socket path: an exclusive `flock` on `<socket>.lock`,
/// held for the daemon's life, taken before anything is loaded. While it is held, any
/// socket file at the path is this daemon's or a stale one. Dropping it removes the
/// socket file (the lock file stays: removing it would race with a starting daemon).
pub struct SocketClaim {
    socket: PathBuf,
    _lock: Flock<File>,
}

impl SocketClaim {
    /// Creates the socket's directory (0755) if missing and takes the lock.
    pub fn acquire(socket: &Path) -> Result<Self, SocketError> {
        if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .map_err(|source| SocketError::Dir {
                    dir: dir.to_path_buf(),
                    source,
                })?;
        }
        let mut lock_path = socket.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock_path = PathBuf::from(lock_path);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|source| SocketError::LockFile {
                path: lock_path.clone(),
                source,
            })?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
            if errno == nix::Error::EWOULDBLOCK {
                SocketError::AlreadyRunning {
                    socket: socket.to_path_buf(),
                }
            } else {
                SocketError::Lock {
                    path: lock_path.clone(),
                    source: errno,
                }
            }
        })?;
        Ok(Self {
            socket: socket.to_path_buf(),
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.socket
    }

    /// Removes a stale socket and binds a fresh one, usable by root only (0600; created
    /// under umask 0177 so it is never briefly open to others). Call before the runtime
    /// starts threads: the umask is process-wide.
    pub fn bind(&self) -> Result<std::os::unix::net::UnixListener, SocketError> {
        let bind_err = |source| SocketError::Bind {
            path: self.socket.clone(),
            source,
        };
        match fs::symlink_metadata(&self.socket) {
            Ok(m) if m.file_type().is_socket() => {
                fs::remove_file(&self.socket).map_err(bind_err)?;
                info!("removed the stale socket {}", self.socket.display());
            }
            Ok(_) => {
                return Err(SocketError::NotASocket {
                    path: self.socket.clone(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind_err(e)),
        }
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
        let bound = std::os::unix::net::UnixListener::bind(&self.socket);
        nix::sys::stat::umask(old);
        let listener = bound.map_err(bind_err)?;
        fs::set_permissions(&self.socket, fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(listener)
    }
}

impl Drop for SocketClaim {
    fn drop(&mut self) {
        match fs::symlink_metadata(&self.socket) {
            Ok(m) if m.file_type().is_socket() => {
                if let Err(e) = fs::remove_file(&self.socket) {
                    warn!("cannot remove {}: {e}", self.socket.display());
                }
            }
            _ => {}
        }
    }
}

/// Whether IPv4 forwarding is off in this network namespace (`None`: cannot tell).
/// Without it the kernel drops translated packets to backends behind other interfaces.
pub fn ipv4_forwarding_disabled() -> Option<bool> {
    fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
        .ok()
        .map(|v| v.trim() == "0")
}

#[cfg(test)]
mod tests {
    use super::*;

    type Key = (Ipv4Addr, u16, u8);

    /// A kernel that records what the daemon asked of it and can be told to fail.
    #[derive(Default)]
    struct FakeKernel {
        rules: BTreeMap<Key, BackendV4>,
        /// Writes (inserts and removes) per key, to see what was touched.
        writes: BTreeMap<Key, usize>,
        reset: Vec<u32>,
        forgotten: Vec<Key>,
        fail_insert: bool,
        /// Fail the insert after this many more succeed.
        fail_insert_after: Option<usize>,
        fail_remove: bool,
        held: Vec<(IpAddr, u16, Proto)>,
        ephemeral: Option<PortRange>,
        rules_v6: BTreeMap<KeyV6, BackendV6>,
        forgotten_v6: Vec<KeyV6>,
    }

    type KeyV6 = (Ipv6Addr, u16, u8);

    fn key_v6(k: &RuleKeyV6) -> KeyV6 {
        (k.addr(), k.port(), k.proto())
    }

    fn fake_err() -> DataplaneError {
        DataplaneError::MissingMap("TEST")
    }

    fn key(k: &RuleKeyV4) -> Key {
        (k.addr(), k.port(), k.proto())
    }

    impl Kernel for FakeKernel {
        fn insert_rule(&mut self, k: RuleKeyV4, b: BackendV4) -> Result<(), DataplaneError> {
            if self.fail_insert {
                return Err(fake_err());
            }
            if let Some(n) = self.fail_insert_after.as_mut() {
                if *n == 0 {
                    return Err(fake_err());
                }
                *n -= 1;
            }
            self.rules.insert(key(&k), b);
            *self.writes.entry(key(&k)).or_default() += 1;
            Ok(())
        }
        fn remove_rule(&mut self, k: &RuleKeyV4) -> Result<(), DataplaneError> {
            if self.fail_remove {
                return Err(fake_err());
            }
            self.rules.remove(&key(k));
            *self.writes.entry(key(k)).or_default() += 1;
            Ok(())
        }
        fn reset_rule_stats(&mut self, slot: u32) -> Result<(), DataplaneError> {
            self.reset.push(slot);
            Ok(())
        }
        fn rule_stats(&self, slot: u32) -> Result<RuleStats, DataplaneError> {
            Ok(RuleStats {
                packets: slot.into(),
                ..RuleStats::default()
            })
        }
        fn forget_flows(&mut self, backends: &BTreeSet<Key>) -> Result<usize, DataplaneError> {
            self.forgotten.extend(backends.iter().copied());
            Ok(0)
        }
        fn reason_stats(&self) -> Result<Vec<(Reason, u64)>, DataplaneError> {
            Ok(Reason::ALL.iter().map(|&r| (r, r as u64)).collect())
        }
        fn attachments(&self) -> Vec<Attachment> {
            Vec::new()
        }
        fn sync_nat64(&mut self, _: &BTreeSet<Ipv4Addr>) -> Result<Vec<String>, DataplaneError> {
            Ok(Vec::new())
        }
        fn nat64_entries(&self) -> Vec<String> {
            Vec::new()
        }
        fn sync_host_addrs(&mut self, _: &BTreeSet<Ipv4Addr>) -> Result<(), DataplaneError> {
            Ok(())
        }
        fn insert_rule_v6(&mut self, k: RuleKeyV6, b: BackendV6) -> Result<(), DataplaneError> {
            if self.fail_insert {
                return Err(fake_err());
            }
            if let Some(n) = self.fail_insert_after.as_mut() {
                if *n == 0 {
                    return Err(fake_err());
                }
                *n -= 1;
            }
            self.rules_v6.insert(key_v6(&k), b);
            Ok(())
        }
        fn remove_rule_v6(&mut self, k: &RuleKeyV6) -> Result<(), DataplaneError> {
            if self.fail_remove {
                return Err(fake_err());
            }
            self.rules_v6.remove(&key_v6(k));
            Ok(())
        }
        fn forget_flows_v6(&mut self, backends: &BTreeSet<KeyV6>) -> Result<usize, DataplaneError> {
            self.forgotten_v6.extend(backends.iter().copied());
            Ok(0)
        }
        fn sync_host_addrs_v6(&mut self, _: &BTreeSet<Ipv6Addr>) -> Result<(), DataplaneError> {
            Ok(())
        }
        fn local_cgroup(&self) -> Option<PathBuf> {
            None
        }
        fn held_locally(&self, ip: IpAddr, port: u16, proto: Proto) -> bool {
            self.held.contains(&(ip, port, proto))
        }
        fn ephemeral_ports(&self) -> PortRange {
            self.ephemeral.unwrap_or(PortRange::LINUX_EPHEMERAL)
        }
    }

    fn decl(p: &str, b: &str) -> Declaration {
        Declaration::parse(p, b).unwrap_or_else(|e| panic!("{p} {b}: {e}"))
    }

    fn publish(p: &str) -> Publish {
        p.parse().unwrap_or_else(|e| panic!("{p}: {e}"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn kernel_rules(d: &Daemon<FakeKernel>) -> Vec<String> {
        d.kernel()
            .rules
            .iter()
            .map(|((a, p, pr), b)| {
                format!(
                    "{a}:{p}/{pr} -> {}:{} #{}",
                    b.addr(),
                    b.port(),
                    b.stats_slot()
                )
            })
            .collect()
    }

    fn table_rules(d: &Daemon<FakeKernel>) -> Vec<String> {
        d.table()
            .iter()
            .map(|(p, e)| format!("{p} -> {} ({})", e.backend, e.source))
            .collect()
    }

    #[test]
    fn add_refuses_a_port_a_local_process_holds() {
        let mut d = Daemon::new(FakeKernel {
            held: vec![
                (ip("0.0.0.0"), 9000, Proto::Tcp),
                (ip("0.0.0.0"), 9105, Proto::Tcp),
            ],
            ..FakeKernel::default()
        });
        let err = d.add(decl("9000", "198.18.1.2:8080")).expect_err("held");
        assert_eq!(
            err.to_string(),
            "cannot publish *:9000/tcp: a local process already uses it (address already in use)"
        );
        let err = d
            .add(decl("9100-9109", "198.18.1.2:8100-8109"))
            .expect_err("held");
        assert_eq!(
            err.to_string(),
            "cannot publish *:9100-9109/tcp: a local process already uses port 9105 (address already in use)"
        );
        assert!(kernel_rules(&d).is_empty() && d.table().is_empty());
        d.add(decl("9000/udp", "198.18.1.2:8080"))
            .expect("udp is free");
    }

    #[test]
    fn conflicts_follow_docker() {
        // (already published, then added, expected error or None)
        let table: &[(&[&str], &str, Option<&str>)] = &[
            (
                &["9000"],
                "9000",
                Some("Bind for 0.0.0.0:9000 failed: port is already allocated"),
            ),
            (
                &["9000"],
                "9000/tcp",
                Some("Bind for 0.0.0.0:9000 failed: port is already allocated"),
            ),
            (&["9000"], "9000/udp", None),
            (&["9000"], "9001", None),
            (
                &["9000"],
                "198.51.100.7:9000",
                Some("Bind for 198.51.100.7:9000 failed: port is already allocated"),
            ),
            (
                &["198.51.100.7:9000"],
                "9000",
                Some("Bind for 0.0.0.0:9000 failed: port is already allocated"),
            ),
            (&["198.51.100.7:9000"], "198.51.100.8:9000", None),
            (&["198.51.100.7:9000"], "198.51.100.7:9000/udp", None),
            (
                &["198.51.100.7:9000", "198.51.100.8:9000"],
                "*:9000",
                Some("Bind for 0.0.0.0:9000 failed: port is already allocated"),
            ),
            // Per port: a range fails at its first port that is taken.
            (
                &["9005"],
                "9000-9009",
                Some("Bind for 0.0.0.0:9005 failed: port is already allocated"),
            ),
            (
                &["9007", "9003/udp", "9004"],
                "9000-9009",
                Some("Bind for 0.0.0.0:9004 failed: port is already allocated"),
            ),
            (
                &["8995-9001"],
                "198.51.100.7:9000-9009",
                Some("Bind for 198.51.100.7:9000 failed: port is already allocated"),
            ),
            (&["8990-8999"], "9000-9009", None),
            (&["9010-9019"], "9000-9009", None),
        ];
        for &(existing, new, want) in table {
            let mut d = Daemon::new(FakeKernel::default());
            for p in existing {
                let n = publish(p).ports().len();
                let be = if n == 1 {
                    "172.17.0.2:8080".to_string()
                } else {
                    format!("172.17.0.2:1000-{}", 999 + n)
                };
                d.add(decl(p, &be)).expect("setup");
            }
            let before = kernel_rules(&d);
            let n = publish(new).ports().len();
            let be = if n == 1 {
                "172.17.0.3:8081".to_string()
            } else {
                format!("172.17.0.3:2000-{}", 1999 + n)
            };
            let got = d.add(decl(new, &be)).err().map(|e| e.to_string());
            assert_eq!(got.as_deref(), want, "{existing:?} then {new}");
            if want.is_some() {
                assert_eq!(kernel_rules(&d), before, "nothing applied");
                assert_eq!(d.table().len(), existing.len());
            }
        }
    }

    #[test]
    fn a_range_is_one_entry_per_port_and_one_slot() {
        let mut d = Daemon::new(FakeKernel::default());
        let r = d
            .add(decl("9000-9009", "172.17.0.2:8000-8009"))
            .expect("range");
        assert_eq!(r.to_string(), "*:9000-9009/tcp -> 172.17.0.2:8000-8009");
        let k = &d.kernel().rules;
        assert_eq!(k.len(), 10);
        for (hp, bp) in (9000..=9009).zip(8000..=8009) {
            let b = k[&(Ipv4Addr::UNSPECIFIED, hp, 6)];
            assert_eq!((b.port(), b.stats_slot()), (bp, 0), "port {hp}");
        }
        assert_eq!(d.kernel().reset, vec![0], "one counter slot");
        let list = d.list().expect("list");
        assert_eq!(list.rules.len(), 1, "one row");
        let row = &list.rules[0];
        assert_eq!(
            (
                row.host_port,
                row.host_port_end,
                row.backend_port,
                row.backend_port_end
            ),
            (9000, 9009, 8000, 8009)
        );
        assert_eq!(row.source, Source::Cli);

        // A port inside it cannot be deleted alone; the whole range can.
        let err = d.del(publish("9005")).expect_err("part of a range");
        assert_eq!(
            err.to_string(),
            "No published port *:9005/tcp: it is part of *:9000-9009/tcp, which is removed whole"
        );
        d.del(publish("9000-9009")).expect("del range");
        assert!(d.kernel().rules.is_empty());
        assert_eq!(d.kernel().forgotten.len(), 10, "each backend port's flows");

        // A 10,000-port range: 10,000 entries, one slot.
        d.add(decl("20000-29999/udp", "172.17.0.2:30000-39999"))
            .expect("10k range");
        assert_eq!(d.kernel().rules.len(), 10_000);
        assert_eq!(d.table().len(), 1);
    }

    #[test]
    fn first_free_and_any_free_ports() {
        let mut d = Daemon::new(FakeKernel {
            ephemeral: Some(PortRange::new(40000, 40009).expect("range")),
            held: vec![(ip("0.0.0.0"), 40001, Proto::Tcp)],
            ..FakeKernel::default()
        });
        d.add(decl("8000", "172.17.0.2:80")).expect("8000");
        // A host range to one backend port: the first free port of the range.
        let r = d
            .add(decl("8000-8010", "172.17.0.3:80"))
            .expect("first free");
        assert_eq!(r.to_string(), "*:8001/tcp -> 172.17.0.3:80");
        // No host port: the ephemeral range, skipping published and held ports.
        let r = d.add(decl("", "172.17.0.2:80")).expect("any");
        assert_eq!(r.to_string(), "*:40000/tcp -> 172.17.0.2:80");
        let r = d.add(decl("0", "172.17.0.2:81")).expect("any");
        assert_eq!(
            r.to_string(),
            "*:40002/tcp -> 172.17.0.2:81",
            "40001 is held"
        );
        // Several container ports: as many consecutive free host ports.
        d.add(decl("40004", "172.17.0.2:90")).expect("40004");
        let r = d.add(decl("/udp", "172.17.0.2:53")).expect("udp any");
        assert_eq!(r.to_string(), "*:40000/udp -> 172.17.0.2:53");
        let r = d.add(decl("", "172.17.0.2:100-102")).expect("block");
        assert_eq!(r.to_string(), "*:40005-40007/tcp -> 172.17.0.2:100-102");
        let err = d.add(decl("", "172.17.0.2:200-203")).expect_err("no block");
        assert_eq!(
            err.to_string(),
            "cannot publish *:(any)/tcp -> 172.17.0.2:200-203: no 4 free consecutive ports in the ephemeral range 40000-40009"
        );
        let err = d.add(decl("8000-8001", "172.17.0.4:80")).expect_err("full");
        assert_eq!(
            err.to_string(),
            "cannot publish *:(first free of 8000-8001)/tcp -> 172.17.0.4:80: every port of 8000-8001 is already allocated or in use"
        );
    }

    fn kernel_rules_v6(d: &Daemon<FakeKernel>) -> Vec<String> {
        d.kernel()
            .rules_v6
            .iter()
            .map(|((a, p, pr), b)| {
                format!(
                    "[{a}]:{p}/{pr} -> [{}]:{} #{}",
                    b.addr(),
                    b.port(),
                    b.stats_slot()
                )
            })
            .collect()
    }

    /// IPv6 rules go to the IPv6 map, one entry per port; `*` becomes the wildcard of
    /// each family it can serve; del forgets the IPv6 flows.
    #[test]
    fn ipv6_rules_go_to_the_v6_map() {
        let mut d = Daemon::new(FakeKernel::default());
        for (p, b) in [
            ("[2001:db8::1]:9000", "[2001:db8::2]:8080"),
            ("[::1]:9001-9002/udp", "[2001:db8::2]:53-54"),
            ("9003", "[2001:db8::3]:80"),
            ("[::]:9004", "[2001:db8::3]:81"),
            ("[::]:9005", "172.17.0.2:80"),
            // `*` to an IPv4-only backend: IPv6 clients get it IPv4-mapped.
            ("9006", "172.17.0.2:80"),
            // A dual-stack backend: each family to its own address.
            ("9007", "172.17.0.3:80,[2001:db8::3]:80"),
            ("0.0.0.0:9008", "172.17.0.3:80,[2001:db8::3]:80"),
        ] {
            d.add(decl(p, b)).unwrap_or_else(|e| panic!("{p} {b}: {e}"));
        }
        assert_eq!(
            kernel_rules_v6(&d),
            [
                "[::]:9003/6 -> [2001:db8::3]:80 #2",
                "[::]:9004/6 -> [2001:db8::3]:81 #3",
                "[::]:9005/6 -> [::ffff:172.17.0.2]:80 #4",
                "[::]:9006/6 -> [::ffff:172.17.0.2]:80 #5",
                "[::]:9007/6 -> [2001:db8::3]:80 #6",
                "[::1]:9001/17 -> [2001:db8::2]:53 #1",
                "[::1]:9002/17 -> [2001:db8::2]:54 #1",
                "[2001:db8::1]:9000/6 -> [2001:db8::2]:8080 #0",
            ]
        );
        // Only `*` and `0.0.0.0` rules serve IPv4 clients, and only with an IPv4 backend.
        assert_eq!(
            kernel_rules(&d),
            [
                "0.0.0.0:9006/6 -> 172.17.0.2:80 #5",
                "0.0.0.0:9007/6 -> 172.17.0.3:80 #6",
                "0.0.0.0:9008/6 -> 172.17.0.3:80 #7",
            ]
        );

        d.del(publish("[2001:db8::1]:9000")).expect("del");
        assert!(!kernel_rules_v6(&d)
            .iter()
            .any(|r| r.starts_with("[2001:db8::1]")));
        assert_eq!(
            d.kernel().forgotten_v6,
            [(ip6("2001:db8::2"), 8080, 6)],
            "the backend's IPv6 flows are forgotten"
        );
        assert!(d.kernel().forgotten.is_empty());
    }

    /// A failing IPv6 write undoes the writes made before it, in both maps.
    #[test]
    fn ipv6_apply_rolls_back_across_families() {
        let mut d = Daemon::new(FakeKernel::default());
        d.add(decl("9000", "172.17.0.2:80")).expect("add");
        let (k0, k60) = (kernel_rules(&d), kernel_rules_v6(&d));
        d.kernel.fail_insert_after = Some(2);
        let decls = file(&[
            (1, "9100:80", "172.17.0.3"),
            (2, "[2001:db8::1]:9101-9102:80-81", "2001:db8::2"),
        ]);
        d.apply("f.toml", &decls, false)
            .expect_err("third insert fails");
        assert_eq!((kernel_rules(&d), kernel_rules_v6(&d)), (k0, k60));
    }

    fn ip6(s: &str) -> Ipv6Addr {
        s.parse().expect("ip6")
    }

    #[test]
    fn same_backend_on_two_ports_and_flow_forgetting() {
        let mut d = Daemon::new(FakeKernel::default());
        d.add(decl("9000", "172.17.0.2:8080")).expect("first");
        d.add(decl("9001", "172.17.0.2:8080"))
            .expect("same backend, other port");
        d.add(decl("9000/udp", "172.17.0.2:8080"))
            .expect("same backend, udp");
        assert_eq!(d.kernel().rules.len(), 3);

        // Another TCP rule still uses the backend: its flows stay.
        d.del(publish("9000")).expect("del");
        assert!(d.kernel().forgotten.is_empty());
        // The last TCP rule to it: TCP flows go, UDP ones are another matter.
        d.del(publish("9001")).expect("del");
        let be = Ipv4Addr::new(172, 17, 0, 2);
        assert_eq!(d.kernel().forgotten, vec![(be, 8080, 6)]);
        d.del(publish("9000/udp")).expect("del");
        assert_eq!(d.kernel().forgotten, vec![(be, 8080, 6), (be, 8080, 17)]);
        assert!(d.kernel().rules.is_empty());
        assert!(d.table().is_empty());
    }

    #[test]
    fn del_of_unpublished() {
        let mut d = Daemon::new(FakeKernel::default());
        d.add(decl("198.51.100.7:9000", "172.17.0.2:8080"))
            .expect("add");
        d.add(decl("[::]:9001", "[2001:db8::2]:8080")).expect("add");
        for (spec, want) in [
            (
                "9000",
                "No published port *:9000/tcp (published there: 198.51.100.7:9000/tcp)",
            ),
            ("9000/udp", "No published port *:9000/udp"),
            (
                "198.51.100.8:9000",
                "No published port 198.51.100.8:9000/tcp",
            ),
            (
                "*:9001",
                "No published port *:9001/tcp (published there: [::]:9001/tcp)",
            ),
            ("0.0.0.0:9001", "No published port 0.0.0.0:9001/tcp"),
        ] {
            let err = d.del(publish(spec)).expect_err(spec);
            assert_eq!(err.to_string(), want);
        }
        assert_eq!(d.kernel().rules.len(), 1);
        d.del(publish("198.51.100.7:9000")).expect("del");
        d.del(publish("[::]:9001")).expect("del");
    }

    #[test]
    fn kernel_failures_change_nothing() {
        let mut d = Daemon::new(FakeKernel::default());
        d.add(decl("9000", "172.17.0.2:8080")).expect("add");
        d.kernel.fail_insert = true;
        let err = d
            .add(decl("9001", "172.17.0.2:8080"))
            .expect_err("insert fails");
        assert!(
            err.to_string().starts_with("cannot publish *:9001/tcp: "),
            "{err}"
        );
        assert_eq!(d.table().len(), 1);
        d.kernel.fail_insert = false;
        d.kernel.fail_remove = true;
        let err = d.del(publish("9000")).expect_err("remove fails");
        assert!(
            err.to_string().starts_with("cannot unpublish *:9000/tcp: "),
            "{err}"
        );
        assert_eq!(d.table().len(), 1);
        assert_eq!(d.kernel().rules.len(), 1);
        d.kernel.fail_remove = false;
        d.del(publish("9000")).expect("del");

        // A range that fails midway is rolled back: nothing of it stays.
        d.add(decl("7000", "172.17.0.2:80")).expect("add");
        let before = kernel_rules(&d);
        d.kernel.fail_insert_after = Some(5);
        d.add(decl("9000-9009", "172.17.0.2:8000-8009"))
            .expect_err("fails at the 6th port");
        assert_eq!(kernel_rules(&d), before);
        assert_eq!(d.table().len(), 1);
        d.kernel.fail_insert_after = None;
        // Its slot went back: the next rule still works.
        d.add(decl("9000-9009", "172.17.0.2:8000-8009"))
            .expect("then it works");
    }

    #[test]
    fn slots_are_reset_and_reused_last() {
        let mut d = Daemon::new(FakeKernel::default());
        d.add(decl("1", "10.0.0.1:1")).expect("add");
        d.add(decl("2", "10.0.0.1:1")).expect("add");
        d.del(publish("1")).expect("del");
        d.add(decl("3", "10.0.0.1:1")).expect("add");
        assert_eq!(d.kernel().reset, vec![0, 1, 2]);
        let slots: Vec<u32> = d.table().iter().map(|(_, e)| e.stats_slot).collect();
        assert_eq!(slots, vec![1, 2]);

        let mut a = SlotAllocator::default();
        for i in 0..MAX_STATS_SLOTS {
            assert_eq!(a.alloc(), Some(i));
        }
        assert_eq!(a.alloc(), None);
        a.release(7);
        a.release(3);
        assert_eq!((a.alloc(), a.alloc(), a.alloc()), (Some(7), Some(3), None));
    }

    fn file(entries: &[(u32, &str, &str)]) -> Vec<FileDeclaration> {
        entries
            .iter()
            .map(|&(line, mapping, to)| {
                let to = crate::rule::Addrs::new(ip(to)).expect("backend address");
                let d = Declaration::from_mapping(mapping, to)
                    .unwrap_or_else(|e| panic!("{mapping}: {e}"));
                FileDeclaration {
                    line,
                    entry: mapping.to_string(),
                    publish: d.spec(),
                    backend: d.backend(),
                }
            })
            .collect()
    }

    fn shown(list: &[RuleReply]) -> Vec<String> {
        list.iter().map(ToString::to_string).collect()
    }

    const A: &str = "172.17.0.2";
    const B: &str = "172.17.0.3";

    #[test]
    fn apply_adds_removes_and_keeps() {
        let mut d = Daemon::new(FakeKernel {
            ephemeral: Some(PortRange::new(40000, 40099).expect("range")),
            ..FakeKernel::default()
        });
        d.add(decl("6000", "172.17.0.9:80"))
            .expect("a runtime rule");
        let first = file(&[
            (3, "9000:8080", A),
            (3, "5353:53/udp", A),
            (4, "7000-7009:7000-7009", A),
            (5, "80", B),
        ]);
        let r = d.apply("f.toml", &first, false).expect("first apply");
        assert_eq!(
            shown(&r.added),
            vec![
                "*:5353/udp -> 172.17.0.2:53",
                "*:7000-7009/tcp -> 172.17.0.2:7000-7009",
                "*:9000/tcp -> 172.17.0.2:8080",
                "*:40000/tcp -> 172.17.0.3:80",
            ]
        );
        assert!(r.removed.is_empty() && r.unchanged.is_empty());
        assert_eq!(d.kernel().rules.len(), 1 + 13);
        let writes_before = d.kernel().writes.clone();

        // Keep 9000 and the random one, change 5353's backend, drop the range, add 9443.
        let second = file(&[
            (3, "9000:8080", A),
            (4, "5353:53/udp", B),
            (5, "80", B),
            (6, "127.0.0.1:9443:443", A),
        ]);
        let dry = d.apply("f.toml", &second, true).expect("dry run");
        assert!(dry.dry_run);
        assert_eq!(d.kernel().writes, writes_before, "a dry run writes nothing");
        let r = d.apply("f.toml", &second, false).expect("second apply");
        assert_eq!(
            (dry.added.clone(), dry.removed.clone()),
            (r.added.clone(), r.removed.clone())
        );
        assert_eq!(
            shown(&r.added),
            vec![
                "*:5353/udp -> 172.17.0.3:53",
                "127.0.0.1:9443/tcp -> 172.17.0.2:443",
            ]
        );
        assert_eq!(
            shown(&r.removed),
            vec![
                "*:5353/udp -> 172.17.0.2:53",
                "*:7000-7009/tcp -> 172.17.0.2:7000-7009",
            ]
        );
        assert_eq!(
            shown(&r.unchanged),
            vec![
                "*:9000/tcp -> 172.17.0.2:8080",
                "*:40000/tcp -> 172.17.0.3:80",
            ]
        );
        // Unchanged rules (and the runtime rule) were not written at all.
        let w = &d.kernel().writes;
        let any = Ipv4Addr::UNSPECIFIED;
        for k in [(any, 9000, 6), (any, 40000, 6), (any, 6000, 6)] {
            assert_eq!(w.get(&k), writes_before.get(&k), "{k:?} untouched");
        }
        // The changed port was overwritten in place (one more write, no delete).
        assert_eq!(w[&(any, 5353, 17)], writes_before[&(any, 5353, 17)] + 1);
        assert_eq!(
            d.kernel().rules[&(any, 5353, 17)].addr(),
            Ipv4Addr::new(172, 17, 0, 3)
        );
        // Flows of the old backends are forgotten: 5353's old backend and the range's.
        let fa = Ipv4Addr::new(172, 17, 0, 2);
        assert!(d.kernel().forgotten.contains(&(fa, 53, 17)));
        assert!(d.kernel().forgotten.contains(&(fa, 7005, 6)));
        assert!(!d.kernel().forgotten.contains(&(fa, 8080, 6)));
        assert_eq!(
            table_rules(&d),
            vec![
                "*:5353/udp -> 172.17.0.3:53 (file)",
                "*:6000/tcp -> 172.17.0.9:80 (cli)",
                "*:9000/tcp -> 172.17.0.2:8080 (file)",
                "127.0.0.1:9443/tcp -> 172.17.0.2:443 (file)",
                "*:40000/tcp -> 172.17.0.3:80 (file)",
            ]
        );
        // An empty file removes the file rules only.
        let r = d.apply("f.toml", &[], false).expect("empty");
        assert_eq!(r.removed.len(), 4);
        assert_eq!(table_rules(&d), vec!["*:6000/tcp -> 172.17.0.9:80 (cli)"]);
        assert_eq!(d.kernel().rules.len(), 1);
    }

    #[test]
    fn apply_refuses_and_changes_nothing() {
        let mut d = Daemon::new(FakeKernel::default());
        d.add(decl("6000", "172.17.0.9:80")).expect("runtime rule");
        d.apply(
            "f.toml",
            &file(&[(2, "9000:80", A), (3, "7000:70", A)]),
            false,
        )
        .expect("initial");
        let (k0, t0) = (kernel_rules(&d), table_rules(&d));
        let table: Vec<(Vec<FileDeclaration>, &str)> = vec![
            (
                file(&[(2, "9000:80", A), (4, "5990-6010:5990-6010", B)]),
                "f.toml:4: entry `5990-6010:5990-6010`: *:5990-6010/tcp -> 172.17.0.3:5990-6010 conflicts with the runtime rule *:6000/tcp at port 6000 (added with portfwd-ctl add; del it first or drop it from the file)",
            ),
            (
                file(&[(2, "9000:80", A), (5, "127.0.0.1:9000:81", B)]),
                "f.toml:5: entry `127.0.0.1:9000:81`: Bind for 127.0.0.1:9000 failed: port is already allocated (by line 2)",
            ),
        ];
        for (decls, want) in table {
            for dry in [true, false] {
                let err = d.apply("f.toml", &decls, dry).expect_err(want);
                assert_eq!(err.to_string(), want);
                assert_eq!(
                    (kernel_rules(&d), table_rules(&d)),
                    (k0.clone(), t0.clone())
                );
            }
        }
        // A kernel failure midway is rolled back, removed rules included.
        d.kernel.fail_insert_after = Some(3);
        let err = d
            .apply(
                "f.toml",
                &file(&[(2, "9000:80", A), (3, "8000-8009:8000-8009", B)]),
                false,
            )
            .expect_err("fails midway");
        assert!(
            err.to_string()
                .starts_with("cannot publish *:8000-8009/tcp: "),
            "{err}"
        );
        assert_eq!((kernel_rules(&d), table_rules(&d)), (k0, t0));
        d.kernel.fail_insert_after = None;
    }

    #[test]
    fn handle_line_never_fails() {
        let mut d = Daemon::new(FakeKernel::default());
        let ok = |r: Vec<u8>| -> serde_json::Value {
            serde_json::from_slice(&r).expect("response is JSON")
        };
        let add = br#"{"cmd":"add","publish":{"host_port":9000},"backend":{"ip":"172.17.0.2","port":8080}}"#;
        assert_eq!(ok(d.handle_line(add))["ok"], true);
        let again = ok(d.handle_line(add));
        assert_eq!(again["ok"], false);
        assert_eq!(
            again["error"],
            "Bind for 0.0.0.0:9000 failed: port is already allocated"
        );
        let mismatch = br#"{"cmd":"add","publish":{"host_port":7000,"host_port_end":7009},"backend":{"ip":"172.17.0.2","port":80,"port_end":81}}"#;
        let r = ok(d.handle_line(mismatch));
        assert_eq!(
            r["error"],
            "port ranges `7000-7009` (10 ports) and `80-81` (2 ports) differ in length"
        );
        for garbage in [
            &b""[..],
            b"\xff\xfe",
            b"{",
            b"null",
            b"{\"cmd\":\"add\"}",
            b"{\"cmd\":\"nope\"}",
            b"{\"cmd\":\"del\",\"publish\":{\"host_port\":0}}",
            b"{\"cmd\":\"apply\",\"file\":\"f\"}",
        ] {
            let r = ok(d.handle_line(garbage));
            assert_eq!(r["ok"], false, "{garbage:?}");
            let msg = r["error"].as_str().expect("error is a string");
            assert!(
                msg.starts_with("invalid request: ") && !msg.contains('\n'),
                "{msg}"
            );
        }
        let list = ok(d.handle_line(br#"{"cmd":"list"}"#));
        assert_eq!(list["ok"], true);
        assert_eq!(list["rules"][0]["host_port"], 9000);
        assert_eq!(list["rules"][0]["backend_ip"], "172.17.0.2");
        assert_eq!(list["rules"][0]["source"], "cli");
        assert_eq!(list["reasons"]["translated"], 0);
        assert_eq!(list["reasons"]["drop_checksum"], 10);
        let del = ok(d.handle_line(br#"{"cmd":"del","publish":{"host_port":9000}}"#));
        assert_eq!(del["ok"], true);
        let del = ok(d.handle_line(br#"{"cmd":"del","publish":{"host_port":9000}}"#));
        assert_eq!(del["error"], "No published port *:9000/tcp");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn server_survives_bad_clients() {
        use tokio::io::AsyncReadExt as _;
        let dir = std::env::temp_dir().join(format!("pfd-test-{}", std::process::id()));
        let sock = dir.join("s.sock");
        let claim = SocketClaim::acquire(&sock).expect("claim");
        assert!(matches!(
            SocketClaim::acquire(&sock),
            Err(SocketError::AlreadyRunning { .. })
        ));
        let listener = UnixListener::from_std(claim.bind().expect("bind")).expect("tokio");
        let mode = fs::metadata(&sock).expect("socket").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let daemon: Shared<FakeKernel> = Arc::new(Mutex::new(Daemon::new(FakeKernel::default())));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, daemon.clone(), async {
            let _ = stopped.await;
        }));

        async fn exchange(sock: &Path, send: &[u8], close_write: bool) -> String {
            let mut s = UnixStream::connect(sock).await.expect("connect");
            // The daemon may answer and close before a large request is fully sent.
            let _ = s.write_all(send).await;
            if close_write {
                let _ = s.shutdown().await;
            }
            // Read what arrived even if the connection was then reset (the daemon closes
            // with the rest of an oversized request unread).
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out).await;
            String::from_utf8_lossy(&out).into_owned()
        }
        let add = b"{\"cmd\":\"add\",\"publish\":{\"host_port\":9000},\"backend\":{\"ip\":\"10.0.0.2\",\"port\":80}}\n";
        assert!(exchange(&sock, add, false)
            .await
            .starts_with("{\"ok\":true"));
        let huge = vec![b'x'; MAX_REQUEST + 10];
        let r = exchange(&sock, &huge, false).await;
        assert!(
            r.contains(&format!("request larger than {MAX_REQUEST} bytes")),
            "{r}"
        );
        let r = exchange(&sock, b"garbage\n", false).await;
        assert!(r.contains("invalid request"), "{r}");
        let r = exchange(&sock, b"{\"cmd\":", true).await;
        assert!(r.contains("invalid request"), "{r}");
        assert_eq!(exchange(&sock, b"", true).await, "");
        // Still serving, and the rule is still there.
        let r = exchange(&sock, b"{\"cmd\":\"list\"}\n", false).await;
        assert!(r.contains("\"host_port\":9000"), "{r}");

        let _ = stop.send(());
        server.await.expect("server task");
        drop(claim);
        assert!(!sock.exists(), "socket removed");
        let _ = fs::remove_dir_all(&dir);
    }
}
