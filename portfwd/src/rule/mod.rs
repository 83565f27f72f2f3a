//! The rule model: what an operator publishes, how it is written (Docker's `-p` grammar),
//! and what makes it valid.
//!
//! Grammar (the command line and the declarations file accept the same strings):
//!
//! ```text
//! mapping := [HOST_IP ":"] [HOST_PORTS ":"] CONTAINER_PORTS ["/" PROTO]   (Docker's -p, the file's `ports`)
//! spec    := [HOST_IP ":"] [HOST_PORTS] ["/" PROTO]                       (portfwd-ctl add SPEC)
//! backend := BACKEND_IP ":" PORTS ["," BACKEND_IP ":" PORTS]             (portfwd-ctl add ... BACKEND; one IPv4 and one IPv6 address)
//! PORTS   := PORT | PORT "-" PORT                                        (inclusive, 1..=65535)
//! HOST_IP := dotted IPv4 | "[" IPv6 "]" | "*"                            (default `*`: every address, both families)
//! PROTO   := tcp | udp                                                   (case-insensitive, default tcp)
//! ```
//!
//! How host and backend ports pair (Docker's rules): ranges of the same length map one to
//! one (`9000-9009` to `8000-8009`); a host range with a single backend port means "the
//! first free port of the range"; an empty or zero host port means "any free port" (of the
//! host's ephemeral range, chosen by the daemon). Docker also knows `sctp`, which portfwd
//! refuses with its own error; neither Docker nor Compose has a `tcp+udp` shorthand (one
//! mapping per protocol), so there is none here either.
//!
//! Families (Docker's, since 20.10): no host address publishes on every address of both
//! families (`*`, as `ss` writes a dual-stack listener); `0.0.0.0` narrows a rule to
//! IPv4, `[::]` to IPv6. A backend has an IPv4 address, an IPv6 address, or both (a
//! dual-stack container); each family's clients go to the backend address of their
//! family. IPv6 clients of a backend with no IPv6 address are served at the socket
//! (local clients connect to it as `::ffff:a.b.c.d`); IPv4 clients of an IPv6-only
//! backend are not served (an IPv4 host address with one is refused).
//!
//! Invariants: a [`Publish`], [`Backend`], [`Declaration`] or [`Rule`] value is always
//! valid. They are only built by the parsers here or by the constructors, which validate;
//! the control protocol deserializes through the same checks, so the daemon never trusts
//! a client. Addresses are [`IpAddr`]: IPv6 parses into the same model, and only the
//! kernel boundary (`RULES_V4` keys) is family-specific.
//!
//! Addresses (a rule's [`Host`], a backend's [`Addrs`]), how they are written and which
//! ones are allowed live in `addr`; ports, protocols and the rules themselves here.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr},
    str::FromStr,
};

use portfwd_common::proto;
use serde::{Deserialize, Serialize};
use thiserror::Error;

mod addr;

pub use addr::{addr_port, ip_text, parse_host_text, parse_ip, Addrs, Host};
use addr::{check_families, check_host, parse_addr, parse_host};

/// Why a publish spec, a port mapping or a backend was rejected. Every message is one
/// line and names the offending part as the user wrote it.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum RuleError {
    /// Nothing where something is needed.
    #[error("empty {what}")]
    Empty {
        /// What is missing.
        what: &'static str,
    },
    /// A port that is not a number.
    #[error("invalid port `{port}`: not a number")]
    PortNotNumber {
        /// The port as written.
        port: String,
    },
    /// A port outside 1..=65535.
    #[error("invalid port `{port}`: must be between 1 and 65535")]
    PortOutOfRange {
        /// The port as written.
        port: String,
    },
    /// A range that holds port 0.
    #[error("invalid port range `{range}`: port 0 cannot be part of a range")]
    PortZeroInRange {
        /// The range as written.
        range: String,
    },
    /// A range whose end comes before its start.
    #[error("invalid port range `{range}`: it ends before it starts")]
    RangeReversed {
        /// The range as written.
        range: String,
    },
    /// A range that goes past 65535.
    #[error("invalid port range `{range}`: it goes past 65535")]
    RangeCrosses65535 {
        /// The range as written.
        range: String,
    },
    /// Host and backend ranges of different lengths.
    #[error(
        "port ranges `{host}` ({host_len} ports) and `{backend}` ({backend_len} ports) differ in length"
    )]
    RangeLengths {
        /// The host range as written.
        host: String,
        /// Its length.
        host_len: u32,
        /// The backend range as written.
        backend: String,
        /// Its length.
        backend_len: u32,
    },
    /// An address that does not parse.
    #[error("invalid IP address `{addr}`")]
    BadAddress {
        /// The address as written.
        addr: String,
    },
    /// A bare IPv6 address before a port.
    #[error("IPv6 address in `{spec}` must be in brackets, e.g. [2001:db8::1]:9000")]
    Ipv6NeedsBrackets {
        /// The spec as written.
        spec: String,
    },
    /// A protocol that is not `tcp` or `udp`.
    #[error("unknown protocol `{proto}`: expected tcp or udp")]
    UnknownProtocol {
        /// The protocol as written.
        proto: String,
    },
    /// A protocol Docker knows but portfwd does not forward (`sctp`).
    #[error("protocol `{proto}` is not supported: portfwd forwards tcp and udp")]
    ProtocolNotSupported {
        /// The protocol as written.
        proto: String,
    },
    /// A port mapping outside Docker's grammar.
    #[error(
        "invalid port mapping `{spec}`: expected [HOST_IP:][HOST_PORT[-END]:]CONTAINER_PORT[-END][/PROTO]"
    )]
    MappingFormat {
        /// The mapping as written.
        spec: String,
    },
    /// A backend outside the grammar.
    #[error("invalid backend `{spec}`: expected BACKEND_IP:BACKEND_PORT[-END]")]
    BackendFormat {
        /// The backend as written.
        spec: String,
    },
    /// A protocol written on the backend.
    #[error(
        "invalid backend `{spec}`: a protocol belongs on the published port (e.g. 5353/udp), not on the backend"
    )]
    BackendProtocol {
        /// The backend as written.
        spec: String,
    },
    /// An address that cannot be a backend.
    #[error("{addr} cannot be a backend: {why}")]
    BackendNotUnicast {
        /// The address.
        addr: IpAddr,
        /// Why.
        why: &'static str,
    },
    /// An address that cannot be a host address.
    #[error("{addr} cannot be a host address: {why}")]
    HostNotUnicast {
        /// The address.
        addr: IpAddr,
        /// Why.
        why: &'static str,
    },
    /// An IPv4 host address with a backend that has no IPv4 address.
    #[error(
        "host address {host} is IPv4 but backend {backend} has no IPv4 address: IPv4 clients cannot reach it"
    )]
    FamilyMismatch {
        /// The host address.
        host: IpAddr,
        /// The backend's addresses.
        backend: Addrs,
    },
    /// A backend address of a family the backend already has.
    #[error(
        "backend {addrs} cannot also have {more}: a backend has at most one IPv4 and one IPv6 address"
    )]
    BackendFamilies {
        /// The backend's addresses.
        addrs: Addrs,
        /// The address added.
        more: IpAddr,
    },
    /// A backend's two addresses written with different ports.
    #[error(
        "backends `{first}` and `{second}` take different ports: both addresses of a backend take the same ports"
    )]
    BackendPorts {
        /// The first as written.
        first: String,
        /// The second as written.
        second: String,
    },
}

