//! The workloads, each run from the client namespace (or the host namespace for the
//! `localhost:PORT` ones) against the targets a variant gives.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Array, PerCpuArray},
    programs::{
        SchedClassifier, TcAttachType, TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode,
    },
    EbpfLoader,
};

use super::{
    frame::{udp6_frame, udp_frame},
    serve::ECHO_LEN,
    sys::{self, Netns},
    topo::{Artifacts, Topology, CLIENT_IF, CLIENT_IP, CLIENT_IP6, CT_IF, UDP},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Workload {
    Tcp1,
    Tcp1Tso,
    Tcp4,
    Crr,
    KeepAlive,
    Latency,
    Udp64,
    LocalCrr,
    LocalTcp1,
    V6Tcp1,
    V6Tcp1Tso,
    V6Crr,
    V6Udp64,
}

impl Workload {
    pub const ALL: [Workload; 13] = [
        Workload::Tcp1,
        Workload::Tcp1Tso,
        Workload::Tcp4,
        Workload::Crr,
        Workload::KeepAlive,
        Workload::Latency,
        Workload::LocalCrr,
        Workload::LocalTcp1,
        Workload::V6Tcp1,
        Workload::V6Tcp1Tso,
        Workload::V6Crr,
        // Last: they make the host veth's NAPI threaded.
        Workload::Udp64,
        Workload::V6Udp64,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Tcp1 => "tcp1",
            Workload::Tcp1Tso => "tcp1-tso",
            Workload::Tcp4 => "tcp4",
            Workload::Crr => "crr",
            Workload::KeepAlive => "keepalive",
            Workload::Latency => "latency",
            Workload::Udp64 => "udp64",
            Workload::LocalCrr => "local-crr",
            Workload::LocalTcp1 => "local-tcp1",
            Workload::V6Tcp1 => "v6-tcp1",
            Workload::V6Tcp1Tso => "v6-tcp1-tso",
            Workload::V6Crr => "v6-crr",
            Workload::V6Udp64 => "v6-udp64",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Workload::Tcp1 => "TCP, 1 stream (iperf3), client's transmit offloads off",
            Workload::Tcp1Tso => {
                "TCP, 1 stream (iperf3), client's TSO, GSO and checksum offload on"
            }
            Workload::Tcp4 => "TCP, 4 streams (iperf3)",
            Workload::Crr => "new connection per request (wrk, Connection: close)",
            Workload::KeepAlive => "HTTP keep-alive request rate (wrk)",
            Workload::Latency => "TCP request/response latency (64 B echo, 1 connection)",
            Workload::Udp64 => "64-byte UDP (live-frames generator, BPF sink)",
            Workload::LocalCrr => "localhost:PORT from the host, new connection per request",
            Workload::LocalTcp1 => "localhost:PORT from the host, TCP 1 stream",
            Workload::V6Tcp1 => "IPv6 client to the IPv4-only container, TCP 1 stream",
            Workload::V6Tcp1Tso => {
                "IPv6 client to the IPv4-only container, TCP 1 stream, client's offloads on"
            }
            Workload::V6Crr => "IPv6 client to the IPv4-only container, new connection per request",
            Workload::V6Udp64 => {
                "64-byte UDP over IPv6, end to end (live-frames generator, BPF sink)"
            }
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|w| w.name() == s)
    }

    /// From the client's IPv6 address (served only by a proxy or NAT64).
    pub fn is_v6(self) -> bool {
        matches!(
            self,
            Workload::V6Tcp1 | Workload::V6Tcp1Tso | Workload::V6Crr
        )
    }
}

/// One number a workload produced, with the amount of work it stands for (requests,
/// packets, bytes), so CPU per unit can be derived.
#[derive(Clone, Debug)]
pub struct Measure {
    pub metric: &'static str,
    pub value: f64,
    /// Requests, packets or GB done during the run (0 when CPU per unit makes no sense).
    pub units: f64,
    pub note: String,
    /// CPU seconds to charge instead of both cores' busy time (UDP: the forwarding core).
    pub cpu_override: Option<f64>,
}

