//! `portfwd-cni`: a chained CNI plugin that publishes a container's ports through
//! portfwd, in place of `portmap` (CNI spec 1.0.0, 0.4.0 and 0.3.x; CHECK from 0.4.0).
//!
//! The runtime (podman's CNI backend, containerd's CRI) runs it after the plugin that
//! gave the container its addresses (`bridge` + `host-local`), with
//! `"capabilities": {"portMappings": true}` in the conflist, so each `-p` (a Kubernetes
//! `hostPort`) arrives in `runtimeConfig.portMappings`, ranges as one entry per port:
//!
//! - ADD publishes each mapping (`hostIP`, `hostPort`, `containerPort`, `protocol`) to
//!   the container's addresses from `prevResult.ips` (the ones on the container's side:
//!   the first IPv4 and the first IPv6 one), as rules owned by
//!   `cni:<CNI_CONTAINERID>/<CNI_IFNAME>` and marked `reservation_ok` (the runtime's
//!   conmon then holds the host ports with idle sockets; see the protocol). It first
//!   removes that owner's rules, so an ADD run again (`podman network reload`) replaces
//!   them; if one mapping is refused (a port another container publishes), the rules it
//!   added are removed again and nothing else is touched. On success `prevResult` is
//!   printed unchanged.
//! - DEL removes exactly that owner's rules; nothing to remove (or no daemon, which
//!   then holds no rule) is success.
//! - CHECK fails if a mapping has no rule of that owner with the container's address.
//! - VERSION lists the spec versions.
//!
//! Failures print CNI's error object (`{"cniVersion","code","msg","details"}`) on stdout
//! and exit 1; nothing is changed by a request that fails to parse. The daemon's socket
//! is the network config's `"socket"`, by default `/run/portfwd/portfwd.sock`.

use std::{
    io::Read,
    net::IpAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};

use portfwd::{
    protocol::{self, ClientError, ListReply, Owner, Request, RuleReply, DEFAULT_SOCKET},
    rule::{Addrs, Backend, Declaration, Host, PortRange, Proto, Publish, PublishSpec},
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The spec versions this plugin speaks.
const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
/// The newest, used when the request names none.
const LATEST: &str = "1.0.0";

/// CNI's well-known error codes (spec, "Error") and ours (100 and up).
mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// The portfwd daemon refused a mapping (the port is taken).
    pub const REFUSED: u32 = 100;
    /// CHECK: a mapping has no rule.
    pub const MISSING_RULE: u32 = 101;
}

/// The network config on stdin (fields other plugins use are ignored).
#[derive(Debug, Deserialize)]
struct NetConf {
    #[serde(rename = "cniVersion")]
    cni_version: String,
    #[serde(default)]
    name: String,
    /// The daemon's control socket.
    #[serde(default)]
    socket: Option<PathBuf>,
    #[serde(default, rename = "runtimeConfig")]
    runtime_config: RuntimeConfig,
    #[serde(default, rename = "prevResult")]
    prev_result: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
struct RuntimeConfig {
    #[serde(default, rename = "portMappings")]
    port_mappings: Vec<PortMapping>,
}

/// One `-p`, as the runtime passes it.
#[derive(Debug, Deserialize)]
struct PortMapping {
    #[serde(rename = "hostPort")]
    host_port: u16,
    #[serde(rename = "containerPort")]
    container_port: u16,
    #[serde(default)]
    protocol: String,
    #[serde(default, rename = "hostIP")]
    host_ip: String,
}

/// The parts of a previous result this plugin reads.
#[derive(Debug, Default, Deserialize)]
struct PrevResult {
    #[serde(default)]
    interfaces: Vec<Interface>,
    #[serde(default)]
    ips: Vec<IpConfig>,
}

#[derive(Debug, Deserialize)]
struct Interface {
    #[serde(default)]
    sandbox: String,
}

#[derive(Debug, Deserialize)]
struct IpConfig {
    address: String,
    #[serde(default)]
    interface: Option<usize>,
}

/// CNI's error object.
#[derive(Debug, Serialize)]
struct CniError {
    #[serde(rename = "cniVersion")]
    cni_version: String,
    code: u32,
    msg: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            cni_version: LATEST.to_string(),
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }
    fn details(mut self, details: impl Into<String>) -> Self {
        self.details = protocol::one_line(&details.into());
        self
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(out) => {
            if let Some(out) = out {
                println!("{out}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let json = serde_json::to_string(&e).unwrap_or_else(|_| {
                format!(
                    r#"{{"cniVersion":"{LATEST}","code":{},"msg":"error"}}"#,
                    e.code
                )
            });
            println!("{json}");
            eprintln!("portfwd-cni: {}: {}", e.msg, e.details);
            ExitCode::FAILURE
        }
    }
}

