//! The BPF_PROG_RUN harness the fixture suites share (`prog_run.rs`, `prog_run_v6.rs`,
//! `prog_run_nat64.rs`): frames described by their fields and built with correct
//! checksums ([`Frame`], either family), a program run by the kernel on one frame
//! ([`run`]: verdict and output bytes), the reason counters ([`reason_count`]), and
//! fixture tables in Katran's shape ([`Case`]: description, input, expected output,
//! expected reason) checked by [`check_case`].
//!
//! Nothing here attaches a program or sends a packet: BPF_PROG_RUN runs a loaded program
//! on a buffer. Programs that consult the FIB (NAT64, the fast path) answer from the
//! caller's network namespace, so such tests run inside one of their own.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::{Array, HashMap, MapData, MapError};
use aya::programs::{tc::SchedClassifier, ProgramError, TestRun, TestRunOptions, Xdp};
use aya::TestRunResult;
use etherparse::{IpHeaders, Ipv4Extensions, Ipv4Header, Ipv4Options, PacketBuilder};
use portfwd::dataplane::Dataplane;
use portfwd_common::model::nat64::{self, Nat64Maps, Nat64Outcome, Route};
use portfwd_common::model::{self, FibQuery, FlowWrite, Hook, Maps, NextHop, Outcome, Verdict};
use portfwd_common::rules::RuleMaps;
use portfwd_common::{
    csum, programs, proto, BackendV4, BackendV6, BridgePortKey, Config, FlowKeyV4, FlowKeyV6,
    FlowV4, FlowV6, Nat64Flow, Nat64Reply, Reason, RuleKeyV4, RuleKeyV6, BACKEND_PORTS,
    BRIDGE_PORTS, BRIDGE_PORT_PEER, CONFIG, CONFIG_FAST_PATH, CONFIG_FAST_PATH_NATIVE_XDP,
    CONNTRACK_V4, CONNTRACK_V6, EMBRYONIC_V4, EMBRYONIC_V6, HOST_ADDRS_V4, HOST_ADDRS_V6,
    NAT64_FLOWS, NAT64_REPLIES, PUBLISHED_PORTS, RULES_V4, RULES_V6,
};

use crate::netns::Netns;

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
/// TC_ACT_SHOT.
pub const TC_SHOT: u32 = 2;
/// TC_ACT_REDIRECT.
pub const TC_REDIRECT: u32 = 7;
/// TC_ACT_UNSPEC: TCX's "next program", what the TC programs return for "go on".
pub const TC_NEXT: u32 = -1i32 as u32;

pub const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
pub const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];
pub const ETH: usize = 14;
pub const IP4: usize = 20;
pub const IP6: usize = 40;

/// Whether the BPF_PROG_RUN suites can run (root). Without root they skip, except under
/// `CI=true`, where that is a failure.
pub fn privileged() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "BPF_PROG_RUN tests need root, and CI=true forbids skipping them"
    );
    eprintln!("skipping: BPF_PROG_RUN tests need root");
    false
}

/// The packet programs a fixture runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prog {
    /// Native XDP on a NIC.
    XdpIngress,
    /// Native XDP on a virtual device: partial (offloaded) checksums handled.
    XdpVirtual,
    /// The same decisions as generic (skb) XDP; only its fast-path switch differs.
    XdpGeneric,
    TcIngress,
    TcEgress,
    /// NAT64's entry on a backend's interface (`portfwd_tc_nat64_entry`).
    Nat64Entry,
}

impl Prog {
    pub fn name(self) -> &'static str {
        match self {
            Prog::XdpIngress => programs::XDP_INGRESS,
            Prog::XdpVirtual => programs::XDP_VIRTUAL_INGRESS,
            Prog::XdpGeneric => programs::XDP_GENERIC_INGRESS,
            Prog::TcIngress => programs::TC_INGRESS,
            Prog::TcEgress => programs::TC_EGRESS,
            Prog::Nat64Entry => programs::TC_NAT64_ENTRY,
        }
    }
    /// The verdict that means "go on to the stack, untouched or translated".
    pub fn pass_verdict(self) -> u32 {
        match self {
            Prog::XdpIngress | Prog::XdpVirtual | Prog::XdpGeneric => XDP_PASS,
            _ => TC_NEXT,
        }
    }
}

/// A TC program of the loaded object, by name.
pub fn tc_program<'a>(dp: &'a Dataplane, name: &str) -> &'a SchedClassifier {
    dp.ebpf()
        .program(name)
        .unwrap_or_else(|| panic!("program {name}"))
        .try_into()
        .expect("a TC program")
}

/// An XDP program of the loaded object, by name.
pub fn xdp_program<'a>(dp: &'a Dataplane, name: &str) -> &'a Xdp {
    dp.ebpf()
        .program(name)
        .unwrap_or_else(|| panic!("program {name}"))
        .try_into()
        .expect("an XDP program")
}

/// One BPF_PROG_RUN of `p` on `input`: (return value, output frame), or the kernel's
/// refusal (the skb test run refuses frames too short for their ethertype's header).
pub fn try_test_run<P>(p: &P, input: &[u8]) -> Result<(u32, Vec<u8>), ProgramError>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    try_test_run_gso(p, input, 0)
}

