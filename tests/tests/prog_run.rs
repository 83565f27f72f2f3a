//! BPF_PROG_RUN fixture tables: every kernel program, run by the real kernel on crafted
//! frames with seeded maps. Each case gives the input frame, the expected verdict and
//! the expected output bytes (the untouched input, or the frame rebuilt from scratch
//! with the translated addresses and freshly computed checksums). Every run is also
//! compared with the model (`portfwd_common::model`, through `fixture::compare`), and
//! random and mutated frames check kernel and model agree beyond the tables.
//!
//! Needs root (CAP_BPF + CAP_NET_ADMIN). Without it the suite skips, except under
//! `CI=true`, where it fails.

mod common;

use std::net::{Ipv4Addr, Ipv6Addr};

use aya::maps::{Array, MapData};
use portfwd::dataplane::{Dataplane, V4};
use portfwd_common::{
    backend_port_bit, model::Verdict, proto, reply_cache::CachedFlowV4, rule_cache::CachedRuleV4,
    BackendV4, BridgePortKey, FlowKeyV4, FlowV4, Reason, RuleKeyV4, BACKEND_PORTS, CONNTRACK_V4,
    NEXT_HOP_TTL_NS, REPLY_CACHE_V4, RULE_CACHE_V4,
};
use portfwd_tests::fixture::{
    arp_request, backend_net, check_case, compare_in, echo_request, privileged, reply_translated,
    run, run_checked, translated, udp_v6, untouched, Case, Env, Frame, Prog, BACKEND_MAC, ETH, IP4,
};
use portfwd_tests::require_root;

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const HOST2: Ipv4Addr = Ipv4Addr::new(198, 18, 9, 1);
const OTHER: Ipv4Addr = Ipv4Addr::new(198, 19, 7, 7);
const BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);

/// A loaded dataplane with the fixture rules: HOST:9000/tcp and *:5353/udp to BACKEND,
/// and *:9001/tcp to the same backend port (one backend behind two host ports).
fn fixture_dataplane() -> Dataplane {
    let mut dp = Dataplane::load().expect("load programs");
    dp.insert_rule(
        RuleKeyV4::from_parts(HOST, 9000, proto::TCP),
        BackendV4::new(BACKEND, 8080, 1),
    )
    .expect("rule");
    dp.insert_rule(
        RuleKeyV4::from_parts(Ipv4Addr::UNSPECIFIED, 5353, proto::UDP),
        BackendV4::new(BACKEND, 53, 2),
    )
    .expect("rule");
    dp.insert_rule(
        RuleKeyV4::from_parts(Ipv4Addr::UNSPECIFIED, 9001, proto::TCP),
        BackendV4::new(BACKEND, 8080, 3),
    )
    .expect("rule");
    dp.sync_host_addrs(&[HOST, HOST2].into_iter().collect())
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
            "second host port of the same backend",
            &tcp.with_dst((HOST2, 9001)),
            &tcp.with_dst((BACKEND, 8080)),
        ),
    ];
    let mut opts = tcp.clone();
    opts.ip_options = 8;
    cases.push(translated(
        "IPv4 options are skipped",
        &opts,
        &opts.with_dst((BACKEND, 8080)),
    ));
    let mut vlan = udp.clone();
    vlan.vlan = Some(42);
    cases.push(translated(
        "802.1Q tag",
        &vlan,
        &vlan.with_dst((BACKEND, 53)),
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

    // UDP without a checksum: zero stays zero (RFC 768).
    let mut zero_in = udp.build();
    let mut zero_out = udp.with_dst((BACKEND, 53)).build();
    for f in [&mut zero_in, &mut zero_out] {
        f[ETH + IP4 + 6] = 0;
        f[ETH + IP4 + 7] = 0;
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
        "wildcard rule, not a host address (routed through)",
        udp.with_dst((OTHER, 5353)).build(),
        Reason::PassNotHostAddr,
    ));
    let mut mf = udp.clone();
    mf.more_fragments = true;
    cases.push(untouched(
        "first fragment",
        mf.build(),
        Reason::PassFragment,
    ));
    let mut later = udp.clone();
    later.frag_offset = 100;
    cases.push(untouched(
        "later fragment",
        later.build(),
        Reason::PassFragment,
    ));

    cases.push(untouched(
        "ARP",
        arp_request(CLIENT, HOST),
        Reason::PassNotIp,
    ));

    // IPv6 UDP to port 5353: the IPv4 wildcard rule does not cover IPv6 (the IPv6
    // fixtures are in prog_run_v6.rs).
    cases.push(untouched(
        "IPv6 without an IPv6 rule",
        udp_v6(
            (Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2), 1234),
            (Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1), 5353),
            b"v6",
        ),
        Reason::PassNoRule,
    ));

    cases.push(untouched(
        "ICMP",
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
        "IPv4 header cut short",
        full[..ETH + 12].to_vec(),
        Reason::PassMalformed,
    ));
    cases.push(untouched(
        "TCP header cut short",
        full[..ETH + IP4 + 10].to_vec(),
        Reason::PassMalformed,
    ));
    let mut opts_cut = opts.build();
    opts_cut.truncate(ETH + IP4 + 8 + 4);
    cases.push(untouched(
        "options push TCP past the end",
        opts_cut,
        Reason::PassMalformed,
    ));
    let mut bad_ihl = full.clone();
    bad_ihl[ETH] = 0x44; // IHL 4 < 5
    cases.push(untouched("IHL below 5", bad_ihl, Reason::PassMalformed));
    let mut bad_ver = full.clone();
    bad_ver[ETH] = 0x65;
    cases.push(untouched(
        "IP version 6 in an IPv4 ethertype",
        bad_ver,
        Reason::PassMalformed,
    ));
    cases
}

