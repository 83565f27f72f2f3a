//! `--max-flows` (issue #11): the flow tables' size is the daemon's to choose, bad values
//! are refused in one line before anything is touched, a daemon started with a small size
//! has kernel maps of exactly that size (bpftool, `flows`) that hold no more than it under
//! more flows than fit, and pinned tables of another size are refused at adoption, with
//! both numbers and the way out, leaving the pinned state forwarding.

use std::{collections::BTreeSet, net::UdpSocket, process::Command, time::Duration};

use portfwd_tests::{
    bins, client,
    daemon::{Daemon, Rule},
    require_root,
    tmp::TempDir,
    topology::{backend, body, published, udp_backend, Topology, HOST_IFACE},
};
use serde_json::Value;

/// The size the small-table tests ask for.
const SMALL: u32 = 1024;

/// Bad `--max-flows` values: one line, exit code 2, nothing created (no socket, no pin
/// directory). Parsing comes before anything else, so this needs no root.
#[test]
fn bad_max_flows_is_one_line_and_touches_nothing() {
    let dir = TempDir::new("pft-maxflows");
    let socket = dir.path().join("portfwd.sock");
    let pins = dir.path().join("pins");
    for bad in [
        "0",
        "1023",
        "16777217",
        "4294967296",
        "-1",
        "abc",
        "1e6",
        "",
    ] {
        let out = Command::new(bins::bin(bins::PORTFWD))
            .args(["--iface", "lo", "--max-flows", bad])
            .arg("--socket")
            .arg(&socket)
            .arg("--pin-dir")
            .arg(&pins)
            .output()
            .expect("run portfwd");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--max-flows {bad:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "--max-flows {bad:?}: {stderr}");
        assert!(
            lines[0].starts_with("portfwd: ")
                && lines[0].contains("--max-flows")
                && lines[0].contains("1024")
                && lines[0].contains("16777216"),
            "--max-flows {bad:?}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "--max-flows {bad:?}");
        assert!(!socket.exists() && !pins.exists(), "--max-flows {bad:?}");
    }
}

/// `flows --json`' tables as (name, entries, capacity).
fn tables(d: &Daemon) -> Vec<(String, u64, u64)> {
    let out = d.ctl(&["flows", "--json", "--limit", "0"]);
    let v: Value = serde_json::from_str(out.expect_ok("flows --json")).expect("flows JSON");
    v["tables"]
        .as_array()
        .expect("tables")
        .iter()
        .map(|t| {
            (
                t["table"].as_str().expect("table").to_string(),
                t["entries"].as_u64().expect("entries"),
                t["capacity"].as_u64().expect("capacity"),
            )
        })
        .collect()
}

/// One table's (entries, capacity).
fn usage(d: &Daemon, table: &str) -> (u64, u64) {
    tables(d)
        .into_iter()
        .find(|(t, ..)| t == table)
        .map(|(_, e, c)| (e, c))
        .unwrap_or_else(|| panic!("no table {table}"))
}

/// `max_entries` of the map pinned at the daemon's `maps-v*/NAME`, from bpftool.
fn pinned_max_entries(d: &Daemon, name: &str) -> u64 {
    let maps = std::fs::read_dir(d.pins().pin_dir())
        .expect("pin dir")
        .filter_map(Result::ok)
        .find(|e| e.file_name().to_string_lossy().starts_with("maps-v"))
        .expect("maps directory")
        .path();
    let out = Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(maps.join(name))
        .output()
        .expect("bpftool");
    assert!(out.status.success(), "bpftool: {out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    v["max_entries"].as_u64().expect("max_entries")
}

/// A daemon started with `--max-flows 1024`: both flow tables are 1,024 entries in the
/// kernel and in `flows`; 3,000 UDP flows (each from a socket of its own) leave at most
/// 1,024 tracked, and forwarding goes on, for new flows and for HTTP.
#[test]
fn max_flows_sizes_the_flow_tables() {
    if !require_root("max_flows_sizes_the_flow_tables") {
        return;
    }
    let mut topo = Topology::new("mfl");
    let small = SMALL.to_string();
    topo.start_daemon_with(&["--ingress", "tc", "--max-flows", &small]);
    let d = topo.daemon();
    for (map, table) in [
        ("CONNTRACK_V4", "conntrack_v4"),
        ("CONNTRACK_V6", "conntrack_v6"),
    ] {
        assert_eq!(pinned_max_entries(d, map), u64::from(SMALL), "{map}");
        assert_eq!(usage(d, table), (0, u64::from(SMALL)), "{table}");
    }
    assert!(
        d.log_text().contains("flow tables: 1024 flows each"),
        "{}",
        d.log_text()
    );
    d.add("9000", &backend(0));
    d.add("9053/udp", &udp_backend(0));

    // Three times as many flows as fit: a datagram from each of 3,000 source ports.
    let to = published(9053);
    let sent: BTreeSet<u16> = topo.client.run(|| {
        let mut ports = BTreeSet::new();
        while ports.len() < 3 * SMALL as usize {
            let sock = UdpSocket::bind("0.0.0.0:0").expect("UDP socket");
            ports.insert(sock.local_addr().expect("address").port());
            sock.send_to(b"x", to).expect("send");
            // Paced, so that no backlog on the way drops a burst.
            if ports.len() % 64 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        ports
    });
    assert_eq!(sent.len(), 3 * SMALL as usize);
    let (entries, capacity) = usage(d, "conntrack_v4");
    assert_eq!(capacity, u64::from(SMALL));
    // Full or nearly (an LRU map evicts a little before full), never beyond.
    assert!(
        entries > u64::from(SMALL) / 2 && entries <= u64::from(SMALL),
        "{entries} of {capacity} flows tracked after {} flows",
        sent.len()
    );
    assert!(d.rule(9053, "udp").packets > 2 * u64::from(SMALL));
    // New flows still go through, and their replies are translated.
    let echo = client::udp_echo(&topo.client, to, b"after").expect("UDP echo");
    assert_eq!(echo.from, to.into());
    assert_eq!(topo.get_published(9000).body_text(), body(0));
}

/// Pinned flow tables of 1,024 entries, and a new daemon asking for the default: refused
/// in one line naming both sizes and `--cleanup`; the pinned state goes on forwarding, and
/// a daemon given the pinned size adopts it (rules and all).
#[test]
fn other_max_flows_is_refused_at_adoption() {
    if !require_root("other_max_flows_is_refused_at_adoption") {
        return;
    }
    let mut topo = Topology::new("mfa");
    let small = SMALL.to_string();
    let args = ["--ingress", "tc", "--max-flows", small.as_str()];
    topo.start_daemon_with(&args);
    topo.daemon().add("9000", &backend(0));
    let before: Vec<Rule> = topo.daemon().rules();
    let mut old = topo.take_daemon().expect("daemon");
    old.stop(Duration::from_secs(30)).expect("SIGTERM");

    for asked in [None, Some("2048")] {
        let mut extra = vec!["--ingress", "tc"];
        extra.extend(asked.map(|n| ["--max-flows", n]).into_iter().flatten());
        let line = Daemon::refused_over(&topo.host, topo.dir(), &[HOST_IFACE], &extra, &old);
        let requested = asked.unwrap_or("131072");
        for needle in ["1024", requested, "--max-flows", "--cleanup"] {
            assert!(line.contains(needle), "{needle}: {line}");
        }
        // The old programs still forward from the pinned state.
        assert_eq!(topo.get_published(9000).body_text(), body(0));
    }

    let new = Daemon::spawn_over(
        &topo.host,
        topo.dir(),
        &[HOST_IFACE],
        &args,
        Some(&old),
        None,
    );
    let new = topo.set_daemon({
        let mut new = new;
        new.wait_ready();
        new
    });
    assert_eq!(
        new.rules().iter().map(Rule::config).collect::<Vec<_>>(),
        before.iter().map(Rule::config).collect::<Vec<_>>()
    );
    assert_eq!(usage(new, "conntrack_v4").1, u64::from(SMALL));
    assert_eq!(topo.get_published(9000).body_text(), body(0));
}
