//! Wildcard rules expanded into one exact entry per host address (`portfwd/src/expand.rs`):
//! the kernel's rules maps hold them as the rules and the host's addresses call for,
//! across writes, address changes and a new `Dataplane` over pinned maps, and real
//! traffic to a host address added while the daemon runs is served.
//!
//! Needs root (BPF, namespaces, a bpffs of its own). Without it the tests skip, except
//! under `CI=true`, where they fail.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap, MapData};
use portfwd::{
    dataplane::{Dataplane, DEFAULT_MAX_FLOWS, V4},
    pin::PinDir,
};
use portfwd_common::{
    backend_port_bit, port_bits, proto, rule_cache::CachedRuleV4, wildcard_bits, BackendV4, Reason,
    RuleKeyV4, BACKEND_EXPANDED, BACKEND_PORTS, PUBLISHED_PORTS, RULES_V4, RULE_CACHE_V4,
};
use portfwd_tests::{
    client,
    fixture::{check_case, privileged, translated, untouched, Frame, Prog},
    pins::PinFs,
    topology::{backend, body, Topology, HOST_IFACE},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const H1: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const H2: Ipv4Addr = Ipv4Addr::new(198, 18, 9, 1);
const H3: Ipv4Addr = Ipv4Addr::new(198, 18, 9, 3);
const BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);

fn key(a: Ipv4Addr, port: u16) -> RuleKeyV4 {
    RuleKeyV4::from_parts(a, port, proto::TCP)
}

/// Every entry of the IPv4 rules map, sorted.
fn entries(dp: &mut Dataplane) -> Vec<(RuleKeyV4, BackendV4)> {
    let mut v = dp.rule_entries_of::<V4>().expect("rules");
    v.sort_by_key(|(k, _)| (k.addr(), k.port()));
    v
}

fn hosts(a: &[Ipv4Addr]) -> BTreeSet<Ipv4Addr> {
    a.iter().copied().collect()
}

/// Rule writes and address changes keep the expansions exact: one per host address,
/// an address-bound rule in an expansion's place while it exists, none left over; the
/// rules snapshot never shows them; packets to each host address are served.
#[test]
fn expansions_follow_rules_and_addresses() {
    if !privileged() {
        return;
    }
    let mut dp = Dataplane::load().expect("load programs");
    dp.sync_host_addrs(&hosts(&[H1, H2])).expect("hosts");
    let w = BackendV4::new(BACKEND, 8080, 1);
    dp.insert_rule(key(Ipv4Addr::UNSPECIFIED, 9000), w)
        .expect("wildcard");
    let ex = w.with_flags(BACKEND_EXPANDED);
    assert_eq!(
        entries(&mut dp),
        vec![
            (key(Ipv4Addr::UNSPECIFIED, 9000), w),
            (key(H1, 9000), ex),
            (key(H2, 9000), ex),
        ]
    );
    assert_eq!(
        dp.rules_snapshot_of::<V4>().expect("snapshot"),
        vec![(key(Ipv4Addr::UNSPECIFIED, 9000), w)],
        "expansions are internal"
    );
    let frame = Frame::tcp((CLIENT, 40000), (H2, 9000));
    for prog in [Prog::XdpIngress, Prog::TcIngress] {
        check_case(
            &dp,
            prog,
            &translated(
                "wildcard, through its expansion",
                &frame,
                &frame.with_dst((BACKEND, 8080)),
            ),
        );
    }

    // An address-bound rule takes the expansion's place, and gives it back.
    let exact = BackendV4::new(BACKEND, 8081, 2);
    dp.insert_rule(key(H1, 9000), exact).expect("exact");
    assert!(entries(&mut dp).contains(&(key(H1, 9000), exact)));
    dp.remove_rule(&key(H1, 9000)).expect("remove exact");
    assert!(entries(&mut dp).contains(&(key(H1, 9000), ex)));

    // Addresses come and go.
    dp.sync_host_addrs(&hosts(&[H1, H3])).expect("hosts");
    assert_eq!(
        entries(&mut dp),
        vec![
            (key(Ipv4Addr::UNSPECIFIED, 9000), w),
            (key(H1, 9000), ex),
            (key(H3, 9000), ex),
        ]
    );
    check_case(
        &dp,
        Prog::XdpIngress,
        &untouched(
            "a former host address",
            frame.build(),
            Reason::PassNotHostAddr,
        ),
    );
    // The wildcard goes: its expansions with it, and the port is unpublished.
    dp.remove_rule(&key(Ipv4Addr::UNSPECIFIED, 9000))
        .expect("remove wildcard");
    assert_eq!(entries(&mut dp), vec![]);
    check_case(
        &dp,
        Prog::XdpIngress,
        &untouched(
            "no rule left",
            Frame::tcp((CLIENT, 40000), (H1, 9000)).build(),
            Reason::PassNoRule,
        ),
    );
}

