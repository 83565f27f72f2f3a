//! Published-port declarations through the real daemon and kernel programs, in namespaces
//! (`portfwd_tests::topology`): port ranges, random host ports, declarations files applied
//! atomically while traffic flows, and UDP rules that change under a client.
//!
//! Run on TC ingress (the hook every machine has); the per-hook paths are covered by
//! `netns.rs`. Each daemon gets its own test cgroup (the harness passes `--cgroup`).

use std::{
    net::{SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    time::Duration,
};

use portfwd_tests::{
    client,
    pattern::pattern_digest,
    topology::{body, published, Topology, CONTAINER_IPS, HTTP_PORT, UDP_PORT},
};

#[track_caller]
fn assert_not_forwarded(topo: &Topology, port: u16) {
    if let Ok(r) = client::get(&topo.client, published(port), "/") {
        panic!("{} still forwarded: {:?}", published(port), r.body_text());
    }
}

/// Writes a declarations file in the test's directory.
fn write_file(topo: &Topology, name: &str, text: &str) -> PathBuf {
    let path = topo.dir().join(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

fn apply(topo: &Topology, path: &Path) -> String {
    let p = path.display().to_string();
    topo.daemon()
        .ctl(&["apply", "-f", &p])
        .expect_ok("apply")
        .to_string()
}

fn configs(topo: &Topology) -> Vec<String> {
    let v = topo.daemon().list_json();
    let mut rows: Vec<String> = v["rules"]
        .as_array()
        .unwrap_or_else(|| panic!("no rules in {v}"))
        .iter()
        .map(|r| {
            format!(
                "{}:{}-{}/{} -> {}:{}-{} ({})",
                r["host_ip"],
                r["host_port"],
                r["host_port_end"],
                r["proto"],
                r["backend_ip"],
                r["backend_port"],
                r["backend_port_end"],
                r["source"]
            )
        })
        .collect();
    rows.sort();
    rows
}

/// A 1,000-port range, reached at its first, middle and last port; one row in `list`.
#[test]
fn range_reached_at_first_middle_and_last_port() {
    let Some(topo) =
        Topology::with_daemon("range_reached_at_first_middle_and_last_port", "rng", "tc")
    else {
        return;
    };
    let d = topo.daemon();
    // Ranges map one to one, and the container listens on one port only: publish
    // 9000-9999 so that the port under test lands on HTTP_PORT.
    let c = CONTAINER_IPS[0];
    let line = d.add(
        "9000-9999",
        &format!("{c}:{}-{}", HTTP_PORT - 999, HTTP_PORT),
    );
    assert_eq!(
        line,
        format!(
            "published *:9000-9999/tcp -> {c}:{}-{HTTP_PORT}",
            HTTP_PORT - 999
        )
    );
    // Only the last port of the range lands on the listener; shift the range so the
    // first and the middle do too.
    assert_eq!(topo.get_published(9999).body_text(), body(0), "last port");
    d.del("9000-9999");
    d.add("9000-9999", &format!("{c}:{HTTP_PORT}-{}", HTTP_PORT + 999));
    assert_eq!(topo.get_published(9000).body_text(), body(0), "first port");
    d.del("9000-9999");
    d.add(
        "9000-9999",
        &format!("{c}:{}-{}", HTTP_PORT - 500, HTTP_PORT + 499),
    );
    assert_eq!(topo.get_published(9500).body_text(), body(0), "middle port");
    // One row, the whole range.
    let rows = configs(&topo);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(rows[0].contains("9000-9999"), "{rows:?}");
    // A port inside it is taken: Docker's message names it.
    let err = d
        .ctl(&["add", "9400-9600", &format!("{}:1-201", CONTAINER_IPS[1])])
        .expect_error("overlapping range");
    assert!(
        err.ends_with("Bind for 0.0.0.0:9400 failed: port is already allocated"),
        "{err}"
    );
    assert_eq!(configs(&topo).len(), 1, "nothing applied");
}

/// No host port: the daemon picks a free one from the ephemeral range and prints it.
#[test]
fn random_port_reached_at_the_printed_port() {
    let Some(topo) = Topology::with_daemon("random_port_reached_at_the_printed_port", "rnd", "tc")
    else {
        return;
    };
    let d = topo.daemon();
    let line = d.add("", &format!("{}:{HTTP_PORT}", CONTAINER_IPS[1]));
    // `published *:PORT/tcp -> ...`
    let port: u16 = line
        .strip_prefix("published *:")
        .and_then(|r| r.split_once("/tcp"))
        .and_then(|(p, _)| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    let range = topo
        .host
        .exec_ok("cat", &["/proc/sys/net/ipv4/ip_local_port_range"]);
    let mut it = range
        .split_whitespace()
        .map(|n| n.parse::<u16>().expect("number"));
    let (lo, hi) = (it.next().expect("lo"), it.next().expect("hi"));
    assert!((lo..=hi).contains(&port), "{port} not in {lo}-{hi}");
    assert_eq!(topo.get_published(port).body_text(), body(1));
    // A second one gets another port.
    let line2 = d.add("0", &format!("{}:{HTTP_PORT}", CONTAINER_IPS[0]));
    assert_ne!(line, line2);
}

/// A kept rule's long transfer goes on, intact, while apply adds and removes others.
#[test]
fn apply_adds_removes_and_keeps_while_a_transfer_runs() {
    let Some(topo) = Topology::with_daemon(
        "apply_adds_removes_and_keeps_while_a_transfer_runs",
        "app",
        "tc",
    ) else {
        return;
    };
    let (a, b) = (CONTAINER_IPS[0], CONTAINER_IPS[1]);
    let first = write_file(
        &topo,
        "one.toml",
        &format!(
            "[[publish]]\nto = \"{a}\"\nports = [\"9000:{HTTP_PORT}\", \"9100:{HTTP_PORT}\"]\n"
        ),
    );
    let out = apply(&topo, &first);
    assert!(out.contains("2 added, 0 removed, 0 unchanged"), "{out}");
    assert_eq!(topo.get_published(9100).body_text(), body(0));

    // Long enough to outlast the apply (seconds, not milliseconds), short enough for CI.
    const N: u64 = 256 << 20;
    let transfer = std::thread::scope(|s| {
        let t = s.spawn(|| client::download(&topo.client, published(9000), N));
        std::thread::sleep(Duration::from_millis(300));
        let second = write_file(
            &topo,
            "two.toml",
            &format!(
                "[[publish]]\nto = \"{a}\"\nports = [\"9000:{HTTP_PORT}\"]\n\
                 [[publish]]\nto = \"{b}\"\nports = [\"9200:{HTTP_PORT}\"]\n"
            ),
        );
        let out = apply(&topo, &second);
        assert!(
            !t.is_finished(),
            "the transfer ended before the apply: make it longer"
        );
        assert!(out.contains("+ *:9200/tcp"), "{out}");
        assert!(out.contains("- *:9100/tcp"), "{out}");
        assert!(out.contains("= *:9000/tcp"), "{out}");
        assert!(out.contains("1 added, 1 removed, 1 unchanged"), "{out}");
        assert_eq!(topo.get_published(9200).body_text(), body(1));
        assert_not_forwarded(&topo, 9100);
        t.join().expect("download thread")
    });
    let down = transfer.expect("download across the apply");
    assert_eq!(down.len, N);
    assert_eq!(down.first_mismatch, None, "corrupted");
    assert_eq!(down.digest, pattern_digest(N));
}

/// A file with an error changes nothing: the error names the file, line and entry.
#[test]
fn broken_file_changes_nothing() {
    let Some(topo) = Topology::with_daemon("broken_file_changes_nothing", "brk", "tc") else {
        return;
    };
    let a = CONTAINER_IPS[0];
    let good = write_file(
        &topo,
        "good.toml",
        &format!("[[publish]]\nto = \"{a}\"\nports = [\"9000:{HTTP_PORT}\"]\n"),
    );
    apply(&topo, &good);
    topo.daemon().add("6000", &format!("{a}:{HTTP_PORT}"));
    let before = configs(&topo);
    for (name, text, want) in [
        (
            "range.toml",
            format!("[[publish]]\nto = \"{a}\"\nports = [\"9001:{HTTP_PORT}\",\n  \"9010-9000:80\"]\n"),
            ":4: entry `9010-9000:80`: invalid port range `9010-9000`: it ends before it starts",
        ),
        (
            "syntax.toml",
            format!("[[publish]]\nto = \"{a}\"\nports = [\"9001:{HTTP_PORT}\"\n"),
            ":3: ",
        ),
        (
            "runtime.toml",
            format!("[[publish]]\nto = \"{a}\"\nports = [\"9001:{HTTP_PORT}\", \"6000:{HTTP_PORT}\"]\n"),
            ":3: entry `6000:8080`: *:6000/tcp -> 198.18.1.2:8080 conflicts with the runtime rule *:6000/tcp at port 6000",
        ),
    ] {
        let path = write_file(&topo, name, &text);
        let p = path.display().to_string();
        for args in [vec!["apply", "-f", &p], vec!["apply", "--dry-run", "-f", &p]] {
            let err = topo.daemon().ctl(&args).expect_error(name);
            assert!(err.contains(&format!("{p}{want}")), "{name}: {err}");
        }
        assert_eq!(configs(&topo), before, "{name} changed the rules");
    }
    assert_eq!(topo.get_published(9000).body_text(), body(0));
    assert_not_forwarded(&topo, 9001);
}

/// A UDP rule whose backend changes: the next datagram, from the same client socket,
/// goes to the new backend and its reply comes back from the published address.
#[test]
fn changed_udp_rule_takes_effect_for_the_next_datagram() {
    let Some(topo) = Topology::with_daemon(
        "changed_udp_rule_takes_effect_for_the_next_datagram",
        "udc",
        "tc",
    ) else {
        return;
    };
    let (a, b) = (CONTAINER_IPS[0], CONTAINER_IPS[1]);
    let port = 5353;
    let to = SocketAddrV4::new(portfwd_tests::topology::HOST_IP, port);
    let file = |ip| format!("[[publish]]\nto = \"{ip}\"\nports = [\"{port}:{UDP_PORT}/udp\"]\n");
    let f1 = write_file(&topo, "u1.toml", &file(a));
    apply(&topo, &f1);
    let sock = topo.client.run(|| {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        s
    });
    // The echo is `peer=IP:PORT\n` then the payload. The first datagram may be lost
    // while ARP resolves: a few tries, from the same socket.
    let exchange = |payload: &[u8]| -> (Vec<u8>, SocketAddr) {
        let mut buf = [0u8; 2048];
        for _ in 0..5 {
            sock.send_to(payload, to).expect("send");
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                let nl = buf[..n]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(n, |i| i + 1);
                return (buf[nl..n].to_vec(), from);
            }
        }
        panic!("no echo from {to}");
    };
    let (echo, from) = exchange(b"one");
    assert_eq!(echo, b"one");
    assert_eq!(from, SocketAddr::V4(to));
    let before = topo.daemon().list_json()["rules"][0]["packets"].as_u64();

    let f2 = write_file(&topo, "u2.toml", &file(b));
    let out = apply(&topo, &f2);
    assert!(out.contains("1 added, 1 removed, 0 unchanged"), "{out}");
    let (echo, from) = exchange(b"two");
    assert_eq!(echo, b"two");
    assert_eq!(from, SocketAddr::V4(to), "reply from the published address");
    let rule = &topo.daemon().list_json()["rules"][0];
    assert_eq!(rule["backend_ip"], b.to_string());
    // The new rule counted the datagram (fresh counters: a new rule).
    assert!(
        rule["packets"].as_u64() >= Some(1),
        "{rule} (before {before:?})"
    );
}
