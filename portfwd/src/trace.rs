//! `portfwd-ctl trace`: what the ingress program does with one packet, answered by the
//! kernel itself. The daemon loads a private copy of the same object ([`Dataplane::load`]
//! on [`crate::dataplane::BPF_OBJECT`]), copies into it the live maps that decide the
//! verdict (rules, host addresses, published ports, config, bridge ports), builds the
//! packet (a TCP SYN or a UDP datagram, checksums complete) and runs the interface's
//! ingress program on it with BPF_PROG_RUN. The copy's reason counter and output frame
//! are the verdict; [`rules::lookup`] over the live maps supplies the words (which rule,
//! or why none) and is checked against the kernel: a disagreement is reported as a bug.
//! The live maps are only read: no live counter or flow changes. The copy is loaded per
//! trace (a fresh copy holds no flow of an earlier trace) and dropped after.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use aya::{
    maps::{Array, HashMap, MapData, MapError, PerCpuArray},
    programs::{tc::SchedClassifier, TestRun, TestRunOptions, Xdp},
    Ebpf, Pod, TestRunResult,
};
use portfwd_common::{
    csum, port_bits, programs, proto,
    rules::{self, Caller, RuleMaps},
    BackendV4, BackendV6, BridgePortKey, Config, Reason, RuleKeyV4, RuleKeyV6, BACKEND_EXPANDED,
    BRIDGE_PORTS, CONFIG, HOST_ADDRS_V4, HOST_ADDRS_V6, PUBLISHED_PORTS, REASON_STATS, RULES_V4,
    RULES_V6,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::dataplane::{Dataplane, DataplaneError, Hook};

/// The client port of a trace that names none.
pub const DEFAULT_CLIENT_PORT: u16 = 40000;

/// The packet to trace: from `client:client_port` to `host:port` over TCP (a SYN) or UDP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceQuery {
    /// The interface it arrives on; the first attached if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iface: Option<String>,
    /// The client's address.
    pub client: IpAddr,
    /// The client's port.
    pub client_port: u16,
    /// The destination (a host address).
    pub host: IpAddr,
    /// The destination port.
    pub port: u16,
    /// UDP rather than TCP.
    #[serde(default)]
    pub udp: bool,
}

/// Why a trace cannot be run.
#[derive(Debug, Error)]
pub enum TraceError {
    /// Client and destination are of different families.
    #[error("the client and the destination must be of the same family")]
    MixedFamilies,
    /// The interface is not one the programs are attached to.
    #[error("interface `{0}` has no portfwd program attached")]
    NotAttached(String),
    /// This kernel side cannot trace (no BPF).
    #[error("this daemon cannot trace packets")]
    Unsupported,
    /// The private copy cannot be loaded or filled.
    #[error("cannot prepare the trace's copy of the programs")]
    Dataplane(#[from] DataplaneError),
    /// BPF_PROG_RUN failed.
    #[error("BPF_PROG_RUN of {program} failed")]
    Run {
        /// The program.
        program: &'static str,
        /// Why.
        #[source]
        source: aya::programs::ProgramError,
    },
}

/// What the kernel did with the traced packet, and why in words.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceReply {
    /// The packet, `tcp 10.0.0.1:40000 -> 10.0.0.2:8080`.
    pub packet: String,
    /// The interface it was traced on (none attached: TC ingress, no interface).
    pub iface: Option<String>,
    /// The ingress hook that runs on it (`native XDP`, `generic XDP`, `TC ingress`).
    pub hook: String,
    /// The program run.
    pub program: String,
    /// The program's return value, in words (`pass`, `drop`, `redirect`).
    pub verdict: String,
    /// The reasons the kernel counted (the copy's counters), in counter order.
    pub reasons: Vec<String>,
    /// The rule that matched (`HOST:PORT/proto`, `*:PORT/proto` for a wildcard).
    pub rule: Option<String>,
    /// The backend the rule names.
    pub backend: Option<String>,
    /// The destination after the program (the output frame's), if it changed.
    pub rewritten: Option<String>,
    /// What happens next, or why no rule matched, in words.
    pub explanation: String,
    /// Where the rule model and the kernel disagree (a bug); none if they agree.
    pub disagreement: Option<String>,
    /// What a local client's connect()/sendmsg() to the destination would do: the
    /// model's answer (socket programs cannot be run with BPF_PROG_RUN).
    pub local: String,
    /// How long loading and filling the copy took, in milliseconds.
    pub load_ms: u64,
    /// How long the run took, in microseconds.
    pub run_us: u64,
}

