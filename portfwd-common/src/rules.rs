//! Rule matching: which published rule serves a destination, written once for both
//! families and every caller (a packet at ingress, a local socket's connect or sendmsg,
//! a local `bind()`). The caller supplies its maps through [`RuleMaps`] (the kernel
//! over its BPF maps, tests and the daemon over anything else).
//!
//! The rules, keyed by (address, port, protocol), hold address-bound rules and the
//! wildcard (address `0.0.0.0` / `::`), which covers only the host's own addresses:
//!
//! - [`Caller::Packet`]: one exact lookup. The daemon expands each wildcard rule into
//!   one entry per host address of the family ([`crate::BACKEND_EXPANDED`], kept in step
//!   with the addresses), so a hit on either kind of rule is a single hash lookup, with
//!   no host-address check. The `PUBLISHED_PORTS` bits say whether the lookup can hit
//!   at all (most traffic is for unpublished ports and costs one array read). Misses
//!   are [`Reason::PassNoRule`], or [`Reason::PassNotHostAddr`] when the family has a
//!   wildcard rule on the port (its own bit) and the destination is not a host address
//!   (checked on the miss path only); the ingress programs count them.
//! - [`Caller::Socket`]: TCP and UDP only. Loopback (`127/8`, `::1`) is the host's only
//!   in the host's network namespace; the wildcard also covers loopback and the
//!   unspecified address. An IPv4-mapped IPv6 address (a dual-stack socket) is looked up
//!   in the IPv4 rules and its backend given back IPv4-mapped.
//! - [`Caller::Bind`]: as a socket in the host namespace (binds elsewhere, and port 0,
//!   never match); `[::]` on a dual-stack socket also takes the IPv4 wildcard's port.
//!   A rule flagged [`crate::BACKEND_RESERVATION`] (a runtime's, whose own reservation
//!   socket holds the port) never matches a bind: the bind goes through.
//!
//! Key construction and lookup order are exactly the kernel's: an exact lookup with
//! the unspecified address is a wildcard lookup, and so hits without a host-address check.
//! The socket hooks keep the wildcard lookup and host-address check: they also serve
//! loopback and the unspecified address, which have no expansions.

use crate::{
    addr, port_bits, proto, wildcard_bit, BackendV4, BackendV6, Reason, RuleKeyV4, RuleKeyV6,
};

/// Who asks for a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A packet at ingress (XDP or TC).
    Packet,
    /// A local socket's connect or sendmsg; `host_netns`: it runs in the host's network
    /// namespace, where loopback is the host's.
    Socket {
        /// The socket is in the host's network namespace.
        host_netns: bool,
    },
    /// A local `bind()`; outside the host's namespace it never matches.
    Bind {
        /// The socket is in the host's network namespace.
        host_netns: bool,
    },
}

/// The maps rule matching reads. Values are returned by copy: the daemon may replace
/// them at any time.
pub trait RuleMaps {
    /// The `PUBLISHED_PORTS` bits of `port_be` (network order), 0 if none.
    fn published(&self, port_be: [u8; 2]) -> u8;
    /// The IPv4 rule under exactly `key`.
    fn rule_v4(&self, key: &RuleKeyV4) -> Option<BackendV4>;
    /// The IPv6 rule under exactly `key`.
    fn rule_v6(&self, key: &RuleKeyV6) -> Option<BackendV6>;
    /// Whether `addr` is one of the host's IPv4 addresses.
    fn is_host_v4(&self, addr: &[u8; 4]) -> bool;
    /// Whether `addr` is one of the host's IPv6 addresses.
    fn is_host_v6(&self, addr: &[u8; 16]) -> bool;
}

/// An address family, by its network-order address type (`[u8; 4]` or `[u8; 16]`).
pub trait Family: Copy + PartialEq {
    /// The rule map's key.
    type RuleKey;
    /// The rule map's value.
    type Backend: Copy;
    /// `0.0.0.0` / `::`: the wildcard's key address.
    const UNSPECIFIED: Self;
    /// Whether a socket bound to [`Self::UNSPECIFIED`] also takes the IPv4 ports
    /// (an IPv6 dual-stack socket).
    const DUAL_STACK: bool;
    /// IPv6 (its own wildcard bits in `PUBLISHED_PORTS`).
    const V6: bool;
    /// The rule key of (`self`, `port_be`, `proto`).
    fn rule_key(self, port_be: [u8; 2], proto: u8) -> Self::RuleKey;
    /// `127/8` or `::1`.
    fn is_loopback(&self) -> bool;
    /// The IPv4 address inside an IPv4-mapped one (always `None` for IPv4).
    fn mapped_v4(&self) -> Option<[u8; 4]>;
    /// An IPv4 backend in this family (IPv4-mapped for IPv6).
    fn from_v4(b: BackendV4) -> Self::Backend;
    /// The backend's flags ([`crate::BACKEND_RESERVATION`]).
    fn flags(b: &Self::Backend) -> u8;
    /// This family's rule under `key`.
    fn rule<M: RuleMaps>(maps: &M, key: &Self::RuleKey) -> Option<Self::Backend>;
    /// Whether `self` is one of the host's addresses.
    fn is_host<M: RuleMaps>(&self, maps: &M) -> bool;
}