impl Measure {
    fn new(metric: &'static str, value: f64, units: f64) -> Self {
        Self {
            metric,
            value,
            units,
            note: String::new(),
            cpu_override: None,
        }
    }
}

/// Unit of "CPU per unit" for a metric.
pub fn cpu_unit(metric: &str) -> (&'static str, f64) {
    match metric {
        "gbit_s" => ("CPU-ms/GB", 1e3),
        "req_s" => ("CPU-µs/req", 1e6),
        "mpps" => ("CPU-ns/pkt", 1e9),
        _ => ("", 0.0),
    }
}

pub fn iperf3(
    ns: &Netns,
    cgroup: Option<&sys::Cgroup>,
    addr: IpAddr,
    port: u16,
    streams: u32,
    secs: u64,
) -> Result<Measure> {
    // `timeout`: a client that cannot connect (a broken path) must not stall the run.
    let limit = (secs + 10).to_string();
    let out = sys::run(sys::client_cmd(ns, cgroup, "timeout").args([
        "-k",
        "5",
        &limit,
        "iperf3",
        "--connect-timeout",
        "3000",
        "-c",
        &addr.to_string(),
        "-p",
        &port.to_string(),
        "-t",
        &secs.to_string(),
        "-P",
        &streams.to_string(),
        "-J",
    ]))?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    if let Some(e) = v.get("error") {
        bail!("iperf3: {e}");
    }
    let r = &v["end"]["sum_received"];
    let bps = r["bits_per_second"].as_f64().context("iperf3: no rate")?;
    let bytes = r["bytes"].as_f64().unwrap_or(0.0);
    let retr = v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    let mut m = Measure::new("gbit_s", bps / 1e9, bytes / 1e9);
    m.note = format!("retransmits={retr}");
    Ok(m)
}

/// One bulk TCP stream with the client's transmit offloads (checksum, TSO, GSO) on when
/// `offloads`, off again after (the topology keeps them off): with them on, the client
/// hands the host 64 KB super-packets and the run measures the forwarder per
/// super-packet, not the client's segmentation.
pub fn bulk(ns: &Netns, addr: IpAddr, port: u16, offloads: bool, secs: u64) -> Result<Measure> {
    if !offloads {
        return iperf3(ns, None, addr, port, 1, secs);
    }
    ns.sh(&format!(
        "ethtool -K {CLIENT_IF} tx on tso on gso on >/dev/null"
    ))
    .context("client offloads on")?;
    let r = iperf3(ns, None, addr, port, 1, secs);
    let off = ns.sh(&format!("ethtool -K {CLIENT_IF} tx off tso off >/dev/null"));
    let mut m = r?;
    off.context("client offloads off")?;
    m.note += " client_offloads=on";
    Ok(m)
}

/// wrk against the container's HTTP server; `close`: a new connection per request.
pub fn wrk(
    ns: &Netns,
    cgroup: Option<&sys::Cgroup>,
    addr: IpAddr,
    port: u16,
    close: bool,
    secs: u64,
) -> Result<Vec<Measure>> {
    let mut cmd = sys::client_cmd(ns, cgroup, "timeout");
    cmd.args(["-k", "5", &(secs + 10).to_string(), "wrk"]);
    cmd.args(["-t1", "-c32", &format!("-d{secs}s"), "--latency"]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("http://{}/", SocketAddr::new(addr, port)));
    let out = sys::run(&mut cmd)?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("wrk output without a rate:\n{text}"))?;
    let total = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    let errors: String = text
        .lines()
        .filter(|l| l.contains("Socket errors") || l.contains("Non-2xx"))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ");
    if total == 0.0 {
        bail!("wrk completed no request:\n{text}");
    }
    let mut m = Measure::new("req_s", rps, total);
    m.note = errors;
    let mut v = vec![m];
    for (pct, metric) in [("50%", "wrk_p50_us"), ("99%", "wrk_p99_us")] {
        if let Some(us) = text
            .lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(pct))
            .and_then(|x| parse_duration_us(x.trim()))
        {
            v.push(Measure::new(metric, us, 0.0));
        }
    }
    Ok(v)
}

