//! The control protocol between `portfwd-ctl` (or any tool) and the `portfwd` daemon.
//!
//! Transport: a Unix stream socket (root only). The client writes **one request** as a
//! single line of JSON ending in `\n` (at most [`MAX_REQUEST`] bytes), the daemon answers
//! with **one response** line and closes the connection.
//!
//! Requests:
//! ```json
//! {"cmd":"add","publish":{"host_ip":"0.0.0.0","host_port":9000,"proto":"tcp"},"backend":{"ip":"172.17.0.2","port":8080}}
//! {"cmd":"add","publish":{"host_port":9000,"host_port_end":9009},"backend":{"ip":"172.17.0.2","port":8000,"port_end":8009}}
//! {"cmd":"del","publish":{"host_ip":"0.0.0.0","host_port":9000,"proto":"tcp"}}
//! {"cmd":"add","publish":{"host_ip":"::","host_port":9000},"backend":{"ip":"172.17.0.2","port":8080},"owner":"docker:4711"}
//! {"cmd":"del","publish":{"host_ip":"::","host_port":9000},"owner":"docker:4711"}
//! {"cmd":"list"}
//! {"cmd":"flows","filter":{"port":9000},"limit":1000}
//! {"cmd":"apply","file":"/etc/portfwd.toml","dry_run":false,"declarations":[{"line":3,"entry":"9000:8080","publish":{...},"backend":{...}}]}
//! ```
//! In `publish`, `host_ip` defaults to `"*"` (every host address, both families;
//! `"0.0.0.0"` is IPv4's only, `"::"` IPv6's), `proto` to
//! `"tcp"` (case-insensitive), `host_port_end` and `port_end` to the first port (a single
//! port). In `add` (and `apply`), a `host_port` of 0 or absent means "any free port", and a
//! host range with a single backend port means "the first free port of the range".
//! A dual-stack `backend` gives its IPv4 address as `ip` and its IPv6 one as `ip6`.
//! An `owner` (optional, an [`Owner`]) marks a runtime rule as a plugin's: `list` shows
//! it, and a `del` that names an owner removes only a rule of that owner, so a plugin
//! (`portfwd-docker-proxy`) removes what it added and nothing else. With an owner,
//! `"reservation_ok": true` says the runtime holds the ports with its own idle
//! reservation socket (podman's conmon, after `portfwd-cni` publishes them): a local
//! process holding them does not refuse the add, and local binds of them are let
//! through instead of refused; traffic still goes to the backend. Unknown fields are
//! rejected.
//!
//! Responses: `{"ok":false,"error":"<one line>"}` on failure, otherwise `{"ok":true, ...}`
//! with the fields of [`RuleReply`] (add, del: the rule published or removed), of
//! [`ListReply`] (list) or of [`ApplyReply`] (apply).
//!
//! Trust: [`Publish`], [`PublishSpec`] and [`Backend`] deserialize through the same
//! validation as the command-line parser (same messages), so a request that parses is a
//! valid request; the daemon never relies on the client having checked anything.

