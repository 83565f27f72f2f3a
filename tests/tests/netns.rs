//! Real traffic through the real daemon and kernel programs, in namespaces
//! (`portfwd_tests::topology`): a client, a host running `portfwd --iface cli0`, and two
//! containers serving HTTP on 8080 (each with its own body) and UDP echo on 5353.
//!
//! Every traffic test runs once per ingress hook (native XDP, generic XDP, TC), since
//! each is a different kernel path: see the `per_hook!` modules at the end. The CLI's
//! negative cases and the daemon's life cycle run once, in `cli`.
//!
//! Tests assert behaviour (bytes, addresses, messages, exit codes, counters); timeouts
//! are generous and only keep a broken run from hanging.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use portfwd_tests::{
    client,
    daemon::{ctl_at, Daemon},
    pattern::pattern_digest,
    require_root,
    topology::{
        backend, body, published, udp_backend, Topology, CLIENT_IP, CONTAINER_IPS, HOST_IFACE,
        HOST_IP, UDP_PORT,
    },
};

/// A topology with the daemon running on `ingress`, or `None` when skipped (no root,
/// outside CI).
fn setup(test: &str, tag: &str, ingress: &str) -> Option<Topology> {
    let topo = Topology::with_daemon(test, tag, ingress)?;
    let d = topo.daemon();
    // The daemon reports the hook it attached; it must be the one asked for.
    let ifaces = d.list_json()["interfaces"].clone();
    let want = match ingress.split('+').next() {
        Some("xdp") => "xdp",
        Some("xdp-generic") => "xdp-generic",
        _ => "tc-ingress",
    };
    assert!(
        ifaces.as_array().is_some_and(|a| a
            .iter()
            .any(|i| i["iface"] == HOST_IFACE && i["ingress"] == want)),
        "list --json should show {HOST_IFACE} with ingress {want}: {ifaces}"
    );
    Some(topo)
}

/// A connection to a port nothing is published on is refused by the host itself.
#[track_caller]
fn assert_not_forwarded(topo: &Topology, port: u16) {
    match client::get(&topo.client, published(port), "/") {
        Err(e) => assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{}: expected the host to refuse, got {e}",
            published(port)
        ),
        Ok(r) => panic!("{} still forwarded: {:?}", published(port), r.body_text()),
    }
}

fn configs(d: &Daemon) -> BTreeSet<(String, u16, String, String, u16)> {
    d.rules().iter().map(|r| r.config()).collect()
}

fn two_containers(ingress: &str, tag: &str) {
    let Some(topo) = setup("two_containers", tag, ingress) else {
        return;
    };
    let d = topo.daemon();
    assert_eq!(
        d.add("9000", &backend(0)),
        "published *:9000/tcp -> 198.18.1.2:8080"
    );
    assert_eq!(
        d.add("9001/tcp", &backend(1)),
        "published *:9001/tcp -> 198.18.1.3:8080"
    );
    for _ in 0..3 {
        assert_eq!(topo.get_published(9000).body_text(), body(0));
        assert_eq!(topo.get_published(9001).body_text(), body(1));
    }
    // The text table shows both.
    let table = d.ctl(&["list"]);
    let table = table.expect_ok("list");
    let header = table.lines().next().unwrap_or("");
    for col in ["PUBLISHED", "BACKEND", "PROTO", "PACKETS", "BYTES"] {
        assert!(header.contains(col), "list header {header:?} lacks {col}");
    }
    assert!(
        table
            .lines()
            .any(|l| l.contains("9000") && l.contains("198.18.1.2:8080")),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.contains("9001") && l.contains("198.18.1.3:8080")),
        "{table}"
    );
}

/// The message without the conventional `portfwd-ctl: ` prefix of a CLI error line.
fn docker_text(line: &str) -> &str {
    line.strip_prefix("portfwd-ctl: ").unwrap_or(line)
}