/// Runs the command; the JSON to print on success.
fn run() -> Result<Option<String>, CniError> {
    let command = env("CNI_COMMAND")?;
    let mut stdin = Vec::new();
    std::io::stdin().read_to_end(&mut stdin).map_err(|e| {
        CniError::new(code::IO, "cannot read the network config").details(e.to_string())
    })?;
    if command == "VERSION" {
        return Ok(Some(version(&stdin)));
    }
    let conf: NetConf = serde_json::from_slice(&stdin).map_err(|e| {
        CniError::new(code::DECODE, "cannot decode the network config").details(e.to_string())
    })?;
    let with_version = |mut e: CniError| {
        e.cni_version = conf.cni_version.clone();
        e
    };
    if !SUPPORTED.contains(&conf.cni_version.as_str()) {
        return Err(with_version(
            CniError::new(code::INCOMPATIBLE_VERSION, "incompatible CNI version").details(format!(
                "{} (supported: {})",
                conf.cni_version,
                SUPPORTED.join(", ")
            )),
        ));
    }
    let owner = owner().map_err(with_version)?;
    let socket = conf
        .socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    match command.as_str() {
        "ADD" => add(&conf, &owner, &socket).map(Some),
        "DEL" => del(&owner, &socket).map(|()| None),
        "CHECK" => {
            if conf.cni_version.starts_with("0.3.") {
                return Err(with_version(
                    CniError::new(code::INCOMPATIBLE_VERSION, "CHECK needs CNI 0.4.0 or later")
                        .details(conf.cni_version.clone()),
                ));
            }
            check(&conf, &owner, &socket).map(|()| None)
        }
        other => Err(CniError::new(code::INVALID_ENV, "unknown CNI_COMMAND").details(other)),
    }
    .map_err(with_version)
}

fn env(name: &str) -> Result<String, CniError> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| CniError::new(code::INVALID_ENV, format!("{name} is not set")))
}

/// `cni:<CNI_CONTAINERID>/<CNI_IFNAME>`.
fn owner() -> Result<Owner, CniError> {
    let name = format!("cni:{}/{}", env("CNI_CONTAINERID")?, env("CNI_IFNAME")?);
    Owner::new(&name).map_err(|e| {
        CniError::new(code::INVALID_ENV, "invalid container id or interface name")
            .details(e.to_string())
    })
}

/// VERSION's answer, in the version asked for if it is one of ours.
fn version(stdin: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Asked {
        #[serde(rename = "cniVersion")]
        cni_version: String,
    }
    let asked = serde_json::from_slice::<Asked>(stdin)
        .ok()
        .map(|a| a.cni_version)
        .filter(|v| SUPPORTED.contains(&v.as_str()))
        .unwrap_or_else(|| LATEST.to_string());
    serde_json::json!({ "cniVersion": asked, "supportedVersions": SUPPORTED }).to_string()
}

/// The container's first IPv4 and first IPv6 address, from the previous result (those on
/// an interface inside the container when interfaces are given).
fn container_addrs(prev: &Value) -> Result<Addrs, CniError> {
    let prev: PrevResult = serde_json::from_value(prev.clone()).map_err(|e| {
        CniError::new(code::DECODE, "cannot decode prevResult").details(e.to_string())
    })?;
    let inside = |ip: &IpConfig| match ip.interface {
        Some(i) => prev
            .interfaces
            .get(i)
            .is_none_or(|itf| !itf.sandbox.is_empty()),
        None => true,
    };
    let mut ips: Vec<IpAddr> = Vec::new();
    for ip in prev.ips.iter().filter(|ip| inside(ip)) {
        let addr = ip.address.split('/').next().unwrap_or_default();
        let addr: IpAddr = addr.parse().map_err(|_| {
            CniError::new(code::DECODE, "invalid address in prevResult").details(&ip.address)
        })?;
        if !ips.iter().any(|have| have.is_ipv4() == addr.is_ipv4()) {
            ips.push(addr);
        }
    }
    if ips.is_empty() {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "prevResult gives the container no address",
        ));
    }
    Addrs::from_list(&ips).map_err(|e| {
        CniError::new(code::INVALID_CONFIG, "invalid container addresses").details(e.to_string())
    })
}

/// The rule each port mapping stands for.
fn declarations(conf: &NetConf) -> Result<Vec<Declaration>, CniError> {
    let Some(prev) = &conf.prev_result else {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "portfwd-cni is a chained plugin: no prevResult",
        )
        .details(format!(
            "network {}: put it after the plugin that gives the container its address",
            conf.name
        )));
    };
    let addrs = container_addrs(prev)?;
    conf.runtime_config
        .port_mappings
        .iter()
        .map(|m| declaration(m, addrs))
        .collect()
}