/// A transport protocol portfwd translates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// The IANA protocol number, as the maps store it.
    pub const fn number(self) -> u8 {
        match self {
            Proto::Tcp => proto::TCP,
            Proto::Udp => proto::UDP,
        }
    }

    /// `tcp` or `udp`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Proto {
    type Err = RuleError;
    fn from_str(s: &str) -> Result<Self, RuleError> {
        if s.eq_ignore_ascii_case("tcp") {
            Ok(Proto::Tcp)
        } else if s.eq_ignore_ascii_case("udp") {
            Ok(Proto::Udp)
        } else if s.eq_ignore_ascii_case("sctp") {
            Err(RuleError::ProtocolNotSupported {
                proto: s.to_string(),
            })
        } else {
            Err(RuleError::UnknownProtocol {
                proto: s.to_string(),
            })
        }
    }
}

/// An inclusive, non-empty range of ports in `1..=65535`; a single port is a range of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    start: u16,
    end: u16,
}

impl PortRange {
    /// Linux's default ephemeral ports (`net.ipv4.ip_local_port_range`).
    pub const LINUX_EPHEMERAL: PortRange = PortRange {
        start: 32768,
        end: 60999,
    };

    /// Validates and builds; `shown` is how the user wrote it, for the message.
    pub fn new(start: u16, end: u16) -> Result<Self, RuleError> {
        let shown = || format!("{start}-{end}");
        if start == end {
            return Self::single(start);
        }
        if start == 0 || end == 0 {
            return Err(RuleError::PortZeroInRange { range: shown() });
        }
        if end < start {
            return Err(RuleError::RangeReversed { range: shown() });
        }
        Ok(Self { start, end })
    }
    /// One port (0 is refused).
    pub fn single(port: u16) -> Result<Self, RuleError> {
        check_port(port, || port.to_string())?;
        Ok(Self {
            start: port,
            end: port,
        })
    }
    /// `len` ports from `start`, if they stay within 65535.
    pub fn from_len(start: u16, len: u32) -> Option<Self> {
        let end = u32::from(start).checked_add(len.checked_sub(1)?)?;
        let end = u16::try_from(end).ok()?;
        Self::new(start, end).ok()
    }
    /// The first port.
    pub fn start(&self) -> u16 {
        self.start
    }
    /// The last port.
    pub fn end(&self) -> u16 {
        self.end
    }
    /// Number of ports (1..=65535).
    pub fn len(&self) -> u32 {
        u32::from(self.end) - u32::from(self.start) + 1
    }
    /// Never: a range holds at least one port (here for clippy's `len_without_is_empty`).
    pub fn is_empty(&self) -> bool {
        false
    }
    /// Whether it is one port.
    pub fn is_single(&self) -> bool {
        self.start == self.end
    }
    /// Whether `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }
    /// The ports, in order.
    pub fn ports(&self) -> std::ops::RangeInclusive<u16> {
        self.start..=self.end
    }
    /// The first port both ranges hold, if any.
    pub fn first_common(&self, other: &PortRange) -> Option<u16> {
        let lo = self.start.max(other.start);
        (lo <= self.end.min(other.end)).then_some(lo)
    }
}

/// `9000` or `9000-9009`.
impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_single() {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

impl FromStr for PortRange {
    type Err = RuleError;
    /// `PORT` or `START-END`.
    fn from_str(s: &str) -> Result<Self, RuleError> {
        match s.split_once('-') {
            None => {
                let n = parse_number(s)?;
                let port = u16::try_from(n).map_err(|_| RuleError::PortOutOfRange {
                    port: s.to_string(),
                })?;
                check_port(port, || s.to_string())?;
                Self::single(port)
            }
            Some((a, b)) => {
                if !is_digits(a) || !is_digits(b) {
                    return Err(RuleError::PortNotNumber {
                        port: s.to_string(),
                    });
                }
                let (na, nb) = (parse_number(a)?, parse_number(b)?);
                let range = || s.to_string();
                if na == 0 || nb == 0 {
                    return Err(RuleError::PortZeroInRange { range: range() });
                }
                let start = u16::try_from(na).map_err(|_| RuleError::PortOutOfRange {
                    port: a.to_string(),
                })?;
                let Ok(end) = u16::try_from(nb) else {
                    return Err(RuleError::RangeCrosses65535 { range: range() });
                };
                if end < start {
                    return Err(RuleError::RangeReversed { range: range() });
                }
                Ok(Self { start, end })
            }
        }
    }
}

/// Digits only (no sign, no spaces); the value, saturated at `u64::MAX` (out of range
/// either way).
fn parse_number(s: &str) -> Result<u64, RuleError> {
    if !is_digits(s) {
        return Err(RuleError::PortNotNumber {
            port: s.to_string(),
        });
    }
    Ok(s.parse::<u64>().unwrap_or(u64::MAX))
}

/// What is published: host addresses (see [`Host`]), ports and a protocol. This is the rule's identity (the key of the daemon's table); each port is
/// one key of [`portfwd_common::RULES_V4`]. Ordered by first port, then protocol, then
/// address (the field order), so that a table lists a port's rules together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Publish {
    ports: PortRange,
    proto: Proto,
    host: Host,
}

impl Publish {
    /// Validates and builds.
    pub fn new(host: impl Into<Host>, ports: PortRange, proto: Proto) -> Result<Self, RuleError> {
        let host = host.into();
        check_host(host)?;
        Ok(Self { ports, proto, host })
    }
    /// One port.
    pub fn single(host: impl Into<Host>, port: u16, proto: Proto) -> Result<Self, RuleError> {
        Self::new(host, PortRange::single(port)?, proto)
    }
    /// The host addresses.
    pub fn host(&self) -> Host {
        self.host
    }
    /// The first (for a single port, the only) host port.
    pub fn host_port(&self) -> u16 {
        self.ports.start
    }
    /// The ports.
    pub fn ports(&self) -> PortRange {
        self.ports
    }
    /// The protocol.
    pub fn proto(&self) -> Proto {
        self.proto
    }
    /// True for `*`, `0.0.0.0` and `[::]`: every address (of a family).
    pub fn is_wildcard(&self) -> bool {
        self.host.is_wildcard()
    }
    /// `0.0.0.0:9000`, as Docker's messages write it (the first port of a range).
    pub fn addr_port(&self) -> String {
        addr_port(self.host, self.ports.start)
    }
    /// Whether `self` and `other` cannot both be published (Docker's rule: same protocol,
    /// a common port, and overlapping addresses, see [`Host::overlaps`]); the first
    /// common port if so.
    pub fn conflict(&self, other: &Publish) -> Option<u16> {
        if self.proto != other.proto || !self.host.overlaps(&other.host) {
            return None;
        }
        self.ports.first_common(&other.ports)
    }
}

/// `*:9000-9009/tcp`, `0.0.0.0:9000/tcp`, `[::1]:9000/udp`.
impl fmt::Display for Publish {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.host, self.ports, self.proto)
    }
}

impl FromStr for Publish {
    type Err = RuleError;

    /// `[HOST_IP:]HOST_PORT[-END][/PROTO]` (a published rule, as `del` names it).
    fn from_str(spec: &str) -> Result<Self, RuleError> {
        let s: PublishSpec = spec.parse()?;
        match s.ports {
            Some(ports) => Publish::new(s.host, ports, s.proto),
            None if spec.is_empty() => Err(RuleError::Empty {
                what: "published port",
            }),
            None => Err(RuleError::PortOutOfRange {
                port: split_proto(spec)
                    .and_then(|(rest, _)| split_addr(rest))
                    .map(|(_, p)| p.to_string())
                    .unwrap_or_default(),
            }),
        }
    }
}

