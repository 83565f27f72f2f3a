//! Scale (issues #11 and #13): what portfwd costs with many live flows and many published
//! ports.
//!
//! - **Hit cost**: the flow table filled from userspace with real flow keys (flow `n`:
//!   the client's address plus `n / 32768` in its low 16 bits, source port
//!   `1024 + n % 32768`, as `bench_gen`'s `BENCH_SPREAD` makes them), then frames of
//!   randomly drawn live flows, each run once through BPF_PROG_RUN (`repeat` 1, so every
//!   packet looks up another flow and misses the cache as in production): the reply
//!   translator (TC egress: one flow lookup) and the ingress programs on a UDP hit (rule
//!   lookup, then the flow's lookup to see it is recorded). The floor is an empty program
//!   of the same type run the same way, over the same frames.
//! - **Forwarding**: 64-byte UDP (`work::udp64`) from as many sources as flows, through
//!   the daemon at TC with `--max-flows` above the count; a first run records flows (as
//!   embryonic: nothing answers them) and so the value the programs write, then every
//!   flow is filled into the established table through the daemon's map, so the measured
//!   runs hit live established flows, as a host with that many connections does.
//! - **Ports**: one range publishing N ports (at most 1-65535, every TCP port; one
//!   declaration per port would run out of counter slots at 16,384): time to publish,
//!   the daemon's resident memory and its BPF maps' memory, and an echo through one of
//!   the ports.

use std::{
    net::Ipv4Addr,
    os::fd::AsFd,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Array, HashMap, Map, MapData, MapInfo},
    programs::{tc::SchedClassifier, ProgramError, TestRun, TestRunOptions, TestRunResult, Xdp},
    Ebpf, EbpfLoader,
};
use portfwd_common::kctx::{Prepared, SKB_IP_SUMMED_BIT};
use portfwd_common::{
    backend_port_bit, port_bits, programs, proto, rule_cache::CachedRuleV4, BackendV4, FlowKeyV4,
    FlowV4, RuleKeyV4, BACKEND_PORTS, CONNTRACK_V4, EMBRYONIC_V4, PUBLISHED_PORTS, RULES_V4,
    RULE_CACHE_V4,
};

use super::{
    frame::udp_frame,
    micro::raw,
    sys::{self, Proc},
    topo::{Artifacts, Topology, CLIENT_IP, CT_IP, ECHO, HOST_IP, UDP},
    work,
};

#[derive(Clone, Debug, serde::Serialize)]
pub struct ScaleResult {
    /// `hit cost`, `forwarding` or `ports`.
    pub measure: String,
    pub case: String,
    /// Live flows, or ports published.
    pub scale: u64,
    /// Median over the passes or runs, with min and max; `None` when the case failed.
    pub median: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub unit: String,
    /// Hit cost: the median minus the empty program's of the same run.
    pub over_floor: Option<f64>,
    pub note: String,
}

/// What to run.
pub struct Plan {
    /// Live flows for the hit cost.
    pub cost_flows: Vec<u32>,
    /// Frames (distinct draws of a live flow) per pass, and passes.
    pub frames: usize,
    pub passes: usize,
    /// Live flows for the forwarding rate, runs of `secs` each.
    pub rate_flows: Vec<u32>,
    pub rate_runs: usize,
    pub secs: u64,
    /// Longest wait for an idle machine before each rate run and hit-cost size.
    pub settle: Duration,
    /// Ports published as one range.
    pub ports: u32,
}