fn parse_duration_us(s: &str) -> Option<f64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n,
        "ms" => n * 1e3,
        "s" => n * 1e6,
        "m" => n * 60e6,
        _ => return None,
    })
}

/// SYN retransmissions counted in a namespace so far (`nstat`, absolute counters).
pub fn syn_retrans(ns: &Netns) -> u64 {
    let out = ns
        .command("nstat")
        .args(["-asz", "TcpExtTCPSynRetrans"])
        .output();
    let Ok(out) = out else { return 0 };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("TcpExtTCPSynRetrans"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Request/response latency: one connection, 64-byte request echoed back, one at a time.
pub fn latency(ns: &Netns, addr: Ipv4Addr, port: u16, secs: u64) -> Result<Vec<Measure>> {
    let samples = sys::on_thread(ns, move || {
        let mut s = TcpStream::connect_timeout(
            &SocketAddrV4::new(addr, port).into(),
            Duration::from_secs(5),
        )?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let req = [0x5au8; ECHO_LEN];
        let mut resp = [0u8; ECHO_LEN];
        for _ in 0..200 {
            s.write_all(&req)?;
            s.read_exact(&mut resp)?;
        }
        let mut ns: Vec<u32> = Vec::with_capacity(1 << 20);
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            let t = Instant::now();
            s.write_all(&req)?;
            s.read_exact(&mut resp)?;
            ns.push(t.elapsed().as_nanos().min(u32::MAX as u128) as u32);
        }
        Ok(ns)
    })?;
    let mut sorted = samples;
    sorted.sort_unstable();
    if sorted.is_empty() {
        bail!("no request completed");
    }
    let pct = |p: f64| sorted[((sorted.len() - 1) as f64 * p).round() as usize] as f64 / 1e3;
    let n = sorted.len() as f64;
    Ok(vec![
        Measure::new("p50_us", pct(0.50), 0.0),
        Measure::new("p99_us", pct(0.99), 0.0),
        Measure::new("rr_req_s", n / secs as f64, n),
    ])
}

/// 64-byte UDP frames offered by BPF_PROG_RUN in live-frames mode from the client's
/// veth (the generator writes the whole template into every frame: live-frame pages are
/// recycled without being reset), forwarded by the host, counted and dropped by an XDP
/// sink on the container's veth. The host veth has GRO (NAPI); its NAPI thread is made
/// threaded and pinned to CPU 1, the generator to CPU 0; CPU per packet is the forwarding CPU's.
/// The sink also sits at the container's TC ingress, where frames handed over by
/// `bpf_redirect_peer` arrive (they skip the veth's NAPI, so its XDP program). `dst`'s
/// family picks the frame's (IPv6: `v6-udp64`).
pub fn udp64(
    topo: &Topology,
    art: &Artifacts,
    dst: IpAddr,
    dport: u16,
    secs: u64,
    flows: u32,
) -> Result<Measure> {
    let hif = topo.host_if.clone();
    // GRO (NAPI) is on for every workload (the topology turns it on).
    topo.host
        .sh(&format!("echo 1 > /sys/class/net/{hif}/threaded"))?;
    let pinned = sys::pin_kthreads(&format!("napi/{hif}-"), 1);
    let (host_mac, client_mac) = (
        Topology::mac(&topo.host, &hif)?,
        Topology::mac(&topo.client, CLIENT_IF)?,
    );
    let frame = match dst {
        IpAddr::V4(dst) => udp_frame(host_mac, client_mac, CLIENT_IP, dst, 40_000, dport),
        IpAddr::V6(dst) => udp6_frame(host_mac, client_mac, CLIENT_IP6, dst, 40_000, dport),
    };
    let ifindex = Topology::ifindex(&topo.client, CLIENT_IF)?;
    let (client_path, ct_path) = (topo.client.path(), topo.ct.path());
    let obj = art.bench_object.clone();
    let result = sys::on_thread(&topo.ct, move || {
        let mut ebpf = EbpfLoader::new().load_file(&obj)?;
        {
            let sink: &mut Xdp = ebpf
                .program_mut("bench_sink")
                .context("bench_sink")?
                .try_into()?;
            sink.load()?;
            sink.attach(CT_IF, XdpMode::Driver)
                .context("attach the sink (native XDP) to the container's veth")?;
        }
        {
            let sink: &mut SchedClassifier = ebpf
                .program_mut("bench_sink_tc")
                .context("bench_sink_tc")?
                .try_into()?;
            sink.load()?;
            sink.attach(CT_IF, TcAttachType::Ingress)
                .context("attach the sink (TC ingress) to the container's veth")?;
        }
        let mut port: Array<_, [u8; 2]> =
            Array::try_from(ebpf.map_mut("BENCH_SINK_PORT").context("BENCH_SINK_PORT")?)?;
        port.set(0, UDP.0.to_be_bytes(), 0)?;
        let mut tpl: Array<_, [u8; 64]> =
            Array::try_from(ebpf.map_mut("BENCH_TEMPLATE").context("BENCH_TEMPLATE")?)?;
        tpl.set(0, frame, 0)?;
        // `flows` > 0: each frame from its own source (`BENCH_SPREAD`, the scale runs).
        let mut spread: Array<_, [u32; 2]> =
            Array::try_from(ebpf.map_mut("BENCH_SPREAD").context("BENCH_SPREAD")?)?;
        spread.set(0, [flows, 0], 0)?;
        {
            let gen: &mut Xdp = ebpf
                .program_mut("bench_gen")
                .context("bench_gen")?
                .try_into()?;
            gen.load()?;
        }
        let count = |ebpf: &aya::Ebpf| -> Result<u64> {
            let c: PerCpuArray<_, u64> =
                PerCpuArray::try_from(ebpf.map("BENCH_SINK_COUNT").context("count")?)?;
            Ok(c.get(&0, 0)?.iter().sum())
        };
        sys::enter(&client_path)?;
        sys::pin_current_thread(0)?;
        let gen: &Xdp = ebpf.program("bench_gen").context("bench_gen")?.try_into()?;
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex.
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&64u32.to_ne_bytes());
        ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        let before = count(&ebpf)?;
        let cpu0 = sys::CpuStat::now();
        let start = Instant::now();
        let mut offered: u64 = 0;
        let chunk = 1u32 << 20;
        while start.elapsed() < Duration::from_secs(secs) {
            gen.test_run(TestRunOptions {
                data_in: Some(&frame),
                ctx_in: Some(&ctx),
                repeat: chunk,
                attrs: TestRunAttrs::new().xdp_live_frames(64),
                ..Default::default()
            })
            .context("BPF_PROG_RUN live frames")?;
            offered += u64::from(chunk);
        }
        let elapsed = start.elapsed().as_secs_f64();
        // Frames still in flight land within a few ms.
        std::thread::sleep(Duration::from_millis(50));
        let cpu1 = sys::CpuStat::now();
        let delivered = count(&ebpf)? - before;
        sys::enter(&ct_path)?; // detach where the sink was attached
        drop(ebpf);
        Ok((delivered, offered, elapsed, cpu1.cpu_busy_since(&cpu0, 1)))
    });
    let _ = topo
        .host
        .sh(&format!("echo 0 > /sys/class/net/{hif}/threaded"));
    let (delivered, offered, elapsed, fwd_cpu) = result?;
    let mut m = Measure::new("mpps", delivered as f64 / elapsed / 1e6, delivered as f64);
    m.note = format!(
        "offered={:.2}Mpps napi_threads_pinned={pinned}",
        offered as f64 / elapsed / 1e6
    );
    m.cpu_override = Some(fwd_cpu);
    Ok(m)
}
