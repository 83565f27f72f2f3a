//! BPF_PROG_RUN fixture tables for IPv6: the same programs as `prog_run.rs` (one entry
//! point per hook serves both families), run by the real kernel on crafted IPv6 frames
//! with seeded IPv6 maps. Each case gives the input frame, the expected verdict and the
//! expected output bytes (the untouched input, or the frame rebuilt from scratch with
//! the translated address and port and a freshly computed checksum). Every run is also
//! compared with the model (`fixture::compare`), and random and mutated frames check
//! kernel and model agree beyond the tables.
//!
//! Needs root (CAP_BPF + CAP_NET_ADMIN). Without it the suite skips, except under
//! `CI=true`, where it fails.

mod common;

use std::net::{Ipv4Addr, Ipv6Addr};

use aya::maps::Array;
use portfwd::dataplane::Dataplane;
use portfwd_common::{
    model::Verdict, proto, rule_cache::CachedRuleV6, BackendV4, BackendV6, BridgePortKey, Reason,
    RuleKeyV4, RuleKeyV6, CONNTRACK_V6, RULE_CACHE_V6,
};
use portfwd_tests::fixture::{
    backend_net, check_case, compare_in, echo_request, privileged, reply_translated, run,
    run_checked, translated, untouched, Case, Env, Frame, Prog, BACKEND_MAC, ETH, IP6,
};
use portfwd_tests::require_root;

/// Addresses from 2001:2::/48 (RFC 5180, benchmarking).
const CLIENT: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
const HOST: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
const HOST2: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 9, 0, 0, 0, 1);
const OTHER: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 7, 0, 0, 0, 7);
const BACKEND: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 2);

/// A loaded dataplane with the fixture rules: [HOST]:9000/tcp and [::]:5353/udp to
/// BACKEND, [::]:9001/tcp to the same backend port (one backend behind two host ports),
/// and an IPv4 wildcard on 7000/tcp (which must not serve IPv6).
fn fixture_dataplane() -> Dataplane {
    let mut dp = Dataplane::load().expect("load programs");
    dp.insert_rule_v6(
        RuleKeyV6::from_parts(HOST, 9000, proto::TCP),
        BackendV6::new(BACKEND, 8080, 1),
    )
    .expect("rule");
    dp.insert_rule_v6(
        RuleKeyV6::from_parts(Ipv6Addr::UNSPECIFIED, 5353, proto::UDP),
        BackendV6::new(BACKEND, 53, 2),
    )
    .expect("rule");
    dp.insert_rule_v6(
        RuleKeyV6::from_parts(Ipv6Addr::UNSPECIFIED, 9001, proto::TCP),
        BackendV6::new(BACKEND, 8080, 3),
    )
    .expect("rule");
    dp.insert_rule(
        RuleKeyV4::from_parts(Ipv4Addr::UNSPECIFIED, 7000, proto::TCP),
        BackendV4::new(Ipv4Addr::new(198, 18, 1, 2), 8080, 4),
    )
    .expect("v4 rule");
    dp.sync_host_addrs_v6(&[HOST, HOST2].into_iter().collect())
        .expect("host addrs");
    dp
}