pub fn run(art: &Artifacts, prefix: &str, sock_dir: &str, plan: &Plan) -> Vec<ScaleResult> {
    let mut out = Vec::new();
    for &flows in &plan.cost_flows {
        eprintln!("bench:   hit cost, {flows} live flows");
        let load = sys::settle(plan.settle);
        match hit_cost(&art.bpf_object, flows, plan.frames, plan.passes, load) {
            Ok(mut r) => out.append(&mut r),
            Err(e) => out.push(failed("hit cost", "BPF_PROG_RUN", flows, &e)),
        }
    }
    // Each hit cost against the smallest table's, of the same run.
    let smallest = plan.cost_flows.first().copied().unwrap_or(0);
    let base: Vec<(String, f64)> = out
        .iter()
        .filter(|r| r.measure == "hit cost" && r.scale == u64::from(smallest))
        .filter_map(|r| Some((r.case.clone(), r.over_floor?)))
        .collect();
    for r in out.iter_mut().filter(|r| r.scale != u64::from(smallest)) {
        let b = base.iter().find(|(c, _)| *c == r.case).map(|(_, b)| *b);
        if let (Some(b), Some(x)) = (b, r.over_floor) {
            r.note = format!("{:+.1} ns vs {smallest} flows", x - b);
        }
    }
    for (i, &flows) in plan.rate_flows.iter().enumerate() {
        eprintln!("bench:   forwarding, {flows} flows");
        let p = format!("{prefix}f{i}");
        match forwarding(art, &p, sock_dir, flows, plan) {
            Ok(r) => out.push(r),
            Err(e) => out.push(failed("forwarding", "64-byte UDP, TC", flows, &e)),
        }
    }
    // Each rate against the first (one flow), of the same run.
    let first = out
        .iter()
        .find(|r| r.measure == "forwarding")
        .and_then(|r| Some((r.scale, r.median?)));
    if let Some((n, base)) = first {
        for r in out
            .iter_mut()
            .filter(|r| r.measure == "forwarding" && r.scale != n)
        {
            if let Some(m) = r.median {
                r.note = format!("{:.2}× {n} flow(s); {}", m / base, r.note);
            }
        }
    }
    eprintln!("bench:   publishing {} ports", plan.ports);
    match ports(art, &format!("{prefix}p"), sock_dir, plan.ports) {
        Ok(mut r) => out.append(&mut r),
        Err(e) => out.push(failed("ports", "one range", plan.ports, &e)),
    }
    out
}

fn failed(measure: &str, case: &str, scale: u32, e: &anyhow::Error) -> ScaleResult {
    ScaleResult {
        measure: measure.into(),
        case: case.into(),
        scale: scale.into(),
        median: None,
        min: None,
        max: None,
        unit: String::new(),
        over_floor: None,
        note: format!("failed: {}", format!("{e:#}").replace('\n', " ")),
    }
}

/// Flow `n`'s client address and port, as `bench_gen` spreads them.
pub fn flow_source(n: u32) -> (Ipv4Addr, u16) {
    let o = CLIENT_IP.octets();
    let lo = u16::from_be_bytes([o[2], o[3]]).wrapping_add((n / 32_768) as u16);
    let [a, b] = lo.to_be_bytes();
    (Ipv4Addr::new(o[0], o[1], a, b), 1024 + (n % 32_768) as u16)
}

/// The flow table size for `flows` live ones: a quarter of headroom (an LRU map evicts
/// a little before full), never below the daemon's default.
pub fn capacity_for(flows: u32) -> u32 {
    (flows + flows / 4).max(portfwd_common::MAX_FLOWS)
}

/// A small deterministic generator (xorshift64*), so every run draws the same flows.
struct Draw(u64);

impl Draw {
    fn below(&mut self, n: u32) -> u32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) % u64::from(n)) as u32
    }
}

const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];
const XDP_PASS: i32 = 2;
const TC_ACT_UNSPEC: i32 = -1;