#[test]
fn xdp_ingress_fixtures() {
    if !privileged() {
        return;
    }
    let dp = fixture_dataplane();
    for prog in [Prog::XdpIngress, Prog::XdpVirtual, Prog::XdpGeneric] {
        for case in ingress_cases() {
            check_case(&dp, prog, &case);
        }
    }
}

/// Frames a local stack sends with checksum offload on (over a veth) carry a partial
/// checksum: the pseudo-header sum, which the kernel or NIC completes later over the
/// segment, ports included. Native XDP on a virtual device and generic XDP must leave
/// the translated frame's pseudo-header sum there (the address changed, not the port);
/// native XDP on a NIC, which never sees one, updates it as a complete checksum.
#[test]
fn partial_checksums_at_xdp() {
    if !privileged() {
        return;
    }
    let dp = fixture_dataplane();
    let tcp = Frame::tcp((CLIENT, 40000), (HOST, 9000));
    let data = Frame {
        ack: Some(1),
        payload: vec![0x5a; 1400],
        ..tcp.clone()
    };
    let udp = Frame::udp((CLIENT, 40001), (HOST2, 5353));
    for (what, f, backend) in [
        ("tcp SYN", &tcp, (BACKEND, 8080)),
        ("tcp data", &data, (BACKEND, 8080)),
        ("udp", &udp, (BACKEND, 53)),
    ] {
        let input = f.build_offloaded();
        let want = f.with_dst(backend).build_offloaded();
        for prog in [Prog::XdpVirtual, Prog::XdpGeneric] {
            let case = Case {
                what,
                input: input.clone(),
                expect: Some(want.clone()),
                reason: Reason::Translated,
            };
            check_case(&dp, prog, &case);
        }
        let (_, out) = run_checked(&dp, Prog::XdpIngress, &input);
        assert_ne!(
            out, want,
            "{what}: native XDP on a NIC takes it as complete"
        );
        // Complete checksums are unchanged at every XDP program.
        for prog in [Prog::XdpIngress, Prog::XdpVirtual, Prog::XdpGeneric] {
            let (_, out) = run_checked(&dp, prog, &f.build());
            assert_eq!(
                out,
                f.with_dst(backend).build(),
                "{prog:?}: {what}: complete"
            );
        }
    }
}

#[test]
fn tc_ingress_fixtures() {
    if !privileged() {
        return;
    }
    let dp = fixture_dataplane();
    // The kernel's skb test run refuses (EINVAL) an IPv4 frame shorter than an IPv4
    // header; such an skb never reaches TC, as the stack drops it first.
    for case in ingress_cases()
        .iter()
        .filter(|c| c.input.len() >= ETH + IP4)
    {
        check_case(&dp, Prog::TcIngress, case);
    }
}