fn declaration(m: &PortMapping, addrs: Addrs) -> Result<Declaration, CniError> {
    let bad = |e: String| {
        CniError::new(code::INVALID_CONFIG, "invalid port mapping").details(format!(
            "{}:{}:{}/{}: {e}",
            m.host_ip, m.host_port, m.container_port, m.protocol
        ))
    };
    let proto: Proto = if m.protocol.is_empty() {
        Proto::Tcp
    } else {
        m.protocol
            .parse()
            .map_err(|e: portfwd::rule::RuleError| bad(e.to_string()))?
    };
    let host = match m.host_ip.as_str() {
        "" => Host::Any,
        ip => Host::Ip(
            ip.parse()
                .map_err(|_| bad(format!("invalid hostIP `{ip}`")))?,
        ),
    };
    // An address of the host's family; an IPv6 host address with an IPv4-only
    // container is served by NAT64.
    let to = match host {
        Host::Ip(IpAddr::V4(_)) => match addrs.v4() {
            Some(v4) => Addrs::new(IpAddr::V4(v4)),
            None => return Err(bad("the container has no IPv4 address".into())),
        },
        Host::Ip(IpAddr::V6(_)) => Addrs::new(addrs.v6().map_or(addrs.first(), IpAddr::V6)),
        Host::Any => Ok(addrs),
    }
    .map_err(|e| bad(e.to_string()))?;
    let spec = PublishSpec {
        host,
        ports: Some(PortRange::single(m.host_port).map_err(|e| bad(e.to_string()))?),
        proto,
    };
    let backend = Backend::with_addrs(
        to,
        PortRange::single(m.container_port).map_err(|e| bad(e.to_string()))?,
    );
    Declaration::new(spec, backend).map_err(|e| bad(e.to_string()))
}

/// A failed call to the daemon, as a CNI error.
fn daemon_error(what: String, e: ClientError) -> CniError {
    let code = match e {
        ClientError::Refused(_) => code::REFUSED,
        _ => code::TRY_AGAIN_LATER,
    };
    CniError::new(code, what).details(e.to_string())
}

/// The rules of `owner`.
fn owned(socket: &Path, owner: &Owner) -> Result<Vec<Publish>, ClientError> {
    let list: ListReply = protocol::call(socket, &Request::List)?;
    Ok(list
        .rules
        .iter()
        .filter(|r| r.owner.as_ref() == Some(owner))
        .filter_map(|r| {
            let ports = PortRange::new(r.host_port, r.host_port_end.max(r.host_port)).ok()?;
            Publish::new(r.host_ip, ports, r.proto).ok()
        })
        .collect())
}

/// Removes every rule of `owner`.
fn remove_owned(socket: &Path, owner: &Owner) -> Result<(), ClientError> {
    for publish in owned(socket, owner)? {
        let req = Request::Del {
            publish,
            owner: Some(owner.clone()),
        };
        let gone: RuleReply = protocol::call(socket, &req)?;
        eprintln!("portfwd-cni: {owner}: unpublished {gone}");
    }
    Ok(())
}

fn add(conf: &NetConf, owner: &Owner, socket: &Path) -> Result<String, CniError> {
    let decls = declarations(conf)?;
    // Checked before anything changes: the output is prevResult, unchanged.
    let out = serde_json::to_string(conf.prev_result.as_ref().unwrap_or(&Value::Null))
        .map_err(|e| CniError::new(code::IO, "cannot encode the result").details(e.to_string()))?;
    remove_owned(socket, owner)
        .map_err(|e| daemon_error(format!("cannot replace the rules of {owner}"), e))?;
    for decl in &decls {
        let req = Request::Add {
            publish: decl.spec(),
            backend: decl.backend(),
            owner: Some(owner.clone()),
            reservation_ok: true,
        };
        match protocol::call::<RuleReply>(socket, &req) {
            Ok(r) => eprintln!("portfwd-cni: {owner}: published {r}"),
            Err(e) => {
                // Only this owner's rules: another container's stay as they are.
                if let Err(undo) = remove_owned(socket, owner) {
                    eprintln!("portfwd-cni: {owner}: cannot remove the rules added: {undo}");
                }
                return Err(daemon_error(format!("cannot publish {decl}"), e));
            }
        }
    }
    Ok(out)
}

