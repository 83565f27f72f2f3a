//! Podman publishing through portfwd (issue #10): Debian's podman 4.3 with its CNI
//! backend runs in the test topology's host namespace, its network's conflist chaining
//! `bridge` + `host-local` with the built `portfwd-cni` in place of `portmap`, so every
//! `podman run -p` becomes a portfwd rule owned by `cni:<container id>/eth0`.
//!
//! podman gets its own `containers.conf` (runc, cgroupfs, the file events logger,
//! `default_ulimits`, the CNI backend with this test's plugin and config directories),
//! its own `--root/--runroot/--tmpdir` (vfs storage), and a bridge (`cni-pf0`,
//! 198.18.6.0/24, no IP masquerade: no iptables rule) whose `host-local` state is in the
//! test's directory. It runs inside the portfwd daemon's cgroup, where conmon, which
//! binds the published host ports after CNI ADD, stays (cgroupfs): the daemon's bind
//! hooks see that reservation and let it through, as they would with the daemon's
//! default cgroup (the cgroup2 root).
//!
//! The image is a rootfs of Debian's static busybox (`sh`) and the harness's
//! `portfwd-testsrv` with its libraries (HTTP that reports the client it saw, UDP echo),
//! imported. Guards remove the containers even when a test panics.
//!
//! Without podman (or the rest) a test is skipped, saying why; under `CI=true` that is a
//! failure.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use portfwd_tests::{
    bins, client,
    netns::describe,
    require_root,
    runtime::{shared_libs, unmount_under},
    topology::{published, Topology, CLIENT_IP, HOST_IP},
};

/// The plugin under test.
const PLUGIN: &str = "portfwd-cni";
/// Debian's static busybox (busybox-static).
const BUSYBOX: &str = "/bin/busybox";
/// The podman network's subnet and gateway (apart from the topology's).
const SUBNET: &str = "198.18.6.0/24";
const GATEWAY: &str = "198.18.6.1";
/// Only to avoid hanging.
const SETTLE: Duration = Duration::from_secs(20);

fn require_podman(test: &str) -> bool {
    if !require_root(test) {
        return false;
    }
    let mut missing: Vec<String> = ["podman", "conmon", "runc", "ldd", "tar"]
        .into_iter()
        .filter(|t| bins::find_in_path(t).is_none())
        .map(String::from)
        .collect();
    for plugin in ["bridge", "host-local"] {
        if !Path::new("/usr/lib/cni").join(plugin).is_file() {
            missing.push(format!(
                "/usr/lib/cni/{plugin} (containernetworking-plugins)"
            ));
        }
    }
    if !Path::new(BUSYBOX).is_file() {
        missing.push(format!("{BUSYBOX} (busybox-static)"));
    }
    if missing.is_empty() {
        return true;
    }
    let why = format!("needs {} (run `cargo xtask setup`)", missing.join(", "));
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: {why}; CI=true, so this is a failure, not a skip");
    }
    eprintln!("SKIPPED {test}: {why}");
    false
}

/// A podman of the test's own, run in `ns` inside the portfwd daemon's cgroup. On drop
/// every container is removed (their CNI DEL runs) and what storage mounted is undone.
struct Podman {
    ns_dir: PathBuf,
    dir: PathBuf,
    procs: PathBuf,
    ns: String,
}

