//! The daemon's rule table (what is published, the source of truth the kernel's maps
//! mirror) and the counter-slot allocator. Pure: no kernel calls. Conflicts follow
//! Docker, per port (see [`crate::rule::Publish::conflict`]).

use std::{
    collections::{BTreeMap, VecDeque},
    net::IpAddr,
};

use portfwd_common::MAX_STATS_SLOTS;

use super::DaemonError;
use crate::{
    protocol::{Owner, Source},
    rule::{self, Backend, Proto, Publish},
};

/// Hands out counter slots `0..MAX_STATS_SLOTS`. Fresh slots go first and freed ones are
/// reused oldest first, so a slot rests as long as possible before reuse (a deleted
/// rule's last packets may still be counted in it).
#[derive(Debug, Default)]
pub struct SlotAllocator {
    next: u32,
    free: VecDeque<u32>,
}

impl SlotAllocator {
    /// A slot, or `None` when all are in use.
    pub fn alloc(&mut self) -> Option<u32> {
        if self.next < MAX_STATS_SLOTS {
            self.next += 1;
            Some(self.next - 1)
        } else {
            self.free.pop_front()
        }
    }
    /// An allocator where `used` are taken (an adopted table's slots): the fresh ones
    /// follow the highest, the gaps below it are free.
    pub fn with_used(used: &std::collections::BTreeSet<u32>) -> Self {
        let next = used
            .last()
            .map_or(0, |&m| m.saturating_add(1).min(MAX_STATS_SLOTS));
        Self {
            next,
            free: (0..next).filter(|s| !used.contains(s)).collect(),
        }
    }
    /// Gives `slot` back, to be reused after every slot freed before it.
    pub fn release(&mut self, slot: u32) {
        self.free.push_back(slot);
    }
}

/// One published rule as the daemon holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Where its ports go.
    pub backend: Backend,
    /// Its counter slot (a range shares one).
    pub stats_slot: u32,
    /// Who published it: `cli` or `file`.
    pub source: Source,
    /// A runtime's reservation (see [`super::Daemon::add_runtime`]): its map entries
    /// carry [`portfwd_common::BACKEND_RESERVATION`].
    pub reservation: bool,
}

/// The published rules, keyed by what is published. Pure: no kernel calls.
/// Invariant: `owners` only names rules of `rules` (removing a rule drops its owner).
#[derive(Clone, Debug, Default)]
pub struct RuleTable {
    rules: BTreeMap<Publish, Entry>,
    /// The plugins runtime rules belong to (the rest have none).
    owners: BTreeMap<Publish, Owner>,
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
    /// The rule published as `publish`.
    pub fn get(&self, publish: &Publish) -> Option<&Entry> {
        self.rules.get(publish)
    }
    /// Every rule, in [`Publish`] order.
    pub fn iter(&self) -> impl Iterator<Item = (&Publish, &Entry)> {
        self.rules.iter()
    }
    /// How many rules are published.
    pub fn len(&self) -> usize {
        self.rules.len()
    }
    /// Whether no rule is published.
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
    pub(super) fn publishes(&self, ip: IpAddr, port: u16, proto: Proto) -> bool {
        self.rules.keys().any(|p| {
            p.host().bind_addrs().contains(&ip) && p.proto() == proto && p.ports().contains(port)
        })
    }
    /// The owner of the rule published as `publish`, if it has one.
    pub fn owner(&self, publish: &Publish) -> Option<&Owner> {
        self.owners.get(publish)
    }
    pub(super) fn insert(&mut self, publish: Publish, entry: Entry) {
        self.rules.insert(publish, entry);
    }
    /// Marks the published rule `publish` as `owner`'s (a rule not published: nothing).
    pub(super) fn set_owner(&mut self, publish: Publish, owner: Owner) {
        if self.rules.contains_key(&publish) {
            self.owners.insert(publish, owner);
        }
    }
    pub(super) fn remove(&mut self, publish: &Publish) -> Option<Entry> {
        self.owners.remove(publish);
        self.rules.remove(publish)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_fresh_first_then_reused_oldest_first() {
        let mut a = SlotAllocator::default();
        for i in 0..MAX_STATS_SLOTS {
            assert_eq!(a.alloc(), Some(i));
        }
        assert_eq!(a.alloc(), None);
        a.release(7);
        a.release(3);
        assert_eq!((a.alloc(), a.alloc(), a.alloc()), (Some(7), Some(3), None));
    }

    #[test]
    fn adopted_slots_stay_taken() {
        let mut a = SlotAllocator::with_used(&[0, 2, 5].into_iter().collect());
        let got: Vec<_> = (0..4).filter_map(|_| a.alloc()).collect();
        assert_eq!(got, vec![6, 7, 8, 9]);
        let mut a = SlotAllocator::with_used(&[MAX_STATS_SLOTS - 1].into_iter().collect());
        assert_eq!(a.alloc(), Some(0));
        assert_eq!(
            SlotAllocator::with_used(&Default::default()).alloc(),
            Some(0)
        );
    }
}