impl fmt::Display for TraceReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on = self.iface.as_deref().unwrap_or("(no interface attached)");
        writeln!(f, "packet:    {}", self.packet)?;
        writeln!(f, "ingress:   {} on {} ({})", self.hook, on, self.program)?;
        writeln!(
            f,
            "verdict:   {} (counted: {})",
            self.verdict,
            if self.reasons.is_empty() {
                "nothing".to_string()
            } else {
                self.reasons.join(", ")
            }
        )?;
        match (&self.rule, &self.backend) {
            (Some(r), Some(b)) => writeln!(f, "rule:      {r} -> {b}")?,
            _ => writeln!(f, "rule:      none")?,
        }
        if let Some(to) = &self.rewritten {
            writeln!(f, "rewritten: destination {to}")?;
        }
        writeln!(f, "why:       {}", self.explanation)?;
        writeln!(f, "local:     {}", self.local)?;
        if let Some(d) = &self.disagreement {
            writeln!(f, "BUG:       the rule model and the kernel disagree: {d}")?;
        }
        Ok(())
    }
}

/// The live maps, read only, as rule matching reads them.
struct LiveRules<'a>(&'a Ebpf);

impl LiveRules<'_> {
    fn hash_get<K: Pod, V: Pod>(&self, name: &str, key: &K) -> Option<V> {
        let map: HashMap<&MapData, K, V> = HashMap::try_from(self.0.map(name)?).ok()?;
        map.get(key, 0).ok()
    }
}

impl RuleMaps for LiveRules<'_> {
    fn published(&self, port_be: [u8; 2]) -> u8 {
        self.0
            .map(PUBLISHED_PORTS)
            .and_then(|m| Array::<&MapData, u8>::try_from(m).ok())
            .and_then(|a| a.get(&u32::from(u16::from_be_bytes(port_be)), 0).ok())
            .unwrap_or(0)
    }
    fn rule_v4(&self, key: &RuleKeyV4) -> Option<BackendV4> {
        self.hash_get(RULES_V4, key)
    }
    fn rule_v6(&self, key: &RuleKeyV6) -> Option<BackendV6> {
        self.hash_get(RULES_V6, key)
    }
    fn is_host_v4(&self, addr: &[u8; 4]) -> bool {
        self.hash_get::<_, u8>(HOST_ADDRS_V4, addr).is_some()
    }
    fn is_host_v6(&self, addr: &[u8; 16]) -> bool {
        self.hash_get::<_, u8>(HOST_ADDRS_V6, addr).is_some()
    }
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

/// Replaces the copy's hash map `name` with the live one's entries.
fn copy_hash<K: Pod, V: Pod>(
    live: &Ebpf,
    copy: &mut Ebpf,
    name: &'static str,
) -> Result<(), DataplaneError> {
    let src: HashMap<&MapData, K, V> =
        HashMap::try_from(live.map(name).ok_or(DataplaneError::MissingMap(name))?)
            .map_err(map_err(name))?;
    let mut dst: HashMap<&mut MapData, K, V> =
        HashMap::try_from(copy.map_mut(name).ok_or(DataplaneError::MissingMap(name))?)
            .map_err(map_err(name))?;
    for entry in src.iter() {
        match entry {
            Ok((k, v)) => dst.insert(k, v, 0).map_err(map_err(name))?,
            // Deleted while iterating: the next key is read from the start again.
            Err(MapError::KeyNotFound) => continue,
            Err(e) => return Err(map_err(name)(e)),
        }
    }
    Ok(())
}

