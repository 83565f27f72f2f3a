//! IPv6 through the real daemon and kernel programs: a remote client over IPv6 to the
//! published IPv6 address (TC and native XDP ingress), `::1` and the host's IPv6 address
//! from the host through the socket programs, and hairpin from a container.
//!
//! The shared topology (`portfwd_tests::topology`) is IPv4-only; each test adds IPv6 to it
//! here, from 2001:2::/48 (RFC 5180), `nodad` on every address so nothing waits for
//! duplicate address detection, forwarding on in the host namespace only:
//!
//! ```text
//!  client eth0 2001:2::2 ─ cli0 2001:2::1 (host)  br0 2001:2:0:1::1 ─┬─ c1 eth0 2001:2:0:1::2
//!                                                                     └─ c2 eth0 2001:2:0:1::3
//! ```
//! Each container runs a second test server on its IPv6 address (the topology's serves
//! 0.0.0.0 only), with the same body.
//!
//! Families: a rule without a host address (`9000`) serves both; `0.0.0.0` and `[::]`
//! narrow it to one. A dual-stack backend takes each family to its own address; IPv6
//! local clients of an IPv4-only backend connect to it IPv4-mapped at the socket.

use std::{
    net::{SocketAddr, SocketAddrV6, TcpStream, UdpSocket},
    time::Duration,
};

use portfwd_tests::{
    client,
    pattern::pattern_digest,
    require_root,
    topology::{
        backend, body, published, udp_backend, Topology, BRIDGE6, BRIDGE_IP, CLIENT6, CLIENT_IP,
        CONTAINER6, CONTAINER_IPS, HOST6, HOST_IFACE, HTTP_PORT, UDP_PORT,
    },
};

/// A topology with IPv6 added, the containers' IPv6 servers, and a daemon.
struct Net6 {
    topo: Topology,
}

impl Net6 {
    fn new(test: &str, tag: &str, ingress: &str) -> Option<Self> {
        Self::with_args(test, tag, &["--ingress", ingress])
    }

    /// With these daemon arguments (instead of `--ingress`).
    fn with_args(test: &str, tag: &str, args: &[&str]) -> Option<Self> {
        if !require_root(test) {
            return None;
        }
        let mut topo = Topology::new(tag);
        topo.add_ipv6();
        topo.start_daemon_with(args);
        Some(Self { topo })
    }
}

fn backend6(i: usize) -> String {
    format!("[{}]:{HTTP_PORT}", CONTAINER6[i])
}

fn udp_backend6(i: usize) -> String {
    format!("[{}]:{UDP_PORT}", CONTAINER6[i])
}

fn published6(port: u16) -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(HOST6, port, 0, 0))
}

/// `GET /` from the remote client over IPv6.
fn remote_get(topo: &Topology, to: SocketAddr) -> std::io::Result<client::Response> {
    let stream = topo
        .client
        .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(10)))?;
    stream.set_read_timeout(Some(client::IO_TIMEOUT))?;
    client::get_on(stream, "/")
}

/// One UDP request from the remote client: (reply, the address it came from).
fn remote_udp(topo: &Topology, to: SocketAddr, payload: &[u8]) -> (Vec<u8>, SocketAddr) {
    topo.client.run(|| {
        let s = UdpSocket::bind("[::]:0").expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.send_to(payload, to).expect("send");
        let mut buf = [0u8; 2048];
        let (n, from) = s.recv_from(&mut buf).expect("UDP reply over IPv6");
        (buf[..n].to_vec(), from)
    })
}

