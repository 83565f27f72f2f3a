//! `portfwd-cni` driven the way a CNI runtime drives it (issue #10): `CNI_*` variables
//! and the network config on stdin, against a real portfwd daemon in the test topology,
//! with real traffic from the client namespace to the topology's two containers
//! (198.18.1.2 and .3, whose servers name the client they saw). No runtime: podman's
//! use of the plugin is `podman.rs`.
//!
//! Also here: a runtime's reservation. The plugin's rules are `reservation_ok`, so a
//! process in the host namespace (podman's conmon) may bind the published port, and
//! clients, remote or local, still reach the container and never that idle socket;
//! a plain rule keeps refusing such binds.

use std::{
    io::Write,
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use portfwd_tests::{
    bins, client,
    process::ChildGuard,
    topology::{body, published, Topology, CLIENT_IP, CONTAINER_IPS, HOST_IP},
};
use serde_json::{json, Value};

const PLUGIN: &str = "portfwd-cni";

/// What the plugin printed and whether it exited 0.
struct Run {
    ok: bool,
    out: Value,
}

/// Runs the plugin: `command` for container `id` (interface eth0) with `stdin`.
fn cni(command: &str, id: &str, stdin: &[u8]) -> Run {
    let mut cmd = Command::new(bins::bin(PLUGIN));
    cmd.env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_NETNS", "/var/run/netns/unused")
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run portfwd-cni");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("write the config");
    let out = child.wait_with_output().expect("portfwd-cni output");
    let text = String::from_utf8_lossy(&out.stdout);
    let value = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(text.trim()).unwrap_or_else(|e| {
            panic!(
                "{command} {id}: stdout is not JSON ({e}): {text:?}; stderr {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    };
    Run {
        ok: out.status.success(),
        out: value,
    }
}

/// A `bridge` + `host-local` result for a container at `ip`.
fn prev_result(version: &str, ip: &str) -> Value {
    json!({
        "cniVersion": version,
        "interfaces": [
            {"name": "cni0", "mac": "02:00:00:00:00:01"},
            {"name": "veth1", "mac": "02:00:00:00:00:02"},
            {"name": "eth0", "mac": "02:00:00:00:00:03", "sandbox": "/var/run/netns/unused"}
        ],
        "ips": [{"address": format!("{ip}/24"), "gateway": "198.18.1.1", "interface": 2}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {}
    })
}

/// The network config the runtime passes: the conflist's portfwd-cni entry, its
/// mappings and the previous plugin's result.
fn config(topo: &Topology, version: &str, ip: &str, mappings: Value) -> Vec<u8> {
    json!({
        "cniVersion": version,
        "name": "podman",
        "type": "portfwd-cni",
        "capabilities": {"portMappings": true},
        "socket": topo.daemon().socket(),
        "runtimeConfig": {"portMappings": mappings},
        "prevResult": prev_result(version, ip)
    })
    .to_string()
    .into_bytes()
}

fn mapping(host_port: u16, container_port: u16, proto: &str) -> Value {
    json!({"hostPort": host_port, "containerPort": container_port, "protocol": proto, "hostIP": ""})
}

/// `(owner, host, port, proto, backend, backend port)` of every rule, sorted.
fn rules(topo: &Topology) -> Vec<(String, String, u64, String, String, u64)> {
    let list = topo.daemon().list_json();
    let mut v: Vec<_> = list["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .map(|r| {
            (
                r["owner"].as_str().unwrap_or("-").to_string(),
                r["host_ip"].as_str().unwrap_or_default().to_string(),
                r["host_port"].as_u64().unwrap_or_default(),
                r["proto"].as_str().unwrap_or_default().to_string(),
                r["backend_ip"].as_str().unwrap_or_default().to_string(),
                r["backend_port"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    v.sort();
    v
}

fn rule(
    owner: &str,
    port: u64,
    proto: &str,
    backend: usize,
    bport: u64,
) -> (String, String, u64, String, String, u64) {
    (
        owner.to_string(),
        "*".to_string(),
        port,
        proto.to_string(),
        CONTAINER_IPS[backend].to_string(),
        bport,
    )
}

#[track_caller]
fn assert_cni_error(run: &Run, code: u64, what: &str) {
    assert!(!run.ok, "{what}: exit 0: {}", run.out);
    assert_eq!(run.out["code"], code, "{what}: {}", run.out);
    assert!(
        run.out["msg"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {}",
        run.out
    );
    assert!(run.out["cniVersion"].is_string(), "{what}: {}", run.out);
}

#[test]
fn cni_plugin_add_check_del_version() {
    let Some(topo) = Topology::with_daemon("cni_plugin_add_check_del_version", "cni", "tc") else {
        return;
    };
    let (c1, c2) = (CONTAINER_IPS[0].to_string(), CONTAINER_IPS[1].to_string());
    let o1 = "cni:ctr1/eth0";

    // VERSION.
    let v = cni("VERSION", "x", br#"{"cniVersion":"1.0.0"}"#);
    assert!(v.ok, "{}", v.out);
    let versions = v.out["supportedVersions"].as_array().expect("versions");
    for want in ["0.4.0", "1.0.0"] {
        assert!(versions.iter().any(|s| s == want), "{}", v.out);
    }

    // ADD: prevResult comes back unchanged; TCP and UDP published to the container.
    let maps1 = json!([mapping(9000, 8080, "tcp"), mapping(9053, 5353, "udp")]);
    let conf1 = config(&topo, "1.0.0", &c1, maps1.clone());
    let add = cni("ADD", "ctr1", &conf1);
    assert!(add.ok, "ADD: {}", add.out);
    assert_eq!(add.out, prev_result("1.0.0", &c1));
    let want1 = vec![
        rule(o1, 9000, "tcp", 0, 8080),
        rule(o1, 9053, "udp", 0, 5353),
    ];
    assert_eq!(rules(&topo), want1);
    let r = topo.get_published(9000);
    assert_eq!(r.body_text(), body(0));
    assert_eq!(
        r.peer_seen().ip(),
        CLIENT_IP,
        "the container sees the client"
    );
    let echo = client::udp_echo(&topo.client, published(9053), b"hi").expect("UDP echo");
    assert_eq!(echo.peer_seen.ip(), CLIENT_IP);
    assert_eq!(echo.from, SocketAddr::from(published(9053)));

    // CHECK passes; ADD again (a network reload) replaces the rules with the same.
    let check = cni("CHECK", "ctr1", &conf1);
    assert!(check.ok, "CHECK: {}", check.out);
    assert!(cni("ADD", "ctr1", &conf1).ok);
    assert_eq!(rules(&topo), want1);

    // A second container on a taken port fails whole; the first keeps its rules.
    let conf2 = config(
        &topo,
        "0.4.0",
        &c2,
        json!([mapping(9001, 8080, "tcp"), mapping(9000, 8080, "tcp")]),
    );
    let dup = cni("ADD", "ctr2", &conf2);
    assert_cni_error(&dup, 100, "duplicate port");
    assert_eq!(dup.out["cniVersion"], "0.4.0");
    assert!(
        dup.out["details"]
            .as_str()
            .is_some_and(|d| d.contains("9000")),
        "{}",
        dup.out
    );
    assert_eq!(rules(&topo), want1, "nothing of ctr2's left, ctr1's kept");
    // The runtime then runs DEL for it: ctr1's rules stay.
    assert!(cni("DEL", "ctr2", &conf2).ok);
    assert_eq!(rules(&topo), want1);
    assert_eq!(topo.get_published(9000).body_text(), body(0));

    // Bad input: a CNI error and nothing changed.
    assert_cni_error(
        &cni("ADD", "ctr2", b"{\"cniVersion\": \"1.0.0\", "),
        6,
        "malformed stdin",
    );
    assert_cni_error(&cni("DEL", "ctr1", b"not json"), 6, "malformed DEL");
    assert_cni_error(&cni("ADD", "ctr2", b"[]"), 6, "not an object");
    let mut future = serde_json::from_slice::<Value>(&conf2).expect("json");
    future["cniVersion"] = "9.9.9".into();
    assert_cni_error(
        &cni("ADD", "ctr2", future.to_string().as_bytes()),
        1,
        "unknown version",
    );
    let bad_port = config(&topo, "1.0.0", &c2, json!([mapping(9002, 8080, "sctp")]));
    assert_cni_error(&cni("ADD", "ctr2", &bad_port), 7, "sctp");
    let mut unchained = serde_json::from_slice::<Value>(&conf2).expect("json");
    unchained
        .as_object_mut()
        .expect("object")
        .remove("prevResult");
    assert_cni_error(
        &cni("ADD", "ctr2", unchained.to_string().as_bytes()),
        7,
        "not chained",
    );
    let no_env = Command::new(bins::bin(PLUGIN))
        .env_clear()
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert!(!no_env.status.success());
    let err: Value = serde_json::from_slice(&no_env.stdout).expect("CNI error JSON");
    assert_eq!(err["code"], 4, "{err}");
    assert_eq!(rules(&topo), want1, "bad input changed nothing");

    // CHECK reports a rule removed behind the plugin's back.
    topo.daemon().del("*:9053/udp");
    let check = cni("CHECK", "ctr1", &conf1);
    assert_cni_error(&check, 101, "missing rule");
    assert!(
        check.out["msg"]
            .as_str()
            .is_some_and(|m| m.contains("9053")),
        "{}",
        check.out
    );

    // DEL removes exactly ctr1's rules, and again is still fine.
    topo.daemon().add("9100", &format!("{c2}:8080"));
    assert!(cni("DEL", "ctr1", &conf1).ok);
    assert_eq!(
        rules(&topo),
        vec![("-".into(), "*".into(), 9100, "tcp".into(), c2.clone(), 8080)]
    );
    assert!(cni("DEL", "ctr1", &conf1).ok, "DEL is idempotent");
    // DEL with no daemon: nothing to remove.
    let mut gone = serde_json::from_slice::<Value>(&conf1).expect("json");
    gone["socket"] = "/nonexistent/portfwd.sock".into();
    assert!(cni("DEL", "ctr1", gone.to_string().as_bytes()).ok);
    // ADD with no daemon: try again later.
    assert_cni_error(
        &cni("ADD", "ctr1", gone.to_string().as_bytes()),
        11,
        "no daemon",
    );
}

/// A runtime's reservation (conmon's idle socket on the published port) neither blocks
/// the plugin's ADD nor is refused; remote and local clients reach the container, never
/// that socket. A plain rule still refuses the bind.
#[test]
fn cni_rules_let_the_runtime_reserve_its_ports() {
    let Some(topo) =
        Topology::with_daemon("cni_rules_let_the_runtime_reserve_its_ports", "cnr", "tc")
    else {
        return;
    };
    let c1 = CONTAINER_IPS[0].to_string();
    let conf = config(
        &topo,
        "1.0.0",
        &c1,
        json!([mapping(9000, 8080, "tcp"), mapping(9053, 5353, "udp")]),
    );
    assert!(cni("ADD", "ctr1", &conf).ok);

    // conmon's reservation: processes in the daemon's cgroup (where the bind hooks
    // run) bind both published ports: a server that would answer TCP with its own body,
    // and a UDP socket that records whatever reaches it.
    let procs = topo.daemon().cgroup().path().join("cgroup.procs");
    let in_cgroup = |name: &str, program: &str, args: &[&str]| {
        let mut cmd = topo.host.command("sh");
        cmd.arg("-c")
            .arg(format!(
                "echo $$ > '{}' && exec \"$0\" \"$@\"",
                procs.display()
            ))
            .arg(program)
            .args(args);
        (name.to_string(), cmd)
    };
    let srv = bins::bin(bins::TESTSRV).display().to_string();
    let (name, mut cmd) = in_cgroup(
        "reservation",
        &srv,
        &["--http", "0.0.0.0:9000", "--body", "the reservation"],
    );
    let _tcp = ChildGuard::spawn_until_line(&name, &mut cmd, "ready", Duration::from_secs(10));
    let udp_log = topo.dir().join("udp-reservation.log");
    let sink = format!("OPEN:{},creat,append", udp_log.display());
    let (name, mut cmd) = in_cgroup("udp reservation", "socat", &["-u", "UDP-RECV:9053", &sink]);
    let mut udp = ChildGuard::spawn(&name, &mut cmd);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !topo
        .host
        .exec_ok("ss", &["-Hunl", "sport = :9053"])
        .contains("9053")
    {
        if let Some(status) = udp.try_wait() {
            panic!("the UDP reservation's bind failed: socat exited ({status})");
        }
        assert!(Instant::now() < deadline, "socat did not bind 9053/udp");
        std::thread::sleep(Duration::from_millis(50));
    }

    // ADD again while they are held (podman network reload): accepted.
    let again = cni("ADD", "ctr1", &conf);
    assert!(again.ok, "re-ADD with the ports reserved: {}", again.out);

    // Remote clients reach the container, not the reservation.
    let r = topo.get_published(9000);
    assert_eq!(r.body_text(), body(0));
    assert_eq!(r.peer_seen().ip(), CLIENT_IP);
    let echo = client::udp_echo(&topo.client, published(9053), b"hi").expect("UDP echo");
    assert_eq!(echo.peer_seen.ip(), CLIENT_IP);
    assert_eq!(echo.payload, b"hi");
    // Local clients (host namespace, the daemon's cgroup) too.
    topo.local_get(&topo.host, &format!("{HOST_IP}:9000"), 0);
    topo.local_get(&topo.host, "127.0.0.1:9000", 0);
    let (ok, v) = topo.testcli(&topo.host, true, &["udp", &format!("{HOST_IP}:9053"), "hi"]);
    assert!(ok, "local UDP: {v}");
    let seen = std::fs::read(&udp_log).unwrap_or_default();
    assert!(
        seen.is_empty(),
        "datagrams reached the reservation: {seen:?}"
    );

    // A plain rule keeps local processes off its port.
    topo.daemon().add("9001", &format!("{c1}:8080"));
    let (_, v) = topo.testcli(&topo.host, true, &["bind", "tcp", "0.0.0.0:9001"]);
    assert_eq!(v["bind"], "error", "a plain rule's port: {v}");
    assert_eq!(v["errno"], libc::EPERM, "a plain rule's port: {v}");

    assert!(cni("DEL", "ctr1", &conf).ok);
    assert_eq!(topo.daemon().rules().len(), 1);
}