/// `struct __sk_buff`'s `gso_segs` and `gso_size` offsets (UAPI, fixed): the fields an
/// skb test run takes from its context besides a few others left zero here.
const SKB_GSO_SEGS_OFF: usize = 164;
const SKB_GSO_SIZE_OFF: usize = 176;

/// As [`try_test_run`], the skb a GSO packet of `gso_size` payload bytes a segment (a
/// GRO or TSO super-packet) when not 0: the kernel takes `gso_size` (and `gso_segs`)
/// from the run's `__sk_buff` context. TC programs only.
pub fn try_test_run_gso<P>(
    p: &P,
    input: &[u8],
    gso_size: u32,
) -> Result<(u32, Vec<u8>), ProgramError>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    // Room for a frame that grows (NAT64 to IPv6 adds 20 bytes).
    let mut out = vec![0u8; input.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(input);
    opts.data_out = Some(&mut out);
    let mut ctx = [0u8; SKB_GSO_SIZE_OFF + 4];
    if gso_size != 0 {
        let segs = (input.len() as u32).div_ceil(gso_size);
        ctx[SKB_GSO_SEGS_OFF..SKB_GSO_SEGS_OFF + 4].copy_from_slice(&segs.to_ne_bytes());
        ctx[SKB_GSO_SIZE_OFF..].copy_from_slice(&gso_size.to_ne_bytes());
        opts.ctx_in = Some(&ctx);
    }
    let result = p.test_run(opts)?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out))
}

/// As [`try_test_run`], for a frame the kernel must accept.
pub fn test_run<P>(p: &P, input: &[u8]) -> (u32, Vec<u8>)
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    try_test_run(p, input).expect("test run")
}

/// Runs `prog` of `dp` on `input`, returning the kernel's refusal if it refuses it.
pub fn try_run(dp: &Dataplane, prog: Prog, input: &[u8]) -> Result<(u32, Vec<u8>), ProgramError> {
    match prog {
        Prog::XdpIngress | Prog::XdpVirtual | Prog::XdpGeneric => {
            try_test_run(xdp_program(dp, prog.name()), input)
        }
        _ => try_test_run(tc_program(dp, prog.name()), input),
    }
}

/// Runs `prog` of `dp` on `input`: (verdict, output frame).
pub fn run(dp: &Dataplane, prog: Prog, input: &[u8]) -> (u32, Vec<u8>) {
    try_run(dp, prog, input).expect("test run")
}

/// How many packets have been counted under `reason`, over all CPUs.
pub fn reason_count(dp: &Dataplane, reason: Reason) -> u64 {
    dp.reason_stats()
        .expect("reason stats")
        .into_iter()
        .find(|(r, _)| *r == reason)
        .map(|(_, n)| n)
        .expect("reason present")
}