fn del(owner: &Owner, socket: &Path) -> Result<(), CniError> {
    match remove_owned(socket, owner) {
        Ok(()) => Ok(()),
        // No daemon, no rules of it: DEL has nothing to do.
        Err(ClientError::Connect { .. }) => {
            eprintln!(
                "portfwd-cni: {owner}: no portfwd daemon at {}: nothing to remove",
                socket.display()
            );
            Ok(())
        }
        Err(e) => Err(daemon_error(
            format!("cannot remove the rules of {owner}"),
            e,
        )),
    }
}

fn check(conf: &NetConf, owner: &Owner, socket: &Path) -> Result<(), CniError> {
    let decls = declarations(conf)?;
    let list: ListReply = protocol::call(socket, &Request::List)
        .map_err(|e| daemon_error("cannot list the rules".into(), e))?;
    for decl in &decls {
        let backend = decl.backend();
        let spec = decl.spec();
        let found = list.rules.iter().any(|r| {
            r.owner.as_ref() == Some(owner)
                && r.host_ip == spec.host
                && Some(r.host_port) == spec.ports.map(|p| p.start())
                && r.proto == spec.proto
                && r.backend_port == backend.port()
                && r.backend_ip == backend.addrs().first()
                && r.backend_ip6 == backend.addrs().v4().and(backend.addrs().v6())
        });
        if !found {
            return Err(
                CniError::new(code::MISSING_RULE, format!("no rule publishes {decl}"))
                    .details(format!("expected a rule of {owner}")),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mapping(host_ip: &str, proto: &str) -> PortMapping {
        serde_json::from_value(json!({
            "hostPort": 9000, "containerPort": 80, "protocol": proto, "hostIP": host_ip
        }))
        .expect("mapping")
    }

    #[test]
    fn container_addresses_are_the_sandbox_ones_first_of_each_family() {
        let prev = json!({
            "interfaces": [{"name": "cni0"}, {"name": "eth0", "sandbox": "/run/netns/x"}],
            "ips": [
                {"address": "10.88.0.1/16", "interface": 0},
                {"address": "10.88.0.7/16", "interface": 1},
                {"address": "10.88.0.8/16", "interface": 1},
                {"address": "fd00::7/64", "interface": 1}
            ]
        });
        let a = container_addrs(&prev).expect("addresses");
        assert_eq!(a.v4(), Some("10.88.0.7".parse().expect("ip")));
        assert_eq!(a.v6(), Some("fd00::7".parse().expect("ip")));
        // Without interfaces, every address counts.
        let a = container_addrs(&json!({"ips": [{"address": "10.88.0.9/16"}]})).expect("one");
        assert_eq!(a.first(), "10.88.0.9".parse::<IpAddr>().expect("ip"));
        assert_eq!(
            container_addrs(&json!({"ips": []})).expect_err("none").code,
            7
        );
        let bad = json!({"ips": [{"address": "nonsense"}]});
        assert_eq!(container_addrs(&bad).expect_err("bad").code, 6);
    }

    #[test]
    fn mappings_become_rules_of_the_host_address_family() {
        let dual = Addrs::from_list(&[
            "10.88.0.7".parse().expect("ip"),
            "fd00::7".parse().expect("ip"),
        ])
        .expect("dual");
        let v4only = Addrs::new("10.88.0.7".parse().expect("ip")).expect("v4");
        let show = |m: &PortMapping, a: Addrs| declaration(m, a).map(|d| d.to_string());
        assert!(show(&mapping("", "tcp"), dual)
            .expect("any")
            .starts_with("*:9000/tcp"));
        let d = declaration(&mapping("", "UDP"), dual).expect("udp");
        assert_eq!(d.proto(), Proto::Udp);
        assert_eq!(d.backend().addrs(), dual);
        let d = declaration(&mapping("127.0.0.1", ""), dual).expect("v4 host");
        assert_eq!(d.backend().addrs(), v4only);
        // An IPv6 host address: the container's IPv6 address, or NAT64 to its IPv4 one.
        let d = declaration(&mapping("::", "tcp"), dual).expect("v6 host");
        assert_eq!(
            d.backend().addrs().v6(),
            Some("fd00::7".parse().expect("ip"))
        );
        let d = declaration(&mapping("::", "tcp"), v4only).expect("nat64");
        assert_eq!(d.backend().addrs(), v4only);
        let v6only = Addrs::new("fd00::7".parse().expect("ip")).expect("v6");
        assert_eq!(
            declaration(&mapping("0.0.0.0", "tcp"), v6only)
                .expect_err("no v4")
                .code,
            7
        );
        assert_eq!(
            declaration(&mapping("", "sctp"), dual)
                .expect_err("sctp")
                .code,
            7
        );
        assert_eq!(
            declaration(&mapping("nope", "tcp"), dual)
                .expect_err("ip")
                .code,
            7
        );
    }
}
