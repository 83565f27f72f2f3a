//! Program cost: nanoseconds per packet of each portfwd program, timed by the kernel
//! with BPF_PROG_RUN and `repeat`, beside an empty program of the same type (the floor).
//!
//! With `repeat` the kernel runs the program on one buffer, so from the second run on a
//! rewriting program sees its own output: the maps also hold an entry for the rewritten
//! packet (a rule for the backend's address, a flow for the published one), so every
//! iteration takes the hit path, and the per-flow entry already exists (steady state: a
//! flow's state is written once, then only read). A reply hit is answered by the reply
//! cache from the second run on, as a busy flow's replies are; a reply whose flow the
//! cache does not hold pays what "reply miss" shows for its first lookup (the scale
//! table's replies, drawn from many flows, show the mix).

use std::{net::Ipv4Addr, os::fd::OwnedFd, path::Path};

use anyhow::{Context, Result};
use aya::{
    maps::HashMap,
    programs::{tc::SchedClassifier, ProgramError, TestRun, TestRunOptions, TestRunResult, Xdp},
    Ebpf, EbpfLoader,
};
use portfwd_common::kctx::{Prepared, SKB_IP_SUMMED_BIT};
use portfwd_common::{
    backend_port_bit, port_bits, programs, proto, rule_cache::CachedRuleV4, wildcard_bits,
    BackendV4, FlowKeyV4, FlowV4, RuleKeyV4, BACKEND_EXPANDED, BACKEND_PORTS, CONNTRACK_V4,
    HOST_ADDRS_V4, PUBLISHED_PORTS, RULES_V4, RULE_CACHE_V4,
};

use super::{
    frame::{arp_frame, tcp_frame},
    sys,
    topo::{CLIENT_IP, CT_IP, HOST_IP},
};

#[derive(Clone, Debug, serde::Serialize)]
pub struct MicroResult {
    pub program: String,
    pub case: String,
    /// Median of the runs, ns per packet.
    pub ns: f64,
    pub min: f64,
    pub max: f64,
    /// Median minus the empty program of the same type.
    pub over_floor: f64,
    pub retval: u32,
}

const XDP_PASS: i32 = 2;
const TC_ACT_UNSPEC: i32 = -1;

pub fn run(bpf_object: &Path, runs: usize, repeat: u32) -> Result<Vec<MicroResult>> {
    // On a thread of its own, pinned to the last CPU once the machine is quiet: unpinned,
    // the runs moved between CPUs and some took the interrupts and housekeeping of CPU 0
    // (medians 30 % above a pinned run's, ranges twice as wide).
    std::thread::scope(|s| {
        s.spawn(|| {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            sys::pin_current_thread(cpus - 1)?;
            sys::settle(std::time::Duration::from_secs(10));
            run_pinned(bpf_object, runs, repeat)
        })
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the program-cost thread panicked")))
    })
}

