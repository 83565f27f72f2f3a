//! Checks the namespace harness itself, without portfwd: the topology routes, the test
//! server answers (HTTP, large transfers, UDP echo) and sees real peer addresses, sockets
//! made in a namespace stay there, and every guard cleans up, even on panic.

use std::{
    net::{SocketAddr, SocketAddrV4},
    process::Command,
};

use portfwd_tests::{
    client,
    netns::{run_ok, Netns},
    pattern::pattern_digest,
    require_root,
    topology::{body, Topology, CLIENT_IP, CONTAINER_IPS, HTTP_PORT, UDP_PORT},
};

fn netns_list() -> String {
    run_ok(Command::new("ip").args(["netns", "list"]))
}

fn mine(list: &str, tag: &str) -> Vec<String> {
    let needle = format!("pft-{}-{tag}-", std::process::id());
    list.lines()
        .filter(|l| l.starts_with(&needle))
        .map(str::to_string)
        .collect()
}

#[test]
fn topology_routes_directly_without_portfwd() {
    if !require_root("topology_routes_directly_without_portfwd") {
        return;
    }
    let forward_before = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").expect("sysctl");
    {
        let topo = Topology::new("hdir");
        assert_eq!(mine(&netns_list(), "hdir").len(), 4, "four namespaces");
        for (i, ip) in CONTAINER_IPS.iter().enumerate() {
            let to = SocketAddrV4::new(*ip, HTTP_PORT);
            let r = client::get(&topo.client, to, "/").expect("direct GET");
            assert_eq!(r.status, 200);
            assert_eq!(r.body_text(), body(i));
            assert_eq!(r.peer_seen(), r.local, "no NAT on the direct path");
            assert_eq!(r.local.ip(), std::net::IpAddr::V4(CLIENT_IP));

            let echo = client::udp_echo(&topo.client, SocketAddrV4::new(*ip, UDP_PORT), b"ping")
                .expect("direct UDP echo");
            assert_eq!(echo.payload, b"ping");
            assert_eq!(echo.peer_seen.port(), echo.local.port());
            assert_eq!(echo.peer_seen.ip(), std::net::IpAddr::V4(CLIENT_IP));
            assert_eq!(echo.from, SocketAddr::V4(SocketAddrV4::new(*ip, UDP_PORT)));
        }
        let n = 3 * 1024 * 1024 + 5;
        let d = client::download(
            &topo.client,
            SocketAddrV4::new(CONTAINER_IPS[0], HTTP_PORT),
            n,
        )
        .expect("download");
        assert_eq!(d.content_length, Some(n));
        assert_eq!(d.len, n);
        assert_eq!(d.first_mismatch, None);
        assert_eq!(d.digest, pattern_digest(n));
        // The host namespace forwards; the root namespace was not touched.
        let fwd = topo
            .host
            .run(|| std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward"));
        assert_eq!(fwd.expect("host sysctl").trim(), "1");
    }
    assert!(
        mine(&netns_list(), "hdir").is_empty(),
        "namespaces left behind"
    );
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").expect("sysctl"),
        forward_before,
        "the root namespace's ip_forward changed"
    );
}

#[test]
fn sockets_keep_their_namespace() {
    if !require_root("sockets_keep_their_namespace") {
        return;
    }
    let a = Netns::new("hsock", "a");
    a.ip("addr add 198.18.9.1/32 dev lo");
    // Bound inside `a`, where 198.18.9.1 exists; used from this (root-namespace) thread.
    let listener = a
        .run(|| std::net::TcpListener::bind("198.18.9.1:0"))
        .expect("bind in namespace");
    let addr = listener.local_addr().expect("addr");
    let SocketAddr::V4(addr) = addr else {
        unreachable!()
    };
    let stream = client::connect(&a, addr).expect("connect inside the namespace");
    let (_accepted, peer) = listener.accept().expect("accept");
    assert_eq!(peer, stream.local_addr().expect("local"));
    // The root namespace has no such address.
    assert!(std::net::TcpListener::bind("198.18.9.1:0").is_err());
}

#[test]
fn guards_clean_up_on_panic() {
    if !require_root("guards_clean_up_on_panic") {
        return;
    }
    let result = std::panic::catch_unwind(|| {
        let _topo = Topology::new("hpanic");
        panic!("deliberate");
    });
    assert!(result.is_err());
    assert!(
        mine(&netns_list(), "hpanic").is_empty(),
        "namespaces left behind"
    );
    let leftover = std::fs::read_dir(std::env::temp_dir())
        .expect("tmp")
        .filter_map(Result::ok)
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("pft-hpanic-{}-", std::process::id()))
        });
    assert!(!leftover, "temporary directory left behind");
}
