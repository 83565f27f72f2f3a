//! BPF_PROG_RUN of NAT64 (remote IPv6 clients of an IPv4-only backend): the real
//! programs, run by the kernel on crafted frames carrying full checksums (as from a
//! wire), their output parsed back and checked field by field, with every checksum
//! recomputed from scratch (etherparse) and compared. Every run is also compared with
//! the model (`portfwd_common::model::nat64`, through `fixture::compare_in`).
//!
//! NAT64 asks the kernel's FIB for the route to the backend and the host's address on
//! it, and BPF_PROG_RUN runs in the caller's network namespace: the runs happen inside a
//! namespace of their own holding 198.18.1.1/24 (never the root namespace's routes).
//!
//! Needs root; skips without it, except under `CI=true`, where it fails.

mod common;

use std::net::{Ipv4Addr, Ipv6Addr};

use aya::maps::HashMap;
use etherparse::{NetHeaders, PacketHeaders, TransportHeader};
use portfwd::dataplane::Dataplane;
use portfwd_common::model::nat64::Route;
use portfwd_common::{
    nat64::{port_candidate, port_start},
    programs, proto, BackendV6, FlowKeyV4, Nat64Reply, Reason, RuleKeyV6, NAT64_CLOSED,
    NAT64_CLOSING, NAT64_FIN_BACKEND, NAT64_FIN_BACKEND_FIRST, NAT64_FIN_CLIENT,
    NAT64_FIN_CLIENT_TS, NAT64_PORT_COUNT, NAT64_PORT_MIN, NAT64_PORT_TRIES, NAT64_REPLIES,
};
use portfwd_tests::{
    fixture::{
        self, compare_gso_in, compare_in, reason_count as reason, Env, Frame, Prog, MAC_A, MAC_B,
        TC_NEXT, TC_REDIRECT,
    },
    netns::Netns,
    require_root,
};

const CLIENT: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
const HOST: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
/// A second host address: the same client port to it is another flow, whose port search
/// starts at the same place (the start hashes the client's address and port).
const HOST2: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 9, 0, 0, 0, 1);
/// The host's address on the backends' network, and a backend (IPv4 only).
const HOST4: Ipv4Addr = fixture::BACKEND_NET4.0;
const BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);

/// The rules: `*`:9000/tcp and `*`:5353/udp to the IPv4-only BACKEND, as the daemon
/// writes them (the IPv6 side holds the backend IPv4-mapped).
fn dataplane() -> Dataplane {
    let mut dp = Dataplane::load().expect("load programs");
    let mapped = BACKEND.to_ipv6_mapped();
    for (port, l4, backend_port, slot) in [(9000, proto::TCP, 8080, 1), (5353, proto::UDP, 53, 2)] {
        dp.insert_rule_v6(
            RuleKeyV6::from_parts(Ipv6Addr::UNSPECIFIED, port, l4),
            BackendV6::new(mapped, backend_port, slot),
        )
        .expect("rule");
    }
    dp.sync_host_addrs_v6(&[HOST, HOST2].into_iter().collect())
        .expect("host addrs");
    dp
}

/// [`dataplane`], and `*`:9001/tcp to the backend's 8080 as well (one backend port, so
/// one NAT64 port space for both published ports).
fn dataplane_two_ports() -> Dataplane {
    let mut dp = dataplane();
    dp.insert_rule_v6(
        RuleKeyV6::from_parts(Ipv6Addr::UNSPECIFIED, 9001, proto::TCP),
        BackendV6::new(BACKEND.to_ipv6_mapped(), 8080, 3),
    )
    .expect("rule");
    dp
}

/// The NAT64 reply key of the backend's 8080/tcp answering NAT64's `port` (network
/// order).
fn reply_key(port: [u8; 2]) -> FlowKeyV4 {
    FlowKeyV4::new(
        BACKEND.octets(),
        8080u16.to_be_bytes(),
        HOST4.octets(),
        port,
        proto::TCP,
    )
}

/// A namespace with the backends' network on a veth (its peer stays in the namespace
/// too), forwarding on; and its route to the backends, as the model is told it.
struct BackendNet {
    ns: Netns,
    route: Route,
}

fn backend_net() -> BackendNet {
    // The backend a permanent neighbour too: NAT64's lookup skips neighbours.
    let (ns, fib) = fixture::backend_net("n64", &[BACKEND.into()]);
    BackendNet {
        ns,
        route: Route {
            src: HOST4.octets(),
            ifindex: fib.ifindex,
            mtu: fib.mtu,
        },
    }
}