fn ingress_cases() -> Vec<Case> {
    let tcp = Frame::tcp((CLIENT, 40000), (HOST, 9000));
    let udp = Frame::udp((CLIENT, 40001), (HOST2, 5353));
    let mut cases = vec![
        translated(
            "tcp to an address-bound rule",
            &tcp,
            &tcp.with_dst((BACKEND, 8080)),
        ),
        translated(
            "udp to a wildcard rule, host address",
            &udp,
            &udp.with_dst((BACKEND, 53)),
        ),
        translated(
            "udp to a wildcard rule, the other host address",
            &udp.with_dst((HOST, 5353)),
            &udp.with_dst((BACKEND, 53)),
        ),
        translated(
            "second host port of the same backend",
            &tcp.with_dst((HOST2, 9001)),
            &tcp.with_dst((BACKEND, 8080)),
        ),
    ];
    let mut vlan = udp.clone();
    vlan.vlan = Some(42);
    cases.push(translated(
        "802.1Q tag",
        &vlan,
        &vlan.with_dst((BACKEND, 53)),
    ));
    let mut vlan_tcp = tcp.clone();
    vlan_tcp.vlan = Some(7);
    cases.push(translated(
        "802.1Q tag, tcp",
        &vlan_tcp,
        &vlan_tcp.with_dst((BACKEND, 8080)),
    ));
    let big = Frame {
        payload: vec![0xa5; 1400],
        ..tcp.clone()
    };
    cases.push(translated(
        "full-size frame",
        &big,
        &big.with_dst((BACKEND, 8080)),
    ));

    // A UDP checksum of zero is invalid over IPv6 (the receiver drops the datagram);
    // it is left zero, as the kernel's BPF_F_MARK_MANGLED_0 does on the TC path.
    let csum = ETH + IP6 + 6;
    let mut zero_in = udp.build();
    let mut zero_out = udp.with_dst((BACKEND, 53)).build();
    for f in [&mut zero_in, &mut zero_out] {
        f[csum] = 0;
        f[csum + 1] = 0;
    }
    cases.push(Case {
        what: "udp zero checksum stays zero",
        input: zero_in,
        expect: Some(zero_out),
        reason: Reason::Translated,
    });

    cases.push(untouched(
        "no rule for the port",
        tcp.with_dst((HOST, 9999)).build(),
        Reason::PassNoRule,
    ));
    cases.push(untouched(
        "rule for the port, other protocol",
        Frame::udp((CLIENT, 1), (HOST, 9000)).build(),
        Reason::PassNoRule,
    ));
    cases.push(untouched(
        "address-bound rule, other host address",
        tcp.with_dst((HOST2, 9000)).build(),
        Reason::PassNoRule,
    ));
    cases.push(untouched(
        "an IPv4 wildcard rule does not serve IPv6",
        tcp.with_dst((HOST, 7000)).build(),
        Reason::PassNoRule,
    ));
    cases.push(untouched(
        "wildcard rule, not a host address (routed through)",
        udp.with_dst((OTHER, 5353)).build(),
        Reason::PassNotHostAddr,
    ));
    cases.push(untouched(
        "fragment header",
        udp.with_ext_header(44),
        Reason::PassFragment,
    ));
    cases.push(untouched(
        "fragment header, tcp",
        tcp.with_ext_header(44),
        Reason::PassFragment,
    ));
    cases.push(untouched(
        "hop-by-hop options header",
        udp.with_ext_header(0),
        Reason::PassIpv6ExtHeader,
    ));
    cases.push(untouched(
        "destination options header",
        tcp.with_ext_header(60),
        Reason::PassIpv6ExtHeader,
    ));
    let mut vlan_frag = vlan.clone();
    vlan_frag.payload = b"x".to_vec();
    cases.push(untouched(
        "802.1Q tag, routing header",
        vlan_frag.with_ext_header(43),
        Reason::PassIpv6ExtHeader,
    ));

    cases.push(untouched(
        "ICMPv6",
        echo_request(CLIENT, HOST),
        Reason::PassNotTcpUdp,
    ));

    let full = tcp.build();
    cases.push(untouched(
        "Ethernet header only",
        full[..ETH].to_vec(),
        Reason::PassMalformed,
    ));
    cases.push(untouched(
        "IPv6 header cut short",
        full[..ETH + 30].to_vec(),
        Reason::PassMalformed,
    ));
    cases.push(untouched(
        "TCP header cut short",
        full[..ETH + IP6 + 10].to_vec(),
        Reason::PassMalformed,
    ));
    cases.push(untouched(
        "UDP header cut short",
        udp.build()[..ETH + IP6 + 6].to_vec(),
        Reason::PassMalformed,
    ));
    let mut vlan_cut = vlan.build();
    vlan_cut.truncate(ETH + 4 + IP6 + 4);
    cases.push(untouched(
        "802.1Q tag, UDP header cut short",
        vlan_cut,
        Reason::PassMalformed,
    ));
    let mut bad_ver = full.clone();
    bad_ver[ETH] = 0x45;
    cases.push(untouched(
        "IP version 4 in an IPv6 ethertype",
        bad_ver,
        Reason::PassMalformed,
    ));
    cases
}