/// A rule that keeps the port (`-p 8080:8080`): TC skips the port's checksum update
/// (a change of zero); the packets come out as if rebuilt, for TCP and UDP, and replies.
#[test]
fn same_port_rules_translate_both_ways() {
    if !require_root("same_port_rules_translate_both_ways") {
        return;
    }
    let mut dp = fixture_dataplane();
    for proto in [proto::TCP, proto::UDP] {
        dp.insert_rule(
            RuleKeyV4::from_parts(HOST, 7070, proto),
            BackendV4::new(BACKEND, 7070, 6),
        )
        .expect("rule");
        let frame = Frame::new(proto, (CLIENT, 40000), (HOST, 7070));
        let out = frame.with_dst((BACKEND, 7070));
        for prog in [Prog::XdpIngress, Prog::TcIngress] {
            check_case(&dp, prog, &translated("same port", &frame, &out));
        }
        let reply = Frame::new(proto, (BACKEND, 7070), (CLIENT, 40000));
        check_case(
            &dp,
            Prog::TcEgress,
            &reply_translated("same port, reply", &reply, &reply.with_src((HOST, 7070))),
        );
    }
}

#[test]
fn rule_counters_count_translated_packets() {
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
fn tc_egress_reply_fixtures() {
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

        let (v, _) = run_checked(
            &dp,
            ingress,
            &Frame::tcp((CLIENT, 40000), (HOST, 9000)).build(),
        );
        assert_eq!(v, ingress.pass_verdict());
        let (v, _) = run_checked(
            &dp,
            ingress,
            &Frame::tcp((CLIENT, 40002), (HOST2, 9001)).build(),
        );
        assert_eq!(v, ingress.pass_verdict());
        let (v, _) = run_checked(
            &dp,
            ingress,
            &Frame::udp((CLIENT, 40001), (HOST2, 5353)).build(),
        );
        assert_eq!(v, ingress.pass_verdict());

        let reply_udp = Frame::udp((BACKEND, 53), (CLIENT, 40001));
        let reply_9001 = Frame::tcp((BACKEND, 8080), (CLIENT, 40002));
        let cases = [
            reply_translated(
                "tcp reply of HOST:9000",
                &reply_tcp,
                &reply_tcp.with_src((HOST, 9000)),
            ),
            reply_translated(
                "same backend, reply of HOST2:9001",
                &reply_9001,
                &reply_9001.with_src((HOST2, 9001)),
            ),
            reply_translated("udp reply", &reply_udp, &reply_udp.with_src((HOST2, 5353))),
            untouched(
                "other client port",
                reply_tcp.with_dst((CLIENT, 40999)).build(),
                Reason::PassNoFlow,
            ),
            untouched("ARP", arp_request(CLIENT, HOST), Reason::PassNotIp),
            untouched(
                "truncated reply",
                reply_tcp.build()[..ETH + IP4 + 3].to_vec(),
                Reason::PassMalformed,
            ),
        ];
        for case in &cases {
            check_case(&dp, Prog::TcEgress, case);
        }
        let s = dp.rule_stats(1).expect("stats");
        assert_eq!(s.reply_packets, 1, "{ingress:?}: reply counted on the rule");
    }
}

/// Property: for random clients, ports and payloads, XDP and TC ingress produce the same
/// bytes, and those bytes equal the frame rebuilt with the backend as destination.
#[test]
fn ingress_hooks_agree_on_random_frames() {
    if !privileged() {
        return;
    }
    use proptest::{prelude::*, test_runner::TestRunner};
    let dp = fixture_dataplane();
    let mut runner = TestRunner::new(ProptestConfig::with_cases(200));
    runner
        .run(
            &(
                any::<[u8; 4]>(),
                1u16..,
                any::<bool>(),
                proptest::collection::vec(any::<u8>(), 0..64),
            ),
            |(client, sport, is_udp, payload)| {
                let client = Ipv4Addr::from(client);
                let (dst, backend) = if is_udp {
                    ((HOST, 5353), (BACKEND, 53))
                } else {
                    ((HOST, 9000), (BACKEND, 8080))
                };
                let mut f = Frame::new(
                    if is_udp { proto::UDP } else { proto::TCP },
                    (client, sport),
                    dst,
                );
                f.payload = payload;
                let input = f.build();
                let (_, xdp_out) = run_checked(&dp, Prog::XdpIngress, &input);
                let (_, tc_out) = run_checked(&dp, Prog::TcIngress, &input);
                let expect = f.with_dst(backend).build();
                prop_assert_eq!(&xdp_out, &expect);
                prop_assert_eq!(&tc_out, &expect);
                Ok(())
            },
        )
        .expect("property");
}

