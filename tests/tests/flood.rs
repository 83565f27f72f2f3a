//! Flow state survives pressure (issue #11): established connections keep working
//! through a SYN flood from random spoofed sources and through SYN churn far beyond the
//! flow tables' size, because a SYN only ever writes the embryonic table
//! (`EMBRYONIC_V4`); a flow enters the established one (`CONNTRACK_V4`) only when the
//! backend's answer proves its handshake completed, which a spoofed client cannot do.
//!
//! - [`established_connections_survive_a_spoofed_syn_flood`], real traffic in
//!   namespaces: 1,000 TCP connections through a published port to an echo backend,
//!   half of them exchanging messages all through a flood of SYNs from random spoofed
//!   sources (the benchmark's `bench_gen` in BPF_PROG_RUN live-frames mode on the
//!   client's veth, as fast as this machine goes), half idle during it; every one
//!   answers after it. The counters show the flood was seen, and promoted nothing.
//! - [`syn_churn_beyond_the_tables_evicts_no_established_flow`], BPF_PROG_RUN: more
//!   distinct SYNs than both tables hold together leave an established flow in place.
//! - [`retransmitted_syn_and_reused_port`], BPF_PROG_RUN against the model: a SYN of an
//!   established flow, and a client port reused towards another published port.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::{
    maps::{Array, HashMap, MapData},
    programs::{ProgramError, TestRunAttrs, TestRunOptions, Xdp},
    EbpfLoader, TestRun,
};
use etherparse::PacketBuilder;
use portfwd::dataplane::{Dataplane, BENCH_OBJECT};
use portfwd_common::{
    proto, BackendV4, FlowKeyV4, FlowV4, Reason, RuleKeyV4, CONNTRACK_V4, EMBRYONIC_V4,
    MAX_EMBRYONIC_FLOWS, MAX_FLOWS,
};
use portfwd_tests::{
    bins, client,
    fixture::{self, privileged, run_checked, Frame, Prog},
    netns::Netns,
    process::ChildGuard,
    topology::{published, Topology, CLIENT_IP, CONTAINER_IPS, HOST_IFACE, HOST_IP},
};
use serde_json::Value;

/// Established connections through the flood.
const CONNS: usize = 1000;
/// The published port and the backend's echo port.
const PORT: u16 = 9007;
const ECHO_PORT: u16 = 7007;
/// How long the flood runs.
const FLOOD: Duration = Duration::from_secs(8);
/// How long connections go on after it.
const AFTER: Duration = Duration::from_secs(3);
/// Each active connection sends a message this often.
const PACE: Duration = Duration::from_millis(100);
/// The spoofed sources: 10.99.0.0/16 (bench_gen randomizes the low 16 bits and the
/// source port), routed from the host back towards the client, which drops them: the
/// backend's SYN-ACKs take the reply path (translated from the embryonic table) and
/// are never answered, as on the Internet.
const SPOOFED: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 0);
const MSG: usize = 64;

/// One connection's exchanges: when each echo came back, or the first error.
type Exchanges = Result<Vec<Instant>, String>;

/// Sends a numbered 64-byte message and reads its echo; an `active` connection does
/// so every [`PACE`] until `stop`, an idle one only once `idle_over` is set.
fn converse(
    mut s: TcpStream,
    id: usize,
    active: bool,
    idle_over: &AtomicBool,
    stop: &AtomicBool,
) -> Exchanges {
    let _ = s.set_nodelay(true);
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut done = Vec::new();
    let mut seq = 0u64;
    let mut buf = [0u8; MSG];
    loop {
        let mut msg = [0u8; MSG];
        msg[..8].copy_from_slice(&(id as u64).to_be_bytes());
        msg[8..16].copy_from_slice(&seq.to_be_bytes());
        s.write_all(&msg)
            .map_err(|e| format!("connection {id}: write {seq}: {e}"))?;
        s.read_exact(&mut buf)
            .map_err(|e| format!("connection {id}: read {seq}: {e}"))?;
        if buf != msg {
            return Err(format!("connection {id}: echo {seq} differs"));
        }
        done.push(Instant::now());
        seq += 1;
        loop {
            if stop.load(Ordering::Relaxed) {
                return Ok(done);
            }
            std::thread::sleep(PACE);
            if active || idle_over.load(Ordering::Relaxed) {
                break;
            }
        }
    }
}