#[test]
fn xdp_ingress_fixtures_v6() {
    if !privileged() {
        return;
    }
    let dp = fixture_dataplane();
    for case in ingress_cases() {
        check_case(&dp, Prog::XdpIngress, &case);
    }
}

#[test]
fn tc_ingress_fixtures_v6() {
    if !privileged() {
        return;
    }
    let dp = fixture_dataplane();
    // The kernel's skb test run refuses (EINVAL) an IPv6 frame shorter than an IPv6
    // header; such an skb never reaches TC, as the stack drops it first.
    for case in ingress_cases()
        .iter()
        .filter(|c| c.input.len() >= ETH + IP6)
    {
        check_case(&dp, Prog::TcIngress, case);
    }
}

#[test]
fn rule_counters_count_translated_v6_packets() {
    if !privileged() {
        return;
    }
    let dp = fixture_dataplane();
    let frame = Frame::tcp((CLIENT, 40000), (HOST, 9000)).build();
    for _ in 0..3 {
        run_checked(&dp, Prog::XdpIngress, &frame);
    }
    let s = dp.rule_stats(1).expect("stats");
    assert_eq!((s.packets, s.bytes), (3, 3 * frame.len() as u64));
    run_checked(
        &dp,
        Prog::TcIngress,
        &Frame::tcp((CLIENT, 1), (HOST, 4444)).build(),
    );
    assert_eq!(
        dp.rule_stats(1).expect("stats").packets,
        3,
        "a miss counts nothing"
    );
}

/// Replies: the ingress side records the flow, the egress side translates the reply's
/// source back to the address the client used, for each of two host ports of one backend.
#[test]
fn tc_egress_reply_fixtures_v6() {
    if !privileged() {
        return;
    }
    for ingress in [Prog::XdpIngress, Prog::TcIngress] {
        let dp = fixture_dataplane();
        let reply_tcp = Frame::tcp((BACKEND, 8080), (CLIENT, 40000));

        // Before any request: no flow, the reply is untouched.
        check_case(
            &dp,
            Prog::TcEgress,
            &untouched(
                "reply without a flow",
                reply_tcp.build(),
                Reason::PassNoFlow,
            ),
        );

        for req in [
            Frame::tcp((CLIENT, 40000), (HOST, 9000)),
            Frame::tcp((CLIENT, 40002), (HOST2, 9001)),
            Frame::udp((CLIENT, 40001), (HOST2, 5353)),
        ] {
            let (v, _) = run_checked(&dp, ingress, &req.build());
            assert_eq!(v, ingress.pass_verdict());
        }

        let reply_udp = Frame::udp((BACKEND, 53), (CLIENT, 40001));
        let reply_9001 = Frame::tcp((BACKEND, 8080), (CLIENT, 40002));
        let mut reply_vlan = reply_udp.clone();
        reply_vlan.vlan = Some(42);
        let cases = [
            reply_translated(
                "tcp reply of [HOST]:9000",
                &reply_tcp,
                &reply_tcp.with_src((HOST, 9000)),
            ),
            reply_translated(
                "same backend, reply of [HOST2]:9001",
                &reply_9001,
                &reply_9001.with_src((HOST2, 9001)),
            ),
            reply_translated("udp reply", &reply_udp, &reply_udp.with_src((HOST2, 5353))),
            reply_translated(
                "udp reply with an 802.1Q tag",
                &reply_vlan,
                &reply_vlan.with_src((HOST2, 5353)),
            ),
            untouched(
                "other client port",
                reply_tcp.with_dst((CLIENT, 40999)).build(),
                Reason::PassNoFlow,
            ),
            untouched(
                "reply behind a fragment header",
                reply_udp.with_ext_header(44),
                Reason::PassFragment,
            ),
            untouched(
                "truncated reply",
                reply_tcp.build()[..ETH + IP6 + 3].to_vec(),
                Reason::PassMalformed,
            ),
        ];
        for case in &cases {
            check_case(&dp, Prog::TcEgress, case);
        }
        let s = dp.rule_stats(1).expect("stats");
        assert_eq!(s.reply_packets, 1, "{ingress:?}: reply counted on the rule");
        assert_eq!(dp.rule_stats(2).expect("stats").reply_packets, 2);
    }
}