/// Copies the live array `name` into the copy's (arrays are small: at most 65,536 bytes
/// of published ports).
fn copy_array<V: Pod + PartialEq + Default>(
    live: &Ebpf,
    copy: &mut Ebpf,
    name: &'static str,
) -> Result<(), DataplaneError> {
    let src: Array<&MapData, V> =
        Array::try_from(live.map(name).ok_or(DataplaneError::MissingMap(name))?)
            .map_err(map_err(name))?;
    let mut dst: Array<&mut MapData, V> =
        Array::try_from(copy.map_mut(name).ok_or(DataplaneError::MissingMap(name))?)
            .map_err(map_err(name))?;
    for i in 0..src.len() {
        let v = src.get(&i, 0).map_err(map_err(name))?;
        // A fresh copy's arrays are zero: only what differs is written.
        if v != V::default() {
            dst.set(i, v, 0).map_err(map_err(name))?;
        }
    }
    Ok(())
}

/// A fresh copy of the programs with the live maps that decide an ingress verdict.
fn load_copy(live: &Dataplane) -> Result<Dataplane, DataplaneError> {
    // The copy's flow tables hold the traced packet's flow at most: the smallest size.
    let mut copy = Dataplane::load_sized(*crate::dataplane::MAX_FLOWS_RANGE.start())?;
    let (l, c) = (live.ebpf(), copy.ebpf_mut());
    copy_hash::<RuleKeyV4, BackendV4>(l, c, RULES_V4)?;
    copy_hash::<RuleKeyV6, BackendV6>(l, c, RULES_V6)?;
    copy_hash::<[u8; 4], u8>(l, c, HOST_ADDRS_V4)?;
    copy_hash::<[u8; 16], u8>(l, c, HOST_ADDRS_V6)?;
    copy_hash::<BridgePortKey, u32>(l, c, BRIDGE_PORTS)?;
    copy_array::<u8>(l, c, PUBLISHED_PORTS)?;
    copy_config(l, c)?;
    Ok(copy)
}

fn copy_config(live: &Ebpf, copy: &mut Ebpf) -> Result<(), DataplaneError> {
    let src: Array<&MapData, Config> =
        Array::try_from(live.map(CONFIG).ok_or(DataplaneError::MissingMap(CONFIG))?)
            .map_err(map_err(CONFIG))?;
    let config = src.get(&0, 0).map_err(map_err(CONFIG))?;
    let mut dst: Array<&mut MapData, Config> = Array::try_from(
        copy.map_mut(CONFIG)
            .ok_or(DataplaneError::MissingMap(CONFIG))?,
    )
    .map_err(map_err(CONFIG))?;
    dst.set(0, config, 0).map_err(map_err(CONFIG))
}

/// The reasons counted in `copy` (a fresh copy counts only the trace's packet).
fn counted(copy: &Dataplane) -> Result<Vec<Reason>, DataplaneError> {
    let map = copy
        .ebpf()
        .map(REASON_STATS)
        .ok_or(DataplaneError::MissingMap(REASON_STATS))?;
    let stats: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(map).map_err(map_err(REASON_STATS))?;
    let mut out = Vec::new();
    for r in Reason::ALL {
        let v = stats.get(&(r as u32), 0).map_err(map_err(REASON_STATS))?;
        if v.iter().sum::<u64>() > 0 {
            out.push(r);
        }
    }
    Ok(out)
}

const ETH_HLEN: usize = 14;