/// A TCP or UDP frame described by its fields, of either family (the family of `src`);
/// [`Frame::build`] makes the bytes with correct checksums. IPv4-only fields (options,
/// fragment bits) are ignored for IPv6.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src: (IpAddr, u16),
    pub dst: (IpAddr, u16),
    pub proto: u8,
    /// (source, destination) MACs.
    pub macs: ([u8; 6], [u8; 6]),
    pub vlan: Option<u16>,
    /// TTL or hop limit.
    pub hops: u8,
    /// IPv4 options: 0, 4 or 8 bytes of NOPs ending in EOL.
    pub ip_options: usize,
    pub more_fragments: bool,
    pub frag_offset: u16,
    pub seq: u32,
    /// `None`: a SYN; `Some(n)`: an ACK of `n`.
    pub ack: Option<u32>,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new<S: Into<IpAddr>, D: Into<IpAddr>>(proto: u8, src: (S, u16), dst: (D, u16)) -> Self {
        let (src, dst) = ((src.0.into(), src.1), (dst.0.into(), dst.1));
        assert_eq!(src.0.is_ipv4(), dst.0.is_ipv4(), "one family per frame");
        let payload = if src.0.is_ipv4() {
            &b"portfwd fixture payload"[..]
        } else {
            &b"portfwd v6 fixture payload"[..]
        };
        Self {
            src,
            dst,
            proto,
            macs: (MAC_A, MAC_B),
            vlan: None,
            hops: 64,
            ip_options: 0,
            more_fragments: false,
            frag_offset: 0,
            seq: 1000,
            ack: None,
            payload: payload.to_vec(),
        }
    }
    pub fn tcp<S: Into<IpAddr>, D: Into<IpAddr>>(src: (S, u16), dst: (D, u16)) -> Self {
        Self::new(proto::TCP, src, dst)
    }
    pub fn udp<S: Into<IpAddr>, D: Into<IpAddr>>(src: (S, u16), dst: (D, u16)) -> Self {
        Self::new(proto::UDP, src, dst)
    }
    pub fn with_src<A: Into<IpAddr>>(&self, src: (A, u16)) -> Self {
        Self {
            src: (src.0.into(), src.1),
            ..self.clone()
        }
    }
    pub fn with_dst<A: Into<IpAddr>>(&self, dst: (A, u16)) -> Self {
        Self {
            dst: (dst.0.into(), dst.1),
            ..self.clone()
        }
    }
    pub fn is_ipv4(&self) -> bool {
        self.src.0.is_ipv4()
    }
    /// Where the IP header starts.
    pub fn ip_off(&self) -> usize {
        ETH + if self.vlan.is_some() { 4 } else { 0 }
    }

    pub fn build(&self) -> Vec<u8> {
        let eth = PacketBuilder::ethernet2(self.macs.0, self.macs.1);
        let ip = match (self.src.0, self.dst.0) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut ip =
                    Ipv4Header::new(0, self.hops, self.proto.into(), s.octets(), d.octets())
                        .expect("ipv4 header");
                ip.options = match self.ip_options {
                    0 => Ipv4Options::default(),
                    4 => Ipv4Options::from([1, 1, 1, 0]), // NOP NOP NOP EOL
                    8 => Ipv4Options::from([1, 1, 1, 1, 1, 1, 1, 0]),
                    n => panic!("unsupported option length {n}"),
                };
                ip.more_fragments = self.more_fragments;
                ip.fragment_offset = self.frag_offset.try_into().expect("fragment offset");
                IpHeaders::Ipv4(ip, Ipv4Extensions::default())
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => IpHeaders::Ipv6(
                etherparse::Ipv6Header {
                    traffic_class: 0,
                    flow_label: Default::default(),
                    payload_length: 0,
                    next_header: self.proto.into(),
                    hop_limit: self.hops,
                    source: s.octets(),
                    destination: d.octets(),
                },
                Default::default(),
            ),
            _ => panic!("one family per frame"),
        };
        let ip = match self.vlan {
            None => eth.ip(ip),
            Some(vid) => eth.single_vlan(vid.try_into().expect("vlan id")).ip(ip),
        };
        let mut out = Vec::new();
        match self.proto {
            proto::TCP => {
                let tcp = ip.tcp(self.src.1, self.dst.1, self.seq, 64240);
                match self.ack {
                    None => tcp.syn().write(&mut out, &self.payload),
                    Some(n) => tcp.ack(n).write(&mut out, &self.payload),
                }
            }
            proto::UDP => ip
                .udp(self.src.1, self.dst.1)
                .write(&mut out, &self.payload),
            _ => panic!("unsupported protocol"),
        }
        .expect("write frame");
        out
    }

    /// The frame as a local stack with checksum offload on sends it (`CHECKSUM_PARTIAL`):
    /// the L4 checksum field holds the folded pseudo-header sum, not complemented.
    pub fn build_offloaded(&self) -> Vec<u8> {
        let mut f = self.build();
        let ip = self.ip_off();
        let (l4, sum) = if self.is_ipv4() {
            let l4 = ip + usize::from(f[ip] & 0x0f) * 4;
            let len = u16::from_be_bytes([f[ip + 2], f[ip + 3]]) - (l4 - ip) as u16;
            let (s, d) = (&f[ip + 12..ip + 16], &f[ip + 16..ip + 20]);
            let sum = csum::pseudo_header_v4(
                s.try_into().expect("src"),
                d.try_into().expect("dst"),
                self.proto,
                len,
            );
            (l4, sum)
        } else {
            let len = u16::from_be_bytes([f[ip + 4], f[ip + 5]]);
            let (s, d) = (&f[ip + 8..ip + 24], &f[ip + 24..ip + 40]);
            let sum = csum::pseudo_header_v6(
                s.try_into().expect("src"),
                d.try_into().expect("dst"),
                self.proto,
                len.into(),
            );
            (ip + IP6, sum)
        };
        let at = l4 + if self.proto == proto::TCP { 16 } else { 6 };
        f[at..at + 2].copy_from_slice(&(sum as u16).to_be_bytes());
        f
    }

    /// An IPv6 frame with an 8-byte extension header of type `next_header` inserted
    /// before the transport header (checksums are not fixed: the frame must pass
    /// untouched).
    pub fn with_ext_header(&self, next_header: u8) -> Vec<u8> {
        assert!(!self.is_ipv4(), "IPv6 extension headers");
        let mut f = self.build();
        let ip = self.ip_off();
        let transport = f[ip + 6];
        let mut ext = [0u8; 8];
        ext[0] = transport;
        if next_header == 44 {
            // Fragment header: offset 0, M flag set, an identification.
            ext[3] = 1;
            ext[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        } else {
            // Hdr Ext Len 0 (8 bytes), a PadN option filling the rest.
            ext[2] = 1;
            ext[3] = 4;
        }
        f[ip + 6] = next_header;
        let plen = u16::from_be_bytes([f[ip + 4], f[ip + 5]]) + 8;
        f[ip + 4..ip + 6].copy_from_slice(&plen.to_be_bytes());
        f.splice(ip + IP6..ip + IP6, ext);
        f
    }
}

/// An ARP request from `from` for `target`.
pub fn arp_request(from: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&MAC_A);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&MAC_A);
    arp.extend_from_slice(&from.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&target.octets());
    arp
}

/// An ICMP echo request (ICMPv6 for IPv6 addresses).
pub fn echo_request<A: Into<IpAddr>>(src: A, dst: A) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(MAC_A, MAC_B);
    let mut out = Vec::new();
    match (src.into(), dst.into()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth
            .ipv4(s.octets(), d.octets(), 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut out, b"ping"),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth
            .ipv6(s.octets(), d.octets(), 64)
            .icmpv6_echo_request(1, 1)
            .write(&mut out, b"ping"),
        _ => panic!("one family per frame"),
    }
    .expect("icmp frame");
    out
}