fn hit_cost(
    obj: &Path,
    flows: u32,
    frames: usize,
    passes: usize,
    load: f64,
) -> Result<Vec<ScaleResult>> {
    let capacity = capacity_for(flows);
    let object = Prepared::for_running_kernel(&std::fs::read(obj)?);
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(CONNTRACK_V4, capacity)
        .override_global(SKB_IP_SUMMED_BIT, &object.ip_summed_bit, true)
        .load(object.bytes())
        .context("load portfwd's BPF object")?;
    for name in [programs::TC_INGRESS, programs::TC_EGRESS] {
        let p: &mut SchedClassifier = ebpf.program_mut(name).context(name)?.try_into()?;
        p.load()?;
    }
    let p: &mut Xdp = ebpf
        .program_mut(programs::XDP_INGRESS)
        .context("xdp")?
        .try_into()?;
    p.load()?;
    let fill_s = seed(&mut ebpf, flows)?;

    // Frames of randomly drawn live flows: the client's datagram, and the backend's reply.
    let mut draw = Draw(0x9e37_79b9_7f4a_7c15 ^ u64::from(flows));
    let picks: Vec<u32> = (0..frames).map(|_| draw.below(flows)).collect();
    let ingress: Vec<[u8; 64]> = picks
        .iter()
        .map(|&n| {
            let (client, port) = flow_source(n);
            udp_frame(MAC_A, MAC_B, client, HOST_IP, port, UDP.1)
        })
        .collect();
    let replies: Vec<[u8; 64]> = picks
        .iter()
        .map(|&n| {
            let (client, port) = flow_source(n);
            udp_frame(MAC_B, MAC_A, CT_IP, client, UDP.0, port)
        })
        .collect();
    let ct: HashMap<_, FlowKeyV4, FlowV4> =
        HashMap::try_from(ebpf.map(CONNTRACK_V4).context(CONNTRACK_V4)?)?;
    let tracked = picks
        .iter()
        .filter(|&&n| ct.get(&key(n), 0).is_ok())
        .count();
    if tracked < frames {
        bail!(
            "{} of {frames} drawn flows are not in the table",
            frames - tracked
        );
    }

    let xdp_floor = raw::load(raw::PROG_XDP, XDP_PASS)?;
    let tc_floor = raw::load(raw::PROG_SCHED_CLS, TC_ACT_UNSPEC)?;
    let xdp: &Xdp = ebpf
        .program(programs::XDP_INGRESS)
        .context("xdp")?
        .try_into()?;
    let tc_in: &SchedClassifier = ebpf
        .program(programs::TC_INGRESS)
        .context("tc")?
        .try_into()?;
    let tc_out: &SchedClassifier = ebpf
        .program(programs::TC_EGRESS)
        .context("tc egress")?
        .try_into()?;
    // (case, floor's index, per-pass mean ns)
    let mut cases: Vec<(&str, usize, Vec<f64>)> = vec![
        ("floor: empty XDP program", 0, Vec::new()),
        ("floor: empty TC program", 1, Vec::new()),
        ("ingress hit, UDP, flow recorded (XDP)", 0, Vec::new()),
        ("ingress hit, UDP, flow recorded (TC)", 1, Vec::new()),
        ("reply of a live flow (TC egress)", 1, Vec::new()),
    ];
    for _ in 0..passes.max(1) {
        cases[0].2.push(mean(&ingress, |f| {
            raw::time_loaded(xdp_floor.as_fd(), f, 1).map(|t| t.0)
        })?);
        cases[1].2.push(mean(&ingress, |f| {
            raw::time_loaded(tc_floor.as_fd(), f, 1).map(|t| t.0)
        })?);
        cases[2]
            .2
            .push(mean(&ingress, |f| once(|o| xdp.test_run(o), f))?);
        cases[3]
            .2
            .push(mean(&ingress, |f| once(|o| tc_in.test_run(o), f))?);
        cases[4]
            .2
            .push(mean(&replies, |f| once(|o| tc_out.test_run(o), f))?);
    }
    let floors = [median(&cases[0].2), median(&cases[1].2)];
    Ok(cases
        .into_iter()
        .map(|(case, floor, v)| {
            let m = median(&v);
            let over = (!case.starts_with("floor")).then(|| m - floors[floor]);
            let note = if over.is_none() {
                format!(
                    "table of {capacity}, filled in {fill_s:.1} s; background load {:.0} %",
                    load * 100.0
                )
            } else {
                String::new()
            };
            ScaleResult {
                measure: "hit cost".into(),
                case: case.into(),
                scale: flows.into(),
                median: Some(m),
                min: v.iter().copied().reduce(f64::min),
                max: v.iter().copied().reduce(f64::max),
                unit: "ns/packet".into(),
                over_floor: over,
                note,
            }
        })
        .collect())
}

