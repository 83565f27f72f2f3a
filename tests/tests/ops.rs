//! Operations, through the real daemon and kernel programs in namespaces
//! (`portfwd_tests::topology`): the Prometheus endpoint scraped during traffic, `flows`,
//! readiness (`$NOTIFY_SOCKET`), SIGHUP reloading `--config`, `--check-config`, and the
//! systemd unit checked by `systemd-analyze verify`.
//!
//! Run on TC ingress (every machine has it); the per-hook paths are `netns.rs`'s.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use portfwd_tests::{
    bins, client,
    daemon::ctl_at,
    process::ChildGuard,
    require_root,
    topology::{backend, published, udp_backend, Topology, CLIENT_IP, CONTAINER_IPS, HOST_IFACE},
};
use serde_json::Value;

/// Where the tests' daemons serve metrics (in their own host namespace).
const METRICS: &str = "127.0.0.1:9464";

/// A tool the test needs: its path, or a skip (a failure under CI=true).
fn require_tool(test: &str, tool: &str) -> Option<PathBuf> {
    let found = portfwd_netkit::cmd::find_in_path(tool);
    if found.is_none() {
        let why = format!("{test}: needs `{tool}` (run `cargo xtask setup`)");
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "{why}; CI=true, so this is a failure, not a skip"
        );
        eprintln!("SKIPPED {why}");
    }
    found
}

/// `GET /metrics` from inside the host namespace, with `accept` as the Accept header;
/// the body.
fn scrape_with(topo: &Topology, accept: &str) -> String {
    let mut s = topo
        .host
        .run(|| TcpStream::connect(METRICS).unwrap_or_else(|e| panic!("connect {METRICS}: {e}")));
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {METRICS}\r\nAccept: {accept}\r\n\r\n"
    )
    .expect("send request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read response");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {text:?}"));
    assert!(head.starts_with("HTTP/1.1 200"), "scrape failed: {head}");
    body.to_string()
}

fn scrape(topo: &Topology) -> String {
    scrape_with(topo, "*/*")
}

/// Samples by series (`name{labels}` as written).
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad sample line {l:?}"));
            let v = value
                .parse()
                .unwrap_or_else(|e| panic!("bad value in {l:?}: {e}"));
            (series.to_string(), v)
        })
        .collect()
}

/// The series name of a rule's metric, with the labels `list --json` gives it.
fn rule_series(metric: &str, r: &Value) -> String {
    let port = if r["host_port_end"] != r["host_port"] {
        format!("{}-{}", r["host_port"], r["host_port_end"])
    } else {
        r["host_port"].to_string()
    };
    let bport = if r["backend_port_end"] != r["backend_port"] {
        format!("{}-{}", r["backend_port"], r["backend_port_end"])
    } else {
        r["backend_port"].to_string()
    };
    let str_of = |v: &Value| v.as_str().unwrap_or_default().to_string();
    format!(
        "{metric}{{host_ip=\"{}\",port=\"{port}\",proto=\"{}\",backend=\"{}:{bport}\",source=\"{}\"}}",
        str_of(&r["host_ip"]),
        str_of(&r["proto"]),
        str_of(&r["backend_ip"]),
        str_of(&r["source"]),
    )
}

#[track_caller]
fn value(m: &BTreeMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("no `{series}` in the scrape: {:#?}", m.keys()))
}

/// Sends `n` datagrams from one socket in the client to `port`, each answered before
/// the next; returns how many it sent (retries included).
fn udp_echoes(topo: &Topology, port: u16, n: usize) -> u64 {
    let sock = topo
        .client
        .run(|| UdpSocket::bind("0.0.0.0:0"))
        .expect("bind");
    sock.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut buf = [0u8; 2048];
    let mut sent = 0;
    for i in 0..n {
        let mut answered = false;
        for _ in 0..5 {
            sock.send_to(format!("ping {i}").as_bytes(), published(port))
                .expect("send");
            sent += 1;
            if sock.recv_from(&mut buf).is_ok() {
                answered = true;
                break;
            }
        }
        assert!(answered, "datagram {i} to {port}/udp got no echo");
    }
    sent
}

