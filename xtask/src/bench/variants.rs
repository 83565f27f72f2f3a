//! The ways a port reaches the container, each set up inside a fresh topology.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::Array,
    programs::{Xdp, XdpMode},
    Ebpf, EbpfLoader,
};

use super::{
    sys::{self, Proc},
    topo::{
        Artifacts, Topology, CT_IF, CT_IP, CT_IP6, ECHO, HOST_IP, HOST_IP6, HTTP, IPERF, UDP, UDP6,
    },
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Variant {
    /// The client routes to the container's own address: no translation (the ceiling).
    Direct,
    /// iptables (nf_tables backend) DNAT with conntrack, as Docker publishes ports.
    Iptables,
    /// One `socat` forking proxy per published port (what docker-proxy does).
    Socat,
    /// docker-proxy itself, when the machine has it.
    DockerProxy,
    /// portfwd, ingress program at TC ingress (`--ingress tc`, what `auto` picks on veth).
    PortfwdTc,
    /// portfwd at generic (skb) XDP.
    PortfwdXdpGeneric,
    /// portfwd at native XDP on the veth: splits GSO super-packets; labelled as such.
    PortfwdXdpNative,
    /// portfwd's fast path (`--fast-path`: FIB lookup, MAC rewrite, redirect to the
    /// backend's port) from TC ingress.
    PortfwdTcFast,
    /// The fast path from native XDP on the veth (XDP_REDIRECT; GSO trap for TCP).
    PortfwdXdpFast,
    /// The fast path from TC transmitting on the host's end of the veth
    /// (`--fast-path-no-peer`): what the peer hand-over saves. Run only when named.
    PortfwdTcFastNoPeer,
    /// Not a forwarder: `bench_floor`, an XDP program that rewrites the port and MACs of
    /// the 64-byte UDP frames and redirects them with no lookup at all. The most any XDP
    /// forwarder reaches on this rig (the veths' and the sink's costs are fixed), so the
    /// fast path's ratio to direct can be read against what the rig allows. UDP only.
    XdpFloor,
}

impl Variant {
    pub const ALL: [Variant; 10] = [
        Variant::Direct,
        Variant::Iptables,
        Variant::Socat,
        Variant::DockerProxy,
        Variant::PortfwdTc,
        Variant::PortfwdXdpGeneric,
        Variant::PortfwdXdpNative,
        Variant::PortfwdTcFast,
        Variant::PortfwdXdpFast,
        Variant::XdpFloor,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Variant::Direct => "direct",
            Variant::Iptables => "iptables",
            Variant::Socat => "socat",
            Variant::DockerProxy => "docker-proxy",
            Variant::PortfwdTc => "portfwd-tc",
            Variant::PortfwdXdpGeneric => "portfwd-xdp-generic",
            Variant::PortfwdXdpNative => "portfwd-xdp-native",
            Variant::PortfwdTcFast => "portfwd-tc-fast",
            Variant::PortfwdXdpFast => "portfwd-xdp-fast",
            Variant::PortfwdTcFastNoPeer => "portfwd-tc-fast-nopeer",
            Variant::XdpFloor => "xdp-floor",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Variant::Direct => "direct (no NAT)",
            Variant::Iptables => "iptables DNAT",
            Variant::Socat => "socat proxy",
            Variant::DockerProxy => "docker-proxy",
            Variant::PortfwdTc => "portfwd, TC ingress",
            Variant::PortfwdXdpGeneric => "portfwd, generic XDP",
            Variant::PortfwdXdpNative => "portfwd, native XDP on veth (GSO trap)",
            Variant::PortfwdTcFast => "portfwd fast path (redirect), TC ingress",
            Variant::PortfwdXdpFast => "portfwd fast path (XDP_REDIRECT), native XDP on veth",
            Variant::PortfwdTcFastNoPeer => {
                "portfwd fast path, TC ingress, transmitted on the host's veth (no peer hand-over)"
            }
            Variant::XdpFloor => {
                "XDP_REDIRECT with no lookup (the rig's ceiling for an XDP forwarder; UDP only, not portfwd)"
            }
        }
    }

    /// Variants run only when named with `--variants`.
    pub const OPTIONAL: [Variant; 1] = [Variant::PortfwdTcFastNoPeer];

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .chain(Self::OPTIONAL)
            .find(|v| v.name() == s)
    }

    pub fn is_portfwd(self) -> bool {
        matches!(
            self,
            Variant::PortfwdTc
                | Variant::PortfwdXdpGeneric
                | Variant::PortfwdXdpNative
                | Variant::PortfwdTcFast
                | Variant::PortfwdXdpFast
                | Variant::PortfwdTcFastNoPeer
        )
    }

    /// Whether the variant forwards only the 64-byte UDP workloads.
    pub fn udp_only(self) -> bool {
        self == Variant::XdpFloor
    }

    /// Why the variant cannot run on this machine, if it cannot.
    pub fn unavailable(self, art: &Artifacts) -> Option<String> {
        match self {
            Variant::Iptables if !sys::have("iptables-nft") => Some("no iptables-nft".into()),
            Variant::Socat if !sys::have("socat") => Some("no socat".into()),
            Variant::DockerProxy if !sys::have("docker-proxy") => {
                Some("docker-proxy is not installed on this machine".into())
            }
            v if v.is_portfwd() && (art.daemon.is_none() || art.ctl.is_none()) => {
                Some("the portfwd daemon is not built yet".into())
            }
            _ => None,
        }
    }
}