use std::{
    collections::BTreeMap,
    io::{self, BufRead, BufReader, Write},
    net::{IpAddr, Ipv6Addr},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{de::DeserializeOwned, Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

use crate::{
    dataplane::Attachment,
    rule::{self, Addrs, Backend, Host, Proto, Publish, PublishSpec, RuleError},
};

/// Default control socket (`--socket`, `PORTFWD_SOCKET`).
pub const DEFAULT_SOCKET: &str = "/run/portfwd/portfwd.sock";
/// Environment variable both binaries read for the socket path.
pub const SOCKET_ENV: &str = "PORTFWD_SOCKET";
/// Largest request line the daemon reads, newline excluded (an `apply` carries a whole
/// declarations file: about 150 bytes per entry).
pub const MAX_REQUEST: usize = 1024 * 1024;

/// One request. Tagged by `cmd`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// Publish `publish` to `backend` (a runtime rule, source `cli`).
    Add {
        /// What to publish (the host ports may be left open).
        publish: PublishSpec,
        /// Where it goes.
        backend: Backend,
        /// The plugin the rule belongs to, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<Owner>,
        /// The runtime (the owner, required) holds the ports with its own idle
        /// reservation socket: not refused for it, and its bind is let through.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        reservation_ok: bool,
    },
    /// Unpublish `publish` (as `list` shows it: a range is removed whole).
    Del {
        /// The rule, as `list` shows it.
        publish: Publish,
        /// Only if the rule is this owner's (refused otherwise, nothing removed).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<Owner>,
    },
    /// Every rule with its counters, the attachments and the reason counters.
    List,
    /// Replace the file-sourced rules with `declarations` (atomic), or only say what
    /// would change (`dry_run`).
    Apply {
        /// The file the declarations come from, for messages.
        file: String,
        /// Only say what would change.
        #[serde(default)]
        dry_run: bool,
        /// The file's entries, in order.
        declarations: Vec<FileDeclaration>,
    },
    /// The live flows of remote clients (at most `limit`, those `filter` keeps) and how
    /// full the flow tables are.
    Flows {
        /// Which flows; all if absent.
        #[serde(default)]
        filter: Option<crate::flows::FlowFilter>,
        /// The most flows listed.
        #[serde(default = "default_flow_limit")]
        limit: u32,
    },
    /// What the ingress program does with one packet (BPF_PROG_RUN on a private copy).
    Trace {
        /// The packet.
        query: crate::trace::TraceQuery,
    },
}

fn default_flow_limit() -> u32 {
    crate::flows::DEFAULT_FLOW_LIMIT
}

/// Parses one request line; the error is the one line to answer.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    serde_json::from_slice(line).map_err(|e| format!("invalid request: {e}"))
}

impl Request {
    /// Whether the request only reads (what a `--socket-read-group` peer may send).
    /// Every request is named here, so a new one has to be classified.
    pub fn is_read_only(&self) -> bool {
        match self {
            Request::List | Request::Flows { .. } | Request::Trace { .. } => true,
            Request::Add { .. } | Request::Del { .. } | Request::Apply { .. } => false,
        }
    }
}

/// One entry of a declarations file, as the client parsed it. The daemon pairs and
/// validates it again ([`crate::rule::Declaration::new`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDeclaration {
    /// 1-based line of the entry in the file.
    pub line: u32,
    /// The entry as written (a `ports` string, or the long form's table).
    pub entry: String,
    /// What to publish.
    pub publish: PublishSpec,
    /// Where it goes.
    pub backend: Backend,
}

/// Who a runtime rule belongs to: a plugin's name for itself and its instance, such as
/// `docker:4711` (`portfwd-docker-proxy`, pid 4711). 1 to [`Owner::MAX_LEN`] printable
/// ASCII characters, no spaces; checked on arrival like every other field.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Owner(String);

/// Why an owner name was refused.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error(
    "invalid owner `{owner}`: expected 1 to {max} printable ASCII characters without spaces",
    max = Owner::MAX_LEN
)]
pub struct OwnerError {
    /// The name as given.
    pub owner: String,
}

impl Owner {
    /// The longest owner name.
    pub const MAX_LEN: usize = 128;

    /// Validates and builds.
    pub fn new(name: &str) -> Result<Self, OwnerError> {
        let ok =
            (1..=Self::MAX_LEN).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_graphic());
        if ok {
            Ok(Self(name.to_string()))
        } else {
            Err(OwnerError {
                owner: name.to_string(),
            })
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Owner {
    type Err = OwnerError;
    fn from_str(s: &str) -> Result<Self, OwnerError> {
        Self::new(s)
    }
}

impl TryFrom<String> for Owner {
    type Error = OwnerError;
    fn try_from(s: String) -> Result<Self, OwnerError> {
        Self::new(&s)
    }
}

impl From<Owner> for String {
    fn from(o: Owner) -> String {
        o.0
    }
}

/// Where a rule came from: `portfwd-ctl add` (runtime) or a declarations file
/// (`portfwd --config`, `portfwd-ctl apply`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `portfwd-ctl add`.
    #[default]
    Cli,
    /// A declarations file.
    File,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Source::Cli => "cli",
            Source::File => "file",
        })
    }
}

/// The answer to `add` (the rule now published) and `del` (the rule removed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleReply {
    /// What is published.
    pub publish: Publish,
    /// Where it goes.
    pub backend: Backend,
}