impl Family for [u8; 4] {
    type RuleKey = RuleKeyV4;
    type Backend = BackendV4;
    const UNSPECIFIED: Self = [0; 4];
    const DUAL_STACK: bool = false;
    const V6: bool = false;
    #[inline(always)]
    fn rule_key(self, port_be: [u8; 2], proto: u8) -> RuleKeyV4 {
        RuleKeyV4::new(self, port_be, proto)
    }
    #[inline(always)]
    fn is_loopback(&self) -> bool {
        self[0] == 127
    }
    #[inline(always)]
    fn mapped_v4(&self) -> Option<[u8; 4]> {
        None
    }
    #[inline(always)]
    fn from_v4(b: BackendV4) -> BackendV4 {
        b
    }
    #[inline(always)]
    fn flags(b: &BackendV4) -> u8 {
        b.flags()
    }
    #[inline(always)]
    fn rule<M: RuleMaps>(maps: &M, key: &RuleKeyV4) -> Option<BackendV4> {
        maps.rule_v4(key)
    }
    #[inline(always)]
    fn is_host<M: RuleMaps>(&self, maps: &M) -> bool {
        maps.is_host_v4(self)
    }
}

/// `::1`.
pub const LOOPBACK_V6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

impl Family for [u8; 16] {
    type RuleKey = RuleKeyV6;
    type Backend = BackendV6;
    const UNSPECIFIED: Self = [0; 16];
    const DUAL_STACK: bool = true;
    const V6: bool = true;
    #[inline(always)]
    fn rule_key(self, port_be: [u8; 2], proto: u8) -> RuleKeyV6 {
        RuleKeyV6::new(self, port_be, proto)
    }
    #[inline(always)]
    fn is_loopback(&self) -> bool {
        *self == LOOPBACK_V6
    }
    #[inline(always)]
    fn mapped_v4(&self) -> Option<[u8; 4]> {
        addr::ipv4_mapped(self)
    }
    #[inline(always)]
    fn from_v4(b: BackendV4) -> BackendV6 {
        BackendV6::from_v4_mapped(b)
    }
    #[inline(always)]
    fn flags(b: &BackendV6) -> u8 {
        b.flags()
    }
    #[inline(always)]
    fn rule<M: RuleMaps>(maps: &M, key: &RuleKeyV6) -> Option<BackendV6> {
        maps.rule_v6(key)
    }
    #[inline(always)]
    fn is_host<M: RuleMaps>(&self, maps: &M) -> bool {
        maps.is_host_v6(self)
    }
}

/// The rule serving `caller`'s destination `addr:port_be` (network order) over `proto`,
/// or why there is none (see the module docs for each caller). By value, for the host
/// side; it is [`lookup_ref`].
#[inline(always)]
pub fn lookup<A: Family, M: RuleMaps>(
    maps: &M,
    caller: Caller,
    addr: A,
    port_be: [u8; 2],
    proto: u8,
) -> Result<A::Backend, Reason> {
    lookup_ref(maps, caller, &addr, port_be, proto)
}

/// [`lookup`] with the address by reference: what the kernel calls, since a copy of an
/// IPv6 address is 16 more bytes of a stack that has none to spare (the TC ingress
/// program sits at the 512-byte limit).
#[inline(always)]
pub fn lookup_ref<A: Family, M: RuleMaps>(
    maps: &M,
    caller: Caller,
    addr: &A,
    port_be: [u8; 2],
    proto: u8,
) -> Result<A::Backend, Reason> {
    match caller {
        Caller::Packet => packet(maps, addr, port_be, proto),
        Caller::Socket { host_netns } => socket(maps, *addr, port_be, proto, host_netns),
        Caller::Bind { host_netns } => {
            // Port 0 asks for an ephemeral port: never a published one.
            if !host_netns || port_be == [0, 0] {
                return Err(Reason::PassNoRule);
            }
            let found = match socket(maps, *addr, port_be, proto, true) {
                Ok(b) => Ok(b),
                Err(_) if A::DUAL_STACK && *addr == A::UNSPECIFIED => {
                    socket_family(maps, [0u8; 4], port_be, proto, true).map(A::from_v4)
                }
                Err(e) => Err(e),
            };
            match found {
                // A runtime's reservation: its bind goes through.
                Ok(b) if A::flags(&b) & crate::BACKEND_RESERVATION != 0 => Err(Reason::PassNoRule),
                other => other,
            }
        }
    }
}