fn remote_client_case(test: &str, tag: &str, ingress: &str) {
    let Some(net) = Net6::new(test, tag, ingress) else {
        return;
    };
    let (topo, d) = (&net.topo, net.topo.daemon());
    d.add(&format!("[{HOST6}]:9000"), &backend6(0));
    d.add(&format!("[{HOST6}]:5353/udp"), &udp_backend6(1));
    // A wildcard host with an IPv6 backend: the IPv6 wildcard.
    d.add("9001", &backend6(1));

    let r = remote_get(topo, published6(9000)).expect("GET over IPv6");
    assert_eq!(r.body_text(), body(0), "{ingress}");
    // No source NAT: the backend sees the client.
    let seen = r.peer_seen();
    assert_eq!(seen.ip(), CLIENT6, "{ingress}: backend saw {seen}");
    assert_eq!(seen.port(), r.local.port(), "{ingress}");

    let r = remote_get(topo, published6(9001)).expect("GET to the wildcard rule");
    assert_eq!(r.body_text(), body(1), "{ingress}");

    let (reply, from) = remote_udp(topo, published6(5353), b"v6-query");
    assert_eq!(from, published6(5353), "{ingress}: reply source");
    let reply = String::from_utf8_lossy(&reply);
    assert!(
        reply.starts_with(&format!("peer=[{CLIENT6}]:")) && reply.ends_with("v6-query"),
        "{ingress}: {reply}"
    );

    let tcp = d.rule(9000, "tcp");
    assert!(
        tcp.packets > 0 && tcp.reply_packets > 0,
        "{ingress}: {tcp:?}"
    );
    let udp = d.rule(5353, "udp");
    assert_eq!(
        (udp.packets, udp.reply_packets),
        (1, 1),
        "{ingress}: {udp:?}"
    );
    assert_eq!(tcp.backend_ip, CONTAINER6[0].to_string());

    // Unpublished: the host answers itself (nothing listens: refused).
    d.del(&format!("[{HOST6}]:9000"));
    assert!(
        remote_get(topo, published6(9000)).is_err(),
        "{ingress}: after del"
    );
}

#[test]
fn remote_client_over_ipv6_tc() {
    remote_client_case("remote_client_over_ipv6_tc", "6t", "tc");
}

#[test]
fn remote_client_over_ipv6_xdp() {
    remote_client_case("remote_client_over_ipv6_xdp", "6x", "xdp");
}

