//! The model on the host: fixture tables (every reason, both families, each hook) and a
//! property test comparing its rewritten frames with frames etherparse builds from
//! scratch (every checksum recomputed).

extern crate std;

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::vec::Vec;

use etherparse::{NetHeaders, PacketBuilder, PacketHeaders, TransportHeader};
use proptest::prelude::*;

use super::*;
use crate::NAT64_PORT_MIN;

const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const HOST4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const HOST4_2: Ipv4Addr = Ipv4Addr::new(198, 18, 9, 1);
const OTHER4: Ipv4Addr = Ipv4Addr::new(198, 19, 7, 7);
const BACKEND4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
const HOST6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 7, 0, 0, 0, 7);
const BACKEND6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 2);

/// A frame as the fixtures build it: TCP SYN (or ACK) or UDP, optional 802.1Q tag.
#[derive(Clone, Debug)]
struct F {
    src: (IpAddr, u16),
    dst: (IpAddr, u16),
    l4: u8,
    vlan: bool,
    ack: bool,
    ttl: u8,
    payload: Vec<u8>,
}

impl F {
    fn new(l4: u8, src: (impl Into<IpAddr>, u16), dst: (impl Into<IpAddr>, u16)) -> Self {
        Self {
            src: (src.0.into(), src.1),
            dst: (dst.0.into(), dst.1),
            l4,
            vlan: false,
            ack: false,
            ttl: 64,
            payload: b"model payload".to_vec(),
        }
    }
    fn dst(&self, dst: (impl Into<IpAddr>, u16)) -> Self {
        Self {
            dst: (dst.0.into(), dst.1),
            ..self.clone()
        }
    }
    fn src(&self, src: (impl Into<IpAddr>, u16)) -> Self {
        Self {
            src: (src.0.into(), src.1),
            ..self.clone()
        }
    }
    fn build(&self) -> Vec<u8> {
        let eth = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let ip = match (self.src.0, self.dst.0, self.vlan) {
            (IpAddr::V4(s), IpAddr::V4(d), false) => eth.ipv4(s.octets(), d.octets(), self.ttl),
            (IpAddr::V4(s), IpAddr::V4(d), true) => eth
                .single_vlan(7u16.try_into().expect("VLAN id"))
                .ipv4(s.octets(), d.octets(), self.ttl),
            (IpAddr::V6(s), IpAddr::V6(d), false) => eth.ipv6(s.octets(), d.octets(), self.ttl),
            (IpAddr::V6(s), IpAddr::V6(d), true) => eth
                .single_vlan(7u16.try_into().expect("VLAN id"))
                .ipv6(s.octets(), d.octets(), self.ttl),
            _ => panic!("one family per frame"),
        };
        let mut out = Vec::new();
        match (self.l4, self.ack) {
            (proto::TCP, false) => ip
                .tcp(self.src.1, self.dst.1, 1000, 64240)
                .syn()
                .write(&mut out, &self.payload),
            (proto::TCP, true) => ip
                .tcp(self.src.1, self.dst.1, 1000, 64240)
                .ack(1)
                .write(&mut out, &self.payload),
            _ => ip
                .udp(self.src.1, self.dst.1)
                .write(&mut out, &self.payload),
        }
        .expect("frame");
        out
    }
}

fn v6(a: Ipv6Addr) -> [u8; 16] {
    a.octets()
}

/// The fixture suites' rules: HOST:9000/tcp, *:5353/udp, *:9001/tcp per family, plus
/// an IPv6 wildcard on 7000/tcp to an IPv4-only backend (IPv4-mapped).
struct Fixture {
    rules_v4: [(RuleKeyV4, BackendV4); 3],
    rules_v6: [(RuleKeyV6, BackendV6); 4],
    hosts_v4: [[u8; 4]; 2],
    hosts_v6: [[u8; 16]; 1],
}

fn fixture() -> Fixture {
    Fixture {
        rules_v4: [
            (
                RuleKeyV4::from_parts(HOST4, 9000, proto::TCP),
                BackendV4::new(BACKEND4, 8080, 1),
            ),
            (
                RuleKeyV4::from_parts(Ipv4Addr::UNSPECIFIED, 5353, proto::UDP),
                BackendV4::new(BACKEND4, 53, 2),
            ),
            (
                RuleKeyV4::from_parts(Ipv4Addr::UNSPECIFIED, 9001, proto::TCP),
                BackendV4::new(BACKEND4, 8080, 3),
            ),
        ],
        rules_v6: [
            (
                RuleKeyV6::from_parts(HOST6, 9000, proto::TCP),
                BackendV6::new(BACKEND6, 8080, 11),
            ),
            (
                RuleKeyV6::from_parts(Ipv6Addr::UNSPECIFIED, 5353, proto::UDP),
                BackendV6::new(BACKEND6, 53, 12),
            ),
            (
                RuleKeyV6::from_parts(Ipv6Addr::UNSPECIFIED, 9001, proto::TCP),
                BackendV6::new(BACKEND6, 8080, 13),
            ),
            (
                RuleKeyV6::from_parts(Ipv6Addr::UNSPECIFIED, 7000, proto::TCP),
                BackendV6::new(BACKEND4.to_ipv6_mapped(), 8080, 14),
            ),
        ],
        hosts_v4: [HOST4.octets(), HOST4_2.octets()],
        hosts_v6: [v6(HOST6)],
    }
}

impl Fixture {
    fn tables(&self) -> Tables<'_> {
        Tables {
            rules_v4: &self.rules_v4,
            rules_v6: &self.rules_v6,
            host_addrs_v4: &self.hosts_v4,
            host_addrs_v6: &self.hosts_v6,
            ..Tables::default()
        }
    }
}

const INGRESS: [Hook; 4] = [
    Hook::XdpIngress,
    Hook::XdpVirtual,
    Hook::XdpGeneric,
    Hook::TcIngress,
];

/// Runs `hook` on a copy of `input`: (outcome, output frame).
fn run_on(hook: Hook, maps: &impl Maps, input: &[u8]) -> (Outcome, Vec<u8>) {
    let mut out = input.to_vec();
    let o = run(hook, maps, &mut out);
    (o, out)
}

/// Passed untouched under `reason` by every hook in `hooks`.
fn assert_untouched(hooks: &[Hook], maps: &impl Maps, input: &[u8], reason: Reason, what: &str) {
    for &hook in hooks {
        let (o, out) = run_on(hook, maps, input);
        assert_eq!(o, Outcome::pass(reason), "{hook:?}: {what}");
        assert_eq!(out, input, "{hook:?}: {what}: untouched");
    }
}