/// Runs the TC program `prog` on `input` inside the namespace (whose FIB NAT64
/// consults), checked against the model ([`compare_in`]).
fn run(dp: &Dataplane, net: &BackendNet, prog: &'static str, input: &[u8]) -> (u32, Vec<u8>) {
    let prog = match prog {
        programs::TC_INGRESS => Prog::TcIngress,
        programs::TC_NAT64_ENTRY => Prog::Nat64Entry,
        other => panic!("not a NAT64 fixture program: {other}"),
    };
    let env = Env {
        ns: Some(&net.ns),
        route: Some(net.route),
        fib: None,
    };
    let c = compare_in(dp, env, prog, input).expect("a frame the kernel runs");
    (c.verdict, c.output)
}

const PAYLOAD: &[u8] = b"portfwd nat64 fixture payload";

fn v6_frame(l4: u8, src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), hops: u8) -> Vec<u8> {
    frame_v6(l4, src, dst, hops, PAYLOAD)
}

fn v4_frame(l4: u8, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), ttl: u8) -> Vec<u8> {
    frame_v4(l4, src, dst, ttl, PAYLOAD)
}

/// What a translated frame says: (source, destination, TTL or hop limit, protocol),
/// after checking every checksum it carries against one computed from scratch.
fn parse_checked(frame: &[u8]) -> ((String, u16), (String, u16), u8, u8) {
    parse_checked_with(frame, PAYLOAD)
}

/// As [`parse_checked`], for a frame carrying `want` as its payload.
fn parse_checked_with(frame: &[u8], want: &[u8]) -> ((String, u16), (String, u16), u8, u8) {
    let h = PacketHeaders::from_ethernet_slice(frame).expect("a parsable frame");
    let payload = h.payload.slice();
    assert_eq!(payload, want, "payload intact");
    let (src, dst, ttl, l4) = match &h.net {
        Some(NetHeaders::Ipv4(ip, _)) => {
            assert_eq!(
                ip.header_checksum,
                ip.calc_header_checksum(),
                "IPv4 header checksum"
            );
            assert!(ip.dont_fragment, "DF set");
            (
                Ipv4Addr::from(ip.source).to_string(),
                Ipv4Addr::from(ip.destination).to_string(),
                ip.time_to_live,
                ip.protocol.0,
            )
        }
        Some(NetHeaders::Ipv6(ip, _)) => (
            Ipv6Addr::from(ip.source).to_string(),
            Ipv6Addr::from(ip.destination).to_string(),
            ip.hop_limit,
            ip.next_header.0,
        ),
        other => panic!("not IP: {other:?}"),
    };
    let (sport, dport) = match (&h.net, &h.transport) {
        (Some(NetHeaders::Ipv4(ip, _)), Some(TransportHeader::Tcp(t))) => {
            assert_eq!(
                t.checksum,
                t.calc_checksum_ipv4(ip, payload).expect("sum"),
                "TCP/IPv4 checksum"
            );
            (t.source_port, t.destination_port)
        }
        (Some(NetHeaders::Ipv6(ip, _)), Some(TransportHeader::Tcp(t))) => {
            assert_eq!(
                t.checksum,
                t.calc_checksum_ipv6(ip, payload).expect("sum"),
                "TCP/IPv6 checksum"
            );
            (t.source_port, t.destination_port)
        }
        (Some(NetHeaders::Ipv4(ip, _)), Some(TransportHeader::Udp(u))) => {
            assert_eq!(
                u.checksum,
                u.calc_checksum_ipv4(ip, payload).expect("sum"),
                "UDP/IPv4 checksum"
            );
            (u.source_port, u.destination_port)
        }
        (Some(NetHeaders::Ipv6(ip, _)), Some(TransportHeader::Udp(u))) => {
            assert_eq!(
                u.checksum,
                u.calc_checksum_ipv6(ip, payload).expect("sum"),
                "UDP/IPv6 checksum"
            );
            (u.source_port, u.destination_port)
        }
        other => panic!("not TCP/UDP: {other:?}"),
    };
    ((src, sport), (dst, dport), ttl, l4)
}