/// [`Caller::Packet`]: [`packet_port`], then [`packet_rule`].
#[inline(always)]
fn packet<A: Family, M: RuleMaps>(
    maps: &M,
    addr: &A,
    port_be: [u8; 2],
    proto: u8,
) -> Result<A::Backend, Reason> {
    let port = packet_port::<A, M>(maps, port_be, proto)?;
    packet_rule(maps, port, addr, port_be, proto)
}

/// What a destination port's `PUBLISHED_PORTS` bits leave for one family and protocol
/// to look up ([`packet_port`]).
#[derive(Clone, Copy, Debug)]
pub struct PublishedPort {
    bits: u8,
}

/// The first step of [`Caller::Packet`], from the destination port alone:
/// [`Reason::PassNoRule`] when neither an entry nor a wildcard rule of the family is
/// published on the port for `proto` (most traffic; one array read). Ingress asks it
/// before it reads the rest of the packet's flow, which only [`packet_rule`] needs.
#[inline(always)]
pub fn packet_port<A: Family, M: RuleMaps>(
    maps: &M,
    port_be: [u8; 2],
    proto: u8,
) -> Result<PublishedPort, Reason> {
    let bits = maps.published(port_be) & (port_bits(proto).0 | wildcard_bit(proto, A::V6));
    if bits == 0 {
        return Err(Reason::PassNoRule);
    }
    Ok(PublishedPort { bits })
}

/// The second step of [`Caller::Packet`]: the rule at `addr` on the port
/// [`packet_port`] let through, or why there is none.
#[inline(always)]
pub fn packet_rule<A: Family, M: RuleMaps>(
    maps: &M,
    port: PublishedPort,
    addr: &A,
    port_be: [u8; 2],
    proto: u8,
) -> Result<A::Backend, Reason> {
    if port.bits & port_bits(proto).0 != 0 {
        if let Some(b) = A::rule(maps, &(*addr).rule_key(port_be, proto)) {
            return Ok(b);
        }
    }
    // Only the reason of a miss is left to find: a wildcard rule's expansions cover
    // every host address, so the family's wildcard port missed at another address.
    if port.bits & wildcard_bit(proto, A::V6) != 0 && !addr.is_host(maps) {
        return Err(Reason::PassNotHostAddr);
    }
    Err(Reason::PassNoRule)
}

/// [`Caller::Socket`]: an IPv4-mapped address goes to the IPv4 rules.
#[inline(always)]
fn socket<A: Family, M: RuleMaps>(
    maps: &M,
    addr: A,
    port_be: [u8; 2],
    proto: u8,
    host_netns: bool,
) -> Result<A::Backend, Reason> {
    if let Some(v4) = addr.mapped_v4() {
        return socket_family(maps, v4, port_be, proto, host_netns).map(A::from_v4);
    }
    socket_family(maps, addr, port_be, proto, host_netns)
}