#[test]
fn metrics_follow_traffic_and_match_list() {
    let Some(mut topo) = setup("metrics_follow_traffic_and_match_list", "om") else {
        return;
    };
    let d = topo.daemon();
    d.add("9000", &backend(0));
    d.add("5353/udp", &udp_backend(1));
    // A first exchange each, so ARP and the first-flow path are behind us.
    topo.get_published(9000);
    udp_echoes(&topo, 5353, 1);

    let before = samples(&scrape(&topo));
    let list = topo.daemon().list_json();
    let udp_rule = list["rules"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["proto"] == "udp"))
        .cloned()
        .unwrap_or_else(|| panic!("no udp rule in {list}"));
    let sent = udp_echoes(&topo, 5353, 20);
    for _ in 0..5 {
        topo.get_published(9000);
    }
    let list = topo.daemon().list_json();
    let text = scrape(&topo);
    let after = samples(&text);

    // Every datagram is one packet in and one reply out.
    for (metric, want) in [
        ("portfwd_rule_packets_total", sent),
        ("portfwd_rule_reply_packets_total", sent),
    ] {
        let series = rule_series(metric, &udp_rule);
        let grew = value(&after, &series) - value(&before, &series);
        assert_eq!(grew, sent as f64, "{series}: grew by {grew}, {want} sent");
    }
    // The labels and values are list --json's (no traffic between the two reads).
    let rules = list["rules"].as_array().expect("rules");
    assert_eq!(rules.len(), 2, "{list}");
    for r in rules {
        for (metric, field) in [
            ("portfwd_rule_packets_total", "packets"),
            ("portfwd_rule_bytes_total", "bytes"),
            ("portfwd_rule_reply_packets_total", "reply_packets"),
            ("portfwd_rule_reply_bytes_total", "reply_bytes"),
            ("portfwd_rule_local_connections_total", "local"),
        ] {
            let series = rule_series(metric, r);
            assert_eq!(
                value(&after, &series),
                r[field].as_f64().expect("a number"),
                "{series} vs list --json's {field}: {r}"
            );
        }
    }
    let tcp = rules
        .iter()
        .find(|r| r["proto"] == "tcp")
        .expect("tcp rule");
    assert!(
        tcp["packets"].as_u64() >= Some(5 * 3),
        "5 GETs are at least 15 packets: {tcp}"
    );
    for (reason, n) in list["reasons"].as_object().expect("reasons") {
        assert_eq!(
            value(
                &after,
                &format!("portfwd_packets_total{{reason=\"{reason}\"}}")
            ),
            n.as_f64().expect("a number"),
            "reason {reason}"
        );
    }
    assert_eq!(value(&after, "portfwd_rules{source=\"cli\"}"), 2.0);
    assert_eq!(value(&after, "portfwd_rule_slots_used"), 2.0);
    assert_eq!(value(&after, "portfwd_map_update_errors_total"), 0.0);
    assert_eq!(
        value(
            &after,
            &format!(
                "portfwd_interface_attached{{iface=\"{HOST_IFACE}\",ingress=\"tc-ingress\",egress=\"tc-egress\"}}"
            )
        ),
        1.0
    );
    assert_eq!(
        value(&after, "portfwd_flows_capacity{table=\"conntrack_v4\"}"),
        131_072.0
    );
    // The UDP socket and the GETs' connections: tracked flows (the GETs' closed
    // connections stay until they age out of the LRU table).
    assert!(value(&after, "portfwd_flows{table=\"conntrack_v4\"}") >= 2.0);

    // Prometheus' own checker takes the text format as served to it.
    if let Some(promtool) = require_tool("metrics_follow_traffic_and_match_list", "promtool") {
        let path = topo.dir().join("metrics.txt");
        std::fs::write(&path, &text).expect("write metrics");
        let out = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(std::fs::File::open(&path).expect("open"))
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Prometheus asks for OpenMetrics: the same samples, counters' families named
    // without `_total`, and the closing `# EOF`.
    let om = scrape_with(&topo, "application/openmetrics-text;version=1.0.0");
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains("# TYPE portfwd_rule_packets counter\n"), "{om}");
    drop(topo.take_daemon());
}