fn duplicate_add(ingress: &str, tag: &str) {
    let Some(topo) = setup("duplicate_add", tag, ingress) else {
        return;
    };
    let d = topo.daemon();
    d.add("9000", &backend(0));
    let before = configs(d);
    let err = d
        .ctl(&["add", "9000", &backend(1)])
        .expect_error("second add 9000");
    assert_eq!(
        docker_text(&err),
        "Bind for 0.0.0.0:9000 failed: port is already allocated"
    );
    // A specific host address conflicts with the wildcard, as in Docker.
    let err = d
        .ctl(&["add", &format!("{HOST_IP}:9000"), &backend(1)])
        .expect_error("add HOST_IP:9000 over a wildcard");
    assert_eq!(
        docker_text(&err),
        format!("Bind for {HOST_IP}:9000 failed: port is already allocated")
    );
    assert_eq!(configs(d), before, "a refused add changed the rules");
    // The original rule still goes to container 1.
    assert_eq!(topo.get_published(9000).body_text(), body(0));
}

fn del_stops_forwarding(ingress: &str, tag: &str) {
    let Some(topo) = setup("del_stops_forwarding", tag, ingress) else {
        return;
    };
    let d = topo.daemon();
    d.add("9000", &backend(0));
    d.add("9001", &backend(1));
    assert_eq!(topo.get_published(9000).body_text(), body(0));
    d.del("9000");
    assert_not_forwarded(&topo, 9000);
    // The other rule is untouched.
    assert_eq!(topo.get_published(9001).body_text(), body(1));
    assert_eq!(d.rules().len(), 1);
    // Publishing again works again.
    d.add("9000", &backend(1));
    assert_eq!(topo.get_published(9000).body_text(), body(1));
}

fn udp_echo(ingress: &str, tag: &str) {
    let Some(topo) = setup("udp_echo", tag, ingress) else {
        return;
    };
    let d = topo.daemon();
    assert_eq!(
        d.add("5353/udp", &udp_backend(0)),
        "published *:5353/udp -> 198.18.1.2:5353"
    );
    // Same port number, other protocol: a separate rule, no conflict.
    d.add("7000/udp", &udp_backend(1));
    for (port, n) in [(5353u16, 0usize), (7000, 1)] {
        let payload = format!("hello container {}", n + 1);
        let echo = client::udp_echo(&topo.client, published(port), payload.as_bytes())
            .unwrap_or_else(|e| panic!("UDP echo via {}: {e}", published(port)));
        assert_eq!(echo.payload, payload.as_bytes());
        // The reply comes from the published address, not the container's.
        assert_eq!(echo.from, SocketAddr::V4(published(port)));
        // The container saw the client itself.
        assert_eq!(echo.peer_seen.ip(), IpAddr::V4(CLIENT_IP));
        assert_eq!(echo.peer_seen.port(), echo.local.port());
    }
    // TCP on 5353 is not published.
    assert_eq!(d.rules().iter().filter(|r| r.proto == "udp").count(), 2);
    let direct = client::udp_echo(
        &topo.client,
        SocketAddrV4::new(CONTAINER_IPS[0], UDP_PORT),
        b"direct",
    )
    .expect("direct UDP still works");
    assert_eq!(
        direct.from,
        SocketAddr::V4(SocketAddrV4::new(CONTAINER_IPS[0], UDP_PORT))
    );
}

fn client_address_preserved(ingress: &str, tag: &str) {
    let Some(topo) = setup("client_address_preserved", tag, ingress) else {
        return;
    };
    topo.daemon().add("9000", &backend(0));
    for _ in 0..3 {
        let r = topo.get_published(9000);
        assert_eq!(r.local.ip(), IpAddr::V4(CLIENT_IP));
        assert_eq!(
            r.peer_seen(),
            r.local,
            "the backend must see the client's own address and port"
        );
    }
}