/// The typed v6 methods: a removed rule stops translating, forgotten flows stop reply
/// translation, and a host address taken out of the set stops the wildcard.
#[test]
fn v6_rule_flow_and_host_address_methods() {
    if !privileged() {
        return;
    }
    let mut dp = fixture_dataplane();
    let req = Frame::udp((CLIENT, 40001), (HOST2, 5353));
    let reply = Frame::udp((BACKEND, 53), (CLIENT, 40001));
    run_checked(&dp, Prog::XdpIngress, &req.build());
    // The backend's answer promotes the flow from embryonic to established.
    run_checked(&dp, Prog::TcEgress, &reply.build());
    let flows = |dp: &Dataplane| {
        let map = dp.ebpf().map(CONNTRACK_V6).expect("conntrack map");
        let ct: aya::maps::HashMap<_, portfwd_common::FlowKeyV6, portfwd_common::FlowV6> =
            aya::maps::HashMap::try_from(map).expect("hash map");
        ct.keys().filter_map(Result::ok).collect::<Vec<_>>()
    };
    let tracked = flows(&dp);
    assert_eq!(tracked.len(), 1, "one flow recorded");
    assert_eq!(tracked[0].backend(), (BACKEND, 53));
    assert_eq!(tracked[0].client(), (CLIENT, 40001));

    // Another backend's flows are not touched; this one's are.
    assert_eq!(
        dp.forget_flows_to_v6((BACKEND, 8080), proto::UDP)
            .expect("forget"),
        0
    );
    assert_eq!(
        dp.forget_flows_to_v6((BACKEND, 53), proto::UDP)
            .expect("forget"),
        1
    );
    check_case(
        &dp,
        Prog::TcEgress,
        &untouched("reply after forget", reply.build(), Reason::PassNoFlow),
    );

    // HOST2 leaves the host: the wildcard no longer answers there, still on HOST.
    dp.sync_host_addrs_v6(&[HOST].into_iter().collect())
        .expect("sync");
    check_case(
        &dp,
        Prog::XdpIngress,
        &untouched(
            "wildcard, former host address",
            req.build(),
            Reason::PassNotHostAddr,
        ),
    );
    check_case(
        &dp,
        Prog::XdpIngress,
        &translated(
            "wildcard, remaining host address",
            &req.with_dst((HOST, 5353)),
            &req.with_dst((BACKEND, 53)),
        ),
    );

    dp.remove_rule_v6(&RuleKeyV6::from_parts(HOST, 9000, proto::TCP))
        .expect("remove");
    dp.remove_rule_v6(&RuleKeyV6::from_parts(HOST, 9000, proto::TCP))
        .expect("removing an absent rule is not an error");
    check_case(
        &dp,
        Prog::TcIngress,
        &untouched(
            "removed rule",
            Frame::tcp((CLIENT, 40000), (HOST, 9000)).build(),
            Reason::PassNoRule,
        ),
    );
    let rules = dp.rules_snapshot_v6().expect("snapshot");
    assert_eq!(rules.len(), 2, "{rules:?}");
}

