//! The rule model: what an operator publishes, how it is written on the command line, and
//! what makes it valid.
//!
//! Grammar (a subset of Docker's `-p`, written so it can grow into all of it):
//!
//! ```text
//! publish := [HOST_IP ":"] HOST_PORT ["/" PROTO]      e.g. 9000, 5353/udp, 198.51.100.7:9000/tcp
//! backend := BACKEND_IP ":" BACKEND_PORT              e.g. 172.17.0.2:8080
//! PROTO   := tcp | udp                                 (case-insensitive, default tcp)
//! ```
//!
//! Not supported yet, each rejected with its own error rather than misparsed: IPv6
//! addresses (`[::1]:9000`), port ranges (`8000-8010`) and random host ports
//! (`198.51.100.7::` in Docker). The parser already splits the spec the way Docker does
//! (protocol suffix, then an optional bracketed or dotted address, then the port part),
//! so each of these becomes a new branch, not a rewrite.
//!
//! Invariant: a [`Publish`] or [`Backend`] value is always valid. They are only built by
//! the parsers here or by [`Publish::new`] / [`Backend::new`], which validate; the control
//! protocol deserializes through the same checks, so the daemon never trusts a client.

use std::{fmt, net::Ipv4Addr, str::FromStr};

use portfwd_common::{proto, RuleKeyV4};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Why a publish spec or a backend was rejected. Every message is one line and names the
/// offending part as the user wrote it.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum RuleError {
    #[error("empty {what}")]
    Empty { what: &'static str },
    #[error("invalid port `{port}`: not a number")]
    PortNotNumber { port: String },
    #[error("invalid port `{port}`: must be between 1 and 65535")]
    PortOutOfRange { port: String },
    #[error("port range `{range}` is not supported yet: publish one port per rule")]
    RangeNotSupported { range: String },
    #[error("missing host port in `{spec}` (random host ports are not supported yet)")]
    MissingHostPort { spec: String },
    #[error("invalid IPv4 address `{addr}`")]
    BadAddress { addr: String },
    #[error("IPv6 address `{addr}` is not supported yet: use an IPv4 address")]
    Ipv6NotSupported { addr: String },
    #[error("unknown protocol `{proto}`: expected tcp or udp")]
    UnknownProtocol { proto: String },
    #[error("invalid backend `{spec}`: expected BACKEND_IP:BACKEND_PORT")]
    BackendFormat { spec: String },
    #[error(
        "invalid backend `{spec}`: a protocol belongs on the published port (e.g. 5353/udp), not on the backend"
    )]
    BackendProtocol { spec: String },
    #[error("{addr} cannot be a backend: {why}")]
    BackendNotUnicast { addr: Ipv4Addr, why: &'static str },
    #[error("{addr} cannot be a host address: {why}")]
    HostNotUnicast { addr: Ipv4Addr, why: &'static str },
}

/// A transport protocol portfwd translates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
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
        } else {
            Err(RuleError::UnknownProtocol {
                proto: s.to_string(),
            })
        }
    }
}

/// What is published: a host address (0.0.0.0 = every address of the host), a port and a
/// protocol. This is the rule's identity (the key of the daemon's table and of
/// [`portfwd_common::RULES_V4`]). Ordered by port, then protocol, then address (the field
/// order), so that a table lists a port's rules together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Publish {
    host_port: u16,
    proto: Proto,
    host_ip: Ipv4Addr,
}

impl Publish {
    /// Validates and builds. `host_ip` 0.0.0.0 is the wildcard.
    pub fn new(host_ip: Ipv4Addr, host_port: u16, proto: Proto) -> Result<Self, RuleError> {
        check_port(host_port, || host_port.to_string())?;
        if let Some(why) = not_a_host_address(host_ip) {
            return Err(RuleError::HostNotUnicast { addr: host_ip, why });
        }
        Ok(Self {
            host_ip,
            host_port,
            proto,
        })
    }

    pub fn host_ip(&self) -> Ipv4Addr {
        self.host_ip
    }
    pub fn host_port(&self) -> u16 {
        self.host_port
    }
    pub fn proto(&self) -> Proto {
        self.proto
    }
    /// True for 0.0.0.0: every address of the host.
    pub fn is_wildcard(&self) -> bool {
        self.host_ip.is_unspecified()
    }
    /// `0.0.0.0:9000`, as Docker's messages write it.
    pub fn addr_port(&self) -> String {
        format!("{}:{}", self.host_ip, self.host_port)
    }
    /// The key of [`portfwd_common::RULES_V4`].
    pub fn map_key(&self) -> RuleKeyV4 {
        RuleKeyV4::from_parts(self.host_ip, self.host_port, self.proto.number())
    }
}

/// `0.0.0.0:9000/tcp`.
impl fmt::Display for Publish {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.host_ip, self.host_port, self.proto)
    }
}

impl FromStr for Publish {
    type Err = RuleError;