fn large_transfer(ingress: &str, tag: &str) {
    let Some(topo) = setup("large_transfer", tag, ingress) else {
        return;
    };
    topo.daemon().add("9000", &backend(0));
    const N: u64 = 100 * 1024 * 1024;
    let down = client::download(&topo.client, published(9000), N).expect("100 MB download");
    assert_eq!(down.content_length, Some(N));
    assert_eq!(down.len, N, "download length");
    assert_eq!(down.first_mismatch, None, "download corrupted");
    assert_eq!(down.digest, pattern_digest(N), "download digest");
    let (len, digest) = client::upload(&topo.client, published(9000), N).expect("100 MB upload");
    assert_eq!(len, N, "upload length seen by the backend");
    assert_eq!(digest, down.digest, "upload digest seen by the backend");
}

fn concurrent_connections(ingress: &str, tag: &str) {
    let Some(topo) = setup("concurrent_connections", tag, ingress) else {
        return;
    };
    topo.daemon().add("9000", &backend(0));
    const CONNS: usize = 200;
    const WORKERS: usize = 10;
    // Open all 200 first (ten threads connecting at once), so they are all open together.
    let streams: Vec<std::net::TcpStream> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..WORKERS)
            .map(|_| {
                s.spawn(|| {
                    (0..CONNS / WORKERS)
                        .map(|_| client::connect(&topo.client, published(9000)).expect("connect"))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("connect worker"))
            .collect()
    });
    assert_eq!(streams.len(), CONNS);
    let responses: Vec<client::Response> = std::thread::scope(|s| {
        let handles: Vec<_> = streams
            .into_iter()
            .map(|st| s.spawn(move || client::get_on(st, "/").expect("GET on open connection")))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("request thread"))
            .collect()
    });
    let mut peers = BTreeSet::new();
    for r in &responses {
        assert_eq!(r.status, 200);
        assert_eq!(r.body_text(), body(0));
        assert_eq!(r.peer_seen(), r.local);
        peers.insert(r.local);
    }
    assert_eq!(peers.len(), CONNS, "every connection is its own flow");
}

fn one_backend_two_ports(ingress: &str, tag: &str) {
    let Some(topo) = setup("one_backend_two_ports", tag, ingress) else {
        return;
    };
    let d = topo.daemon();
    d.add("9000", &backend(0));
    d.add("9001", &backend(0));
    // Both open at the same time: the reply path must pick each flow's own published port.
    let a = client::connect(&topo.client, published(9000)).expect("connect 9000");
    let b = client::connect(&topo.client, published(9001)).expect("connect 9001");
    let (ra, rb) = std::thread::scope(|s| {
        let ha = s.spawn(|| client::get_on(a, "/").expect("GET via 9000"));
        let hb = s.spawn(|| client::get_on(b, "/").expect("GET via 9001"));
        (ha.join().expect("9000"), hb.join().expect("9001"))
    });
    for r in [&ra, &rb] {
        assert_eq!(r.body_text(), body(0));
        assert_eq!(r.peer_seen(), r.local);
    }
    let (r0, r1) = (d.rule(9000, "tcp"), d.rule(9001, "tcp"));
    assert!(
        r0.packets > 0 && r1.packets > 0,
        "both rules counted: {r0:?} {r1:?}"
    );
    assert!(
        r0.reply_packets > 0 && r1.reply_packets > 0,
        "both replies counted: {r0:?} {r1:?}"
    );
}

fn counters_grow(ingress: &str, tag: &str) {
    let Some(topo) = setup("counters_grow", tag, ingress) else {
        return;
    };
    let d = topo.daemon();
    d.add("9000", &backend(0));
    let zero = d.rule(9000, "tcp");
    assert_eq!(
        (zero.packets, zero.bytes),
        (0, 0),
        "a new rule starts at zero"
    );
    let translated0 = d.reason("translated");
    topo.get_published(9000);
    let one = d.rule(9000, "tcp");
    assert!(
        one.packets >= 3,
        "a TCP exchange is at least 3 packets in: {one:?}"
    );
    assert!(
        one.bytes > one.packets * 40,
        "bytes count whole packets: {one:?}"
    );
    assert!(
        one.reply_packets >= 2 && one.reply_bytes > 0,
        "replies counted: {one:?}"
    );
    topo.get_published(9000);
    let two = d.rule(9000, "tcp");
    assert!(
        two.packets > one.packets && two.bytes > one.bytes,
        "{one:?} -> {two:?}"
    );
    assert!(two.reply_packets > one.reply_packets, "{one:?} -> {two:?}");
    assert!(
        d.reason("translated") >= translated0 + two.packets,
        "reasons.translated"
    );
}