/// An Ethernet frame carrying a TCP SYN or a UDP datagram from `src` to `dst`, with
/// complete IP and transport checksums.
pub fn build_frame(src: (IpAddr, u16), dst: (IpAddr, u16), udp: bool) -> Option<Vec<u8>> {
    let l4_proto = if udp { proto::UDP } else { proto::TCP };
    let payload: &[u8] = b"portfwd trace";
    let mut l4 = Vec::new();
    l4.extend_from_slice(&src.1.to_be_bytes());
    l4.extend_from_slice(&dst.1.to_be_bytes());
    if udp {
        let len = u16::try_from(8 + payload.len()).ok()?;
        l4.extend_from_slice(&len.to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
    } else {
        l4.extend_from_slice(&1u32.to_be_bytes()); // seq
        l4.extend_from_slice(&0u32.to_be_bytes()); // ack
        l4.extend_from_slice(&[5 << 4, 0x02]); // 20-byte header, SYN
        l4.extend_from_slice(&64240u16.to_be_bytes()); // window
        l4.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    }
    l4.extend_from_slice(payload);
    let csum_off = if udp { 6 } else { 16 };
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    match (src.0, dst.0) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let len = u16::try_from(l4.len()).ok()?;
            let pseudo = csum::pseudo_header_v4(s.octets(), d.octets(), l4_proto, len);
            let sum = !csum::sum(&l4, pseudo);
            let sum = if udp && sum == 0 { 0xffff } else { sum };
            l4[csum_off..csum_off + 2].copy_from_slice(&sum.to_be_bytes());
            frame.extend_from_slice(&[0x08, 0x00]);
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&(20 + len).to_be_bytes());
            ip[6] = 0x40; // DF
            ip[8] = 64;
            ip[9] = l4_proto;
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            let sum = !csum::sum(&ip, 0);
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
            frame.extend_from_slice(&ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let len = u16::try_from(l4.len()).ok()?;
            let pseudo = csum::pseudo_header_v6(s.octets(), d.octets(), l4_proto, len.into());
            let sum = !csum::sum(&l4, pseudo);
            let sum = if udp && sum == 0 { 0xffff } else { sum };
            l4[csum_off..csum_off + 2].copy_from_slice(&sum.to_be_bytes());
            frame.extend_from_slice(&[0x86, 0xdd]);
            let mut ip = [0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&len.to_be_bytes());
            ip[6] = l4_proto;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&s.octets());
            ip[24..40].copy_from_slice(&d.octets());
            frame.extend_from_slice(&ip);
        }
        _ => return None,
    }
    frame.extend_from_slice(&l4);
    Some(frame)
}

/// The destination (address, port) of an Ethernet frame carrying IPv4 or IPv6 (no
/// options, no extension headers: what [`build_frame`] and the programs write).
fn destination(frame: &[u8]) -> Option<(IpAddr, u16)> {
    let eth_type = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(ETH_HLEN..)?;
    let (addr, l4) = match eth_type {
        0x0800 => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            let a: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            (IpAddr::from(a), ip.get(ihl..)?)
        }
        0x86dd => {
            let a: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            (IpAddr::from(a), ip.get(40..)?)
        }
        _ => return None,
    };
    Some((addr, u16::from_be_bytes([*l4.get(2)?, *l4.get(3)?])))
}

fn sock(addr: IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

fn proto_name(udp: bool) -> &'static str {
    if udp {
        "udp"
    } else {
        "tcp"
    }
}

/// One BPF_PROG_RUN: (return value, output frame).
fn test_run<P>(p: &P, name: &'static str, input: &[u8]) -> Result<(u32, Vec<u8>), TraceError>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    // Room for a frame that grows (NAT64 to IPv6 adds 20 bytes).
    let mut out = vec![0u8; input.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(input);
    opts.data_out = Some(&mut out);
    let result = p.test_run(opts).map_err(|source| TraceError::Run {
        program: name,
        source,
    })?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out))
}

/// The rule serving a destination, as rule matching finds it: its key in words and its
/// backend, or why there is none.
struct ModelAnswer {
    rule: Option<(String, String, (IpAddr, u16))>,
    why: Result<(), Reason>,
}

fn model_packet(maps: &LiveRules<'_>, host: IpAddr, port: u16, l4: u8, p: &str) -> ModelAnswer {
    let port_be = port.to_be_bytes();
    let found = match host {
        // A wildcard's hit is its expansion under the host address: shown as the wildcard.
        IpAddr::V4(a) => rules::lookup(maps, Caller::Packet, a.octets(), port_be, l4).map(|b| {
            let exact = b.flags() & BACKEND_EXPANDED == 0
                && maps
                    .rule_v4(&RuleKeyV4::new(a.octets(), port_be, l4))
                    .is_some();
            (exact, IpAddr::V4(b.addr()), b.port())
        }),
        IpAddr::V6(a) => rules::lookup(maps, Caller::Packet, a.octets(), port_be, l4).map(|b| {
            let exact = b.flags() & BACKEND_EXPANDED == 0
                && maps
                    .rule_v6(&RuleKeyV6::new(a.octets(), port_be, l4))
                    .is_some();
            let addr = match b.addr().to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(b.addr()),
            };
            (exact, addr, b.port())
        }),
    };
    match found {
        Ok((exact, addr, bport)) => {
            let key = if exact {
                format!("{}/{p}", sock(host, port))
            } else {
                format!("*:{port}/{p}")
            };
            ModelAnswer {
                rule: Some((key, sock(addr, bport), (addr, bport))),
                why: Ok(()),
            }
        }
        Err(r) => ModelAnswer {
            rule: None,
            why: Err(r),
        },
    }
}