/// A UDP datagram over IPv6 (for IPv4 suites checking that their rules do not cover it).
pub fn udp_v6(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), payload: &[u8]) -> Vec<u8> {
    Frame {
        payload: payload.to_vec(),
        ..Frame::udp(src, dst)
    }
    .build()
}

/// One row of a fixture table: a frame, what must come out, and why.
pub struct Case {
    pub what: &'static str,
    pub input: Vec<u8>,
    /// `None`: the frame must come out untouched.
    pub expect: Option<Vec<u8>>,
    pub reason: Reason,
}

/// A frame translated into `output` (ingress), counted as translated.
pub fn translated(what: &'static str, input: &Frame, output: &Frame) -> Case {
    Case {
        what,
        input: input.build(),
        expect: Some(output.build()),
        reason: Reason::Translated,
    }
}

/// A reply translated into `output` (egress), counted as a translated reply.
pub fn reply_translated(what: &'static str, input: &Frame, output: &Frame) -> Case {
    Case {
        reason: Reason::ReplyTranslated,
        ..translated(what, input, output)
    }
}

/// A frame passed untouched, counted under `reason`.
pub fn untouched(what: &'static str, input: Vec<u8>, reason: Reason) -> Case {
    Case {
        what,
        input,
        expect: None,
        reason,
    }
}

/// Runs `case` through `prog`: the pass verdict, the expected bytes, and exactly one
/// more packet counted under the expected reason; and the kernel agrees with the model
/// on all of it ([`compare`]).
pub fn check_case(dp: &Dataplane, prog: Prog, case: &Case) {
    let c = compare(dp, prog, &case.input)
        .unwrap_or_else(|| panic!("{prog:?}: {}: the kernel refused the frame", case.what));
    assert_eq!(
        c.verdict,
        prog.pass_verdict(),
        "{prog:?}: {}: verdict",
        case.what
    );
    let expect = case.expect.as_ref().unwrap_or(&case.input);
    assert_eq!(&c.output, expect, "{prog:?}: {}: output bytes", case.what);
    let grew = c
        .counted
        .iter()
        .find(|(r, _)| *r == case.reason)
        .map_or(0, |(_, n)| *n);
    assert_eq!(
        grew, 1,
        "{prog:?}: {}: counted as {:?}",
        case.what, case.reason
    );
}

/// The loaded object's maps, read live, as the model's [`Maps`]: the model decides on
/// exactly what the kernel program is about to see. NAT64's FIB answer is the
/// namespace's route (`route`), its time the coarse monotonic clock read at creation.
pub struct KernelMaps<'a> {
    dp: &'a Dataplane,
    route: Option<Route>,
    fib: Option<&'a FastPathFib>,
    now_ns: u64,
    /// The run's `skb->gso_size` (0: not a GSO packet).
    gso_size: u32,
}

/// What the FIB of a fast-path test's namespace answers: one connected subnet on one
/// interface, its neighbours (permanent entries), the interface's MAC.
#[derive(Clone, Debug)]
pub struct FastPathFib {
    /// (network, prefix length).
    pub subnet: ([u8; 4], u8),
    pub ifindex: u32,
    pub smac: [u8; 6],
    /// The interface's MTU: a longer packet needs fragmenting, the kernel's job.
    pub mtu: u16,
    pub neighbours: Vec<([u8; 4], [u8; 6])>,
    /// The interface's IPv6 subnet (network, prefix length), if it has one.
    pub subnet6: Option<([u8; 16], u8)>,
    pub neighbours6: Vec<([u8; 16], [u8; 6])>,
}

impl FastPathFib {
    /// The next hop of a `tot_len`-byte packet to `dst`: (interface, its MAC, the
    /// neighbour's MAC).
    pub fn lookup(&self, dst: [u8; 4], tot_len: u16) -> Option<(u32, [u8; 6], [u8; 6])> {
        if tot_len > self.mtu {
            return None;
        }
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.subnet.1))
            .unwrap_or(0);
        if u32::from_be_bytes(dst) & mask != u32::from_be_bytes(self.subnet.0) & mask {
            return None;
        }
        let (_, dmac) = self.neighbours.iter().find(|(a, _)| *a == dst)?;
        Some((self.ifindex, self.smac, *dmac))
    }

    /// As [`Self::lookup`], for IPv6 (`len`: header included). A source the kernel
    /// never forwards off its link (multicast, link-local, loopback: measured, the
    /// lookup fails) has no next hop.
    pub fn lookup_v6(
        &self,
        src: [u8; 16],
        dst: [u8; 16],
        len: u16,
    ) -> Option<(u32, [u8; 6], [u8; 6])> {
        let (net, prefix) = self.subnet6?;
        let src = u128::from_be_bytes(src);
        let scoped = src >> 120 == 0xff || src >> 118 == 0xfe80 >> 6 || src == 1;
        if len > self.mtu || scoped {
            return None;
        }
        let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
        if u128::from_be_bytes(dst) & mask != u128::from_be_bytes(net) & mask {
            return None;
        }
        let (_, dmac) = self.neighbours6.iter().find(|(a, _)| *a == dst)?;
        Some((self.ifindex, self.smac, *dmac))
    }
}