#[test]
fn ingress_translates_both_families_at_every_hook() {
    let fx = fixture();
    let maps = fx.tables();
    let cases = [
        (
            F::new(proto::TCP, (CLIENT4, 40000), (HOST4, 9000)),
            (IpAddr::from(BACKEND4), 8080, 1),
        ),
        (
            F::new(proto::UDP, (CLIENT4, 40001), (HOST4_2, 5353)),
            (BACKEND4.into(), 53, 2),
        ),
        (
            F::new(proto::TCP, (CLIENT4, 40002), (HOST4_2, 9001)),
            (BACKEND4.into(), 8080, 3),
        ),
        (
            F::new(proto::TCP, (CLIENT6, 40000), (HOST6, 9000)),
            (BACKEND6.into(), 8080, 11),
        ),
        (
            F::new(proto::UDP, (CLIENT6, 40001), (HOST6, 5353)),
            (BACKEND6.into(), 53, 12),
        ),
    ];
    for (f, (addr, port, slot)) in cases {
        for vlan in [false, true] {
            let f = F { vlan, ..f.clone() };
            for hook in INGRESS {
                let (o, out) = run_on(hook, &maps, &f.build());
                assert_eq!(out, f.dst((addr, port)).build(), "{hook:?} {f:?}");
                assert_eq!(o.verdict, Verdict::Pass);
                assert_eq!(o.reasons, [Some(Reason::Translated), None]);
                assert_eq!(o.rule, Some(RuleCount { slot, reply: false }));
                let recorded = match (f.src, f.dst, addr) {
                    ((IpAddr::V4(c), cp), (IpAddr::V4(h), hp), IpAddr::V4(b)) => FlowWrite::V4(
                        FlowKeyV4::new(
                            b.octets(),
                            port.to_be_bytes(),
                            c.octets(),
                            cp.to_be_bytes(),
                            f.l4,
                        ),
                        FlowV4::new(h.octets(), hp.to_be_bytes(), slot),
                    ),
                    ((IpAddr::V6(c), cp), (IpAddr::V6(h), hp), IpAddr::V6(b)) => FlowWrite::V6(
                        FlowKeyV6::new(
                            b.octets(),
                            port.to_be_bytes(),
                            c.octets(),
                            cp.to_be_bytes(),
                            f.l4,
                        ),
                        FlowV6::new(h.octets(), hp.to_be_bytes(), slot),
                    ),
                    _ => unreachable!(),
                };
                assert_eq!(o.flow, Some(recorded), "{hook:?}: flow recorded");
            }
        }
    }
}

#[test]
fn mid_flow_tcp_is_translated_without_recording_a_flow() {
    let fx = fixture();
    let f = F {
        ack: true,
        ..F::new(proto::TCP, (CLIENT4, 40000), (HOST4, 9000))
    };
    let (o, out) = run_on(Hook::TcIngress, &fx.tables(), &f.build());
    assert_eq!(out, f.dst((BACKEND4, 8080)).build());
    assert_eq!(o.flow, None);
    assert_eq!(o.reasons[0], Some(Reason::Translated));
}

#[test]
fn every_pass_reason() {
    let fx = fixture();
    let maps = fx.tables();
    let tcp4 = F::new(proto::TCP, (CLIENT4, 40000), (HOST4, 9000));
    let udp4 = F::new(proto::UDP, (CLIENT4, 40001), (HOST4_2, 5353));
    let tcp6 = F::new(proto::TCP, (CLIENT6, 40000), (HOST6, 9000));
    let udp6 = F::new(proto::UDP, (CLIENT6, 40001), (HOST6, 5353));
    let full4 = tcp4.build();
    let full6 = tcp6.build();

    let mut frag4 = udp4.build();
    frag4[14 + 6] |= 0x20; // MF
    let mut later4 = udp4.build();
    later4[14 + 7] = 100;
    let mut bad_ihl = full4.clone();
    bad_ihl[14] = 0x44;
    let mut bad_ver4 = full4.clone();
    bad_ver4[14] = 0x65;
    let mut bad_ver6 = full6.clone();
    bad_ver6[14] = 0x45;
    let with_next = |f: &F, nh: u8| {
        let mut b = f.build();
        // The protocol field of IPv4, the next header of IPv6.
        b[14 + if f.src.0.is_ipv4() { 9 } else { 6 }] = nh;
        b
    };
    let mut arp = full4[..12].to_vec();
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0; 28]);

    let table: Vec<(&str, Vec<u8>, Reason)> = std::vec![
        (
            "v4 no rule",
            tcp4.dst((HOST4, 9999)).build(),
            Reason::PassNoRule
        ),
        (
            "v4 other protocol",
            udp4.dst((HOST4, 9000)).build(),
            Reason::PassNoRule
        ),
        (
            "v4 other host address",
            tcp4.dst((HOST4_2, 9000)).build(),
            Reason::PassNoRule
        ),
        (
            "v4 wildcard, not a host address",
            udp4.dst((OTHER4, 5353)).build(),
            Reason::PassNotHostAddr
        ),
        ("v4 first fragment", frag4, Reason::PassFragment),
        ("v4 later fragment", later4, Reason::PassFragment),
        ("ICMP", with_next(&tcp4, 1), Reason::PassNotTcpUdp),
        ("ARP", arp, Reason::PassNotIp),
        ("Ethernet only", full4[..14].to_vec(), Reason::PassMalformed),
        (
            "half a VLAN tag",
            {
                let mut b = full4[..14].to_vec();
                b[12..14].copy_from_slice(&[0x81, 0]);
                b.extend_from_slice(&[0, 7]);
                b
            },
            Reason::PassMalformed
        ),
        (
            "v4 header cut",
            full4[..14 + 12].to_vec(),
            Reason::PassMalformed
        ),
        (
            "v4 TCP cut",
            full4[..14 + 20 + 10].to_vec(),
            Reason::PassMalformed
        ),
        ("IHL below 5", bad_ihl, Reason::PassMalformed),
        ("version 6 in IPv4", bad_ver4, Reason::PassMalformed),
        (
            "v6 no rule",
            tcp6.dst((HOST6, 9999)).build(),
            Reason::PassNoRule
        ),
        (
            "v6 wildcard, not a host address",
            udp6.dst((OTHER6, 5353)).build(),
            Reason::PassNotHostAddr
        ),
        (
            "v6 fragment header",
            with_next(&udp6, 44),
            Reason::PassFragment
        ),
        (
            "v6 hop-by-hop",
            with_next(&udp6, 0),
            Reason::PassIpv6ExtHeader
        ),
        (
            "v6 routing",
            with_next(&tcp6, 43),
            Reason::PassIpv6ExtHeader
        ),
        ("ICMPv6", with_next(&tcp6, 58), Reason::PassNotTcpUdp),
        (
            "v6 header cut",
            full6[..14 + 30].to_vec(),
            Reason::PassMalformed
        ),
        (
            "v6 UDP cut",
            udp6.build()[..14 + 40 + 6].to_vec(),
            Reason::PassMalformed
        ),
        ("version 4 in IPv6", bad_ver6, Reason::PassMalformed),
    ];
    for (what, input, reason) in &table {
        assert_untouched(&INGRESS, &maps, input, *reason, what);
    }
    // The egress program parses the same way; the rules play no part there.
    for (what, input, reason) in &table {
        let reason = match reason {
            Reason::PassNoRule | Reason::PassNotHostAddr => Reason::PassNoFlow,
            r => *r,
        };
        assert_untouched(&[Hook::TcEgress], &maps, input, reason, what);
    }
}

