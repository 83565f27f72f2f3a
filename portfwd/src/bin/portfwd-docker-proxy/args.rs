//! docker-proxy's command line, and the portfwd rule each invocation stands for.
//!
//! dockerd starts its userland proxy once per published port and family, with Go `flag`
//! syntax (`-name value`, `-name=value`, `--name`; a boolean flag takes no separate
//! value):
//!
//! ```text
//! PROXY -proto tcp|udp|sctp -host-ip IP -host-port PORT -container-ip IP -container-port PORT [-use-listen-fd]
//! ```
//!
//! `-use-listen-fd` (dockerd 28 and later) means fd 4 is a socket dockerd bound (and,
//! for TCP, set listening) on `-host-ip:-host-port`; `-v`/`-version` print the version.
//!
//! Mapping (one invocation, one rule, so a `-p 9000:8080` container is served once per
//! family): the host address is kept exactly as dockerd gives it. `0.0.0.0` becomes
//! portfwd's IPv4 wildcard and `::` its IPv6 one (never `*`, which would cover the other
//! family's invocation too); `127.0.0.1` stays a loopback-only rule. An IPv6 host address
//! with an IPv4 container (dockerd's choice for a container without IPv6 when the
//! userland proxy is on) is a rule whose IPv6 clients portfwd serves by NAT64.

use std::{fmt, net::IpAddr};

use portfwd::rule::{Backend, Declaration, Host, PortRange, Proto, PublishSpec, RuleError};

/// What dockerd asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyArgs {
    pub proto: String,
    pub host_ip: IpAddr,
    pub host_port: u16,
    pub container_ip: IpAddr,
    pub container_port: u16,
    /// fd 4 holds dockerd's socket for the host address and port.
    pub use_listen_fd: bool,
}

/// What the command line asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Invocation {
    Proxy(ProxyArgs),
    Version,
}

/// Why the command line or the mapping was refused; one line each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArgsError {
    Unknown(String),
    MissingValue(String),
    BadValue {
        flag: &'static str,
        value: String,
        why: String,
    },
    Missing(&'static str),
    Positional(String),
    Rule(RuleError),
}

impl fmt::Display for ArgsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgsError::Unknown(flag) => write!(f, "flag provided but not defined: -{flag}"),
            ArgsError::MissingValue(flag) => write!(f, "flag needs an argument: -{flag}"),
            ArgsError::BadValue { flag, value, why } => {
                write!(f, "invalid value `{value}` for flag -{flag}: {why}")
            }
            ArgsError::Missing(flag) => write!(f, "missing flag -{flag}"),
            ArgsError::Positional(arg) => write!(f, "unexpected argument `{arg}`"),
            ArgsError::Rule(e) => write!(f, "{e}"),
        }
    }
}

impl From<RuleError> for ArgsError {
    fn from(e: RuleError) -> Self {
        ArgsError::Rule(e)
    }
}

/// Parses the arguments after the program name.
pub fn parse<I, S>(args: I) -> Result<Invocation, ArgsError>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let mut it = args.into_iter().map(Into::into);
    let (mut proto, mut host_ip, mut host_port) = (None, None, None);
    let (mut container_ip, mut container_port) = (None, None);
    let mut use_listen_fd = false;
    while let Some(arg) = it.next() {
        let Some(flag) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
            return Err(ArgsError::Positional(arg));
        };
        if flag.is_empty() {
            // `--` ends the flags; dockerd never passes positional arguments.
            return match it.next() {
                Some(extra) => Err(ArgsError::Positional(extra)),
                None => finish(
                    proto,
                    host_ip,
                    host_port,
                    container_ip,
                    container_port,
                    use_listen_fd,
                ),
            };
        }
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (flag.to_string(), None),
        };
        match name.as_str() {
            "v" | "version" => return Ok(Invocation::Version),
            "use-listen-fd" => {
                use_listen_fd = match inline.as_deref() {
                    None => true,
                    Some(v) => parse_bool(v).ok_or_else(|| ArgsError::BadValue {
                        flag: "use-listen-fd",
                        value: v.to_string(),
                        why: "not a boolean".into(),
                    })?,
                }
            }
            "proto" | "host-ip" | "host-port" | "container-ip" | "container-port" => {
                let value = match inline {
                    Some(v) => v,
                    None => it
                        .next()
                        .ok_or_else(|| ArgsError::MissingValue(name.clone()))?,
                };
                match name.as_str() {
                    "proto" => proto = Some(value),
                    "host-ip" => host_ip = Some(ip("host-ip", &value)?),
                    "host-port" => host_port = Some(port("host-port", &value)?),
                    "container-ip" => container_ip = Some(ip("container-ip", &value)?),
                    _ => container_port = Some(port("container-port", &value)?),
                }
            }
            _ => return Err(ArgsError::Unknown(name)),
        }
    }
    finish(
        proto,
        host_ip,
        host_port,
        container_ip,
        container_port,
        use_listen_fd,
    )
}

fn finish(
    proto: Option<String>,
    host_ip: Option<IpAddr>,
    host_port: Option<u16>,
    container_ip: Option<IpAddr>,
    container_port: Option<u16>,
    use_listen_fd: bool,
) -> Result<Invocation, ArgsError> {
    Ok(Invocation::Proxy(ProxyArgs {
        // docker-proxy's defaults: tcp, and 0.0.0.0 for the host address.
        proto: proto.unwrap_or_else(|| "tcp".into()),
        host_ip: host_ip.unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
        host_port: host_port.ok_or(ArgsError::Missing("host-port"))?,
        container_ip: container_ip.ok_or(ArgsError::Missing("container-ip"))?,
        container_port: container_port.ok_or(ArgsError::Missing("container-port"))?,
        use_listen_fd,
    }))
}