/// One module per ingress hook, each with every traffic test.
macro_rules! per_hook {
    ($($module:ident => $ingress:literal, $t:literal;)*) => {$(
        mod $module {
            use super::*;
            #[test]
            fn two_containers_answer_on_their_ports() { two_containers($ingress, concat!("two", $t)) }
            #[test]
            fn duplicate_add_is_refused_and_keeps_the_rule() { duplicate_add($ingress, concat!("dup", $t)) }
            #[test]
            fn del_stops_forwarding() { super::del_stops_forwarding($ingress, concat!("del", $t)) }
            #[test]
            fn udp_echo() { super::udp_echo($ingress, concat!("udp", $t)) }
            #[test]
            fn backend_sees_client_address() { client_address_preserved($ingress, concat!("peer", $t)) }
            #[test]
            fn transfer_100mb_intact() { large_transfer($ingress, concat!("big", $t)) }
            #[test]
            fn connections_200_concurrent() { concurrent_connections($ingress, concat!("conc", $t)) }
            #[test]
            fn one_backend_two_ports() { super::one_backend_two_ports($ingress, concat!("twop", $t)) }
            #[test]
            fn counters_grow() { super::counters_grow($ingress, concat!("cnt", $t)) }
        }
    )*};
}

per_hook! {
    xdp => "xdp", "x";
    xdp_generic => "xdp-generic", "g";
    tc => "tc", "t";
    xdp_fast_path => "xdp+fast", "xf";
    tc_fast_path => "tc+fast", "tf";
}

/// With `--fast-path`, translated packets must really take it (redirected straight to
/// the backend's bridge port), not just pass through the fallback.
mod fast_path {
    use super::*;

    fn redirects(ingress: &str, tag: &str) {
        let Some(topo) = setup("fast_path_redirects", tag, ingress) else {
            return;
        };
        let d = topo.daemon();
        d.add("9000", &backend(0));
        // The first packets may fall back while the bridge learns the container's MAC
        // and the daemon reads it (once a second): keep asking until they are redirected.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while d.reason("redirected") == 0 {
            assert_eq!(topo.get_published(9000).body_text(), body(0));
            assert!(
                std::time::Instant::now() < deadline,
                "nothing was redirected: {}",
                d.list_json()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let before = d.reason("redirected");
        for _ in 0..5 {
            assert_eq!(topo.get_published(9000).body_text(), body(0));
        }
        assert!(d.reason("redirected") >= before + 5, "{}", d.list_json());
    }

    #[test]
    fn xdp_redirects() {
        redirects("xdp+fast", "fpx")
    }

    #[test]
    fn tc_redirects() {
        redirects("tc+fast", "fpt")
    }
}

/// A client whose veth offloads checksums (TSO, GSO and transmit checksum offload on, as
/// a container or VM on the same host sends): its TCP segments reach the ingress program
/// with partial checksums (the pseudo-header sum; `CHECKSUM_PARTIAL`). The host's end
/// of the backend's veth completes checksums in software (`tx off` on `vc1`), as a NIC
/// without offload would (and the host's end of the client's veth, for the replies), so
/// a partial checksum given a wrong update arrives wrong and
/// the backend drops the segment; and a partial segment that XDP redirects (an
/// `xdp_frame`, which loses the partial state) is dropped by the backend too.
mod offloaded {
    use super::*;