impl Podman {
    fn start(topo: &Topology) -> Self {
        let dir = topo.dir().join("podman");
        for d in ["cni", "plugins", "tmp"] {
            std::fs::create_dir_all(dir.join(d)).expect("podman dir");
        }
        std::os::unix::fs::symlink(bins::bin(PLUGIN), dir.join("plugins").join(PLUGIN))
            .expect("plugin link");
        let conf = format!(
            r#"[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{dir}/events.log"
[network]
network_backend = "cni"
cni_plugin_dirs = ["{dir}/plugins", "/usr/lib/cni"]
network_config_dir = "{dir}/cni"
default_network = "podman"
"#,
            dir = dir.display()
        );
        std::fs::write(dir.join("containers.conf"), conf).expect("containers.conf");
        // What the README shows, with this test's socket, bridge and state directory.
        let conflist = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": "podman",
            "plugins": [
                {
                    "type": "bridge", "bridge": "cni-pf0", "isGateway": true,
                    "ipMasq": false, "hairpinMode": true,
                    "ipam": {
                        "type": "host-local", "dataDir": dir.join("ipam"),
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "ranges": [[{"subnet": SUBNET, "gateway": GATEWAY}]]
                    }
                },
                {
                    "type": PLUGIN, "capabilities": {"portMappings": true},
                    "socket": topo.daemon().socket()
                }
            ]
        });
        std::fs::write(dir.join("cni/podman.conflist"), conflist.to_string()).expect("conflist");
        let p = Self {
            ns_dir: topo.host.path(),
            procs: topo.daemon().cgroup().path().join("cgroup.procs"),
            ns: topo.host.name().to_string(),
            dir,
        };
        p.import_image();
        p
    }

    /// `podman ARGS...` in the namespace and the daemon's cgroup.
    fn podman(&self, args: &[&str]) -> Output {
        let dir = self.dir.display();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.ns_dir.display()))
            .arg("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > '{}' && exec podman --root '{dir}/root' --runroot '{dir}/runroot' \
                 --tmpdir '{dir}/tmp' --storage-driver vfs \"$@\"",
                self.procs.display()
            ))
            .arg("podman")
            .args(args)
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .stdin(Stdio::null());
        cmd.output()
            .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", describe(&cmd)))
    }

    /// `podman ARGS...`, asserting success; stdout.
    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        let out = self.podman(args);
        assert!(
            out.status.success(),
            "podman {args:?} in {} failed ({}): {}{}",
            self.ns,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Imports `busybox:test`: busybox's `sh` and the test server with its libraries.
    fn import_image(&self) {
        let root = self.dir.join("rootfs");
        std::fs::create_dir_all(root.join("bin")).expect("rootfs");
        std::fs::copy(BUSYBOX, root.join("bin/busybox")).expect("copy busybox");
        std::os::unix::fs::symlink("busybox", root.join("bin/sh")).expect("sh link");
        let srv = bins::bin(bins::TESTSRV);
        std::fs::copy(&srv, root.join("bin/testsrv")).expect("copy testsrv");
        for lib in shared_libs(&srv) {
            let to = root.join(lib.strip_prefix("/").expect("absolute"));
            std::fs::create_dir_all(to.parent().expect("lib dir")).expect("lib dir");
            std::fs::copy(&lib, &to).expect("copy library");
        }
        let tar = self.dir.join("rootfs.tar");
        let out = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .output()
            .expect("run tar");
        assert!(
            out.status.success(),
            "tar: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.ok(&["import", &tar.display().to_string(), "busybox:test"]);
    }

    /// `podman run -d --name NAME -p PUBLISH... busybox:test` serving HTTP on 8080 with
    /// body NAME and UDP echo on 5353; with `range`, HTTP also on 8100-8102.
    fn run(&self, name: &str, publish: &[&str], range: bool) -> Output {
        let mut args = vec!["run", "-d", "--name", name];
        for p in publish {
            args.extend(["-p", p]);
        }
        let mut script = String::new();
        if range {
            for port in 8100..=8102 {
                script += &format!("testsrv --http 0.0.0.0:{port} --body {name}-{port} & ");
            }
        }
        script += &format!("exec testsrv --http 0.0.0.0:8080 --udp 0.0.0.0:5353 --body {name}");
        args.extend(["busybox:test", "sh", "-c", &script]);
        self.podman(&args)
    }

    /// The container's address on the podman network.
    fn ip(&self, name: &str) -> String {
        self.ok(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", name])
    }

    /// The container's full id.
    fn id(&self, name: &str) -> String {
        self.ok(&["inspect", "-f", "{{.Id}}", name])
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.podman(&["rm", "-af", "-t", "0"]);
        unmount_under(&self.dir);
    }
}

/// A Podman test's world; podman's containers go first (field order), while the daemon
/// and the namespace are still there.
struct Env {
    podman: Podman,
    topo: Topology,
}

fn setup(test: &str, tag: &str) -> Option<Env> {
    if !require_podman(test) {
        return None;
    }
    let mut topo = Topology::new(tag);
    topo.start_daemon("tc");
    let podman = Podman::start(&topo);
    Some(Env { podman, topo })
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

/// GET / through the published `port` from the client: the body, checking that the
/// container saw the client's own address.
#[track_caller]
fn get(topo: &Topology, port: u16) -> String {
    let r = topo.get_published(port);
    assert_eq!(
        r.peer_seen().ip(),
        CLIENT_IP,
        "the container sees the client"
    );
    r.body_text()
}

/// Waits until `cond` holds (podman's DEL on stop runs in the cleanup process).
#[track_caller]
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + SETTLE;
    while !cond() {
        assert!(Instant::now() < deadline, "{what} within {SETTLE:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn owner(p: &Podman, name: &str) -> String {
    format!("cni:{}/eth0", p.id(name))
}

#[test]
fn podman_run_publishes_tcp_udp_host_ip_and_ranges() {
    let Some(env) = setup("podman_run_publishes_tcp_udp_host_ip_and_ranges", "pdr") else {
        return;
    };
    let (p, topo) = (&env.podman, &env.topo);
    let publish = [
        "9000:8080",
        "9053:5353/udp",
        &format!("{HOST_IP}:9001:8080"),
        "127.0.0.1:9002:8080",
        "9100-9102:8100-8102",
    ];
    let out = p.run("web1", &publish, true);
    assert!(
        out.status.success(),
        "podman run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (o, ip) = (owner(p, "web1"), p.ip("web1"));
    let rule = |host: &str, port: u64, proto: &str, bport: u64| {
        (
            o.clone(),
            host.to_string(),
            port,
            proto.to_string(),
            ip.clone(),
            bport,
        )
    };
    let want = vec![
        rule("*", 9000, "tcp", 8080),
        rule("*", 9053, "udp", 5353),
        rule("*", 9100, "tcp", 8100),
        rule("*", 9101, "tcp", 8101),
        rule("*", 9102, "tcp", 8102),
        rule("127.0.0.1", 9002, "tcp", 8080),
        rule(&HOST_IP.to_string(), 9001, "tcp", 8080),
    ];
    let mut want = want;
    want.sort();
    assert_eq!(rules(topo), want);

    // Remote clients, with their own address, over TCP, UDP, a host IP and the range.
    assert_eq!(get(topo, 9000), "web1");
    assert_eq!(get(topo, 9001), "web1");
    for port in 9100..=9102u16 {
        assert_eq!(get(topo, port), format!("web1-{}", port - 1000));
    }
    let echo = client::udp_echo(&topo.client, published(9053), b"hi").expect("UDP echo");
    assert_eq!(echo.peer_seen.ip(), CLIENT_IP);
    assert_eq!(echo.from, std::net::SocketAddr::from(published(9053)));
    // 127.0.0.1:9002 is the host's alone: not remotely, but from the host.
    assert!(client::get(&topo.client, published(9002), "/").is_err());
    let (ok, v) = topo.testcli(&topo.host, true, &["tcp", "127.0.0.1:9002"]);
    assert!(ok && v["body"] == "web1", "local 127.0.0.1:9002: {v}");
    // conmon holds the ports (its reservation), and receives nothing: a local client
    // too reaches the container.
    let (ok, v) = topo.testcli(&topo.host, true, &["tcp", &format!("{HOST_IP}:9000")]);
    assert!(ok && v["body"] == "web1", "local {HOST_IP}:9000: {v}");
    let ss = topo.host.exec_ok("ss", &["-Htlnp", "sport = :9000"]);
    assert!(
        ss.contains("conmon"),
        "conmon's reservation of 9000: {ss:?}"
    );

    // `podman network reload` re-runs ADD while conmon holds the ports.
    p.ok(&["network", "reload", "web1"]);
    assert_eq!(rules(topo), want);
    assert_eq!(get(topo, 9000), "web1");

    // A duplicate port fails the second container and leaves the first one's rule.
    let dup = p.run("web2", &["9000:8080"], false);
    assert!(!dup.status.success(), "a duplicate port must fail");
    let err = String::from_utf8_lossy(&dup.stderr);
    assert!(err.contains("portfwd-cni") && err.contains("9000"), "{err}");
    assert_eq!(rules(topo), want);
    assert_eq!(get(topo, 9000), "web1");
}

#[test]
fn podman_stop_rm_and_restart_follow() {
    let Some(env) = setup("podman_stop_rm_and_restart_follow", "pds") else {
        return;
    };
    let (p, topo) = (&env.podman, &env.topo);
    let out = p.run("web1", &["9000:8080"], false);
    assert!(
        out.status.success(),
        "podman run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = p.ip("web1");
    assert_eq!(get(topo, 9000), "web1");

    // stop: CNI DEL removes the rule; start: published again.
    p.ok(&["stop", "-t", "1", "web1"]);
    eventually("the rule is removed on stop", || rules(topo).is_empty());
    p.ok(&["start", "web1"]);
    eventually("the rule is back on start", || rules(topo).len() == 1);
    assert_eq!(get(topo, 9000), "web1");

    // rm -f: gone; a new container on the port gets another address (host-local
    // allocates round-robin), and the rule follows it.
    p.ok(&["rm", "-f", "-t", "0", "web1"]);
    eventually("the rule is removed on rm -f", || rules(topo).is_empty());
    let out = p.run("web3", &["9000:8080"], false);
    assert!(
        out.status.success(),
        "podman run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = p.ip("web3");
    assert_ne!(first, again, "a new address");
    let r = rules(topo);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!((r[0].0.clone(), r[0].4.clone()), (owner(p, "web3"), again));
    assert_eq!(get(topo, 9000), "web3");

    // restart: DEL and ADD again.
    p.ok(&["restart", "-t", "1", "web3"]);
    eventually("the rule is back after restart", || rules(topo).len() == 1);
    assert_eq!(get(topo, 9000), "web3");
}
