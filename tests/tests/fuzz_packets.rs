//! Packet fuzzing against the model: at least a million random and mutated frames (both
//! families, every protocol, 802.1Q/802.1ad tags, IPv4 options and fragments, IPv6
//! extension headers, truncated headers, wrong lengths, flags and checksums, partial
//! (offloaded) checksums, and mutations of the seed corpus in `tests/corpus/packets/`)
//! through BPF_PROG_RUN of every packet program: native (NIC and virtual device) and
//! generic XDP ingress, TC ingress (NAT64 followed through its tail call), TC egress
//! and NAT64's entry; plus the backend's reply to every flow a frame records. Every
//! output is compared with the model (`fuzz::Fuzzer`: verdict and bytes per frame;
//! reason counters, rule counters and the whole flow tables per batch). The
//! configuration (fast path at each hook, NAT64) changes from batch to batch.
//!
//! `PORTFWD_FUZZ_FRAMES` (default 1,000,000) and `PORTFWD_FUZZ_SEED` (default fixed,
//! printed) size and reproduce a run; a disagreement prints the frame as hex, ready to
//! join the corpus.
//!
//! Needs root; skips without it, except under `CI=true`, where it fails.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::{Duration, Instant};

use portfwd::dataplane::Dataplane;
use portfwd_common::model::nat64::Route;
use portfwd_common::model::FlowWrite;
use portfwd_common::{
    proto, BackendV4, BackendV6, BridgePortKey, FlowKeyV4, FlowV4, RuleKeyV4, RuleKeyV6,
    BRIDGE_PORT_PEER, NAT64_PORT_COUNT, NAT64_PORT_MIN,
};
use portfwd_tests::fixture::{
    backend_net, privileged, Env, FastPathFib, Prog, BACKEND_MAC, BACKEND_NET4, MAC_A, MAC_B,
};
use portfwd_tests::fuzz::{Fuzzer, Rng};
use portfwd_tests::{env_u64, netns::Netns};

const HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const HOST2: Ipv4Addr = Ipv4Addr::new(198, 18, 9, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const OTHER: Ipv4Addr = Ipv4Addr::new(198, 19, 7, 7);
/// The host's address on the backends' network (NAT64's source), and a backend.
const HOST_BACK: Ipv4Addr = BACKEND_NET4.0;
const BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
const HOST6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
const HOST6_2: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 9, 0, 0, 0, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 7, 0, 0, 0, 7);
const BACKEND6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 2);
const BRIDGE_PORT: u32 = 77;

/// Published ports first (9002 and 5354 are NAT64's), then backends', clients', NAT64's.
const PORTS: [u16; 12] = [
    9000, 5353, 9001, 9002, 5354, 7000, 53, 8080, 40000, 61000, 1, 0,
];
const PUBLISHED: usize = 6;
const SLOTS: [u32; 9] = [1, 2, 3, 4, 5, 6, 7, 8, 9];
/// Frames per batch: counters and flow tables are checked, then emptied, at its end.
const BATCH: u64 = 2_000;
/// A batch is cut short after this long (see the loop).
const MAX_BATCH_TIME: Duration = Duration::from_secs(3);

/// Every rule kind: address-bound and wildcard, TCP and UDP, both families, NAT64 (an
/// IPv6 rule to an IPv4-only backend), and an IPv4 wildcard IPv6 frames must not use.
fn dataplane() -> Dataplane {
    let mut dp = Dataplane::load().expect("load programs");
    let v4 = [
        (HOST, 9000, proto::TCP, 8080, 1),
        (Ipv4Addr::UNSPECIFIED, 5353, proto::UDP, 53, 2),
        (Ipv4Addr::UNSPECIFIED, 9001, proto::TCP, 8080, 3),
        (Ipv4Addr::UNSPECIFIED, 7000, proto::TCP, 8080, 9),
    ];
    for (addr, port, l4, bport, slot) in v4 {
        dp.insert_rule(
            RuleKeyV4::from_parts(addr, port, l4),
            BackendV4::new(BACKEND, bport, slot),
        )
        .expect("rule");
    }
    let mapped = BACKEND.to_ipv6_mapped();
    let v6 = [
        (HOST6, 9000, proto::TCP, BACKEND6, 8080, 4),
        (Ipv6Addr::UNSPECIFIED, 5353, proto::UDP, BACKEND6, 53, 5),
        (Ipv6Addr::UNSPECIFIED, 9002, proto::TCP, mapped, 8080, 6),
        (Ipv6Addr::UNSPECIFIED, 5354, proto::UDP, mapped, 53, 7),
        (Ipv6Addr::UNSPECIFIED, 9001, proto::TCP, BACKEND6, 8080, 8),
    ];
    for (addr, port, l4, backend, bport, slot) in v6 {
        dp.insert_rule_v6(
            RuleKeyV6::from_parts(addr, port, l4),
            BackendV6::new(backend, bport, slot),
        )
        .expect("rule");
    }
    dp.sync_host_addrs(&[HOST, HOST2].into_iter().collect())
        .expect("host addrs");
    dp.sync_host_addrs_v6(&[HOST6, HOST6_2].into_iter().collect())
        .expect("host addrs");
    dp
}