/// Both directions, TCP and UDP: the client's IPv6 packet leaves as IPv4 from the host's
/// address and a NAT64 port to the backend; the backend's reply to that port leaves as
/// IPv6 from the published address to the client. Checksums are right both ways.
#[test]
fn nat64_translates_both_ways_with_valid_checksums() {
    if !require_root("nat64_translates_both_ways_with_valid_checksums") {
        return;
    }
    let dp = dataplane();
    let ns = backend_net();
    for (l4, host_port, backend_port) in [(proto::TCP, 9000, 8080), (proto::UDP, 5353, 53)] {
        let what = if l4 == proto::TCP { "tcp" } else { "udp" };
        let input = v6_frame(l4, (CLIENT, 40000), (HOST, host_port), 64);
        let (verdict, out) = run(&dp, &ns, programs::TC_INGRESS, &input);
        assert_eq!(
            verdict, TC_REDIRECT,
            "{what}: sent to the backend's interface"
        );
        let (src, dst, ttl, got_l4) = parse_checked(&out);
        assert_eq!(out.len(), input.len() - 20, "{what}: 20 header bytes fewer");
        assert_eq!(got_l4, l4);
        assert_eq!(src.0, HOST4.to_string(), "{what}: from the host's address");
        let port = src.1;
        assert!(
            port >= NAT64_PORT_MIN
                && u32::from(port - NAT64_PORT_MIN) < u32::from(NAT64_PORT_COUNT),
            "{what}: a NAT64 port, got {port}"
        );
        assert_eq!(dst, (BACKEND.to_string(), backend_port), "{what}");
        assert_eq!(ttl, 63, "{what}: forwarded, one hop less");

        // The same flow again keeps its port.
        let (_, again) = run(&dp, &ns, programs::TC_INGRESS, &input);
        assert_eq!(
            parse_checked(&again).0 .1,
            port,
            "{what}: same flow, same port"
        );

        // The backend's reply, as from the wire, arriving on its interface.
        let reply = v4_frame(l4, (BACKEND, backend_port), (HOST4, port), 64);
        let before = reason(&dp, Reason::Nat64ReplyTranslated);
        for prog in [programs::TC_INGRESS, programs::TC_NAT64_ENTRY] {
            let (verdict, out) = run(&dp, &ns, prog, &reply);
            assert_eq!(
                verdict, TC_REDIRECT,
                "{what} {prog}: sent to the client's interface"
            );
            assert_eq!(out.len(), reply.len() + 20, "{what}: 20 header bytes more");
            let (src, dst, hops, got_l4) = parse_checked(&out);
            assert_eq!(got_l4, l4);
            assert_eq!(
                src,
                (HOST.to_string(), host_port),
                "{what}: from the published address"
            );
            assert_eq!(dst, (CLIENT.to_string(), 40000), "{what}: to the client");
            assert_eq!(hops, 63);
        }
        assert_eq!(reason(&dp, Reason::Nat64ReplyTranslated), before + 2);
    }
    assert!(reason(&dp, Reason::Nat64Translated) >= 4);
}

/// A GSO packet (a GRO or TSO super-packet) longer than the route's MTU is translated
/// when each of its segments fits, the MTU checked against one (IPv4 header, TCP header,
/// `gso_size`), and passed (counted) when a segment does not; the same frame not GSO is
/// passed as too long. The model agrees on each.
#[test]
fn nat64_translates_a_gso_packet_whose_segments_fit() {
    if !require_root("nat64_translates_a_gso_packet_whose_segments_fit") {
        return;
    }
    let dp = dataplane();
    let net = backend_net();
    let env = Env {
        ns: Some(&net.ns),
        route: Some(net.route),
        fib: None,
    };
    let client = (CLIENT, 42000);
    let syn = v6_frame(proto::TCP, client, (HOST, 9000), 64);
    assert_eq!(run(&dp, &net, programs::TC_INGRESS, &syn).0, TC_REDIRECT);
    // 2,800 bytes of data: 2,840 as IPv4, over the route's 1,500.
    let data: Vec<u8> = (0..2800u32).map(|i| i as u8).collect();
    let big = Frame {
        payload: data.clone(),
        ack: Some(1),
        ..Frame::new(proto::TCP, client, (HOST, 9000))
    }
    .build();
    // (gso_size, translated): a segment is 20 + 20 + gso_size bytes as IPv4.
    for (gso_size, fits) in [(0, false), (1400, true), (1460, true), (1461, false)] {
        let failed = reason(&dp, Reason::Nat64TooBig);
        let c = compare_gso_in(&dp, env, Prog::TcIngress, &big, gso_size)
            .expect("a frame the kernel runs");
        if fits {
            assert_eq!(c.verdict, TC_REDIRECT, "gso_size {gso_size}: translated");
            let (src, dst, _, _) = parse_checked_with(&c.output, &data);
            assert_eq!(src.0, HOST4.to_string(), "gso_size {gso_size}");
            assert_eq!(dst, (BACKEND.to_string(), 8080), "gso_size {gso_size}");
        } else {
            assert_eq!(c.verdict, TC_NEXT, "gso_size {gso_size}: passed");
            assert_eq!(c.output, big, "gso_size {gso_size}: untouched");
            assert_eq!(reason(&dp, Reason::Nat64TooBig), failed + 1);
        }
    }
}