fn run_pinned(bpf_object: &Path, runs: usize, repeat: u32) -> Result<Vec<MicroResult>> {
    let object = Prepared::for_running_kernel(&std::fs::read(bpf_object)?);
    let mut ebpf = EbpfLoader::new()
        .override_global(SKB_IP_SUMMED_BIT, &object.ip_summed_bit, true)
        .load(object.bytes())
        .context("load portfwd's BPF object")?;
    for name in [
        programs::TC_INGRESS,
        programs::TC_EGRESS,
        programs::TC_NAT64_ENTRY,
    ] {
        let p: &mut SchedClassifier = ebpf.program_mut(name).context(name)?.try_into()?;
        p.load()?;
    }
    for name in [programs::XDP_INGRESS, programs::XDP_VIRTUAL_INGRESS] {
        let p: &mut Xdp = ebpf.program_mut(name).context(name)?.try_into()?;
        p.load()?;
    }
    seed(&mut ebpf)?;

    let client_port = 40_000;
    let hit = tcp_frame(CLIENT_IP, client_port, HOST_IP, 9000);
    let wildcard = tcp_frame(CLIENT_IP, client_port, HOST_IP, 9001);
    let miss = tcp_frame(CLIENT_IP, client_port, HOST_IP, 9999);
    let arp = arp_frame(CLIENT_IP, HOST_IP);
    let reply = tcp_frame(CT_IP, 8080, CLIENT_IP, client_port);
    let reply_miss = tcp_frame(CT_IP, 8080, CLIENT_IP, client_port + 1);
    // What the host itself sends out of a published interface (here from port 22).
    let host_traffic = tcp_frame(HOST_IP, 22, CLIENT_IP, client_port);

    let xdp_empty = raw::load(raw::PROG_XDP, XDP_PASS)?;
    let tc_empty = raw::load(raw::PROG_SCHED_CLS, TC_ACT_UNSPEC)?;
    let xdp_floor = median_of(runs, || raw::time_loaded(&xdp_empty, &hit, repeat))?;
    let tc_floor = median_of(runs, || raw::time_loaded(&tc_empty, &hit, repeat))?;
    let mut out = vec![
        floor_result("empty XDP program", xdp_floor, 2),
        floor_result("empty TC program", tc_floor, 0),
    ];
    let (xdp_floor, tc_floor) = (&xdp_empty, &tc_empty);

    let cases: [(&str, &str, &[u8]); 4] = [
        ("hit (exact rule)", "ingress", &hit),
        ("hit (wildcard rule)", "ingress", &wildcard),
        ("miss (no rule)", "ingress", &miss),
        ("non-IP (ARP)", "ingress", &arp),
    ];
    for (case, _, data) in cases {
        out.push(time_xdp(
            &ebpf,
            programs::XDP_INGRESS,
            case,
            xdp_floor,
            data,
            runs,
            repeat,
        )?);
        out.push(time_tc(
            &ebpf,
            programs::TC_INGRESS,
            case,
            tc_floor,
            data,
            runs,
            repeat,
        )?);
    }
    // Native XDP on a virtual device compares every translated packet's checksum with
    // its pseudo-header sum; a partial one (a local sender's offload) gets the address
    // update only. Its output is partial again, so every repeat takes that path.
    let partial = offloaded(&hit);
    for (case, data) in [
        ("hit (exact rule)", &hit[..]),
        ("hit, partial checksum", &partial[..]),
    ] {
        out.push(time_xdp(
            &ebpf,
            programs::XDP_VIRTUAL_INGRESS,
            case,
            xdp_floor,
            data,
            runs,
            repeat,
        )?);
    }
    for (case, data) in [
        ("reply hit (tracked flow)", &reply[..]),
        ("reply miss (no flow)", &reply_miss[..]),
        ("not a reply (host's own traffic)", &host_traffic[..]),
        ("non-IP (ARP)", &arp[..]),
    ] {
        out.push(time_tc(
            &ebpf,
            programs::TC_EGRESS,
            case,
            tc_floor,
            data,
            runs,
            repeat,
        )?);
    }
    // NAT64's entry sits on a backend's interface (when a rule serves IPv6 clients of an
    // IPv4-only backend): what every other packet there pays.
    for (case, data) in [
        ("backend traffic (not NAT64)", &reply[..]),
        ("non-IP (ARP)", &arp[..]),
    ] {
        out.push(time_tc(
            &ebpf,
            programs::TC_NAT64_ENTRY,
            case,
            tc_floor,
            data,
            runs,
            repeat,
        )?);
    }
    Ok(out)
}

/// `frame` (Ethernet, IPv4 without options, TCP) as a local stack with checksum offload
/// sends it: the TCP checksum field holds the folded pseudo-header sum.
fn offloaded(frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    let ip = &f[14..34];
    let len = u16::from_be_bytes([ip[2], ip[3]]) - 20;
    let sum = portfwd_common::csum::pseudo_sum_v4(
        [ip[12], ip[13], ip[14], ip[15]],
        [ip[16], ip[17], ip[18], ip[19]],
        proto::TCP,
        len,
    );
    f[34 + 16..34 + 18].copy_from_slice(&sum.to_be_bytes());
    f
}

fn result(program: &str, case: &str, t: Timing) -> MicroResult {
    MicroResult {
        program: program.to_string(),
        case: case.to_string(),
        ns: t.ns.0,
        min: t.ns.1,
        max: t.ns.2,
        over_floor: t.over_floor,
        retval: t.retval,
    }
}

fn floor_result(program: &str, ns: (f64, f64, f64), retval: u32) -> MicroResult {
    result(
        program,
        "floor",
        Timing {
            ns,
            over_floor: 0.0,
            retval,
        },
    )
}

