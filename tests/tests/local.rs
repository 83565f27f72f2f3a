//! Local clients served at the socket (issue: localhost, the host's own addresses, and
//! containers calling the host): real processes, placed in the daemon's test cgroup,
//! connect and send through the real cgroup programs to the containers of the shared
//! topology (`portfwd_tests::topology`). No packet is translated and no proxy runs.
//!
//! The clients are `portfwd-testcli` processes: a socket belongs to the cgroup of the
//! process that creates it, so each client joins the cgroup before its first socket.

use std::{
    net::SocketAddrV4,
    process::Command,
    time::{Duration, Instant},
};

use portfwd_common::host::cgroup2_root;
use portfwd_tests::{
    bins, client,
    daemon::ctl_at,
    process::ChildGuard,
    require_root,
    topology::{
        backend, body, published, udp_backend, Topology, BRIDGE_IP, CONTAINER_IPS, HOST_IFACE,
    },
};
use serde_json::Value;

#[test]
fn host_reaches_localhost_loopback_and_host_address() {
    let Some(topo) = Topology::with_daemon(
        "host_reaches_localhost_loopback_and_host_address",
        "lh",
        "tc",
    ) else {
        return;
    };
    let d = topo.daemon();
    d.add("9000", &backend(0));
    let before = d.rule(9000, "tcp");

    for addr in [
        "localhost:9000",
        "127.0.0.1:9000",
        &published(9000).to_string(),
    ] {
        let v = topo.local_get(&topo.host, addr, 0);
        // getpeername shows what the application asked for, not the backend.
        let asked: SocketAddrV4 = if addr.starts_with("localhost") {
            "127.0.0.1:9000".parse().expect("addr")
        } else {
            addr.parse().expect("addr")
        };
        assert_eq!(v["peername"], asked.to_string(), "{addr}: {v}");
        // No NAT and no proxy: the backend sees the host's own address on its network.
        let x_peer = v["x_peer"].as_str().expect("x_peer");
        assert!(
            x_peer.starts_with(&format!("{BRIDGE_IP}:")),
            "{addr}: backend saw {x_peer}"
        );
    }
    let after = d.rule(9000, "tcp");
    assert_eq!(after.local, before.local + 3, "local connections counted");
    assert_eq!(after.packets, before.packets, "no packet was translated");
    let json = d.list_json();
    assert_eq!(json["local_clients"]["served"], true, "{json}");
    assert_eq!(
        json["local_clients"]["cgroup"],
        d.cgroup().path().display().to_string(),
        "{json}"
    );
}

#[test]
fn udp_request_reply_from_localhost() {
    let Some(topo) = Topology::with_daemon("udp_request_reply_from_localhost", "lu", "tc") else {
        return;
    };
    topo.daemon().add("5353/udp", &udp_backend(1));
    let (ok, v) = topo.testcli(&topo.host, true, &["udp", "127.0.0.1:5353", "dns-query"]);
    assert!(ok, "{v}");
    // The reply looks as if it came from the address the client sent to.
    assert_eq!(v["from"], "127.0.0.1:5353", "{v}");
    let reply = v["reply"].as_str().expect("reply");
    assert!(reply.ends_with("dns-query"), "{v}");
    assert!(
        reply.starts_with(&format!("peer={BRIDGE_IP}:")),
        "the backend saw the host: {v}"
    );

    // A connected UDP socket: getpeername is the published address too.
    let (ok, v) = topo.testcli(
        &topo.host,
        true,
        &["udp-connected", "127.0.0.1:5353", "again"],
    );
    assert!(ok, "{v}");
    assert_eq!(v["peername"], "127.0.0.1:5353", "{v}");
    assert!(
        v["reply"].as_str().expect("reply").ends_with("again"),
        "{v}"
    );
    assert!(topo.daemon().rule(5353, "udp").local >= 2);
}