/// The rule the frames hit and `flows` live flows; returns the seconds the fill took.
fn seed(ebpf: &mut Ebpf, flows: u32) -> Result<f64> {
    let mut rules: HashMap<_, RuleKeyV4, BackendV4> =
        HashMap::try_from(ebpf.map_mut(RULES_V4).context(RULES_V4)?)?;
    let (rule, backend) = (
        RuleKeyV4::from_parts(HOST_IP, UDP.1, proto::UDP),
        BackendV4::new(CT_IP, UDP.0, 0),
    );
    rules.insert(rule, backend, 0)?;
    // Cached as the daemon caches it.
    let mut cache: Array<_, CachedRuleV4> =
        Array::try_from(ebpf.map_mut(RULE_CACHE_V4).context(RULE_CACHE_V4)?)?;
    cache.set(
        CachedRuleV4::slot(&rule),
        CachedRuleV4::new(rule, backend),
        0,
    )?;
    let mut ports: Array<_, u8> =
        Array::try_from(ebpf.map_mut(PUBLISHED_PORTS).context(PUBLISHED_PORTS)?)?;
    ports.set(u32::from(UDP.1), port_bits(proto::UDP).0, 0)?;
    let mut backend_ports: Array<_, u8> =
        Array::try_from(ebpf.map_mut(BACKEND_PORTS).context(BACKEND_PORTS)?)?;
    backend_ports.set(u32::from(UDP.0), backend_port_bit(proto::UDP), 0)?;
    let mut ct: HashMap<_, FlowKeyV4, FlowV4> =
        HashMap::try_from(ebpf.map_mut(CONNTRACK_V4).context(CONNTRACK_V4)?)?;
    // What the ingress program would record: the published address, counter slot 0.
    let value = FlowV4::new(HOST_IP.octets(), UDP.1.to_be_bytes(), 0);
    let start = Instant::now();
    for n in 0..flows {
        ct.insert(key(n), value, 0)?;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Flow `n`'s conntrack key: the reply's view, backend to client.
fn key(n: u32) -> FlowKeyV4 {
    let (client, port) = flow_source(n);
    FlowKeyV4::new(
        CT_IP.octets(),
        UDP.0.to_be_bytes(),
        client.octets(),
        port.to_be_bytes(),
        proto::UDP,
    )
}

/// One BPF_PROG_RUN of `data`, its kernel-timed ns.
fn once(
    run: impl Fn(TestRunOptions<'_>) -> Result<TestRunResult, ProgramError>,
    data: &[u8],
) -> Result<f64> {
    let mut buf = [0u8; 64 + 256];
    let r = run(TestRunOptions {
        data_in: Some(data),
        data_out: Some(&mut buf),
        repeat: 1,
        ..Default::default()
    })
    .context("BPF_PROG_RUN")?;
    Ok(r.duration.as_nanos() as f64)
}

fn mean(frames: &[[u8; 64]], mut f: impl FnMut(&[u8]) -> Result<f64>) -> Result<f64> {
    let mut sum = 0.0;
    for frame in frames {
        sum += f(frame)?;
    }
    Ok(sum / frames.len().max(1) as f64)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The daemon at TC in `topo`'s host namespace, with these extra arguments; waits until
/// it answers.
fn start_daemon(
    art: &Artifacts,
    topo: &Topology,
    sock: &str,
    log_name: &str,
    extra: &[String],
) -> Result<Proc> {
    let (Some(daemon), Some(ctl)) = (&art.daemon, &art.ctl) else {
        bail!("portfwd is not built");
    };
    let log = std::fs::File::create(art.log_dir.join(log_name))?;
    let mut cmd = sys::daemon_cmd(&topo.host, daemon);
    cmd.args([
        "--iface",
        &topo.host_if,
        "--ingress",
        "tc",
        "--socket",
        sock,
    ])
    .args(extra)
    .arg("--cgroup")
    .arg(&topo.cgroup.daemon_path);
    super::variants::no_pin(&mut cmd, daemon);
    cmd.stdout(log.try_clone()?).stderr(log);
    let mut d = Proc::spawn("portfwd", &mut cmd)?;
    sys::wait_for("the portfwd socket", Duration::from_secs(60), || {
        Command::new(ctl)
            .args(["--socket", sock, "list"])
            .output()
            .is_ok_and(|o| o.status.success())
    })?;
    d.check_alive()?;
    Ok(d)
}

fn ctl(art: &Artifacts, sock: &str, args: &[&str]) -> Result<String> {
    let ctl = art.ctl.as_ref().context("portfwd-ctl is not built")?;
    let out = sys::run(Command::new(ctl).args(["--socket", sock]).args(args))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `conntrack_v4`'s (entries, capacity) from `flows --json`.
fn conntrack_usage(art: &Artifacts, sock: &str) -> Result<(u64, u64)> {
    let v: serde_json::Value =
        serde_json::from_str(&ctl(art, sock, &["flows", "--json", "--limit", "0"])?)?;
    v["tables"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["table"] == "conntrack_v4"))
        .and_then(|t| Some((t["entries"].as_u64()?, t["capacity"].as_u64()?)))
        .context("no conntrack_v4 in `flows --json`")
}

/// What the daemon counted that tells whether every frame hit a live flow (`list --json`).
fn reasons(art: &Artifacts, sock: &str) -> Result<String> {
    let v: serde_json::Value = serde_json::from_str(&ctl(art, sock, &["list", "--json"])?)?;
    let counted = ["translated", "flow_insert_failed", "pass_no_rule"]
        .map(|r| format!("{r} {}", v["reasons"][r].as_u64().unwrap_or(0)));
    Ok(counted.join(", "))
}

/// The BPF maps process `pid` holds, each once, as id and kernel memory (`memlock`),
/// from /proc/PID/fdinfo.
fn maps_held(pid: u32) -> Option<std::collections::BTreeMap<u32, u64>> {
    let mut maps = std::collections::BTreeMap::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).ok()? {
        let Ok(info) = std::fs::read_to_string(fd.ok()?.path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) {
            maps.insert(id as u32, memlock);
        }
    }
    Some(maps)
}

/// The kernel memory of the BPF maps process `pid` holds.
fn map_memory(pid: u32) -> Option<u64> {
    Some(maps_held(pid)?.values().sum())
}

/// The daemon's map `name` (flow key and value types), opened by id: one of the maps
/// process `pid` holds.
fn daemon_flow_map(pid: u32, name: &str) -> Result<HashMap<MapData, FlowKeyV4, FlowV4>> {
    let ids = maps_held(pid).context("cannot read the daemon's descriptors")?;
    let id = ids
        .keys()
        .copied()
        .find(|&id| MapInfo::from_id(id).is_ok_and(|i| i.name_as_str() == Some(name)))
        .with_context(|| format!("the daemon holds no {name}"))?;
    let map = Map::from_map_data(MapData::from_id(id)?)?;
    Ok(HashMap::try_from(map)?)
}

/// Fills the daemon's established flow table with flows `0..flows`, as its programs
/// record them: the value (published address, the rule's counter slot) copied from a
/// flow they recorded (embryonic: the sink answers nothing, so none is promoted).
/// Returns the seconds the fill took.
fn prefill(pid: u32, flows: u32) -> Result<f64> {
    let recorded = |name: &str| -> Result<Option<FlowV4>> {
        let map = daemon_flow_map(pid, name)?;
        let first = map.iter().filter_map(Result::ok).map(|(_, v)| v).next();
        Ok(first)
    };
    let value = match recorded(CONNTRACK_V4)? {
        Some(v) => v,
        None => recorded(EMBRYONIC_V4)?.context("no flow recorded by the first run")?,
    };
    let mut ct = daemon_flow_map(pid, CONNTRACK_V4)?;
    let start = Instant::now();
    for n in 0..flows {
        ct.insert(key(n), value, 0)?;
    }
    Ok(start.elapsed().as_secs_f64())
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn forwarding(
    art: &Artifacts,
    prefix: &str,
    sock_dir: &str,
    flows: u32,
    plan: &Plan,
) -> Result<ScaleResult> {
    let host_if = format!("{}h", &prefix[prefix.len().saturating_sub(10)..]);
    let topo = Topology::build(prefix, &host_if, &art.xtask)?;
    let sock = format!("{sock_dir}/{prefix}.sock");
    let capacity = capacity_for(flows);
    let mut d = start_daemon(
        art,
        &topo,
        &sock,
        &format!("{prefix}.log"),
        &["--max-flows".into(), capacity.to_string()],
    )?;
    ctl(
        art,
        &sock,
        &[
            "add",
            &format!("{}/udp", UDP.1),
            &format!("{CT_IP}:{}", UDP.0),
        ],
    )?;
    // A first run records flows (those of the frames the host did not drop), then the
    // rest are filled in from userspace with the value the programs wrote.
    work::udp64(&topo, art, HOST_IP.into(), UDP.1, 1, flows)?;
    let fill_s = prefill(d.pid(), flows)?;
    let (before, _) = conntrack_usage(art, &sock)?;
    let (mut v, mut load) = (Vec::new(), 0.0f64);
    for _ in 0..plan.rate_runs.max(1) {
        load = load.max(sys::settle(plan.settle));
        v.push(work::udp64(&topo, art, HOST_IP.into(), UDP.1, plan.secs, flows)?.value);
    }
    d.check_alive()?;
    let (live, cap) = conntrack_usage(art, &sock)?;
    let reasons = reasons(art, &sock)?;
    let maps = map_memory(d.pid()).map(mb).unwrap_or_else(|| "–".into());
    d.stop();
    Ok(ScaleResult {
        measure: "forwarding".into(),
        case: "64-byte UDP through TC, one flow per source".into(),
        scale: flows.into(),
        median: Some(median(&v)),
        min: v.iter().copied().reduce(f64::min),
        max: v.iter().copied().reduce(f64::max),
        unit: "Mpps".into(),
        over_floor: None,
        note: format!(
            "--max-flows {capacity}: conntrack_v4 {before} before, {live}/{cap} after \
             (filled in {fill_s:.1} s); BPF maps {maps}; runs: {}, background load up to {:.0} %; \
             counted: {reasons}",
            v.len(),
            load * 100.0
        ),
    })
}

fn ports(art: &Artifacts, prefix: &str, sock_dir: &str, count: u32) -> Result<Vec<ScaleResult>> {
    let host_if = format!("{}h", &prefix[prefix.len().saturating_sub(10)..]);
    let topo = Topology::build(prefix, &host_if, &art.xtask)?;
    let sock = format!("{sock_dir}/{prefix}.sock");
    let mut d = start_daemon(art, &topo, &sock, &format!("{prefix}.log"), &[])?;
    let (rss0, maps0) = (sys::rss_kib(d.pid()), map_memory(d.pid()));
    // One to one, host port P to the container's P, around its echo server's port.
    let count = count.clamp(1, 65_535);
    let first = u32::from(ECHO.0)
        .saturating_sub(count / 2)
        .clamp(1, 65_536 - count);
    let range = format!("{first}-{}", first + count - 1);
    let start = Instant::now();
    ctl(
        art,
        &sock,
        &["add", &format!("{range}/tcp"), &format!("{CT_IP}:{range}")],
    )?;
    let secs = start.elapsed().as_secs_f64();
    d.check_alive()?;
    let (rss, maps) = (sys::rss_kib(d.pid()), map_memory(d.pid()));
    let listed = ctl(art, &sock, &["list"])?;
    if !listed.contains(&format!("*:{range} ")) {
        bail!("`list` does not show the range *:{range}");
    }
    // Forwarding still works: an echo through one of the ports.
    let echo = work::latency(&topo.client, HOST_IP, ECHO.0, 1)?;
    d.stop();
    let row = |case: &str, value: f64, unit: &str, note: String| ScaleResult {
        measure: "ports".into(),
        case: case.into(),
        scale: count.into(),
        median: Some(value),
        min: None,
        max: None,
        unit: unit.into(),
        over_floor: None,
        note,
    };
    let kib = |k: Option<u64>| k.map_or_else(|| "–".into(), |k| mb(k * 1024));
    let bytes = |b: Option<u64>| b.map_or_else(|| "–".into(), mb);
    let p50 = echo.first().map_or(0.0, |m| m.value);
    Ok(vec![
        row(
            "publish as one range (portfwd-ctl add A-B)",
            secs,
            "s",
            format!("ports {range}"),
        ),
        row(
            "daemon resident memory after",
            rss.unwrap_or(0) as f64 * 1024.0 / 1e6,
            "MB",
            format!("{} before", kib(rss0)),
        ),
        row(
            "BPF maps' memory (memlock) after",
            maps.unwrap_or(0) as f64 / 1e6,
            "MB",
            format!("{} before (preallocated)", bytes(maps0)),
        ),
        row(
            &format!("echo through port {} after (p50)", ECHO.0),
            p50,
            "µs",
            echo.get(1)
                .map(|m| format!("p99 {:.0} µs", m.value))
                .unwrap_or_default(),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_spread_as_bench_gen_does() {
        assert_eq!(flow_source(0), (CLIENT_IP, 1024));
        assert_eq!(flow_source(32_767), (CLIENT_IP, 1024 + 32_767));
        let (a, p) = flow_source(32_768 * 30 + 5);
        assert_eq!((a, p), (Ipv4Addr::new(198, 18, 1, 32), 1029));
        assert_eq!(capacity_for(1_000), portfwd_common::MAX_FLOWS);
        assert_eq!(capacity_for(1_000_000), 1_250_000);
    }
}