/// Why NAT64 passed a packet untranslated, if one of its reasons was counted.
fn nat64_pass(reasons: &[Reason]) -> Option<&'static str> {
    reasons.iter().find_map(|r| match r {
        Reason::Nat64NoRoute => Some("no usable route to the backend"),
        Reason::Nat64TooBig => Some("too big for the backend route's MTU once IPv4"),
        Reason::Nat64NoPort => Some("every NAT64 port it may take is held by a live flow"),
        Reason::Nat64Unsupported => {
            Some("a VLAN tag, IPv4 options or a UDP reply without checksum")
        }
        Reason::Nat64HopLimit => Some("its hop limit expires here"),
        Reason::Nat64ReplyNoFlow => Some("its flow is gone"),
        Reason::Nat64Failed => Some("the kernel refused a helper or the tail call"),
        _ => None,
    })
}

/// Why no rule serves `host:port` over `l4`, in words.
fn why_none(maps: &LiveRules<'_>, reason: Reason, host: IpAddr, port: u16, l4: u8) -> String {
    let target = sock(host, port);
    let p = proto_name(l4 == proto::UDP);
    let bits = maps.published(port.to_be_bytes());
    let (exact_bit, wildcard_bit) = port_bits(l4);
    let other = if l4 == proto::UDP {
        port_bits(proto::TCP)
    } else {
        port_bits(proto::UDP)
    };
    match reason {
        Reason::PassNotHostAddr => format!(
            "port {port}/{p} is published on the host's addresses (a wildcard rule), but \
             {host} is not one of them: passed untouched"
        ),
        Reason::PassNoRule if bits & (exact_bit | wildcard_bit) == 0 => {
            if bits & (other.0 | other.1) != 0 {
                format!(
                    "port {port} is published for {} only, not {p}: passed untouched",
                    proto_name(l4 != proto::UDP)
                )
            } else {
                format!("port {port}/{p} is not published: passed untouched")
            }
        }
        Reason::PassNoRule => {
            let family = if host.is_ipv4() { "IPv4" } else { "IPv6" };
            format!(
                "port {port}/{p} is published, but no {family} rule covers {target} (bound to \
                 other addresses, or to the other family only): passed untouched"
            )
        }
        r => format!("passed untouched ({})", r.name()),
    }
}