/// What `portfwd-ctl add` asks to publish: like [`Publish`], but the host ports may be
/// left to the daemon (`None`: any free port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PublishSpec {
    /// The host addresses.
    pub host: Host,
    /// The host ports; `None`: any free port.
    pub ports: Option<PortRange>,
    /// The protocol.
    pub proto: Proto,
}

impl FromStr for PublishSpec {
    type Err = RuleError;

    /// `[HOST_IP:][HOST_PORT[-END]][/PROTO]`; an empty or zero port is "any free port".
    fn from_str(spec: &str) -> Result<Self, RuleError> {
        let (rest, proto) = split_proto(spec)?;
        let (addr, port) = split_addr(rest)?;
        let host = match addr {
            Some(a) => parse_host(a)?,
            None => Host::Any,
        };
        check_host(host)?;
        Ok(Self {
            host,
            ports: parse_host_ports(port)?,
            proto,
        })
    }
}

/// Where a published port goes: its addresses (see [`Addrs`]) and as many ports as are
/// published, the same ports on each address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    addrs: Addrs,
    ports: PortRange,
}

impl Backend {
    /// Validates and builds (one address).
    pub fn new(ip: IpAddr, ports: PortRange) -> Result<Self, RuleError> {
        Ok(Self::with_addrs(Addrs::new(ip)?, ports))
    }
    /// Addresses already validated.
    pub fn with_addrs(addrs: Addrs, ports: PortRange) -> Self {
        Self { addrs, ports }
    }
    /// One address, one port.
    pub fn single(ip: IpAddr, port: u16) -> Result<Self, RuleError> {
        Self::new(ip, PortRange::single(port)?)
    }
    /// Both backends' addresses (one per family), which must take the same ports.
    pub fn merge(self, other: Backend) -> Result<Self, RuleError> {
        if self.ports != other.ports {
            return Err(RuleError::BackendPorts {
                first: self.to_string(),
                second: other.to_string(),
            });
        }
        let mut addrs = self.addrs;
        for ip in other.addrs.ips() {
            addrs = addrs.with(ip)?;
        }
        Ok(Self::with_addrs(addrs, self.ports))
    }
    /// The addresses.
    pub fn addrs(&self) -> Addrs {
        self.addrs
    }
    /// The first (for a single port, the only) backend port.
    pub fn port(&self) -> u16 {
        self.ports.start
    }
    /// The ports.
    pub fn ports(&self) -> PortRange {
        self.ports
    }
}

/// `172.17.0.2:8080`, `172.17.0.2:8000-8009`, `[2001:db8::2]:8080`,
/// `172.17.0.2:8080,[2001:db8::2]:8080`.
impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text: Vec<String> = self
            .addrs
            .ips()
            .map(|ip| addr_port_text(ip, self.ports))
            .collect();
        f.write_str(&text.join(","))
    }
}

impl FromStr for Backend {
    type Err = RuleError;

    /// `BACKEND_IP:BACKEND_PORT[-END]`, or two of them (one per family) joined by `,`.
    fn from_str(spec: &str) -> Result<Self, RuleError> {
        if let Some((a, b)) = spec.split_once(',') {
            return a.parse::<Backend>()?.merge(b.parse()?);
        }
        if spec.is_empty() {
            return Err(RuleError::Empty { what: "backend" });
        }
        if spec.contains('/') {
            return Err(RuleError::BackendProtocol {
                spec: spec.to_string(),
            });
        }
        let (addr, port) = split_addr(spec)?;
        let (Some(addr), false) = (addr, port.is_empty()) else {
            return Err(RuleError::BackendFormat {
                spec: spec.to_string(),
            });
        };
        let ip = parse_addr(addr)?;
        Self::new(ip, port.parse()?)
    }
}

/// How a declaration's host ports are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HostPorts {
    /// Exactly these, one to one with the backend's ports.
    Exact(PortRange),
    /// The first free port of the range, to a single backend port (Docker's
    /// `8000-8010:80`).
    FirstFree(PortRange),
    /// Any free port(s) of the host's ephemeral range: as many consecutive ports as the
    /// backend has.
    Any,
}

/// A publish request as written: host address, host ports (maybe left open), protocol
/// and backend, paired by Docker's rules. The daemon resolves it into a [`Rule`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Declaration {
    host: Host,
    host_ports: HostPorts,
    proto: Proto,
    backend: Backend,
}

impl Declaration {
    /// Pairs a spec with a backend: equal ranges one to one, a host range to one backend
    /// port as "first free", no host port as "any free port"; an IPv4 host address needs
    /// a backend with an IPv4 address.
    pub fn new(spec: PublishSpec, backend: Backend) -> Result<Self, RuleError> {
        let host_ports = match spec.ports {
            None => HostPorts::Any,
            Some(h) if h.len() == backend.ports.len() => HostPorts::Exact(h),
            Some(h) if backend.ports.is_single() => HostPorts::FirstFree(h),
            Some(h) => {
                return Err(RuleError::RangeLengths {
                    host: h.to_string(),
                    host_len: h.len(),
                    backend: backend.ports.to_string(),
                    backend_len: backend.ports.len(),
                })
            }
        };
        check_host(spec.host)?;
        check_families(spec.host, backend.addrs)?;
        Ok(Self {
            host: spec.host,
            host_ports,
            proto: spec.proto,
            backend,
        })
    }
    /// `portfwd-ctl add SPEC BACKEND`.
    pub fn parse(spec: &str, backend: &str) -> Result<Self, RuleError> {
        Self::new(spec.parse()?, backend.parse()?)
    }
    /// A Docker/Compose short-syntax mapping
    /// `[HOST_IP:][HOST_PORT[-END]:]CONTAINER_PORT[-END][/PROTO]` to the container at `to`.
    pub fn from_mapping(mapping: &str, to: Addrs) -> Result<Self, RuleError> {
        let (rest, proto) = split_proto(mapping)?;
        let format_err = || RuleError::MappingFormat {
            spec: mapping.to_string(),
        };
        // The container ports follow the last colon that is not inside brackets.
        let bracket_end = rest.rfind(']').map_or(0, |i| i + 1);
        let (host, container) = match rest[bracket_end..].rfind(':') {
            Some(i) => (Some(&rest[..bracket_end + i]), &rest[bracket_end + i + 1..]),
            None if bracket_end > 0 => return Err(format_err()),
            None => (None, rest),
        };
        if container.is_empty() {
            return Err(format_err());
        }
        let backend = Backend::with_addrs(to, container.parse()?);
        let spec = match host {
            None => PublishSpec {
                host: Host::Any,
                ports: None,
                proto,
            },
            // `HOST_IP:HOST_PORT`, `HOST_IP:` or `[V6]:...`; or a bare `HOST_PORT`.
            Some(h) if h.contains(':') || h.starts_with('[') => {
                let (addr, port) = split_addr(h)?;
                let host = match addr {
                    Some(a) => parse_host(a)?,
                    None => return Err(format_err()),
                };
                PublishSpec {
                    host,
                    ports: parse_host_ports(port)?,
                    proto,
                }
            }
            Some(port) => PublishSpec {
                host: Host::Any,
                ports: parse_host_ports(port)?,
                proto,
            },
        };
        Self::new(spec, backend)
    }
    /// The host addresses.
    pub fn host(&self) -> Host {
        self.host
    }
    /// How the host ports are chosen.
    pub fn host_ports(&self) -> HostPorts {
        self.host_ports
    }
    /// The protocol.
    pub fn proto(&self) -> Proto {
        self.proto
    }
    /// The backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }
    /// Whether the published rule `rule` is one this declaration could have produced
    /// (same address, protocol and backend, host ports as allowed).
    pub fn satisfied_by(&self, rule: &Rule) -> bool {
        let p = &rule.publish;
        p.host == self.host
            && p.proto == self.proto
            && rule.backend == self.backend
            && match self.host_ports {
                HostPorts::Exact(r) => p.ports == r,
                HostPorts::FirstFree(r) => p.ports.is_single() && r.contains(p.ports.start),
                HostPorts::Any => true,
            }
    }
    /// The declaration's wire form (what `add` sends).
    pub fn spec(&self) -> PublishSpec {
        PublishSpec {
            host: self.host,
            ports: match self.host_ports {
                HostPorts::Exact(r) | HostPorts::FirstFree(r) => Some(r),
                HostPorts::Any => None,
            },
            proto: self.proto,
        }
    }
    /// Whether it publishes for IPv6 clients.
    pub fn needs_ipv6(&self) -> bool {
        self.host.serves_v6()
    }
}