/// The published-ports filter follows the rules: an address-bound and a wildcard rule on
/// one port, removed one at a time, leave the other one working, then nothing.
#[test]
fn published_ports_filter_follows_rule_removal() {
    if !privileged() {
        return;
    }
    let mut dp = fixture_dataplane();
    let frame = Frame::tcp((CLIENT, 40000), (HOST, 9000));
    let wildcard = RuleKeyV4::from_parts(Ipv4Addr::UNSPECIFIED, 9000, proto::TCP);
    dp.insert_rule(wildcard, BackendV4::new(BACKEND, 8081, 4))
        .expect("wildcard rule");
    let exact = RuleKeyV4::from_parts(HOST, 9000, proto::TCP);
    let (_, out) = run_checked(&dp, Prog::XdpIngress, &frame.build());
    assert_eq!(
        out,
        frame.with_dst((BACKEND, 8080)).build(),
        "exact rule first"
    );
    dp.remove_rule(&exact).expect("remove exact");
    let (_, out) = run_checked(&dp, Prog::XdpIngress, &frame.build());
    assert_eq!(
        out,
        frame.with_dst((BACKEND, 8081)).build(),
        "then the wildcard"
    );
    dp.remove_rule(&wildcard).expect("remove wildcard");
    check_case(
        &dp,
        Prog::XdpIngress,
        &untouched("no rule left", frame.build(), Reason::PassNoRule),
    );
}

/// On this kernel the TC programs read the skb's checksum state (the kfunc call patched
/// into every TC rewrite: `portfwd_common::kctx`), so the TC cases above run the in-place
/// checksum update; the kernel's helpers are left for `CHECKSUM_COMPLETE`.
#[test]
fn tc_programs_read_the_skb_checksum_state() {
    if !privileged() {
        return;
    }
    let object = portfwd::dataplane::prepared_object();
    assert!(
        object.ip_summed_bit != 0,
        "ip_summed not found in the kernel's BTF"
    );
    // TC ingress and egress each rewrite both families.
    assert!(
        object.kfunc_calls >= 4,
        "{} kfunc calls",
        object.kfunc_calls
    );
}

/// `BACKEND_PORTS[port]`: the protocols some rule sends to `port` over.
fn backend_port_bits(dp: &Dataplane, port: u16) -> u8 {
    let map: Array<&MapData, u8> =
        Array::try_from(dp.ebpf().map(BACKEND_PORTS).expect("map")).expect("array");
    map.get(&u32::from(port), 0).expect("backend ports")
}