/// The namespace the runs happen in: both families' backends' subnets on `d0` (NAT64's
/// route and the fast path's FIB), the backends' MAC a permanent neighbour.
fn net() -> (Netns, FastPathFib, Route) {
    let (ns, fib) = backend_net("fz", &[BACKEND.into(), BACKEND6.into()]);
    let route = Route {
        src: HOST_BACK.octets(),
        ifindex: fib.ifindex,
        mtu: fib.mtu,
    };
    (ns, fib, route)
}

/// The seed corpus: one frame per `*.hex` file (whitespace ignored).
fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/packets");
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "hex"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("corpus file");
            let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
            let frame = digits
                .chunks(2)
                .map(|d| {
                    u8::from_str_radix(std::str::from_utf8(d).expect("hex"), 16)
                        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
                })
                .collect();
            (p.display().to_string(), frame)
        })
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 10, "the seed corpus in {}", dir.display());
    seeds
}

/// The one's-complement sum of `data`, folded, not inverted.
fn sum16(mut acc: u32, data: &[u8]) -> u32 {
    for c in data.chunks(2) {
        acc += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// Both ends of a frame.
#[derive(Clone, Copy)]
enum Addrs {
    V4([u8; 4], [u8; 4]),
    V6([u8; 16], [u8; 16]),
}

/// A frame's description, built into bytes by [`Spec::bytes`] with correct lengths and
/// checksums, then spoiled as `spoil` says.
struct Spec {
    macs: ([u8; 6], [u8; 6]),
    /// TPIDs of the tags, outermost first.
    tags: Vec<u16>,
    addrs: Addrs,
    proto: u8,
    ports: (u16, u16),
    tcp_flags: u8,
    ttl: u8,
    /// IPv4 options (a multiple of 4 bytes).
    options: Vec<u8>,
    /// IPv4 flags and fragment offset word.
    frag: u16,
    /// IPv6 extension headers, in order.
    exts: Vec<u8>,
    payload: Vec<u8>,
    /// Bit set: 1 IP checksum, 2 IP length, 4 L4 checksum random, 8 L4 checksum zero,
    /// 16 UDP length or TCP data offset, 32 IHL, 64 version, 128 L4 checksum partial
    /// (the pseudo-header sum, as a local stack with checksum offload sends it).
    spoil: u8,
    spoil_value: u16,
}

impl Spec {
    fn bytes(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(128 + self.payload.len());
        f.extend_from_slice(&self.macs.1);
        f.extend_from_slice(&self.macs.0);
        for (i, tpid) in self.tags.iter().enumerate() {
            f.extend_from_slice(&tpid.to_be_bytes());
            // The tag's TCI (VLAN id), the next TPID or ethertype follows.
            f.extend_from_slice(&(100 + i as u16).to_be_bytes());
        }
        let v4 = matches!(self.addrs, Addrs::V4(..));
        f.extend_from_slice(&if v4 { 0x0800u16 } else { 0x86dd }.to_be_bytes());
        let ip_off = f.len();
        let l4 = self.l4();
        let pseudo = match self.addrs {
            Addrs::V4(s, d) => {
                let hlen = 20 + self.options.len();
                let tot = (hlen + l4.len()) as u16;
                f.push(0x40 | (hlen / 4) as u8);
                f.push(0);
                f.extend_from_slice(&tot.to_be_bytes());
                f.extend_from_slice(&[0x12, 0x34]);
                f.extend_from_slice(&self.frag.to_be_bytes());
                f.extend_from_slice(&[self.ttl, self.proto, 0, 0]);
                f.extend_from_slice(&s);
                f.extend_from_slice(&d);
                f.extend_from_slice(&self.options);
                let c = fold(sum16(0, &f[ip_off..]));
                f[ip_off + 10..ip_off + 12].copy_from_slice(&c.to_be_bytes());
                let mut p = sum16(0, &s);
                p = sum16(p, &d);
                sum16(p, &[0, self.proto, (l4.len() >> 8) as u8, l4.len() as u8])
            }
            Addrs::V6(s, d) => {
                let first = self.exts.first().copied().unwrap_or(self.proto);
                let plen = (l4.len() + 8 * self.exts.len()) as u16;
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&plen.to_be_bytes());
                f.extend_from_slice(&[first, self.ttl]);
                f.extend_from_slice(&s);
                f.extend_from_slice(&d);
                for (i, &e) in self.exts.iter().enumerate() {
                    let next = self.exts.get(i + 1).copied().unwrap_or(self.proto);
                    let ext = match e {
                        // Fragment: offset, M set, an identification.
                        44 => [next, 0, 0, 1, 0x12, 0x34, 0x56, 0x78],
                        _ => [next, 0, 1, 4, 0, 0, 0, 0],
                    };
                    f.extend_from_slice(&ext);
                }
                let mut p = sum16(0, &s);
                p = sum16(p, &d);
                let n = l4.len() as u32;
                sum16(p, &[0, 0, (n >> 8) as u8, n as u8, 0, 0, 0, self.proto])
            }
        };
        let l4_off = f.len();
        f.extend_from_slice(&l4);
        let csum_at = match self.proto {
            proto::TCP => Some(l4_off + 16),
            proto::UDP => Some(l4_off + 6),
            1 | 58 => Some(l4_off + 2),
            _ => None,
        };
        if let Some(at) = csum_at {
            let c = if self.proto == 1 {
                fold(sum16(0, &f[l4_off..]))
            } else {
                fold(sum16(pseudo, &f[l4_off..]))
            };
            f[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
        self.spoil(&mut f, ip_off, l4_off, csum_at, !fold(pseudo));
        f
    }

    /// The transport header and payload, checksum zero.
    fn l4(&self) -> Vec<u8> {
        let (sp, dp) = (self.ports.0.to_be_bytes(), self.ports.1.to_be_bytes());
        let mut h = match self.proto {
            proto::TCP => {
                let mut t = vec![sp[0], sp[1], dp[0], dp[1]];
                t.extend_from_slice(&1000u32.to_be_bytes());
                t.extend_from_slice(&2000u32.to_be_bytes());
                t.extend_from_slice(&[0x50, self.tcp_flags, 0xfa, 0xf0, 0, 0, 0, 0]);
                t
            }
            proto::UDP => {
                let len = (8 + self.payload.len()) as u16;
                let l = len.to_be_bytes();
                vec![sp[0], sp[1], dp[0], dp[1], l[0], l[1], 0, 0]
            }
            // ICMP echo, or the other protocols' first bytes.
            _ => vec![8, 0, 0, 0, sp[0], sp[1], dp[0], dp[1]],
        };
        h.extend_from_slice(&self.payload);
        h
    }

    fn spoil(
        &self,
        f: &mut [u8],
        ip_off: usize,
        l4_off: usize,
        csum_at: Option<usize>,
        partial: u16,
    ) {
        let v = self.spoil_value.to_be_bytes();
        let v4 = matches!(self.addrs, Addrs::V4(..));
        let mut set = |at: usize, bytes: &[u8]| {
            if let Some(s) = f.get_mut(at..at + bytes.len()) {
                s.copy_from_slice(bytes);
            }
        };
        if self.spoil & 1 != 0 && v4 {
            set(ip_off + 10, &v);
        }
        if self.spoil & 2 != 0 {
            set(ip_off + if v4 { 2 } else { 4 }, &v);
        }
        if let Some(at) = csum_at {
            if self.spoil & 4 != 0 {
                set(at, &v);
            }
            if self.spoil & 8 != 0 {
                set(at, &[0, 0]);
            }
            if self.spoil & 128 != 0 && self.proto != 1 {
                set(at, &partial.to_be_bytes());
            }
        }
        if self.spoil & 16 != 0 {
            match self.proto {
                proto::UDP => set(l4_off + 4, &v),
                proto::TCP => set(l4_off + 12, &[v[0]]),
                _ => {}
            }
        }
        if self.spoil & 32 != 0 && v4 {
            set(ip_off, &[0x40 | (v[1] & 0x0f)]);
        }
        if self.spoil & 64 != 0 {
            set(ip_off, &[v[1]]);
        }
    }
}

/// The frame generator: structured frames over the fixture's addresses and ports,
/// mutations of the corpus and of recent frames that were translated, raw bytes.
struct Gen {
    rng: Rng,
    corpus: Vec<Vec<u8>>,
    /// Recent frames some program translated.
    translated: Vec<Vec<u8>>,
}

const V4_ADDRS: [Ipv4Addr; 6] = [HOST, HOST2, CLIENT, OTHER, BACKEND, HOST_BACK];
const V6_ADDRS: [Ipv6Addr; 5] = [HOST6, HOST6_2, CLIENT6, OTHER6, BACKEND6];
/// Protocols besides TCP and UDP: ICMP, IGMP, GRE, ESP, ICMPv6, SCTP, UDP-Lite, reserved.
const OTHER_PROTOS: [u8; 8] = [1, 2, 47, 50, 58, 132, 136, 255];
/// IPv6 extension headers: hop-by-hop, routing, fragment, destination options, AH, ESP,
/// mobility, HIP, shim6, experimental.
const EXTS: [u8; 10] = [0, 43, 44, 60, 51, 50, 135, 139, 140, 253];
/// Bytes and words worth writing anywhere.
const BYTES: [u8; 12] = [0, 1, 2, 4, 5, 6, 0x11, 0x2c, 0x45, 0x60, 0x7f, 0xff];
const WORDS: [u16; 12] = [
    0, 0xffff, 0x0800, 0x86dd, 0x8100, 0x88a8, 0x2000, 0x4000, 9000, 5353, 9002, 61000,
];

impl Gen {
    fn v4(&mut self, host: bool) -> [u8; 4] {
        match self.rng.below(8) {
            _ if host => V4_ADDRS[self.rng.below(2)].octets(),
            0 => self.rng.next_u64().to_be_bytes()[..4]
                .try_into()
                .expect("4 bytes"),
            _ => self.rng.pick(&V4_ADDRS).octets(),
        }
    }
    fn v6(&mut self, host: bool) -> [u8; 16] {
        match self.rng.below(8) {
            _ if host => V6_ADDRS[self.rng.below(2)].octets(),
            0 => {
                let mut a = [0; 16];
                a[..8].copy_from_slice(&self.rng.next_u64().to_be_bytes());
                a[8..].copy_from_slice(&self.rng.next_u64().to_be_bytes());
                a
            }
            1 => BACKEND.to_ipv6_mapped().octets(),
            _ => self.rng.pick(&V6_ADDRS).octets(),
        }
    }
    fn port(&mut self, published: bool) -> u16 {
        match self.rng.below(10) {
            _ if published => PORTS[self.rng.below(PUBLISHED)],
            0..=2 => self.rng.u16(),
            3 => NAT64_PORT_MIN + self.rng.u16() % NAT64_PORT_COUNT,
            _ => *self.rng.pick(&PORTS),
        }
    }
    fn tcp_flags(&mut self) -> u8 {
        // SYN, ACK, SYN|ACK, FIN|ACK, RST, PSH|ACK, anything.
        match self.rng.below(7) {
            6 => self.rng.byte(),
            i => [0x02, 0x10, 0x12, 0x11, 0x04, 0x18][i],
        }
    }

    fn structured(&mut self) -> Vec<u8> {
        let v4 = self.rng.chance(50);
        let to_host = self.rng.chance(70);
        let addrs = if v4 {
            Addrs::V4(self.v4(false), self.v4(to_host))
        } else {
            Addrs::V6(self.v6(false), self.v6(to_host))
        };
        let proto = match self.rng.below(10) {
            0..=3 => proto::TCP,
            4..=6 => proto::UDP,
            _ => *self.rng.pick(&OTHER_PROTOS),
        };
        let tags = match self.rng.below(10) {
            0 => vec![0x8100],
            1 => vec![0x88a8],
            2 if self.rng.chance(30) => vec![0x88a8, 0x8100],
            _ => vec![],
        };
        let options = if v4 && self.rng.chance(15) {
            let words = 1 + self.rng.below(10);
            match self.rng.below(3) {
                0 => {
                    let mut o = vec![1; words * 4];
                    o[words * 4 - 1] = 0;
                    o
                }
                _ => self.rng.bytes(words * 4),
            }
        } else {
            Vec::new()
        };
        let frag = match self.rng.below(12) {
            0 => 0x2000,                  // MF
            1 => self.rng.u16() & 0x1fff, // an offset
            2 => 0x4000,                  // DF
            3 => self.rng.u16(),
            _ => 0,
        };
        let exts = if !v4 && self.rng.chance(15) {
            (0..1 + self.rng.below(3))
                .map(|_| *self.rng.pick(&EXTS))
                .collect()
        } else {
            Vec::new()
        };
        let payload_len = match self.rng.below(20) {
            0 => 1000 + self.rng.below(500),
            1..=4 => 0,
            _ => self.rng.below(64),
        };
        let spoil = if self.rng.chance(20) {
            1 << self.rng.below(8)
        } else {
            0
        };
        let spoil_value = if self.rng.chance(50) {
            *self.rng.pick(&WORDS)
        } else {
            self.rng.u16()
        };
        let ports = (self.port(false), self.port(to_host));
        let spec = Spec {
            macs: (MAC_A, MAC_B),
            tags,
            addrs,
            proto,
            ports,
            tcp_flags: self.tcp_flags(),
            ttl: *self.rng.pick(&[64, 64, 64, 1, 0, 2, 255]),
            options,
            frag,
            exts,
            payload: self.rng.bytes(payload_len),
            spoil,
            spoil_value,
        };
        let mut f = spec.bytes();
        match self.rng.below(10) {
            0 => f.truncate(self.rng.below(f.len() + 1)),
            1 => {
                let i = self.rng.below(f.len());
                f[i] ^= 1 << self.rng.below(8);
            }
            _ => {}
        }
        f
    }

    fn mutated(&mut self) -> Vec<u8> {
        let from_recent = !self.translated.is_empty() && self.rng.chance(40);
        let mut f = if from_recent {
            self.rng.pick(&self.translated).clone()
        } else {
            self.rng.pick(&self.corpus).clone()
        };
        for _ in 0..1 + self.rng.below(4) {
            let n = f.len().max(1);
            let at = self.rng.below(n);
            match self.rng.below(10) {
                0 if !f.is_empty() => f[at] ^= 1 << self.rng.below(8),
                1 if !f.is_empty() => f[at] = self.rng.byte(),
                2 if !f.is_empty() => f[at] = *self.rng.pick(&BYTES),
                3 => f.truncate(at),
                4 => {
                    let n = 1 + self.rng.below(32);
                    let more = self.rng.bytes(n);
                    f.extend_from_slice(&more);
                }
                5 if at < f.len() => {
                    let end = (at + 1 + self.rng.below(8)).min(f.len());
                    f.drain(at..end);
                }
                6 => {
                    let n = 1 + self.rng.below(8);
                    let more = self.rng.bytes(n);
                    let at = at.min(f.len());
                    f.splice(at..at, more);
                }
                7 if at + 2 <= f.len() => {
                    let w = *self.rng.pick(&WORDS);
                    f[at..at + 2].copy_from_slice(&w.to_be_bytes());
                }
                8 => {
                    let other = self.rng.pick(&self.corpus).clone();
                    let cut = self.rng.below(other.len() + 1);
                    f.truncate(at);
                    f.extend_from_slice(&other[cut..]);
                }
                9 => {
                    let host = self.rng.chance(50);
                    let a: Vec<u8> = if self.rng.chance(50) {
                        self.v4(host).to_vec()
                    } else {
                        self.v6(host).to_vec()
                    };
                    if at + a.len() <= f.len() {
                        f[at..at + a.len()].copy_from_slice(&a);
                    }
                }
                _ => {}
            }
        }
        f.truncate(1600);
        f
    }

    fn raw(&mut self) -> Vec<u8> {
        let n = self.rng.below(120);
        let mut f = self.rng.bytes(n);
        if f.len() >= 15 && self.rng.chance(60) {
            let (ty, ver) = *self.rng.pick(&[(0x0800u16, 0x45u8), (0x86dd, 0x60)]);
            f[12..14].copy_from_slice(&ty.to_be_bytes());
            f[14] = ver;
        }
        f
    }

    fn frame(&mut self) -> Vec<u8> {
        match self.rng.below(10) {
            0..=4 => self.structured(),
            5..=8 => self.mutated(),
            _ => self.raw(),
        }
    }

    /// The backend's answer on a flow: `src` to `dst`, proto `l4`.
    fn answer(&mut self, addrs: Addrs, l4: u8, ports: (u16, u16)) -> Vec<u8> {
        Spec {
            macs: (MAC_B, MAC_A),
            tags: Vec::new(),
            addrs,
            proto: l4,
            ports,
            tcp_flags: *self.rng.pick(&[0x10, 0x12, 0x11, 0x04, 0x18]),
            ttl: *self.rng.pick(&[64, 64, 64, 1]),
            options: Vec::new(),
            frag: 0,
            exts: Vec::new(),
            payload: {
                let n = self.rng.below(48);
                self.rng.bytes(n)
            },
            spoil: if self.rng.chance(10) { 8 } else { 0 },
            spoil_value: 0,
        }
        .bytes()
    }
}

/// A million random and mutated frames through every packet program, kernel and model
/// agreeing on each.
#[test]
fn packets_fuzzed_against_the_model() {
    if !privileged() {
        return;
    }
    let frames = env_u64("PORTFWD_FUZZ_FRAMES", 1_000_000);
    let seed = env_u64("PORTFWD_FUZZ_SEED", 0x5eed_f00d);
    let seeds = corpus();
    eprintln!(
        "fuzz_packets: seed {seed} (PORTFWD_FUZZ_SEED), {frames} frames \
         (PORTFWD_FUZZ_FRAMES), {} corpus frames",
        seeds.len()
    );
    let mut dp = dataplane();
    let (ns, fib, route) = net();
    let ports = [(BridgePortKey::new(fib.ifindex, BACKEND_MAC), BRIDGE_PORT)]
        .into_iter()
        .collect();
    dp.sync_bridge_ports(&ports).expect("bridge ports");
    let env = Env {
        ns: None,
        route: Some(route),
        fib: Some(&fib),
    };
    let mut gen = Gen {
        rng: Rng::new(seed),
        corpus: seeds.into_iter().map(|(_, f)| f).collect(),
        translated: Vec::new(),
    };
    let progs = [
        Prog::XdpIngress,
        Prog::XdpVirtual,
        Prog::XdpGeneric,
        Prog::TcIngress,
        Prog::TcEgress,
        Prog::Nat64Entry,
    ];
    let start = Instant::now();
    let runs = ns.run(|| {
        let mut fz = Fuzzer::new(&mut dp, env, &SLOTS);
        let mut batch_start = Instant::now();
        for n in 0..frames {
            // A batch taking long (a loaded machine) is checked and emptied early: the
            // model's clock is the batch's start, and NAT64 ports age in seconds.
            if n % BATCH != 0 && batch_start.elapsed() > MAX_BATCH_TIME {
                // Said, as it changes what follows (the flows emptied early).
                eprintln!("fuzz_packets: batch cut short at frame {n} (over {MAX_BATCH_TIME:?})");
                fz.end_batch();
                batch_start = Instant::now();
            }
            if n % BATCH == 0 {
                if n > 0 {
                    fz.end_batch();
                }
                batch_start = Instant::now();
                // This batch's configuration: the fast path at each hook, NAT64, the
                // backend's bridge port known (else the fast path falls back), that
                // port a veth with its peer elsewhere, the peer hand-over switched off.
                let c = gen.rng.below(64);
                fz.dp
                    .set_fast_path(c & 1 != 0, c & 2 != 0)
                    .expect("fast path");
                fz.dp.set_fast_path_peer(c & 32 == 0).expect("peer");
                fz.dp.set_nat64(c & 4 == 0 || n == 0).expect("nat64");
                let bridge = if c & 8 == 0 || n == 0 {
                    let flag = if c & 16 != 0 { BRIDGE_PORT_PEER } else { 0 };
                    ports.iter().map(|(k, v)| (*k, v | flag)).collect()
                } else {
                    Default::default()
                };
                fz.dp.sync_bridge_ports(&bridge).expect("bridge ports");
                fz.reset();
                fz.label = format!("seed {seed}, batch {} (frames {n}..)", n / BATCH);
            }
            let frame = gen.frame();
            let mut reply = None;
            let mut answer = None;
            let mut translated = false;
            for prog in progs {
                let p = fz.step(prog, &frame);
                translated |= p.rule.is_some();
                if prog == Prog::TcEgress {
                    continue;
                }
                if reply.is_none() {
                    reply = p.flow;
                }
                if answer.is_none() {
                    answer = p.nat64_flow;
                }
            }
            if translated {
                if gen.translated.len() < 256 {
                    gen.translated.push(frame);
                } else {
                    let i = gen.rng.below(256);
                    gen.translated[i] = frame;
                }
            }
            // The backend's reply on the conntrack flow recorded.
            let back = match reply {
                Some(FlowWrite::V4(k, _)) => {
                    let ((b, bp), (c, cp)) = (k.backend(), k.client());
                    Some((Addrs::V4(b.octets(), c.octets()), k.proto(), (bp, cp)))
                }
                Some(FlowWrite::V6(k, _)) => {
                    let ((b, bp), (c, cp)) = (k.backend(), k.client());
                    Some((Addrs::V6(b.octets(), c.octets()), k.proto(), (bp, cp)))
                }
                None => None,
            };
            if let Some((addrs, l4, ports)) = back {
                let r = gen.answer(addrs, l4, ports);
                fz.step(Prog::TcEgress, &r);
            }
            // The IPv4 backend's answer to the NAT64 flow recorded.
            if let Some((k, flow)) = answer {
                let r = gen.answer(
                    Addrs::V4(flow.backend_addr, flow.snat_addr),
                    k.proto(),
                    (
                        u16::from_be_bytes(flow.backend_port),
                        u16::from_be_bytes(flow.snat_port),
                    ),
                );
                for prog in [Prog::TcIngress, Prog::Nat64Entry] {
                    fz.step(prog, &r);
                }
            }
        }
        fz.end_batch();
        fz.runs
    });
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "fuzz_packets: {frames} frames, {runs} program runs, all agreeing with the model, \
         in {secs:.1} s ({:.0} frames/s, {:.0} runs/s); seed {seed}",
        frames as f64 / secs,
        runs as f64 / secs
    );
}

/// The comparison can fail: a model that believes in a flow the kernel never recorded
/// is caught on the frame (the backend's reply, translated by the model only) and, with
/// no frame touching it, by the batch's whole-table diff.
#[test]
fn a_wrong_model_is_caught() {
    if !privileged() {
        return;
    }
    let mut dp = dataplane();
    let (ns, fib, route) = net();
    let env = Env {
        ns: None,
        route: Some(route),
        fib: Some(&fib),
    };
    let reply = Spec {
        macs: (MAC_B, MAC_A),
        tags: Vec::new(),
        addrs: Addrs::V4(BACKEND.octets(), CLIENT.octets()),
        proto: proto::TCP,
        ports: (8080, 40000),
        tcp_flags: 0x12,
        ttl: 64,
        options: Vec::new(),
        frag: 0,
        exts: Vec::new(),
        payload: b"reply".to_vec(),
        spoil: 0,
        spoil_value: 0,
    }
    .bytes();
    let key = FlowKeyV4::new(
        BACKEND.octets(),
        8080u16.to_be_bytes(),
        CLIENT.octets(),
        40000u16.to_be_bytes(),
        proto::TCP,
    );
    let flow = FlowV4::new(HOST.octets(), 9000u16.to_be_bytes(), 1);
    ns.run(|| {
        let mut fz = Fuzzer::new(&mut dp, env, &SLOTS);
        fz.mirror.flows_v4.insert(key, flow);
        let caught = catch_unwind(AssertUnwindSafe(|| fz.step(Prog::TcEgress, &reply)));
        assert!(
            caught.is_err(),
            "a reply the kernel passes, the model translates"
        );

        fz.reset();
        fz.step(Prog::TcEgress, &reply);
        fz.mirror.flows_v4.insert(key, flow);
        let caught = catch_unwind(AssertUnwindSafe(|| fz.end_batch()));
        assert!(caught.is_err(), "a flow only the model holds");
    });
}