#[test]
fn replies_follow_the_recorded_flows() {
    let fx = fixture();
    let requests = [
        F::new(proto::TCP, (CLIENT4, 40000), (HOST4, 9000)),
        F::new(proto::UDP, (CLIENT6, 40001), (HOST6, 5353)),
    ];
    let mut flows_v4 = Vec::new();
    let mut flows_v6 = Vec::new();
    for r in &requests {
        match run_on(Hook::XdpIngress, &fx.tables(), &r.build()).0.flow {
            Some(FlowWrite::V4(k, v)) => flows_v4.push((k, v)),
            Some(FlowWrite::V6(k, v)) => flows_v6.push((k, v)),
            None => panic!("no flow"),
        }
    }
    let maps = Tables {
        flows_v4: &flows_v4,
        flows_v6: &flows_v6,
        ..fx.tables()
    };
    let reply4 = F::new(proto::TCP, (BACKEND4, 8080), (CLIENT4, 40000));
    let reply6 = F::new(proto::UDP, (BACKEND6, 53), (CLIENT6, 40001));
    for (reply, published, slot) in [
        (&reply4, (IpAddr::from(HOST4), 9000), 1),
        (&reply6, (IpAddr::from(HOST6), 5353), 12),
    ] {
        let (o, out) = run_on(Hook::TcEgress, &maps, &reply.build());
        assert_eq!(out, reply.src(published).build());
        assert_eq!(o, translated_reply(slot, None));
    }
    assert_untouched(
        &[Hook::TcEgress],
        &maps,
        &reply4.dst((CLIENT4, 40999)).build(),
        Reason::PassNoFlow,
        "other client port",
    );
    // The flows stay, but no rule sends to their backends' ports any more: the reply
    // filter (`BACKEND_PORTS`) passes their replies before any lookup.
    let no_rules = Tables {
        rules_v4: &[],
        rules_v6: &[],
        ..maps
    };
    for reply in [&reply4, &reply6] {
        assert_untouched(
            &[Hook::TcEgress],
            &no_rules,
            &reply.build(),
            Reason::PassNoFlow,
            "no rule sends to the backend's port",
        );
    }
}

#[test]
fn ipv4_only_backends_of_ipv6_clients() {
    let fx = fixture();
    let f = F::new(proto::TCP, (CLIENT6, 40000), (HOST6, 7000)).build();
    assert_untouched(
        &[Hook::XdpIngress, Hook::XdpGeneric],
        &fx.tables(),
        &f,
        Reason::PassNoIpv6Backend,
        "XDP has no NAT64",
    );
    let (o, out) = run_on(Hook::TcIngress, &fx.tables(), &f);
    assert_eq!(o, Outcome::uncounted(Verdict::TailCallNat64));
    assert_eq!(out, f);
    let off = Tables {
        config_flags: CONFIG_NO_NAT64,
        ..fx.tables()
    };
    assert_untouched(&INGRESS, &off, &f, Reason::PassNoIpv6Backend, "--no-nat64");

    // The backend's reply to a NAT64 port that NAT64_REPLIES holds: TC jumps to NAT64,
    // XDP does not look.
    let reply = F::new(proto::TCP, (BACKEND4, 8080), (HOST4, NAT64_PORT_MIN));
    let key = FlowKeyV4::new(
        BACKEND4.octets(),
        8080u16.to_be_bytes(),
        HOST4.octets(),
        NAT64_PORT_MIN.to_be_bytes(),
        proto::TCP,
    );
    let maps = Tables {
        nat64_replies: &[(
            key,
            Nat64Reply {
                client_addr: v6(CLIENT6),
                host_addr: v6(HOST6),
                client_port: [0x9c, 0x40],
                host_port: [0x1b, 0x58],
                stats_slot: 14,
                client_ifindex: 1,
                client_fin_end: 0,
                client_fin_tsval: 0,
                flags: 0,
                _pad: [0; 3],
                last_seen_ns: 0,
            },
        )],
        ..fx.tables()
    };
    assert_eq!(
        run_on(Hook::TcIngress, &maps, &reply.build()).0,
        Outcome::uncounted(Verdict::TailCallNat64)
    );
    assert_untouched(
        &[Hook::XdpIngress],
        &maps,
        &reply.build(),
        Reason::PassNoRule,
        "XDP",
    );
    assert_untouched(
        &[Hook::TcIngress],
        &fx.tables(),
        &reply.build(),
        Reason::PassNoRule,
        "no NAT64 flow",
    );
}

#[test]
fn fast_path() {
    let fx = fixture();
    let hop = NextHop {
        ifindex: 9,
        peer: false,
        smac: [2, 0, 0, 0, 0, 9],
        dmac: [2, 0, 0, 0, 0, 10],
    };
    let f4 = F::new(proto::TCP, (CLIENT4, 40000), (HOST4, 9000));
    let f6 = F::new(proto::TCP, (CLIENT6, 40000), (HOST6, 9000));
    let hooks = [
        (Hook::XdpIngress, CONFIG_FAST_PATH_NATIVE_XDP),
        (Hook::XdpVirtual, CONFIG_FAST_PATH_NATIVE_XDP),
        (Hook::XdpGeneric, CONFIG_FAST_PATH),
        (Hook::TcIngress, CONFIG_FAST_PATH),
    ];
    // Both families: IPv6's hop limit stands in for the TTL (no header checksum).
    for ((hook, bit), (f, backend)) in hooks.into_iter().flat_map(|h| {
        [
            (h, (f4.clone(), IpAddr::V4(BACKEND4))),
            (h, (f6.clone(), IpAddr::V6(BACKEND6))),
        ]
    }) {
        let on = Tables {
            config_flags: bit,
            next_hop: Some(hop),
            ..fx.tables()
        };
        let (o, out) = run_on(hook, &on, &f.build());
        assert_eq!(o.verdict, Verdict::Redirect(9), "{hook:?}");
        assert_eq!(
            o.reasons,
            [Some(Reason::Translated), Some(Reason::Redirected)]
        );
        let mut want = F {
            ttl: 63,
            ..f.dst((backend, 8080))
        }
        .build();
        want[..6].copy_from_slice(&hop.dmac);
        want[6..12].copy_from_slice(&hop.smac);
        assert_eq!(out, want, "{hook:?}: forwarded one hop");

        // No next hop, or a TTL that expires: the kernel routes it.
        let none = Tables {
            next_hop: None,
            ..on
        };
        let ttl1 = F {
            ttl: 1,
            ..f.clone()
        };
        for (maps, f) in [(&none, &f), (&on, &ttl1)] {
            let (o, out) = run_on(hook, maps, &f.build());
            assert_eq!(o.verdict, Verdict::Pass);
            assert_eq!(
                o.reasons,
                [Some(Reason::Translated), Some(Reason::FastPathFallback)]
            );
            assert_eq!(out, f.dst((backend, 8080)).build());
        }
    }
    // The other hooks' bit does not switch this one on.
    let other = Tables {
        config_flags: CONFIG_FAST_PATH,
        next_hop: Some(hop),
        ..fx.tables()
    };
    for f in [&f4, &f6] {
        assert_eq!(
            run_on(Hook::XdpIngress, &other, &f.build()).0.reasons,
            [Some(Reason::Translated), None]
        );
    }
    // A veth port with its peer elsewhere: TC hands the packet to the peer unless
    // switched off; XDP cannot, and sends it out of the port.
    let peer = NextHop { peer: true, ..hop };
    for (hook, flags, want) in [
        (Hook::TcIngress, CONFIG_FAST_PATH, Verdict::RedirectPeer(9)),
        (
            Hook::TcIngress,
            CONFIG_FAST_PATH | CONFIG_FAST_PATH_NO_PEER,
            Verdict::Redirect(9),
        ),
        (Hook::XdpGeneric, CONFIG_FAST_PATH, Verdict::Redirect(9)),
        (
            Hook::XdpIngress,
            CONFIG_FAST_PATH_NATIVE_XDP,
            Verdict::Redirect(9),
        ),
    ] {
        let maps = Tables {
            config_flags: flags,
            next_hop: Some(peer),
            ..fx.tables()
        };
        for f in [&f4, &f6] {
            assert_eq!(run_on(hook, &maps, &f.build()).0.verdict, want, "{hook:?}");
        }
    }
}