/// What NAT64 leaves alone: a new client's mid-flow TCP segment (no state to translate
/// it with), a reply to a NAT64 port that no flow holds, ordinary IPv4 traffic through
/// the entry program, an IPv6 packet whose hop limit would expire.
#[test]
fn nat64_leaves_the_rest_untouched() {
    if !require_root("nat64_leaves_the_rest_untouched") {
        return;
    }
    let dp = dataplane();
    let ns = backend_net();
    let mut mid_flow = v6_frame(proto::TCP, (CLIENT, 41000), (HOST, 9000), 64);
    // SYN → ACK: flags byte of the TCP header; the checksum is left stale on purpose
    // (an untouched frame is compared byte for byte, not checked).
    mid_flow[14 + 40 + 13] = 0x10;
    let cases: [(&str, &str, Vec<u8>, u32); 4] = [
        ("mid-flow tcp", programs::TC_INGRESS, mid_flow, TC_NEXT),
        (
            "reply without a flow",
            programs::TC_INGRESS,
            v4_frame(proto::TCP, (BACKEND, 8080), (HOST4, NAT64_PORT_MIN), 64),
            TC_NEXT,
        ),
        (
            "ordinary IPv4 through the entry",
            programs::TC_NAT64_ENTRY,
            v4_frame(proto::TCP, (BACKEND, 8080), (HOST4, 40000), 64),
            TC_NEXT,
        ),
        (
            "hop limit 1",
            programs::TC_INGRESS,
            v6_frame(proto::UDP, (CLIENT, 41001), (HOST, 5353), 1),
            TC_NEXT,
        ),
    ];
    for (what, prog, input, want) in cases {
        let (verdict, out) = run(&dp, &ns, prog, &input);
        assert_eq!(verdict, want, "{what}");
        assert_eq!(out, input, "{what}: untouched");
    }
}

/// The NAT64 source port of translating `input` (a TCP SYN or UDP datagram to `*`:9000 or
/// `*`:5353), after checking it was translated.
fn nat64_port(dp: &Dataplane, ns: &BackendNet, input: &[u8]) -> u16 {
    let (verdict, out) = run(dp, ns, programs::TC_INGRESS, input);
    assert_eq!(verdict, TC_REDIRECT, "translated");
    parse_checked(&out).0 .1
}

/// Ports are unique while flows live, and go to new flows once theirs are over: a port
/// whose flow is live is skipped; one whose TCP flow closed (FIN or RST) a while ago is
/// taken over, and the old flow, if it sends again, no longer owns it.
#[test]
fn nat64_ports_are_unique_while_live_and_reused_once_over() {
    if !require_root("nat64_ports_are_unique_while_live_and_reused_once_over") {
        return;
    }
    let mut dp = dataplane_two_ports();
    let ns = backend_net();
    // Flow A, then flow B: same client address and port (same search start), other
    // published address. A is live: B gets another port.
    let a = v6_frame(proto::TCP, (CLIENT, 45000), (HOST, 9000), 64);
    let b = v6_frame(proto::TCP, (CLIENT, 45000), (HOST2, 9000), 64);
    let port_a = nat64_port(&dp, &ns, &a);
    let port_b = nat64_port(&dp, &ns, &b);
    assert_ne!(port_a, port_b, "a live flow's port is not shared");

    // A closes (an RST seen), long enough ago: its reply entry says so.
    let key = reply_key(port_a.to_be_bytes());
    {
        let mut replies: HashMap<_, FlowKeyV4, Nat64Reply> =
            HashMap::try_from(dp.ebpf_mut().map_mut(NAT64_REPLIES).expect("NAT64_REPLIES"))
                .expect("hash map");
        let mut r = replies.get(&key, 0).expect("A's reply entry");
        r.flags |= NAT64_CLOSING;
        r.last_seen_ns = 0;
        replies.insert(key, r, 0).expect("age it");
    }
    // Flow C (same search start) takes A's port over.
    let c = v6_frame(proto::TCP, (CLIENT, 45000), (HOST2, 9001), 64);
    let port_c = nat64_port(&dp, &ns, &c);
    assert_eq!(port_c, port_a, "a closed flow's port goes to the next flow");
    // A's next segment finds its port gone: not translated with C's port.
    let mut a_again = a.clone();
    a_again[14 + 40 + 13] = 0x10;
    let (verdict, out) = run(&dp, &ns, programs::TC_INGRESS, &a_again);
    assert_eq!(
        (verdict, out),
        (TC_NEXT, a_again),
        "the old flow no longer owns it"
    );
}