/// Where the client sends each workload under a variant.
#[derive(Clone, Copy, Debug)]
pub struct Targets {
    pub addr: Ipv4Addr,
    pub http: u16,
    pub iperf: u16,
    pub echo: u16,
    /// None: the variant does not forward UDP.
    pub udp: Option<u16>,
    /// Where IPv6 clients of the IPv4-only container go (same ports), or None: the
    /// variant cannot serve them.
    pub addr6: Option<Ipv6Addr>,
    /// Where 64-byte UDP over IPv6 goes (the container's IPv6 address, end to end), or
    /// None: the variant does not forward it.
    pub udp6: Option<(Ipv6Addr, u16)>,
}

/// A variant set up in a topology; dropping it stops what it started.
pub struct Active {
    /// What the variant started (proxies, the daemon), stopped on drop.
    pub _procs: Vec<Proc>,
    pub targets: Targets,
    /// `localhost:PORT` from the host namespace: (address, HTTP port, iperf port), or why
    /// the variant has no local service.
    pub local: Result<(Ipv4Addr, u16, u16)>,
    /// BPF programs the variant attached, detached on drop.
    pub _bpf: Option<Ebpf>,
}

const LOCALHOST: Ipv4Addr = Ipv4Addr::LOCALHOST;

pub fn published() -> Targets {
    Targets {
        addr: HOST_IP,
        http: HTTP.1,
        iperf: IPERF.1,
        echo: ECHO.1,
        udp: Some(UDP.1),
        // portfwd: NAT64 at TC. socat: a second, IPv6 listener.
        addr6: Some(HOST_IP6),
        udp6: Some((HOST_IP6, UDP6.1)),
    }
}