#[test]
fn flows_show_live_tcp_and_udp_until_del() {
    let Some(topo) = setup("flows_show_live_tcp_and_udp_until_del", "of") else {
        return;
    };
    let d = topo.daemon();
    d.add("9000", &backend(0));
    d.add("5353/udp", &udp_backend(1));
    let conn = client::connect(&topo.client, published(9000)).expect("connect to 9000");
    let tcp_client = conn.local_addr().expect("local addr");
    let udp = topo
        .client
        .run(|| UdpSocket::bind("0.0.0.0:0"))
        .expect("bind");
    udp.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut buf = [0u8; 2048];
    let mut echoed = false;
    for _ in 0..5 {
        udp.send_to(b"hello", published(5353)).expect("send");
        if udp.recv_from(&mut buf).is_ok() {
            echoed = true;
            break;
        }
    }
    assert!(echoed, "no UDP echo");
    let udp_port = udp.local_addr().expect("local addr").port();

    let flows = |args: &[&str]| -> Value {
        let mut all = vec!["flows", "--json"];
        all.extend_from_slice(args);
        let out = d.ctl(&all);
        serde_json::from_str(out.expect_ok("flows --json")).expect("flows --json is JSON")
    };
    // The TCP connection's backend has not spoken yet: no proof of a completed
    // handshake, so its flow is embryonic; the UDP flow's echo promoted it.
    let has = |v: &Value, proto: &str, client: SocketAddr, port: u16, backend: &str| {
        let table = if proto == "tcp" {
            "embryonic_v4"
        } else {
            "conntrack_v4"
        };
        v["flows"].as_array().is_some_and(|a| {
            a.iter().any(|f| {
                f["proto"] == proto
                    && f["client"] == client.to_string()
                    && f["published"] == published(port).to_string()
                    && f["backend"] == backend
                    && f["table"] == table
            })
        })
    };
    let tcp_backend = format!("{}:8080", CONTAINER_IPS[0]);
    let udp_backend_addr = format!("{}:5353", CONTAINER_IPS[1]);
    let udp_client: SocketAddr = format!("{CLIENT_IP}:{udp_port}").parse().expect("addr");
    let tcp_client: SocketAddr = format!("{CLIENT_IP}:{}", tcp_client.port())
        .parse()
        .expect("addr");

    let all = flows(&[]);
    assert!(has(&all, "tcp", tcp_client, 9000, &tcp_backend), "{all}");
    assert!(
        has(&all, "udp", udp_client, 5353, &udp_backend_addr),
        "{all}"
    );
    // Filters: by published port, by backend.
    let by_port = flows(&["9000"]);
    assert!(has(&by_port, "tcp", tcp_client, 9000, &tcp_backend));
    assert!(!has(&by_port, "udp", udp_client, 5353, &udp_backend_addr));
    let by_backend = flows(&[&udp_backend_addr]);
    assert!(has(&by_backend, "udp", udp_client, 5353, &udp_backend_addr));
    assert!(!has(&by_backend, "tcp", tcp_client, 9000, &tcp_backend));
    // Bounded: one shown, the rest counted.
    let one = flows(&["--limit", "1"]);
    assert_eq!(one["flows"].as_array().map(Vec::len), Some(1), "{one}");
    assert!(one["more"].as_u64() >= Some(1), "{one}");
    let text = d.ctl(&["flows", "--limit", "1"]);
    let text = text.expect_ok("flows --limit 1");
    assert!(text.contains("more (raise --limit"), "{text}");
    assert!(text.contains("tables: conntrack_v4 "), "{text}");
    assert!(text.contains(", embryonic_v4 "), "{text}");
    let usage = &all["tables"][0];
    assert_eq!(usage["table"], "conntrack_v4");
    assert!(usage["entries"].as_u64() >= Some(1), "{all}");
    let usage = &all["tables"][2];
    assert_eq!(usage["table"], "embryonic_v4");
    assert!(usage["entries"].as_u64() >= Some(1), "{all}");
    assert_eq!(
        usage["capacity"].as_u64(),
        Some(u64::from(portfwd_common::MAX_EMBRYONIC_FLOWS)),
        "{all}"
    );

    d.del("9000");
    d.del("5353/udp");
    let after = flows(&[]);
    assert!(
        !has(&after, "tcp", tcp_client, 9000, &tcp_backend),
        "{after}"
    );
    assert!(
        !has(&after, "udp", udp_client, 5353, &udp_backend_addr),
        "{after}"
    );
    // A bad filter is one line and exit 1.
    let bad = d.ctl(&["flows", "host:80"]);
    bad.expect_error("flows host:80");
    drop(conn);
}