/// The backends' MAC, a permanent neighbour of the [`backend_net`] namespace.
pub const BACKEND_MAC: [u8; 6] = [2, 0, 0, 0, 1, 2];
/// The backends' subnets on [`backend_net`]'s `d0`, as the address the namespace holds
/// there and the prefix length.
pub const BACKEND_NET4: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 1, 1), 24);
pub const BACKEND_NET6: (Ipv6Addr, u8) = (Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 1), 64);

/// A namespace (`tag`) whose FIB reaches the backends' subnet of each family in
/// `backends` on `d0` (a veth whose peer `d1` stays inside), forwarding on for that
/// family, each of `backends` a permanent neighbour with [`BACKEND_MAC`]; and what the
/// model is told of it. A family without a backend has no address there, so its
/// lookups fail in the kernel as in the model. NAT64's route is `d0` too.
pub fn backend_net(tag: &str, backends: &[IpAddr]) -> (Netns, FastPathFib) {
    let ns = Netns::new(tag, "run");
    ns.ip("link add d0 type veth peer name d1");
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for b in backends {
        match b {
            IpAddr::V4(a) => v4.push((a.octets(), BACKEND_MAC)),
            IpAddr::V6(a) => v6.push((a.octets(), BACKEND_MAC)),
        }
    }
    let (host4, len4) = BACKEND_NET4;
    let (host6, len6) = BACKEND_NET6;
    if !v4.is_empty() {
        ns.ip(&format!("addr add {host4}/{len4} dev d0"));
    }
    if !v6.is_empty() {
        ns.ip(&format!("-6 addr add {host6}/{len6} dev d0 nodad"));
    }
    ns.ip("link set d1 up");
    ns.ip("link set d0 up");
    if !v4.is_empty() {
        ns.sysctl("net.ipv4.ip_forward", "1");
    }
    if !v6.is_empty() {
        ns.sysctl("net.ipv6.conf.all.forwarding", "1");
    }
    let mac = BACKEND_MAC.map(|b| format!("{b:02x}")).join(":");
    for b in backends {
        ns.ip(&format!("neigh add {b} lladdr {mac} dev d0 nud permanent"));
    }
    let (ifindex, smac) = ns.link("d0");
    let mask4 = u32::MAX.checked_shl(32 - u32::from(len4)).unwrap_or(0);
    let mask6 = u128::MAX.checked_shl(128 - u32::from(len6)).unwrap_or(0);
    let fib = FastPathFib {
        // 0.0.0.0/32 and no neighbour: no IPv4 next hop.
        subnet: if v4.is_empty() {
            ([0; 4], 32)
        } else {
            ((u32::from(host4) & mask4).to_be_bytes(), len4)
        },
        ifindex,
        smac,
        mtu: 1500,
        neighbours: v4,
        subnet6: (!v6.is_empty()).then(|| ((u128::from(host6) & mask6).to_be_bytes(), len6)),
        neighbours6: v6,
    };
    (ns, fib)
}

/// The model's next hop for the FIB's answer (interface, its MAC, the neighbour's MAC,
/// as [`FastPathFib::lookup`] gives it): the bridge port `port` holds for that interface
/// and MAC, its peer flag split off.
pub fn bridge_next_hop(
    (ifindex, smac, dmac): (u32, [u8; 6], [u8; 6]),
    port: impl FnOnce(&BridgePortKey) -> Option<u32>,
) -> Option<NextHop> {
    let port = port(&BridgePortKey::new(ifindex, dmac))?;
    Some(NextHop {
        ifindex: port & !BRIDGE_PORT_PEER,
        peer: port & BRIDGE_PORT_PEER != 0,
        smac,
        dmac,
    })
}

/// The coarse monotonic clock, `bpf_ktime_get_coarse_ns`'s.
pub fn coarse_now_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec to write; the clock id is a constant.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut t) };
    assert_eq!(rc, 0, "clock_gettime");
    u64::try_from(t.tv_sec).expect("time") * 1_000_000_000 + u64::try_from(t.tv_nsec).expect("time")
}

impl<'a> KernelMaps<'a> {
    pub fn new(dp: &'a Dataplane, env: Env<'a>) -> Self {
        Self {
            dp,
            route: env.route,
            fib: env.fib,
            now_ns: coarse_now_ns(),
            gso_size: 0,
        }
    }
    fn map(&self, name: &str) -> &'a aya::maps::Map {
        self.dp
            .ebpf()
            .map(name)
            .unwrap_or_else(|| panic!("map {name}"))
    }
    fn hash_get<K: aya::Pod, V: aya::Pod>(&self, name: &str, key: &K) -> Option<V> {
        let map: HashMap<&MapData, K, V> = HashMap::try_from(self.map(name)).expect(name);
        match map.get(key, 0) {
            Ok(v) => Some(v),
            Err(MapError::KeyNotFound) => None,
            Err(e) => panic!("{name}: {e}"),
        }
    }
    fn hash_len<K: aya::Pod, V: aya::Pod>(&self, name: &str) -> usize {
        let map: HashMap<&MapData, K, V> = HashMap::try_from(self.map(name)).expect(name);
        map.keys().count()
    }
    fn array_get<V: aya::Pod>(&self, name: &str, index: u32) -> V {
        let map: Array<&MapData, V> = Array::try_from(self.map(name)).expect(name);
        map.get(&index, 0)
            .unwrap_or_else(|e| panic!("{name}[{index}]: {e}"))
    }
    /// How many entries the flow maps hold: (conntrack of both families, embryonic of
    /// both families, NAT64 flows, NAT64 replies).
    pub fn flow_counts(&self) -> (usize, usize, usize, usize) {
        (
            self.hash_len::<FlowKeyV4, FlowV4>(CONNTRACK_V4)
                + self.hash_len::<FlowKeyV6, FlowV6>(CONNTRACK_V6),
            self.hash_len::<FlowKeyV4, FlowV4>(EMBRYONIC_V4)
                + self.hash_len::<FlowKeyV6, FlowV6>(EMBRYONIC_V6),
            self.hash_len::<FlowKeyV6, Nat64Flow>(NAT64_FLOWS),
            self.hash_len::<FlowKeyV4, Nat64Reply>(NAT64_REPLIES),
        )
    }
}

