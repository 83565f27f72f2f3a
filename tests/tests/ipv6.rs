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

use std::{
    net::{Ipv6Addr, SocketAddr, SocketAddrV6, TcpStream, UdpSocket},
    process::Output,
    time::Duration,
};

use portfwd_tests::{
    bins, client,
    process::ChildGuard,
    require_root,
    topology::{body, Topology, HOST_IFACE, HTTP_PORT, UDP_PORT},
};
use serde_json::Value;

const HOST6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
const BRIDGE6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 1);
const CONTAINER6: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 2),
    Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 3),
];

/// A topology with IPv6 added, the containers' IPv6 servers, and a daemon.
struct Net6 {
    // Dropped first: the servers stop before their namespaces go.
    _servers: Vec<ChildGuard>,
    topo: Topology,
}

impl Net6 {
    fn new(test: &str, tag: &str, ingress: &str) -> Option<Self> {
        if !require_root(test) {
            return None;
        }
        let mut topo = Topology::new(tag);
        let (host, cli) = (&topo.host, &topo.client);
        host.sysctl("net.ipv6.conf.all.forwarding", "1");
        host.ip(&format!("-6 addr add {HOST6}/64 dev {HOST_IFACE} nodad"));
        host.ip(&format!("-6 addr add {BRIDGE6}/64 dev br0 nodad"));
        cli.ip(&format!("-6 addr add {CLIENT6}/64 dev eth0 nodad"));
        cli.ip(&format!("-6 route add default via {HOST6}"));
        let mut servers = Vec::new();
        for (i, c) in topo.containers.iter().enumerate() {
            c.ip(&format!("-6 addr add {}/64 dev eth0 nodad", CONTAINER6[i]));
            c.ip(&format!("-6 route add default via {BRIDGE6}"));
            let mut cmd = c.command(bins::bin(bins::TESTSRV));
            cmd.args(["--http", &format!("[{}]:{HTTP_PORT}", CONTAINER6[i])])
                .args(["--udp", &format!("[{}]:{UDP_PORT}", CONTAINER6[i])])
                .args(["--body", &body(i)]);
            servers.push(ChildGuard::spawn_until_line(
                &format!("IPv6 server in {}", c.name()),
                &mut cmd,
                "ready",
                Duration::from_secs(30),
            ));
        }
        topo.start_daemon(ingress);
        Some(Self {
            _servers: servers,
            topo,
        })
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

/// Runs `portfwd-testcli` in `ns`, inside the daemon's cgroup.
fn testcli(topo: &Topology, ns: &portfwd_tests::netns::Netns, args: &[&str]) -> (bool, Value) {
    let out: Output = ns
        .command(bins::bin(bins::TESTCLI))
        .arg("--cgroup")
        .arg(topo.daemon().cgroup().path())
        .args(args)
        .output()
        .expect("run portfwd-testcli");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "testcli {args:?}: bad output {text:?} ({e}); stderr {:?}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), v)
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
        let (ok, v) = testcli(topo, &topo.host, &["tcp", &addr]);
        assert!(ok, "local GET {addr}: {v}");
        assert_eq!(v["body"], body(0), "{addr}: {v}");
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

    let (ok, v) = testcli(topo, &topo.host, &["udp", "[::1]:5353", "v6-local"]);
    assert!(ok, "{v}");
    assert_eq!(
        v["from"], "[::1]:5353",
        "the reply shows the published address: {v}"
    );
    assert!(v["reply"].as_str().expect("reply").ends_with("v6-local"));
    let (ok, v) = testcli(topo, &topo.host, &["udp-connected", "[::1]:5353", "again"]);
    assert!(ok, "{v}");
    assert_eq!(v["peername"], "[::1]:5353", "{v}");

    // A published port cannot be taken by a local bind on [::].
    let (_, v) = testcli(topo, &topo.host, &["bind", "tcp", "[::]:9000"]);
    assert_eq!(v["bind"], "error", "{v}");
    assert_eq!(v["errno"], libc::EPERM, "{v}");
    let (_, v) = testcli(topo, &topo.host, &["bind", "tcp", "[::]:9002"]);
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
    let (ok, v) = testcli(topo, &topo.containers[1], &["tcp", &target]);
    assert!(ok, "hairpin GET {target}: {v}");
    assert_eq!(v["body"], body(0), "{v}");
    assert_eq!(v["peername"], target, "{v}");
    let x_peer = v["x_peer"].as_str().expect("x_peer");
    assert!(
        x_peer.starts_with(&format!("[{}]:", CONTAINER6[1])),
        "the backend sees the calling container: {x_peer}"
    );
    // A container's own ::1 stays its own.
    let (ok, v) = testcli(topo, &topo.containers[1], &["tcp", "[::1]:9000"]);
    assert!(
        !ok,
        "a container's [::1]:9000 must not reach the host's rule: {v}"
    );
}
