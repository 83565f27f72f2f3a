//! Docker publishing through portfwd (issue #10): a real dockerd (Debian's docker.io,
//! with its own containerd and runc) runs in the test topology's host namespace with
//! `--userland-proxy-path` pointing at the built `portfwd-docker-proxy`, so every
//! `docker run -p` becomes a portfwd rule and no process listens on the published port.
//!
//! dockerd gets its own data root, exec root, API socket, pid file, config file and
//! bridge (`--bip` in 198.18.0.0/15), and `--iptables=false --ip6tables=false`, so it
//! touches nothing outside the test's namespace and directory. The image is a busybox
//! rootfs made from the static busybox of Debian's `busybox-static` (httpd serves TCP),
//! plus the harness's `portfwd-testsrv` and its libraries (busybox has no UDP server),
//! imported. Guards
//! remove the containers, stop dockerd (which stops its containerd) and unmount what it
//! left, even when a test panics.
//!
//! A restarted portfwd daemon gets the containers' rules back from their proxies.
//!
//! The proxy's other contract, dockerd 28's (`-use-listen-fd`, its socket on fd 4), is
//! tested by starting the proxy the way such a dockerd does.
//!
//! Without dockerd (or the rest) a test is skipped, saying why; under `CI=true` that is
//! a failure.