pub fn setup(v: Variant, topo: &Topology, art: &Artifacts, sock_dir: &str) -> Result<Active> {
    match v {
        Variant::Direct => Ok(Active {
            _procs: Vec::new(),
            targets: Targets {
                addr: CT_IP,
                http: HTTP.0,
                iperf: IPERF.0,
                echo: ECHO.0,
                udp: Some(UDP.0),
                // Its services listen on IPv4 only.
                addr6: None,
                udp6: Some((CT_IP6, UDP6.0)),
            },
            // A host process talking straight to the container.
            local: Ok((CT_IP, HTTP.0, IPERF.0)),
            _bpf: None,
        }),
        Variant::Iptables => {
            let mut script = String::from(
                "iptables-nft -t nat -N PFB
                 iptables-nft -t nat -A PREROUTING -m addrtype --dst-type LOCAL -j PFB\n",
            );
            for (proto, (ct, host)) in [("tcp", HTTP), ("tcp", IPERF), ("tcp", ECHO), ("udp", UDP)]
            {
                script += &format!(
                    "iptables-nft -t nat -A PFB -p {proto} --dport {host} -j DNAT --to-destination {CT_IP}:{ct}\n"
                );
            }
            // 64-byte UDP over IPv6, end to end.
            script += &format!(
                "ip6tables-nft -t nat -A PREROUTING -d {HOST_IP6} -p udp --dport {} -j DNAT --to-destination [{CT_IP6}]:{}\n",
                UDP6.1, UDP6.0
            );
            topo.host.sh(&script).context("iptables DNAT rules")?;
            Ok(Active {
                _procs: Vec::new(),
                // ip6tables cannot DNAT IPv6 to an IPv4 address.
                targets: Targets {
                    addr6: None,
                    ..published()
                },
                local: Err(anyhow::anyhow!(
                    "not measured (Docker's localhost case is served by docker-proxy)"
                )),
                _bpf: None,
            })
        }
        Variant::Socat | Variant::DockerProxy => {
            let mut procs = Vec::new();
            for (ct, host) in [HTTP, IPERF, ECHO] {
                let mut cmd = if v == Variant::Socat {
                    let mut c = topo.host.command("socat");
                    c.arg(format!("TCP-LISTEN:{host},fork,reuseaddr,backlog=4096"))
                        .arg(format!("TCP:{CT_IP}:{ct}"));
                    c
                } else {
                    docker_proxy_cmd(topo, "0.0.0.0", host, ct)
                };
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
                procs.push(Proc::spawn(v.name(), &mut cmd)?);
                topo.wait_listening(&topo.host, host, false)?;
            }
            let mut t = published();
            t.udp = None;
            t.udp6 = None;
            // IPv6 clients: a second listener on `::`, to the container's IPv4 address
            // (what Docker starts for `-p` and a container without IPv6).
            for (ct, host) in [HTTP, IPERF] {
                let mut c = if v == Variant::Socat {
                    let mut c = topo.host.command("socat");
                    c.arg(format!(
                        "TCP6-LISTEN:{host},fork,reuseaddr,backlog=4096,ipv6only=1"
                    ))
                    .arg(format!("TCP:{CT_IP}:{ct}"));
                    c
                } else {
                    docker_proxy_cmd(topo, "::", host, ct)
                };
                c.stdout(Stdio::null()).stderr(Stdio::null());
                procs.push(Proc::spawn(&format!("{} (IPv6)", v.name()), &mut c)?);
                topo.wait_listening(&topo.host, host, true)?;
            }
            Ok(Active {
                _procs: procs,
                targets: t,
                local: Ok((LOCALHOST, HTTP.1, IPERF.1)),
                _bpf: None,
            })
        }
        Variant::PortfwdTc
        | Variant::PortfwdXdpGeneric
        | Variant::PortfwdXdpNative
        | Variant::PortfwdTcFast
        | Variant::PortfwdXdpFast
        | Variant::PortfwdTcFastNoPeer => {
            let (Some(daemon), Some(ctl)) = (&art.daemon, &art.ctl) else {
                bail!("portfwd is not built");
            };
            let ingress = match v {
                Variant::PortfwdTc | Variant::PortfwdTcFast | Variant::PortfwdTcFastNoPeer => "tc",
                Variant::PortfwdXdpGeneric => "xdp-generic",
                _ => "xdp",
            };
            let sock = format!("{sock_dir}/{}.sock", topo.host.name());
            let log = std::fs::File::create(art.log_dir.join(format!("{}.log", topo.host.name())))?;
            let mut cmd = sys::daemon_cmd(&topo.host, daemon);
            cmd.args([
                "--iface",
                &topo.host_if,
                "--ingress",
                ingress,
                "--socket",
                &sock,
            ]);
            no_pin(&mut cmd, daemon);
            match v {
                Variant::PortfwdTcFast => {
                    cmd.arg("--fast-path");
                }
                Variant::PortfwdTcFastNoPeer => {
                    cmd.args(["--fast-path", "--fast-path-no-peer"]);
                }
                Variant::PortfwdXdpFast => {
                    // Redirected XDP frames reach the container only when its end of the
                    // veth runs NAPI: GRO on, as `--fast-path-native-xdp` requires.
                    topo.ct
                        .sh(&format!("ethtool -K {} gro on", super::topo::CT_IF))?;
                    cmd.args(["--fast-path", "--fast-path-native-xdp"]);
                }
                _ => {}
            }
            // Local clients: only the rig's cgroup, never the machine's root cgroup.
            if daemon_has_cgroup_flag(daemon) {
                cmd.arg("--cgroup").arg(&topo.cgroup.daemon_path);
            }
            cmd.stdout(log.try_clone()?).stderr(log);
            let mut d = Proc::spawn("portfwd", &mut cmd)?;
            sys::wait_for("the portfwd socket", Duration::from_secs(10), || {
                std::path::Path::new(&sock).exists()
            })?;
            d.check_alive()?;
            for (proto, (ct, host)) in [("tcp", HTTP), ("tcp", IPERF), ("tcp", ECHO), ("udp", UDP)]
            {
                sys::run(Command::new(ctl).args([
                    "--socket",
                    &sock,
                    "add",
                    &format!("{host}/{proto}"),
                    &format!("{CT_IP}:{ct}"),
                ]))?;
            }
            // IPv6 end to end.
            sys::run(Command::new(ctl).args([
                "--socket",
                &sock,
                "add",
                &format!("[{HOST_IP6}]:{}/udp", UDP6.1),
                &format!("[{CT_IP6}]:{}", UDP6.0),
            ]))?;
            let local = local_service(ctl, &sock);
            Ok(Active {
                _procs: vec![d],
                targets: published(),
                local,
                _bpf: None,
            })
        }
        Variant::XdpFloor => floor(topo, art),
    }
}