/// `*:9000-9009/tcp -> 172.17.0.2:8000-8009`; open host ports show as `*:(any)` or
/// `*:(first free of 8000-8010)`.
impl fmt::Display for Declaration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = match self.host_ports {
            HostPorts::Exact(r) => format!("{}:{r}", self.host),
            HostPorts::FirstFree(r) => format!("{}:(first free of {r})", self.host),
            HostPorts::Any => format!("{}:(any)", self.host),
        };
        write!(f, "{host}/{} -> {}", self.proto, self.backend)
    }
}

/// One published rule: ports and their backend, of the same length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    /// What is published.
    pub publish: Publish,
    /// Where it goes.
    pub backend: Backend,
}

impl Rule {
    /// Validates that both ends have as many ports, and families as for a
    /// [`Declaration`].
    pub fn new(publish: Publish, backend: Backend) -> Result<Self, RuleError> {
        check_families(publish.host, backend.addrs)?;
        if publish.ports.len() != backend.ports.len() {
            return Err(RuleError::RangeLengths {
                host: publish.ports.to_string(),
                host_len: publish.ports.len(),
                backend: backend.ports.to_string(),
                backend_len: backend.ports.len(),
            });
        }
        Ok(Self { publish, backend })
    }
    /// (host port, backend port) pairs, one per published port.
    pub fn port_pairs(&self) -> impl Iterator<Item = (u16, u16)> + '_ {
        self.publish.ports.ports().zip(self.backend.ports.ports())
    }
}

/// `0.0.0.0:9000/tcp -> 172.17.0.2:8080`.
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.publish, self.backend)
    }
}

fn addr_port_text(ip: IpAddr, ports: PortRange) -> String {
    format!("{}:{ports}", ip_text(ip))
}

/// Splits off `/PROTO` (default tcp): nothing before it may contain a `/`.
fn split_proto(spec: &str) -> Result<(&str, Proto), RuleError> {
    match spec.rsplit_once('/') {
        Some((rest, p)) => Ok((rest, p.parse()?)),
        None => Ok((spec, Proto::Tcp)),
    }
}

/// Splits `[ADDR:]PORT` into its address (brackets kept) and port parts. IPv6 must be
/// bracketed (as Docker requires): a bare one is refused rather than split at a guess.
fn split_addr(s: &str) -> Result<(Option<&str>, &str), RuleError> {
    if s.starts_with('[') {
        let Some(close) = s.find(']') else {
            return Err(RuleError::BadAddress {
                addr: s.to_string(),
            });
        };
        let (addr, rest) = s.split_at(close + 1);
        return match rest.strip_prefix(':') {
            Some(port) => Ok((Some(addr), port)),
            None if rest.is_empty() => Ok((Some(addr), "")),
            None => Err(RuleError::BadAddress {
                addr: s.to_string(),
            }),
        };
    }
    match s.split_once(':') {
        // `ADDR:PORT` where PORT holds another colon (Docker's `ip::port`): a bad port.
        Some((addr, port)) if port.contains(':') && addr.parse::<Ipv4Addr>().is_ok() => {
            Ok((Some(addr), port))
        }
        // Any other second colon: a bare IPv6 address.
        Some((_, port)) if port.contains(':') => Err(RuleError::Ipv6NeedsBrackets {
            spec: s.to_string(),
        }),
        Some((addr, port)) => Ok((Some(addr), port)),
        None => Ok((None, s)),
    }
}

/// Host ports as written: empty or zero means "any free port".
pub fn parse_host_ports(s: &str) -> Result<Option<PortRange>, RuleError> {
    if s.is_empty() || (is_digits(s) && s.bytes().all(|b| b == b'0')) {
        return Ok(None);
    }
    s.parse().map(Some)
}

/// A port received as a JSON number (the control protocol): same checks, same messages.
pub(crate) fn port_from_number(n: u64) -> Result<u16, RuleError> {
    match u16::try_from(n) {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(RuleError::PortOutOfRange {
            port: n.to_string(),
        }),
    }
}