#[test]
fn udp_zero_checksum_stays_zero() {
    let fx = fixture();
    for f in [
        F::new(proto::UDP, (CLIENT4, 40001), (HOST4, 5353)),
        F::new(proto::UDP, (CLIENT6, 40001), (HOST6, 5353)),
    ] {
        let at = if f.src.0.is_ipv4() {
            14 + 20 + 6
        } else {
            14 + 40 + 6
        };
        let mut input = f.build();
        input[at..at + 2].fill(0);
        let backend: IpAddr = if f.src.0.is_ipv4() {
            BACKEND4.into()
        } else {
            BACKEND6.into()
        };
        let mut want = f.dst((backend, 53)).build();
        want[at..at + 2].fill(0);
        let (_, out) = run_on(Hook::TcIngress, &fx.tables(), &input);
        assert_eq!(out, want);
    }
}

/// `frame` as a local stack with checksum offload sends it: the L4 checksum field holds
/// the folded pseudo-header sum (`CHECKSUM_PARTIAL`). No VLAN tag.
fn offloaded(mut frame: Vec<u8>) -> Vec<u8> {
    let v4 = frame[12..14] == [0x08, 0x00];
    let (l4_off, l4) = if v4 { (34, frame[23]) } else { (54, frame[20]) };
    let len = frame.len() - l4_off;
    let sum = if v4 {
        csum::pseudo_sum_v4(
            frame[26..30].try_into().expect("src"),
            frame[30..34].try_into().expect("dst"),
            l4,
            len as u16,
        )
    } else {
        csum::pseudo_sum_v6(
            frame[22..38].try_into().expect("src"),
            frame[38..54].try_into().expect("dst"),
            l4,
            len as u32,
        )
    };
    let at = l4_off + crate::packet::l4_csum_off(l4);
    frame[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    frame
}

/// A partial (offloaded) checksum: where XDP may see one, it becomes the new
/// pseudo-header sum (the address changed, the port is the kernel's to sum later), and
/// the packet never takes the fast path; native XDP on a NIC and TC (in BPF_PROG_RUN,
/// no skb state) update it as a complete one.
#[test]
fn partial_checksums() {
    let fx = fixture();
    let hop = NextHop {
        ifindex: 9,
        peer: false,
        smac: [2, 0, 0, 0, 0, 9],
        dmac: [2, 0, 0, 0, 0, 10],
    };
    let frames = [
        (
            F::new(proto::TCP, (CLIENT4, 40000), (HOST4, 9000)),
            IpAddr::from(BACKEND4),
            8080,
        ),
        (
            F::new(proto::UDP, (CLIENT4, 40001), (HOST4, 5353)),
            BACKEND4.into(),
            53,
        ),
        (
            F::new(proto::TCP, (CLIENT6, 40000), (HOST6, 9000)),
            BACKEND6.into(),
            8080,
        ),
        (
            F::new(proto::UDP, (CLIENT6, 40001), (HOST6, 5353)),
            BACKEND6.into(),
            53,
        ),
    ];
    for (f, backend, port) in frames {
        let input = offloaded(f.build());
        let partial_out = offloaded(f.dst((backend, port)).build());
        for hook in INGRESS {
            let (o, out) = run_on(hook, &fx.tables(), &input);
            assert_eq!(o.verdict, Verdict::Pass, "{hook:?}");
            if hook.sees_partial() {
                assert_eq!(
                    out, partial_out,
                    "{hook:?} {f:?}: the new pseudo-header sum"
                );
            } else {
                // Taken as complete: address and port deltas added, the field is not
                // the new pseudo-header sum.
                assert_ne!(out, partial_out, "{hook:?} {f:?}");
                let mut rest = out.clone();
                let l4_csum = out.len() - f.payload.len() - if f.l4 == proto::TCP { 4 } else { 2 };
                rest[l4_csum..l4_csum + 2].copy_from_slice(&partial_out[l4_csum..l4_csum + 2]);
                assert_eq!(
                    rest, partial_out,
                    "{hook:?} {f:?}: only the checksum differs"
                );
            }
        }
        // Fast path on: where XDP may see it, a partial packet goes on to the stack,
        // which keeps the skb's checksum state.
        for (hook, bit, redirected) in [
            (Hook::XdpVirtual, CONFIG_FAST_PATH_NATIVE_XDP, false),
            (Hook::XdpGeneric, CONFIG_FAST_PATH, false),
            (Hook::XdpIngress, CONFIG_FAST_PATH_NATIVE_XDP, true),
        ] {
            let on = Tables {
                config_flags: bit,
                next_hop: Some(hop),
                ..fx.tables()
            };
            let (o, out) = run_on(hook, &on, &input);
            if redirected {
                assert_eq!(o.verdict, Verdict::Redirect(9), "{hook:?} {f:?}");
            } else {
                assert_eq!(o.verdict, Verdict::Pass, "{hook:?} {f:?}");
                assert_eq!(
                    o.reasons,
                    [Some(Reason::Translated), Some(Reason::FastPathFallback)]
                );
                assert_eq!(out, partial_out, "{hook:?} {f:?}: not forwarded");
            }
            // A complete checksum still takes the fast path at every hook.
            let (o, _) = run_on(hook, &on, &f.build());
            assert_eq!(o.verdict, Verdict::Redirect(9), "{hook:?} {f:?}: complete");
        }
    }
}

/// Every checksum of `frame` is right (recomputed from scratch); its (src, dst) ports.
fn checked(frame: &[u8]) -> (u16, u16) {
    let h = PacketHeaders::from_ethernet_slice(frame).expect("parsable");
    let payload = h.payload.slice();
    match (&h.net, &h.transport) {
        (Some(NetHeaders::Ipv4(ip, _)), t) => {
            assert_eq!(ip.header_checksum, ip.calc_header_checksum());
            match t {
                Some(TransportHeader::Tcp(t)) => {
                    assert_eq!(t.checksum, t.calc_checksum_ipv4(ip, payload).expect("sum"));
                    (t.source_port, t.destination_port)
                }
                Some(TransportHeader::Udp(u)) => {
                    assert_eq!(u.checksum, u.calc_checksum_ipv4(ip, payload).expect("sum"));
                    (u.source_port, u.destination_port)
                }
                other => panic!("{other:?}"),
            }
        }
        (Some(NetHeaders::Ipv6(ip, _)), Some(TransportHeader::Tcp(t))) => {
            assert_eq!(t.checksum, t.calc_checksum_ipv6(ip, payload).expect("sum"));
            (t.source_port, t.destination_port)
        }
        (Some(NetHeaders::Ipv6(ip, _)), Some(TransportHeader::Udp(u))) => {
            assert_eq!(u.checksum, u.calc_checksum_ipv6(ip, payload).expect("sum"));
            (u.source_port, u.destination_port)
        }
        other => panic!("{other:?}"),
    }
}

/// A TCP frame of `f` with its flags byte set to `flags` (checksums not fixed: the
/// model reads flags, never verifies).
fn with_tcp_flags(f: &F, flags: u8) -> Vec<u8> {
    let mut frame = f.build();
    let at = match f.src.0 {
        IpAddr::V4(_) => 14 + 20 + crate::packet::TCP_FLAGS_OFF,
        IpAddr::V6(_) => 14 + 40 + crate::packet::TCP_FLAGS_OFF,
    };
    frame[at] = flags;
    frame
}

/// The flow a SYN of CLIENT4:40000 to HOST4:9000 records (rule slot 1).
fn syn_flow() -> (FlowKeyV4, FlowV4) {
    (
        FlowKeyV4::new(
            BACKEND4.octets(),
            8080u16.to_be_bytes(),
            CLIENT4.octets(),
            40000u16.to_be_bytes(),
            proto::TCP,
        ),
        FlowV4::new(HOST4.octets(), 9000u16.to_be_bytes(), 1),
    )
}

#[test]
fn a_syn_records_an_embryonic_flow_unless_established_so() {
    let fx = fixture();
    let syn = F::new(proto::TCP, (CLIENT4, 40000), (HOST4, 9000)).build();
    let (key, value) = syn_flow();
    for hook in INGRESS {
        // New: recorded (embryonic).
        let (o, _) = run_on(hook, &fx.tables(), &syn);
        assert_eq!(o.flow, Some(FlowWrite::V4(key, value)), "{hook:?}: new");
        assert_eq!(o.promoted, None);
        // Established with this value (a retransmitted SYN, the same 4-tuple reused for
        // the same published port): nothing written, the established entry serves.
        let same = [(key, value)];
        let maps = Tables {
            flows_v4: &same,
            ..fx.tables()
        };
        let (o, _) = run_on(hook, &maps, &syn);
        assert_eq!(o.flow, None, "{hook:?}: established");
        assert_eq!(o.reasons, [Some(Reason::Translated), None]);
        // Established through another published port: the SYN starts a new flow.
        let other = [(key, FlowV4::new(HOST4_2.octets(), 9001u16.to_be_bytes(), 3))];
        let maps = Tables {
            flows_v4: &other,
            ..fx.tables()
        };
        let (o, _) = run_on(hook, &maps, &syn);
        assert_eq!(o.flow, Some(FlowWrite::V4(key, value)), "{hook:?}: reused");
        // Embryonic already (a retransmitted SYN of a spoofed client): found identical.
        let embryonic = [(key, value)];
        let maps = Tables {
            embryonic_v4: &embryonic,
            ..fx.tables()
        };
        let (o, _) = run_on(hook, &maps, &syn);
        assert_eq!(o.flow, Some(FlowWrite::V4(key, value)), "{hook:?}: again");
    }
    // Mid-flow TCP records nothing, embryonic or not.
    let ack = F {
        ack: true,
        ..F::new(proto::TCP, (CLIENT4, 40000), (HOST4, 9000))
    };
    let (o, _) = run_on(Hook::TcIngress, &fx.tables(), &ack.build());
    assert_eq!((o.flow, o.promoted), (None, None));
}

#[test]
fn only_a_completed_handshake_promotes() {
    let fx = fixture();
    let (key, value) = syn_flow();
    let embryonic = [(key, value)];
    let maps = Tables {
        embryonic_v4: &embryonic,
        ..fx.tables()
    };
    let reply = F::new(proto::TCP, (BACKEND4, 8080), (CLIENT4, 40000));
    // SYN-ACK and RST (with or without ACK), what a spoofed client's flow gets:
    // translated from the embryonic entry, not promoted.
    for flags in [0x12, 0x04, 0x14, 0x02] {
        let (o, out) = run_on(Hook::TcEgress, &maps, &with_tcp_flags(&reply, flags));
        assert_eq!(o, translated_reply(1, None), "flags {flags:#x}");
        assert_eq!(
            &out[26..30],
            &HOST4.octets(),
            "flags {flags:#x}: source rewritten"
        );
    }
    // ACK, FIN-ACK, PSH-ACK: the client answered the SYN-ACK. Promoted.
    for flags in [0x10, 0x11, 0x18, 0x00] {
        let (o, out) = run_on(Hook::TcEgress, &maps, &with_tcp_flags(&reply, flags));
        assert_eq!(
            o,
            translated_reply(1, Some(FlowWrite::V4(key, value))),
            "flags {flags:#x}"
        );
        assert_eq!(
            o.reasons,
            [Some(Reason::ReplyTranslated), Some(Reason::FlowPromoted)]
        );
        assert_eq!(&out[26..30], &HOST4.octets());
    }
    // The established entry wins over an embryonic one under the same key, and an
    // established flow is never promoted again.
    let established = [(key, FlowV4::new(HOST4_2.octets(), 9001u16.to_be_bytes(), 3))];
    let both = Tables {
        flows_v4: &established,
        embryonic_v4: &embryonic,
        ..fx.tables()
    };
    let ack = F {
        ack: true,
        ..reply.clone()
    };
    let (o, out) = run_on(Hook::TcEgress, &both, &ack.build());
    assert_eq!(o, translated_reply(3, None));
    assert_eq!(out, ack.src((HOST4_2, 9001)).build());
    // UDP: the backend's first answer promotes.
    let (key6, value6) = (
        FlowKeyV6::new(
            BACKEND6.octets(),
            53u16.to_be_bytes(),
            CLIENT6.octets(),
            40001u16.to_be_bytes(),
            proto::UDP,
        ),
        FlowV6::new(HOST6.octets(), 5353u16.to_be_bytes(), 12),
    );
    let embryonic6 = [(key6, value6)];
    let maps = Tables {
        embryonic_v6: &embryonic6,
        ..fx.tables()
    };
    let answer = F::new(proto::UDP, (BACKEND6, 53), (CLIENT6, 40001));
    let (o, out) = run_on(Hook::TcEgress, &maps, &answer.build());
    assert_eq!(o, translated_reply(12, Some(FlowWrite::V6(key6, value6))));
    assert_eq!(out, answer.src((HOST6, 5353)).build());
    // Nothing in either table: passed.
    assert_untouched(
        &[Hook::TcEgress],
        &fx.tables(),
        &ack.build(),
        Reason::PassNoFlow,
        "no flow",
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Random clients, ports, payloads, tags and TTLs, both families, both protocols:
    /// the model's ingress output is the frame rebuilt with the backend as destination,
    /// every checksum right; the reply, through the recorded flow, is the reply rebuilt
    /// with the published source.
    #[test]
    fn rewrites_equal_frames_built_from_scratch(
        c4 in any::<[u8; 4]>(),
        c6 in any::<[u8; 16]>(),
        ipv6 in any::<bool>(),
        udp in any::<bool>(),
        sport in 1u16..,
        vlan in any::<bool>(),
        ttl in 1u8..,
        payload in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let fx = fixture();
        let (client, host, backend): (IpAddr, IpAddr, IpAddr) = if ipv6 {
            (Ipv6Addr::from(c6).into(), HOST6.into(), BACKEND6.into())
        } else {
            (Ipv4Addr::from(c4).into(), HOST4.into(), BACKEND4.into())
        };
        let (l4, port, bport) = if udp { (proto::UDP, 5353, 53) } else { (proto::TCP, 9000, 8080) };
        let f = F { vlan, ttl, payload, ..F::new(l4, (client, sport), (host, port)) };
        for hook in INGRESS {
            let (o, out) = run_on(hook, &fx.tables(), &f.build());
            prop_assert_eq!(o.reasons[0], Some(Reason::Translated));
            prop_assert_eq!(&out, &f.dst((backend, bport)).build());
            prop_assert_eq!(checked(&out), (sport, bport));
        }
        let (o, _) = run_on(Hook::TcIngress, &fx.tables(), &f.build());
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        match o.flow {
            Some(FlowWrite::V4(k, v)) => v4.push((k, v)),
            Some(FlowWrite::V6(k, v)) => v6.push((k, v)),
            None => prop_assert!(false, "no flow"),
        }
        let maps = Tables { flows_v4: &v4, flows_v6: &v6, ..fx.tables() };
        let reply = f.src((backend, bport)).dst((client, sport));
        let (o, out) = run_on(Hook::TcEgress, &maps, &reply.build());
        prop_assert_eq!(o.reasons[0], Some(Reason::ReplyTranslated));
        prop_assert_eq!(&out, &reply.src((host, port)).build());
        prop_assert_eq!(checked(&out), (port, sport));
    }

    /// Any bytes at all: the model never panics, and a frame it passes is untouched.
    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..120),
        hook in 0usize..5,
    ) {
        let fx = fixture();
        let hook = [
            Hook::XdpIngress,
            Hook::XdpVirtual,
            Hook::XdpGeneric,
            Hook::TcIngress,
            Hook::TcEgress,
        ][hook];
        let (o, out) = run_on(hook, &fx.tables(), &bytes);
        if o.reasons[0] != Some(Reason::Translated) && o.reasons[0] != Some(Reason::ReplyTranslated) {
            prop_assert_eq!(out, bytes);
        }
    }
}