/// Property: for random clients, ports and payloads, XDP and TC ingress produce the same
/// bytes, and those bytes equal the frame rebuilt with the backend as destination; the
/// reply, translated by TC egress, equals the frame rebuilt with the published source.
#[test]
fn ingress_hooks_agree_on_random_v6_frames() {
    if !privileged() {
        return;
    }
    use proptest::{prelude::*, test_runner::TestRunner};
    let dp = fixture_dataplane();
    let mut runner = TestRunner::new(ProptestConfig::with_cases(200));
    runner
        .run(
            &(
                any::<[u8; 16]>(),
                1u16..,
                any::<bool>(),
                any::<bool>(),
                proptest::collection::vec(any::<u8>(), 0..64),
            ),
            |(client, sport, is_udp, vlan, payload)| {
                let client = Ipv6Addr::from(client);
                let (dst, backend) = if is_udp {
                    ((HOST2, 5353), (BACKEND, 53))
                } else {
                    ((HOST, 9000), (BACKEND, 8080))
                };
                let mut f = Frame::new(
                    if is_udp { proto::UDP } else { proto::TCP },
                    (client, sport),
                    dst,
                );
                f.payload = payload;
                f.vlan = vlan.then_some(100);
                let input = f.build();
                let (_, xdp_out) = run_checked(&dp, Prog::XdpIngress, &input);
                let (_, tc_out) = run_checked(&dp, Prog::TcIngress, &input);
                let expect = f.with_dst(backend).build();
                prop_assert_eq!(&xdp_out, &expect);
                prop_assert_eq!(&tc_out, &expect);

                let reply = f.with_src(backend).with_dst((client, sport));
                let (_, reply_out) = run_checked(&dp, Prog::TcEgress, &reply.build());
                prop_assert_eq!(&reply_out, &reply.with_src(dst).build());
                Ok(())
            },
        )
        .expect("property");
}

/// Property: random and mutated frames (see `common`), through XDP ingress, TC ingress
/// and TC egress: the kernel agrees with the model on verdict, bytes, reasons and flows.
#[test]
fn kernel_matches_model_on_random_frames_v6() {
    if !privileged() {
        return;
    }
    let dp = fixture_dataplane();
    let pool = common::Pool {
        addrs: [HOST, HOST2, CLIENT, OTHER, BACKEND]
            .map(Into::into)
            .to_vec(),
        hosts: 2,
        ipv4: false,
    };
    common::kernel_matches_model(&dp, &pool, 300);
}

/// The bridge port the fast path redirects to (BPF_PROG_RUN does not deliver it).
const BRIDGE_PORT: u32 = 77;

