//! The topology of one (round, variant), built fresh every time (TIME_WAIT and conntrack
//! state must not carry over between variants):
//!
//! ```text
//!  client ns              host ns (forwarding)                    container ns
//!  c0 198.18.1.2 ──veth── <tag>h 198.18.1.1   br0 198.19.0.1 ── hs0 ──veth── s0 198.19.0.2
//! ```
//! The client's default route is the host, so `direct` reaches the container by its own
//! address (no translation); every other variant publishes the container's ports on the
//! host's address. The container runs iperf3 and the rig's HTTP and echo servers.
//! The client's link also has IPv6 (client 2001:2::2, host 2001:2::1, RFC 5180). The
//! `v6-tcp1`/`v6-crr` services are published to the container's IPv4 address, so IPv6
//! clients need a proxy or NAT64 there; the container also has 2001:2:0:1::2 (bridge
//! 2001:2:0:1::1), which only `v6-udp64` uses (IPv6 end to end, the IPv6 fast path).
//! The host's client-facing veth has GRO on, as a NIC would (issue #13).

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context, Result};

use super::sys::{self, Netns, Proc};

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
pub const BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
pub const CT_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
pub const HOST_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
pub const BRIDGE_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 1);
pub const CT_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 2);

/// (container port, published host port) of each service.
pub const HTTP: (u16, u16) = (8080, 9000);
pub const IPERF: (u16, u16) = (5201, 9201);
pub const ECHO: (u16, u16) = (7007, 9007);
/// 64-byte UDP frames: to 8080/udp in the container, published as 9000/udp.
pub const UDP: (u16, u16) = (8080, 9000);
/// 64-byte UDP over IPv6: to the same container port, published as 9008/udp (9000/udp's
/// rule already serves IPv6 clients, by NAT64 to the container's IPv4 address).
pub const UDP6: (u16, u16) = (8080, 9008);

pub const CLIENT_IF: &str = "c0";
pub const CT_IF: &str = "s0";

pub struct Topology {
    // Fields drop in order: servers before the namespaces they live in.
    pub servers: Vec<Proc>,
    /// Local clients (`localhost:PORT` workloads) run in this cgroup, the only one the
    /// daemon serves at the socket.
    pub cgroup: sys::Cgroup,
    pub client: Netns,
    pub host: Netns,
    pub ct: Netns,
    /// The host's client-facing veth; named per run so its NAPI thread can be found.
    pub host_if: String,
}

