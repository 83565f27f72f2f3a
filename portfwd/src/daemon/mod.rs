//! The daemon: its state ([`Daemon`]: the rule table, the counter slots, what it last
//! wrote of the host's addresses) and the request handler (add, del, list, apply), which
//! changes the kernel's maps through [`Kernel`] only. The parts live beside it: `table`
//! (the rule table and slot allocator), `entries` (a rule's kernel map entries),
//! `kernel` (the seam to the dataplane and the host), `server` (the control socket's
//! connections) and `socket` (the claim on the socket path).
//!
//! Invariants:
//! - Every rule in [`RuleTable`] is in the kernel's rule maps, one entry per published
//!   port and family served (see `entries::map_entries`), with the rule's backend port
//!   for that port and the rule's one counter slot (a range shares it); nothing else is.
//!   Every change goes through [`Daemon::commit`], which changes the table only after
//!   the kernel accepted every write, and undoes the writes it made when one fails: a
//!   failed request leaves both untouched.
//! - Conflicts follow Docker, per port: one (address, port, protocol) at a time; a
//!   family's wildcard (`0.0.0.0`, `[::]`) excludes every address of its family on the
//!   same port and protocol, and `*` (no host address) every address of both. A range
//!   conflicts at its first common port, which the error names.
//! - Each rule has a source: `cli` (`portfwd-ctl add`) or `file` (a declarations file).
//!   `apply` replaces the file rules only, keeps the ones the file still declares
//!   untouched (same map entries, so their flows go on), and refuses, changing nothing,
//!   when a file rule would conflict with a runtime rule.
//! - When a rule goes (del, or apply removing or changing it), the tracked flows to its
//!   backends are forgotten unless another rule still sends there, so no reply is
//!   translated from stale state and the next datagram follows the rules as they are.
//! - Nothing a client sends can stop the daemon: each connection is its own task with a
//!   read timeout and a size limit, every failure becomes an error response (the error
//!   and its causes on one line), and the code has no `unwrap`.
//! - Families: `*` writes both maps' wildcard keys, an address its family's map. IPv4
//!   clients need a backend IPv4 address (the model refuses an IPv4 host address
//!   without one; `*` then serves IPv6 only); IPv6 clients go to the backend's IPv6
//!   address, or to its IPv4 one as `::ffff:a.b.c.d`, which only local clients reach.

mod entries;
mod kernel;
mod server;
mod socket;
mod table;
#[cfg(test)]
mod tests;

pub use kernel::Kernel;
pub use server::{
    raise_fd_limit, serve, Shared, CLIENT_TIMEOUT, HOST_ADDR_REFRESH, MAX_CONNECTIONS,
    MAX_READ_REQUEST, MAX_REFUSED, REFUSAL_LOG_INTERVAL,
};
pub use socket::{Access, Peer, SocketAccess, SocketClaim, SocketError, SocketGroup};
pub use table::{Entry, RuleTable, SlotAllocator};

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr},
};

use log::{debug, info, warn};
use portfwd_common::MAX_STATS_SLOTS;
use thiserror::Error;

use crate::{
    dataplane::{DataplaneError, Family, V4, V6},
    protocol::{
        self, ApplyReply, FileDeclaration, ListReply, LocalClients, Owner, Request, RuleReply,
        RuleStatus, Source,
    },
    report::Chain,
    rule::{Backend, Declaration, HostPorts, PortRange, Publish, Rule, RuleError},
};
use entries::{map_entries, write_entry, MapEntry, MapKey, Write};