/// Go's `strconv.ParseBool`.
fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

fn ip(flag: &'static str, value: &str) -> Result<IpAddr, ArgsError> {
    value.parse().map_err(|_| ArgsError::BadValue {
        flag,
        value: value.to_string(),
        why: "not an IP address".into(),
    })
}

fn port(flag: &'static str, value: &str) -> Result<u16, ArgsError> {
    match value.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(ArgsError::BadValue {
            flag,
            value: value.to_string(),
            why: "not a port between 1 and 65535".into(),
        }),
    }
}

impl ProxyArgs {
    /// The portfwd rule that stands for this proxy: the same host address (one family's
    /// wildcard stays that family's), port and protocol, to the container's address and
    /// port. Refused (with portfwd's message) for what portfwd cannot forward, e.g. sctp.
    pub fn declaration(&self) -> Result<Declaration, ArgsError> {
        let proto: Proto = self.proto.parse()?;
        let spec = PublishSpec {
            host: Host::Ip(self.host_ip),
            ports: Some(PortRange::single(self.host_port)?),
            proto,
        };
        let backend = Backend::single(self.container_ip, self.container_port)?;
        Ok(Declaration::new(spec, backend)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(args: &[&str]) -> ProxyArgs {
        match parse(args.iter().copied()) {
            Ok(Invocation::Proxy(p)) => p,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    fn rule(args: &[&str]) -> Result<String, String> {
        proxy(args)
            .declaration()
            .map(|d| d.to_string())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn dockerd_command_lines() {
        // dockerd 20.10 (no fd 4).
        let p = proxy(&[
            "-proto",
            "tcp",
            "-host-ip",
            "0.0.0.0",
            "-host-port",
            "9000",
            "-container-ip",
            "172.17.0.2",
            "-container-port",
            "8080",
        ]);
        assert_eq!(
            p,
            ProxyArgs {
                proto: "tcp".into(),
                host_ip: "0.0.0.0".parse().expect("ip"),
                host_port: 9000,
                container_ip: "172.17.0.2".parse().expect("ip"),
                container_port: 8080,
                use_listen_fd: false,
            }
        );
        // dockerd 28: the socket on fd 4; Go's other spellings.
        let p = proxy(&[
            "--proto=udp",
            "-host-ip=::",
            "-host-port",
            "5353",
            "-container-ip",
            "fd00::2",
            "-container-port=53",
            "-use-listen-fd",
        ]);
        assert!(p.use_listen_fd);
        assert_eq!(p.proto, "udp");
        assert_eq!(p.host_ip, "::".parse::<IpAddr>().expect("ip"));
        assert!(
            !proxy(&[
                "-host-port",
                "1",
                "-container-ip",
                "10.0.0.1",
                "-container-port",
                "1",
                "-use-listen-fd=false"
            ])
            .use_listen_fd
        );
        assert_eq!(parse(["-v"]), Ok(Invocation::Version));
        assert_eq!(parse(["--version"]), Ok(Invocation::Version));
    }

    #[test]
    fn bad_command_lines() {
        let table: &[(&[&str], &str)] = &[
            (&["-frob", "1"], "flag provided but not defined: -frob"),
            (&["-host-port"], "flag needs an argument: -host-port"),
            (
                &["-host-port", "0"],
                "invalid value `0` for flag -host-port",
            ),
            (
                &["-host-port", "65536"],
                "invalid value `65536` for flag -host-port",
            ),
            (
                &["-host-ip", "1.2.3"],
                "invalid value `1.2.3` for flag -host-ip: not an IP address",
            ),
            (&["9000"], "unexpected argument `9000`"),
            (
                &["-container-ip", "10.0.0.1", "-container-port", "80"],
                "missing flag -host-port",
            ),
            (
                &["-use-listen-fd=maybe"],
                "invalid value `maybe` for flag -use-listen-fd",
            ),
        ];
        for (args, want) in table {
            let err = parse(args.iter().copied())
                .expect_err("refused")
                .to_string();
            assert!(err.contains(want), "{args:?}: {err}");
        }
    }

    #[test]
    fn one_rule_per_family_as_dockerd_asks() {
        let base = |proto: &'static str, hip: &'static str, cip: &'static str| {
            vec![
                "-proto",
                proto,
                "-host-ip",
                hip,
                "-host-port",
                "9000",
                "-container-ip",
                cip,
                "-container-port",
                "8080",
            ]
        };
        // `-p 9000:8080`: two invocations, two rules, one per family, never `*`.
        assert_eq!(
            rule(&base("tcp", "0.0.0.0", "172.17.0.2")),
            Ok("0.0.0.0:9000/tcp -> 172.17.0.2:8080".into())
        );
        assert_eq!(
            rule(&base("tcp", "::", "172.17.0.2")),
            Ok("[::]:9000/tcp -> 172.17.0.2:8080".into())
        );
        // A dual-stack container: dockerd gives its IPv6 address for `::`.
        assert_eq!(
            rule(&base("tcp", "::", "fd00::2")),
            Ok("[::]:9000/tcp -> [fd00::2]:8080".into())
        );
        assert_eq!(
            rule(&base("udp", "127.0.0.1", "172.17.0.2")),
            Ok("127.0.0.1:9000/udp -> 172.17.0.2:8080".into())
        );
        let sctp = rule(&base("sctp", "0.0.0.0", "172.17.0.2")).expect_err("sctp");
        assert!(sctp.contains("`sctp` is not supported"), "{sctp}");
        let fam = rule(&base("tcp", "0.0.0.0", "fd00::2")).expect_err("family");
        assert!(fam.contains("has no IPv4 address"), "{fam}");
    }
}