/// Packets sent by an interface of `ns`, from `ip -s -j link`.
fn tx_packets(ns: &portfwd_tests::netns::Netns, dev: &str) -> u64 {
    let out = ns.ip(&format!("-s -j link show {dev}"));
    let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j output");
    v[0]["stats64"]["tx"]["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("tx packets of {dev} in {out}"))
}

/// With `--fast-path`, translated IPv6 packets take it (redirected straight to the
/// container's bridge port, hop limit decremented), not the fallback: an upload whose
/// every segment is redirected arrives intact, and so do a download and a UDP exchange.
/// From TC the container's veth is handed the packets directly (`bpf_redirect_peer`):
/// the host's end of it (`vc1`) transmits none of them; with `no_peer`
/// (`--fast-path-no-peer`) it transmits them all.
fn fast_path_case(test: &str, tag: &str, ingress: &str, no_peer: bool) {
    let mut args = vec![
        "--ingress",
        ingress,
        "--fast-path",
        "--fast-path-native-xdp",
    ];
    if no_peer {
        args.push("--fast-path-no-peer");
    }
    let Some(net) = Net6::with_args(test, tag, &args) else {
        return;
    };
    let (topo, d) = (&net.topo, net.topo.daemon());
    d.add(&format!("[{HOST6}]:9000"), &backend6(0));
    d.add(&format!("[{HOST6}]:5353/udp"), &udp_backend6(1));
    // The first packets fall back while the host resolves the container's neighbour
    // entry and the daemon reads the bridge's MAC (once a second): ask until redirected.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while d.reason("redirected") == 0 {
        let r = remote_get(topo, published6(9000)).expect("GET over IPv6");
        assert_eq!(r.body_text(), body(0), "{ingress}");
        assert!(
            std::time::Instant::now() < deadline,
            "{ingress}: nothing was redirected: {}",
            d.list_json()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (redirected, fallback) = (d.reason("redirected"), d.reason("fast_path_fallback"));
    let vc1_tx = tx_packets(&topo.host, "vc1");

    const N: u64 = 20 * 1024 * 1024;
    let connect = || {
        let s = topo
            .client
            .run(|| TcpStream::connect_timeout(&published6(9000), Duration::from_secs(10)))
            .expect("connect over IPv6");
        s.set_read_timeout(Some(client::IO_TIMEOUT))
            .expect("timeout");
        s
    };
    let (len, digest) = client::upload_on(connect(), N).expect("upload over IPv6");
    assert_eq!(len, N, "{ingress}: upload length seen by the backend");
    assert_eq!(digest, pattern_digest(N), "{ingress}: upload digest");
    let down = client::download_on(connect(), N).expect("download over IPv6");
    assert_eq!(down.len, N, "{ingress}: download length");
    assert_eq!(down.digest, pattern_digest(N), "{ingress}: download digest");
    let (reply, from) = remote_udp(topo, published6(5353), b"v6-fast");
    assert_eq!(from, published6(5353), "{ingress}: reply source");
    assert!(reply.ends_with(b"v6-fast"), "{ingress}");

    // Every upload segment (no TSO on the client: at most 1,500 bytes each) went the
    // fast way; the few fallbacks allowed are stray packets of the warm-up.
    let grown = d.reason("redirected") - redirected;
    assert!(
        grown >= N / 1500,
        "{ingress}: {grown} redirected for {N} bytes"
    );
    let fell_back = d.reason("fast_path_fallback") - fallback;
    let vc1_sent = tx_packets(&topo.host, "vc1") - vc1_tx;
    eprintln!(
        "{ingress}: {grown} redirected, {fell_back} fell back, vc1 sent {vc1_sent}, for {N} bytes each way"
    );
    if ingress == "tc" && no_peer {
        assert!(
            vc1_sent >= grown,
            "tc, no peer: the host's veth sent {vc1_sent} packets of {grown} redirected"
        );
    } else if ingress == "tc" {
        assert!(
            vc1_sent * 100 < grown,
            "tc: the host's veth sent {vc1_sent} packets of {grown} redirected: not into the peer"
        );
    }
    assert!(
        fell_back * 100 < grown,
        "{ingress}: {fell_back} fallbacks against {grown} redirects"
    );
}

#[test]
fn fast_path_redirects_ipv6_tc() {
    fast_path_case("fast_path_redirects_ipv6_tc", "6ft", "tc", false);
}

#[test]
fn fast_path_redirects_ipv6_tc_no_peer() {
    fast_path_case("fast_path_redirects_ipv6_tc_no_peer", "6fn", "tc", true);
}

#[test]
fn fast_path_redirects_ipv6_xdp() {
    fast_path_case("fast_path_redirects_ipv6_xdp", "6fx", "xdp", false);
}

#[test]
fn host_reaches_ipv6_loopback_and_host_address() {
    let Some(net) = Net6::new("host_reaches_ipv6_loopback_and_host_address", "6l", "tc") else {
        return;
    };
    let (topo, d) = (&net.topo, net.topo.daemon());
    d.add("9000", &backend6(0));
    d.add("5353/udp", &udp_backend6(1));
    let before = d.rule(9000, "tcp");
    for addr in ["[::1]:9000".to_string(), published6(9000).to_string()] {
        let v = topo.local_get(&topo.host, &addr, 0);
        // getpeername shows what the application asked for.
        assert_eq!(v["peername"], addr, "{v}");
        // No NAT, no proxy: the backend sees the host's own address on its network.
        let x_peer = v["x_peer"].as_str().expect("x_peer");
        assert!(
            x_peer.starts_with(&format!("[{BRIDGE6}]:")),
            "{addr}: backend saw {x_peer}"
        );
    }
    let after = d.rule(9000, "tcp");
    assert_eq!(after.local, before.local + 2, "local connections counted");
    assert_eq!(after.packets, before.packets, "no packet was translated");

    let (ok, v) = topo.testcli(&topo.host, true, &["udp", "[::1]:5353", "v6-local"]);
    assert!(ok, "{v}");
    assert_eq!(
        v["from"], "[::1]:5353",
        "the reply shows the published address: {v}"
    );
    assert!(v["reply"].as_str().expect("reply").ends_with("v6-local"));
    let (ok, v) = topo.testcli(&topo.host, true, &["udp-connected", "[::1]:5353", "again"]);
    assert!(ok, "{v}");
    assert_eq!(v["peername"], "[::1]:5353", "{v}");

    // A published port cannot be taken by a local bind on [::].
    let (_, v) = topo.testcli(&topo.host, true, &["bind", "tcp", "[::]:9000"]);
    assert_eq!(v["bind"], "error", "{v}");
    assert_eq!(v["errno"], libc::EPERM, "{v}");
    let (_, v) = topo.testcli(&topo.host, true, &["bind", "tcp", "[::]:9002"]);
    assert_eq!(v["bind"], "ok", "{v}");
}

#[test]
fn container_reaches_the_host_ipv6_address_hairpin() {
    let Some(net) = Net6::new(
        "container_reaches_the_host_ipv6_address_hairpin",
        "6h",
        "tc",
    ) else {
        return;
    };
    let (topo, d) = (&net.topo, net.topo.daemon());
    d.add("9000", &backend6(0));
    let target = published6(9000).to_string();
    let v = topo.local_get(&topo.containers[1], &target, 0);
    assert_eq!(v["peername"], target, "{v}");
    let x_peer = v["x_peer"].as_str().expect("x_peer");
    assert!(
        x_peer.starts_with(&format!("[{}]:", CONTAINER6[1])),
        "the backend sees the calling container: {x_peer}"
    );
    // A container's own ::1 stays its own.
    let (ok, v) = topo.testcli(&topo.containers[1], true, &["tcp", "[::1]:9000"]);
    assert!(
        !ok,
        "a container's [::1]:9000 must not reach the host's rule: {v}"
    );
}

/// `9000` to an IPv4-only backend serves both families: IPv4 clients as ever, and IPv6
/// local clients (`[::1]`, the host's IPv6 address, a container calling it) connect to
/// the backend as `::ffff:a.b.c.d` at the socket. Remote IPv6 clients cannot be served
/// without translating between families: they are passed and counted.
#[test]
fn wildcard_rule_to_an_ipv4_backend_serves_ipv6_local_clients() {
    let Some(net) = Net6::new(
        "wildcard_rule_to_an_ipv4_backend_serves_ipv6_local_clients",
        "6w",
        "tc",
    ) else {
        return;
    };
    let (topo, d) = (&net.topo, net.topo.daemon());
    d.add("9000", &backend(0));
    d.add("5353/udp", &udp_backend(0));
    assert_eq!(
        d.rule(9000, "tcp").host_ip,
        "*",
        "no host address: both families"
    );

    for addr in ["[::1]:9000".to_string(), published6(9000).to_string()] {
        let v = topo.local_get(&topo.host, &addr, 0);
        assert_eq!(
            v["peername"], addr,
            "getpeername shows the published address: {v}"
        );
        let x_peer = v["x_peer"].as_str().expect("x_peer");
        assert!(
            x_peer.starts_with(&format!("{BRIDGE_IP}:")),
            "{addr}: the backend sees the host's IPv4 address: {x_peer}"
        );
    }
    // Hairpin: a container calling the host's IPv6 address.
    let target = published6(9000).to_string();
    let v = topo.local_get(&topo.containers[1], &target, 0);
    let x_peer = v["x_peer"].as_str().expect("x_peer");
    assert!(
        x_peer.starts_with(&format!("{}:", CONTAINER_IPS[1])),
        "the backend sees the calling container: {x_peer}"
    );
    // Connected UDP goes through connect6 too.
    let (ok, v) = topo.testcli(&topo.host, true, &["udp-connected", "[::1]:5353", "mapped"]);
    assert!(ok, "{v}");
    assert_eq!(v["peername"], "[::1]:5353", "{v}");
    assert!(
        v["reply"].as_str().expect("reply").ends_with("mapped"),
        "{v}"
    );

    // An unconnected sendto cannot be redirected to a mapped address (the kernel would
    // fail it with ENOTSUPP): it is left alone, so the send succeeds and no reply comes.
    let before = d.reason("pass_no_ipv6_backend");
    let (ok, v) = topo.testcli(&topo.host, true, &["udp", "[::1]:5353", "unmapped"]);
    let err = v["error"].as_str().unwrap_or_default();
    assert!(
        !ok && err.starts_with("recvfrom"),
        "the send itself succeeds: {v}"
    );
    assert!(d.reason("pass_no_ipv6_backend") > before);

    // The binds of both families are the rule's.
    for addr in ["[::]:9000", "[::1]:9000", "0.0.0.0:9000"] {
        let (_, v) = topo.testcli(&topo.host, true, &["bind", "tcp", addr]);
        assert_eq!(v["errno"], libc::EPERM, "bind {addr}: {v}");
    }

    // Remote clients of both families (IPv6 through NAT64, see below).
    let r = client::get(&topo.client, published(9000), "/").expect("GET over IPv4");
    assert_eq!(r.body_text(), body(0));
    let r = remote_get(topo, published6(9000)).expect("GET over IPv6");
    assert_eq!(r.body_text(), body(0));
}

/// A dual-stack backend (`add 9000 IPV4:PORT [IPV6]:PORT`): each family's clients go to
/// the backend's address of their family, remote ones included, with no NAT.
#[test]
fn dual_stack_backend_serves_each_family_natively() {
    let Some(net) = Net6::new("dual_stack_backend_serves_each_family_natively", "6d", "tc") else {
        return;
    };
    let (topo, d) = (&net.topo, net.topo.daemon());
    let out = d.ctl(&["add", "9000", &backend(0), &backend6(0)]);
    assert_eq!(
        out.expect_ok("dual-stack add").trim(),
        format!("published *:9000/tcp -> {},{}", backend(0), backend6(0))
    );
    let rule = d.rule(9000, "tcp");
    assert_eq!(rule.backend_ip, CONTAINER_IPS[0].to_string());

    let r = remote_get(topo, published6(9000)).expect("GET over IPv6");
    assert_eq!(r.body_text(), body(0));
    assert_eq!(
        r.peer_seen().ip(),
        CLIENT6,
        "the backend sees the IPv6 client"
    );
    let r = client::get(&topo.client, published(9000), "/").expect("GET over IPv4");
    assert_eq!(r.body_text(), body(0));
    assert_eq!(
        r.peer_seen().ip(),
        CLIENT_IP,
        "the backend sees the IPv4 client"
    );

    let (ok, v) = topo.testcli(&topo.host, true, &["tcp", "[::1]:9000"]);
    assert!(ok, "{v}");
    let x_peer = v["x_peer"].as_str().expect("x_peer");
    assert!(
        x_peer.starts_with(&format!("[{BRIDGE6}]:")),
        "a local IPv6 client reaches the IPv6 address: {x_peer}"
    );

    // Two addresses of one family, or different ports, are refused.
    let err = d
        .ctl(&["add", "9001", &backend(0), &backend(1)])
        .expect_error("two IPv4 addresses");
    assert!(
        err.contains("at most one IPv4 and one IPv6 address"),
        "{err}"
    );
    let err = d
        .ctl(&[
            "add",
            "9001",
            &backend(0),
            &format!("[{}]:81", CONTAINER6[0]),
        ])
        .expect_error("different ports");
    assert!(err.contains("take different ports"), "{err}");
}

/// `0.0.0.0` and `[::]` narrow a rule to one family, leaving the other family's port to
/// another rule; `*` conflicts with both.
#[test]
fn a_host_address_narrows_the_rule_to_its_family() {
    let Some(net) = Net6::new("a_host_address_narrows_the_rule_to_its_family", "6n", "tc") else {
        return;
    };
    let (topo, d) = (&net.topo, net.topo.daemon());
    d.add("0.0.0.0:9000", &backend(0));
    d.add("[::]:9000", &backend6(1));
    let r = client::get(&topo.client, published(9000), "/").expect("GET over IPv4");
    assert_eq!(r.body_text(), body(0));
    let r = remote_get(topo, published6(9000)).expect("GET over IPv6");
    assert_eq!(r.body_text(), body(1));
    for (addr, want) in [("127.0.0.1:9000", body(0)), ("[::1]:9000", body(1))] {
        let (ok, v) = topo.testcli(&topo.host, true, &["tcp", addr]);
        assert!(ok, "{addr}: {v}");
        assert_eq!(v["body"], want, "{addr}: {v}");
    }
    let err = d
        .ctl(&["add", "9000", &backend(1)])
        .expect_error("`*` over both families' rules");
    assert!(
        err.ends_with("Bind for 0.0.0.0:9000 failed: port is already allocated"),
        "{err}"
    );

    // Only the IPv4 rule goes.
    d.del("0.0.0.0:9000");
    let r = remote_get(topo, published6(9000)).expect("IPv6 rule kept");
    assert_eq!(r.body_text(), body(1));
    assert!(client::get(&topo.client, published(9000), "/").is_err());
}

/// NAT64: remote IPv6 clients reach an IPv4-only backend too, TCP and UDP, the backend
/// seeing the host's address and a NAT64 port, the client seeing the published address.
/// The daemon puts NAT64's entry on the backend's bridge by itself (replies arrive
/// there), and on an XDP interface (XDP cannot change a packet's family).
fn nat64_case(test: &str, tag: &str, ingress: &str) {
    let Some(net) = Net6::new(test, tag, ingress) else {
        return;
    };
    let (topo, d) = (&net.topo, net.topo.daemon());
    d.add("9000", &backend(0));
    d.add("5353/udp", &udp_backend(1));
    let entries = d.list_json()["nat64_entries"].clone();
    let want: &[&str] = if ingress == "tc" {
        &["br0"]
    } else {
        &["br0", HOST_IFACE]
    };
    assert_eq!(entries, serde_json::json!(want), "{ingress}: NAT64 entries");

    let r = remote_get(topo, published6(9000)).expect("GET over IPv6 to an IPv4 backend");
    assert_eq!(r.body_text(), body(0));
    let seen = r.peer_seen();
    assert_eq!(
        seen.ip(),
        std::net::IpAddr::V4(BRIDGE_IP),
        "backend saw {seen}"
    );
    assert!(
        (portfwd_common::NAT64_PORT_MIN..).contains(&seen.port()),
        "a NAT64 source port: {seen}"
    );
    // Several connections in a row, each its own port.
    for _ in 0..5 {
        let r = remote_get(topo, published6(9000)).expect("again");
        assert_eq!(r.body_text(), body(0));
    }
    let (reply, from) = remote_udp(topo, published6(5353), b"v6-to-v4");
    assert_eq!(
        from,
        published6(5353),
        "the reply comes from the published address"
    );
    let reply = String::from_utf8_lossy(&reply);
    assert!(
        reply.starts_with(&format!("peer={BRIDGE_IP}:")) && reply.ends_with("v6-to-v4"),
        "{reply}"
    );
    let tcp = d.rule(9000, "tcp");
    assert!(tcp.packets > 0 && tcp.reply_packets > 0, "{tcp:?}");
    assert!(d.reason("nat64_translated") > 0);
    assert!(d.reason("nat64_reply_translated") > 0);

    // A bulk transfer: many full-size segments back through the translation.
    let n: u64 = 4 << 20;
    let stream = topo
        .client
        .run(|| TcpStream::connect_timeout(&published6(9000), Duration::from_secs(10)))
        .expect("connect");
    stream
        .set_read_timeout(Some(client::IO_TIMEOUT))
        .expect("timeout");
    let got = client::download_on(stream, n).expect("download over NAT64");
    assert_eq!(
        (got.len, got.first_mismatch),
        (n, None),
        "every byte, intact"
    );

    // Unpublished: new connections stop.
    d.del("9000");
    assert!(remote_get(topo, published6(9000)).is_err());
}

#[test]
fn nat64_serves_remote_ipv6_clients_of_an_ipv4_backend_tc() {
    nat64_case(
        "nat64_serves_remote_ipv6_clients_of_an_ipv4_backend_tc",
        "6n4",
        "tc",
    );
}

/// Partial (offloaded) checksums over IPv6 at TC, both ways: the client and the
/// container send them (transmit offload on), and the host's ends of both veths complete
/// checksums in software (`tx off`), so a wrong update of a partial IPv6 checksum, either
/// way, arrives wrong and the transfer stalls. 8 MB each way, every byte checked.
#[test]
fn partial_checksums_over_ipv6_at_tc() {
    let test = "partial_checksums_over_ipv6_at_tc";
    let Some(net) = Net6::new(test, "6pc", "tc") else {
        return;
    };
    let (topo, d) = (&net.topo, net.topo.daemon());
    topo.client.exec_ok(
        "ethtool",
        &["-K", "eth0", "tx", "on", "tso", "on", "gso", "on"],
    );
    for iface in ["vc1", HOST_IFACE] {
        topo.host.exec_ok("ethtool", &["-K", iface, "tx", "off"]);
    }
    d.add(&format!("[{HOST6}]:9000"), &backend6(0));
    let connect = || {
        let s = topo
            .client
            .run(|| TcpStream::connect_timeout(&published6(9000), Duration::from_secs(10)))
            .expect("connect");
        s.set_read_timeout(Some(client::IO_TIMEOUT))
            .expect("timeout");
        s
    };
    const N: u64 = 8 << 20;
    let (len, digest) = client::upload_on(connect(), N).expect("upload");
    assert_eq!(
        (len, digest),
        (N, pattern_digest(N)),
        "the upload as the backend saw it"
    );
    let got = client::download_on(connect(), N).expect("download");
    assert_eq!(
        (got.len, got.digest),
        (N, pattern_digest(N)),
        "the download"
    );
}

/// NAT64 of GSO packets: with GRO on the host's veth from the client and TSO on the
/// client, the IPv6 packets TC sees are super-packets of up to 64 KB, far over the MTU.
/// Each is translated whole (the route's MTU checked against one segment, which is what
/// leaves), not passed to the host's stack, which would reset the connection. 24 MB
/// each way, every byte checked.
#[test]
fn nat64_carries_gro_and_tso_super_packets() {
    let test = "nat64_carries_gro_and_tso_super_packets";
    let Some(net) = Net6::new(test, "6g4", "tc") else {
        return;
    };
    let (topo, d) = (&net.topo, net.topo.daemon());
    topo.host
        .exec_ok("ethtool", &["-K", HOST_IFACE, "gro", "on"]);
    topo.client.exec_ok(
        "ethtool",
        &["-K", "eth0", "tx", "on", "tso", "on", "gso", "on"],
    );
    for (ns, iface, feature) in [
        (&topo.host, HOST_IFACE, "generic-receive-offload"),
        (&topo.client, "eth0", "tcp-segmentation-offload"),
    ] {
        let k = ns.exec_ok("ethtool", &["-k", iface]);
        assert!(
            k.lines().any(|l| l.trim() == format!("{feature}: on")),
            "{feature} did not turn on for {iface}: {k}"
        );
    }
    d.add("9000", &backend(0));
    let connect = || {
        let s = topo
            .client
            .run(|| TcpStream::connect_timeout(&published6(9000), Duration::from_secs(10)))
            .expect("connect");
        s.set_read_timeout(Some(client::IO_TIMEOUT))
            .expect("timeout");
        s
    };
    const N: u64 = 24 << 20;
    let (len, digest) = client::upload_on(connect(), N).expect("upload over NAT64");
    assert_eq!(
        (len, digest),
        (N, pattern_digest(N)),
        "the upload as the backend saw it"
    );
    let got = client::download_on(connect(), N).expect("download over NAT64");
    assert_eq!(
        (got.len, got.first_mismatch, got.digest),
        (N, None, pattern_digest(N)),
        "the download, every byte intact"
    );
    for failed in [
        "nat64_failed",
        "nat64_too_big",
        "nat64_no_route",
        "nat64_unsupported",
    ] {
        assert_eq!(d.reason(failed), 0, "{failed}: no packet left untranslated");
    }
    let tcp = d.rule(9000, "tcp");
    assert!(tcp.bytes > N && tcp.reply_bytes > N, "{tcp:?}");
}

/// NAT64 under connection churn, as `wrk` with `Connection: close` makes it: one client,
/// a new connection (a new client port) per request, more connections within NAT64's
/// 10-second hold of a closed connection's port than it has ports (4,536). Each closed
/// connection's port is taken over once a new flow finds all its candidates held, so
/// every request is answered; before, most SYNs past the first few thousand found no
/// port, went untranslated to the host's stack and were reset. The backend closes first
/// (the client asks `Connection: close` and reads to the end), so it holds each closed
/// port in TIME_WAIT: a port is taken over only for a SYN that TIME_WAIT takes, else a
/// quarter of the SYNs were answered with the old connection's ACK and retransmitted
/// (counted in the client's namespace, `TcpExtTCPSynRetrans`).
#[test]
fn nat64_serves_connection_churn_beyond_its_port_count() {
    let test = "nat64_serves_connection_churn_beyond_its_port_count";
    let Some(net) = Net6::new(test, "6c4", "tc") else {
        return;
    };
    let (topo, d) = (&net.topo, net.topo.daemon());
    d.add("9000", &backend(0));
    let syn_retrans = || -> u64 {
        let out = topo
            .client
            .exec_ok("nstat", &["-asz", "TcpExtTCPSynRetrans"]);
        out.lines()
            .find_map(|l| l.strip_prefix("TcpExtTCPSynRetrans"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no TcpExtTCPSynRetrans in nstat's output: {out}"))
    };
    let retrans_before = syn_retrans();
    const THREADS: usize = 4;
    const EACH: usize = 1_750;
    let started = std::time::Instant::now();
    let failures: Vec<String> = topo.client.run(|| {
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..THREADS)
                .map(|_| {
                    s.spawn(|| {
                        let mut failed = Vec::new();
                        for _ in 0..EACH {
                            let r = TcpStream::connect_timeout(
                                &published6(9000),
                                Duration::from_secs(10),
                            )
                            .and_then(|c| {
                                c.set_read_timeout(Some(client::IO_TIMEOUT))?;
                                client::get_on(c, "/")
                            });
                            match r {
                                Ok(r) if r.body_text() == body(0) => {}
                                Ok(r) => failed.push(format!("body {:?}", r.body_text())),
                                Err(e) => failed.push(e.to_string()),
                            }
                        }
                        failed
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().expect("client thread"))
                .collect()
        })
    });
    let secs = started.elapsed().as_secs_f64();
    let n = THREADS * EACH;
    assert!(
        failures.is_empty(),
        "{} of {n} requests failed in {secs:.1} s (nat64_no_port {}), first: {:?}",
        failures.len(),
        d.reason("nat64_no_port"),
        &failures[..failures.len().min(3)]
    );
    assert_eq!(d.reason("nat64_no_port"), 0);
    // The churn did outrun the ports (else this test proves nothing).
    let reclaimed = d.reason("nat64_port_reclaimed");
    assert!(
        reclaimed > 0,
        "{n} connections in {secs:.1} s never ran out of NAT64 ports"
    );
    // A takeover with no candidate sure to be taken (1 in 2^8 if each closed one is
    // an even chance) may still cost a retransmission; none of the sure ones may.
    let early = d.reason("nat64_port_reclaimed_early");
    let retrans = syn_retrans() - retrans_before;
    assert!(
        retrans <= early,
        "{retrans} SYN retransmissions for {reclaimed} ports taken over ({early} early)"
    );
}

#[test]
fn nat64_serves_remote_ipv6_clients_of_an_ipv4_backend_xdp() {
    nat64_case(
        "nat64_serves_remote_ipv6_clients_of_an_ipv4_backend_xdp",
        "6x4",
        "xdp",
    );
}

/// `--no-nat64`: remote IPv6 clients of an IPv4-only backend are passed and counted, no
/// entry program is attached; local IPv6 clients are still served at the socket.
#[test]
fn no_nat64_passes_remote_ipv6_clients_of_an_ipv4_backend() {
    let Some(net) = Net6::with_args(
        "no_nat64_passes_remote_ipv6_clients_of_an_ipv4_backend",
        "6o",
        &["--ingress", "tc", "--no-nat64"],
    ) else {
        return;
    };
    let (topo, d) = (&net.topo, net.topo.daemon());
    d.add("9000", &backend(0));
    let before = d.reason("pass_no_ipv6_backend");
    assert!(
        remote_get(topo, published6(9000)).is_err(),
        "no NAT64: a remote IPv6 client is not served"
    );
    assert!(d.reason("pass_no_ipv6_backend") > before);
    assert_eq!(d.reason("nat64_translated"), 0);
    assert_eq!(d.list_json()["nat64_entries"], serde_json::json!([]));
    let (ok, v) = topo.testcli(&topo.host, true, &["tcp", "[::1]:9000"]);
    assert!(ok, "local IPv6 clients are still served: {v}");
}