/// The reply filter: a flow's replies are looked up while some rule sends to its
/// backend's port (reference-counted over rules, expansions and replaced backends), and
/// pass untouched, without a lookup, once none does, though the flow is still tracked.
#[test]
fn backend_ports_filter_follows_the_rules() {
    if !privileged() {
        return;
    }
    let mut dp = fixture_dataplane();
    let (tcp, udp) = (backend_port_bit(proto::TCP), backend_port_bit(proto::UDP));
    assert_eq!(backend_port_bits(&dp, 8080), tcp, "two rules send to 8080");
    assert_eq!(backend_port_bits(&dp, 53), udp);
    assert_eq!(
        backend_port_bits(&dp, 9000),
        0,
        "a published port is no backend's"
    );
    run_checked(
        &dp,
        Prog::TcIngress,
        &Frame::tcp((CLIENT, 40000), (HOST, 9000)).build(),
    );
    let reply = Frame::tcp((BACKEND, 8080), (CLIENT, 40000));
    let translated_reply = reply_translated(
        "reply of a tracked flow",
        &reply,
        &reply.with_src((HOST, 9000)),
    );
    check_case(&dp, Prog::TcEgress, &translated_reply);

    // HOST:9000 now sends elsewhere; *:9001 (and its expansions) still to 8080.
    let exact = RuleKeyV4::from_parts(HOST, 9000, proto::TCP);
    dp.insert_rule(exact, BackendV4::new(BACKEND, 8082, 1))
        .expect("replace");
    assert_eq!(backend_port_bits(&dp, 8082), tcp);
    assert_eq!(backend_port_bits(&dp, 8080), tcp, "still *:9001's backend");
    check_case(&dp, Prog::TcEgress, &translated_reply);

    // No rule sends to 8080 any more: the flow's replies are no longer looked up.
    let wildcard = RuleKeyV4::from_parts(Ipv4Addr::UNSPECIFIED, 9001, proto::TCP);
    dp.remove_rule(&wildcard).expect("remove wildcard");
    assert_eq!(backend_port_bits(&dp, 8080), 0);
    check_case(
        &dp,
        Prog::TcEgress,
        &untouched("no rule sends to 8080", reply.build(), Reason::PassNoFlow),
    );
    dp.insert_rule(exact, BackendV4::new(BACKEND, 8080, 1))
        .expect("back to 8080");
    assert_eq!(
        backend_port_bits(&dp, 8082),
        0,
        "replaced backend's bit cleared"
    );
    check_case(&dp, Prog::TcEgress, &translated_reply);
    dp.remove_rule(&exact).expect("remove");
    assert_eq!(backend_port_bits(&dp, 8080), 0);
    assert_eq!(backend_port_bits(&dp, 53), udp, "the UDP rule stays");
}

/// The reply cache (`portfwd_common::reply_cache`) serves a flow's replies, and never
/// past a change: a new flow on the key of one conntrack lost (the ingress programs
/// mark the slot stale), and the daemon forgetting the flow.
#[test]
fn reply_cache_follows_flow_changes() {
    if !privileged() {
        return;
    }
    let mut dp = fixture_dataplane();
    let reply = Frame {
        ack: Some(1),
        ..Frame::tcp((BACKEND, 8080), (CLIENT, 40000))
    };
    let key = FlowKeyV4::new(
        BACKEND.octets(),
        8080u16.to_be_bytes(),
        CLIENT.octets(),
        40000u16.to_be_bytes(),
        proto::TCP,
    );
    fn conntrack(dp: &mut Dataplane) -> aya::maps::HashMap<&mut MapData, FlowKeyV4, FlowV4> {
        aya::maps::HashMap::try_from(dp.ebpf_mut().map_mut(CONNTRACK_V4).expect("conntrack"))
            .expect("conntrack map")
    }
    let cached_key = |dp: &Dataplane| -> FlowKeyV4 {
        let cache: Array<&MapData, CachedFlowV4> =
            Array::try_from(dp.ebpf().map(REPLY_CACHE_V4).expect("reply cache"))
                .expect("reply cache map");
        *cache.get(&CachedFlowV4::slot(&key), 0).expect("slot").key()
    };

    run_checked(
        &dp,
        Prog::TcIngress,
        &Frame::tcp((CLIENT, 40000), (HOST, 9000)).build(),
    );
    let via_9000 = reply_translated("reply of HOST:9000", &reply, &reply.with_src((HOST, 9000)));
    check_case(&dp, Prog::TcEgress, &via_9000); // promotes the flow
    check_case(&dp, Prog::TcEgress, &via_9000); // fills the slot from conntrack
    assert_eq!(cached_key(&dp), key, "the established flow is cached");

    // Conntrack loses the flow (as an LRU eviction does: nothing marks the slot): the
    // cache still translates its replies as conntrack did.
    conntrack(&mut dp).remove(&key).expect("evict");
    let (_, out) = run(&dp, Prog::TcEgress, &reply.build());
    assert_eq!(
        out,
        reply.with_src((HOST, 9000)).build(),
        "served from the cache"
    );

    // The client reuses its port for HOST:9001, to the same backend: the flow under
    // the same key now answers as HOST:9001, from its first reply on.
    run_checked(
        &dp,
        Prog::TcIngress,
        &Frame::tcp((CLIENT, 40000), (HOST, 9001)).build(),
    );
    let via_9001 = reply_translated("reply of HOST:9001", &reply, &reply.with_src((HOST, 9001)));
    check_case(&dp, Prog::TcEgress, &via_9001);
    check_case(&dp, Prog::TcEgress, &via_9001);
    check_case(&dp, Prog::TcEgress, &via_9001);

    // The daemon forgets the backend's flows: no reply is translated from the cache.
    let forgotten = dp
        .forget_flows_of::<V4>(&[(BACKEND, 8080, proto::TCP)].into_iter().collect())
        .expect("forget");
    assert_eq!(forgotten, 1);
    check_case(
        &dp,
        Prog::TcEgress,
        &untouched(
            "reply of a forgotten flow",
            reply.build(),
            Reason::PassNoFlow,
        ),
    );
}