impl std::fmt::Display for RuleReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} -> {}", self.publish, self.backend)
    }
}

/// The answer to `apply`: the difference between the rule set before and after (or, on
/// a dry run, what it would be). A rule whose backend changed is removed and added.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyReply {
    /// Whether this is a dry run (nothing changed).
    pub dry_run: bool,
    /// Rules published.
    pub added: Vec<RuleReply>,
    /// Rules unpublished.
    pub removed: Vec<RuleReply>,
    /// Rules the file still declares, left as they were.
    pub unchanged: Vec<RuleReply>,
}

/// The answer to `list`; also what `portfwd-ctl list --json` prints.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ListReply {
    /// Every rule with its counters.
    pub rules: Vec<RuleStatus>,
    /// The interfaces the programs are attached to.
    pub interfaces: Vec<Attachment>,
    /// Interfaces where NAT64's entry program runs at TC ingress (attached for IPv6
    /// rules with IPv4-only backends: their backends' interfaces, XDP interfaces).
    #[serde(default)]
    pub nat64_entries: Vec<String>,
    /// Packet counts by [`portfwd_common::Reason::name`].
    pub reasons: BTreeMap<String, u64>,
    /// Whether local clients (the host's own processes, containers calling the host's
    /// address) are served by the socket hooks, and for which cgroup.
    #[serde(default)]
    pub local_clients: LocalClients,
}

/// `list`'s view of the socket hooks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalClients {
    /// Whether local clients are served.
    pub served: bool,
    /// The cgroup v2 whose processes are served (and the ones below it).
    pub cgroup: Option<String>,
}

/// One published rule (a range is one rule) and its counters (summed over CPUs and over
/// the range's ports: they share one counter slot).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleStatus {
    /// `*` (both families), an address, or a family's wildcard.
    pub host_ip: Host,
    /// The first host port; `host_port_end` is the last (equal for a single port).
    pub host_port: u16,
    /// The last host port.
    #[serde(default)]
    pub host_port_end: u16,
    /// The protocol.
    pub proto: Proto,
    /// The backend's first address (IPv4 if it has one).
    pub backend_ip: IpAddr,
    /// A dual-stack backend's IPv6 address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_ip6: Option<Ipv6Addr>,
    /// The first backend port; `backend_port_end` is the last.
    pub backend_port: u16,
    /// The last backend port.
    #[serde(default)]
    pub backend_port_end: u16,
    /// `cli` (portfwd-ctl add) or `file` (a declarations file).
    #[serde(default)]
    pub source: Source,
    /// The plugin a runtime rule belongs to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
    /// Client-to-backend packets and bytes translated at ingress.
    pub packets: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Backend-to-client packets and bytes translated back.
    pub reply_packets: u64,
    /// Their bytes.
    pub reply_bytes: u64,
    /// Local clients served at the socket.
    pub local: u64,
}

/// `publish` as it travels: strings and numbers, checked by [`Publish::new`] on arrival.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishWire {
    #[serde(default = "wildcard")]
    host_ip: String,
    /// 0 (or absent): any free port, in `add` only.
    #[serde(default)]
    host_port: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    host_port_end: Option<u64>,
    #[serde(default = "tcp")]
    proto: String,
}

fn wildcard() -> String {
    Host::Any.to_string()
}
fn tcp() -> String {
    Proto::Tcp.to_string()
}

fn end_of(r: rule::PortRange) -> Option<u64> {
    (!r.is_single()).then_some(r.end().into())
}

impl TryFrom<PublishWire> for Publish {
    type Error = RuleError;
    fn try_from(w: PublishWire) -> Result<Self, RuleError> {
        let host = rule::parse_host_text(&w.host_ip)?;
        let ports = rule::range_from_numbers(w.host_port, w.host_port_end)?;
        Publish::new(host, ports, w.proto.parse()?)
    }
}

impl TryFrom<PublishWire> for PublishSpec {
    type Error = RuleError;
    fn try_from(w: PublishWire) -> Result<Self, RuleError> {
        let host = rule::parse_host_text(&w.host_ip)?;
        let ports = match (w.host_port, w.host_port_end) {
            (0, None) => None,
            (start, end) => Some(rule::range_from_numbers(start, end)?),
        };
        // Validates the address the same way the text form does.
        let p = Publish::new(host, rule::PortRange::single(1)?, w.proto.parse()?)?;
        Ok(PublishSpec {
            host,
            ports,
            proto: p.proto(),
        })
    }
}