fn seed(ebpf: &mut Ebpf) -> Result<()> {
    // The published port, and the rewritten packet (which the next iteration sees).
    // Wildcard: mapped onto itself, so every iteration takes the wildcard path: its own
    // entry and its expansion under the host address, as the daemon writes them.
    let wildcard_backend = BackendV4::new(HOST_IP, 9001, 1);
    let entries = [
        (
            RuleKeyV4::from_parts(HOST_IP, 9000, proto::TCP),
            BackendV4::new(CT_IP, 8080, 0),
        ),
        (
            RuleKeyV4::from_parts(CT_IP, 8080, proto::TCP),
            BackendV4::new(CT_IP, 8080, 0),
        ),
        (
            RuleKeyV4::from_parts(Ipv4Addr::UNSPECIFIED, 9001, proto::TCP),
            wildcard_backend,
        ),
        (
            RuleKeyV4::from_parts(HOST_IP, 9001, proto::TCP),
            wildcard_backend.with_flags(BACKEND_EXPANDED),
        ),
    ];
    let mut rules: HashMap<_, RuleKeyV4, BackendV4> =
        HashMap::try_from(ebpf.map_mut(RULES_V4).context(RULES_V4)?)?;
    for (k, b) in entries {
        rules.insert(k, b, 0)?;
    }
    // And in the rule cache, as the daemon copies them (each in a slot of its own, or
    // the timing would be the rules map's).
    let slots: std::collections::BTreeSet<u32> =
        entries.iter().map(|(k, _)| CachedRuleV4::slot(k)).collect();
    anyhow::ensure!(slots.len() == entries.len(), "rule cache slots collide");
    let mut cache: aya::maps::Array<_, CachedRuleV4> =
        aya::maps::Array::try_from(ebpf.map_mut(RULE_CACHE_V4).context(RULE_CACHE_V4)?)?;
    for (k, b) in entries {
        cache.set(CachedRuleV4::slot(&k), CachedRuleV4::new(k, b), 0)?;
    }
    // The ports' bits in the published-ports filter, as the daemon sets them.
    let mut ports: aya::maps::Array<_, u8> =
        aya::maps::Array::try_from(ebpf.map_mut(PUBLISHED_PORTS).context(PUBLISHED_PORTS)?)?;
    let (exact, wildcard) = (port_bits(proto::TCP).0, wildcard_bits(proto::TCP, false));
    for (port, bit) in [(9000u32, exact), (8080, exact), (9001, exact | wildcard)] {
        ports.set(port, bit, 0)?;
    }
    // The backend's port in the reply filter; 9000 too: the repeats after the first see
    // the reply as translated, as for the flow below.
    let mut backend_ports: aya::maps::Array<_, u8> =
        aya::maps::Array::try_from(ebpf.map_mut(BACKEND_PORTS).context(BACKEND_PORTS)?)?;
    for port in [8080u32, 9000] {
        backend_ports.set(port, backend_port_bit(proto::TCP), 0)?;
    }
    let mut hosts: HashMap<_, [u8; 4], u8> =
        HashMap::try_from(ebpf.map_mut(HOST_ADDRS_V4).context(HOST_ADDRS_V4)?)?;
    hosts.insert(HOST_IP.octets(), 1, 0)?;
    let mut ct: HashMap<_, FlowKeyV4, FlowV4> =
        HashMap::try_from(ebpf.map_mut(CONNTRACK_V4).context(CONNTRACK_V4)?)?;
    let host_flow = FlowV4::new(HOST_IP.octets(), 9000u16.to_be_bytes(), 0);
    // The reply as the backend sends it, and as it looks once translated.
    for (addr, port) in [(CT_IP, 8080u16), (HOST_IP, 9000)] {
        ct.insert(
            FlowKeyV4::new(
                addr.octets(),
                port.to_be_bytes(),
                CLIENT_IP.octets(),
                40_000u16.to_be_bytes(),
                proto::TCP,
            ),
            host_flow,
            0,
        )?;
    }
    Ok(())
}

/// The loaded XDP program `name` on `data`, paired with `floor` ([`time_prog`]).
fn time_xdp(
    ebpf: &Ebpf,
    name: &str,
    case: &str,
    floor: &OwnedFd,
    data: &[u8],
    runs: usize,
    repeat: u32,
) -> Result<MicroResult> {
    let xdp: &Xdp = ebpf.program(name).context(name.to_string())?.try_into()?;
    let t = time_prog(|o| xdp.test_run(o), floor, data, runs, repeat)?;
    Ok(result(name, case, t))
}