#[test]
fn container_reaches_the_host_address_hairpin() {
    let Some(topo) =
        Topology::with_daemon("container_reaches_the_host_address_hairpin", "lp", "tc")
    else {
        return;
    };
    topo.daemon().add("9000", &backend(0));
    // Container 2 calls the host's published address and gets container 1.
    let v = topo.local_get(&topo.containers[1], &published(9000).to_string(), 0);
    assert_eq!(v["peername"], published(9000).to_string(), "{v}");
    assert_eq!(
        v["x_peer"].as_str().expect("x_peer").split(':').next(),
        Some(CONTAINER_IPS[1].to_string().as_str()),
        "the backend sees the calling container: {v}"
    );
    // A container's own loopback stays its own.
    let (ok, v) = topo.testcli(&topo.containers[1], true, &["tcp", "127.0.0.1:9000"]);
    assert!(
        !ok,
        "a container's 127.0.0.1:9000 must not reach the host's rule: {v}"
    );
}

#[test]
fn loopback_bound_rule_is_local_only() {
    let Some(topo) = Topology::with_daemon("loopback_bound_rule_is_local_only", "ll", "tc") else {
        return;
    };
    let d = topo.daemon();
    d.add("127.0.0.1:9100", &backend(1));
    topo.local_get(&topo.host, "127.0.0.1:9100", 1);
    // Not on the host's other addresses, locally or from the client (moby#45610).
    let (ok, v) = topo.testcli(&topo.host, true, &["tcp", &published(9100).to_string()]);
    assert!(
        !ok,
        "a 127.0.0.1 rule must not answer on {}: {v}",
        published(9100)
    );
    assert!(
        client::get(&topo.client, published(9100), "/").is_err(),
        "a 127.0.0.1 rule must be unreachable from other hosts"
    );
    assert_eq!(d.rule(9100, "tcp").packets, 0);
}

#[test]
fn binding_a_published_port_is_refused() {
    let Some(topo) = Topology::with_daemon("binding_a_published_port_is_refused", "lb", "tc")
    else {
        return;
    };
    let d = topo.daemon();
    d.add("9000", &backend(0));
    d.add("5353/udp", &udp_backend(0));
    let eperm = libc::EPERM;
    for (proto, addr) in [
        ("tcp", "0.0.0.0:9000"),
        ("tcp", "127.0.0.1:9000"),
        ("tcp", &published(9000).to_string() as &str),
        ("udp", "0.0.0.0:5353"),
    ] {
        let (_, v) = topo.testcli(&topo.host, true, &["bind", proto, addr]);
        assert_eq!(v["bind"], "error", "bind {proto} {addr}: {v}");
        assert_eq!(v["errno"], eperm, "bind {proto} {addr}: {v}");
    }
    // Other ports, and the other protocol of a published port, stay free.
    for (proto, addr) in [("tcp", "0.0.0.0:9001"), ("udp", "0.0.0.0:9000")] {
        let (_, v) = topo.testcli(&topo.host, true, &["bind", proto, addr]);
        assert_eq!(v["bind"], "ok", "bind {proto} {addr}: {v}");
    }
    // Containers own their ports, published numbers included.
    let (_, v) = topo.testcli(&topo.containers[0], true, &["bind", "tcp", "0.0.0.0:9000"]);
    assert_eq!(v["bind"], "ok", "a container's bind: {v}");
    assert!(d.reason("local_bind_refused") >= 4);
}

#[test]
fn add_is_refused_while_a_local_listener_holds_the_port() {
    let Some(topo) = Topology::with_daemon(
        "add_is_refused_while_a_local_listener_holds_the_port",
        "la",
        "tc",
    ) else {
        return;
    };
    let d = topo.daemon();
    d.add("9000", &backend(0));
    let listener = topo
        .host
        .run(|| std::net::TcpListener::bind("0.0.0.0:9300"))
        .expect("local listener");
    let before = d.rules();
    let line = d
        .ctl(&["add", "9300", &backend(1)])
        .expect_error("add over a local listener");
    assert!(
        line.contains("*:9300/tcp") && line.contains("already"),
        "{line}"
    );
    assert_eq!(d.rules(), before, "nothing changed");
    drop(listener);
    d.add("9300", &backend(1));
    topo.local_get(&topo.host, "127.0.0.1:9300", 1);
}