impl Serialize for Publish {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        PublishWire {
            host_ip: host_wire(self.host()),
            host_port: self.host_port().into(),
            host_port_end: end_of(self.ports()),
            proto: self.proto().to_string(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Publish {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = PublishWire::deserialize(d)?;
        Publish::try_from(w).map_err(serde::de::Error::custom)
    }
}

impl Serialize for PublishSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        PublishWire {
            host_ip: host_wire(self.host),
            host_port: self.ports.map_or(0, |r| r.start().into()),
            host_port_end: self.ports.and_then(end_of),
            proto: self.proto.to_string(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for PublishSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = PublishWire::deserialize(d)?;
        PublishSpec::try_from(w).map_err(serde::de::Error::custom)
    }
}

/// A host as the wire writes it: `*`, or a bare address.
fn host_wire(host: Host) -> String {
    match host {
        Host::Any => host.to_string(),
        Host::Ip(ip) => ip.to_string(),
    }
}

impl Serialize for Host {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        host_wire(*self).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Host {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        rule::parse_host_text(&text).map_err(serde::de::Error::custom)
    }
}

/// `backend` as it travels, checked by [`Backend::new`] on arrival.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendWire {
    ip: String,
    /// A dual-stack backend's IPv6 address (`ip` is then its IPv4 one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ip6: Option<String>,
    port: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    port_end: Option<u64>,
}

impl Serialize for Backend {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let addrs = self.addrs();
        let dual = addrs.v4().zip(addrs.v6());
        BackendWire {
            ip: addrs.first().to_string(),
            ip6: dual.map(|(_, v6)| v6.to_string()),
            port: self.port().into(),
            port_end: end_of(self.ports()),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Backend {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = BackendWire::deserialize(d)?;
        let check = || -> Result<Backend, RuleError> {
            let mut addrs = Addrs::new(rule::parse_ip(&w.ip)?)?;
            if let Some(ip6) = &w.ip6 {
                match rule::parse_ip(ip6)? {
                    ip @ IpAddr::V6(_) if addrs.v6().is_none() => addrs = addrs.with(ip)?,
                    more => return Err(RuleError::BackendFamilies { addrs, more }),
                }
            }
            Ok(Backend::with_addrs(
                addrs,
                rule::range_from_numbers(w.port, w.port_end)?,
            ))
        };
        check().map_err(serde::de::Error::custom)
    }
}

#[derive(Serialize)]
struct OkEnvelope<'a, T> {
    ok: bool,
    #[serde(flatten)]
    body: &'a T,
}

#[derive(Serialize, Deserialize)]
struct ErrEnvelope {
    ok: bool,
    error: String,
}

/// Makes `msg` one line (the protocol promises one-line errors).
pub fn one_line(msg: &str) -> String {
    msg.split(['\n', '\r'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A success response line, `\n` included.
pub fn encode_ok<T: Serialize>(body: &T) -> Vec<u8> {
    let mut line = serde_json::to_vec(&OkEnvelope { ok: true, body })
        // Our reply types always serialize (string keys, no non-finite floats).
        .unwrap_or_else(|e| encode_err(&format!("cannot encode the response: {e}")));
    if line.last() != Some(&b'\n') {
        line.push(b'\n');
    }
    line
}

/// An error response line, `\n` included.
pub fn encode_err(msg: &str) -> Vec<u8> {
    let env = ErrEnvelope {
        ok: false,
        error: one_line(msg),
    };
    let mut line = serde_json::to_vec(&env)
        .unwrap_or_else(|_| br#"{"ok":false,"error":"internal error"}"#.to_vec());
    line.push(b'\n');
    line
}

/// What can go wrong talking to the daemon (client side).
#[derive(Debug, Error)]
pub enum ClientError {
    /// The daemon's socket cannot be connected to.
    #[error("cannot reach the portfwd daemon at {} (is portfwd running?)", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The socket file's mode keeps this user out (the daemon admits root and the
    /// groups given to its `--socket-group` and `--socket-read-group`).
    #[error(
        "permission denied: cannot connect to the portfwd daemon at {} \
         (it admits root and the groups of its --socket-group and --socket-read-group)",
        path.display()
    )]
    Denied {
        /// The socket.
        path: PathBuf,
    },
    /// The connection failed midway.
    #[error("lost the connection to the portfwd daemon at {}", path.display())]
    Io {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The daemon closed the connection without answering.
    #[error("the portfwd daemon closed the connection without answering")]
    NoResponse,
    /// The answer is not a valid response (or the request could not be encoded).
    #[error("the portfwd daemon sent an invalid response")]
    BadResponse(#[source] serde_json::Error),
    /// The daemon refused the request; the message is the daemon's, verbatim.
    #[error("{0}")]
    Refused(String),
}

/// How long the client waits for the daemon's answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends one request to the daemon at `socket` and decodes its answer as `T`.
pub fn call<T: DeserializeOwned>(socket: &Path, req: &Request) -> Result<T, ClientError> {
    let io_err = |source| ClientError::Io {
        path: socket.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| {
        let path = socket.to_path_buf();
        match source.kind() {
            io::ErrorKind::PermissionDenied => ClientError::Denied { path },
            _ => ClientError::Connect { path, source },
        }
    })?;
    stream
        .set_read_timeout(Some(CLIENT_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(CLIENT_TIMEOUT)))
        .map_err(io_err)?;
    let mut line = serde_json::to_vec(req).map_err(ClientError::BadResponse)?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io_err)?;
    let mut reply = Vec::new();
    BufReader::new(&stream)
        .read_until(b'\n', &mut reply)
        .map_err(io_err)?;
    decode(&reply)
}

/// Decodes one response line.
pub fn decode<T: DeserializeOwned>(line: &[u8]) -> Result<T, ClientError> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Err(ClientError::NoResponse);
    }
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(ClientError::BadResponse)?;
    if value.get("ok") == Some(&serde_json::Value::Bool(true)) {
        serde_json::from_value(value).map_err(ClientError::BadResponse)
    } else {
        let env: ErrEnvelope = serde_json::from_value(value).map_err(ClientError::BadResponse)?;
        Err(ClientError::Refused(env.error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Request, String> {
        serde_json::from_str(s).map_err(|e| e.to_string())
    }

    #[test]
    fn requests_round_trip() {
        let add = Request::Add {
            publish: "198.51.100.7:9000/udp".parse().expect("valid"),
            backend: "172.17.0.2:53".parse().expect("valid"),
            owner: None,
            reservation_ok: false,
        };
        let range = Request::Add {
            publish: "9000-9009".parse().expect("valid"),
            backend: "172.17.0.2:8000-8009".parse().expect("valid"),
            owner: None,
            reservation_ok: false,
        };
        let json = serde_json::to_string(&range).expect("encodes");
        assert_eq!(
            json,
            r#"{"cmd":"add","publish":{"host_ip":"*","host_port":9000,"host_port_end":9009,"proto":"tcp"},"backend":{"ip":"172.17.0.2","port":8000,"port_end":8009}}"#
        );
        assert_eq!(parse(&json), Ok(range));
        // No host port: any free one.
        let any = parse(
            r#"{"cmd":"add","publish":{"host_ip":"::1"},"backend":{"ip":"2001:db8::2","port":80}}"#,
        )
        .expect("valid");
        assert_eq!(
            any,
            Request::Add {
                publish: "[::1]:".parse().expect("valid"),
                backend: "[2001:db8::2]:80".parse().expect("valid"),
                owner: None,
                reservation_ok: false,
            }
        );
        let apply = Request::Apply {
            file: "ports.toml".into(),
            dry_run: true,
            declarations: vec![FileDeclaration {
                line: 3,
                entry: "9000:8080".into(),
                publish: "9000".parse().expect("valid"),
                backend: "172.17.0.2:8080".parse().expect("valid"),
            }],
        };
        let json = serde_json::to_string(&apply).expect("encodes");
        assert_eq!(parse(&json), Ok(apply));
        let json = serde_json::to_string(&add).expect("encodes");
        assert_eq!(
            json,
            r#"{"cmd":"add","publish":{"host_ip":"198.51.100.7","host_port":9000,"proto":"udp"},"backend":{"ip":"172.17.0.2","port":53}}"#
        );
        assert_eq!(parse(&json), Ok(add));
        assert_eq!(parse(r#"{"cmd":"list"}"#), Ok(Request::List));
        assert_eq!(
            parse(r#"{"cmd":"del","publish":{"host_port":9000}}"#),
            Ok(Request::Del {
                publish: "9000".parse().expect("valid"),
                owner: None
            })
        );
        assert_eq!(
            parse(r#"{"cmd":"del","publish":{"host_port":9000,"proto":"UDP"}}"#),
            Ok(Request::Del {
                publish: "9000/udp".parse().expect("valid"),
                owner: None
            })
        );
    }

    #[test]
    fn owners() {
        let add = parse(
            r#"{"cmd":"add","publish":{"host_ip":"::","host_port":9000},"backend":{"ip":"172.17.0.2","port":8080},"owner":"docker:4711"}"#,
        )
        .expect("valid");
        let Request::Add { owner, .. } = &add else {
            panic!("{add:?}")
        };
        assert_eq!(owner.as_ref().map(Owner::as_str), Some("docker:4711"));
        let json = serde_json::to_string(&add).expect("encodes");
        assert!(json.ends_with(r#","owner":"docker:4711"}"#), "{json}");
        assert_eq!(parse(&json), Ok(add));
        assert_eq!(
            parse(r#"{"cmd":"del","publish":{"host_port":9000},"owner":"cni:eth0"}"#),
            Ok(Request::Del {
                publish: "9000".parse().expect("valid"),
                owner: Some(Owner::new("cni:eth0").expect("valid")),
            })
        );
        let long = "x".repeat(Owner::MAX_LEN + 1);
        for bad in ["", "two words", "tab\there", "é", long.as_str()] {
            let err = Owner::new(bad).expect_err(bad).to_string();
            assert!(err.starts_with(&format!("invalid owner `{bad}`")), "{err}");
            let json = serde_json::json!({"cmd":"del","publish":{"host_port":9000},"owner":bad});
            let err = parse(&json.to_string()).expect_err(bad);
            assert!(err.contains("invalid owner"), "{err}");
        }
        assert!(Owner::new(&"x".repeat(Owner::MAX_LEN)).is_ok());
    }

    #[test]
    fn requests_are_revalidated() {
        let table = [
            (
                r#"{"cmd":"del","publish":{"host_port":0}}"#,
                "invalid port `0`",
            ),
            (
                r#"{"cmd":"del","publish":{"host_port":70000}}"#,
                "invalid port `70000`",
            ),
            (
                r#"{"cmd":"del","publish":{"host_port":-1}}"#,
                "invalid value",
            ),
            (
                r#"{"cmd":"del","publish":{"host_port":"80"}}"#,
                "invalid type",
            ),
            (
                r#"{"cmd":"del","publish":{"host_port":80,"proto":"icmp"}}"#,
                "unknown protocol `icmp`",
            ),
            (
                r#"{"cmd":"del","publish":{"host_ip":"1.2.3","host_port":80}}"#,
                "invalid IP address `1.2.3`",
            ),
            (
                r#"{"cmd":"del","publish":{"host_ip":"224.0.0.1","host_port":80}}"#,
                "224.0.0.1 cannot be a host address",
            ),
            (
                r#"{"cmd":"del","publish":{"host_port":9009,"host_port_end":9000}}"#,
                "invalid port range `9009-9000`",
            ),
            (
                r#"{"cmd":"add","publish":{"host_port":80},"backend":{"ip":"10.0.0.1","port":65535,"port_end":65536}}"#,
                "goes past 65535",
            ),
            (
                r#"{"cmd":"add","publish":{"host_port":80,"proto":"sctp"},"backend":{"ip":"10.0.0.1","port":80}}"#,
                "`sctp` is not supported",
            ),
            (
                r#"{"cmd":"apply","file":"f","declarations":[{"line":1,"entry":"x","publish":{"host_port":80},"backend":{"ip":"::","port":80}}]}"#,
                ":: cannot be a backend",
            ),
            (
                r#"{"cmd":"del","publish":{"host_port":80,"extra":1}}"#,
                "unknown field `extra`",
            ),
            (
                r#"{"cmd":"add","publish":{"host_port":80},"backend":{"ip":"127.0.0.1","port":80}}"#,
                "127.0.0.1 cannot be a backend",
            ),
            (
                r#"{"cmd":"add","publish":{"host_port":80},"backend":{"ip":"0.0.0.0","port":80}}"#,
                "0.0.0.0 cannot be a backend",
            ),
            (
                r#"{"cmd":"add","publish":{"host_port":80},"backend":{"ip":"10.0.0.1","port":0}}"#,
                "invalid port `0`",
            ),
            (
                r#"{"cmd":"add","publish":{"host_port":80}}"#,
                "missing field `backend`",
            ),
            (r#"{"cmd":"frobnicate"}"#, "unknown variant `frobnicate`"),
            (r#"{"publish":{"host_port":80}}"#, "missing field `cmd`"),
            (r#"{"cmd":"list""#, "EOF"),
            ("\u{0}\u{1}garbage", "expected value"),
            ("[]", "missing field `cmd`"),
            ("42", "invalid type"),
        ];
        for (json, want) in table {
            let err = parse(json).expect_err(json);
            assert!(err.contains(want), "{json}: {err}");
        }
    }

    #[test]
    fn responses() {
        let reply = RuleReply {
            publish: "9000".parse().expect("valid"),
            backend: "172.17.0.2:8080".parse().expect("valid"),
        };
        let line = encode_ok(&reply);
        assert_eq!(
            std::str::from_utf8(&line).expect("utf-8"),
            "{\"ok\":true,\"publish\":{\"host_ip\":\"*\",\"host_port\":9000,\"proto\":\"tcp\"},\"backend\":{\"ip\":\"172.17.0.2\",\"port\":8080}}\n"
        );
        assert_eq!(decode::<RuleReply>(&line).expect("decodes"), reply);

        let line = encode_err("Bind for *:9000 failed:\nport is already allocated");
        assert_eq!(
            line,
            b"{\"ok\":false,\"error\":\"Bind for *:9000 failed: port is already allocated\"}\n"
        );
        match decode::<RuleReply>(&line) {
            Err(ClientError::Refused(msg)) => {
                assert_eq!(msg, "Bind for *:9000 failed: port is already allocated")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decode::<RuleReply>(b""),
            Err(ClientError::NoResponse)
        ));
        assert!(matches!(
            decode::<RuleReply>(b"{\"ok\":true}"),
            Err(ClientError::BadResponse(_))
        ));
    }

    #[test]
    fn list_json_field_names() {
        let reply = ListReply {
            rules: vec![RuleStatus {
                host_ip: Host::Any,
                host_port: 9000,
                host_port_end: 9009,
                proto: Proto::Tcp,
                backend_ip: std::net::Ipv4Addr::new(172, 17, 0, 2).into(),
                backend_ip6: None,
                backend_port: 8080,
                backend_port_end: 8089,
                source: Source::File,
                owner: None,
                packets: 1,
                bytes: 2,
                reply_packets: 3,
                reply_bytes: 4,
                local: 5,
            }],
            interfaces: vec![],
            nat64_entries: vec!["br0".into()],
            reasons: [("translated".to_string(), 7)].into_iter().collect(),
            local_clients: LocalClients {
                served: true,
                cgroup: Some("/sys/fs/cgroup".into()),
            },
        };
        let v = serde_json::to_value(&reply).expect("encodes");
        assert_eq!(
            v,
            serde_json::json!({
                "rules": [{"host_ip":"*","host_port":9000,"host_port_end":9009,"proto":"tcp",
                           "backend_ip":"172.17.0.2","backend_port":8080,"backend_port_end":8089,
                           "source":"file",
                           "packets":1,"bytes":2,"reply_packets":3,"reply_bytes":4,"local":5}],
                "interfaces": [],
                "nat64_entries": ["br0"],
                "reasons": {"translated": 7},
                "local_clients": {"served": true, "cgroup": "/sys/fs/cgroup"},
            })
        );
    }
}