/// Fills CONNTRACK_V4 to capacity through the daemon's own map (found by the map ids
/// the daemon's file descriptors hold) and scrapes: the count is the capacity, and the
/// time a scrape and `flows` take is printed (run with --nocapture to see it).
#[test]
fn full_flow_table_scrape() {
    let Some(mut topo) = setup("full_flow_table_scrape", "ofull") else {
        return;
    };
    let pid = topo.daemon_mut().child().id();
    let map = daemon_map(pid, portfwd_common::CONNTRACK_V4);
    let mut ct: aya::maps::HashMap<
        aya::maps::MapData,
        portfwd_common::FlowKeyV4,
        portfwd_common::FlowV4,
    > = aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(map)).expect("conntrack map");
    let start = Instant::now();
    let cap = portfwd_common::MAX_FLOWS;
    for i in 0..cap {
        let client = (0x0a00_0000u32 | (i >> 8)).to_be_bytes();
        let port = ((i & 0xff) as u16 + 1024).to_be_bytes();
        let key =
            portfwd_common::FlowKeyV4::new([198, 18, 1, 2], 8080u16.to_be_bytes(), client, port, 6);
        ct.insert(
            key,
            portfwd_common::FlowV4::new([198, 18, 0, 1], 9000u16.to_be_bytes(), 0),
            0,
        )
        .expect("insert");
    }
    // An LRU map may evict a little before it is full (its free list is per CPU): the
    // table holds what a walk of our own finds, nearly all of it.
    let held = ct.keys().filter(Result::is_ok).count() as u64;
    eprintln!(
        "filled conntrack_v4 with {cap} entries in {:?}: {held} held",
        start.elapsed()
    );
    assert!(held > u64::from(cap) * 99 / 100, "{held} of {cap} held");

    let start = Instant::now();
    let text = scrape(&topo);
    let took = start.elapsed();
    let m = samples(&text);
    assert_eq!(
        value(&m, "portfwd_flows{table=\"conntrack_v4\"}"),
        held as f64
    );
    eprintln!(
        "scrape with a full conntrack_v4 ({held}): {took:?}, of which the flow walk {}s",
        value(&m, "portfwd_flow_table_walk_seconds")
    );
    // The control socket answers during a scrape's walk.
    let d = topo.daemon();
    let start = Instant::now();
    let out = d.ctl(&["flows", "--limit", "5"]);
    let text = out.expect_ok("flows --limit 5");
    eprintln!("flows --limit 5 with a full table: {:?}", start.elapsed());
    let more = format!("... {} more", held - 5);
    assert!(text.contains(&more), "{text}");
    // A filter reads every flow to count its matches.
    let start = Instant::now();
    let out = d.ctl(&["flows", "--limit", "5", "9000"]);
    let text = out.expect_ok("flows --limit 5 9000");
    eprintln!(
        "flows --limit 5 9000 with a full table: {:?}",
        start.elapsed()
    );
    assert!(text.contains(&more), "{text}");
}

/// The fdinfo of every BPF link process `pid` holds (bpftool 7.1 does not show TCX
/// links; the kernel's fdinfo does: type, interface, hook).
fn bpf_links(pid: u32) -> Vec<String> {
    let dir = format!("/proc/{pid}/fdinfo");
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter(|info| info.contains("link_type:"))
        .collect()
}

/// The map named `name` among the ones process `pid` holds descriptors of.
fn daemon_map(pid: u32, name: &str) -> aya::maps::MapData {
    let dir = format!("/proc/{pid}/fdinfo");
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir}: {e}")) {
        let Ok(entry) = entry else { continue };
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let Some(id) = info
            .lines()
            .find_map(|l| l.strip_prefix("map_id:"))
            .and_then(|v| v.trim().parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(map) = aya::maps::MapData::from_id(id) {
            if map
                .info()
                .ok()
                .and_then(|i| i.name_as_str().map(str::to_string))
                .as_deref()
                == Some(name)
            {
                return map;
            }
        }
    }
    panic!("process {pid} holds no map {name}");
}

