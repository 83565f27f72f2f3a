//! Addresses in the rule model: the host addresses a rule publishes on ([`Host`]), a
//! backend's addresses ([`Addrs`]), how both are written and parsed, and which
//! addresses each may be (a backend is a routable unicast address; a host address is
//! not broadcast or multicast; an IPv4 host address needs an IPv4 backend).

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use super::RuleError;

/// The host addresses a rule publishes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Host {
    /// No address written: every address of both families (Docker's `-p 9000:80`, which
    /// binds `0.0.0.0` and `[::]`). Shown as `*`.
    Any,
    /// One address, or one family's wildcard (`0.0.0.0`, `[::]`).
    Ip(IpAddr),
}

impl Host {
    /// Whether IPv4 clients are served.
    pub fn serves_v4(&self) -> bool {
        matches!(self, Host::Any | Host::Ip(IpAddr::V4(_)))
    }
    /// Whether IPv6 clients are served.
    pub fn serves_v6(&self) -> bool {
        matches!(self, Host::Any | Host::Ip(IpAddr::V6(_)))
    }
    /// `*`, `0.0.0.0` or `[::]`: every address (of a family).
    pub fn is_wildcard(&self) -> bool {
        match self {
            Host::Any => true,
            Host::Ip(ip) => ip.is_unspecified(),
        }
    }
    /// The address, if one was given.
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            Host::Any => None,
            Host::Ip(ip) => Some(*ip),
        }
    }
    /// Whether both can receive the same connection (Docker's rule: the same address,
    /// or a wildcard of the other's family, or `*`).
    pub fn overlaps(&self, other: &Host) -> bool {
        match (self, other) {
            (Host::Any, _) | (_, Host::Any) => true,
            (Host::Ip(a), Host::Ip(b)) => {
                a == b || (a.is_ipv4() == b.is_ipv4() && (a.is_unspecified() || b.is_unspecified()))
            }
        }
    }
    /// The addresses a local listener would have to hold to take this host's port: `*`
    /// covers both wildcards.
    pub fn bind_addrs(&self) -> Vec<IpAddr> {
        match self {
            Host::Any => vec![Ipv4Addr::UNSPECIFIED.into(), Ipv6Addr::UNSPECIFIED.into()],
            Host::Ip(ip) => vec![*ip],
        }
    }
    /// As Docker's "Bind for ... failed" message writes it: `*` is `0.0.0.0` there.
    fn docker_text(&self) -> String {
        match self {
            Host::Any => Ipv4Addr::UNSPECIFIED.to_string(),
            Host::Ip(ip) => ip_text(*ip),
        }
    }
}

/// `*`, `198.51.100.7`, `[::1]`.
impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Any => f.write_str("*"),
            Host::Ip(ip) => f.write_str(&ip_text(*ip)),
        }
    }
}

impl FromStr for Host {
    type Err = RuleError;
    /// `*`, or an address (IPv6 bare or in brackets).
    fn from_str(s: &str) -> Result<Self, RuleError> {
        parse_host_text(s)
    }
}

impl From<IpAddr> for Host {
    fn from(ip: IpAddr) -> Self {
        Host::Ip(ip)
    }
}

/// A backend's addresses: one per family, at least one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Addrs {
    v4: Option<Ipv4Addr>,
    v6: Option<Ipv6Addr>,
}

impl Addrs {
    /// One address.
    pub fn new(ip: IpAddr) -> Result<Self, RuleError> {
        if let Some(why) = not_a_backend(ip) {
            return Err(RuleError::BackendNotUnicast { addr: ip, why });
        }
        Ok(match ip {
            IpAddr::V4(v4) => Self {
                v4: Some(v4),
                v6: None,
            },
            IpAddr::V6(v6) => Self {
                v4: None,
                v6: Some(v6),
            },
        })
    }
    /// One or two addresses (`to = ["172.17.0.2", "2001:db8::2"]`): at most one per
    /// family.
    pub fn from_list(ips: &[IpAddr]) -> Result<Self, RuleError> {
        let (first, rest) = ips
            .split_first()
            .ok_or(RuleError::Empty { what: "backend" })?;
        let mut addrs = Self::new(*first)?;
        for ip in rest {
            addrs = addrs.with(*ip)?;
        }
        Ok(addrs)
    }
    /// These addresses and `ip`, which must be of the family they lack.
    pub fn with(self, ip: IpAddr) -> Result<Self, RuleError> {
        let more = Self::new(ip)?;
        match (ip, self.v4, self.v6) {
            (IpAddr::V4(_), None, _) | (IpAddr::V6(_), _, None) => Ok(Self {
                v4: self.v4.or(more.v4),
                v6: self.v6.or(more.v6),
            }),
            _ => Err(RuleError::BackendFamilies {
                addrs: self,
                more: ip,
            }),
        }
    }
    /// The IPv4 address, if any.
    pub fn v4(&self) -> Option<Ipv4Addr> {
        self.v4
    }
    /// The IPv6 address, if any.
    pub fn v6(&self) -> Option<Ipv6Addr> {
        self.v6
    }
    /// The addresses, IPv4 first.
    pub fn ips(&self) -> impl Iterator<Item = IpAddr> {
        let v4 = self.v4.map(IpAddr::V4);
        let v6 = self.v6.map(IpAddr::V6);
        v4.into_iter().chain(v6)
    }
    /// The first address (IPv4 if there is one).
    pub fn first(&self) -> IpAddr {
        self.ips()
            .next()
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }
    /// Where IPv6 clients go: the IPv6 address, or the IPv4 one as `::ffff:a.b.c.d`
    /// (reached by local clients only, see the module docs).
    pub fn for_v6_clients(&self) -> Ipv6Addr {
        self.v6
            .or_else(|| self.v4.map(|v4| v4.to_ipv6_mapped()))
            .unwrap_or(Ipv6Addr::UNSPECIFIED)
    }
}