/// The 64-byte SYN bench_gen sends (it rewrites the low 16 bits of the source and the
/// source port per frame, checksums patched).
fn syn_template(smac: [u8; 6], dmac: [u8; 6]) -> [u8; 64] {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(smac, dmac)
        .ipv4(SPOOFED.octets(), HOST_IP.octets(), 64)
        .tcp(1024, PORT, 0x1234_5678, 64240)
        .syn()
        .write(&mut frame, &[])
        .expect("SYN frame");
    let mut out = [0u8; 64];
    out[..frame.len()].copy_from_slice(&frame);
    out
}

/// Floods from `ns` (its veth `ifname`, whose peer has `dmac`) for `secs`: bench_gen in
/// BPF_PROG_RUN live-frames mode, random spread. Returns (frames sent, seconds).
fn flood(ns: &Netns, ifname: &str, dmac: [u8; 6], secs: Duration) -> (u64, f64) {
    let (ifindex, smac) = ns.link(ifname);
    let template = syn_template(smac, dmac);
    ns.run(move || -> Result<(u64, f64), String> {
        let err = |e: &dyn std::fmt::Display| e.to_string();
        let mut ebpf = EbpfLoader::new().load(BENCH_OBJECT).map_err(|e| err(&e))?;
        let mut tpl: Array<_, [u8; 64]> =
            Array::try_from(ebpf.map_mut("BENCH_TEMPLATE").ok_or("BENCH_TEMPLATE")?)
                .map_err(|e| err(&e))?;
        tpl.set(0, template, 0).map_err(|e| err(&e))?;
        let mut spread: Array<_, [u32; 2]> =
            Array::try_from(ebpf.map_mut("BENCH_SPREAD").ok_or("BENCH_SPREAD")?)
                .map_err(|e| err(&e))?;
        spread.set(0, [1, 1], 0).map_err(|e| err(&e))?;
        let gen: &mut Xdp = ebpf
            .program_mut("bench_gen")
            .ok_or("bench_gen")?
            .try_into()
            .map_err(|e: ProgramError| err(&e))?;
        gen.load().map_err(|e| err(&e))?;
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, ...
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&64u32.to_ne_bytes());
        ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        let (start, chunk) = (Instant::now(), 1u32 << 16);
        let mut sent = 0u64;
        while start.elapsed() < secs {
            gen.test_run(TestRunOptions {
                data_in: Some(&template),
                ctx_in: Some(&ctx),
                repeat: chunk,
                attrs: TestRunAttrs::new().xdp_live_frames(64),
                ..Default::default()
            })
            .map_err(|e| format!("BPF_PROG_RUN live frames: {e}"))?;
            sent += u64::from(chunk);
        }
        Ok((sent, start.elapsed().as_secs_f64()))
    })
    .unwrap_or_else(|e| panic!("flood: {e}"))
}

/// `flows --json`'s usage of `table`: entries.
fn entries(topo: &Topology, table: &str) -> u64 {
    let out = topo.daemon().ctl(&["flows", "--json", "--limit", "0"]);
    let v: Value = serde_json::from_str(out.expect_ok("flows --json")).expect("flows JSON");
    v["tables"]
        .as_array()
        .and_then(|t| t.iter().find(|u| u["table"] == table))
        .and_then(|u| u["entries"].as_u64())
        .unwrap_or_else(|| panic!("no {table} in {v}"))
}