    fn transfer(ingress: &str, tag: &str) {
        let Some(topo) = setup("offloaded_transfer", tag, ingress) else {
            return;
        };
        topo.client.exec_ok(
            "ethtool",
            &["-K", "eth0", "tx", "on", "tso", "on", "gso", "on"],
        );
        topo.host.exec_ok("ethtool", &["-K", "vc1", "tx", "off"]);
        // The same for the backend's replies (partial: the container offloads too), which
        // the egress program translates on their way out of the host's end of the client's
        // veth.
        topo.host
            .exec_ok("ethtool", &["-K", HOST_IFACE, "tx", "off"]);
        let d = topo.daemon();
        d.add("9000", &backend(0));
        const N: u64 = 20 * 1024 * 1024;
        // Bounded: segments dropped now and then (some redirected, some not) make a
        // transfer crawl rather than fail.
        let (tx, rx) = std::sync::mpsc::channel();
        let down_conn = client::connect(&topo.client, published(9000)).expect("connect");
        let up_conn = client::connect(&topo.client, published(9000)).expect("connect");
        std::thread::spawn(move || {
            let down = client::download_on(down_conn, N);
            let up = client::upload_on(up_conn, N);
            let _ = tx.send((down, up));
        });
        let (down, up) = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("20 MB down and up within 120 s");
        let down = down.expect("20 MB download");
        assert_eq!(down.len, N, "download length");
        assert_eq!(down.first_mismatch, None, "download corrupted");
        assert_eq!(down.digest, pattern_digest(N), "download digest");
        let (len, digest) = up.expect("20 MB upload");
        assert_eq!(len, N, "upload length seen by the backend");
        assert_eq!(digest, down.digest, "upload digest seen by the backend");
        if ingress.starts_with("xdp") && ingress.ends_with("+fast") {
            // Every client segment is partial: none may take XDP's fast path.
            assert_eq!(d.reason("redirected"), 0, "{}", d.list_json());
            assert!(d.reason("fast_path_fallback") > 0, "{}", d.list_json());
        }
    }

    #[test]
    fn xdp() {
        transfer("xdp", "ofx")
    }

    #[test]
    fn xdp_fast_path() {
        transfer("xdp+fast", "ofxf")
    }

    #[test]
    fn xdp_generic_fast_path() {
        transfer("xdp-generic+fast", "ofgf")
    }

    #[test]
    fn tc() {
        transfer("tc", "oft")
    }

    #[test]
    fn tc_fast_path() {
        transfer("tc+fast", "oftf")
    }
}

/// The control plane's refusals and the daemon's life cycle (hook-independent).
mod cli {
    use super::*;

    const EXPECTED: &str = "published *:9000/tcp -> 198.18.1.2:8080";

    /// Runs a refused command, checks its one line contains every `needles` (case
    /// insensitive), and that the rules did not change.
    #[track_caller]
    fn refused(d: &Daemon, args: &[&str], needles: &[&str]) {
        let before = configs(d);
        let what = format!("portfwd-ctl {}", args.join(" "));
        let line = d.ctl(args).expect_error(&what);
        for n in needles {
            assert!(
                line.to_lowercase().contains(&n.to_lowercase()),
                "{what}: message {line:?} should mention {n:?}"
            );
        }
        assert_eq!(configs(d), before, "{what} changed the rules");
    }