#[test]
fn del_stops_local_forwarding_at_once() {
    let Some(topo) = Topology::with_daemon("del_stops_local_forwarding_at_once", "ld", "tc") else {
        return;
    };
    let d = topo.daemon();
    d.add("9000", &backend(0));
    topo.local_get(&topo.host, "127.0.0.1:9000", 0);
    d.del("9000");
    let (ok, v) = topo.testcli(&topo.host, true, &["tcp", "127.0.0.1:9000"]);
    assert!(
        !ok,
        "after del, 127.0.0.1:9000 must not reach the backend: {v}"
    );
    let (_, v) = topo.testcli(&topo.host, true, &["bind", "tcp", "0.0.0.0:9000"]);
    assert_eq!(v["bind"], "ok", "after del the port is free again: {v}");
}

#[test]
fn processes_outside_the_cgroup_are_untouched() {
    let Some(topo) =
        Topology::with_daemon("processes_outside_the_cgroup_are_untouched", "lo", "tc")
    else {
        return;
    };
    topo.daemon().add("9000", &backend(0));
    let (ok, v) = topo.testcli(&topo.host, false, &["tcp", "127.0.0.1:9000"]);
    assert!(!ok, "outside the daemon's cgroup nothing is rewritten: {v}");
}

/// Without a cgroup2 mount the daemon starts anyway, says local clients are not served,
/// `list` shows it, and remote clients are served as usual. The mount is hidden from
/// the daemon alone, in a private mount namespace.
#[test]
fn without_cgroup2_the_daemon_serves_remote_clients_only() {
    if !require_root("without_cgroup2_the_daemon_serves_remote_clients_only") {
        return;
    }
    let topo = Topology::new("ln");
    let root = cgroup2_root().expect("cgroup2 mounted on the test machine");
    let socket = topo.dir().join("nocg.sock");
    let log = topo.dir().join("nocg.log");
    // Its own bpffs for the pinned state, unmounted (dropping the pins) after the daemon.
    let pins = portfwd_tests::pins::PinFs::new();
    let script = format!(
        "umount -l {root} && exec nsenter --net={ns} -- {bin} --socket {sock} --iface {HOST_IFACE} \
         --pin-dir {pin}",
        pin = pins.pin_dir().display(),
        root = root.display(),
        ns = topo.host.path().display(),
        bin = bins::bin(bins::PORTFWD).display(),
        sock = socket.display(),
    );
    let logf = std::fs::File::create(&log).expect("log");
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        &script,
    ])
    .stdout(logf.try_clone().expect("log fd"))
    .stderr(logf);
    let mut daemon = ChildGuard::spawn("portfwd without cgroup2", &mut cmd);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(socket.exists() && ctl_at(&socket, &["list"]).success()) {
        assert!(
            daemon.try_wait().is_none(),
            "daemon exited: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(Instant::now() < deadline, "daemon did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let log_text = std::fs::read_to_string(&log).expect("log");
    assert!(
        log_text.contains("local clients") && log_text.contains("not served"),
        "{log_text}"
    );
    ctl_at(&socket, &["add", "9000", &backend(0)]).expect_ok("add");
    let json: Value =
        serde_json::from_str(ctl_at(&socket, &["list", "--json"]).expect_ok("list")).expect("json");
    assert_eq!(json["local_clients"]["served"], false, "{json}");
    let table = ctl_at(&socket, &["list"]);
    assert!(
        table
            .expect_ok("list")
            .contains("local clients: not served"),
        "{}",
        table.stdout
    );
    let r = client::get(&topo.client, published(9000), "/").expect("remote client");
    assert_eq!(r.body_text(), body(0));
    daemon.terminate(Duration::from_secs(10));
}
