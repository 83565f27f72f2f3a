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

use aya::programs::{tc::SchedClassifier, ProgramError, TestRun, TestRunOptions, Xdp};
use aya::TestRunResult;
use etherparse::{IpHeaders, Ipv4Extensions, Ipv4Header, Ipv4Options, PacketBuilder};
use portfwd::dataplane::Dataplane;
use portfwd_common::{programs, proto, Reason};

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
    XdpIngress,
    TcIngress,
    TcEgress,
}

impl Prog {
    pub fn name(self) -> &'static str {
        match self {
            Prog::XdpIngress => programs::XDP_INGRESS,
            Prog::TcIngress => programs::TC_INGRESS,
            Prog::TcEgress => programs::TC_EGRESS,
        }
    }
    /// The verdict that means "go on to the stack, untouched or translated".
    pub fn pass_verdict(self) -> u32 {
        match self {
            Prog::XdpIngress => XDP_PASS,
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
    // Room for a frame that grows (NAT64 to IPv6 adds 20 bytes).
    let mut out = vec![0u8; input.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(input);
    opts.data_out = Some(&mut out);
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
        Prog::XdpIngress => try_test_run(xdp_program(dp, prog.name()), input),
        Prog::TcIngress | Prog::TcEgress => try_test_run(tc_program(dp, prog.name()), input),
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
/// more packet counted under the expected reason.
pub fn check_case(dp: &Dataplane, prog: Prog, case: &Case) {
    let before = reason_count(dp, case.reason);
    let (verdict, out) = run(dp, prog, &case.input);
    assert_eq!(
        verdict,
        prog.pass_verdict(),
        "{prog:?}: {}: verdict",
        case.what
    );
    let expect = case.expect.as_ref().unwrap_or(&case.input);
    assert_eq!(&out, expect, "{prog:?}: {}: output bytes", case.what);
    assert_eq!(
        reason_count(dp, case.reason),
        before + 1,
        "{prog:?}: {}: counted as {:?}",
        case.what,
        case.reason
    );
}
