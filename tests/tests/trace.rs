//! `portfwd-ctl trace` through a live daemon in namespaces (`portfwd_tests::topology`,
//! with IPv6 added as `ipv6.rs` does): a matching, an unpublished-port and an
//! uncovered-address packet, IPv4 and IPv6, TCP and UDP. Each verdict is then checked
//! against the real packet sent by the client (the connection or echo succeeds or not,
//! and the reason the trace names is the one the live counters grow by), and the traces
//! themselves change no live counter and no flow.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use portfwd_tests::{
    daemon::Daemon,
    require_root,
    topology::{
        backend, udp_backend, Topology, CLIENT6, CLIENT_IP, CONTAINER6, HOST6, HOST_IFACE, HOST_IP,
        HTTP_PORT, UDP_PORT,
    },
};
use serde_json::Value;

/// On the client's link, but not the host's: what no wildcard rule covers.
const OTHER4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 77);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x77);

/// The topology with IPv6 added (its servers included) and a daemon.
fn net6(test: &str, tag: &str, ingress: &str) -> Option<Topology> {
    if !require_root(test) {
        return None;
    }
    let mut topo = Topology::new(tag);
    topo.add_ipv6();
    // The uncovered addresses are the host's neighbours: the client reaches the host's
    // interface with them (no route beyond, so the host answers unreachable).
    topo.client.ip(&format!(
        "neigh add {OTHER4} lladdr 02:00:00:00:00:77 dev eth0"
    ));
    topo.client.ip(&format!(
        "-6 neigh add {OTHER6} lladdr 02:00:00:00:00:77 dev eth0"
    ));
    topo.start_daemon_with(&["--ingress", ingress]);
    Some(topo)
}

fn trace(d: &Daemon, client: &str, dest: &str) -> Value {
    let out = d.ctl(&["trace", "--json", client, dest]);
    let v: Value =
        serde_json::from_str(out.expect_ok("trace --json")).expect("trace --json is JSON");
    assert!(
        v["disagreement"].is_null(),
        "model and kernel disagree on {client} -> {dest}: {v}"
    );
    v
}

fn reasons(v: &Value) -> Vec<String> {
    v["reasons"]
        .as_array()
        .expect("reasons")
        .iter()
        .map(|r| r.as_str().expect("reason").to_string())
        .collect()
}

/// What must stay identical across traces: every counter `list` shows, every flow.
fn live_state(d: &Daemon) -> (Value, Value, Value) {
    let list = d.list_json();
    let flows = d.ctl(&["flows", "--json"]);
    let flows: Value = serde_json::from_str(flows.expect_ok("flows")).expect("flows JSON");
    // The link's own background traffic (IPv6 neighbour discovery and MLD) counts under
    // these reasons meanwhile; the traced packets can count under none of them.
    let mut reasons = list["reasons"].clone();
    if let Some(r) = reasons.as_object_mut() {
        for noise in ["pass_not_ip", "pass_not_tcp_udp", "pass_ipv6_ext_header"] {
            r.remove(noise);
        }
    }
    (reasons, list["rules"].clone(), flows["flows"].clone())
}

/// [`live_state`] once the real connection's close has gone through: its FINs cross the
/// programs after `connect` returned, and counted during the traces they looked like the
/// traces' doing. Two reads 300 ms apart that agree.
fn settled_state(d: &Daemon) -> (Value, Value, Value) {
    let mut last = live_state(d);
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(300));
        let now = live_state(d);
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

/// Sends the real packet: TCP connects and reads the body, UDP gets its echo.
/// Whether it reached a backend.
fn real(topo: &Topology, to: SocketAddr, udp: bool) -> bool {
    topo.client.run(|| {
        if udp {
            let bind = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
            let s = UdpSocket::bind(bind).expect("bind");
            s.set_read_timeout(Some(Duration::from_millis(700)))
                .expect("timeout");
            let mut buf = [0u8; 2048];
            (0..3).any(|_| {
                s.send_to(b"trace-check", to).is_ok()
                    && s.recv_from(&mut buf)
                        .is_ok_and(|(n, _)| buf[..n].ends_with(b"trace-check"))
            })
        } else {
            TcpStream::connect_timeout(&to, Duration::from_secs(2)).is_ok()
        }
    })
}

/// (client, destination as `trace` takes it, the real destination, UDP?, the reason
/// expected, the backend expected).
type Case = (
    String,
    String,
    SocketAddr,
    bool,
    &'static str,
    Option<String>,
);

#[test]
fn trace_agrees_with_real_traffic_and_changes_nothing_tc() {
    trace_case(
        "trace_agrees_with_real_traffic_and_changes_nothing_tc",
        "trt",
        "tc",
        "TC ingress",
    );
}

#[test]
fn trace_agrees_with_real_traffic_and_changes_nothing_xdp() {
    trace_case(
        "trace_agrees_with_real_traffic_and_changes_nothing_xdp",
        "trx",
        "xdp",
        "native XDP",
    );
}