    /// `[HOST_IP:]HOST_PORT[/PROTO]`.
    fn from_str(spec: &str) -> Result<Self, RuleError> {
        if spec.is_empty() {
            return Err(RuleError::Empty {
                what: "published port",
            });
        }
        // The protocol suffix first: nothing before it may contain a `/`.
        let (rest, proto) = match spec.rsplit_once('/') {
            Some((rest, p)) => (rest, p.parse()?),
            None => (spec, Proto::Tcp),
        };
        let (addr, port) = split_host_port(rest)?;
        let host_ip = match addr {
            Some(a) => parse_ipv4(a)?,
            None => Ipv4Addr::UNSPECIFIED,
        };
        if port.is_empty() {
            return Err(RuleError::MissingHostPort {
                spec: spec.to_string(),
            });
        }
        let host_port = parse_port(port)?;
        Self::new(host_ip, host_port, proto)
    }
}

/// Where a published port goes: a unicast IPv4 address and a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    ip: Ipv4Addr,
    port: u16,
}

impl Backend {
    /// Validates and builds.
    pub fn new(ip: Ipv4Addr, port: u16) -> Result<Self, RuleError> {
        check_port(port, || port.to_string())?;
        if let Some(why) = not_a_backend(ip) {
            return Err(RuleError::BackendNotUnicast { addr: ip, why });
        }
        Ok(Self { ip, port })
    }
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// `172.17.0.2:8080`.
impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.ip, self.port)
    }
}

impl FromStr for Backend {
    type Err = RuleError;

    /// `BACKEND_IP:BACKEND_PORT`.
    fn from_str(spec: &str) -> Result<Self, RuleError> {
        if spec.is_empty() {
            return Err(RuleError::Empty { what: "backend" });
        }
        if spec.contains('/') {
            return Err(RuleError::BackendProtocol {
                spec: spec.to_string(),
            });
        }
        let (addr, port) = split_host_port(spec)?;
        let (Some(addr), false) = (addr, port.is_empty()) else {
            return Err(RuleError::BackendFormat {
                spec: spec.to_string(),
            });
        };
        let ip = parse_ipv4(addr)?;
        let port = parse_port(port)?;
        Self::new(ip, port)
    }
}

/// One published port and its backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    pub publish: Publish,
    pub backend: Backend,
}

/// `0.0.0.0:9000/tcp -> 172.17.0.2:8080`.
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.publish, self.backend)
    }
}

/// Splits `[ADDR:]PORT` into its address and port parts, recognising (and rejecting for
/// now) IPv6 in either form, bracketed or bare.
fn split_host_port(s: &str) -> Result<(Option<&str>, &str), RuleError> {
    if let Some(inner) = s.strip_prefix('[') {
        let addr = inner.split_once(']').map_or(inner, |(a, _)| a);
        return Err(RuleError::Ipv6NotSupported {
            addr: addr.to_string(),
        });
    }
    match s.split_once(':') {
        // `ADDR:PORT` where PORT holds another colon (Docker's `ip::port`): a bad port.
        Some((addr, port)) if port.contains(':') && addr.parse::<Ipv4Addr>().is_ok() => {
            Ok((Some(addr), port))
        }
        // Any other second colon: a bare IPv6 address (Docker requires brackets there).
        Some((_, port)) if port.contains(':') => Err(RuleError::Ipv6NotSupported {
            addr: s.to_string(),
        }),
        Some((addr, port)) => Ok((Some(addr), port)),
        None => Ok((None, s)),
    }
}

/// An IPv4 address as written (dotted quad); IPv6 gets its own "not yet" error.
pub(crate) fn parse_ipv4(s: &str) -> Result<Ipv4Addr, RuleError> {
    if s.contains(':') {
        return Err(RuleError::Ipv6NotSupported {
            addr: s.to_string(),
        });
    }
    if s.is_empty() {
        return Err(RuleError::BadAddress {
            addr: s.to_string(),
        });
    }
    s.parse().map_err(|_| RuleError::BadAddress {
        addr: s.to_string(),
    })
}