impl RuleMaps for KernelMaps<'_> {
    fn published(&self, port_be: [u8; 2]) -> u8 {
        self.array_get(PUBLISHED_PORTS, u16::from_be_bytes(port_be).into())
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

impl Maps for KernelMaps<'_> {
    fn backend_ports(&self, port_be: [u8; 2]) -> u8 {
        self.array_get(BACKEND_PORTS, u16::from_be_bytes(port_be).into())
    }
    fn flow_v4(&self, key: &FlowKeyV4) -> Option<FlowV4> {
        self.hash_get(CONNTRACK_V4, key)
    }
    fn flow_v6(&self, key: &FlowKeyV6) -> Option<FlowV6> {
        self.hash_get(CONNTRACK_V6, key)
    }
    fn embryonic_v4(&self, key: &FlowKeyV4) -> Option<FlowV4> {
        self.hash_get(EMBRYONIC_V4, key)
    }
    fn embryonic_v6(&self, key: &FlowKeyV6) -> Option<FlowV6> {
        self.hash_get(EMBRYONIC_V6, key)
    }
    fn is_nat64_reply(&self, key: &FlowKeyV4) -> bool {
        self.nat64_reply(key).is_some()
    }
    fn config_flags(&self) -> u64 {
        self.array_get::<Config>(CONFIG, 0).flags
    }
    /// The test namespace's FIB (none: [`compare_in`] checks the fast path is off),
    /// then the kernel's copy of the bridge ports.
    fn next_hop(&self, q: &FibQuery) -> Option<NextHop> {
        bridge_next_hop(self.fib?.lookup(q.dst, q.tot_len)?, |k| {
            self.hash_get(BRIDGE_PORTS, k)
        })
    }
    fn next_hop_v6(&self, q: &FibQuery<16>) -> Option<NextHop> {
        bridge_next_hop(self.fib?.lookup_v6(q.src, q.dst, q.tot_len)?, |k| {
            self.hash_get(BRIDGE_PORTS, k)
        })
    }
}

impl Nat64Maps for KernelMaps<'_> {
    fn nat64_flow(&self, key: &FlowKeyV6) -> Option<Nat64Flow> {
        self.hash_get(NAT64_FLOWS, key)
    }
    fn nat64_reply(&self, key: &FlowKeyV4) -> Option<Nat64Reply> {
        self.hash_get(NAT64_REPLIES, key)
    }
    fn route_v4(&self, _: [u8; 4]) -> Option<Route> {
        self.route
    }
    /// BPF_PROG_RUN's skb is on the namespace's loopback device.
    fn ingress_ifindex(&self) -> u32 {
        1
    }
    fn now_ns(&self) -> u64 {
        self.now_ns
    }
    fn gso_size(&self) -> u32 {
        self.gso_size
    }
}

/// The model's hook for a program (`None`: NAT64's entry, [`nat64::entry`]).
pub fn hook(prog: Prog) -> Option<Hook> {
    match prog {
        Prog::XdpIngress => Some(Hook::XdpIngress),
        Prog::XdpVirtual => Some(Hook::XdpVirtual),
        Prog::XdpGeneric => Some(Hook::XdpGeneric),
        Prog::TcIngress => Some(Hook::TcIngress),
        Prog::TcEgress => Some(Hook::TcEgress),
        Prog::Nat64Entry => None,
    }
}

/// The return code of `verdict` at `prog`'s hook (a redirect in BPF_PROG_RUN returns
/// the hook's redirect action).
pub fn action(prog: Prog, verdict: Verdict) -> u32 {
    const XDP_REDIRECT: u32 = 4;
    match (prog, verdict) {
        (_, Verdict::Pass) => prog.pass_verdict(),
        (Prog::XdpIngress | Prog::XdpVirtual | Prog::XdpGeneric, Verdict::Drop) => XDP_DROP,
        (_, Verdict::Drop) => TC_SHOT,
        (Prog::XdpIngress | Prog::XdpVirtual | Prog::XdpGeneric, Verdict::Redirect(_)) => {
            XDP_REDIRECT
        }
        (Prog::XdpIngress | Prog::XdpVirtual | Prog::XdpGeneric, Verdict::RedirectPeer(_)) => {
            panic!("XDP has no peer redirect")
        }
        (_, Verdict::Redirect(_) | Verdict::RedirectPeer(_) | Verdict::RedirectNeigh(_)) => {
            TC_REDIRECT
        }
        (_, Verdict::TailCallNat64) => panic!("a tail call is not a verdict"),
    }
}