mod nat64_program {
    use super::*;
    use crate::model::nat64::{entry, program, Nat64Outcome, Route};
    use crate::nat64::{port_candidate, port_start};
    use crate::{
        NAT64_CLOSED, NAT64_CLOSING, NAT64_FIN_BACKEND, NAT64_FIN_BACKEND_FIRST, NAT64_FIN_CLIENT,
        NAT64_PORT_TRIES,
    };

    /// The host's address towards the backends, and the backends' interface.
    const ROUTE: Route = Route {
        src: [198, 18, 1, 1],
        ifindex: 5,
        mtu: 1500,
    };
    /// Where the client's packets arrive.
    const CLIENT_IF: u32 = 1;
    const NOW: u64 = 3_600_000_000_000;

    /// `[::]:7000/tcp` and `[::]:7001/udp` to the IPv4-only BACKEND4 (held mapped).
    fn rules() -> [(RuleKeyV6, BackendV6); 2] {
        let mapped = BACKEND4.to_ipv6_mapped();
        [
            (
                RuleKeyV6::from_parts(Ipv6Addr::UNSPECIFIED, 7000, proto::TCP),
                BackendV6::new(mapped, 8080, 14),
            ),
            (
                RuleKeyV6::from_parts(Ipv6Addr::UNSPECIFIED, 7001, proto::UDP),
                BackendV6::new(mapped, 53, 15),
            ),
        ]
    }