use std::{
    io::{Read, Write},
    net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use portfwd_tests::{
    bins,
    netns::{describe, Netns},
    process::ChildGuard,
    require_root,
    runtime::{shared_libs, unmount_under},
    topology::{backend, body, Topology, CLIENT_IP, CONTAINER_IPS, HOST_IFACE, HOST_IP},
};

/// The proxy binary under test.
const PROXY: &str = "portfwd-docker-proxy";
/// dockerd's bridge, apart from the topology's 198.18.1.0/24.
const DOCKER_BIP: &str = "198.18.4.1/24";
/// The client's and host's IPv6 addresses on the client link (RFC 5180).
const HOST_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
/// Generous limits, only to avoid hanging.
const DOCKERD_START: Duration = Duration::from_secs(60);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// What the Docker tests need besides root: dockerd, the docker client, containerd, runc
/// and a statically linked busybox. Missing: skipped, or a failure under `CI=true`.
fn require_docker(test: &str) -> bool {
    if !require_root(test) {
        return false;
    }
    let mut missing: Vec<String> = ["dockerd", "containerd", "runc", "ss"]
        .into_iter()
        .filter(|t| bins::find_in_path(t).is_none())
        .map(String::from)
        .collect();
    if docker_cli().is_none() {
        missing.push("docker".into());
    }
    if !is_static_elf(Path::new(BUSYBOX)) {
        missing.push(format!("a static {BUSYBOX} (busybox-static)"));
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

/// Debian's docker client; another `docker` may come first in PATH.
fn docker_cli() -> Option<PathBuf> {
    let debian = PathBuf::from("/usr/bin/docker");
    if debian.is_file() {
        Some(debian)
    } else {
        bins::find_in_path("docker")
    }
}

const BUSYBOX: &str = "/bin/busybox";

/// Whether `path` is an ELF executable without a program interpreter (statically
/// linked), so it runs in a rootfs that holds nothing else.
fn is_static_elf(path: &Path) -> bool {
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    // ELF64, little endian: e_phoff at 0x20, e_phentsize at 0x36, e_phnum at 0x38.
    if bytes.get(..6) != Some(b"\x7fELF\x02\x01") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    const PT_INTERP: u16 = 3;
    (0..usize::from(phnum)).all(|i| {
        let at = usize::try_from(phoff).unwrap_or(usize::MAX) + i * usize::from(phentsize);
        u16_at(at).is_some_and(|p_type| p_type != PT_INTERP)
    })
}

/// A dockerd of the test's own in `ns`, its proxies talking to the portfwd daemon at
/// `portfwd_socket`. On drop: every container removed, dockerd stopped (it stops its
/// containerd), and mounts it left under its directories undone.
struct Dockerd {
    child: Option<ChildGuard>,
    dir: PathBuf,
    api: PathBuf,
}

impl Dockerd {
    fn start(ns: &Netns, dir: &Path, portfwd_socket: &Path) -> Self {
        let dir = dir.join("docker");
        std::fs::create_dir_all(dir.join("cli")).expect("docker dir");
        std::fs::write(dir.join("daemon.json"), "{}\n").expect("daemon.json");
        let api = dir.join("docker.sock");
        let mut d = Self {
            child: None,
            dir,
            api,
        };
        d.launch(ns, portfwd_socket);
        d.import_busybox();
        d
    }

    /// Starts dockerd on this data root, exec root and API socket (the first time, or
    /// again after [`Dockerd::signal`] ended it) and waits until it answers; its log is
    /// appended to.
    fn launch(&mut self, ns: &Netns, portfwd_socket: &Path) {
        assert!(self.child.is_none(), "dockerd is running already");
        let dir = &self.dir;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("dockerd.log"))
            .expect("dockerd log");
        let mut cmd = ns.command("dockerd");
        cmd.arg("--config-file")
            .arg(dir.join("daemon.json"))
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("-H")
            .arg(format!("unix://{}", self.api.display()))
            .arg("--pidfile")
            .arg(dir.join("docker.pid"))
            .args(["--bip", DOCKER_BIP, "--iptables=false", "--ip6tables=false"])
            .args(["--userland-proxy=true", "--userland-proxy-path"])
            .arg(bins::bin(PROXY))
            // dockerd's environment is its proxies' environment.
            .env("PORTFWD_SOCKET", portfwd_socket)
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        self.child = Some(ChildGuard::spawn("dockerd", &mut cmd));
        let deadline = Instant::now() + DOCKERD_START;
        while !self.docker(&["version"]).status.success() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait()) {
                panic!("dockerd exited during start-up ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "dockerd did not answer within {DOCKERD_START:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Sends `sig` to dockerd and waits (up to `timeout`) for it to exit: SIGTERM is
    /// systemd's stop, SIGKILL a crash. Its containerd and containers may outlive it.
    fn signal(&mut self, sig: libc::c_int, timeout: Duration) {
        let mut child = self.child.take().expect("dockerd runs");
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child's.
        unsafe { libc::kill(child.id() as i32, sig) };
        let status = child.wait_timeout(timeout);
        assert!(
            status.is_some(),
            "dockerd did not exit within {timeout:?} of signal {sig}:\n{}",
            self.log()
        );
        // The containerd it started ends with it (it cannot log any more); a dockerd
        // started while that one is still there waits for it in vain. systemd too waits
        // before it starts dockerd again.
        let pidfile = self.dir.join("exec/containerd/containerd.pid");
        let Some(pid) = std::fs::read_to_string(pidfile)
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
        else {
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Path::new(&format!("/proc/{pid}")).exists() {
            assert!(
                Instant::now() < deadline,
                "dockerd's containerd ({pid}) outlived it by 20 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
    }

    /// `docker -H <ours> ARGS...`.
    fn docker(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(docker_cli().expect("docker client"));
        cmd.arg("-H")
            .arg(format!("unix://{}", self.api.display()))
            .args(args)
            .env("DOCKER_CONFIG", self.dir.join("cli"))
            .stdin(Stdio::null());
        cmd.output()
            .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", describe(&cmd)))
    }

    /// `docker ARGS...`, asserting success; stdout.
    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {args:?} failed ({}): {}{}\ndockerd log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Imports `busybox:test`: a rootfs with the static busybox, its applets and a page.
    fn import_busybox(&self) {
        let root = self.dir.join("rootfs");
        for d in ["bin", "www"] {
            std::fs::create_dir_all(root.join(d)).expect("rootfs dir");
        }
        std::fs::copy(BUSYBOX, root.join("bin/busybox")).expect("copy busybox");
        for applet in ["sh", "httpd"] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))
                .expect("applet link");
        }
        std::fs::write(root.join("www/index.html"), "hello from docker\n").expect("page");
        // busybox has no UDP server: the harness's test server (UDP echo that names the
        // peer it saw), with the shared libraries it links.
        let srv = bins::bin(bins::TESTSRV);
        std::fs::copy(&srv, root.join("bin/testsrv")).expect("copy testsrv");
        for lib in shared_libs(&srv) {
            let to = root.join(lib.strip_prefix("/").expect("absolute"));
            std::fs::create_dir_all(to.parent().expect("lib dir")).expect("lib dir");
            std::fs::copy(&lib, &to).expect("copy library");
        }
        let tar = self.dir.join("rootfs.tar");
        netns_free_ok(
            Command::new("tar")
                .arg("-C")
                .arg(&root)
                .arg("-cf")
                .arg(&tar)
                .arg("."),
        );
        self.ok(&["import", &tar.display().to_string(), "busybox:test"]);
    }

    /// `docker run -d --name NAME -p PUBLISH... busybox:test httpd ...` serving the page on
    /// `ports` (busybox httpd: `-vv` logs each client's address; it ignores SIGTERM, so
    /// stops use `-t 1`).
    fn run_web(&self, name: &str, publish: &[&str], ports: &[u16]) -> Output {
        let mut args = vec!["run", "-d", "--name", name];
        for p in publish {
            // Other `docker run` options (`--network=...`) pass as they are.
            if p.starts_with("--") {
                args.push(p);
            } else {
                args.extend(["-p", p]);
            }
        }
        args.push("busybox:test");
        let script: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, p)| {
                // The last one in the foreground keeps the container alive.
                let fg = if i + 1 == ports.len() { " -f" } else { "" };
                format!("httpd{fg} -vv -p {p} -h /www")
            })
            .collect();
        let script = script.join("; ");
        args.extend(["sh", "-c", &script]);
        self.docker(&args)
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // Containers first (SIGKILL: busybox httpd ignores SIGTERM), so dockerd's
        // shutdown does not wait for them and their proxies unpublish.
        let ids = self.docker(&["ps", "-aq"]);
        let ids = String::from_utf8_lossy(&ids.stdout).to_string();
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids);
            let _ = self.docker(&args);
        }
        if let Some(mut child) = self.child.take() {
            if child.terminate(Duration::from_secs(20)).is_none() {
                eprintln!("dockerd ignored SIGTERM for 20 s; killing it");
            }
            drop(child);
        }
        // A dockerd killed and not started again leaves its containers running under
        // their shims.
        let tasks = self
            .dir
            .join("exec/containerd/daemon/io.containerd.runtime.v2.task/moby");
        for task in std::fs::read_dir(tasks).into_iter().flatten().flatten() {
            for file in ["init.pid", "shim.pid"] {
                let pid = std::fs::read_to_string(task.path().join(file))
                    .ok()
                    .and_then(|p| p.trim().parse::<i32>().ok());
                if let Some(pid) = pid.filter(|p| *p > 1) {
                    // SAFETY: kill has no memory-safety preconditions; the pid is one our
                    // dockerd's containerd recorded for a container of ours.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        unmount_under(&self.dir);
    }
}

/// Runs a command that needs no namespace, panicking on failure.
fn netns_free_ok(cmd: &mut Command) {
    let out = cmd.stdin(Stdio::null()).output().expect("spawn");
    assert!(
        out.status.success(),
        "`{}` failed: {}",
        describe(cmd),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The topology with IPv6 on the client link, the portfwd daemon on `cli0`, and a
/// dockerd whose proxies talk to it.
/// A Docker test's world; dockerd goes first (field order), while its namespace and the
/// portfwd daemon are still there.
struct Env {
    docker: Dockerd,
    topo: Topology,
}

fn setup(test: &str, tag: &str) -> Option<Env> {
    if !require_docker(test) {
        return None;
    }
    let mut topo = Topology::new(tag);
    topo.host
        .ip(&format!("addr add {HOST_IP6}/64 dev {HOST_IFACE} nodad"));
    topo.client
        .ip(&format!("addr add {CLIENT_IP6}/64 dev eth0 nodad"));
    topo.host.sysctl("net.ipv6.conf.all.forwarding", "1");
    topo.start_daemon("tc");
    let docker = Dockerd::start(&topo.host, topo.dir(), topo.daemon().socket());
    Some(Env { docker, topo })
}

/// `GET /` from inside `ns` to `to`: the body, or the connection error.
fn http_get(ns: &Netns, to: SocketAddr) -> std::io::Result<String> {
    let mut s = ns.run(|| TcpStream::connect_timeout(&to, IO_TIMEOUT))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    Ok(resp
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string()))
}

/// One UDP datagram from inside `ns` to `to`: the reply and where it came from.
fn udp_echo(ns: &Netns, to: SocketAddr, payload: &[u8]) -> (Vec<u8>, SocketAddr) {
    let sock = ns.run(|| UdpSocket::bind("0.0.0.0:0")).expect("UDP socket");
    sock.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    sock.send_to(payload, to).expect("send");
    let mut buf = [0u8; 1500];
    let (n, from) = sock.recv_from(&mut buf).expect("UDP echo reply");
    (buf[..n].to_vec(), from)
}

fn v4(port: u16) -> SocketAddr {
    SocketAddr::new(HOST_IP.into(), port)
}

fn v6(port: u16) -> SocketAddr {
    SocketAddr::new(HOST_IP6.into(), port)
}

/// The published rules as `(host_ip, host_port, proto, backend_ip, backend_port)`, sorted.
fn rules(topo: &Topology) -> Vec<(String, u16, String, String, u16)> {
    let mut v: Vec<_> = topo.daemon().rules().iter().map(|r| r.config()).collect();
    v.sort();
    v
}

/// The distinct owners of the published rules (`list --json`), each rule having one.
fn owners(topo: &Topology) -> std::collections::BTreeSet<String> {
    let list = topo.daemon().list_json();
    list["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .map(|r| {
            r["owner"]
                .as_str()
                .unwrap_or_else(|| panic!("a rule without an owner: {r}"))
                .to_string()
        })
        .collect()
}

/// The container's address on dockerd's bridge.
fn container_ip(docker: &Dockerd, name: &str) -> String {
    docker.ok(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", name])
}

/// Sockets listening on `port` in `ns` (`ss -Hl`), TCP and UDP.
fn listeners(ns: &Netns, port: u16) -> Vec<String> {
    let out = ns.exec_ok("ss", &["-Hlntu"]);
    out.lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(4)
                .is_some_and(|local| local.ends_with(&format!(":{port}")))
        })
        .map(str::to_string)
        .collect()
}

/// The lines of `s`, without empty ones.
fn lines(s: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(s)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn docker_run_publishes_through_portfwd() {
    let Some(mut env) = setup("docker_run_publishes_through_portfwd", "dk") else {
        return;
    };
    let Env { docker, topo } = &mut env;
    let web = "web-a";
    let out = docker.run_web(web, &["9000:8080", "127.0.0.1:9001:8080"], &[8080]);
    assert!(
        out.status.success(),
        "docker run: {out:?}\n{}",
        docker.log()
    );
    let ip = container_ip(docker, web);

    // One rule per family dockerd publishes (0.0.0.0 and ::), each exactly once, and the
    // loopback-only one; nothing listens on the ports.
    let published = vec![
        ("0.0.0.0".into(), 9000, "tcp".into(), ip.clone(), 8080),
        ("127.0.0.1".into(), 9001, "tcp".into(), ip.clone(), 8080),
        ("::".into(), 9000, "tcp".into(), ip.clone(), 8080),
    ];
    assert_eq!(rules(topo), published);
    // Each rule belongs to the proxy that published it (`docker:<pid>`), one per rule.
    let owners = owners(topo);
    assert_eq!(owners.len(), 3, "{owners:?}");
    for o in &owners {
        assert!(o.starts_with("docker:"), "{owners:?}");
    }
    for port in [9000, 9001] {
        assert_eq!(
            listeners(&topo.host, port),
            Vec::<String>::new(),
            "port {port}"
        );
    }

    // Remote clients of both families reach the container; an IPv4 client keeps its
    // address (an IPv6 one is translated, as docker-proxy does).
    let page = "hello from docker\n";
    assert_eq!(http_get(&topo.client, v4(9000)).expect("GET v4"), page);
    assert_eq!(http_get(&topo.client, v6(9000)).expect("GET v6"), page);
    let logs = docker.docker(&["logs", web]);
    let logs =
        String::from_utf8_lossy(&logs.stderr).to_string() + &String::from_utf8_lossy(&logs.stdout);
    assert!(
        logs.contains(&format!("[::ffff:{}]:", CLIENT_IP)),
        "the container did not see the client's address: {logs}"
    );

    // 127.0.0.1:9001: the host's own processes (the daemon's cgroup) reach it, remote
    // clients do not.
    let (ok, local) = topo.testcli(&topo.host, true, &["tcp", "127.0.0.1:9001"]);
    assert!(ok, "local client of 127.0.0.1:9001: {local}");
    assert_eq!(local["body"], page, "local client of 127.0.0.1:9001");
    assert!(
        http_get(&topo.client, v4(9001)).is_err(),
        "127.0.0.1:9001 must not be reachable remotely"
    );

    // A second container on the same port: Docker's own message, nothing changed.
    let dup = docker.run_web("web-dup", &["9000:8080"], &[8080]);
    assert!(!dup.status.success(), "duplicate port accepted");
    let err = lines(&dup.stderr);
    assert!(
        err.iter()
            .any(|l| l.contains("Bind for 0.0.0.0:9000 failed: port is already allocated")),
        "Docker's duplicate-port message: {err:?}"
    );
    docker.ok(&["rm", "-f", "web-dup"]);
    assert_eq!(rules(topo), published);
    assert_eq!(
        http_get(&topo.client, v4(9000)).expect("GET after dup"),
        page
    );

    // stop unpublishes, start republishes (to the container's address then), rm -f
    // unpublishes for good.
    docker.ok(&["stop", "-t", "1", web]);
    assert_eq!(rules(topo), vec![]);
    assert!(
        http_get(&topo.client, v4(9000)).is_err(),
        "stopped, still reachable"
    );
    docker.ok(&["start", web]);
    let ip = container_ip(docker, web);
    assert_eq!(
        rules(topo),
        vec![
            ("0.0.0.0".into(), 9000, "tcp".into(), ip.clone(), 8080),
            ("127.0.0.1".into(), 9001, "tcp".into(), ip.clone(), 8080),
            ("::".into(), 9000, "tcp".into(), ip.clone(), 8080),
        ]
    );
    assert_eq!(
        http_get(&topo.client, v4(9000)).expect("GET after start"),
        page
    );
    docker.ok(&["rm", "-f", web]);
    assert_eq!(rules(topo), vec![]);

    // A dual-stack container (a network with IPv6): dockerd gives the `::` proxy the
    // container's IPv6 address, so IPv6 clients reach it directly, their address kept.
    docker.ok(&[
        "network",
        "create",
        "--ipv6",
        "--subnet",
        "198.18.5.0/24",
        "--subnet",
        "2001:2:0:5::/64",
        "pfv6",
    ]);
    let out = docker.run_web("web-6", &["--network=pfv6", "9400:8080"], &[8080]);
    assert!(out.status.success(), "docker run dual-stack: {out:?}");
    let addrs = docker.ok(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{.GlobalIPv6Address}}{{end}}",
        "web-6",
    ]);
    let (ip4, ip6) = addrs.split_once(' ').expect("two addresses");
    assert_eq!(
        rules(topo),
        vec![
            ("0.0.0.0".into(), 9400, "tcp".into(), ip4.to_string(), 8080),
            ("::".into(), 9400, "tcp".into(), ip6.to_string(), 8080),
        ]
    );
    assert_eq!(
        http_get(&topo.client, v6(9400)).expect("GET v6 direct"),
        page
    );
    let logs = docker.docker(&["logs", "web-6"]);
    let logs = String::from_utf8_lossy(&logs.stderr).to_string();
    assert!(
        logs.contains(&format!("[{CLIENT_IP6}]:")),
        "the container did not see the IPv6 client's address: {logs}"
    );
    docker.ok(&["rm", "-f", "web-6"]);
    docker.ok(&["network", "rm", "pfv6"]);
    assert_eq!(rules(topo), vec![]);

    // A range is one proxy, so one rule, per port and family; UDP likewise.
    let out = docker.run_web("web-r", &["9100-9102:8100-8102"], &[8100, 8101, 8102]);
    assert!(out.status.success(), "docker run range: {out:?}");
    let ip = container_ip(docker, "web-r");
    docker.ok(&[
        "run",
        "-d",
        "--name",
        "echo-u",
        "-p",
        "5353:53/udp",
        "busybox:test",
        "/bin/testsrv",
        "--udp",
        "0.0.0.0:53",
    ]);
    let ip_u = container_ip(docker, "echo-u");
    let mut want = vec![];
    for (h, c) in [(9100, 8100), (9101, 8101), (9102, 8102)] {
        want.push(("0.0.0.0".to_string(), h, "tcp".to_string(), ip.clone(), c));
        want.push(("::".to_string(), h, "tcp".to_string(), ip.clone(), c));
    }
    want.push(("0.0.0.0".into(), 5353, "udp".into(), ip_u.clone(), 53));
    want.push(("::".into(), 5353, "udp".into(), ip_u.clone(), 53));
    want.sort();
    assert_eq!(rules(topo), want);
    for port in [9100, 9101, 9102] {
        assert_eq!(
            http_get(&topo.client, v4(port)).expect("GET range"),
            page,
            "port {port}"
        );
    }
    assert_eq!(listeners(&topo.host, 5353), Vec::<String>::new());
    let (reply, from) = udp_echo(&topo.client, v4(5353), b"ping over udp");
    let reply = String::from_utf8_lossy(&reply).to_string();
    let (peer, echoed) = reply.split_once('\n').expect("peer line");
    assert_eq!(echoed, "ping over udp");
    assert!(
        peer.starts_with(&format!("peer={CLIENT_IP}:")),
        "the container saw {peer}"
    );
    assert_eq!(from, v4(5353), "the reply comes from the published address");

    // portfwd restarts (and forgets its runtime rules): each proxy sees the new socket
    // and publishes its rule again.
    let mut daemon = topo.take_daemon().expect("daemon");
    daemon.stop(Duration::from_secs(10)).expect("daemon stops");
    drop(daemon);
    topo.start_daemon("tc");
    let deadline = Instant::now() + Duration::from_secs(20);
    while rules(topo) != want {
        assert!(
            Instant::now() < deadline,
            "rules not published again after a restart: {:?}",
            rules(topo)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        http_get(&topo.client, v4(9101)).expect("GET after restart"),
        page
    );

    // The portfwd daemon goes down: a new `docker run -p` fails with one clear line, and
    // removing a container still works.
    let mut daemon = topo.take_daemon().expect("daemon");
    daemon.stop(Duration::from_secs(10)).expect("daemon stops");
    let down = docker.run_web("web-down", &["9200:8080"], &[8080]);
    assert!(
        !down.status.success(),
        "docker run without portfwd succeeded"
    );
    let err = lines(&down.stderr);
    assert_eq!(err.len(), 1, "one line: {err:?}");
    assert!(
        err[0].contains("Error starting userland proxy: portfwd-docker-proxy: cannot reach the portfwd daemon at")
            && err[0].contains("(is portfwd running?)"),
        "{err:?}"
    );
    docker.ok(&["rm", "-f", "web-down", "web-r", "echo-u"]);
}

/// dockerd restarts leave no stale rule (issue #10). A graceful stop (SIGTERM, as
/// systemd stops it) stops the containers and so their proxies, which unpublish; a crash
/// (SIGKILL) ends the proxies by their parent-death signal (SIGTERM), so they unpublish
/// too, while containerd's shim may keep the container itself running. Either way, once
/// dockerd is back, a `--restart always` container is published again exactly once per
/// family, by proxies that exist, and a client reaches it with its own address; a fresh
/// container takes the port when that one is gone.
#[test]
fn dockerd_restart_leaves_no_stale_rule() {
    let Some(mut env) = setup("dockerd_restart_leaves_no_stale_rule", "dkr") else {
        return;
    };
    let Env { docker, topo } = &mut env;
    let web = "web-always";
    let out = docker.run_web(web, &["--restart=always", "9000:8080"], &[8080]);
    assert!(
        out.status.success(),
        "docker run: {out:?}\n{}",
        docker.log()
    );
    let published = |ip: &str| {
        vec![
            (
                "0.0.0.0".to_string(),
                9000,
                "tcp".to_string(),
                ip.to_string(),
                8080,
            ),
            (
                "::".to_string(),
                9000,
                "tcp".to_string(),
                ip.to_string(),
                8080,
            ),
        ]
    };
    let ip = container_ip(docker, web);
    assert_eq!(rules(topo), published(&ip));
    let first = live_proxy_owners(topo);
    assert_eq!(first.len(), 2, "one proxy per family: {first:?}");
    let page = "hello from docker\n";
    assert_eq!(http_get(&topo.client, v4(9000)).expect("GET"), page);

    // Graceful stop: dockerd stops the container (busybox httpd ignores SIGTERM, so after
    // its 10 s stop timeout) and its proxies; none of their rules is left, and the port no
    // longer answers.
    docker.signal(libc::SIGTERM, Duration::from_secs(60));
    assert_eq!(rules(topo), vec![], "rules left by a stopped dockerd");
    assert!(
        http_get(&topo.client, v4(9000)).is_err(),
        "dockerd stopped, the port still answers"
    );

    // Started again on the same roots: the container comes back, published once per
    // family by new proxies, to its address now.
    docker.launch(&topo.host, topo.daemon().socket());
    let ip = wait_running(docker, web);
    wait_rules(topo, &published(&ip), "after dockerd restarted");
    let second = live_proxy_owners(topo);
    assert_eq!(second.len(), 2, "one proxy per family: {second:?}");
    assert!(first.is_disjoint(&second), "{first:?} / {second:?}");
    assert_eq!(
        http_get(&topo.client, v4(9000)).expect("GET after dockerd restarted"),
        page
    );
    assert!(
        container_logs(docker, web).contains(&format!("[::ffff:{CLIENT_IP}]:")),
        "the container did not see the client's address: {}",
        container_logs(docker, web)
    );

    // Crash: the proxies get their parent-death signal (SIGTERM) and unpublish, while
    // the container keeps running under its shim: nothing answers on the port any more.
    docker.signal(libc::SIGKILL, Duration::from_secs(10));
    wait_rules(topo, &[], "after dockerd was killed");
    assert!(
        http_get(&topo.client, v4(9000)).is_err(),
        "dockerd killed, the port still answers through portfwd"
    );

    // Back again: dockerd reconciles (the container runs again, by its policy) and the
    // port is published once per family, by proxies that exist, nothing of before left.
    docker.launch(&topo.host, topo.daemon().socket());
    let ip = wait_running(docker, web);
    wait_rules(
        topo,
        &published(&ip),
        "after dockerd restarted from a crash",
    );
    let third = live_proxy_owners(topo);
    assert_eq!(third.len(), 2, "one proxy per family: {third:?}");
    assert!(second.is_disjoint(&third), "{second:?} / {third:?}");
    assert_eq!(
        http_get(&topo.client, v4(9000)).expect("GET after the crash"),
        page
    );

    // A fresh container takes the port once that one is removed.
    docker.ok(&["rm", "-f", web]);
    assert_eq!(rules(topo), vec![]);
    let out = docker.run_web("web-fresh", &["9000:8080"], &[8080]);
    assert!(
        out.status.success(),
        "docker run: {out:?}\n{}",
        docker.log()
    );
    let ip = container_ip(docker, "web-fresh");
    assert_eq!(rules(topo), published(&ip));
    assert_eq!(live_proxy_owners(topo).len(), 2);
    assert_eq!(
        http_get(&topo.client, v4(9000)).expect("GET the fresh container"),
        page
    );
    docker.ok(&["rm", "-f", "web-fresh"]);
    assert_eq!(rules(topo), vec![]);
}

/// The rules' owners, each checked to be a running `portfwd-docker-proxy`
/// (`docker:<pid>`).
fn live_proxy_owners(topo: &Topology) -> std::collections::BTreeSet<String> {
    let owners = owners(topo);
    for o in &owners {
        let pid = o
            .strip_prefix("docker:")
            .unwrap_or_else(|| panic!("not a proxy's rule: {owners:?}"));
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        // comm is the name cut to 15 bytes.
        assert!(
            PROXY.starts_with(comm.trim_end()) && !comm.trim_end().is_empty(),
            "{o}'s process is no proxy ({comm:?}): {owners:?}"
        );
    }
    owners
}

/// Waits (up to 30 s) until the rules are `want`.
#[track_caller]
fn wait_rules(topo: &Topology, want: &[(String, u16, String, String, u16)], when: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while rules(topo) != want {
        assert!(
            Instant::now() < deadline,
            "{when}: rules {:?}, want {want:?}",
            rules(topo)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits (up to 30 s) until container `name` runs; its address then.
fn wait_running(docker: &Dockerd, name: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    while docker.ok(&["inspect", "-f", "{{.State.Running}}", name]) != "true" {
        assert!(
            Instant::now() < deadline,
            "{name} did not run again:\n{}",
            docker.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    container_ip(docker, name)
}

/// What container `name` wrote (stderr, then stdout).
fn container_logs(docker: &Dockerd, name: &str) -> String {
    let logs = docker.docker(&["logs", name]);
    String::from_utf8_lossy(&logs.stderr).to_string() + &String::from_utf8_lossy(&logs.stdout)
}

/// dockerd 28 and later bind (and for TCP, listen on) the host port themselves and hand
/// the socket to the proxy as fd 4 with `-use-listen-fd`: the proxy must close it (so
/// nothing listens), publish, report `0\n` on fd 3, and on SIGINT unpublish and exit 0.
/// Its refusals are `1\n<one line>` on fd 3 and exit 1. A rule of a proxy that is gone
/// gives way to the next proxy; anyone else's rule stays.
#[test]
fn listen_fd_contract_of_newer_dockerd() {
    if !require_root("listen_fd_contract_of_newer_dockerd") {
        return;
    }
    let mut topo = Topology::new("dkfd");
    topo.start_daemon("tc");
    let port = 9300;
    let listener = topo
        .host
        .run(|| TcpListener::bind(("0.0.0.0", port)))
        .expect("dockerd's socket");
    assert_eq!(listeners(&topo.host, port).len(), 1, "the socket listens");

    let args = [
        "-proto".to_string(),
        "tcp".into(),
        "-host-ip".into(),
        "0.0.0.0".into(),
        "-host-port".into(),
        port.to_string(),
        "-container-ip".into(),
        CONTAINER_IPS[0].to_string(),
        "-container-port".into(),
        "8080".into(),
        "-use-listen-fd".into(),
    ];
    let (mut proxy, status) = spawn_proxy(&topo, &args, Some(listener.into()));
    assert_eq!(status, "0\n");
    assert_eq!(listeners(&topo.host, port), Vec::<String>::new());
    assert_eq!(
        rules(&topo),
        vec![(
            "0.0.0.0".into(),
            port,
            "tcp".into(),
            CONTAINER_IPS[0].to_string(),
            8080
        )]
    );
    assert_eq!(
        http_get(&topo.client, v4(port)).expect("GET through the rule"),
        body(0)
    );

    // dockerd stops its proxies with SIGINT.
    // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child's.
    unsafe { libc::kill(proxy.id() as i32, libc::SIGINT) };
    let exit = proxy
        .wait_timeout(IO_TIMEOUT)
        .expect("proxy exits on SIGINT");
    assert_eq!(exit.code(), Some(0));
    assert_eq!(rules(&topo), vec![]);

    // A refusal: one line on fd 3 after `1\n`, exit 1, nothing published.
    let mut sctp = args.to_vec();
    sctp[1] = "sctp".into();
    sctp.pop();
    let (mut proxy, status) = spawn_proxy(&topo, &sctp, None);
    let exit = proxy.wait_timeout(IO_TIMEOUT).expect("proxy exits");
    assert_eq!(exit.code(), Some(1));
    let (code, msg) = status.split_once('\n').expect("status line");
    assert_eq!(code, "1");
    assert!(!msg.contains('\n'), "one line: {msg:?}");
    assert!(msg.contains("`sctp` is not supported"), "{msg:?}");
    assert_eq!(rules(&topo), vec![]);

    // A rule left by a proxy killed outright (its owner's process is gone) does not block
    // the port: the next proxy removes it and publishes its own.
    let dead = {
        let mut child = Command::new("true").spawn().expect("spawn true");
        let pid = child.id();
        child.wait().expect("reap true");
        pid
    };
    let stale_owner = format!("docker:{dead}");
    let spec = format!("0.0.0.0:{port}");
    topo.daemon()
        .ctl(&["add", "--owner", &stale_owner, &spec, &backend(1)])
        .expect_ok("add the stale rule");
    let no_fd = &args[..args.len() - 1];
    let (mut proxy, status) = spawn_proxy(&topo, no_fd, None);
    assert_eq!(status, "0\n");
    assert_eq!(
        rules(&topo),
        vec![(
            "0.0.0.0".into(),
            port,
            "tcp".into(),
            CONTAINER_IPS[0].to_string(),
            8080
        )]
    );
    let owners = owners(&topo);
    assert_eq!(
        owners.into_iter().collect::<Vec<_>>(),
        [format!("docker:{}", proxy.id())]
    );
    // SAFETY: as above.
    unsafe { libc::kill(proxy.id() as i32, libc::SIGTERM) };
    assert_eq!(
        proxy.wait_timeout(IO_TIMEOUT).and_then(|e| e.code()),
        Some(0)
    );
    assert_eq!(rules(&topo), vec![]);

    // Anyone else's rule on the port stays, and the proxy fails with Docker's words.
    topo.daemon()
        .ctl(&["add", "--owner", "backup:nightly", &spec, &backend(1)])
        .expect_ok("add another owner's rule");
    let before = rules(&topo);
    let (mut proxy, status) = spawn_proxy(&topo, no_fd, None);
    assert_eq!(
        proxy.wait_timeout(IO_TIMEOUT).and_then(|e| e.code()),
        Some(1)
    );
    assert_eq!(
        status,
        format!(
            "1\nportfwd-docker-proxy: Bind for 0.0.0.0:{port} failed: port is already allocated"
        )
    );
    assert_eq!(rules(&topo), before);
}

/// Starts the proxy in the host namespace as dockerd does: a pipe on fd 3, `sock` (if
/// any) on fd 4. Returns it with what it wrote on fd 3 (up to its close).
fn spawn_proxy(topo: &Topology, args: &[String], sock: Option<OwnedFd>) -> (ChildGuard, String) {
    use std::os::unix::process::CommandExt;
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
    let mut cmd = topo.host.command(bins::bin(PROXY));
    cmd.args(args)
        .env("PORTFWD_SOCKET", topo.daemon().socket())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let (w, s) = (write.as_raw_fd(), sock.as_ref().map(AsRawFd::as_raw_fd));
    // SAFETY: the closure runs in the forked child before exec and calls only fcntl and
    // dup2, which are async-signal-safe; the fds stay open in the parent until spawn
    // returns. Both are first copied above 10, so neither is overwritten by the other's
    // dup2 whatever their numbers; dup2 leaves fds 3 and 4 without close-on-exec.
    unsafe {
        cmd.pre_exec(move || {
            let high = |fd: i32| match libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) {
                n if n < 0 => Err(std::io::Error::last_os_error()),
                n => Ok(n),
            };
            let w = high(w)?;
            let s = s.map(high).transpose()?;
            if libc::dup2(w, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(s) = s {
                if libc::dup2(s, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = ChildGuard::spawn("portfwd-docker-proxy", &mut cmd);
    // Only the child holds the write end and the socket now.
    drop(write);
    drop(sock);
    let mut status = String::new();
    std::fs::File::from(read)
        .read_to_string(&mut status)
        .expect("read fd 3");
    (child, status)
}