/// Every port a new TCP flow may take is held, none long idle (connection churn from one
/// client: each port held 10 s after its close): the first one held by a closed
/// connection (a FIN each way and the last ACK, or an RST) whose backend takes the SYN
/// even from TIME_WAIT (its sequence number past the client's FIN) is taken over and
/// counted, as conntrack's NAT does when it runs out of tuples; one closed only one way
/// is not. With no such one, the one closed longest ago is, counted as early. Before,
/// the first closed one was taken whatever the SYN's sequence number, and the backend
/// answered from TIME_WAIT with the old connection's ACK (the client then reset and
/// retransmitted its SYN a second later).
#[test]
fn nat64_takes_over_a_closed_connections_port_when_all_are_held() {
    if !require_root("nat64_takes_over_a_closed_connections_port_when_all_are_held") {
        return;
    }
    let mut dp = dataplane_two_ports();
    let ns = backend_net();
    let client = (CLIENT, 46000);
    let start = port_start(&CLIENT.octets(), 46000u16.to_be_bytes());
    let key = |n: u16| reply_key(port_candidate(start, n));
    let half = NAT64_CLOSING | NAT64_FIN_BACKEND;
    let closed = half | NAT64_FIN_CLIENT | NAT64_CLOSED;
    {
        let mut replies: HashMap<_, FlowKeyV4, Nat64Reply> =
            HashMap::try_from(dp.ebpf_mut().map_mut(NAT64_REPLIES).expect("NAT64_REPLIES"))
                .expect("hash map");
        // The backend closed 3 and 5 first (TIME_WAIT). The SYNs (no timestamp option)
        // have sequence number 1000: 3's FIN ends there (not past it, the backend's
        // TIME_WAIT would not take it), 5's before.
        for n in 0..NAT64_PORT_TRIES {
            let (flags, client_fin_end) = match n {
                3 => (closed | NAT64_FIN_BACKEND_FIRST, 1000),
                5 => (closed | NAT64_FIN_BACKEND_FIRST, 999),
                _ => (half, 0),
            };
            let other = Nat64Reply {
                client_addr: HOST2.octets(),
                host_addr: HOST.octets(),
                client_port: (50000 + n).to_be_bytes(),
                host_port: 9000u16.to_be_bytes(),
                stats_slot: 1,
                client_ifindex: 1,
                client_fin_end,
                client_fin_tsval: 0,
                flags,
                _pad: [0; 3],
                // Later than the kernel's clock: never idle, never reusable.
                last_seen_ns: u64::MAX,
            };
            replies.insert(key(n), other, 0).expect("hold the port");
        }
    }
    let reclaimed = || {
        (
            reason(&dp, Reason::Nat64PortReclaimed),
            reason(&dp, Reason::Nat64PortReclaimedEarly),
        )
    };
    let (taken, early) = reclaimed();
    let syn = v6_frame(proto::TCP, client, (HOST, 9000), 64);
    // `run` checks the kernel against the model: verdict, bytes, reasons, entries.
    let port = nat64_port(&dp, &ns, &syn);
    assert_eq!(
        port.to_be_bytes(),
        port_candidate(start, 5),
        "the port of the closed one whose FIN the SYN is past"
    );
    assert_eq!(reclaimed(), (taken + 1, early));

    // Only 3 is closed now (5 belongs to the new, live flow): taken over all the same,
    // counted as early.
    let syn = v6_frame(proto::TCP, client, (HOST2, 9000), 64);
    let port = nat64_port(&dp, &ns, &syn);
    assert_eq!(
        port.to_be_bytes(),
        port_candidate(start, 3),
        "the last closed one"
    );
    assert_eq!(reclaimed(), (taken + 2, early + 1));

    // Nothing closed any more: passed, counted.
    let failed = reason(&dp, Reason::Nat64NoPort);
    let other = v6_frame(proto::TCP, client, (HOST, 9001), 64);
    let (verdict, out) = run(&dp, &ns, programs::TC_INGRESS, &other);
    assert_eq!(
        (verdict, out),
        (TC_NEXT, other),
        "no port: passed untouched"
    );
    assert_eq!(reason(&dp, Reason::Nat64NoPort), failed + 1);
}