/// Property: random and mutated frames (see `common`), through XDP ingress, TC ingress
/// and TC egress: the kernel agrees with the model on verdict, bytes, reasons and flows.
#[test]
fn kernel_matches_model_on_random_frames() {
    if !privileged() {
        return;
    }
    let dp = fixture_dataplane();
    let pool = common::Pool {
        addrs: [HOST, HOST2, CLIENT, OTHER, BACKEND]
            .map(Into::into)
            .to_vec(),
        hosts: 2,
        ipv4: true,
    };
    common::kernel_matches_model(&dp, &pool, 300);
}

/// The bridge port the fast path redirects to (BPF_PROG_RUN does not deliver it).
const BRIDGE_PORT: u32 = 77;

/// The fast path, compared with the model: a translated packet is forwarded one hop (the
/// FIB's MACs, TTL minus one) and redirected to the backend's bridge port at every
/// ingress hook; an expiring TTL or an unknown bridge port falls back to the kernel;
/// and random and mutated frames agree with the model with the fast path on.
#[test]
fn fast_path_matches_model() {
    if !require_root("fast_path_matches_model") {
        return;
    }
    let mut dp = fixture_dataplane();
    dp.set_fast_path(true, true).expect("fast path on");
    let (ns, fib) = backend_net("fp", &[BACKEND.into()]);
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
    let forwarded = Frame {
        hops: 63,
        macs: (fib.smac, BACKEND_MAC),
        ..syn.with_dst((BACKEND, 8080))
    };
    let expiring = Frame {
        hops: 1,
        ..syn.clone()
    };
    for prog in [
        Prog::XdpIngress,
        Prog::XdpVirtual,
        Prog::XdpGeneric,
        Prog::TcIngress,
    ] {
        let c = compare_in(&dp, env, prog, &syn.build()).expect("runs");
        assert_eq!(
            c.outcome.verdict,
            Verdict::Redirect(BRIDGE_PORT),
            "{prog:?}"
        );
        assert_eq!(c.output, forwarded.build(), "{prog:?}: forwarded one hop");
        assert!(c.counted.contains(&(Reason::Redirected, 1)), "{prog:?}");
        let c = compare_in(&dp, env, prog, &expiring.build()).expect("runs");
        assert_eq!(c.outcome.verdict, Verdict::Pass, "{prog:?}: TTL 1");
        assert!(
            c.counted.contains(&(Reason::FastPathFallback, 1)),
            "{prog:?}"
        );
    }
    // A partial checksum goes on to the stack, whose skb keeps CHECKSUM_PARTIAL: native
    // XDP's redirect makes an xdp_frame, which loses it (the backend would reject the
    // partial sum), and generic XDP's skips the completion a device may need.
    let partial = syn.build_offloaded();
    for prog in [Prog::XdpVirtual, Prog::XdpGeneric] {
        let c = compare_in(&dp, env, prog, &partial).expect("runs");
        assert_eq!(c.outcome.verdict, Verdict::Pass, "{prog:?}: partial");
        assert_eq!(
            c.output,
            syn.with_dst((BACKEND, 8080)).build_offloaded(),
            "{prog:?}: translated, not forwarded"
        );
        assert!(
            c.counted.contains(&(Reason::FastPathFallback, 1)),
            "{prog:?}"
        );
    }

    let pool = common::Pool {
        addrs: [HOST, HOST2, CLIENT, OTHER, BACKEND]
            .map(Into::into)
            .to_vec(),
        hosts: 2,
        ipv4: true,
    };
    let progs = [
        Prog::XdpIngress,
        Prog::XdpVirtual,
        Prog::XdpGeneric,
        Prog::TcIngress,
        Prog::TcEgress,
    ];
    common::kernel_matches_model_in(&dp, env, &pool, &progs, 200);

    common::peer_hand_over(&mut dp, env, &syn, BRIDGE_PORT);
    common::unknown_bridge_port_falls_back(&mut dp, env, &syn, &syn.with_dst((BACKEND, 8080)));
}

