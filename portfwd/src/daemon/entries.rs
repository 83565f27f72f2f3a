//! The projection of a rule onto the kernel's rule maps: which entries (`RULES_V4`,
//! `RULES_V6`) a published rule is, and the one function that writes or deletes an
//! entry. A rule is one entry per published port and family served, all with its one
//! counter slot; the daemon's `commit` diffs these entries and undoes them by [`Write`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use portfwd_common::{BackendV4, BackendV6, RuleKeyV4, RuleKeyV6, BACKEND_RESERVATION};

use super::{DaemonError, Kernel};
use crate::{
    dataplane::{DataplaneError, V4, V6},
    rule::{Backend, Host, Publish, RuleError},
};

/// A key of `RULES_V4` or `RULES_V6`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum MapKey {
    V4(RuleKeyV4),
    V6(RuleKeyV6),
}

impl MapKey {
    pub(super) fn port(&self) -> u16 {
        match self {
            MapKey::V4(k) => k.port(),
            MapKey::V6(k) => k.port(),
        }
    }
}

/// One kernel rule entry, key and value of the same family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum MapEntry {
    V4(RuleKeyV4, BackendV4),
    V6(RuleKeyV6, BackendV6),
}

impl MapEntry {
    pub(super) fn key(&self) -> MapKey {
        match self {
            MapEntry::V4(k, _) => MapKey::V4(*k),
            MapEntry::V6(k, _) => MapKey::V6(*k),
        }
    }
}

/// One write to a rules map: `key` set to `new` (or deleted), and what it held before
/// (to undo it).
pub(super) struct Write {
    pub(super) key: MapKey,
    pub(super) new: Option<MapEntry>,
    pub(super) old: Option<MapEntry>,
    /// The rule it belongs to, for messages.
    pub(super) owner: Publish,
}

/// Sets `key` to `entry` (same key), or deletes it.
pub(super) fn write_entry<K: Kernel>(
    kernel: &mut K,
    key: MapKey,
    entry: Option<MapEntry>,
) -> Result<(), DataplaneError> {
    match (entry, key) {
        (Some(MapEntry::V4(k, b)), _) => kernel.insert_rule::<V4>(k, b),
        (Some(MapEntry::V6(k, b)), _) => kernel.insert_rule::<V6>(k, b),
        (None, MapKey::V4(k)) => kernel.remove_rule::<V4>(&k),
        (None, MapKey::V6(k)) => kernel.remove_rule::<V6>(&k),
    }
}

/// The kernel's view of a rule: one entry per port and family served, all with its
/// slot. IPv4 clients go to the backend's IPv4 address (`RULES_V4`); IPv6 clients to its
/// IPv6 address, or to its IPv4 one as `::ffff:a.b.c.d`, which the socket hooks serve and
/// the packet path passes (`RULES_V6`). `*` takes each family's wildcard key. A
/// `reservation`'s entries carry [`BACKEND_RESERVATION`].
pub(super) fn map_entries(
    publish: &Publish,
    backend: &Backend,
    slot: u32,
    reservation: bool,
) -> Result<Vec<MapEntry>, DaemonError> {
    let flags = if reservation { BACKEND_RESERVATION } else { 0 };
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
                    BackendV4::new(b, bp, slot).with_flags(flags),
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
                BackendV6::new(b, bp, slot).with_flags(flags),
            )
        }));
    }
    Ok(entries)
}