/// Property: for random clients, ports, payload sizes, traffic classes and hop limits,
/// both directions come out with every field as NAT64 defines it and every checksum
/// right (recomputed from scratch).
#[test]
fn nat64_random_frames_both_ways() {
    if !require_root("nat64_random_frames_both_ways") {
        return;
    }
    use proptest::{prelude::*, test_runner::TestRunner};
    let dp = dataplane();
    let ns = backend_net();
    let mut runner = TestRunner::new(ProptestConfig::with_cases(100));
    runner
        .run(
            &(
                any::<[u8; 16]>(),
                1u16..,
                any::<bool>(),
                proptest::collection::vec(any::<u8>(), 0..1400),
                any::<u8>(),
                2u8..,
            ),
            |(client, sport, is_udp, payload, class, hops)| {
                let client = Ipv6Addr::from(client);
                let (l4, host_port, backend_port) = if is_udp {
                    (proto::UDP, 5353, 53)
                } else {
                    (proto::TCP, 9000, 8080)
                };
                // The client's packet, its traffic class set (not in any checksum).
                let mut input = frame_v6(l4, (client, sport), (HOST, host_port), hops, &payload);
                input[14] = (input[14] & 0xf0) | (class >> 4);
                input[15] = (input[15] & 0x0f) | (class << 4);
                let (verdict, out) = run(&dp, &ns, programs::TC_INGRESS, &input);
                prop_assert_eq!(verdict, TC_REDIRECT);
                let (src, dst, ttl, got_l4) = parse_checked_with(&out, &payload);
                prop_assert_eq!(got_l4, l4);
                prop_assert_eq!(&src.0, &HOST4.to_string());
                prop_assert_eq!(dst, (BACKEND.to_string(), backend_port));
                prop_assert_eq!(ttl, hops - 1);
                prop_assert_eq!(out[15], class, "TOS = traffic class");

                // The backend's answer, same payload, back to the client.
                let reply = frame_v4(l4, (BACKEND, backend_port), (HOST4, src.1), hops, &payload);
                let (verdict, back) = run(&dp, &ns, programs::TC_INGRESS, &reply);
                prop_assert_eq!(verdict, TC_REDIRECT);
                let (src6, dst6, hop_limit, _) = parse_checked_with(&back, &payload);
                prop_assert_eq!(src6, (HOST.to_string(), host_port));
                prop_assert_eq!(dst6, (client.to_string(), sport));
                prop_assert_eq!(hop_limit, hops - 1);
                Ok(())
            },
        )
        .expect("property");
}

/// A client's IPv6 frame (a TCP SYN, or UDP).
fn frame_v6(
    l4: u8,
    src: (Ipv6Addr, u16),
    dst: (Ipv6Addr, u16),
    hops: u8,
    payload: &[u8],
) -> Vec<u8> {
    Frame {
        hops,
        payload: payload.to_vec(),
        ..Frame::new(l4, src, dst)
    }
    .build()
}

/// A backend's IPv4 answer (a TCP ACK, or UDP), from the other MAC.
fn frame_v4(
    l4: u8,
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    ttl: u8,
    payload: &[u8],
) -> Vec<u8> {
    Frame {
        hops: ttl,
        macs: (MAC_B, MAC_A),
        seq: 2000,
        ack: Some(1001),
        payload: payload.to_vec(),
        ..Frame::new(l4, src, dst)
    }
    .build()
}