/// The fast path's next-hop cache (the FIB's answer per backend, `NEXT_HOPS_V4`): a
/// neighbour change that leaves the bridge ports alone reaches the fast path once the
/// entry is `NEXT_HOP_TTL_NS` old (bridge port changes clear it at once: see
/// `fast_path_matches_model`).
#[test]
fn fast_path_next_hop_cache_expires() {
    if !require_root("fast_path_next_hop_cache_expires") {
        return;
    }
    const NEW_MAC: [u8; 6] = [2, 0, 0, 0, 1, 3];
    let mut dp = fixture_dataplane();
    dp.set_fast_path(true, true).expect("fast path on");
    let (ns, fib) = backend_net("fc", &[BACKEND.into()]);
    let ports = [BACKEND_MAC, NEW_MAC]
        .map(|mac| (BridgePortKey::new(fib.ifindex, mac), BRIDGE_PORT))
        .into_iter()
        .collect();
    dp.sync_bridge_ports(&ports).expect("bridge ports");
    let syn = Frame::tcp((CLIENT, 40000), (HOST, 9000)).build();
    let dmac = |dp: &Dataplane| {
        ns.run(|| {
            let (verdict, out) = run(dp, Prog::XdpIngress, &syn);
            assert_eq!(verdict, 4, "XDP_REDIRECT");
            <[u8; 6]>::try_from(&out[..6]).expect("a MAC")
        })
    };
    assert_eq!(dmac(&dp), BACKEND_MAC);
    let mac = NEW_MAC.map(|b| format!("{b:02x}")).join(":");
    ns.ip(&format!(
        "neigh replace {BACKEND} lladdr {mac} dev d0 nud permanent"
    ));
    std::thread::sleep(std::time::Duration::from_nanos(3 * NEXT_HOP_TTL_NS));
    assert_eq!(
        dmac(&dp),
        NEW_MAC,
        "the new neighbour after the cache's time"
    );
}

/// The rule cache (`RULE_CACHE_V4`).
fn rule_cache(dp: &mut Dataplane) -> Array<&mut MapData, CachedRuleV4> {
    Array::try_from(dp.ebpf_mut().map_mut(RULE_CACHE_V4).expect("rule cache")).expect("array")
}

/// The daemon's rule cache entry for `key`, if its slot holds one.
fn cached(dp: &mut Dataplane, key: &RuleKeyV4) -> Option<BackendV4> {
    let entry = rule_cache(dp)
        .get(&CachedRuleV4::slot(key), 0)
        .expect("slot");
    (entry.key() == Some(*key)).then(|| entry.backend().expect("valid"))
}

/// Writes `entry` into `key`'s slot of the rule cache, as a packet would find it.
fn write_cache(dp: &mut Dataplane, key: &RuleKeyV4, entry: CachedRuleV4) {
    rule_cache(dp)
        .set(CachedRuleV4::slot(key), entry, 0)
        .expect("write slot");
}