    fn tables<'a>(
        rules: &'a [(RuleKeyV6, BackendV6)],
        hosts: &'a [[u8; 16]],
        flows: &'a [(FlowKeyV6, Nat64Flow)],
        replies: &'a [(FlowKeyV4, Nat64Reply)],
    ) -> Tables<'a> {
        Tables {
            rules_v6: rules,
            host_addrs_v6: hosts,
            nat64_flows: flows,
            nat64_replies: replies,
            route: Some(ROUTE),
            ingress_ifindex: CLIENT_IF,
            now_ns: NOW,
            ..Tables::default()
        }
    }

    fn run64(maps: &Tables<'_>, input: &[u8]) -> (Nat64Outcome, Vec<u8>) {
        let mut out = std::vec![0u8; input.len() + 20];
        let o = program(maps, input, &mut out);
        out.truncate(o.len);
        (o, out)
    }

    /// The IPv4 or IPv6 header fields of a frame, after checking every checksum.
    fn addrs(frame: &[u8]) -> (IpAddr, IpAddr, u8) {
        let h = PacketHeaders::from_ethernet_slice(frame).expect("parsable");
        match h.net {
            Some(NetHeaders::Ipv4(ip, _)) => {
                assert!(ip.dont_fragment);
                (
                    Ipv4Addr::from(ip.source).into(),
                    Ipv4Addr::from(ip.destination).into(),
                    ip.time_to_live,
                )
            }
            Some(NetHeaders::Ipv6(ip, _)) => (
                Ipv6Addr::from(ip.source).into(),
                Ipv6Addr::from(ip.destination).into(),
                ip.hop_limit,
            ),
            other => panic!("{other:?}"),
        }
    }

    /// The FIB checks the translated packet against the route's MTU: an IPv6 packet of
    /// MTU + 20 bytes fits once IPv4, one byte more does not (passed, counted).
    #[test]
    fn route_mtu_bounds_the_translated_packet() {
        let rules = rules();
        let hosts = [v6(HOST6)];
        let maps = tables(&rules, &hosts, &[], &[]);
        let base = F::new(proto::UDP, (CLIENT6, 40000), (HOST6, 7001)).build();
        for (ipv4_len, fits) in [(1500usize, true), (1501, false)] {
            let mut input = base.clone();
            // UDP header (8) and payload; the checksum does not matter to the verdict.
            let payload_len = ipv4_len - 20;
            input.resize(14 + 40 + payload_len, 0xab);
            input[18..20].copy_from_slice(&(payload_len as u16).to_be_bytes());
            let (o, _) = run64(&maps, &input);
            let want = if fits {
                Reason::Nat64Translated
            } else {
                Reason::Nat64TooBig
            };
            assert_eq!(o.reason, want, "IPv4 length {ipv4_len}");
        }
    }

    /// Both ways, TCP and UDP: the client's packet leaves as IPv4 from the route's
    /// address and a NAT64 port, the backend's answer comes back as IPv6 from the
    /// published address; every checksum right.
    #[test]
    fn both_ways() {
        let rules = rules();
        let hosts = [v6(HOST6)];
        for (l4, port, bport) in [(proto::TCP, 7000, 8080), (proto::UDP, 7001, 53)] {
            let maps = tables(&rules, &hosts, &[], &[]);
            let req = F::new(l4, (CLIENT6, 40000), (HOST6, port));
            let input = req.build();
            assert_eq!(
                run(Hook::TcIngress, &maps, &mut input.clone()).verdict,
                Verdict::TailCallNat64
            );
            assert!(entry(&maps, &input));
            let (o, out) = run64(&maps, &input);
            assert_eq!(o.verdict, Verdict::RedirectNeigh(ROUTE.ifindex));
            assert_eq!(o.reason, Reason::Nat64Translated);
            assert_eq!(out.len(), input.len() - 20);
            let snat_port = port_candidate(port_start(&v6(CLIENT6), 40000u16.to_be_bytes()), 0);
            let snat = u16::from_be_bytes(snat_port);
            assert_eq!(checked(&out), (snat, bport));
            assert_eq!(
                addrs(&out),
                (Ipv4Addr::from(ROUTE.src).into(), BACKEND4.into(), 63)
            );
            let (flow, reply) = (o.flow.expect("flow"), o.reply.expect("reply"));
            assert_eq!(flow.1.snat_port, snat_port);
            assert_eq!(reply.1.client_ifindex, CLIENT_IF);
            assert_eq!(reply.1.last_seen_ns, NOW);

            // The same flow again: its port, marked seen.
            let flows = [flow];
            let replies = [reply];
            let maps = tables(&rules, &hosts, &flows, &replies);
            let (again, out2) = run64(&maps, &input);
            assert_eq!(out2, out);
            assert_eq!((again.flow, again.reply), (None, Some(reply)));

            // The backend's answer.
            let answer = F {
                ack: true,
                ..F::new(l4, (BACKEND4, bport), (Ipv4Addr::from(ROUTE.src), snat))
            };
            let answer = answer.build();
            assert!(maps.is_nat64_reply(&FlowKeyV4::new(
                BACKEND4.octets(),
                bport.to_be_bytes(),
                ROUTE.src,
                snat_port,
                l4
            )));
            assert_eq!(
                run(Hook::TcIngress, &maps, &mut answer.clone()).verdict,
                Verdict::TailCallNat64
            );
            assert!(entry(&maps, &answer));
            let (o, back) = run64(&maps, &answer);
            assert_eq!(o.verdict, Verdict::RedirectNeigh(CLIENT_IF));
            assert_eq!(o.reason, Reason::Nat64ReplyTranslated);
            assert_eq!(o.rule.map(|r| r.reply), Some(true));
            assert_eq!(back.len(), answer.len() + 20);
            assert_eq!(checked(&back), (port, 40000));
            assert_eq!(addrs(&back), (HOST6.into(), CLIENT6.into(), 63));
        }
    }

    /// What NAT64 passes, and why.
    #[test]
    fn failures() {
        let rules = rules();
        let hosts = [v6(HOST6)];
        let maps = tables(&rules, &hosts, &[], &[]);
        let req = F::new(proto::TCP, (CLIENT6, 40000), (HOST6, 7000));
        let no_route = Tables {
            route: None,
            ..maps
        };
        let cases: [(&str, &Tables<'_>, Vec<u8>, Reason); 5] = [
            (
                "VLAN tag",
                &maps,
                F {
                    vlan: true,
                    ..req.clone()
                }
                .build(),
                Reason::Nat64Unsupported,
            ),
            (
                "hop limit 1",
                &maps,
                F {
                    ttl: 1,
                    ..req.clone()
                }
                .build(),
                Reason::Nat64HopLimit,
            ),
            ("no route", &no_route, req.build(), Reason::Nat64NoRoute),
            (
                "mid-flow, no state",
                &maps,
                F {
                    ack: true,
                    ..req.clone()
                }
                .build(),
                Reason::PassNoFlow,
            ),
            (
                "reply without a flow",
                &maps,
                F::new(
                    proto::TCP,
                    (BACKEND4, 8080),
                    (Ipv4Addr::from(ROUTE.src), 61000),
                )
                .build(),
                Reason::Nat64ReplyNoFlow,
            ),
        ];
        for (what, maps, input, reason) in cases {
            let (o, out) = run64(maps, &input);
            assert_eq!((o.verdict, o.reason), (Verdict::Pass, reason), "{what}");
            assert_eq!(out, input, "{what}: untouched");
            assert_eq!((o.flow, o.reply, o.rule), (None, None, None), "{what}");
        }
        assert!(!entry(
            &maps,
            &F::new(proto::TCP, (BACKEND4, 8080), (HOST4, 40000)).build()
        ));
    }

    /// Ports: a live flow's is skipped, one whose TCP flow closed long ago is taken
    /// over, and all tries taken is a failure.
    #[test]
    fn port_search() {
        let rules = rules();
        let hosts = [v6(HOST6)];
        let input = F::new(proto::TCP, (CLIENT6, 40000), (HOST6, 7000)).build();
        let start = port_start(&v6(CLIENT6), 40000u16.to_be_bytes());
        let taken = |n: u16, flags: u8, last_seen_ns: u64| {
            (
                FlowKeyV4::new(
                    BACKEND4.octets(),
                    8080u16.to_be_bytes(),
                    ROUTE.src,
                    port_candidate(start, n),
                    proto::TCP,
                ),
                Nat64Reply {
                    client_addr: [9; 16],
                    host_addr: v6(HOST6),
                    client_port: [1, 1],
                    host_port: 7000u16.to_be_bytes(),
                    stats_slot: 14,
                    client_ifindex: 1,
                    client_fin_end: 0,
                    client_fin_tsval: 0,
                    flags,
                    _pad: [0; 3],
                    last_seen_ns,
                },
            )
        };
        let live = [taken(0, 0, NOW)];
        let (o, _) = run64(&tables(&rules, &hosts, &[], &live), &input);
        assert_eq!(o.flow.expect("flow").1.snat_port, port_candidate(start, 1));
        let closed = [taken(0, NAT64_CLOSING, 0)];
        let (o, _) = run64(&tables(&rules, &hosts, &[], &closed), &input);
        assert_eq!(o.flow.expect("flow").1.snat_port, port_candidate(start, 0));
        let all: Vec<_> = (0..NAT64_PORT_TRIES).map(|n| taken(n, 0, NOW)).collect();
        let (o, out) = run64(&tables(&rules, &hosts, &[], &all), &input);
        assert_eq!((o.verdict, o.reason), (Verdict::Pass, Reason::Nat64NoPort));
        assert!(!o.reclaimed);
        assert_eq!(out, input);

        // Every candidate held, some by connections closed just now: the first closed
        // one is taken over (a half-closed one, FIN one way only, is not).
        let half = NAT64_CLOSING | NAT64_FIN_BACKEND;
        let closed = half | NAT64_FIN_CLIENT | NAT64_CLOSED;
        let mut held: Vec<_> = (0..NAT64_PORT_TRIES).map(|n| taken(n, half, NOW)).collect();
        held[5] = taken(5, closed, NOW);
        held[6] = taken(6, NAT64_CLOSING | NAT64_CLOSED, NOW);
        let (o, _) = run64(&tables(&rules, &hosts, &[], &held), &input);
        assert_eq!(o.reason, Reason::Nat64Translated);
        assert!(o.reclaimed);
        let (key4, reply) = o.reply.expect("reply entry");
        assert_eq!(key4, held[5].0);
        assert_eq!(
            (reply.client_port, reply.flags),
            (40000u16.to_be_bytes(), 0)
        );
        assert_eq!(o.flow.expect("flow").1.snat_port, port_candidate(start, 5));

        // A backend that closed first holds the tuple in TIME_WAIT, which takes a SYN
        // (sequence number 1000, no timestamp here) only past the client's FIN: such a
        // closed one is not taken if the SYN is not past it; the next closed one is.
        let tw = closed | NAT64_FIN_BACKEND_FIRST;
        let fin_at = |(k, mut r): (FlowKeyV4, Nat64Reply), end: u32| {
            r.client_fin_end = end;
            (k, r)
        };
        held[5] = fin_at(taken(5, tw, NOW), 1000);
        let (o, _) = run64(&tables(&rules, &hosts, &[], &held), &input);
        assert!(o.reclaimed && !o.reclaimed_early);
        assert_eq!(o.reply.expect("reply entry").0, held[6].0);
        held[3] = fin_at(taken(3, tw, NOW), 999);
        let (o, _) = run64(&tables(&rules, &hosts, &[], &held), &input);
        assert_eq!(o.reply.expect("reply entry").0, held[3].0);
        // No closed one the SYN is sure to open: the one closed longest ago, counted
        // apart.
        held[3] = fin_at(taken(3, tw, NOW - 1), 1000);
        held[2] = fin_at(taken(2, tw, NOW - 5), 1001);
        held[6] = fin_at(taken(6, tw, NOW - 3), 2000);
        let (o, _) = run64(&tables(&rules, &hosts, &[], &held), &input);
        assert_eq!(o.reason, Reason::Nat64Translated);
        assert!(o.reclaimed && o.reclaimed_early);
        assert_eq!(o.reply.expect("reply entry").0, held[2].0);
        assert_eq!(o.flow.expect("flow").1.snat_port, port_candidate(start, 2));
        // A reusable port (closed long ago) still comes first.
        held[7] = taken(7, NAT64_CLOSING, 0);
        let (o, _) = run64(&tables(&rules, &hosts, &[], &held), &input);
        assert!(!o.reclaimed && !o.reclaimed_early);
        assert_eq!(o.flow.expect("flow").1.snat_port, port_candidate(start, 7));
        // UDP flows are never "closed": their ports wait for the idle time.
        let udp = F::new(proto::UDP, (CLIENT6, 40000), (HOST6, 7001)).build();
        let udp_held: Vec<_> = (0..NAT64_PORT_TRIES)
            .map(|n| {
                let key = FlowKeyV4::new(
                    BACKEND4.octets(),
                    53u16.to_be_bytes(),
                    ROUTE.src,
                    port_candidate(start, n),
                    proto::UDP,
                );
                (key, taken(n, closed, NOW).1)
            })
            .collect();
        let (o, _) = run64(&tables(&rules, &hosts, &[], &udp_held), &udp);
        assert_eq!(o.reason, Reason::Nat64NoPort);
    }

    /// The client's FIN records where it ends (its sequence number, data, and one for
    /// the FIN): what a SYN that would take its port over is compared with. Other
    /// client segments and the backend's FIN leave it alone.
    #[test]
    fn client_fin_end_is_recorded() {
        use crate::packet::TCP_FIN;
        let rules = rules();
        let hosts = [v6(HOST6)];
        let req = F::new(proto::TCP, (CLIENT6, 40000), (HOST6, 7000));
        let (o, _) = run64(&tables(&rules, &hosts, &[], &[]), &req.build());
        let flows = [o.flow.expect("flow")];
        let (key4, reply) = o.reply.expect("reply");
        assert_eq!(reply.client_fin_end, 0);
        let replies = [(key4, reply)];
        let maps = tables(&rules, &hosts, &flows, &replies);
        // Sequence number 1000, 13 bytes of data ("model payload").
        let mut seg = F {
            ack: true,
            ..req.clone()
        }
        .build();
        let (o, _) = run64(&maps, &seg);
        assert_eq!(o.reason, Reason::Nat64Translated);
        assert_eq!(o.reply.expect("seen").1.client_fin_end, 0);
        seg[14 + 40 + 13] |= TCP_FIN;
        let (o, _) = run64(&maps, &seg);
        let r = o.reply.expect("seen").1;
        assert_eq!(r.client_fin_end, 1000 + 13 + 1);
        assert_ne!(r.flags & NAT64_FIN_CLIENT, 0);
        // No timestamp option on it.
        assert_eq!(r.flags & crate::NAT64_FIN_CLIENT_TS, 0);

        let snat = flows[0].1.snat_port;
        let replies = [(key4, r)];
        let maps = tables(&rules, &hosts, &flows, &replies);
        let mut fin = F {
            ack: true,
            ..F::new(
                proto::TCP,
                (BACKEND4, 8080),
                (Ipv4Addr::from(ROUTE.src), u16::from_be_bytes(snat)),
            )
        }
        .build();
        fin[14 + 20 + 13] |= TCP_FIN;
        let (o, _) = run64(&maps, &fin);
        assert_eq!(o.reason, Reason::Nat64ReplyTranslated);
        let r = o.reply.expect("seen").1;
        assert_eq!(r.client_fin_end, 1014);
        assert_ne!(r.flags & NAT64_FIN_BACKEND, 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Random clients, ports, payloads and hop limits, both ways: every checksum
        /// right, every address and port where NAT64 puts it.
        #[test]
        fn random_both_ways(
            client in any::<[u8; 16]>(),
            sport in 1u16..,
            udp in any::<bool>(),
            hops in 2u8..,
            payload in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            let rules = rules();
            let hosts = [v6(HOST6)];
            let maps = tables(&rules, &hosts, &[], &[]);
            let (l4, port, bport) = if udp { (proto::UDP, 7001, 53) } else { (proto::TCP, 7000, 8080) };
            let client = Ipv6Addr::from(client);
            let req = F { ttl: hops, payload, ..F::new(l4, (client, sport), (HOST6, port)) };
            let (o, out) = run64(&maps, &req.build());
            prop_assert_eq!(o.reason, Reason::Nat64Translated);
            let (snat, dport) = checked(&out);
            prop_assert_eq!(dport, bport);
            prop_assert_eq!(addrs(&out), (Ipv4Addr::from(ROUTE.src).into(), BACKEND4.into(), hops - 1));

            let flows = [o.flow.expect("flow")];
            let replies = [o.reply.expect("reply")];
            let maps = tables(&rules, &hosts, &flows, &replies);
            let answer = F { ttl: hops, ..req.src((BACKEND4, bport)).dst((Ipv4Addr::from(ROUTE.src), snat)) };
            let (o, back) = run64(&maps, &answer.build());
            prop_assert_eq!(o.reason, Reason::Nat64ReplyTranslated);
            prop_assert_eq!(checked(&back), (port, sport));
            prop_assert_eq!(addrs(&back), (HOST6.into(), client.into(), hops - 1));
        }
    }
}