/// Property: random and mutated IPv6 frames (see `common`) against the NAT64 rules, at
/// XDP ingress, TC ingress (NAT64 followed through the tail call), TC egress and NAT64's
/// entry, and the backend's answer to every NAT64 flow: the kernel agrees with the model
/// on verdict, bytes, reasons, flows both ways and rule counters.
#[test]
fn nat64_kernel_matches_model_on_random_frames() {
    if !require_root("nat64_kernel_matches_model_on_random_frames") {
        return;
    }
    let dp = dataplane();
    let net = backend_net();
    let env = Env {
        ns: Some(&net.ns),
        route: Some(net.route),
        fib: None,
    };
    let pool = common::Pool {
        addrs: [HOST, HOST2, CLIENT].map(Into::into).to_vec(),
        hosts: 2,
        ipv4: false,
    };
    let progs = [
        Prog::XdpIngress,
        Prog::TcIngress,
        Prog::TcEgress,
        Prog::Nat64Entry,
    ];
    common::kernel_matches_model_in(&dp, env, &pool, &progs, 200);
}

/// A client's IPv6 TCP segment with the options Linux sends: a SYN (MSS, SACK
/// permitted, timestamps, NOP, window scale) or, with `ack`, a FIN (NOP, NOP,
/// timestamps), each with timestamp `tsval`.
fn v6_tcp_with_ts(client: (Ipv6Addr, u16), seq: u32, ack: Option<u32>, tsval: u32) -> Vec<u8> {
    let ts = tsval.to_be_bytes();
    let opts: Vec<u8> = match ack {
        None => [
            &[2, 4, 0x05, 0xa0, 4, 2, 8, 10][..],
            &ts,
            &[0, 0, 0, 0, 1, 3, 3, 10],
        ]
        .concat(),
        Some(_) => [&[1, 1, 8, 10][..], &ts, &[0, 0, 0, 7]].concat(),
    };
    let tcp = etherparse::PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv6(client.0.octets(), HOST.octets(), 64)
        .tcp(client.1, 9000, seq, 64800);
    let tcp = match ack {
        None => tcp.syn(),
        Some(n) => tcp.ack(n).fin(),
    };
    let mut out = Vec::new();
    tcp.options_raw(&opts)
        .expect("options")
        .write(&mut out, &[])
        .expect("frame");
    out
}

