//! The namespace network every traffic test builds for itself:
//!
//! ```text
//!  client ns              host ns (runs portfwd --iface cli0)             container ns x2
//!  eth0 198.18.0.2 ─veth─ cli0 198.18.0.1
//!                         br0  198.18.1.1 ─┬─ vc1 ─veth─ eth0 198.18.1.2  :8080 http, :5353 udp
//!                                          └─ vc2 ─veth─ eth0 198.18.1.3  :8080 http, :5353 udp
//! ```
//! The client's default route and the containers' go through the host, which forwards
//! (`ip_forward=1` in the host namespace only), so backends' replies pass the host's TC
//! egress on `cli0` on their way back. Transmit checksum offload is off on the client's
//! veth, so the ingress program sees full checksums, as from a wire. Every test gets its
//! own namespaces, so the same addresses serve tests running in parallel.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4},
    path::Path,
    time::Duration,
};

use serde_json::Value;

use crate::{
    bins, client, daemon::Daemon, netns::Netns, process::ChildGuard, require_root, tmp::TempDir,
};

/// The published address the client talks to (host side of the client veth).
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The client.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The host's address on the container bridge.
pub const BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
/// The containers, in order.
pub const CONTAINER_IPS: [Ipv4Addr; 2] =
    [Ipv4Addr::new(198, 18, 1, 2), Ipv4Addr::new(198, 18, 1, 3)];
/// The interface the daemon publishes on (host side of the client veth).
pub const HOST_IFACE: &str = "cli0";
/// Where each container serves HTTP.
pub const HTTP_PORT: u16 = 8080;
/// Where each container echoes UDP.
pub const UDP_PORT: u16 = 5353;

/// With [`Topology::add_ipv6`], from 2001:2::/48: the host's address on the client
/// veth, the client's, the host's on the bridge, and the containers'.
pub const HOST6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
pub const BRIDGE6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 1);
pub const CONTAINER6: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 2),
    Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 3),
];

/// The body container `i` (0-based) answers with.
pub fn body(i: usize) -> String {
    format!("Hello from container {}", i + 1)
}

/// `IP:PORT` of container `i`'s HTTP server, as `portfwd-ctl add` takes it.
pub fn backend(i: usize) -> String {
    format!("{}:{HTTP_PORT}", CONTAINER_IPS[i])
}

/// `IP:PORT` of container `i`'s UDP echo.
pub fn udp_backend(i: usize) -> String {
    format!("{}:{UDP_PORT}", CONTAINER_IPS[i])
}

/// HOST_IP:port, what the client connects to.
pub fn published(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(HOST_IP, port)
}

/// One test's network (see the module docs). Fields drop in order: the daemon and the
/// servers stop before their namespaces go.
pub struct Topology {
    daemon: Option<Daemon>,
    servers: Vec<ChildGuard>,
    pub client: Netns,
    pub host: Netns,
    pub containers: Vec<Netns>,
    dir: TempDir,
}

impl Topology {
    /// Builds the network and starts both containers' servers; no daemon yet. `tag` (a
    /// few characters) names the namespaces, so a leftover is traceable to its test.
    pub fn new(tag: &str) -> Self {
        let client = Netns::new(tag, "cli");
        let host = Netns::new(tag, "host");
        let containers = vec![Netns::new(tag, "c1"), Netns::new(tag, "c2")];
        let dir = TempDir::new(&format!("pft-{tag}"));
        let mut topo = Self {
            daemon: None,
            servers: Vec::new(),
            client,
            host,
            containers,
            dir,
        };
        topo.wire();
        topo.start_servers(|_| "0.0.0.0".to_string(), "server");
        topo
    }

    /// The usual start of a traffic test: the network and a daemon on `ingress`, or
    /// `None` when `test` is skipped ([`require_root`]).
    pub fn with_daemon(test: &str, tag: &str, ingress: &str) -> Option<Self> {
        if !require_root(test) {
            return None;
        }
        let mut topo = Self::new(tag);
        topo.start_daemon(ingress);
        Some(topo)
    }

    fn wire(&self) {
        let (host, client) = (&self.host, &self.client);
        host.sysctl("net.ipv4.ip_forward", "1");
        host.sysctl("net.ipv4.conf.all.rp_filter", "0");
        host.sysctl("net.ipv4.conf.default.rp_filter", "0");

        // Client <-> host.
        host.ip(&format!(
            "link add {HOST_IFACE} type veth peer name eth0 netns {}",
            client.name()
        ));
        host.ip(&format!("addr add {HOST_IP}/24 dev {HOST_IFACE}"));
        host.ip(&format!("link set {HOST_IFACE} up"));
        client.ip(&format!("addr add {CLIENT_IP}/24 dev eth0"));
        client.ip("link set eth0 up");
        client.ip(&format!("route add default via {HOST_IP}"));
        // Full checksums leave the client, as from a remote machine's NIC.
        client.exec_ok("ethtool", &["-K", "eth0", "tx", "off"]);

        // Host bridge <-> containers.
        host.ip("link add br0 type bridge");
        host.ip(&format!("addr add {BRIDGE_IP}/24 dev br0"));
        host.ip("link set br0 up");
        for (i, c) in self.containers.iter().enumerate() {
            let port = format!("vc{}", i + 1);
            host.ip(&format!(
                "link add {port} type veth peer name eth0 netns {}",
                c.name()
            ));
            host.ip(&format!("link set {port} master br0"));
            host.ip(&format!("link set {port} up"));
            c.ip(&format!("addr add {}/24 dev eth0", CONTAINER_IPS[i]));
            c.ip("link set eth0 up");
            c.ip(&format!("route add default via {BRIDGE_IP}"));
            // The fast path's XDP redirect into a veth delivers only when the receiving
            // end runs NAPI (GRO on, or an XDP program): what `--fast-path` documents.
            c.exec_ok("ethtool", &["-K", "eth0", "gro", "on"]);
        }
    }