/// A new `Dataplane` over pinned maps recognises the expansions by their flag: the
/// rules snapshot shows the rules alone, the published-ports filter is rewritten from
/// the rules (an earlier binary's bits), and the next host-address sync repairs what a
/// daemon that died between two writes left (a missing expansion, an orphan).
#[test]
fn expansions_are_recognised_after_a_restart() {
    if !privileged() {
        return;
    }
    let pins = PinFs::new();
    let w = BackendV4::new(BACKEND, 8080, 1);
    {
        let mut dp = Dataplane::load_pinned(
            PinDir::open(&pins.pin_dir()).expect("pin dir"),
            DEFAULT_MAX_FLOWS,
        )
        .expect("load");
        dp.sync_host_addrs(&hosts(&[H1, H2])).expect("hosts");
        dp.insert_rule(key(Ipv4Addr::UNSPECIFIED, 9000), w)
            .expect("wildcard");
        // The port's bits as an earlier binary left them (its wildcard bit alone): the
        // next load rewrites them from the rules.
        let map = dp.ebpf_mut().map_mut(PUBLISHED_PORTS).expect("ports map");
        let mut ports: Array<&mut MapData, u8> = Array::try_from(map).expect("ports map");
        ports
            .set(9000, port_bits(proto::TCP).1, 0)
            .expect("old bits");
        // And the reply filter as a daemon that died between two writes left it: the
        // backend's bit lost, another port's stale.
        let map = dp.ebpf_mut().map_mut(BACKEND_PORTS).expect("backends map");
        let mut backends: Array<&mut MapData, u8> = Array::try_from(map).expect("backends");
        backends.set(8080, 0, 0).expect("lost bit");
        backends
            .set(7777, backend_port_bit(proto::TCP), 0)
            .expect("stale bit");
        dp.keep_pins();
    }
    let mut dp = Dataplane::load_pinned(
        PinDir::open(&pins.pin_dir()).expect("pin dir"),
        DEFAULT_MAX_FLOWS,
    )
    .expect("reload");
    assert_eq!(
        dp.rules_snapshot_of::<V4>().expect("snapshot"),
        vec![(key(Ipv4Addr::UNSPECIFIED, 9000), w)]
    );
    let map = dp.ebpf().map(PUBLISHED_PORTS).expect("ports map");
    let ports: Array<&MapData, u8> = Array::try_from(map).expect("ports map");
    assert_eq!(
        ports.get(&9000, 0).expect("bits"),
        port_bits(proto::TCP).0 | wildcard_bits(proto::TCP, false),
        "the filter rewritten from the pinned rules"
    );
    let map = dp.ebpf().map(BACKEND_PORTS).expect("backends map");
    let backends: Array<&MapData, u8> = Array::try_from(map).expect("backends");
    assert_eq!(
        (
            backends.get(&8080, 0).expect("bits"),
            backends.get(&7777, 0).expect("bits")
        ),
        (backend_port_bit(proto::TCP), 0),
        "the reply filter rewritten from the pinned rules"
    );
    // The new load's rule cache (not pinned) is filled from the adopted rules.
    let map = dp.ebpf().map(RULE_CACHE_V4).expect("rule cache");
    let cache: Array<&MapData, CachedRuleV4> = Array::try_from(map).expect("rule cache");
    for k in [key(H1, 9000), key(H2, 9000)] {
        let held = cache.get(&CachedRuleV4::slot(&k), 0).expect("slot");
        assert_eq!(
            held,
            CachedRuleV4::new(k, w.with_flags(BACKEND_EXPANDED)),
            "{k:?}"
        );
    }
    // Forwarding goes on through the pinned expansions.
    let frame = Frame::tcp((CLIENT, 40000), (H2, 9000));
    check_case(
        &dp,
        Prog::XdpIngress,
        &translated("adopted", &frame, &frame.with_dst((BACKEND, 8080))),
    );
    // Half-written state, written to the map directly: an expansion gone, an orphan
    // for an address never expanded.
    {
        let map = dp.ebpf_mut().map_mut(RULES_V4).expect("rules map");
        let mut rules: HashMap<&mut MapData, RuleKeyV4, BackendV4> =
            HashMap::try_from(map).expect("rules map");
        rules.remove(&key(H2, 9000)).expect("drop one");
        rules
            .insert(key(H3, 9000), w.with_flags(BACKEND_EXPANDED), 0)
            .expect("orphan");
    }
    dp.sync_host_addrs(&hosts(&[H1, H2])).expect("hosts");
    let ex = w.with_flags(BACKEND_EXPANDED);
    assert_eq!(
        entries(&mut dp),
        vec![
            (key(Ipv4Addr::UNSPECIFIED, 9000), w),
            (key(H1, 9000), ex),
            (key(H2, 9000), ex),
        ]
    );
}