/// The rule cache (`portfwd_common::rule_cache`) in front of the rules map: the daemon
/// copies each entry into its slot and clears it before the rules map loses the key;
/// the kernel takes a valid entry for the packet's key (shown by planting one that
/// disagrees with the rules map), and falls back to the rules map for a torn entry or
/// a slot another key holds.
#[test]
fn rule_cache_serves_in_front_of_the_rules_map() {
    if !require_root("rule_cache_serves_in_front_of_the_rules_map") {
        return;
    }
    let mut dp = fixture_dataplane();
    let key = RuleKeyV4::from_parts(HOST, 9000, proto::TCP);
    let backend = BackendV4::new(BACKEND, 8080, 1);
    assert_eq!(cached(&mut dp, &key), Some(backend), "the daemon's copy");
    // The wildcard's expansions are cached too (a packet's key is the host address).
    let expansion = RuleKeyV4::from_parts(HOST2, 9001, proto::TCP);
    assert!(cached(&mut dp, &expansion).is_some(), "an expansion");

    let frame = Frame::tcp((CLIENT, 40000), (HOST, 9000));
    let planted = BackendV4::new(BACKEND, 8082, 1);
    write_cache(&mut dp, &key, CachedRuleV4::new(key, planted));
    let (_, out) = run(&dp, Prog::XdpIngress, &frame.build());
    assert_eq!(
        out,
        frame.with_dst((BACKEND, 8082)).build(),
        "XDP reads the cache"
    );
    let (_, out) = run(&dp, Prog::TcIngress, &frame.build());
    assert_eq!(
        out,
        frame.with_dst((BACKEND, 8082)).build(),
        "TC reads the cache"
    );

    // A torn entry (a backend byte changed after the check was computed) is refused.
    let mut torn: [u8; 24] = bytemuck_bytes(CachedRuleV4::new(key, planted));
    torn[13] ^= 1;
    write_cache(&mut dp, &key, from_bytes(torn));
    let (_, out) = run_checked(&dp, Prog::XdpIngress, &frame.build());
    assert_eq!(
        out,
        frame.with_dst((BACKEND, 8080)).build(),
        "torn: the rules map"
    );

    // Another key's entry in the slot: the rules map serves the packet's key.
    let (other, _) = colliding(&key);
    write_cache(&mut dp, &key, CachedRuleV4::new(other, planted));
    let (_, out) = run_checked(&dp, Prog::XdpIngress, &frame.build());
    assert_eq!(out, frame.with_dst((BACKEND, 8080)).build(), "collision");

    // The daemon leaves a slot another key holds alone, and serves that key anyway.
    write_cache(&mut dp, &key, CachedRuleV4::new(key, backend));
    let (other, other_port) = colliding(&key);
    dp.insert_rule(other, BackendV4::new(BACKEND, 8083, 5))
        .expect("colliding rule");
    assert_eq!(
        cached(&mut dp, &key),
        Some(backend),
        "first come keeps the slot"
    );
    let frame2 = Frame::tcp((CLIENT, 40000), (other.addr(), other_port));
    let (_, out) = run_checked(&dp, Prog::XdpIngress, &frame2.build());
    assert_eq!(
        out,
        frame2.with_dst((BACKEND, 8083)).build(),
        "served uncached"
    );

    // Removal empties the slot first; the next rule for it takes it.
    dp.remove_rule(&key).expect("remove");
    assert_eq!(cached(&mut dp, &key), None, "removed");
    check_case(
        &dp,
        Prog::XdpIngress,
        &untouched("no rule left", frame.build(), Reason::PassNoRule),
    );
    dp.insert_rule(key, BackendV4::new(BACKEND, 8084, 1))
        .expect("rule again");
    assert_eq!(
        cached(&mut dp, &key),
        Some(BackendV4::new(BACKEND, 8084, 1)),
        "replaced"
    );
}

/// A TCP rule key on another address whose rule cache slot is `key`'s, and its port.
fn colliding(key: &RuleKeyV4) -> (RuleKeyV4, u16) {
    let slot = CachedRuleV4::slot(key);
    for a in 0..=u16::MAX {
        let addr = Ipv4Addr::new(203, 0, (a >> 8) as u8, a as u8);
        for port in 1000..1016 {
            let k = RuleKeyV4::from_parts(addr, port, proto::TCP);
            if CachedRuleV4::slot(&k) == slot {
                return (k, port);
            }
        }
    }
    panic!("no key shares slot {slot}");
}

fn bytemuck_bytes(e: CachedRuleV4) -> [u8; 24] {
    // SAFETY: 24 bytes without padding (asserted in portfwd-common).
    unsafe { std::mem::transmute(e) }
}

fn from_bytes(b: [u8; 24]) -> CachedRuleV4 {
    // SAFETY: any 24 bytes are a slot (its check decides whether it is valid).
    unsafe { std::mem::transmute(b) }
}