/// [`Caller::Socket`] within one family.
#[inline(always)]
fn socket_family<A: Family, M: RuleMaps>(
    maps: &M,
    addr: A,
    port_be: [u8; 2],
    l4: u8,
    host_netns: bool,
) -> Result<A::Backend, Reason> {
    if l4 != proto::TCP && l4 != proto::UDP {
        return Err(Reason::PassNotTcpUdp);
    }
    let loopback = addr.is_loopback();
    if loopback && !host_netns {
        return Err(Reason::PassNoRule);
    }
    if let Some(b) = A::rule(maps, &addr.rule_key(port_be, l4)) {
        return Ok(b);
    }
    let Some(wildcard) = A::rule(maps, &A::UNSPECIFIED.rule_key(port_be, l4)) else {
        return Err(Reason::PassNoRule);
    };
    // The unspecified address itself: a bind there would take the wildcard's port on
    // every address.
    if loopback || addr == A::UNSPECIFIED || addr.is_host(maps) {
        return Ok(wildcard);
    }
    Err(Reason::PassNotHostAddr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};
    use std::vec::Vec;

    const TCP: u8 = proto::TCP;
    const UDP: u8 = proto::UDP;

    /// Rules and host addresses in memory; `published` as the daemon writes it unless
    /// a test sets it by hand.
    #[derive(Default, Debug, Clone)]
    struct Mem {
        v4: BTreeMap<([u8; 4], [u8; 2], u8), BackendV4>,
        v6: BTreeMap<([u8; 16], [u8; 2], u8), BackendV6>,
        hosts4: BTreeSet<[u8; 4]>,
        hosts6: BTreeSet<[u8; 16]>,
        published: BTreeMap<[u8; 2], u8>,
    }

    impl Mem {
        /// `wildcard`: of the family `v6`; else an address-bound entry.
        fn mark(&mut self, wildcard: Option<bool>, port: [u8; 2], l4: u8) {
            let bit = match wildcard {
                Some(v6) => crate::wildcard_bits(l4, v6),
                None => port_bits(l4).0,
            };
            *self.published.entry(port).or_default() |= bit;
        }
        fn add4(&mut self, a: [u8; 4], port: u16, l4: u8, slot: u32) -> &mut Self {
            let p = port.to_be_bytes();
            let b = BackendV4::new([10, 0, 0, slot as u8].into(), 8000 + slot as u16, slot);
            self.v4.insert((a, p, l4), b);
            self.mark((a == [0; 4]).then_some(false), p, l4);
            self
        }
        fn add6(&mut self, a: [u8; 16], port: u16, l4: u8, slot: u32) -> &mut Self {
            let p = port.to_be_bytes();
            let mut ba = [0xfd; 16];
            ba[15] = slot as u8;
            let b = BackendV6::from_bytes(ba, (8000 + slot as u16).to_be_bytes(), slot);
            self.v6.insert((a, p, l4), b);
            self.mark((a == [0; 16]).then_some(true), p, l4);
            self
        }
    }

    impl Mem {
        /// Each wildcard rule's expansions, as the daemon writes them: one entry per
        /// host address of the family, where no address-bound rule holds the key.
        fn expand(&mut self) -> &mut Self {
            let flag = crate::BACKEND_EXPANDED;
            let w4: Vec<_> = self
                .v4
                .iter()
                .filter(|(k, _)| k.0 == [0; 4])
                .map(|(k, b)| (*k, *b))
                .collect();
            for ((_, p, l4), b) in w4 {
                for h in self.hosts4.clone() {
                    if let std::collections::btree_map::Entry::Vacant(e) = self.v4.entry((h, p, l4))
                    {
                        e.insert(b.with_flags(b.flags() | flag));
                        self.mark(None, p, l4);
                    }
                }
            }
            let w6: Vec<_> = self
                .v6
                .iter()
                .filter(|(k, _)| k.0 == [0; 16])
                .map(|(k, b)| (*k, *b))
                .collect();
            for ((_, p, l4), b) in w6 {
                for h in self.hosts6.clone() {
                    if let std::collections::btree_map::Entry::Vacant(e) = self.v6.entry((h, p, l4))
                    {
                        e.insert(b.with_flags(b.flags() | flag));
                        self.mark(None, p, l4);
                    }
                }
            }
            self
        }
    }

    impl RuleMaps for Mem {
        fn published(&self, port_be: [u8; 2]) -> u8 {
            self.published.get(&port_be).copied().unwrap_or(0)
        }
        fn rule_v4(&self, k: &RuleKeyV4) -> Option<BackendV4> {
            let key = (k.addr().octets(), k.port().to_be_bytes(), k.proto());
            self.v4.get(&key).copied()
        }
        fn rule_v6(&self, k: &RuleKeyV6) -> Option<BackendV6> {
            let key = (k.addr().octets(), k.port().to_be_bytes(), k.proto());
            self.v6.get(&key).copied()
        }
        fn is_host_v4(&self, a: &[u8; 4]) -> bool {
            self.hosts4.contains(a)
        }
        fn is_host_v6(&self, a: &[u8; 16]) -> bool {
            self.hosts6.contains(a)
        }
    }

    // The four lookups as the kernel had them before they became one function (the
    // packet's with the wildcard lookup and host check that expansions replace), over
    // the same maps: the oracle the generic one must agree with.
    fn old_ingress_v4(m: &Mem, dst: [u8; 4], port: [u8; 2], l4: u8) -> Result<u32, Reason> {
        let bits = m.published(port);
        let (e, w) = (port_bits(l4).0, wildcard_bit(l4, false));
        if bits & e != 0 {
            if let Some(b) = m.rule_v4(&RuleKeyV4::new(dst, port, l4)) {
                return Ok(b.stats_slot());
            }
        }
        if bits & w == 0 {
            return Err(Reason::PassNoRule);
        }
        let Some(b) = m.rule_v4(&RuleKeyV4::new([0; 4], port, l4)) else {
            return Err(Reason::PassNoRule);
        };
        if !m.is_host_v4(&dst) {
            return Err(Reason::PassNotHostAddr);
        }
        Ok(b.stats_slot())
    }
    fn old_ingress_v6(m: &Mem, dst: [u8; 16], port: [u8; 2], l4: u8) -> Result<u32, Reason> {
        let bits = m.published(port);
        let (e, w) = (port_bits(l4).0, wildcard_bit(l4, true));
        if bits & e != 0 {
            if let Some(b) = m.rule_v6(&RuleKeyV6::new(dst, port, l4)) {
                return Ok(b.stats_slot());
            }
        }
        if bits & w == 0 {
            return Err(Reason::PassNoRule);
        }
        let Some(b) = m.rule_v6(&RuleKeyV6::new([0; 16], port, l4)) else {
            return Err(Reason::PassNoRule);
        };
        if !m.is_host_v6(&dst) {
            return Err(Reason::PassNotHostAddr);
        }
        Ok(b.stats_slot())
    }
    fn old_local(m: &Mem, addr: [u8; 4], port: [u8; 2], l4: u8, ns: bool) -> Option<BackendV4> {
        if l4 != TCP && l4 != UDP {
            return None;
        }
        let loopback = addr[0] == 127;
        if loopback && !ns {
            return None;
        }
        if let Some(b) = m.rule_v4(&RuleKeyV4::new(addr, port, l4)) {
            return Some(b);
        }
        let wildcard = m.rule_v4(&RuleKeyV4::new([0; 4], port, l4))?;
        if loopback || m.is_host_v4(&addr) || addr == [0; 4] {
            return Some(wildcard);
        }
        None
    }
    fn old_local6(m: &Mem, addr: [u8; 16], port: [u8; 2], l4: u8, ns: bool) -> Option<BackendV6> {
        if addr[..10] == [0; 10] && addr[10..12] == [0xff, 0xff] {
            let v4 = [addr[12], addr[13], addr[14], addr[15]];
            let b = old_local(m, v4, port, l4, ns)?;
            let mut a = [0u8; 16];
            a[10] = 0xff;
            a[11] = 0xff;
            a[12..].copy_from_slice(&b.addr_bytes());
            return Some(
                BackendV6::from_bytes(a, b.port_be(), b.stats_slot()).with_flags(b.flags()),
            );
        }
        if l4 != TCP && l4 != UDP {
            return None;
        }
        let loopback = addr == LOOPBACK_V6;
        if loopback && !ns {
            return None;
        }
        match m.rule_v6(&RuleKeyV6::new(addr, port, l4)) {
            Some(b) => Some(b),
            None => {
                let w = m.rule_v6(&RuleKeyV6::new([0; 16], port, l4))?;
                if !(loopback || addr == [0; 16] || m.is_host_v6(&addr)) {
                    return None;
                }
                Some(w)
            }
        }
    }
    fn old_bind4_refused(m: &Mem, addr: [u8; 4], port: [u8; 2], l4: u8, ns: bool) -> bool {
        ns && !(port == [0, 0] || old_local(m, addr, port, l4, true).is_none())
    }
    fn old_bind6_refused(m: &Mem, addr: [u8; 16], port: [u8; 2], l4: u8, ns: bool) -> bool {
        if !ns || port == [0, 0] {
            return false;
        }
        !(old_local6(m, addr, port, l4, true).is_none()
            && !(addr == [0; 16] && old_local(m, [0; 4], port, l4, true).is_some()))
    }

    fn v6(s: &str) -> [u8; 16] {
        s.parse::<core::net::Ipv6Addr>()
            .expect("an IPv6 address")
            .octets()
    }

    /// Host 192.0.2.1 / 2001:db8::1; rules: exact 192.0.2.1:80/tcp (slot 1), wildcard
    /// :80/tcp (2), wildcard :53/udp (3), exact 198.51.100.9:443/tcp on no host address
    /// (4); IPv6 exact [2001:db8::1]:80/tcp (5), wildcard :80/tcp (6), wildcard
    /// :9000/tcp to an IPv4 backend (7, mapped).
    fn sample() -> Mem {
        let mut m = Mem::default();
        m.hosts4.insert([192, 0, 2, 1]);
        m.hosts6.insert(v6("2001:db8::1"));
        m.add4([192, 0, 2, 1], 80, TCP, 1)
            .add4([0; 4], 80, TCP, 2)
            .add4([0; 4], 53, UDP, 3)
            .add4([198, 51, 100, 9], 443, TCP, 4)
            .add6(v6("2001:db8::1"), 80, TCP, 5)
            .add6([0; 16], 80, TCP, 6);
        let mapped = BackendV6::from_v4_mapped(BackendV4::new([10, 0, 0, 7].into(), 8007, 7));
        m.v6.insert(([0; 16], 9000u16.to_be_bytes(), TCP), mapped);
        m.mark(Some(true), 9000u16.to_be_bytes(), TCP);
        m.expand();
        m
    }

    fn slot4(r: Result<BackendV4, Reason>) -> Result<u32, Reason> {
        r.map(|b| b.stats_slot())
    }
    fn slot6(r: Result<BackendV6, Reason>) -> Result<u32, Reason> {
        r.map(|b| b.stats_slot())
    }

    /// (destination, port, proto, expected slot or reason)
    type PacketCase<A> = (A, u16, u8, Result<u32, Reason>);
    /// (destination, port, proto, host netns, expected)
    type SocketCase<A, T> = (A, u16, u8, bool, Option<T>);

    #[test]
    fn packet_table() {
        use Reason::*;
        let m = sample();
        let p = |port: u16| port.to_be_bytes();
        // (destination, port, proto, expected)
        let v4: &[PacketCase<[u8; 4]>] = &[
            ([192, 0, 2, 1], 80, TCP, Ok(1)),
            ([192, 0, 2, 2], 80, TCP, Err(PassNotHostAddr)),
            ([127, 0, 0, 1], 80, TCP, Err(PassNotHostAddr)),
            ([192, 0, 2, 1], 80, UDP, Err(PassNoRule)),
            ([192, 0, 2, 1], 53, UDP, Ok(3)),
            ([192, 0, 2, 1], 53, TCP, Err(PassNoRule)),
            ([198, 51, 100, 9], 443, TCP, Ok(4)),
            ([198, 51, 100, 8], 443, TCP, Err(PassNoRule)),
            ([192, 0, 2, 1], 81, TCP, Err(PassNoRule)),
            // An exact lookup of 0.0.0.0 is the wildcard's key.
            ([0; 4], 80, TCP, Ok(2)),
            ([0; 4], 53, UDP, Ok(3)),
            ([192, 0, 2, 1], 80, 1, Err(PassNoRule)),
        ];
        for &(a, port, l4, want) in v4 {
            let got = slot4(lookup(&m, Caller::Packet, a, p(port), l4));
            assert_eq!(got, want, "{a:?}:{port}/{l4}");
        }
        let v6t: &[PacketCase<&str>] = &[
            ("2001:db8::1", 80, TCP, Ok(5)),
            ("2001:db8::2", 80, TCP, Err(PassNotHostAddr)),
            ("::1", 80, TCP, Err(PassNotHostAddr)),
            ("2001:db8::1", 9000, TCP, Ok(7)),
            ("::ffff:192.0.2.1", 80, TCP, Err(PassNotHostAddr)),
            ("2001:db8::1", 53, UDP, Err(PassNoRule)),
        ];
        for &(a, port, l4, want) in v6t {
            let got = slot6(lookup(&m, Caller::Packet, v6(a), p(port), l4));
            assert_eq!(got, want, "{a}:{port}/{l4}");
        }
    }

    #[test]
    fn packet_trusts_the_published_bits() {
        let mut m = sample();
        // No bits: no lookup at all, whatever the rules.
        m.published.clear();
        let r = lookup(&m, Caller::Packet, [192, 0, 2, 1], 80u16.to_be_bytes(), TCP);
        assert_eq!(slot4(r), Err(Reason::PassNoRule));
        // Only the wildcard bit: no lookup (the expansions set the exact bit); the
        // miss's reason from the host-address check.
        m.mark(Some(false), 80u16.to_be_bytes(), TCP);
        let r = lookup(&m, Caller::Packet, [192, 0, 2, 1], 80u16.to_be_bytes(), TCP);
        assert_eq!(slot4(r), Err(Reason::PassNoRule));
        let r = lookup(&m, Caller::Packet, [192, 0, 2, 9], 80u16.to_be_bytes(), TCP);
        assert_eq!(slot4(r), Err(Reason::PassNotHostAddr));
        // The exact bit: the entry under the destination, whatever the wildcard.
        m.mark(None, 80u16.to_be_bytes(), TCP);
        m.v4.remove(&([0; 4], 80u16.to_be_bytes(), TCP));
        let r = lookup(&m, Caller::Packet, [192, 0, 2, 1], 80u16.to_be_bytes(), TCP);
        assert_eq!(slot4(r), Ok(1));
    }

    #[test]
    fn packet_hits_expansions_in_one_lookup() {
        let m = sample();
        let p = |port: u16| port.to_be_bytes();
        // A wildcard served through its expansion: the flag, its slot, no host check.
        let b = lookup(&m, Caller::Packet, [192, 0, 2, 1], p(53), UDP).expect("expansion");
        assert_eq!((b.stats_slot(), b.flags()), (3, crate::BACKEND_EXPANDED));
        // The address-bound rule on the same key is not overwritten by an expansion.
        let b = lookup(&m, Caller::Packet, [192, 0, 2, 1], p(80), TCP).expect("exact");
        assert_eq!((b.stats_slot(), b.flags()), (1, 0));
        // Without the expansion (a host address the daemon has not expanded for yet),
        // the wildcard does not serve the packet.
        let mut gone = m.clone();
        gone.v4.remove(&([192, 0, 2, 1], p(53), UDP));
        let r = lookup(&gone, Caller::Packet, [192, 0, 2, 1], p(53), UDP);
        assert_eq!(slot4(r), Err(Reason::PassNoRule));
    }

    #[test]
    fn socket_table() {
        let m = sample();
        let p = |port: u16| port.to_be_bytes();
        // (address, port, proto, host netns, expected slot)
        let v4: &[SocketCase<[u8; 4], u32>] = &[
            ([192, 0, 2, 1], 80, TCP, true, Some(1)),
            ([192, 0, 2, 1], 80, TCP, false, Some(1)),
            ([127, 0, 0, 1], 80, TCP, true, Some(2)),
            ([127, 9, 9, 9], 80, TCP, true, Some(2)),
            ([127, 0, 0, 1], 80, TCP, false, None),
            ([192, 0, 2, 2], 80, TCP, true, None),
            ([0; 4], 80, TCP, false, Some(2)),
            ([198, 51, 100, 9], 443, TCP, false, Some(4)),
            ([192, 0, 2, 1], 80, 1, true, None),
            ([192, 0, 2, 1], 53, UDP, false, Some(3)),
        ];
        for &(a, port, l4, ns, want) in v4 {
            let c = Caller::Socket { host_netns: ns };
            let got = lookup(&m, c, a, p(port), l4).ok().map(|b| b.stats_slot());
            assert_eq!(got, want, "{a:?}:{port}/{l4} ns {ns}");
        }
        let v6t: &[SocketCase<&str, (u32, &str)>] = &[
            (
                "2001:db8::1",
                80,
                TCP,
                true,
                Some((5, "fdfd:fdfd:fdfd:fdfd:fdfd:fdfd:fdfd:fd05")),
            ),
            (
                "::1",
                80,
                TCP,
                true,
                Some((6, "fdfd:fdfd:fdfd:fdfd:fdfd:fdfd:fdfd:fd06")),
            ),
            ("::1", 80, TCP, false, None),
            ("::1", 9000, TCP, true, Some((7, "::ffff:10.0.0.7"))),
            ("2001:db8::2", 80, TCP, true, None),
            // Mapped: the IPv4 rules, the backend mapped.
            (
                "::ffff:192.0.2.1",
                80,
                TCP,
                false,
                Some((1, "::ffff:10.0.0.1")),
            ),
            (
                "::ffff:127.0.0.1",
                80,
                TCP,
                true,
                Some((2, "::ffff:10.0.0.2")),
            ),
            ("::ffff:127.0.0.1", 80, TCP, false, None),
            (
                "::ffff:192.0.2.1",
                53,
                UDP,
                true,
                Some((3, "::ffff:10.0.0.3")),
            ),
            ("::ffff:192.0.2.1", 53, 1, true, None),
        ];
        for &(a, port, l4, ns, want) in v6t {
            let c = Caller::Socket { host_netns: ns };
            let got = lookup(&m, c, v6(a), p(port), l4).ok();
            let want = want.map(|(slot, addr)| (slot, v6(addr)));
            assert_eq!(
                got.map(|b| (b.stats_slot(), b.addr_bytes())),
                want,
                "{a}:{port}/{l4}"
            );
        }
    }

    #[test]
    fn bind_table() {
        let m = sample();
        let p = |port: u16| port.to_be_bytes();
        let bind = |ns| Caller::Bind { host_netns: ns };
        assert!(lookup(&m, bind(true), [0u8; 4], p(80), TCP).is_ok());
        assert!(lookup(&m, bind(false), [0u8; 4], p(80), TCP).is_err());
        assert!(lookup(&m, bind(true), [0u8; 4], p(0), TCP).is_err());
        assert!(lookup(&m, bind(true), [127, 0, 0, 1], p(80), TCP).is_ok());
        assert!(lookup(&m, bind(true), [192, 0, 2, 2], p(80), TCP).is_err());
        assert!(lookup(&m, bind(true), [0u8; 4], p(53), UDP).is_ok());
        // `[::]` takes the IPv4 wildcard's port too (53/udp has no IPv6 rule).
        assert!(lookup(&m, bind(true), [0u8; 16], p(53), UDP).is_ok());
        assert!(lookup(&m, bind(true), [0u8; 16], p(443), TCP).is_err());
        assert!(lookup(&m, bind(true), v6("2001:db8::2"), p(53), UDP).is_err());
        assert!(lookup(&m, bind(true), v6("::ffff:0.0.0.0"), p(53), UDP).is_ok());
    }

    #[test]
    fn a_reservation_lets_binds_through_and_still_serves() {
        let mut m = sample();
        let p = |port: u16| port.to_be_bytes();
        for b in m.v4.values_mut() {
            *b = b.with_flags(crate::BACKEND_RESERVATION);
        }
        let bind = Caller::Bind { host_netns: true };
        assert!(lookup(&m, bind, [0u8; 4], p(80), TCP).is_err());
        assert!(lookup(&m, bind, [127, 0, 0, 1], p(80), TCP).is_err());
        // `[::]` falling back to the IPv4 wildcard's rule keeps its flag.
        assert!(lookup(&m, bind, [0u8; 16], p(53), UDP).is_err());
        // Connects and packets are served as before.
        let socket = Caller::Socket { host_netns: true };
        let b = lookup(&m, socket, [127, 0, 0, 1], p(80), TCP).expect("served");
        assert_eq!(b.flags(), crate::BACKEND_RESERVATION);
        assert!(lookup(&m, Caller::Packet, [0u8; 4], p(80), TCP).is_ok());
    }

    fn arb_v4() -> impl Strategy<Value = [u8; 4]> {
        prop_oneof![
            Just([0u8; 4]),
            Just([127, 0, 0, 1]),
            Just([192, 0, 2, 1]),
            Just([192, 0, 2, 2]),
            any::<[u8; 4]>(),
        ]
    }
    fn arb_v6() -> impl Strategy<Value = [u8; 16]> {
        prop_oneof![
            Just([0u8; 16]),
            Just(LOOPBACK_V6),
            Just(v6("2001:db8::1")),
            Just(v6("2001:db8::2")),
            arb_v4().prop_map(addr::to_ipv4_mapped),
            any::<[u8; 16]>(),
        ]
    }
    fn arb_l4() -> impl Strategy<Value = u8> {
        prop_oneof![Just(TCP), Just(UDP), Just(1u8)]
    }
    fn arb_port() -> impl Strategy<Value = [u8; 2]> {
        prop_oneof![Just([0u8, 0]), Just([0, 80]), Just([0, 53])]
    }
    fn arb_mem() -> impl Strategy<Value = Mem> {
        let r4 = proptest::collection::vec((arb_v4(), arb_port(), arb_l4()), 0..6);
        let r6 = proptest::collection::vec((arb_v6(), arb_port(), arb_l4()), 0..6);
        // Host addresses are never unspecified; the maps as the daemon leaves them (no
        // stale bits: a host address without its expansion would miss).
        let h4 = proptest::collection::vec(arb_v4().prop_filter("host", |a| *a != [0; 4]), 0..3);
        let h6 = proptest::collection::vec(arb_v6().prop_filter("host", |a| *a != [0; 16]), 0..3);
        (r4, r6, h4, h6).prop_map(|(r4, r6, h4, h6): (Vec<_>, Vec<_>, Vec<_>, Vec<_>)| {
            let mut m = Mem::default();
            for (i, (a, p, l4)) in r4.into_iter().enumerate() {
                m.add4(a, u16::from_be_bytes(p), l4, i as u32);
            }
            for (i, (a, p, l4)) in r6.into_iter().enumerate() {
                m.add6(a, u16::from_be_bytes(p), l4, 100 + i as u32);
            }
            m.hosts4.extend(h4);
            m.hosts6.extend(h6);
            m
        })
    }

    proptest! {
        #[test]
        fn agrees_with_the_old_lookups(
            m in arb_mem(), a4 in arb_v4(), a6 in arb_v6(), port in arb_port(),
            l4 in arb_l4(), ns in any::<bool>(),
        ) {
            // Packets: one lookup in the kernel's maps (`x`, expanded) serves what the
            // old two lookups served over the rules alone (`m`), but the unspecified
            // destination (never a host address, nor a real packet's): it hits the
            // wildcard's own key once expansions mark the port.
            let mut x = m.clone();
            x.expand();
            if a4 != [0; 4] {
                prop_assert_eq!(
                    slot4(lookup(&x, Caller::Packet, a4, port, l4)),
                    old_ingress_v4(&m, a4, port, l4)
                );
            }
            if a6 != [0; 16] {
                prop_assert_eq!(
                    slot6(lookup(&x, Caller::Packet, a6, port, l4)),
                    old_ingress_v6(&m, a6, port, l4)
                );
            }
            let m = x;
            let sock = Caller::Socket { host_netns: ns };
            prop_assert_eq!(lookup(&m, sock, a4, port, l4).ok(), old_local(&m, a4, port, l4, ns));
            prop_assert_eq!(lookup(&m, sock, a6, port, l4).ok(), old_local6(&m, a6, port, l4, ns));
            let bind = Caller::Bind { host_netns: ns };
            prop_assert_eq!(lookup(&m, bind, a4, port, l4).is_ok(), old_bind4_refused(&m, a4, port, l4, ns));
            prop_assert_eq!(lookup(&m, bind, a6, port, l4).is_ok(), old_bind6_refused(&m, a6, port, l4, ns));
        }
    }
}