/// Whether the kernel's test run refuses `frame` at `prog` (EINVAL): any frame shorter
/// than an Ethernet header, and at TC one shorter than the IP header its ethertype
/// announces (such an skb never reaches TC: the stack drops it first).
pub fn refuses(prog: Prog, frame: &[u8]) -> bool {
    let l3_min = match frame.get(12..14) {
        None => return true,
        Some(_) if matches!(prog, Prog::XdpIngress | Prog::XdpVirtual | Prog::XdpGeneric) => 0,
        Some([0x08, 0x00]) => IP4,
        Some([0x86, 0xdd]) => IP6,
        Some(_) => 0,
    };
    frame.len() < ETH + l3_min
}

/// Where a comparison runs: BPF_PROG_RUN answers FIB lookups from the caller's network
/// namespace, so NAT64 runs inside one, whose route to the backends the model is told.
#[derive(Clone, Copy, Default)]
pub struct Env<'a> {
    pub ns: Option<&'a Netns>,
    /// NAT64's route to the backends.
    pub route: Option<Route>,
    /// The fast path's FIB.
    pub fib: Option<&'a FastPathFib>,
}

/// What one run did, kernel and model agreeing.
pub struct Compared {
    pub verdict: u32,
    pub output: Vec<u8>,
    /// The model's outcome of the program run (at NAT64's entry: a pass, or a tail call).
    pub outcome: Outcome,
    /// The NAT64 program's, when the program jumped to it.
    pub nat64: Option<Nat64Outcome>,
    /// How much each reason counter grew.
    pub counted: Vec<(Reason, u64)>,
}

/// [`compare_in`], outside any namespace (the fast path off, no NAT64 rules).
pub fn compare(dp: &Dataplane, prog: Prog, input: &[u8]) -> Option<Compared> {
    compare_in(dp, Env::default(), prog, input)
}

/// Runs `prog` on `input` in the kernel (inside `env`'s namespace) and in the model (on
/// the maps as the kernel has them just before) and asserts they agree on everything
/// observable: the verdict, the output bytes, the reasons counted (exactly those, once
/// each), the flows recorded (conntrack, NAT64 both ways) and no others, the rule
/// counted. `None`: the kernel refuses to run the frame at all, as [`refuses`]
/// predicts (also asserted). The seed of frame fuzzing: callers feed it any bytes.
pub fn compare_in(dp: &Dataplane, env: Env<'_>, prog: Prog, input: &[u8]) -> Option<Compared> {
    compare_gso_in(dp, env, prog, input, 0)
}