    #[test]
    fn bad_input_is_refused_and_changes_nothing() {
        let Some(topo) = setup("bad_input", "bad", "tc") else {
            return;
        };
        let d = topo.daemon();
        assert_eq!(d.add("9000", &backend(0)), EXPECTED);
        let b = backend(1);
        // A host port 0 alone means "any free port" (Docker's `-p 0:80`); in a range it
        // is an error, like a reversed range or one past 65535.
        refused(d, &["add", "0-10", &b], &["port 0"]);
        refused(d, &["add", "9010-9000", &b], &["9010-9000"]);
        refused(d, &["add", "65530-65540", &b], &["65535"]);
        refused(d, &["add", "70000", &b], &["70000"]);
        refused(d, &["add", "9002", "198.18.1.3:0"], &["port", "0"]);
        refused(d, &["add", "9002", "198.18.1.3:70000"], &["70000"]);
        refused(d, &["add", "9002", "198.18.1.300:8080"], &["198.18.1.300"]);
        refused(d, &["add", "9002", "not-an-address"], &["not-an-address"]);
        refused(d, &["add", "300.1.2.3:9002", &b], &["300.1.2.3"]);
        refused(d, &["add", "9002/sctp", &b], &["sctp"]);
        refused(d, &["del", "9999"], &["9999"]);
        refused(d, &["del", "9000/udp"], &["9000"]);
        // Still exactly the one rule, and it still works.
        assert_eq!(topo.get_published(9000).body_text(), body(0));
        assert_not_forwarded(&topo, 9002);
    }

    /// A plugin's rule (`--owner`): `list` shows the owner, and a `del` naming another
    /// owner, or naming one for a rule without, is refused and changes nothing.
    #[test]
    fn owners_guard_their_rules() {
        let Some(topo) = setup("owners", "own", "tc") else {
            return;
        };
        let d = topo.daemon();
        let out = d.ctl(&["add", "--owner", "backup:nightly", "9000", &backend(0)]);
        assert_eq!(out.expect_ok("add --owner").trim(), EXPECTED);
        assert_eq!(
            d.add("9001", &backend(1)),
            "published *:9001/tcp -> 198.18.1.3:8080"
        );
        let table = d.ctl(&["list"]);
        let table = table.expect_ok("list");
        let row = |port: &str| {
            table
                .lines()
                .find(|l| l.starts_with(&format!("*:{port} ")))
                .unwrap_or_else(|| panic!("no row for {port}: {table}"))
                .split_whitespace()
                .nth(3)
                .map(str::to_string)
        };
        assert_eq!(row("9000").as_deref(), Some("backup:nightly"));
        assert_eq!(row("9001").as_deref(), Some("cli"));
        assert_eq!(d.list_json()["rules"][0]["owner"], "backup:nightly");
        refused(
            d,
            &["del", "--owner", "docker:1", "9000"],
            &["cannot unpublish *:9000/tcp for docker:1: it belongs to backup:nightly"],
        );
        refused(
            d,
            &["del", "--owner", "docker:1", "9001"],
            &["cannot unpublish *:9001/tcp for docker:1: it has no owner"],
        );
        refused(
            d,
            &["add", "--owner", "two words", "9002", &backend(0)],
            &["invalid owner `two words`"],
        );
        assert_eq!(topo.get_published(9000).body_text(), body(0));
        d.ctl(&["del", "--owner", "backup:nightly", "9000"])
            .expect_ok("del --owner");
        d.del("9001");
        assert_eq!(configs(d), BTreeSet::new());
    }

    #[test]
    fn no_daemon_running() {
        if !require_root("no_daemon_running") {
            return;
        }
        let dir = portfwd_tests::tmp::TempDir::new("pft-nod");
        let socket = dir.path().join("none.sock");
        for args in [
            &["list"][..],
            &["add", "9000", "198.18.1.2:8080"],
            &["del", "9000"],
        ] {
            let line = ctl_at(&socket, args).expect_error(&format!("{args:?} without a daemon"));
            assert!(
                line.contains(&socket.display().to_string()),
                "should name the socket it tried: {line:?}"
            );
        }
        assert!(!socket.exists(), "portfwd-ctl must not create the socket");
    }