/// The loaded TC program `name` on `data`, paired with `floor` ([`time_prog`]).
fn time_tc(
    ebpf: &Ebpf,
    name: &str,
    case: &str,
    floor: &OwnedFd,
    data: &[u8],
    runs: usize,
    repeat: u32,
) -> Result<MicroResult> {
    let tc: &SchedClassifier = ebpf.program(name).context(name.to_string())?.try_into()?;
    let t = time_prog(|o| tc.test_run(o), floor, data, runs, repeat)?;
    Ok(result(name, case, t))
}

/// A program's timing on one frame.
struct Timing {
    /// ns per packet: median, min, max of the runs.
    ns: (f64, f64, f64),
    /// Median over the runs of (program − the empty program run just before it).
    over_floor: f64,
    retval: u32,
}

/// Times the program `run` drives on `data`, each run paired with a run of the empty
/// program `floor` just before it on the same frame. This guest's speed drifts over
/// seconds (a shared host): a floor measured once, in a quiet second, against a case
/// measured in a busy one (or the reverse) moved a case by 15 ns between runs; a
/// difference taken within the pair does not see the drift.
fn time_prog(
    run: impl Fn(TestRunOptions<'_>) -> Result<TestRunResult, ProgramError>,
    floor: &OwnedFd,
    data: &[u8],
    runs: usize,
    repeat: u32,
) -> Result<Timing> {
    let mut retval = 0;
    let mut differences = Vec::with_capacity(runs);
    let ns = median_of(runs, || {
        let empty = raw::time_loaded(floor, data, repeat)?;
        let mut buf = vec![0u8; data.len() + 256];
        let r = run(TestRunOptions {
            data_in: Some(data),
            data_out: Some(&mut buf),
            repeat,
            ..Default::default()
        })
        .context("BPF_PROG_RUN")?;
        retval = r.return_value;
        let ns = r.duration.as_nanos() as f64;
        differences.push(ns - empty);
        Ok(ns)
    })?;
    differences.sort_by(f64::total_cmp);
    Ok(Timing {
        ns,
        over_floor: differences[differences.len() / 2],
        retval,
    })
}

fn median_of(runs: usize, mut f: impl FnMut() -> Result<f64>) -> Result<(f64, f64, f64)> {
    let mut v = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        v.push(f()?);
    }
    v.sort_by(f64::total_cmp);
    Ok((v[v.len() / 2], v[0], v[v.len() - 1]))
}

/// The empty programs (floor), loaded with the raw `bpf(2)` syscall: two instructions,
/// `r0 = verdict; exit`, no object file needed.
pub(super) mod raw {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use anyhow::{bail, Result};

    pub const PROG_SCHED_CLS: u32 = 3;
    pub const PROG_XDP: u32 = 6;
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_TEST_RUN: libc::c_long = 10;

    fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> i64 {
        // SAFETY: `attr` is a zero-padded `union bpf_attr` of 128 bytes, larger than every
        // command's part of the union used here; the kernel reads at most that size.
        unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) }
    }

    pub fn load(prog_type: u32, verdict: i32) -> Result<OwnedFd> {
        let mut insns = [0u8; 16];
        insns[0] = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K, dst r0
        insns[4..8].copy_from_slice(&verdict.to_ne_bytes());
        insns[8] = 0x95; // BPF_JMP | BPF_EXIT
        let license = b"GPL\0";
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&prog_type.to_ne_bytes());
        attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
        attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
        let fd = bpf(BPF_PROG_LOAD, &mut attr);
        if fd < 0 {
            bail!("BPF_PROG_LOAD: {}", std::io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this new descriptor.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// Average ns per run of the loaded program `fd` over `repeat` runs.
    pub fn time_loaded(fd: &OwnedFd, data: &[u8], repeat: u32) -> Result<f64> {
        let mut out = vec![0u8; data.len() + 256];
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
        attr[8..12].copy_from_slice(&(data.len() as u32).to_ne_bytes());
        attr[12..16].copy_from_slice(&(out.len() as u32).to_ne_bytes());
        attr[16..24].copy_from_slice(&(data.as_ptr() as u64).to_ne_bytes());
        attr[24..32].copy_from_slice(&(out.as_mut_ptr() as u64).to_ne_bytes());
        attr[32..36].copy_from_slice(&repeat.to_ne_bytes());
        if bpf(BPF_PROG_TEST_RUN, &mut attr) < 0 {
            bail!("BPF_PROG_TEST_RUN: {}", std::io::Error::last_os_error());
        }
        let duration = u32::from_ne_bytes([attr[36], attr[37], attr[38], attr[39]]);
        Ok(f64::from(duration))
    }
}