#[test]
fn established_connections_survive_a_spoofed_syn_flood() {
    let Some(topo) = Topology::with_daemon(
        "established_connections_survive_a_spoofed_syn_flood",
        "fl",
        "tc",
    ) else {
        return;
    };
    let backend = &topo.containers[0];
    let mut srv = backend.command(bins::bin(bins::TESTSRV));
    srv.args(["--echo", &format!("0.0.0.0:{ECHO_PORT}")]);
    let _echo =
        ChildGuard::spawn_until_line("echo server", &mut srv, "ready", Duration::from_secs(30));
    // The backend's SYN-ACKs to the spoofed sources go back towards the client.
    topo.host
        .ip(&format!("route add {SPOOFED}/16 via {CLIENT_IP}"));
    // The generator's frames reach the host's veth only if it runs NAPI (GRO).
    topo.host
        .exec_ok("ethtool", &["-K", HOST_IFACE, "gro", "on"]);
    let d = topo.daemon();
    d.add(
        &PORT.to_string(),
        &format!("{}:{ECHO_PORT}", CONTAINER_IPS[0]),
    );

    // The connections, each answered once before the flood: established (promoted).
    let stop = Arc::new(AtomicBool::new(false));
    let idle_over = Arc::new(AtomicBool::new(false));
    let threads: Vec<JoinHandle<Exchanges>> = (0..CONNS)
        .map(|id| {
            let s = client::connect(&topo.client, published(PORT))
                .unwrap_or_else(|e| panic!("connection {id}: {e}"));
            let (stop, idle_over) = (stop.clone(), idle_over.clone());
            std::thread::spawn(move || converse(s, id, id % 2 == 0, &idle_over, &stop))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while entries(&topo, "conntrack_v4") < CONNS as u64 {
        assert!(
            Instant::now() < deadline,
            "the {CONNS} connections are not all established: {} in conntrack_v4",
            entries(&topo, "conntrack_v4")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let promoted_before = d.reason("flow_promoted");
    let seen_before = d.rule(PORT, "tcp").packets;

    let flood_start = Instant::now();
    let (sent, secs) = flood(&topo.client, "eth0", topo.host.link(HOST_IFACE).1, FLOOD);
    let flood_end = Instant::now();
    let embryonic = entries(&topo, "embryonic_v4");
    let established = entries(&topo, "conntrack_v4");
    let seen = d.rule(PORT, "tcp").packets - seen_before;
    let promoted = d.reason("flow_promoted") - promoted_before;

    idle_over.store(true, Ordering::Relaxed);
    std::thread::sleep(AFTER);
    stop.store(true, Ordering::Relaxed);
    let results: Vec<Exchanges> = threads
        .into_iter()
        .map(|t| t.join().unwrap_or_else(|_| Err("thread panicked".into())))
        .collect();
    let lost: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let during = |r: &Exchanges| {
        r.as_ref().map_or(0, |t| {
            t.iter()
                .filter(|&&at| at > flood_start && at < flood_end)
                .count()
        })
    };
    let after = |r: &Exchanges| {
        r.as_ref()
            .map_or(0, |t| t.iter().filter(|&&at| at > flood_end).count())
    };
    let active_min = results.iter().step_by(2).map(during).min().unwrap_or(0);
    let after_min = results.iter().map(after).min().unwrap_or(0);
    eprintln!(
        "flood: {sent} spoofed SYNs offered in {secs:.1} s ({:.0}/s), {seen} seen by portfwd \
         ({:.0}/s); embryonic_v4 {embryonic}/{MAX_EMBRYONIC_FLOWS}, conntrack_v4 \
         {established}, promoted during the flood {promoted}; {CONNS} connections: {} \
         lost, active ones answered at least {active_min} times during the flood, every \
         one at least {after_min} times after",
        sent as f64 / secs,
        seen as f64 / secs,
        lost.len()
    );
    assert!(lost.is_empty(), "connections lost: {lost:?}");
    assert!(
        active_min >= 1,
        "an active connection stalled during the flood"
    );
    assert!(
        after_min >= 1,
        "a connection did not answer after the flood"
    );
    // The flood was seen, far beyond the embryonic table (filled over four times: every
    // spoofed entry evicted others), and changed nothing established: no spoofed flow
    // was promoted, every established flow is still there. The rate reaching portfwd
    // is the machine's (125-152 k/s on one of these guests, 64 k/s on one whose kernel
    // pays for call and return mitigations): reported above, not asserted.
    assert!(
        seen > 4 * u64::from(MAX_EMBRYONIC_FLOWS),
        "the flood reached portfwd {seen} times ({:.0}/s): not four embryonic tables",
        seen as f64 / secs
    );
    assert!(
        embryonic > u64::from(MAX_EMBRYONIC_FLOWS) / 2,
        "embryonic_v4 {embryonic}"
    );
    assert_eq!(promoted, 0, "spoofed SYNs promoted");
    assert!(established >= CONNS as u64, "conntrack_v4 {established}");
}

/// IPv4 fixture addresses (RFC 2544 benchmarking range).
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);

fn hash_len(dp: &Dataplane, name: &str) -> usize {
    let m: HashMap<&MapData, FlowKeyV4, FlowV4> =
        HashMap::try_from(dp.ebpf().map(name).expect(name)).expect(name);
    m.keys().count()
}

#[test]
fn syn_churn_beyond_the_tables_evicts_no_established_flow() {
    if !privileged() {
        return;
    }
    let mut dp = Dataplane::load().expect("load programs");
    dp.insert_rule(
        RuleKeyV4::from_parts(HOST, 9000, proto::TCP),
        BackendV4::new(BACKEND, 8080, 1),
    )
    .expect("rule");
    // One flow established: its SYN, then the backend's ACK (the handshake done).
    let syn = Frame::tcp((CLIENT, 40000), (HOST, 9000));
    run_checked(&dp, Prog::TcIngress, &syn.build());
    let reply = Frame {
        ack: Some(1001),
        ..Frame::tcp((BACKEND, 8080), (CLIENT, 40000))
    };
    run_checked(&dp, Prog::TcEgress, &reply.build());
    let key = FlowKeyV4::new(
        BACKEND.octets(),
        8080u16.to_be_bytes(),
        CLIENT.octets(),
        40000u16.to_be_bytes(),
        proto::TCP,
    );
    let established = fixture::KernelMaps::new(&dp, Default::default());
    use portfwd_common::model::Maps;
    let flow = established.flow_v4(&key).expect("established");
    assert_eq!(
        fixture::reason_count(&dp, Reason::FlowPromoted),
        1,
        "promoted once"
    );

    // Churn: more distinct SYNs (other sources) than both tables hold together.
    let n = MAX_FLOWS + MAX_EMBRYONIC_FLOWS;
    let start = Instant::now();
    for i in 0..n {
        let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 0)) + (i >> 14));
        let port = 1024 + (i & 0x3fff) as u16;
        fixture::run(&dp, Prog::TcIngress, &syn.with_src((src, port)).build());
    }
    let took = start.elapsed();
    let (ct, emb) = (hash_len(&dp, CONNTRACK_V4), hash_len(&dp, EMBRYONIC_V4));
    eprintln!(
        "churn: {n} distinct SYNs in {took:.1?}: conntrack_v4 {ct}, embryonic_v4 {emb}/{}",
        MAX_EMBRYONIC_FLOWS
    );
    assert_eq!(ct, 1, "a SYN wrote the established table");
    assert!(emb <= MAX_EMBRYONIC_FLOWS as usize);
    let maps = fixture::KernelMaps::new(&dp, Default::default());
    assert_eq!(
        maps.flow_v4(&key),
        Some(flow),
        "the established flow is gone"
    );
    // Its replies are still translated, from the established table.
    let (_, out) = run_checked(&dp, Prog::TcEgress, &reply.build());
    assert_eq!(out, reply.with_src((HOST, 9000)).build());
    assert_eq!(fixture::reason_count(&dp, Reason::FlowPromoted), 1);
}