/// `172.17.0.2`, `[2001:db8::2]`, `172.17.0.2,[2001:db8::2]`.
impl fmt::Display for Addrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text: Vec<String> = self.ips().map(ip_text).collect();
        f.write_str(&text.join(","))
    }
}

/// `0.0.0.0:9000`, `[::1]:9000`, as Docker's "Bind for ... failed" writes it (`*` is
/// `0.0.0.0` there).
pub fn addr_port(host: Host, port: u16) -> String {
    format!("{}:{port}", host.docker_text())
}

/// An address as it precedes `:PORT`: IPv6 in brackets.
pub fn ip_text(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// A host address as written before a port: `*` (both families), dotted IPv4 or
/// bracketed IPv6.
pub(super) fn parse_host(s: &str) -> Result<Host, RuleError> {
    if s == "*" {
        return Ok(Host::Any);
    }
    parse_addr(s).map(Host::Ip)
}

/// An address as written before a port: dotted IPv4 or bracketed IPv6.
pub(super) fn parse_addr(s: &str) -> Result<IpAddr, RuleError> {
    let bad = || RuleError::BadAddress {
        addr: s.to_string(),
    };
    if let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return inner.parse::<Ipv6Addr>().map(IpAddr::V6).map_err(|_| bad());
    }
    if s.parse::<Ipv6Addr>().is_ok() {
        return Err(RuleError::Ipv6NeedsBrackets {
            spec: s.to_string(),
        });
    }
    s.parse::<Ipv4Addr>().map(IpAddr::V4).map_err(|_| bad())
}

/// A host in the control protocol or a file's `host_ip`: `*`, or an address as
/// [`parse_ip`] takes it.
pub fn parse_host_text(s: &str) -> Result<Host, RuleError> {
    if s == "*" {
        return Ok(Host::Any);
    }
    parse_ip(s).map(Host::Ip)
}

/// An address in the control protocol or a file's `to`/`host_ip`: IPv4, IPv6 bare or in
/// brackets.
pub fn parse_ip(s: &str) -> Result<IpAddr, RuleError> {
    if let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return inner
            .parse::<Ipv6Addr>()
            .map(IpAddr::V6)
            .map_err(|_| RuleError::BadAddress {
                addr: s.to_string(),
            });
    }
    s.parse().map_err(|_| RuleError::BadAddress {
        addr: s.to_string(),
    })
}

pub(super) fn check_host(host: Host) -> Result<(), RuleError> {
    match host
        .ip()
        .and_then(|ip| not_a_host_address(ip).map(|why| (ip, why)))
    {
        Some((addr, why)) => Err(RuleError::HostNotUnicast { addr, why }),
        None => Ok(()),
    }
}

/// An IPv4 host address needs an IPv4 backend address (nothing translates IPv4 clients
/// to IPv6); IPv6 clients reach an IPv4-only backend at the socket.
pub(super) fn check_families(host: Host, backend: Addrs) -> Result<(), RuleError> {
    match host {
        Host::Ip(ip @ IpAddr::V4(_)) if backend.v4.is_none() => {
            Err(RuleError::FamilyMismatch { host: ip, backend })
        }
        _ => Ok(()),
    }
}

/// Why `ip` cannot be a backend, if it cannot.
fn not_a_backend(ip: IpAddr) -> Option<&'static str> {
    if ip.is_unspecified() {
        Some("it is the unspecified address")
    } else if matches!(ip, IpAddr::V4(v4) if v4.is_broadcast()) {
        Some("it is the broadcast address")
    } else if ip.is_multicast() {
        Some("it is a multicast address")
    } else if ip.is_loopback() {
        Some("loopback addresses are not routed to from outside the host")
    } else {
        None
    }
}

/// Why `ip` cannot be a published host address, if it cannot (0.0.0.0 is the wildcard).
fn not_a_host_address(ip: IpAddr) -> Option<&'static str> {
    if matches!(ip, IpAddr::V4(v4) if v4.is_broadcast()) {
        Some("it is the broadcast address")
    } else if ip.is_multicast() {
        Some("it is a multicast address")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn addrs(s: &str) -> Addrs {
        Addrs::new(ip(s)).expect("backend address")
    }

    #[test]
    fn backend_addresses_one_per_family() {
        let dual = Addrs::from_list(&[ip("172.17.0.2"), ip("2001:db8::2")]).expect("dual");
        assert_eq!(dual.to_string(), "172.17.0.2,[2001:db8::2]");
        assert_eq!(
            dual.for_v6_clients(),
            "2001:db8::2".parse::<Ipv6Addr>().expect("ip")
        );
        let v4 = addrs("172.17.0.2");
        assert_eq!(
            v4.for_v6_clients(),
            "::ffff:172.17.0.2".parse::<Ipv6Addr>().expect("ip")
        );
        for (base, more) in [
            (dual, "2001:db8::3"),
            (dual, "172.17.0.3"),
            (v4, "172.17.0.3"),
            (addrs("2001:db8::2"), "2001:db8::3"),
        ] {
            assert_eq!(
                base.with(ip(more)),
                Err(RuleError::BackendFamilies {
                    addrs: base,
                    more: ip(more)
                }),
                "{base} + {more}"
            );
        }
        assert_eq!(
            Addrs::from_list(&[]),
            Err(RuleError::Empty { what: "backend" })
        );
    }
}