/// Runs the trace: see the module docs.
pub fn trace(live: &Dataplane, q: &TraceQuery) -> Result<TraceReply, TraceError> {
    if q.client.is_ipv4() != q.host.is_ipv4() {
        return Err(TraceError::MixedFamilies);
    }
    let attachment = match &q.iface {
        Some(name) => Some(
            live.attachments()
                .iter()
                .find(|a| &a.iface == name)
                .ok_or_else(|| TraceError::NotAttached(name.clone()))?,
        ),
        None => live.attachments().first(),
    };
    let hook = attachment.map_or(Hook::TcIngress, |a| a.ingress);
    let program = match (hook, attachment) {
        (Hook::TcEgress, _) | (_, None) => programs::TC_INGRESS,
        (_, Some(a)) => crate::dataplane::hook_program(hook, &a.iface),
    };
    let l4 = if q.udp { proto::UDP } else { proto::TCP };
    let p = proto_name(q.udp);
    let frame = build_frame((q.client, q.client_port), (q.host, q.port), q.udp)
        .ok_or(TraceError::MixedFamilies)?;

    let started = Instant::now();
    let copy = load_copy(live)?;
    let load_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let started = Instant::now();
    let prog = copy
        .ebpf()
        .program(program)
        .ok_or(DataplaneError::MissingProgram(program))?;
    let (ret, out) = match hook {
        Hook::Xdp | Hook::XdpGeneric => {
            let xdp: &Xdp = prog
                .try_into()
                .map_err(|source| TraceError::Run { program, source })?;
            test_run(xdp, program, &frame)?
        }
        Hook::TcIngress | Hook::TcEgress => {
            let tc: &SchedClassifier = prog
                .try_into()
                .map_err(|source| TraceError::Run { program, source })?;
            test_run(tc, program, &frame)?
        }
    };
    let run_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    let reasons = counted(&copy)?;
    drop(copy);

    let xdp = matches!(hook, Hook::Xdp | Hook::XdpGeneric);
    let verdict = match (xdp, ret) {
        (true, 1) => "drop",
        (true, 2) => "pass",
        (true, 3) => "tx",
        (true, 4) => "redirect",
        (false, 0) | (false, u32::MAX) => "pass",
        (false, 2) => "drop",
        (false, 7) => "redirect",
        _ => "other",
    };
    // TC's codes are signed (TC_ACT_UNSPEC is -1: "go on").
    let code = if xdp {
        ret.to_string()
    } else {
        i32::from_ne_bytes(ret.to_ne_bytes()).to_string()
    };
    let verdict = format!("{verdict} ({code})");
    let dst_after = destination(&out);
    let rewritten = dst_after
        .filter(|d| *d != (q.host, q.port))
        .map(|(a, port)| sock(a, port));

    let maps = LiveRules(live.ebpf());
    let model = model_packet(&maps, q.host, q.port, l4, p);
    let has = |r: Reason| reasons.contains(&r);
    let kernel_matched = [
        Reason::Translated,
        Reason::Redirected,
        Reason::FastPathFallback,
        Reason::FlowInsertFailed,
        Reason::Nat64Translated,
        Reason::Nat64Failed,
        Reason::Nat64NoRoute,
        Reason::Nat64TooBig,
        Reason::Nat64NoPort,
        Reason::Nat64Unsupported,
        Reason::Nat64HopLimit,
        Reason::PassNoIpv6Backend,
    ]
    .iter()
    .any(|r| has(*r));
    let explanation = if has(Reason::Redirected) {
        "translated and redirected on the fast path straight to the backend's bridge port"
            .to_string()
    } else if has(Reason::Nat64Translated) {
        "NAT64: an IPv6 client of an IPv4 backend, translated to IPv4 and sent to the \
         backend's interface"
            .to_string()
    } else if let Some(why) = nat64_pass(&reasons) {
        format!("NAT64 could not translate it ({why}): passed untouched")
    } else if has(Reason::PassNoIpv6Backend) {
        "an IPv6 client of an IPv4-only backend: XDP passes it untouched, NAT64's entry at \
         TC ingress takes it"
            .to_string()
    } else if has(Reason::FastPathFallback) {
        "translated; the fast path knows no next hop yet, so the kernel routes it to the \
         backend"
            .to_string()
    } else if has(Reason::Translated) || has(Reason::FlowInsertFailed) {
        "translated, then routed by the kernel to the backend".to_string()
    } else {
        let r = reasons.first().copied().unwrap_or(Reason::PassNoRule);
        why_none(&maps, r, q.host, q.port, l4)
    };

    let mut disagreement = None;
    match (&model.rule, kernel_matched) {
        (Some((_, _, backend)), true) => {
            let translated_to = dst_after.filter(|_| {
                has(Reason::Translated)
                    || has(Reason::Redirected)
                    || has(Reason::FastPathFallback)
                    || has(Reason::Nat64Translated)
                    || has(Reason::FlowInsertFailed)
            });
            if let Some(d) = translated_to {
                if d != *backend {
                    disagreement = Some(format!(
                        "the rule names {} but the kernel rewrote to {}",
                        sock(backend.0, backend.1),
                        sock(d.0, d.1)
                    ));
                }
            }
        }
        (None, false) => {
            if let Err(r) = model.why {
                if !has(r) {
                    disagreement = Some(format!(
                        "the model says {} but the kernel counted {:?}",
                        r.name(),
                        reasons.iter().map(|r| r.name()).collect::<Vec<_>>()
                    ));
                }
            }
        }
        (Some((rule, _, _)), false) => {
            disagreement = Some(format!(
                "rule {rule} matches but the kernel did not translate"
            ))
        }
        (None, true) => {
            disagreement = Some("no rule matches but the kernel translated".to_string())
        }
    }

    let local = local_answer(live, &maps, q.host, q.port, l4);
    let (rule, backend) = match model.rule {
        Some((r, b, _)) => (Some(r), Some(b)),
        None => (None, None),
    };
    Ok(TraceReply {
        packet: format!(
            "{p} {} -> {}",
            sock(q.client, q.client_port),
            sock(q.host, q.port)
        ),
        iface: attachment.map(|a| a.iface.clone()),
        hook: hook.to_string(),
        program: program.to_string(),
        verdict,
        reasons: reasons.iter().map(|r| r.name().to_string()).collect(),
        rule,
        backend,
        rewritten,
        explanation,
        disagreement,
        local,
        load_ms,
        run_us,
    })
}