#[test]
fn ready_is_sent_after_attach() {
    if !require_root("ready_is_sent_after_attach") {
        return;
    }
    let topo = Topology::new("ordy");
    // An abstract datagram socket in the host namespace (abstract names are per network
    // namespace): `@name` in NOTIFY_SOCKET.
    let name = format!("portfwd-test-notify-{}", std::process::id());
    let sock = topo.host.run(|| {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .expect("abstract address");
        std::os::unix::net::UnixDatagram::bind_addr(&addr).expect("bind notify socket")
    });
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let cgroup = portfwd_tests::cgroup::Cgroup::new("ordy");
    let socket = topo.dir().join("portfwd.sock");
    let log = topo.dir().join("portfwd.log");
    let logf = std::fs::File::create(&log).expect("log");
    let mut cmd = topo.host.command(bins::bin(bins::PORTFWD));
    cmd.arg("--socket")
        .arg(&socket)
        .arg("--cgroup")
        .arg(cgroup.path())
        .args(["--iface", HOST_IFACE, "--ingress", "tc"])
        // Nothing pinned: the links this test looks for are then the daemon's own fds,
        // and no bpffs is needed (readiness comes after attach either way).
        .arg("--no-pin")
        .env("NOTIFY_SOCKET", format!("@{name}"))
        .stdout(logf.try_clone().expect("log"))
        .stderr(logf);
    let mut child = ChildGuard::spawn("portfwd", &mut cmd);
    let mut buf = [0u8; 256];
    // A signal (another test's child exiting) may interrupt the wait: wait again.
    let n = loop {
        match sock.recv(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => break r.unwrap_or_else(|e| panic!("no readiness: {e}; log:\n{}", read(&log))),
        }
    };
    // At this moment: the programs are attached, and the socket answers.
    let links = bpf_links(child.id());
    let list = ctl_at(&socket, &["list", "--json"]);
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg:?}");
    let ifindex = topo.host.ip(&format!("-o link show {HOST_IFACE}"));
    let ifindex = ifindex.split(':').next().unwrap_or_default().trim();
    for hook in ["ingress", "egress"] {
        assert!(
            links.iter().any(|l| l.contains("link_type:\ttcx")
                && l.contains(&format!("ifindex:\t{ifindex}\n"))
                && l.contains(&format!("({hook})"))),
            "no TC {hook} link on {HOST_IFACE} (ifindex {ifindex}) at READY: {links:#?}"
        );
    }
    let sockets = links
        .iter()
        .filter(|l| l.contains("link_type:\tcgroup"))
        .count();
    assert_eq!(sockets, 10, "socket programs at READY: {links:#?}");
    let list = list.expect_ok("list at readiness");
    assert!(list.contains(HOST_IFACE), "{list}");
    assert!(child.try_wait().is_none(), "the daemon exited");
    drop(child);
}

#[test]
fn metrics_address_in_use_stops_the_start() {
    if !require_root("metrics_address_in_use_stops_the_start") {
        return;
    }
    let topo = Topology::new("oinuse");
    let _taken = topo
        .host
        .run(|| std::net::TcpListener::bind(METRICS))
        .expect("bind the metrics address first");
    let mut d = portfwd_tests::daemon::Daemon::spawn(
        &topo.host,
        topo.dir(),
        &[HOST_IFACE],
        &["--ingress", "tc", "--metrics", METRICS],
    );
    let status = d
        .child()
        .wait_timeout(Duration::from_secs(30))
        .expect("the daemon should exit");
    assert!(!status.success());
    let log = d.log_text();
    assert!(
        log.contains(&format!("portfwd: cannot serve metrics on {METRICS}: ")),
        "{log}"
    );
    assert!(!log.contains("attached"), "attached before failing: {log}");
    assert!(!d.socket().exists(), "a socket after a failed start");
}