impl Topology {
    pub fn build(prefix: &str, host_if: &str, exe: &Path) -> Result<Self> {
        let client = Netns::create(format!("{prefix}c"))?;
        let host = Netns::create(format!("{prefix}h"))?;
        let ct = Netns::create(format!("{prefix}s"))?;
        let (c, h, s) = (client.name(), host.name(), ct.name());
        sys::sh(&format!(
            "ip -n {c} link add {CLIENT_IF} type veth peer name {host_if} netns {h}
             ip -n {h} link add hs0 type veth peer name {CT_IF} netns {s}
             ip -n {h} link add br0 type bridge
             ip -n {h} link set hs0 master br0"
        ))?;
        // Full checksums leave the client, as from a remote machine's NIC: with transmit
        // offload on, a veth hands XDP partial checksums no wire ever carries.
        client.sh(&format!(
            "ip addr add {CLIENT_IP}/24 dev {CLIENT_IF}
             ip -6 addr add {CLIENT_IP6}/64 dev {CLIENT_IF} nodad
             ip link set {CLIENT_IF} up
             ip route add default via {HOST_IP}
             ip -6 route add default via {HOST_IP6}
             ethtool -K {CLIENT_IF} tx off"
        ))?;
        host.sh(&format!(
            "sysctl -qw net.ipv4.ip_forward=1
             sysctl -qw net.ipv4.conf.all.rp_filter=0
             sysctl -qw net.ipv4.conf.default.rp_filter=0
             sysctl -qw net.ipv6.conf.all.forwarding=1
             ip addr add {HOST_IP}/24 dev {host_if}
             ip -6 addr add {HOST_IP6}/64 dev {host_if} nodad
             ip addr add {BRIDGE_IP}/24 dev br0
             ip -6 addr add {BRIDGE_IP6}/64 dev br0 nodad
             ip link set {host_if} up
             ip link set br0 up
             ip link set hs0 up
             ethtool -K {host_if} gro on >/dev/null"
        ))?;
        // GRO on the host's receiving veth, as a NIC does for every variant alike
        // (without it a veth skips NAPI and hands the host one skb per segment).
        let k = host.sh(&format!("ethtool -k {host_if}"))?;
        if !k.lines().any(|l| l.trim() == "generic-receive-offload: on") {
            bail!("GRO did not turn on for {host_if}: `ethtool -k` shows it off");
        }
        ct.sh(&format!(
            "ip addr add {CT_IP}/24 dev {CT_IF}
             ip -6 addr add {CT_IP6}/64 dev {CT_IF} nodad
             ip link set {CT_IF} up
             ip route add default via {BRIDGE_IP}
             ip -6 route add default via {BRIDGE_IP6}"
        ))?;
        let mut topo = Self {
            servers: Vec::new(),
            cgroup: sys::Cgroup::new(prefix)?,
            client,
            host,
            ct,
            host_if: host_if.to_string(),
        };
        let http = format!("0.0.0.0:{}", HTTP.0);
        let echo = format!("0.0.0.0:{}", ECHO.0);
        let mut serve = topo.ct.command(exe);
        serve.args(["bench", "--serve-http", &http, "--serve-echo", &echo]);
        topo.servers
            .push(Proc::spawn("http/echo server", &mut serve)?);
        let mut iperf = topo.ct.command("iperf3");
        iperf
            .args(["-s", "-p", &IPERF.0.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        topo.servers.push(Proc::spawn("iperf3 server", &mut iperf)?);
        for port in [HTTP.0, ECHO.0, IPERF.0] {
            topo.wait_listening(&topo.ct, port, false)?;
        }
        for p in &mut topo.servers {
            p.check_alive()?;
        }
        // Neighbours resolved before any measurement.
        topo.client
            .sh(&format!("ping -c1 -W2 {CT_IP} >/dev/null"))
            .context("the container is unreachable from the client")?;
        topo.client
            // Early ones are lost while the bridge's link-local address is tentative.
            .sh(&format!(
                "for i in $(seq 20); do ping -6 -c1 -W1 {CT_IP6} >/dev/null && exit 0; done; exit 1"
            ))
            .context("the container is unreachable from the client over IPv6")?;
        Ok(topo)
    }

    /// Waits until a TCP listener on `port` exists in `ns` (an IPv6 one with `v6`).
    pub fn wait_listening(&self, ns: &Netns, port: u16, v6: bool) -> Result<()> {
        let (family, flag) = if v6 { ("an IPv6", "6") } else { ("a", "") };
        sys::wait_for(
            &format!("{family} listener on port {port} in {}", ns.name()),
            Duration::from_secs(10),
            || {
                ns.sh(&format!("ss -Hltn{flag} 'sport = :{port}'"))
                    .map(|o| !o.trim().is_empty())
                    .unwrap_or(false)
            },
        )
    }

    /// MAC address of an interface in a namespace.
    pub fn mac(ns: &Netns, iface: &str) -> Result<[u8; 6]> {
        let s = ns.sh(&format!("cat /sys/class/net/{iface}/address"))?;
        let v: Vec<u8> = s
            .trim()
            .split(':')
            .map(|x| u8::from_str_radix(x, 16))
            .collect::<Result<_, _>>()
            .with_context(|| format!("bad MAC `{s}`"))?;
        v.try_into()
            .map_err(|_| anyhow::anyhow!("bad MAC `{}`", s.trim()))
    }

    pub fn ifindex(ns: &Netns, iface: &str) -> Result<u32> {
        let s = ns.sh(&format!("cat /sys/class/net/{iface}/ifindex"))?;
        Ok(s.trim().parse()?)
    }
}

/// Where the portfwd binaries and the BPF objects are (found through cargo, never by a
/// hard-coded target path).
#[derive(Clone, Debug)]
pub struct Artifacts {
    pub xtask: PathBuf,
    pub daemon: Option<PathBuf>,
    pub ctl: Option<PathBuf>,
    pub bpf_object: PathBuf,
    pub bench_object: PathBuf,
    /// Daemon logs go here (inside the results directory).
    pub log_dir: PathBuf,
}