/// A port range received as JSON numbers (`end` absent: one port).
pub(crate) fn range_from_numbers(start: u64, end: Option<u64>) -> Result<PortRange, RuleError> {
    let start = port_from_number(start)?;
    match end {
        None => PortRange::single(start),
        Some(end) => {
            let end = u16::try_from(end).map_err(|_| RuleError::RangeCrosses65535 {
                range: format!("{start}-{end}"),
            })?;
            PortRange::new(start, end)
        }
    }
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn check_port(port: u16, shown: impl FnOnce() -> String) -> Result<(), RuleError> {
    if port == 0 {
        Err(RuleError::PortOutOfRange { port: shown() })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }
    fn host(s: &str) -> Host {
        parse_host_text(s).expect("test host")
    }
    fn addrs(s: &str) -> Addrs {
        Addrs::new(ip(s)).expect("test backend address")
    }
    fn range(a: u16, b: u16) -> PortRange {
        PortRange::new(a, b).expect("test range")
    }
    const C: &str = "172.17.0.2";

    #[test]
    fn publish_accepted() {
        let table: &[(&str, &str, u16, u16, Proto)] = &[
            ("9000", "*", 9000, 9000, Proto::Tcp),
            ("1", "*", 1, 1, Proto::Tcp),
            ("65535", "*", 65535, 65535, Proto::Tcp),
            ("09000", "*", 9000, 9000, Proto::Tcp),
            ("9000/tcp", "*", 9000, 9000, Proto::Tcp),
            ("5353/udp", "*", 5353, 5353, Proto::Udp),
            ("5353/UDP", "*", 5353, 5353, Proto::Udp),
            ("5353/Tcp", "*", 5353, 5353, Proto::Tcp),
            ("198.51.100.7:9000", "198.51.100.7", 9000, 9000, Proto::Tcp),
            (
                "198.51.100.7:9000/udp",
                "198.51.100.7",
                9000,
                9000,
                Proto::Udp,
            ),
            ("0.0.0.0:9000", "0.0.0.0", 9000, 9000, Proto::Tcp),
            ("*:9000", "*", 9000, 9000, Proto::Tcp),
            ("127.0.0.1:9000", "127.0.0.1", 9000, 9000, Proto::Tcp),
            ("9000-9009", "*", 9000, 9009, Proto::Tcp),
            ("9000-9000", "*", 9000, 9000, Proto::Tcp),
            ("1-65535/udp", "*", 1, 65535, Proto::Udp),
            ("10.0.0.1:7000-7010/udp", "10.0.0.1", 7000, 7010, Proto::Udp),
            ("[::1]:9000", "::1", 9000, 9000, Proto::Tcp),
            (
                "[2001:db8::1]:9000-9001/udp",
                "2001:db8::1",
                9000,
                9001,
                Proto::Udp,
            ),
            ("[::]:9000", "::", 9000, 9000, Proto::Tcp),
        ];
        for &(spec, addr, start, end, proto) in table {
            let p: Publish = spec
                .parse()
                .unwrap_or_else(|e| panic!("{spec}: rejected: {e}"));
            assert_eq!(
                (p.host(), p.ports(), p.proto()),
                (host(addr), range(start, end), proto),
                "{spec}"
            );
        }
    }

    #[test]
    fn publish_rejected() {
        use RuleError::*;
        let s = |x: &str| x.to_string();
        let table: Vec<(&str, RuleError)> = vec![
            (
                "",
                Empty {
                    what: "published port",
                },
            ),
            ("0", PortOutOfRange { port: s("0") }),
            ("00", PortOutOfRange { port: s("00") }),
            ("1.2.3.4:", PortOutOfRange { port: s("") }),
            ("65536", PortOutOfRange { port: s("65536") }),
            (
                "99999999999999999999",
                PortOutOfRange {
                    port: s("99999999999999999999"),
                },
            ),
            ("abc", PortNotNumber { port: s("abc") }),
            ("+80", PortNotNumber { port: s("+80") }),
            (" 80", PortNotNumber { port: s(" 80") }),
            ("-1", PortNotNumber { port: s("-1") }),
            ("9000-", PortNotNumber { port: s("9000-") }),
            (
                "9000-9001-9002",
                PortNotNumber {
                    port: s("9000-9001-9002"),
                },
            ),
            ("9000/", UnknownProtocol { proto: s("") }),
            ("9000/icmp", UnknownProtocol { proto: s("icmp") }),
            ("9000/sctp", ProtocolNotSupported { proto: s("sctp") }),
            (
                "9000/tcp/udp",
                PortNotNumber {
                    port: s("9000/tcp"),
                },
            ),
            (
                "9009-9000",
                RangeReversed {
                    range: s("9009-9000"),
                },
            ),
            ("0-10", PortZeroInRange { range: s("0-10") }),
            ("10-0", PortZeroInRange { range: s("10-0") }),
            (
                "65530-65540",
                RangeCrosses65535 {
                    range: s("65530-65540"),
                },
            ),
            ("70000-70001", PortOutOfRange { port: s("70000") }),
            (
                "::1:9000",
                Ipv6NeedsBrackets {
                    spec: s("::1:9000"),
                },
            ),
            (
                "[::1:9000",
                BadAddress {
                    addr: s("[::1:9000"),
                },
            ),
            (
                "[::1]9000",
                BadAddress {
                    addr: s("[::1]9000"),
                },
            ),
            (
                "[1.2.3.4]:9000",
                BadAddress {
                    addr: s("[1.2.3.4]"),
                },
            ),
            ("1.2.3.4::80", PortNotNumber { port: s(":80") }),
            ("1.2.3:9000", BadAddress { addr: s("1.2.3") }),
            (
                "1.2.3.256:9000",
                BadAddress {
                    addr: s("1.2.3.256"),
                },
            ),
            ("host:9000", BadAddress { addr: s("host") }),
            (":9000", BadAddress { addr: s("") }),
            (
                "255.255.255.255:9000",
                HostNotUnicast {
                    addr: ip("255.255.255.255"),
                    why: "it is the broadcast address",
                },
            ),
            (
                "224.0.0.1:9000",
                HostNotUnicast {
                    addr: ip("224.0.0.1"),
                    why: "it is a multicast address",
                },
            ),
            (
                "[ff02::1]:9000",
                HostNotUnicast {
                    addr: ip("ff02::1"),
                    why: "it is a multicast address",
                },
            ),
        ];
        for (spec, want) in table {
            assert_eq!(spec.parse::<Publish>(), Err(want), "{spec:?}");
        }
    }

    #[test]
    fn add_declarations_accepted() {
        let any = HostPorts::Any;
        let ex = |a, b| HostPorts::Exact(range(a, b));
        let ff = |a, b| HostPorts::FirstFree(range(a, b));
        let table: &[(&str, &str, &str, HostPorts, Proto, &str)] = &[
            (
                "9000",
                "172.17.0.2:8080",
                "*",
                ex(9000, 9000),
                Proto::Tcp,
                "172.17.0.2:8080",
            ),
            (
                "9000-9009",
                "172.17.0.2:8000-8009",
                "*",
                ex(9000, 9009),
                Proto::Tcp,
                "172.17.0.2:8000-8009",
            ),
            (
                "9000-9009/udp",
                "172.17.0.2:53",
                "*",
                ff(9000, 9009),
                Proto::Udp,
                "172.17.0.2:53",
            ),
            ("", "172.17.0.2:80", "*", any, Proto::Tcp, "172.17.0.2:80"),
            ("0", "172.17.0.2:80", "*", any, Proto::Tcp, "172.17.0.2:80"),
            (
                "/udp",
                "172.17.0.2:53",
                "*",
                any,
                Proto::Udp,
                "172.17.0.2:53",
            ),
            (
                "127.0.0.1:",
                "172.17.0.2:80",
                "127.0.0.1",
                any,
                Proto::Tcp,
                "172.17.0.2:80",
            ),
            (
                "127.0.0.1:0/udp",
                "172.17.0.2:80-81",
                "127.0.0.1",
                any,
                Proto::Udp,
                "172.17.0.2:80-81",
            ),
            (
                "[2001:db8::1]:9000",
                "[2001:db8::2]:8080",
                "2001:db8::1",
                ex(9000, 9000),
                Proto::Tcp,
                "[2001:db8::2]:8080",
            ),
            (
                "[::1]:9000",
                "[2001:db8::2]:8080",
                "::1",
                ex(9000, 9000),
                Proto::Tcp,
                "[2001:db8::2]:8080",
            ),
            (
                "9000",
                "[2001:db8::2]:8080",
                "*",
                ex(9000, 9000),
                Proto::Tcp,
                "[2001:db8::2]:8080",
            ),
            (
                "0.0.0.0:9000",
                "172.17.0.2:8080",
                "0.0.0.0",
                ex(9000, 9000),
                Proto::Tcp,
                "172.17.0.2:8080",
            ),
            (
                "[2001:db8::1]:9000",
                "172.17.0.2:8080",
                "2001:db8::1",
                ex(9000, 9000),
                Proto::Tcp,
                "172.17.0.2:8080",
            ),
            (
                "9000",
                "172.17.0.2:8080,[2001:db8::2]:8080",
                "*",
                ex(9000, 9000),
                Proto::Tcp,
                "172.17.0.2:8080,[2001:db8::2]:8080",
            ),
            (
                "9000-9001",
                "[2001:db8::2]:80-81,172.17.0.2:80-81",
                "*",
                ex(9000, 9001),
                Proto::Tcp,
                "172.17.0.2:80-81,[2001:db8::2]:80-81",
            ),
            (
                "[::]:",
                "[2001:db8::2]:8080",
                "::",
                any,
                Proto::Tcp,
                "[2001:db8::2]:8080",
            ),
        ];
        for &(spec, backend, addr, ports, proto, shown) in table {
            let d = Declaration::parse(spec, backend)
                .unwrap_or_else(|e| panic!("{spec} {backend}: rejected: {e}"));
            assert_eq!(
                (d.host(), d.host_ports(), d.proto(), d.backend().to_string()),
                (host(addr), ports, proto, shown.to_string()),
                "{spec} {backend}"
            );
            // The wire form pairs back to the same declaration.
            assert_eq!(Declaration::new(d.spec(), d.backend()), Ok(d));
        }
    }

    #[test]
    fn add_declarations_rejected() {
        use RuleError::*;
        let s = |x: &str| x.to_string();
        let table: Vec<(&str, &str, RuleError)> = vec![
            (
                "9000-9009",
                "172.17.0.2:8000-8004",
                RangeLengths {
                    host: s("9000-9009"),
                    host_len: 10,
                    backend: s("8000-8004"),
                    backend_len: 5,
                },
            ),
            (
                "9000",
                "172.17.0.2:8000-8001",
                RangeLengths {
                    host: s("9000"),
                    host_len: 1,
                    backend: s("8000-8001"),
                    backend_len: 2,
                },
            ),
            (
                "10.0.0.1:9000",
                "[2001:db8::2]:8080",
                FamilyMismatch {
                    host: ip("10.0.0.1"),
                    backend: addrs("2001:db8::2"),
                },
            ),
            (
                "0.0.0.0:9000",
                "[2001:db8::2]:8080",
                FamilyMismatch {
                    host: ip("0.0.0.0"),
                    backend: addrs("2001:db8::2"),
                },
            ),
            (
                "9000",
                "[2001:db8::2]:8080,[2001:db8::3]:8080",
                BackendFamilies {
                    addrs: addrs("2001:db8::2"),
                    more: ip("2001:db8::3"),
                },
            ),
            (
                "9000",
                "172.17.0.2:8080,[2001:db8::2]:8081",
                BackendPorts {
                    first: s("172.17.0.2:8080"),
                    second: s("[2001:db8::2]:8081"),
                },
            ),
            (
                "9000",
                "172.17.0.2:8080,[::1]:8080",
                BackendNotUnicast {
                    addr: ip("::1"),
                    why: "loopback addresses are not routed to from outside the host",
                },
            ),
            (
                "9000",
                "172.17.0.2:8009-8000",
                RangeReversed {
                    range: s("8009-8000"),
                },
            ),
            (
                "9000",
                "172.17.0.2:0-5",
                PortZeroInRange { range: s("0-5") },
            ),
            (
                "9000",
                "172.17.0.2:65535-65536",
                RangeCrosses65535 {
                    range: s("65535-65536"),
                },
            ),
            (
                "9000",
                "[::1]:8080",
                BackendNotUnicast {
                    addr: ip("::1"),
                    why: "loopback addresses are not routed to from outside the host",
                },
            ),
            (
                "9000",
                "[::]:8080",
                BackendNotUnicast {
                    addr: ip("::"),
                    why: "it is the unspecified address",
                },
            ),
            (
                "9000",
                "2001:db8::2:8080",
                Ipv6NeedsBrackets {
                    spec: s("2001:db8::2:8080"),
                },
            ),
            (
                "9000/sctp",
                "172.17.0.2:8080",
                ProtocolNotSupported { proto: s("sctp") },
            ),
            ("abc", "172.17.0.2:8080", PortNotNumber { port: s("abc") }),
        ];
        for (spec, backend, want) in table {
            assert_eq!(
                Declaration::parse(spec, backend),
                Err(want),
                "{spec} {backend}"
            );
        }
    }

    /// Docker's and Compose's short syntax, as the file's `ports` strings.
    #[test]
    fn mappings_accepted() {
        let any = HostPorts::Any;
        let ex = |a, b| HostPorts::Exact(range(a, b));
        let ff = |a, b| HostPorts::FirstFree(range(a, b));
        let table: &[(&str, &str, HostPorts, Proto, PortRange)] = &[
            ("8080", "*", any, Proto::Tcp, range(8080, 8080)),
            ("3000-3005", "*", any, Proto::Tcp, range(3000, 3005)),
            (
                "9000:8080",
                "*",
                ex(9000, 9000),
                Proto::Tcp,
                range(8080, 8080),
            ),
            (
                "5353:53/udp",
                "*",
                ex(5353, 5353),
                Proto::Udp,
                range(53, 53),
            ),
            (
                "7000-7010:7000-7010",
                "*",
                ex(7000, 7010),
                Proto::Tcp,
                range(7000, 7010),
            ),
            (
                "9090-9091:8080-8081",
                "*",
                ex(9090, 9091),
                Proto::Tcp,
                range(8080, 8081),
            ),
            (
                "8000-9000:80",
                "*",
                ff(8000, 9000),
                Proto::Tcp,
                range(80, 80),
            ),
            (
                "127.0.0.1:9443:443",
                "127.0.0.1",
                ex(9443, 9443),
                Proto::Tcp,
                range(443, 443),
            ),
            (
                "127.0.0.1:5000-5010:5000-5010",
                "127.0.0.1",
                ex(5000, 5010),
                Proto::Tcp,
                range(5000, 5010),
            ),
            ("127.0.0.1::80", "127.0.0.1", any, Proto::Tcp, range(80, 80)),
            (
                "127.0.0.1:0:80/udp",
                "127.0.0.1",
                any,
                Proto::Udp,
                range(80, 80),
            ),
            ("0:80", "*", any, Proto::Tcp, range(80, 80)),
            (
                "49100:22/TCP",
                "*",
                ex(49100, 49100),
                Proto::Tcp,
                range(22, 22),
            ),
        ];
        for &(mapping, addr, ports, proto, container) in table {
            let d = Declaration::from_mapping(mapping, addrs(C))
                .unwrap_or_else(|e| panic!("{mapping}: rejected: {e}"));
            assert_eq!(
                (d.host(), d.host_ports(), d.proto(), d.backend().ports()),
                (host(addr), ports, proto, container),
                "{mapping}"
            );
        }
        let v6 = addrs("2001:db8::2");
        for (mapping, addr, ports) in [
            ("[2001:db8::1]:9000:8080", "2001:db8::1", ex(9000, 9000)),
            ("[::1]:9000:8080", "::1", ex(9000, 9000)),
            ("[::1]::8080", "::1", any),
            ("9000:8080", "*", ex(9000, 9000)),
        ] {
            let d = Declaration::from_mapping(mapping, v6)
                .unwrap_or_else(|e| panic!("{mapping}: rejected: {e}"));
            assert_eq!((d.host(), d.host_ports()), (host(addr), ports), "{mapping}");
            assert!(d.needs_ipv6());
        }
    }

    #[test]
    fn mappings_rejected() {
        use RuleError::*;
        let s = |x: &str| x.to_string();
        let table: Vec<(&str, RuleError)> = vec![
            ("", MappingFormat { spec: s("") }),
            ("9000:", MappingFormat { spec: s("9000:") }),
            ("[::1]", MappingFormat { spec: s("[::1]") }),
            ("9000:8080/sctp", ProtocolNotSupported { proto: s("sctp") }),
            (
                "9000:8080/tcp+udp",
                UnknownProtocol {
                    proto: s("tcp+udp"),
                },
            ),
            (
                "9000-9009:8000-8004",
                RangeLengths {
                    host: s("9000-9009"),
                    host_len: 10,
                    backend: s("8000-8004"),
                    backend_len: 5,
                },
            ),
            (
                "9009-9000:8000",
                RangeReversed {
                    range: s("9009-9000"),
                },
            ),
            (
                "9000:8009-8000",
                RangeReversed {
                    range: s("8009-8000"),
                },
            ),
            (
                "65535-65536:80",
                RangeCrosses65535 {
                    range: s("65535-65536"),
                },
            ),
            ("0-9:0-9", PortZeroInRange { range: s("0-9") }),
            ("9000:0", PortOutOfRange { port: s("0") }),
            ("9000:http", PortNotNumber { port: s("http") }),
            (
                "1.2.3.4:9000:8080:80",
                PortNotNumber {
                    port: s("9000:8080"),
                },
            ),
            (
                "::1:9000:8080",
                Ipv6NeedsBrackets {
                    spec: s("::1:9000"),
                },
            ),
            (
                "localhost:9000:8080",
                BadAddress {
                    addr: s("localhost"),
                },
            ),
            (
                "127.0.0.1:8080",
                PortNotNumber {
                    port: s("127.0.0.1"),
                },
            ),
        ];
        for (mapping, want) in table {
            assert_eq!(
                Declaration::from_mapping(mapping, addrs(C)),
                Err(want),
                "{mapping:?}"
            );
        }
    }

    #[test]
    fn backend_accepted() {
        for (spec, addr, ports) in [
            ("172.17.0.2:8080", "172.17.0.2", range(8080, 8080)),
            ("10.0.0.1:1", "10.0.0.1", range(1, 1)),
            ("198.18.0.2:65535", "198.18.0.2", range(65535, 65535)),
            ("172.17.0.2:8000-8009", "172.17.0.2", range(8000, 8009)),
            ("[2001:db8::2]:8080", "2001:db8::2", range(8080, 8080)),
        ] {
            let b: Backend = spec
                .parse()
                .unwrap_or_else(|e| panic!("{spec}: rejected: {e}"));
            assert_eq!((b.addrs().first(), b.ports()), (ip(addr), ports), "{spec}");
            assert_eq!(b.to_string(), spec);
        }
    }

    #[test]
    fn backend_rejected() {
        use RuleError::*;
        let s = |x: &str| x.to_string();
        let table: Vec<(&str, RuleError)> = vec![
            ("", Empty { what: "backend" }),
            (
                "172.17.0.2",
                BackendFormat {
                    spec: s("172.17.0.2"),
                },
            ),
            ("8080", BackendFormat { spec: s("8080") }),
            (
                "172.17.0.2:",
                BackendFormat {
                    spec: s("172.17.0.2:"),
                },
            ),
            (
                "[2001:db8::2]",
                BackendFormat {
                    spec: s("[2001:db8::2]"),
                },
            ),
            ("172.17.0.2:0", PortOutOfRange { port: s("0") }),
            ("172.17.0.2:65536", PortOutOfRange { port: s("65536") }),
            ("172.17.0.2:http", PortNotNumber { port: s("http") }),
            (
                "172.17.0.2:53/udp",
                BackendProtocol {
                    spec: s("172.17.0.2:53/udp"),
                },
            ),
            (
                "172.17.0:8080",
                BadAddress {
                    addr: s("172.17.0"),
                },
            ),
            (":8080", BadAddress { addr: s("") }),
            (
                "fd00::2:8080",
                Ipv6NeedsBrackets {
                    spec: s("fd00::2:8080"),
                },
            ),
            (
                "0.0.0.0:8080",
                BackendNotUnicast {
                    addr: ip("0.0.0.0"),
                    why: "it is the unspecified address",
                },
            ),
            (
                "255.255.255.255:8080",
                BackendNotUnicast {
                    addr: ip("255.255.255.255"),
                    why: "it is the broadcast address",
                },
            ),
            (
                "239.1.2.3:8080",
                BackendNotUnicast {
                    addr: ip("239.1.2.3"),
                    why: "it is a multicast address",
                },
            ),
            (
                "127.9.9.9:8080",
                BackendNotUnicast {
                    addr: ip("127.9.9.9"),
                    why: "loopback addresses are not routed to from outside the host",
                },
            ),
        ];
        for (spec, want) in table {
            assert_eq!(spec.parse::<Backend>(), Err(want), "{spec:?}");
        }
    }

    #[test]
    fn messages_are_one_line_and_name_the_part() {
        let cases: Vec<(RuleError, &str)> = vec![
            ("0".parse::<Publish>().expect_err("0"), "`0`"),
            ("65536/udp".parse::<Publish>().expect_err("x"), "`65536`"),
            ("9000/icmp".parse::<Publish>().expect_err("x"), "`icmp`"),
            (
                "9000/sctp".parse::<Publish>().expect_err("x"),
                "`sctp` is not supported",
            ),
            ("1.2.3:9000".parse::<Publish>().expect_err("x"), "`1.2.3`"),
            (
                "9009-9000".parse::<Publish>().expect_err("x"),
                "`9009-9000`",
            ),
            (
                "65000-70000".parse::<Publish>().expect_err("x"),
                "past 65535",
            ),
            ("0-5".parse::<Publish>().expect_err("x"), "port 0"),
            (
                Declaration::parse("9000-9009", "10.0.0.2:80-81").expect_err("x"),
                "`9000-9009` (10 ports) and `80-81` (2 ports)",
            ),
            (
                Declaration::parse("10.0.0.1:9000", "[2001:db8::2]:80").expect_err("x"),
                "host address 10.0.0.1 is IPv4 but backend [2001:db8::2] has no IPv4 address",
            ),
        ];
        for (err, part) in cases {
            let msg = err.to_string();
            assert!(!msg.contains('\n'), "{msg}");
            assert!(msg.contains(part), "{msg} lacks {part}");
        }
    }

    #[test]
    fn display_keys_and_conflicts() {
        let p: Publish = "198.51.100.7:9000/udp".parse().expect("valid");
        assert_eq!(p.to_string(), "198.51.100.7:9000/udp");
        assert_eq!(p.addr_port(), "198.51.100.7:9000");
        let w: Publish = "9000-9009".parse().expect("valid");
        assert!(w.is_wildcard());
        assert_eq!(w.to_string(), "*:9000-9009/tcp");
        let v6: Publish = "[::1]:9000".parse().expect("valid");
        assert_eq!(v6.to_string(), "[::1]:9000/tcp");
        for p in [p, w, v6] {
            assert_eq!(p.to_string().parse::<Publish>(), Ok(p));
        }
        // (a, b, first conflicting port)
        for (a, b, want) in [
            ("9000-9009", "9005", Some(9005)),
            ("9005", "9000-9009", Some(9005)),
            ("9000-9009", "9009-9020", Some(9009)),
            ("9000-9009", "9010-9020", None),
            ("9000-9009", "9000-9009/udp", None),
            ("1.2.3.4:9000-9009", "9003-9004", Some(9003)),
            ("1.2.3.4:9000-9009", "1.2.3.5:9003-9004", None),
            // Families: `*` takes both, `0.0.0.0` and `[::]` one each.
            ("9000", "[::1]:9000", Some(9000)),
            ("*:9000", "0.0.0.0:9000", Some(9000)),
            ("0.0.0.0:9000", "[::]:9000", None),
            ("0.0.0.0:9000", "[::1]:9000", None),
            ("[::]:9000", "127.0.0.1:9000", None),
            ("[::]:9000", "[2001:db8::1]:9000", Some(9000)),
            ("0.0.0.0:9000", "127.0.0.1:9000", Some(9000)),
        ] {
            let (a, b): (Publish, Publish) = (a.parse().expect("a"), b.parse().expect("b"));
            assert_eq!(a.conflict(&b), want, "{a} vs {b}");
        }
        let rule = Rule::new(
            "9000-9002".parse().expect("p"),
            "10.0.0.2:8000-8002".parse().expect("b"),
        )
        .expect("rule");
        assert_eq!(
            rule.port_pairs().collect::<Vec<_>>(),
            vec![(9000, 8000), (9001, 8001), (9002, 8002)]
        );
        assert!(Rule::new(
            "9000".parse().expect("p"),
            "10.0.0.2:1-2".parse().expect("b")
        )
        .is_err());
    }
}

/// Property tests: the publish/backend grammar on arbitrary and structure-aware mutated
/// input never panics, and every refusal is one line. The generators serve the
/// declarations file's and the Compose import's tests too.
#[cfg(test)]
pub(crate) mod fuzz {
    use super::*;
    use crate::report::chain;
    use proptest::prelude::*;

    /// Host addresses as written, good and bad.
    fn host() -> BoxedStrategy<String> {
        prop_oneof![
            Just(String::new()),
            Just("127.0.0.1:".to_string()),
            Just("0.0.0.0:".to_string()),
            Just("*:".to_string()),
            Just("[::1]:".to_string()),
            Just("[::]:".to_string()),
            Just("::1:".to_string()),
            Just("[::ffff:1.2.3.4]:".to_string()),
            Just("256.1.1.1:".to_string()),
            Just("[fe80::1%eth0]:".to_string()),
            Just("localhost:".to_string()),
            any::<std::net::Ipv4Addr>().prop_map(|a| format!("{a}:")),
            any::<std::net::Ipv6Addr>().prop_map(|a| format!("[{a}]:")),
            "[0-9a-f:.\\[\\]*]{0,12}:",
        ]
        .boxed()
    }

    /// Ports and ranges as written, good and bad.
    fn ports() -> BoxedStrategy<String> {
        prop_oneof![
            any::<u16>().prop_map(|p| p.to_string()),
            (any::<u16>(), any::<u16>()).prop_map(|(a, b)| format!("{a}-{b}")),
            (1u16..2000).prop_map(|a| format!("{a}-{}", a + 10)),
            Just("0".to_string()),
            Just("65536".to_string()),
            Just("99999999999999999999999".to_string()),
            Just("-".to_string()),
            Just("1-".to_string()),
            Just("-1".to_string()),
            Just("+80".to_string()),
            Just("٣".to_string()),
            any::<u64>().prop_map(|p| p.to_string()),
            "[0-9-]{0,8}",
        ]
        .boxed()
    }

    fn proto() -> BoxedStrategy<String> {
        prop_oneof![
            Just(String::new()),
            Just("/tcp".to_string()),
            Just("/udp".to_string()),
            Just("/sctp".to_string()),
            Just("/".to_string()),
            Just("/TCP".to_string()),
            Just("/tcp/udp".to_string()),
            "/[a-z]{0,5}",
        ]
        .boxed()
    }

    /// A publish spec `[HOST:]PORTS[/PROTO]` or a mapping `[HOST:][PORTS:]PORTS[/PROTO]`.
    pub(crate) fn spec() -> BoxedStrategy<String> {
        (host(), ports(), proptest::option::of(ports()), proto())
            .prop_map(|(h, p, container, proto)| match container {
                Some(c) => format!("{h}{p}:{c}{proto}"),
                None => format!("{h}{p}{proto}"),
            })
            .boxed()
    }

    /// A backend `IP:PORTS`, or two joined by `,`, good and bad.
    pub(crate) fn backend() -> BoxedStrategy<String> {
        prop_oneof![
            3 => backend_one(),
            1 => (backend_one(), backend_one()).prop_map(|(a, b)| format!("{a},{b}")),
        ]
        .boxed()
    }

    fn backend_one() -> BoxedStrategy<String> {
        (
            prop_oneof![
                any::<std::net::Ipv4Addr>().prop_map(|a| a.to_string()),
                any::<std::net::Ipv6Addr>().prop_map(|a| format!("[{a}]")),
                Just("10.0.0.2".to_string()),
                Just("[::1]".to_string()),
                Just("::1".to_string()),
                Just("0.0.0.0".to_string()),
                Just(String::new()),
            ],
            ports(),
            proto(),
        )
            .prop_map(|(a, p, proto)| format!("{a}:{p}{proto}"))
            .boxed()
    }

    /// `s` with a few characters inserted, deleted or replaced at random places.
    pub(crate) fn mutated(s: impl Strategy<Value = String>) -> impl Strategy<Value = String> {
        (
            s,
            proptest::collection::vec((any::<usize>(), 0u8..3, any::<char>()), 0..4),
        )
            .prop_map(|(s, edits)| {
                let mut chars: Vec<char> = s.chars().collect();
                for (at, op, c) in edits {
                    let i = at % (chars.len() + 1);
                    match op {
                        0 => chars.insert(i, c),
                        1 if i < chars.len() => {
                            chars.remove(i);
                        }
                        _ if i < chars.len() => chars[i] = c,
                        _ => chars.push(c),
                    }
                }
                chars.into_iter().collect()
            })
    }

    /// An error shown as the CLI shows it: one line, not empty.
    pub(crate) fn one_line(e: &dyn std::error::Error) -> Result<(), TestCaseError> {
        let text = chain(e);
        prop_assert!(!text.is_empty());
        prop_assert!(!text.contains('\n') && !text.contains('\r'), "{text:?}");
        Ok(())
    }

    /// Input without line breaks: a command-line argument as typed (the messages quote
    /// it; the daemon's protocol flattens them, `protocol::one_line`).
    fn no_breaks(s: String) -> String {
        s.replace(['\n', '\r'], " ")
    }

    fn check_all(spec: &str, backend: &str) -> Result<(), TestCaseError> {
        if let Err(e) = spec.parse::<Publish>() {
            one_line(&e)?;
        }
        if let Err(e) = spec.parse::<PublishSpec>() {
            one_line(&e)?;
        }
        if let Err(e) = backend.parse::<Backend>() {
            one_line(&e)?;
        }
        if let Err(e) = Declaration::parse(spec, backend) {
            one_line(&e)?;
        }
        let to = Addrs::new("172.17.0.2".parse().expect("address")).expect("backend address");
        if let Err(e) = Declaration::from_mapping(spec, to) {
            one_line(&e)?;
        }
        if let Err(e) = parse_host_ports(spec) {
            one_line(&e)?;
        }
        if let Err(e) = spec.parse::<PortRange>() {
            one_line(&e)?;
        }
        if let Err(e) = parse_host_text(spec) {
            one_line(&e)?;
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn arbitrary_text_never_panics(spec in "\\PC{0,40}", backend in "\\PC{0,40}") {
            check_all(&no_breaks(spec), &no_breaks(backend))?;
        }

        #[test]
        fn grammar_shaped_text_never_panics(
            spec in mutated(spec()).prop_map(no_breaks),
            backend in mutated(backend()).prop_map(no_breaks),
        ) {
            check_all(&spec, &backend)?;
        }

        /// What parses shows as text that parses back to the same thing.
        #[test]
        fn accepted_text_round_trips(spec in spec(), backend in backend()) {
            if let Ok(p) = spec.parse::<Publish>() {
                prop_assert_eq!(p.to_string().parse::<Publish>().ok(), Some(p), "{}", spec);
            }
            if let Ok(b) = backend.parse::<Backend>() {
                prop_assert_eq!(b.to_string().parse::<Backend>().ok(), Some(b), "{}", backend);
            }
        }
    }
}