/// The IPv6 fast path, compared with the model: a translated packet is forwarded one hop
/// (the FIB's MACs, hop limit minus one, checksums as translated) and redirected to the
/// backend's bridge port at every ingress hook; an expiring hop limit, a packet over the
/// route's MTU, a link-local source or an unknown bridge port falls back to the kernel; random and mutated
/// frames agree with the model with the fast path on.
#[test]
fn fast_path_v6_matches_model() {
    if !require_root("fast_path_v6_matches_model") {
        return;
    }
    let mut dp = fixture_dataplane();
    dp.set_fast_path(true, true).expect("fast path on");
    let (ns, fib) = backend_net("fp6", &[BACKEND.into()]);
    let ports = [(BridgePortKey::new(fib.ifindex, BACKEND_MAC), BRIDGE_PORT)]
        .into_iter()
        .collect();
    dp.sync_bridge_ports(&ports).expect("bridge ports");
    let env = Env {
        ns: Some(&ns),
        route: None,
        fib: Some(&fib),
    };
    let syn = Frame::tcp((CLIENT, 40000), (HOST, 9000));
    let udp = Frame::udp((CLIENT, 40000), (HOST2, 5353));
    let expiring = Frame {
        hops: 1,
        ..syn.clone()
    };
    let too_big = Frame {
        payload: vec![7; 1500],
        ..udp.clone()
    };
    // The kernel never forwards a link-local source off its link: no next hop.
    let link_local = Frame::udp(
        (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1), 40000),
        (HOST2, 5353),
    );
    for prog in [Prog::XdpIngress, Prog::XdpGeneric, Prog::TcIngress] {
        for (f, backend) in [(&syn, (BACKEND, 8080)), (&udp, (BACKEND, 53))] {
            let c = compare_in(&dp, env, prog, &f.build()).expect("runs");
            assert_eq!(
                c.outcome.verdict,
                Verdict::Redirect(BRIDGE_PORT),
                "{prog:?}"
            );
            let forwarded = Frame {
                hops: 63,
                macs: (fib.smac, BACKEND_MAC),
                ..f.with_dst(backend)
            };
            assert_eq!(c.output, forwarded.build(), "{prog:?}: forwarded one hop");
            assert!(c.counted.contains(&(Reason::Redirected, 1)), "{prog:?}");
        }
        for f in [&expiring, &too_big, &link_local] {
            let c = compare_in(&dp, env, prog, &f.build()).expect("runs");
            assert_eq!(c.outcome.verdict, Verdict::Pass, "{prog:?}");
            assert!(
                c.counted.contains(&(Reason::FastPathFallback, 1)),
                "{prog:?}"
            );
        }
    }
    let pool = common::Pool {
        addrs: [HOST, HOST2, CLIENT, OTHER, BACKEND]
            .map(Into::into)
            .to_vec(),
        hosts: 2,
        ipv4: false,
    };
    let progs = [
        Prog::XdpIngress,
        Prog::XdpGeneric,
        Prog::TcIngress,
        Prog::TcEgress,
    ];
    common::kernel_matches_model_in(&dp, env, &pool, &progs, 200);

    common::peer_hand_over(&mut dp, env, &syn, BRIDGE_PORT);
    common::unknown_bridge_port_falls_back(&mut dp, env, &syn, &syn.with_dst((BACKEND, 8080)));
}

fn cache_v6(dp: &mut Dataplane) -> Array<&mut aya::maps::MapData, CachedRuleV6> {
    Array::try_from(dp.ebpf_mut().map_mut(RULE_CACHE_V6).expect("cache")).expect("array")
}

/// The IPv6 rule cache (`RULE_CACHE_V6`) in front of `RULES_V6`: the daemon's copy is
/// there, and the kernel takes it first (a planted entry that disagrees with the rules
/// map wins), at XDP and at TC; removing the rule empties the slot.
#[test]
fn rule_cache_v6_serves_in_front_of_the_rules_map() {
    if !require_root("rule_cache_v6_serves_in_front_of_the_rules_map") {
        return;
    }
    let mut dp = fixture_dataplane();
    let key = RuleKeyV6::from_parts(HOST, 9000, proto::TCP);
    let slot = CachedRuleV6::slot(&key);
    let held = cache_v6(&mut dp).get(&slot, 0).expect("slot");
    assert_eq!(
        held,
        CachedRuleV6::new(key, BackendV6::new(BACKEND, 8080, 1))
    );

    let planted = CachedRuleV6::new(key, BackendV6::new(BACKEND, 8082, 1));
    cache_v6(&mut dp).set(slot, planted, 0).expect("plant");
    let frame = Frame::tcp((CLIENT, 40000), (HOST, 9000));
    for prog in [Prog::XdpIngress, Prog::TcIngress] {
        let (_, out) = run(&dp, prog, &frame.build());
        assert_eq!(
            out,
            frame.with_dst((BACKEND, 8082)).build(),
            "{}",
            prog.name()
        );
    }
    dp.remove_rule_v6(&key).expect("remove");
    let held = cache_v6(&mut dp).get(&slot, 0).expect("slot");
    assert_eq!(held.key(), None, "emptied");
}