/// Real traffic: a `*` rule serves an address added to the host while the daemon runs
/// (its once-a-second refresh expands the rule there), and `list` shows the one rule.
#[test]
fn a_wildcard_follows_a_new_host_address() {
    let Some(topo) = Topology::with_daemon("wildcard_new_addr", "wna", "tc") else {
        return;
    };
    let d = topo.daemon();
    assert_eq!(
        d.add("9000", &backend(0)),
        "published *:9000/tcp -> 198.18.1.2:8080"
    );
    assert_eq!(topo.get_published(9000).body_text(), body(0));
    let new = Ipv4Addr::new(198, 18, 0, 11);
    topo.host.ip(&format!("addr add {new}/24 dev {HOST_IFACE}"));
    let to = SocketAddrV4::new(new, 9000);
    let deadline = Instant::now() + Duration::from_secs(10);
    let served = loop {
        match client::get(&topo.client, to, "/") {
            Ok(r) if r.body_text() == body(0) => break true,
            _ if Instant::now() > deadline => break false,
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    assert!(
        served,
        "{to} not served within 10 s of the address appearing"
    );
    let rules = d.rules();
    assert_eq!(
        rules.len(),
        1,
        "expansions are not rules: {:?}",
        d.list_json()
    );
    assert!(d.reason("translated") >= 2, "{}", d.list_json());
}

/// A full rules map refuses a wildcard whose expansions do not fit, whole: the error
/// says so, and the map is left as it was.
#[test]
fn a_full_map_refuses_a_wildcard_whole() {
    if !privileged() {
        return;
    }
    let mut dp = Dataplane::load().expect("load programs");
    dp.sync_host_addrs(&hosts(&[H1, H2])).expect("hosts");
    // Filled directly, to the kernel's limit, then room for two entries made.
    let filler = |i: u32| key(Ipv4Addr::from(0x0a00_0000 + i), 1);
    let mut n = 0u32;
    {
        let map = dp.ebpf_mut().map_mut(RULES_V4).expect("rules map");
        let mut rules: HashMap<&mut MapData, RuleKeyV4, BackendV4> =
            HashMap::try_from(map).expect("rules map");
        while rules
            .insert(filler(n), BackendV4::new(BACKEND, 1, 0), 0)
            .is_ok()
        {
            n += 1;
        }
        assert_eq!(n, portfwd_common::MAX_RULES, "the documented capacity");
        for i in 0..2 {
            rules.remove(&filler(i)).expect("room");
        }
    }
    // The wildcard and two expansions need three.
    let err = dp
        .insert_rule(
            key(Ipv4Addr::UNSPECIFIED, 9000),
            BackendV4::new(BACKEND, 8080, 1),
        )
        .expect_err("a full map");
    assert!(err.to_string().contains("is full"), "{err}");
    let left = dp.rule_entries_of::<V4>().expect("rules");
    assert_eq!(left.len() as u32, n - 2, "the map as it was");
    assert!(
        left.iter().all(|(k, _)| k.port() == 1),
        "nothing of the wildcard left"
    );
}