/// The kernel reads the client's FIN the way the model does: where it ends and its
/// timestamp (found among Linux's options) go into the reply entry. A later SYN whose
/// timestamp is older than that FIN's does not take the port over while the backend,
/// which closed first, may hold it in TIME_WAIT; one with a newer timestamp does. (The
/// capture that found this: the backend answered a SYN on a taken-over port with the
/// old connection's ACK whenever the SYN's timestamp was older, whatever its sequence
/// number.)
#[test]
fn nat64_takes_over_by_the_backends_time_wait_rules() {
    if !require_root("nat64_takes_over_by_the_backends_time_wait_rules") {
        return;
    }
    let mut dp = dataplane_two_ports();
    let ns = backend_net();
    let old = (CLIENT, 47000);
    let start = port_start(&CLIENT.octets(), 47000u16.to_be_bytes());
    // The old connection: SYN, then (the backend having closed first) the client's FIN.
    let port = empty_port(&dp, &ns, &v6_tcp_with_ts(old, 5000, None, 70_000));
    assert_eq!(port.to_be_bytes(), port_candidate(start, 0));
    let key = reply_key(port.to_be_bytes());
    let key_n = |n: u16| reply_key(port_candidate(start, n));
    let reply_entry = |dp: &Dataplane, k: &FlowKeyV4| {
        let m: HashMap<_, FlowKeyV4, Nat64Reply> =
            HashMap::try_from(dp.ebpf().map(NAT64_REPLIES).expect("NAT64_REPLIES"))
                .expect("hash map");
        m.get(k, 0).expect("reply entry")
    };
    // The backend's FIN first (what the kernel's entry says is checked against the
    // model by `run`).
    let backend_fin = etherparse::PacketBuilder::ethernet2(MAC_B, MAC_A)
        .ipv4(BACKEND.octets(), HOST4.octets(), 64)
        .tcp(8080, port, 9000, 64000)
        .ack(5001)
        .fin();
    let mut frame = Vec::new();
    backend_fin.write(&mut frame, &[]).expect("frame");
    let (verdict, _) = run(&dp, &ns, programs::TC_NAT64_ENTRY, &frame);
    assert_eq!(verdict, TC_REDIRECT, "the backend's FIN translated");
    let (verdict, _) = run(
        &dp,
        &ns,
        programs::TC_INGRESS,
        &v6_tcp_with_ts(old, 5001, Some(9001), 70_100),
    );
    assert_eq!(verdict, TC_REDIRECT, "the client's FIN translated");
    let r = reply_entry(&dp, &key);
    assert_eq!(
        (r.client_fin_end, r.client_fin_tsval),
        (5002, 70_100),
        "{r:?}"
    );
    let tw = NAT64_FIN_BACKEND_FIRST | NAT64_FIN_CLIENT | NAT64_FIN_CLIENT_TS;
    assert_eq!(r.flags & tw, tw, "{r:?}");
    // The backend's last ACK: closed.
    let mut frame = Vec::new();
    etherparse::PacketBuilder::ethernet2(MAC_B, MAC_A)
        .ipv4(BACKEND.octets(), HOST4.octets(), 64)
        .tcp(8080, port, 9001, 64000)
        .ack(5002)
        .write(&mut frame, &[])
        .expect("frame");
    run(&dp, &ns, programs::TC_NAT64_ENTRY, &frame);
    assert_ne!(reply_entry(&dp, &key).flags & NAT64_CLOSED, 0);

    // Every other candidate held: 4 by a connection the client closed first (no
    // TIME_WAIT on the backend), the rest live.
    {
        let mut replies: HashMap<_, FlowKeyV4, Nat64Reply> =
            HashMap::try_from(dp.ebpf_mut().map_mut(NAT64_REPLIES).expect("NAT64_REPLIES"))
                .expect("hash map");
        for n in 1..NAT64_PORT_TRIES {
            let both = NAT64_CLOSING | NAT64_FIN_CLIENT | NAT64_FIN_BACKEND;
            let flags = if n == 4 { both | NAT64_CLOSED } else { both };
            let other = Nat64Reply {
                client_addr: HOST2.octets(),
                host_addr: HOST.octets(),
                client_port: (51000 + n).to_be_bytes(),
                host_port: 9000u16.to_be_bytes(),
                stats_slot: 1,
                client_ifindex: 1,
                client_fin_end: 0,
                client_fin_tsval: 0,
                flags,
                _pad: [0; 3],
                last_seen_ns: u64::MAX,
            };
            replies.insert(key_n(n), other, 0).expect("hold the port");
        }
    }
    let counts = |dp: &Dataplane| {
        (
            reason(dp, Reason::Nat64PortReclaimed),
            reason(dp, Reason::Nat64PortReclaimedEarly),
        )
    };
    let (taken, early) = counts(&dp);
    // A SYN (same search start) whose timestamp is older than the old FIN's, its
    // sequence number far past: not the old connection's port (PAWS), 4's.
    let client2 = (CLIENT, 47000);
    let mut syn = v6_tcp_with_ts(client2, 1_000_000, None, 60_000);
    // To HOST2: another flow from the same client port.
    syn[14 + 24..14 + 40].copy_from_slice(&HOST2.octets());
    fix_tcp_v6_checksum(&mut syn);
    let port = empty_port(&dp, &ns, &syn);
    assert_eq!(
        port.to_be_bytes(),
        port_candidate(start, 4),
        "no TIME_WAIT there"
    );
    assert_eq!(counts(&dp), (taken + 1, early));
    // One whose timestamp is newer, its sequence number before: the old connection's.
    let mut syn = v6_tcp_with_ts(client2, 10, None, 70_101);
    syn[14 + 40 + 2..14 + 40 + 4].copy_from_slice(&9001u16.to_be_bytes());
    fix_tcp_v6_checksum(&mut syn);
    let port = empty_port(&dp, &ns, &syn);
    assert_eq!(
        port.to_be_bytes(),
        port_candidate(start, 0),
        "TIME_WAIT takes it"
    );
    assert_eq!(counts(&dp), (taken + 2, early));
}

/// Recomputes the TCP checksum of an IPv6 frame (no VLAN, no extension headers).
fn fix_tcp_v6_checksum(frame: &mut [u8]) {
    let (ip, tcp) = frame[14..].split_at_mut(40);
    tcp[16] = 0;
    tcp[17] = 0;
    let h = etherparse::Ipv6Header::from_slice(ip).expect("IPv6").0;
    let t = etherparse::TcpHeader::from_slice(tcp).expect("TCP").0;
    let sum = t
        .calc_checksum_ipv6(&h, &tcp[t.header_len()..])
        .expect("checksum");
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
}

/// As [`nat64_port`], for a segment without data.
fn empty_port(dp: &Dataplane, ns: &BackendNet, input: &[u8]) -> u16 {
    let (verdict, out) = run(dp, ns, programs::TC_INGRESS, input);
    assert_eq!(verdict, TC_REDIRECT, "translated");
    parse_checked_with(&out, &[]).0 .1
}