/// As [`compare_in`], the frame a GSO packet of `gso_size` payload bytes a segment when
/// not 0 ([`try_test_run_gso`]; TC programs only, in a namespace).
pub fn compare_gso_in(
    dp: &Dataplane,
    env: Env<'_>,
    prog: Prog,
    input: &[u8],
    gso_size: u32,
) -> Option<Compared> {
    let mut maps = KernelMaps::new(dp, env);
    maps.gso_size = gso_size;
    if env.fib.is_none() {
        assert_eq!(
            maps.config_flags() & (CONFIG_FAST_PATH | CONFIG_FAST_PATH_NATIVE_XDP),
            0,
            "the fast path asks the FIB: give the model the namespace's (Env::fib)"
        );
    }
    let mut expect = input.to_vec();
    let outcome = match hook(prog) {
        Some(h) => model::run(h, &maps, &mut expect),
        None if nat64::entry(&maps, input) => Outcome::uncounted(Verdict::TailCallNat64),
        None => Outcome::uncounted(Verdict::Pass),
    };
    let nat64 = (outcome.verdict == Verdict::TailCallNat64).then(|| {
        let mut out = vec![0u8; input.len() + 20];
        let o = nat64::program(&maps, input, &mut out);
        out.truncate(o.len);
        expect = out;
        o
    });
    let (verdict_want, reasons_want, rule) = match &nat64 {
        Some(o) if o.reclaimed => {
            let mut reasons = vec![o.reason, Reason::Nat64PortReclaimed];
            if o.reclaimed_early {
                reasons.push(Reason::Nat64PortReclaimedEarly);
            }
            (o.verdict, reasons, o.rule)
        }
        Some(o) => (o.verdict, vec![o.reason], o.rule),
        None => (outcome.verdict, outcome.counted().collect(), outcome.rule),
    };
    // Table sizes after the run. Ingress: an embryonic flow under a new key adds one
    // there, and removes the established entry it replaces. Reply: a promotion moves
    // one entry from the embryonic table to the established one.
    let (mut ct_delta, mut emb_delta) = (0isize, 0isize);
    match outcome.flow {
        Some(FlowWrite::V4(k, _)) => {
            emb_delta += isize::from(maps.embryonic_v4(&k).is_none());
            ct_delta -= isize::from(maps.flow_v4(&k).is_some());
        }
        Some(FlowWrite::V6(k, _)) => {
            emb_delta += isize::from(maps.embryonic_v6(&k).is_none());
            ct_delta -= isize::from(maps.flow_v6(&k).is_some());
        }
        None => {}
    }
    if outcome.promoted.is_some() {
        (ct_delta, emb_delta) = (1, -1);
    }
    let new_nat64_flow = nat64
        .and_then(|o| o.flow)
        .is_some_and(|(k, _)| maps.nat64_flow(&k).is_none());
    let new_nat64_reply = nat64
        .and_then(|o| o.reply)
        .is_some_and(|(k, _)| maps.nat64_reply(&k).is_none());
    let counts_before = maps.flow_counts();
    let rule_before = rule.map(|r| dp.rule_stats(r.slot).expect("rule stats"));
    let reasons_before = dp.reason_stats().expect("reason stats");

    let ran = match env.ns {
        Some(ns) => match prog {
            Prog::XdpIngress | Prog::XdpVirtual | Prog::XdpGeneric => {
                assert_eq!(gso_size, 0, "an XDP frame is never a GSO packet");
                let p = xdp_program(dp, prog.name());
                ns.run(|| try_test_run(p, input))
            }
            _ => {
                let p = tc_program(dp, prog.name());
                ns.run(|| try_test_run_gso(p, input, gso_size))
            }
        },
        None => {
            assert_eq!(gso_size, 0, "GSO runs are NAT64's, in a namespace");
            try_run(dp, prog, input)
        }
    };
    let refused = refuses(prog, input);
    let (verdict, output) = match ran {
        Ok(r) => {
            assert!(!refused, "{prog:?}: a frame the test run should refuse");
            r
        }
        Err(e) => {
            assert!(refused, "{prog:?}: test run refused: {e}");
            return None;
        }
    };

    let counted: Vec<(Reason, u64)> = dp
        .reason_stats()
        .expect("reason stats")
        .into_iter()
        .zip(reasons_before)
        .map(|((r, after), (_, before))| (r, after - before))
        .filter(|(_, n)| *n != 0)
        .collect();
    let mut want: Vec<(Reason, u64)> = reasons_want.into_iter().map(|r| (r, 1)).collect();
    want.sort_by_key(|(r, _)| *r as u32);
    let ctx = || format!("{prog:?} on {input:02x?}: model {outcome:?} {nat64:?}");
    assert_eq!(verdict, action(prog, verdict_want), "verdict, {}", ctx());
    assert_eq!(output, expect, "output bytes, {}", ctx());
    assert_eq!(counted, want, "reasons counted, {}", ctx());
    match outcome.flow {
        Some(FlowWrite::V4(k, v)) => {
            assert_eq!(maps.embryonic_v4(&k), Some(v), "embryonic flow, {}", ctx());
            assert_eq!(maps.flow_v4(&k), None, "no established flow, {}", ctx());
        }
        Some(FlowWrite::V6(k, v)) => {
            assert_eq!(maps.embryonic_v6(&k), Some(v), "embryonic flow, {}", ctx());
            assert_eq!(maps.flow_v6(&k), None, "no established flow, {}", ctx());
        }
        None => {}
    }
    match outcome.promoted {
        Some(FlowWrite::V4(k, v)) => {
            assert_eq!(maps.flow_v4(&k), Some(v), "promoted flow, {}", ctx());
            assert_eq!(maps.embryonic_v4(&k), None, "promoted away, {}", ctx());
        }
        Some(FlowWrite::V6(k, v)) => {
            assert_eq!(maps.flow_v6(&k), Some(v), "promoted flow, {}", ctx());
            assert_eq!(maps.embryonic_v6(&k), None, "promoted away, {}", ctx());
        }
        None => {}
    }
    if let Some((k, v)) = nat64.and_then(|o| o.flow) {
        assert_eq!(maps.nat64_flow(&k), Some(v), "NAT64 flow, {}", ctx());
    }
    if let Some((k, v)) = nat64.and_then(|o| o.reply) {
        // The kernel's time is its own, read during the run: not before ours.
        let got = maps.nat64_reply(&k).expect("NAT64 reply entry");
        assert!(
            got.last_seen_ns >= v.last_seen_ns,
            "NAT64 reply time, {}",
            ctx()
        );
        let got = Nat64Reply {
            last_seen_ns: v.last_seen_ns,
            ..got
        };
        assert_eq!(got, v, "NAT64 reply entry, {}", ctx());
    }
    let (flows, embryonic, n64_flows, n64_replies) = counts_before;
    assert_eq!(
        maps.flow_counts(),
        (
            flows.checked_add_signed(ct_delta).expect("conntrack count"),
            embryonic
                .checked_add_signed(emb_delta)
                .expect("embryonic count"),
            n64_flows + usize::from(new_nat64_flow),
            n64_replies + usize::from(new_nat64_reply)
        ),
        "flows recorded, {}",
        ctx()
    );
    if let (Some(r), Some(before)) = (rule, rule_before) {
        let after = dp.rule_stats(r.slot).expect("rule stats");
        // The length the program saw when it counted: after a family change.
        let len = expect.len() as u64;
        let (packets, bytes) = if r.reply {
            (
                after.reply_packets - before.reply_packets,
                after.reply_bytes - before.reply_bytes,
            )
        } else {
            (after.packets - before.packets, after.bytes - before.bytes)
        };
        assert_eq!((packets, bytes), (1, len), "rule counted, {}", ctx());
    }
    Some(Compared {
        verdict,
        output,
        outcome,
        nat64,
        counted,
    })
}

/// [`run`], checked against the model ([`compare`]) on a frame the kernel accepts.
pub fn run_checked(dp: &Dataplane, prog: Prog, input: &[u8]) -> (u32, Vec<u8>) {
    let c = compare(dp, prog, input).expect("a frame the kernel runs");
    (c.verdict, c.output)
}