/// Why a request failed. Each message is one line; the first two are Docker's words.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// `holder` is the published rule the port belongs to (not shown: Docker's words).
    #[error("Bind for {addr_port} failed: port is already allocated")]
    PortAllocated {
        /// The address and port as Docker writes them (`0.0.0.0:9000`).
        addr_port: String,
        /// The first port asked for that is taken.
        port: u16,
        /// The published rule that holds it.
        holder: Publish,
    },
    /// `del` of a rule that is not published.
    #[error("No published port {publish}")]
    NotPublished {
        /// The rule asked for.
        publish: Publish,
    },
    /// `del` of part of a published range.
    #[error("No published port {publish}: it is part of {rule}, which is removed whole")]
    PartOfRange {
        /// The ports asked for.
        publish: Publish,
        /// The range they belong to.
        rule: Publish,
    },
    /// `del` of one address or family where rules of others hold the port (`del 9000`
    /// with `0.0.0.0:9000` published, or the reverse).
    #[error("No published port {publish} (published there: {})", others.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))]
    PublishedOtherwise {
        /// The rule asked for.
        publish: Publish,
        /// The rules published on its ports.
        others: Vec<Publish>,
    },
    /// Every counter slot is in use.
    #[error("cannot publish {publish}: all {max} counter slots are in use", max = MAX_STATS_SLOTS)]
    NoSlot {
        /// The rule that needed one.
        publish: Publish,
    },
    /// The kernel refused a map write (the writes made before it are undone).
    #[error("cannot {action} {publish}")]
    Kernel {
        /// `publish` or `unpublish`.
        action: &'static str,
        /// The rule being changed.
        publish: Publish,
        /// The dataplane's error.
        #[source]
        source: Box<DataplaneError>,
    },
    /// A local process holds a port of the rule.
    #[error(
        "cannot publish {publish}: a local process already uses {what} (address already in use)"
    )]
    HeldLocally {
        /// The rule asked for.
        publish: Publish,
        /// `it`, or the port (`port 9005`) of a range.
        what: String,
    },
    /// No free port for a declaration that leaves its host ports open.
    #[error("cannot publish {declaration}: {why}")]
    NoFreePort {
        /// The declaration.
        declaration: Box<Declaration>,
        /// What was tried.
        why: String,
    },
    /// `reservation_ok` without an owner: only a runtime's rule holds a reservation.
    #[error("reservation_ok needs an owner (the runtime whose reservation socket holds the port)")]
    ReservationWithoutOwner,
    /// The request is not a valid rule.
    #[error(transparent)]
    Invalid(#[from] RuleError),
    /// A file rule takes a port that an earlier line of the same file takes.
    #[error("Bind for {addr_port} failed: port is already allocated (by line {line})")]
    AllocatedInFile {
        /// The address and port as Docker writes them.
        addr_port: String,
        /// The line that holds it.
        line: u32,
    },
    /// A file rule conflicts with a runtime (`cli`) rule.
    #[error(
        "{publish} conflicts with the runtime rule {runtime} at port {port} \
         (added with portfwd-ctl add; del it first or drop it from the file)"
    )]
    RuntimeConflict {
        /// The file rule, as declared.
        publish: String,
        /// The runtime rule.
        runtime: Publish,
        /// The first port both take.
        port: u16,
    },
    /// An error of one entry of a declarations file.
    #[error("{file}:{line}: entry `{entry}`")]
    InFile {
        /// The declarations file.
        file: String,
        /// The entry's line (1-based).
        line: u32,
        /// The entry as written.
        entry: String,
        /// What is wrong with it.
        #[source]
        source: Box<DaemonError>,
    },
    /// The counters cannot be read.
    #[error("cannot read the counters")]
    Stats(#[source] Box<DataplaneError>),
    /// A `del` for an owner of a rule that is not that owner's (nothing is removed).
    #[error("cannot unpublish {publish} for {asked}: {}", match owner {
        Some(o) => format!("it belongs to {o}"),
        None => "it has no owner".to_string(),
    })]
    NotOwner {
        /// The rule.
        publish: Publish,
        /// The owner the request named.
        asked: Owner,
        /// The rule's owner.
        owner: Option<Owner>,
    },
    /// The flow tables cannot be read.
    #[error("cannot read the flow tables")]
    Flows(#[source] Box<DataplaneError>),
    /// Saved rules that cannot be adopted as they are.
    #[error("cannot adopt the saved rules: {0}")]
    AdoptInvalid(String),
    /// The pinned rule maps cannot be made to match the saved rules.
    #[error("cannot make the pinned rule maps match the saved rules")]
    Adopt(#[source] Box<DataplaneError>),
    /// A packet cannot be traced.
    #[error("cannot trace the packet")]
    Trace(#[source] Box<crate::trace::TraceError>),
}

/// The daemon's state: the kernel side and the table that mirrors it.
pub struct Daemon<K> {
    kernel: K,
    table: RuleTable,
    slots: SlotAllocator,
    host_addrs_v4: HostAddrs<V4>,
    host_addrs_v6: HostAddrs<V6>,
    /// Whether the last NAT64 sync failed (logged once per run of failures).
    nat64_failing: bool,
    /// Where the rule table is saved after every change (see [`crate::state`]).
    state_file: Option<std::path::PathBuf>,
}

/// What the daemon last wrote to one family's host-address map (what its wildcard rules
/// match).
struct HostAddrs<F: Family> {
    /// `None` until written, and after a failed write, so that the next refresh retries.
    written: Option<BTreeSet<F::Addr>>,
    /// Whether the last write failed (logged once per run of failures).
    failing: bool,
}

impl<F: Family> Default for HostAddrs<F> {
    fn default() -> Self {
        Self {
            written: None,
            failing: false,
        }
    }
}

impl<F: Family> HostAddrs<F> {
    /// Makes the kernel's host addresses of family `F` those of `all`; logs once when
    /// this starts or stops failing.
    fn sync<K: Kernel>(&mut self, kernel: &mut K, all: &BTreeSet<IpAddr>) {
        let addrs: BTreeSet<F::Addr> = all.iter().filter_map(|&ip| F::from_ip(ip)).collect();
        if self.written.as_ref() == Some(&addrs) {
            return;
        }
        match kernel.sync_host_addrs::<F>(&addrs) {
            Ok(()) => {
                debug!("host {} addresses: {addrs:?}", F::NAME);
                if self.failing {
                    info!("host {} addresses updated again", F::NAME);
                }
                self.failing = false;
                self.written = Some(addrs);
            }
            Err(e) => {
                if !self.failing {
                    warn!(
                        "cannot update the host {} addresses: {}",
                        F::NAME,
                        Chain(&e)
                    );
                }
                self.failing = true;
                self.written = None;
            }
        }
    }
}

impl<K: Kernel> Daemon<K> {
    /// A daemon with no rules, over `kernel`.
    pub fn new(kernel: K) -> Self {
        Self {
            kernel,
            table: RuleTable::default(),
            slots: SlotAllocator::default(),
            host_addrs_v4: HostAddrs::default(),
            host_addrs_v6: HostAddrs::default(),
            nat64_failing: false,
            state_file: None,
        }
    }

    /// Saves the rule table to `path` now and after every committed change, for the
    /// next daemon to adopt.
    pub fn persist_to(&mut self, path: std::path::PathBuf) {
        self.state_file = Some(path);
        self.save_state();
    }

    /// Writes the rule table to the state file, if there is one. A failure is logged:
    /// the change is made in the kernel already, and the next change retries.
    fn save_state(&self) {
        if let Some(path) = &self.state_file {
            let saved = crate::state::from_rules(
                self.table.iter().map(|(p, e)| (p, e, self.table.owner(p))),
            );
            if let Err(e) = crate::state::save(path, &saved) {
                warn!("cannot save the rules: {}", Chain(&e));
            }
        }
    }

    /// Takes over `rules`, saved by an earlier daemon whose maps this one adopted: they
    /// become the table with their sources, owners and counter slots (so their counters go on),
    /// and the kernel's rule maps are made to match them exactly. Returns how many map
    /// entries had to be written or removed (0 when the maps and the file agree).
    /// Only on an empty table; refuses, changing nothing, rules that conflict or share a
    /// slot.
    pub fn adopt(&mut self, rules: Vec<crate::state::Adopted>) -> Result<usize, DaemonError> {
        if !self.table.is_empty() {
            return Err(DaemonError::AdoptInvalid(
                "the daemon has rules already".into(),
            ));
        }
        let mut table = RuleTable::default();
        let mut used = BTreeSet::new();
        let mut expected: HashMap<MapKey, MapEntry> = HashMap::new();
        for (p, e, owner) in rules {
            if let Some((port, other)) = table.first_conflict(&p) {
                return Err(DaemonError::AdoptInvalid(format!(
                    "{p} conflicts with {other} at port {port}"
                )));
            }
            if e.stats_slot >= MAX_STATS_SLOTS || !used.insert(e.stats_slot) {
                return Err(DaemonError::AdoptInvalid(format!(
                    "{p} has counter slot {}, out of range or taken",
                    e.stats_slot
                )));
            }
            for v in map_entries(&p, &e.backend, e.stats_slot, e.reservation)? {
                expected.insert(v.key(), v);
            }
            table.insert(p, e);
            if let Some(owner) = owner {
                table.set_owner(p, owner);
            }
        }
        let kernel_err = |e| DaemonError::Adopt(Box::new(e));
        let mut actual: HashMap<MapKey, MapEntry> = HashMap::new();
        for (k, b) in self.kernel.rules_snapshot::<V4>().map_err(kernel_err)? {
            actual.insert(MapKey::V4(k), MapEntry::V4(k, b));
        }
        for (k, b) in self.kernel.rules_snapshot::<V6>().map_err(kernel_err)? {
            actual.insert(MapKey::V6(k), MapEntry::V6(k, b));
        }
        let mut fixed = 0;
        for key in actual.keys() {
            if !expected.contains_key(key) {
                write_entry(&mut self.kernel, *key, None).map_err(kernel_err)?;
                fixed += 1;
            }
        }
        for (key, v) in &expected {
            if actual.get(key) != Some(v) {
                write_entry(&mut self.kernel, *key, Some(*v)).map_err(kernel_err)?;
                fixed += 1;
            }
        }
        self.slots = SlotAllocator::with_used(&used);
        self.table = table;
        self.sync_nat64();
        self.save_state();
        Ok(fixed)
    }

    /// The kernel side.
    pub fn kernel(&self) -> &K {
        &self.kernel
    }

    /// The kernel side, mutable.
    pub fn kernel_mut(&mut self) -> &mut K {
        &mut self.kernel
    }

    /// The published rules.
    pub fn table(&self) -> &RuleTable {
        &self.table
    }

    /// Publishes `decl` as a runtime (`cli`) rule, choosing its host ports if it leaves
    /// them open, or fails leaving everything as it was.
    pub fn add(&mut self, decl: Declaration) -> Result<RuleReply, DaemonError> {
        self.add_owned(decl, None)
    }

    /// As [`Self::add`], the rule belonging to `owner` (a plugin) if one is given.
    pub fn add_owned(
        &mut self,
        decl: Declaration,
        owner: Option<Owner>,
    ) -> Result<RuleReply, DaemonError> {
        self.add_runtime(decl, owner, false)
    }

    /// As [`Self::add_owned`]; with `reservation_ok` (which needs an owner), the rule is
    /// a runtime's that holds its ports with its own idle reservation socket (podman's
    /// conmon): a local process holding them does not refuse the add, and local binds
    /// of them go through ([`portfwd_common::BACKEND_RESERVATION`]). Their traffic still
    /// goes to the backend.
    pub fn add_runtime(
        &mut self,
        decl: Declaration,
        owner: Option<Owner>,
        reservation_ok: bool,
    ) -> Result<RuleReply, DaemonError> {
        if reservation_ok && owner.is_none() {
            return Err(DaemonError::ReservationWithoutOwner);
        }
        let rule = self.resolve(&decl, &self.table, reservation_ok)?;
        self.commit_flagged(&[], &[rule], Source::Cli, reservation_ok)?;
        match owner {
            Some(owner) => {
                info!(
                    "published {rule} (source cli, owner {owner}{})",
                    if reservation_ok {
                        ", reservation ok"
                    } else {
                        ""
                    }
                );
                self.table.set_owner(rule.publish, owner);
            }
            None => info!("published {rule} (source cli)"),
        }
        Ok(RuleReply {
            publish: rule.publish,
            backend: rule.backend,
        })
    }

    /// The concrete rule for `decl` given the rules in `view`: exact ports if free, else
    /// the first free port of a range, else any free block of the ephemeral range.
    /// With `reservation_ok`, ports local processes hold count as free.
    fn resolve(
        &self,
        decl: &Declaration,
        view: &RuleTable,
        reservation_ok: bool,
    ) -> Result<Rule, DaemonError> {
        let (ip, proto, backend) = (decl.host(), decl.proto(), decl.backend());
        let first_held = |publish: &Publish| {
            if reservation_ok {
                None
            } else {
                self.first_held(publish)
            }
        };
        match decl.host_ports() {
            HostPorts::Exact(ports) => {
                let publish = Publish::new(ip, ports, proto)?;
                view.check_free(&publish)?;
                if let Some(port) = first_held(&publish) {
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
                    if view.first_conflict(&publish).is_none() && first_held(&publish).is_none() {
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
                        .or_else(|| first_held(&publish));
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
        self.commit_flagged(remove, add, source, false)
    }

    /// As [`Self::commit`], the rules added being runtime reservations or not (see
    /// [`Self::add_runtime`]).
    fn commit_flagged(
        &mut self,
        remove: &[Publish],
        add: &[Rule],
        source: Source,
        reservation: bool,
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
            for v in map_entries(p, &e.backend, e.stats_slot, e.reservation)? {
                old.insert(v.key(), (v, *p));
            }
        }
        let mut writes = Vec::new();
        for (rule, &slot) in add.iter().zip(&slots) {
            let entries = match map_entries(&rule.publish, &rule.backend, slot, reservation) {
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
                        "cannot undo a change to {} port {}: {}",
                        w.owner,
                        w.key.port(),
                        Chain(&e)
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
                    reservation,
                },
            );
        }
        self.forget_stale_flows(&gone);
        self.sync_nat64();
        self.save_state();
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
                    warn!("cannot attach NAT64's entry: {}", Chain(&e));
                }
                self.nat64_failing = true;
            }
        }
    }

    /// Forgets the tracked flows to the backends of rules that went, unless another rule
    /// still sends to them.
    fn forget_stale_flows(&mut self, gone: &[(Publish, Backend)]) {
        let mut stale = BTreeSet::new();
        for (p, b) in gone {
            for ip in b.addrs().ips() {
                for port in b.ports().ports() {
                    if !self.table.uses_backend(ip, port, p.proto()) {
                        stale.insert((ip, port, p.proto().number()));
                    }
                }
            }
        }
        self.forget_flows::<V4>(&stale);
        self.forget_flows::<V6>(&stale);
    }

    /// Forgets the tracked flows of family `F` to the backends of `stale` (address, port,
    /// protocol number; those of the other family are skipped).
    fn forget_flows<F: Family>(&mut self, stale: &BTreeSet<(IpAddr, u16, u8)>) {
        let ours: BTreeSet<(F::Addr, u16, u8)> = stale
            .iter()
            .filter_map(|&(ip, port, proto)| Some((F::from_ip(ip)?, port, proto)))
            .collect();
        if ours.is_empty() {
            return;
        }
        match self.kernel.forget_flows::<F>(&ours) {
            Ok(n) => debug!(
                "forgot {n} tracked {} flows to {} backend ports",
                F::NAME,
                ours.len()
            ),
            Err(e) => warn!(
                "cannot forget the tracked {} flows of removed rules: {}",
                F::NAME,
                Chain(&e)
            ),
        }
    }

    /// Unpublishes `publish` (a whole rule, as `list` shows it): new flows stop at once;
    /// tracked flows to its backend are forgotten unless another rule still sends there.
    pub fn del(&mut self, publish: Publish) -> Result<RuleReply, DaemonError> {
        self.del_owned(publish, None)
    }

    /// As [`Self::del`]; with an `owner`, only a rule of that owner is removed (any
    /// other is refused, and nothing changes). Without one, any rule is.
    pub fn del_owned(
        &mut self,
        publish: Publish,
        owner: Option<&Owner>,
    ) -> Result<RuleReply, DaemonError> {
        if let (Some(asked), Some(_)) = (owner, self.table.get(&publish)) {
            let theirs = self.table.owner(&publish);
            if theirs != Some(asked) {
                return Err(DaemonError::NotOwner {
                    publish,
                    asked: asked.clone(),
                    owner: theirs.cloned(),
                });
            }
        }
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
            let rule = self.resolve(decl, &view, false).map_err(|e| {
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
                    reservation: false,
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
                    owner: self.table.owner(p).cloned(),
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
        match protocol::parse_request(line) {
            Ok(req) => self.handle(req),
            Err(msg) => protocol::encode_err(&msg),
        }
    }

    /// Answers one parsed request (the response line, `\n` included).
    pub fn handle(&mut self, req: Request) -> Vec<u8> {
        let reply = match req {
            Request::Add {
                publish,
                backend,
                owner,
                reservation_ok,
            } => Declaration::new(publish, backend)
                .map_err(DaemonError::from)
                .and_then(|d| self.add_runtime(d, owner, reservation_ok))
                .map(|r| protocol::encode_ok(&r)),
            Request::Del { publish, owner } => self
                .del_owned(publish, owner.as_ref())
                .map(|r| protocol::encode_ok(&r)),
            Request::List => self.list().map(|r| protocol::encode_ok(&r)),
            Request::Apply {
                file,
                dry_run,
                declarations,
            } => self
                .apply(&file, &declarations, dry_run)
                .map(|r| protocol::encode_ok(&r)),
            Request::Flows { filter, limit } => self
                .kernel
                .flows(filter, limit)
                .map(|r| protocol::encode_ok(&r))
                .map_err(|e| DaemonError::Flows(Box::new(e))),
            Request::Trace { query } => self
                .kernel
                .trace(&query)
                .map(|r| protocol::encode_ok(&r))
                .map_err(|e| DaemonError::Trace(Box::new(e))),
        };
        reply.unwrap_or_else(|e| {
            let msg = Chain(&e).to_string();
            debug!("request failed: {msg}");
            protocol::encode_err(&msg)
        })
    }

    /// Re-reads what the daemon takes from the host, once a second: the host's
    /// addresses, where NAT64's entry must run, the fast path's bridge ports.
    pub fn refresh(&mut self) {
        self.refresh_host_addrs();
        self.sync_nat64();
        if let Err(e) = self.kernel.refresh_fast_path() {
            debug!("cannot refresh the fast path's bridge ports: {}", Chain(&e));
        }
    }

    /// Makes the kernel's host addresses (what wildcard rules match), both families,
    /// those the host has now; logs once when this starts or stops failing.
    pub fn refresh_host_addrs(&mut self) {
        let addrs = self.kernel.host_addrs();
        self.host_addrs_v4.sync(&mut self.kernel, &addrs);
        self.host_addrs_v6.sync(&mut self.kernel, &addrs);
    }
}