/// The traces and the real packets on `ingress`, whose hook `trace` names `hook`.
fn trace_case(test: &str, tag: &str, ingress: &str, hook: &str) {
    let Some(net) = net6(test, tag, ingress) else {
        return;
    };
    let (topo, d) = (&net, net.daemon());
    // Wildcards (every host address), both families and protocols.
    d.add("9000", &backend(0));
    d.add("5353/udp", &udp_backend(1));
    d.add("9006", &format!("[{}]:{HTTP_PORT}", CONTAINER6[0]));
    d.add("5356/udp", &format!("[{}]:{UDP_PORT}", CONTAINER6[1]));

    let c4 = CLIENT_IP.to_string();
    let c6 = format!("[{CLIENT6}]:40000");
    let h4 = |port: u16, suffix: &str| format!("{HOST_IP}:{port}{suffix}");
    let h6 = |a: Ipv6Addr, port: u16, suffix: &str| format!("[{a}]:{port}{suffix}");
    // (client, destination, real destination, udp, expected reason, expected backend)
    let cases: Vec<Case> = vec![
        (
            c4.clone(),
            h4(9000, ""),
            SocketAddr::new(HOST_IP.into(), 9000),
            false,
            "translated",
            Some(backend(0)),
        ),
        (
            c4.clone(),
            h4(5353, "/udp"),
            SocketAddr::new(HOST_IP.into(), 5353),
            true,
            "translated",
            Some(udp_backend(1)),
        ),
        (
            c4.clone(),
            h4(9999, ""),
            SocketAddr::new(HOST_IP.into(), 9999),
            false,
            "pass_no_rule",
            None,
        ),
        (
            c4.clone(),
            h4(9998, "/udp"),
            SocketAddr::new(HOST_IP.into(), 9998),
            true,
            "pass_no_rule",
            None,
        ),
        (
            c4.clone(),
            format!("{OTHER4}:9000"),
            SocketAddr::new(OTHER4.into(), 9000),
            false,
            "pass_not_host_addr",
            None,
        ),
        (
            c4.clone(),
            format!("{OTHER4}:5353/udp"),
            SocketAddr::new(OTHER4.into(), 5353),
            true,
            "pass_not_host_addr",
            None,
        ),
        (
            c6.clone(),
            h6(HOST6, 9006, ""),
            SocketAddr::new(HOST6.into(), 9006),
            false,
            "translated",
            Some(format!("[{}]:{HTTP_PORT}", CONTAINER6[0])),
        ),
        (
            c6.clone(),
            h6(HOST6, 5356, "/udp"),
            SocketAddr::new(HOST6.into(), 5356),
            true,
            "translated",
            Some(format!("[{}]:{UDP_PORT}", CONTAINER6[1])),
        ),
        (
            c6.clone(),
            h6(HOST6, 9999, ""),
            SocketAddr::new(HOST6.into(), 9999),
            false,
            "pass_no_rule",
            None,
        ),
        (
            c6.clone(),
            h6(HOST6, 9998, "/udp"),
            SocketAddr::new(HOST6.into(), 9998),
            true,
            "pass_no_rule",
            None,
        ),
        (
            c6.clone(),
            h6(OTHER6, 9006, ""),
            SocketAddr::new(OTHER6.into(), 9006),
            false,
            "pass_not_host_addr",
            None,
        ),
        (
            c6.clone(),
            h6(OTHER6, 5356, "/udp"),
            SocketAddr::new(OTHER6.into(), 5356),
            true,
            "pass_not_host_addr",
            None,
        ),
    ];

    // Some live state first, so that "unchanged" is not trivially zeros.
    assert!(real(topo, SocketAddr::new(HOST_IP.into(), 9000), false));
    let before = settled_state(d);
    let mut verdicts = Vec::new();
    for (client, dest, _, _, want, want_backend) in &cases {
        let v = trace(d, client, dest);
        eprintln!("trace {client} {dest}: {v}");
        assert_eq!(
            reasons(&v),
            vec![want.to_string()],
            "{client} -> {dest}: {v}"
        );
        assert_eq!(v["iface"], HOST_IFACE, "{v}");
        assert_eq!(v["hook"], hook, "{v}");
        assert_eq!(
            v["backend"].as_str().map(str::to_string),
            *want_backend,
            "{v}"
        );
        if let Some(b) = want_backend {
            assert_eq!(v["rewritten"].as_str(), Some(b.as_str()), "{v}");
        } else {
            assert!(v["rule"].is_null() && v["rewritten"].is_null(), "{v}");
        }
        verdicts.push(v);
    }
    let after = live_state(d);
    assert_eq!(
        before.0, after.0,
        "the traces changed a live reason counter"
    );
    assert_eq!(before.1, after.1, "the traces changed a live rule counter");
    assert_eq!(before.2, after.2, "the traces changed the live flows");

    // The human form names the rule, the rewritten destination and the hook.
    let text = d.ctl(&["trace", &c4, &h4(9000, "")]);
    let text = text.expect_ok("trace");
    eprintln!("{text}");
    assert!(text.contains("*:9000/tcp -> 198.18.1.2:8080"), "{text}");
    assert!(text.contains(&format!("{hook} on cli0")), "{text}");
    assert!(text.contains("BPF_PROG_RUN"), "{text}");
    // Bad input: one line, non-zero, nothing traced.
    let e = d.ctl(&["trace", &c4, &h6(HOST6, 9006, "")]);
    assert!(e.expect_error("mixed families").contains("same family"));
    let e = d.ctl(&["trace", "--iface", "nosuch0", &c4, &h4(9000, "")]);
    assert!(e.expect_error("unknown interface").contains("nosuch0"));
    let e = d.ctl(&["trace", &c4, &h4(9000, "/sctp")]);
    assert!(e.expect_error("sctp").contains("sctp"));
    let text = d.ctl(&["trace", &c4, &h4(9999, "")]);
    assert!(text
        .expect_ok("trace")
        .contains("port 9999/tcp is not published"));

    // The real packets: each reaches a backend exactly when the trace translated it,
    // and the live counter of the reason the trace named grows.
    for (client, dest, to, udp, want, want_backend) in &cases {
        let before = d.reason(want);
        let reached = real(topo, *to, *udp);
        assert_eq!(reached, want_backend.is_some(), "{client} -> {dest} really");
        assert!(
            d.reason(want) > before,
            "{client} -> {dest}: real traffic did not count {want}"
        );
    }
}