/// A port as written: ASCII digits only (no sign, no spaces), 1..=65535.
fn parse_port(s: &str) -> Result<u16, RuleError> {
    if s.contains('-') && s.split('-').all(|p| is_digits(p.trim())) {
        return Err(RuleError::RangeNotSupported {
            range: s.to_string(),
        });
    }
    if !is_digits(s) {
        return Err(RuleError::PortNotNumber {
            port: s.to_string(),
        });
    }
    let port = s.parse::<u16>().map_err(|_| RuleError::PortOutOfRange {
        port: s.to_string(),
    })?;
    check_port(port, || s.to_string())?;
    Ok(port)
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

/// Why `ip` cannot be a backend, if it cannot.
fn not_a_backend(ip: Ipv4Addr) -> Option<&'static str> {
    if ip.is_unspecified() {
        Some("it is the unspecified address")
    } else if ip.is_broadcast() {
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
fn not_a_host_address(ip: Ipv4Addr) -> Option<&'static str> {
    if ip.is_broadcast() {
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

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("test address")
    }

    #[test]
    fn publish_accepted() {
        let table: &[(&str, &str, u16, Proto)] = &[
            ("9000", "0.0.0.0", 9000, Proto::Tcp),
            ("1", "0.0.0.0", 1, Proto::Tcp),
            ("65535", "0.0.0.0", 65535, Proto::Tcp),
            ("09000", "0.0.0.0", 9000, Proto::Tcp),
            ("9000/tcp", "0.0.0.0", 9000, Proto::Tcp),
            ("5353/udp", "0.0.0.0", 5353, Proto::Udp),
            ("5353/UDP", "0.0.0.0", 5353, Proto::Udp),
            ("5353/Tcp", "0.0.0.0", 5353, Proto::Tcp),
            ("198.51.100.7:9000", "198.51.100.7", 9000, Proto::Tcp),
            ("198.51.100.7:9000/udp", "198.51.100.7", 9000, Proto::Udp),
            ("0.0.0.0:9000", "0.0.0.0", 9000, Proto::Tcp),
            ("127.0.0.1:9000", "127.0.0.1", 9000, Proto::Tcp),
        ];
        for &(spec, addr, port, proto) in table {
            let p: Publish = spec
                .parse()
                .unwrap_or_else(|e| panic!("{spec}: rejected: {e}"));
            assert_eq!(
                (p.host_ip(), p.host_port(), p.proto()),
                (ip(addr), port, proto),
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
            ("9000/", UnknownProtocol { proto: s("") }),
            ("9000/sctp", UnknownProtocol { proto: s("sctp") }),
            (
                "9000/tcp/udp",
                PortNotNumber {
                    port: s("9000/tcp"),
                },
            ),
            (
                "8000-8010",
                RangeNotSupported {
                    range: s("8000-8010"),
                },
            ),
            (
                "8000-8010/udp",
                RangeNotSupported {
                    range: s("8000-8010"),
                },
            ),
            (
                "1.2.3.4:8000-8010",
                RangeNotSupported {
                    range: s("8000-8010"),
                },
            ),
            ("[::1]:9000", Ipv6NotSupported { addr: s("::1") }),
            ("[::]:9000/udp", Ipv6NotSupported { addr: s("::") }),
            (
                "::1:9000",
                Ipv6NotSupported {
                    addr: s("::1:9000"),
                },
            ),
            (
                "1.2.3.4:",
                MissingHostPort {
                    spec: s("1.2.3.4:"),
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
                    addr: Ipv4Addr::BROADCAST,
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
        ];
        for (spec, want) in table {
            assert_eq!(spec.parse::<Publish>(), Err(want), "{spec:?}");
        }
    }

    #[test]
    fn backend_accepted() {
        for (spec, addr, port) in [
            ("172.17.0.2:8080", "172.17.0.2", 8080),
            ("10.0.0.1:1", "10.0.0.1", 1),
            ("198.18.0.2:65535", "198.18.0.2", 65535),
        ] {
            let b: Backend = spec
                .parse()
                .unwrap_or_else(|e| panic!("{spec}: rejected: {e}"));
            assert_eq!((b.ip(), b.port()), (ip(addr), port), "{spec}");
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
            ("172.17.0.2:0", PortOutOfRange { port: s("0") }),
            ("172.17.0.2:65536", PortOutOfRange { port: s("65536") }),
            ("172.17.0.2:http", PortNotNumber { port: s("http") }),
            (
                "172.17.0.2:8080-8081",
                RangeNotSupported {
                    range: s("8080-8081"),
                },
            ),
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
            ("[fd00::2]:8080", Ipv6NotSupported { addr: s("fd00::2") }),
            (
                "fd00::2:8080",
                Ipv6NotSupported {
                    addr: s("fd00::2:8080"),
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
                    addr: Ipv4Addr::BROADCAST,
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
                "127.0.0.1:8080",
                BackendNotUnicast {
                    addr: ip("127.0.0.1"),
                    why: "loopback addresses are not routed to from outside the host",
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
        for (spec, part) in [
            ("0", "`0`"),
            ("65536/udp", "`65536`"),
            ("9000/icmp", "`icmp`"),
            ("1.2.3:9000", "`1.2.3`"),
            ("[::1]:9000", "::1"),
            ("8000-8010", "`8000-8010`"),
        ] {
            let msg = spec
                .parse::<Publish>()
                .err()
                .unwrap_or_else(|| panic!("{spec} accepted"))
                .to_string();
            assert!(!msg.contains('\n'), "{msg}");
            assert!(msg.contains(part), "{spec}: {msg}");
        }
    }

    #[test]
    fn display_and_key() {
        let p: Publish = "198.51.100.7:9000/udp".parse().expect("valid");
        assert_eq!(p.to_string(), "198.51.100.7:9000/udp");
        assert_eq!(p.addr_port(), "198.51.100.7:9000");
        let k = p.map_key();
        assert_eq!(
            (k.addr(), k.port(), k.proto()),
            (ip("198.51.100.7"), 9000, 17)
        );
        let w: Publish = "9000".parse().expect("valid");
        assert!(w.is_wildcard());
        assert_eq!(w.to_string(), "0.0.0.0:9000/tcp");
        // What Display writes parses back to the same value.
        assert_eq!(w.to_string().parse::<Publish>(), Ok(w));
        assert_eq!(p.to_string().parse::<Publish>(), Ok(p));
    }
}