/// `frame` (IPv4, TCP, no options) with SYN+ACK flags, its checksum updated.
fn syn_ack(frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    let word = |f: &[u8]| u16::from_be_bytes([f[46], f[47]]);
    let old = word(&f);
    f[47] = 0x12;
    let check = portfwd_common::csum::replace2(u16::from_be_bytes([f[50], f[51]]), old, word(&f));
    f[50..52].copy_from_slice(&check.to_be_bytes());
    f
}

/// The kernel's flows through a retransmitted SYN and a reused client port, each run
/// compared with the model ([`run_checked`]): a SYN of an established flow writes
/// nothing and its replies go on; the same 4-tuple reused towards another published
/// port of the same backend replaces the established entry with an embryonic one,
/// whose SYN-ACK carries the new published port and whose first ACK promotes it.
#[test]
fn retransmitted_syn_and_reused_port() {
    if !privileged() {
        return;
    }
    let mut dp = Dataplane::load().expect("load programs");
    for (port, slot) in [(9000, 1), (9001, 2)] {
        dp.insert_rule(
            RuleKeyV4::from_parts(HOST, port, proto::TCP),
            BackendV4::new(BACKEND, 8080, slot),
        )
        .expect("rule");
    }
    let key = FlowKeyV4::new(
        BACKEND.octets(),
        8080u16.to_be_bytes(),
        CLIENT.octets(),
        40000u16.to_be_bytes(),
        proto::TCP,
    );
    let tables = |dp: &Dataplane| {
        let m = fixture::KernelMaps::new(dp, Default::default());
        use portfwd_common::model::Maps;
        (m.flow_v4(&key), m.embryonic_v4(&key))
    };
    let syn = Frame::tcp((CLIENT, 40000), (HOST, 9000));
    let ack = Frame {
        ack: Some(1001),
        ..Frame::tcp((BACKEND, 8080), (CLIENT, 40000))
    };
    let via = |port: u16| FlowV4::new(HOST.octets(), port.to_be_bytes(), u32::from(port - 8999));

    run_checked(&dp, Prog::TcIngress, &syn.build());
    assert_eq!(
        tables(&dp),
        (None, Some(via(9000))),
        "embryonic after the SYN"
    );
    run_checked(&dp, Prog::TcEgress, &ack.build());
    assert_eq!(tables(&dp), (Some(via(9000)), None), "promoted by the ACK");

    // A retransmitted SYN: nothing written, replies still translated.
    run_checked(&dp, Prog::TcIngress, &syn.build());
    assert_eq!(tables(&dp), (Some(via(9000)), None), "a retransmitted SYN");
    let (_, out) = run_checked(&dp, Prog::TcEgress, &ack.build());
    assert_eq!(out, ack.with_src((HOST, 9000)).build());

    // The client port reused for 9001, same backend: a new flow.
    run_checked(&dp, Prog::TcIngress, &syn.with_dst((HOST, 9001)).build());
    assert_eq!(tables(&dp), (None, Some(via(9001))), "reused towards 9001");
    let (_, out) = run_checked(&dp, Prog::TcEgress, &syn_ack(&ack.build()));
    assert_eq!(out, syn_ack(&ack.with_src((HOST, 9001)).build()));
    assert_eq!(
        tables(&dp),
        (None, Some(via(9001))),
        "a SYN-ACK promotes nothing"
    );
    run_checked(&dp, Prog::TcEgress, &ack.build());
    assert_eq!(tables(&dp), (Some(via(9001)), None), "promoted again");
    assert_eq!(fixture::reason_count(&dp, Reason::FlowPromoted), 2);
}