    #[test]
    fn unknown_interface_stops_the_daemon() {
        if !require_root("unknown_interface_stops_the_daemon") {
            return;
        }
        let topo = Topology::new("unk");
        let dir = portfwd_tests::tmp::TempDir::new("pft-unk-d");
        let mut d = Daemon::spawn(&topo.host, dir.path(), &["nosuch0"], &["--ingress", "tc"]);
        let status = d
            .child()
            .wait_timeout(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("portfwd --iface nosuch0 kept running:\n{}", d.log_text()));
        assert!(!status.success(), "exit status {status}");
        let log = d.log_text();
        assert!(
            log.lines().any(|l| l.contains("nosuch0")),
            "the daemon should say which interface is unknown: {log:?}"
        );
        assert!(!d.socket().exists(), "no socket after a failed start");
        // Nothing was left attached to the real interface either.
        let net = topo
            .host
            .exec_ok("bpftool", &["net", "show", "dev", HOST_IFACE]);
        assert!(!net.contains("portfwd"), "left attached: {net}");
    }

    #[test]
    fn second_daemon_on_the_same_socket_is_refused() {
        let Some(topo) = setup("second_daemon", "two-d", "tc") else {
            return;
        };
        let d = topo.daemon();
        d.add("9000", &backend(0));
        let mut second = Daemon::spawn(&topo.host, topo.dir(), &[HOST_IFACE], &["--ingress", "tc"]);
        let status = second
            .child()
            .wait_timeout(Duration::from_secs(60))
            .expect("the second daemon must exit");
        assert!(!status.success(), "second daemon: {status}");
        // The first one keeps its socket, its rule and its traffic.
        assert_eq!(d.rule(9000, "tcp").backend_ip, "198.18.1.2");
        assert_eq!(topo.get_published(9000).body_text(), body(0));
    }

    #[test]
    fn socket_from_environment() {
        let Some(topo) = setup("socket_from_environment", "env", "tc") else {
            return;
        };
        let mut cmd =
            std::process::Command::new(portfwd_tests::bins::bin(portfwd_tests::bins::PORTFWD_CTL));
        cmd.env("PORTFWD_SOCKET", topo.daemon().socket())
            .args(["add", "9000", &backend(0)]);
        let out = portfwd_tests::daemon::run_ctl(&mut cmd);
        assert_eq!(out.expect_ok("add with PORTFWD_SOCKET").trim(), EXPECTED);
        assert_eq!(topo.get_published(9000).body_text(), body(0));
    }

    /// SIGTERM is the first half of a restart: the daemon exits and removes its
    /// socket, and forwarding goes on from the pinned state (new connections included);
    /// `portfwd --cleanup` is what stops it for good.
    #[test]
    fn sigterm_keeps_forwarding_until_cleanup() {
        let Some(mut topo) = setup("sigterm", "term", "xdp") else {
            return;
        };
        topo.daemon().add("9000", &backend(0));
        assert_eq!(topo.get_published(9000).body_text(), body(0));
        let mut d = topo.take_daemon().expect("daemon");
        let status = d
            .stop(Duration::from_secs(30))
            .expect("portfwd exits on SIGTERM");
        assert!(
            status.success(),
            "exit status after SIGTERM: {status}\n{}",
            d.log_text()
        );
        assert!(!d.socket().exists(), "socket left behind");
        let link = topo.host.ip(&format!("link show {HOST_IFACE}"));
        assert!(link.contains("xdp"), "XDP detached by SIGTERM: {link}");
        assert_eq!(
            topo.get_published(9000).body_text(),
            body(0),
            "forwarding after SIGTERM"
        );

        let out = d.cleanup();
        out.expect_ok("portfwd --cleanup");
        let link = topo.host.ip(&format!("link show {HOST_IFACE}"));
        assert!(!link.contains("xdp"), "XDP still attached: {link}");
        let net = topo
            .host
            .exec_ok("bpftool", &["net", "show", "dev", HOST_IFACE]);
        assert!(!net.contains("portfwd"), "still attached: {net}");
        assert_not_forwarded(&topo, 9000);
        assert!(
            !d.pins().pin_dir().exists(),
            "pin directory left after --cleanup"
        );
        // Nothing left to clean: still a success.
        d.cleanup().expect_ok("a second portfwd --cleanup");
    }
}