/// docker-proxy as dockerd starts it; it needs fd 3 open (its parent passes a pipe there)
/// or it closes its listener.
fn docker_proxy_cmd(topo: &Topology, host_ip: &str, host: u16, ct: u16) -> Command {
    let mut c = topo.host.command("sh");
    c.arg("-c").arg(format!(
        "exec 3</dev/null; exec docker-proxy -proto tcp -host-ip {host_ip} -host-port {host} -container-ip {CT_IP} -container-port {ct}"
    ));
    c
}

/// Whether this daemon build takes `--cgroup` (the cgroup whose processes it serves as
/// local clients).
pub fn daemon_has_cgroup_flag(daemon: &std::path::Path) -> bool {
    daemon_has_flag(daemon, "--cgroup")
}

/// Whether `daemon --help` lists `flag` (builds of other versions are benchmarked too).
pub fn daemon_has_flag(daemon: &std::path::Path, flag: &str) -> bool {
    Command::new(daemon)
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(flag))
        .unwrap_or(false)
}

/// `--no-pin` where the daemon pins by default: a benchmark's daemon leaves nothing
/// attached or pinned when it stops.
pub fn no_pin(cmd: &mut Command, daemon: &std::path::Path) {
    if daemon_has_flag(daemon, "--no-pin") {
        cmd.arg("--no-pin");
    }
}

/// Whether the daemon serves `localhost:PORT` at the socket (its `list --json` says so).
fn local_service(ctl: &std::path::Path, sock: &str) -> Result<(Ipv4Addr, u16, u16)> {
    let out = Command::new(ctl)
        .args(["--socket", sock, "list", "--json"])
        .output()
        .with_context(|| format!("cannot run {}", ctl.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value =
        serde_json::from_str(&text).context("`portfwd-ctl list --json` printed no JSON")?;
    let has_local = json["local_clients"]["served"].as_bool() == Some(true);
    if has_local {
        Ok((LOCALHOST, HTTP.1, IPERF.1))
    } else {
        bail!("portfwd serves no local clients yet (`list --json` shows no local service)")
    }
}

/// `bench_floor` on the host's client-facing veth (native XDP), sending the 64-byte UDP
/// frames of both families to the container's bridge port (`hs0`) with the container's
/// MAC and port.
fn floor(topo: &Topology, art: &Artifacts) -> Result<Active> {
    // Redirected XDP frames reach the container only when its veth runs NAPI.
    topo.ct.sh(&format!("ethtool -K {CT_IF} gro on"))?;
    let port_if = Topology::ifindex(&topo.host, "hs0")?;
    let (dmac, smac) = (
        Topology::mac(&topo.ct, CT_IF)?,
        Topology::mac(&topo.host, "br0")?,
    );
    let mut job = [0u8; 24];
    job[0..4].copy_from_slice(&port_if.to_ne_bytes());
    job[4..10].copy_from_slice(&dmac);
    job[10..16].copy_from_slice(&smac);
    job[16..18].copy_from_slice(&UDP.1.to_be_bytes());
    job[18..20].copy_from_slice(&UDP.0.to_be_bytes());
    job[20..22].copy_from_slice(&UDP6.1.to_be_bytes());
    job[22..24].copy_from_slice(&UDP6.0.to_be_bytes());
    let (obj, hif) = (art.bench_object.clone(), topo.host_if.clone());
    let ebpf = sys::on_thread(&topo.host, move || {
        let mut ebpf = EbpfLoader::new().load_file(&obj)?;
        let mut cfg: Array<_, [u8; 24]> =
            Array::try_from(ebpf.map_mut("BENCH_FLOOR").context("BENCH_FLOOR")?)?;
        cfg.set(0, job, 0)?;
        let prog: &mut Xdp = ebpf
            .program_mut("bench_floor")
            .context("bench_floor")?
            .try_into()?;
        prog.load()?;
        prog.attach(&hif, XdpMode::Driver)
            .context("attach bench_floor (native XDP) to the host's veth")?;
        Ok(ebpf)
    })?;
    Ok(Active {
        _procs: Vec::new(),
        targets: Targets {
            addr6: None,
            ..published()
        },
        local: Err(anyhow::anyhow!("not a forwarder of connections (UDP only)")),
        _bpf: Some(ebpf),
    })
}