#[test]
fn sighup_applies_the_config_again() {
    if !require_root("sighup_applies_the_config_again") {
        return;
    }
    let mut topo = Topology::new("ohup");
    let file = topo.dir().join("portfwd.toml");
    let decl = |port: u16| {
        format!(
            "[[publish]]\nto = \"{}\"\nports = [\"{port}:8080\"]\n",
            CONTAINER_IPS[0]
        )
    };
    std::fs::write(&file, decl(9000)).expect("write");
    let f = file.display().to_string();
    topo.start_daemon_with(&["--ingress", "tc", "--config", &f]);
    topo.daemon().add("9001", &backend(1));
    std::fs::write(&file, decl(9002)).expect("write");
    let pid = topo.daemon_mut().child().id();
    let hup = |pid: u32| {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    };
    let ports = |topo: &Topology| -> Vec<(u64, String)> {
        let v = topo.daemon().list_json();
        let mut p: Vec<(u64, String)> = v["rules"]
            .as_array()
            .expect("rules")
            .iter()
            .map(|r| {
                (
                    r["host_port"].as_u64().expect("port"),
                    r["source"].as_str().expect("source").to_string(),
                )
            })
            .collect();
        p.sort();
        p
    };
    hup(pid);
    let want = vec![(9001, "cli".to_string()), (9002, "file".to_string())];
    let deadline = Instant::now() + Duration::from_secs(10);
    while ports(&topo) != want {
        assert!(
            Instant::now() < deadline,
            "after SIGHUP: {:?}; log:\n{}",
            ports(&topo),
            topo.daemon().log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    topo.get_published(9002);
    topo.get_published(9001);
    // A broken file changes nothing, and the daemon goes on.
    std::fs::write(&file, "[[publish]\n").expect("write");
    hup(pid);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !topo
        .daemon()
        .log_text()
        .contains("not applied, nothing changed")
    {
        assert!(Instant::now() < deadline, "{}", topo.daemon().log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(ports(&topo), want);
    topo.get_published(9002);
}

#[test]
fn check_config_good_and_bad_files() {
    let dir = portfwd_tests::tmp::TempDir::new("pft-ocheck");
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        p
    };
    let good = write(
        "good.toml",
        "[[publish]]\nto = \"172.17.0.2\"\nports = [\"9000:8080\", \"127.0.0.1:9443:443\", \"5353:53/udp\"]\n\n\
         [[publish]]\nto = [\"172.17.0.4\", \"2001:db8::4\"]\nports = [\"9080:80\"]\n",
    );
    let out = check(&good);
    assert!(out.0, "{out:?}");
    assert!(
        out.1
            .starts_with(&format!("{}: OK, 4 rules\n", good.display())),
        "{out:?}"
    );
    assert!(
        out.1.contains("  *:9000/tcp -> 172.17.0.2:8080\n"),
        "{out:?}"
    );
    for (name, text, message) in [
        (
            "conflict.toml",
            "[[publish]]\nto = \"172.17.0.2\"\nports = [\"9000:8080\", \"9000:8081\"]\n",
            "conflict.toml:3: entry `9000:8081`: Bind for 0.0.0.0:9000 failed: port is already allocated",
        ),
        (
            "port.toml",
            "[[publish]]\nto = \"172.17.0.2\"\nports = [\"70000:80\"]\n",
            "port.toml:3: entry `70000:80`: invalid port `70000`",
        ),
        ("syntax.toml", "[[publish]\n", "syntax.toml:1: "),
    ] {
        let path = write(name, text);
        let (ok, stdout, stderr) = check(&path);
        assert!(!ok, "{name} passed: {stdout}");
        assert!(stdout.is_empty(), "{name}: {stdout}");
        assert_eq!(stderr.lines().count(), 1, "{name}: {stderr}");
        assert!(
            stderr.starts_with("portfwd: ") && stderr.contains(message),
            "{name}: {stderr}"
        );
    }
    let (ok, _, stderr) = check(&dir.path().join("missing.toml"));
    assert!(!ok);
    assert!(stderr.contains("cannot read"), "{stderr}");
}

/// `portfwd --check-config PATH`: (success, stdout, stderr).
fn check(path: &Path) -> (bool, String, String) {
    let out = Command::new(bins::bin(bins::PORTFWD))
        .arg("--check-config")
        .arg(path)
        .output()
        .expect("run portfwd");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn unit_file_verifies() {
    let Some(analyze) = require_tool("unit_file_verifies", "systemd-analyze") else {
        return;
    };
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/portfwd.service");
    let text = std::fs::read_to_string(&unit).expect("dist/portfwd.service");
    assert!(text.contains("\nType=notify\n"), "{text}");
    assert!(
        text.contains("\nExecReload=/bin/kill -HUP $MAINPID\n"),
        "{text}"
    );
    // verify checks that ExecStart's binary exists: point it at the built one.
    let dir = portfwd_tests::tmp::TempDir::new("pft-ounit");
    let copy = dir.path().join("portfwd.service");
    let built = bins::bin(bins::PORTFWD).display().to_string();
    std::fs::write(&copy, text.replace("/usr/local/bin/portfwd", &built)).expect("write");
    let out = Command::new(&analyze)
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("run systemd-analyze");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // And it fails on a unit whose binary is missing: the check is real.
    let broken = dir.path().join("broken.service");
    std::fs::write(
        &broken,
        text.replace("/usr/local/bin/portfwd", "/nonexistent/portfwd"),
    )
    .expect("write");
    let out = Command::new(&analyze)
        .arg("verify")
        .arg(&broken)
        .output()
        .expect("run systemd-analyze");
    assert!(
        !out.status.success(),
        "verify passed a unit without its binary"
    );
}

/// A topology with the daemon on TC ingress serving metrics, or `None` when skipped.
fn setup(test: &str, tag: &str) -> Option<Topology> {
    if !require_root(test) {
        return None;
    }
    let mut topo = Topology::new(tag);
    topo.start_daemon_with(&["--ingress", "tc", "--metrics", METRICS]);
    Some(topo)
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}