/// What a local client's connect()/sendmsg() to `host:port` would do: the rule model
/// with [`Caller::Socket`] (host namespace), since sock_addr programs cannot be run with
/// BPF_PROG_RUN.
fn local_answer(live: &Dataplane, maps: &LiveRules<'_>, host: IpAddr, port: u16, l4: u8) -> String {
    if live.local_cgroup().is_none() {
        return "socket programs not attached (--local-clients off): a local client connects \
                to the address as is"
            .to_string();
    }
    let caller = Caller::Socket { host_netns: true };
    let port_be = port.to_be_bytes();
    let found = match host {
        IpAddr::V4(a) => rules::lookup(maps, caller, a.octets(), port_be, l4)
            .map(|b| sock(IpAddr::V4(b.addr()), b.port())),
        IpAddr::V6(a) => rules::lookup(maps, caller, a.octets(), port_be, l4).map(|b| {
            let addr: IpAddr = match b.addr().to_ipv4_mapped() {
                Some(v4) => Ipv4Addr::from(v4.octets()).into(),
                None => Ipv6Addr::from(b.addr().octets()).into(),
            };
            sock(addr, b.port())
        }),
    };
    let what = match found {
        Ok(b) => format!("connect()/sendmsg() goes straight to {b} (local_translated)"),
        Err(r) => format!("connect()/sendmsg() is left as is ({})", r.name()),
    };
    format!("{what} [the rule model's answer: socket programs cannot be run by BPF_PROG_RUN]")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_is_read_only() {
        let query = TraceQuery {
            iface: None,
            client: IpAddr::from([10, 0, 0, 1]),
            client_port: DEFAULT_CLIENT_PORT,
            host: IpAddr::from([10, 0, 0, 2]),
            port: 80,
            udp: false,
        };
        let req = crate::protocol::Request::Trace { query };
        assert!(req.is_read_only());
        let line = serde_json::to_vec(&req).expect("encode");
        assert_eq!(crate::protocol::parse_request(&line), Ok(req));
    }

    #[test]
    fn frames_have_valid_checksums() {
        for (s, d) in [
            (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2])),
            (
                "fd00::1".parse().expect("address"),
                "fd00::2".parse().expect("address"),
            ),
        ] {
            for udp in [false, true] {
                let f = build_frame((s, 40000), (d, 8080), udp).expect("frame");
                assert_eq!(destination(&f), Some((d, 8080)));
                let (ip_len, l4_proto) = if s.is_ipv4() {
                    (20, f[23])
                } else {
                    (40, f[20])
                };
                let l4 = &f[ETH_HLEN + ip_len..];
                let pseudo = match (s, d) {
                    (IpAddr::V4(s), IpAddr::V4(d)) => {
                        assert_eq!(csum::sum(&f[ETH_HLEN..ETH_HLEN + 20], 0), 0xffff);
                        csum::pseudo_header_v4(s.octets(), d.octets(), l4_proto, l4.len() as u16)
                    }
                    (IpAddr::V6(s), IpAddr::V6(d)) => {
                        csum::pseudo_header_v6(s.octets(), d.octets(), l4_proto, l4.len() as u32)
                    }
                    _ => unreachable!(),
                };
                assert_eq!(csum::sum(l4, pseudo), 0xffff, "udp={udp} {s}");
            }
        }
        assert!(build_frame(
            (IpAddr::from([10, 0, 0, 1]), 1),
            ("fd00::2".parse().expect("address"), 2),
            false
        )
        .is_none());
    }
}