    /// Starts each container's HTTP and UDP servers on `ip(i)` (as a socket address
    /// takes it: `[...]` for IPv6), named `what` in errors.
    fn start_servers(&mut self, ip: impl Fn(usize) -> String, what: &str) {
        let srv = bins::bin(bins::TESTSRV);
        for (i, c) in self.containers.iter().enumerate() {
            let mut cmd = c.command(&srv);
            cmd.args(["--http", &format!("{}:{HTTP_PORT}", ip(i))])
                .args(["--udp", &format!("{}:{UDP_PORT}", ip(i))])
                .args(["--body", &body(i)]);
            self.servers.push(ChildGuard::spawn_until_line(
                &format!("{what} in {}", c.name()),
                &mut cmd,
                "ready",
                Duration::from_secs(30),
            ));
        }
    }

    /// Adds IPv6 ([`HOST6`], [`CLIENT6`], [`BRIDGE6`], [`CONTAINER6`]; forwarding on in
    /// the host) and starts each container's IPv6 servers, answering with the same body
    /// on the same ports as the IPv4 ones.
    pub fn add_ipv6(&mut self) {
        let (host, cli) = (&self.host, &self.client);
        host.sysctl("net.ipv6.conf.all.forwarding", "1");
        host.ip(&format!("-6 addr add {HOST6}/64 dev {HOST_IFACE} nodad"));
        host.ip(&format!("-6 addr add {BRIDGE6}/64 dev br0 nodad"));
        cli.ip(&format!("-6 addr add {CLIENT6}/64 dev eth0 nodad"));
        cli.ip(&format!("-6 route add default via {HOST6}"));
        for (i, c) in self.containers.iter().enumerate() {
            c.ip(&format!("-6 addr add {}/64 dev eth0 nodad", CONTAINER6[i]));
            c.ip(&format!("-6 route add default via {BRIDGE6}"));
        }
        self.start_servers(|i| format!("[{}]", CONTAINER6[i]), "IPv6 server");
    }

    /// A directory of this test's own (sockets, logs), removed at the end.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts `portfwd --iface cli0 --ingress MODE` in the host namespace and waits until
    /// it answers.
    pub fn start_daemon(&mut self, ingress: &str) -> &Daemon {
        assert!(self.daemon.is_none(), "daemon already started");
        let d = Daemon::start(&self.host, self.dir.path(), &[HOST_IFACE], ingress);
        self.daemon.insert(d)
    }

    /// As [`Self::start_daemon`], with these daemon arguments instead of `--ingress`.
    pub fn start_daemon_with(&mut self, args: &[&str]) -> &Daemon {
        assert!(self.daemon.is_none(), "daemon already started");
        let d = Daemon::start_with(&self.host, self.dir.path(), &[HOST_IFACE], args);
        self.daemon.insert(d)
    }

    /// The running daemon.
    pub fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("start_daemon first")
    }

    pub fn daemon_mut(&mut self) -> &mut Daemon {
        self.daemon.as_mut().expect("start_daemon first")
    }

    /// Makes `d` the running daemon (one started over the pinned state of the last).
    pub fn set_daemon(&mut self, d: Daemon) -> &Daemon {
        assert!(self.daemon.is_none(), "daemon already running");
        self.daemon.insert(d)
    }

    /// Stops the daemon (if running) and forgets it.
    pub fn take_daemon(&mut self) -> Option<Daemon> {
        self.daemon.take()
    }

    /// `GET /` from the client to the published `port`, which must answer 200.
    #[track_caller]
    pub fn get_published(&self, port: u16) -> client::Response {
        let r = client::get(&self.client, published(port), "/")
            .unwrap_or_else(|e| panic!("GET http://{}/: {e}", published(port)));
        assert_eq!(r.status, 200, "GET {}: {r:?}", published(port));
        r
    }

    /// Runs `portfwd-testcli args...` in `ns`, inside the daemon's cgroup (`in_cgroup`,
    /// a local client the daemon serves) or not; returns (exit success, its JSON).
    pub fn testcli(&self, ns: &Netns, in_cgroup: bool, args: &[&str]) -> (bool, Value) {
        let mut cmd = ns.command(bins::bin(bins::TESTCLI));
        if in_cgroup {
            cmd.arg("--cgroup").arg(self.daemon().cgroup().path());
        }
        let out = cmd.args(args).output().expect("run portfwd-testcli");
        let text = String::from_utf8_lossy(&out.stdout);
        let v: Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
            panic!(
                "testcli {args:?}: bad output {text:?} ({e}); stderr {:?}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.success(), v)
    }

    /// A local TCP client in `ns` (in the daemon's cgroup) that must reach container `i`
    /// through `addr`; returns what `portfwd-testcli tcp` printed.
    #[track_caller]
    pub fn local_get(&self, ns: &Netns, addr: &str, i: usize) -> Value {
        let (ok, v) = self.testcli(ns, true, &["tcp", addr]);
        assert!(ok, "local GET {addr}: {v}");
        assert_eq!(v["body"], body(i), "local GET {addr}: {v}");
        v
    }
}
