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

use std::{
    net::Ipv4Addr,
    os::fd::{AsFd, BorrowedFd},
    path::Path,
};

use anyhow::{Context, Result};
use aya::{
    maps::HashMap,
    programs::{tc::SchedClassifier, Xdp},
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
    /// Median over the rounds of (program − the empty program run just before it).
    pub over_floor: f64,
    /// The same differences in the calmest moments of the run ([`calm_pairs`]): the
    /// cost when nothing else competes for the core, the figure the targets judge.
    pub calm_over_floor: f64,
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
    let xdp = |name: &'static str| -> Result<BorrowedFd<'_>> {
        let p: &Xdp = ebpf.program(name).context(name)?.try_into()?;
        Ok(p.fd()?.as_fd())
    };
    let tc = |name: &'static str| -> Result<BorrowedFd<'_>> {
        let p: &SchedClassifier = ebpf.program(name).context(name)?.try_into()?;
        Ok(p.fd()?.as_fd())
    };
    let (xdp_floor, tc_floor) = (xdp_empty.as_fd(), tc_empty.as_fd());
    let case = |program, case, prog, floor, data| Case {
        program,
        case,
        prog,
        floor,
        data,
    };
    // The empty programs against themselves: their rows give the floor's own time.
    let mut cases = vec![
        case("empty XDP program", "floor", xdp_floor, xdp_floor, &hit[..]),
        case("empty TC program", "floor", tc_floor, tc_floor, &hit[..]),
    ];
    for (name, data) in [
        ("hit (exact rule)", &hit[..]),
        ("hit (wildcard rule)", &wildcard[..]),
        ("miss (no rule)", &miss[..]),
        ("non-IP (ARP)", &arp[..]),
    ] {
        let (x, t) = (programs::XDP_INGRESS, programs::TC_INGRESS);
        cases.push(case(x, name, xdp(x)?, xdp_floor, data));
        cases.push(case(t, name, tc(t)?, tc_floor, data));
    }
    // Native XDP on a virtual device compares every translated packet's checksum with
    // its pseudo-header sum; a partial one (a local sender's offload) gets the address
    // update only. Its output is partial again, so every repeat takes that path.
    let partial = offloaded(&hit);
    for (name, data) in [
        ("hit (exact rule)", &hit[..]),
        ("hit, partial checksum", &partial[..]),
    ] {
        let x = programs::XDP_VIRTUAL_INGRESS;
        cases.push(case(x, name, xdp(x)?, xdp_floor, data));
    }
    for (name, data) in [
        ("reply hit (tracked flow)", &reply[..]),
        ("reply miss (no flow)", &reply_miss[..]),
        ("not a reply (host's own traffic)", &host_traffic[..]),
        ("non-IP (ARP)", &arp[..]),
    ] {
        let t = programs::TC_EGRESS;
        cases.push(case(t, name, tc(t)?, tc_floor, data));
    }
    // NAT64's entry sits on a backend's interface (when a rule serves IPv6 clients of an
    // IPv4-only backend): what every other packet there pays.
    for (name, data) in [
        ("backend traffic (not NAT64)", &reply[..]),
        ("non-IP (ARP)", &arp[..]),
    ] {
        let t = programs::TC_NAT64_ENTRY;
        cases.push(case(t, name, tc(t)?, tc_floor, data));
    }
    time_rounds(&cases, runs, repeat)
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

/// One program timed on one frame, beside the empty program of its type.
struct Case<'a> {
    program: &'static str,
    case: &'static str,
    prog: BorrowedFd<'a>,
    floor: BorrowedFd<'a>,
    data: &'a [u8],
}

/// Times every case `runs` times, in rounds: a round runs each case once, and each run
/// of a program follows a run of the empty program on the same frame (a pair). This
/// guest shares its host, whose busy spells last seconds to minutes and add up to 30 ns
/// per packet to a program that reads maps, about 6 ns to the empty one: run case after
/// case, a spell fell on whole cases, and a whole 20-second micro phase could fall in
/// one. Interference only adds time and each run averages `repeat` packets, so the pairs
/// whose program ran fastest are those the spells spared ([`calm_pairs`]).
fn time_rounds(cases: &[Case<'_>], runs: usize, repeat: u32) -> Result<Vec<MicroResult>> {
    let runs = runs.max(1);
    // Per case: (program, empty program) ns per packet of each pair.
    let mut pairs = vec![Vec::with_capacity(runs); cases.len()];
    let mut retvals = vec![0; cases.len()];
    for _ in 0..runs {
        for ((c, p), r) in cases.iter().zip(&mut pairs).zip(&mut retvals) {
            let (empty, _) = raw::time_loaded(c.floor, c.data, repeat)?;
            let (ns, retval) = raw::time_loaded(c.prog, c.data, repeat)
                .with_context(|| format!("{}: {}", c.program, c.case))?;
            p.push((ns, empty));
            *r = retval;
        }
    }
    Ok(cases
        .iter()
        .zip(&mut pairs)
        .zip(retvals)
        .map(|((c, p), retval)| {
            p.sort_by(|a, b| a.0.total_cmp(&b.0));
            MicroResult {
                program: c.program.to_string(),
                case: c.case.to_string(),
                // `p` is in order of the program's time.
                ns: p[p.len() / 2].0,
                min: p[0].0,
                max: p[p.len() - 1].0,
                over_floor: median(p.iter().map(|(ns, empty)| ns - empty)),
                calm_over_floor: calm_pairs(p),
                retval,
            }
        })
        .collect())
}

/// The cost in the calmest moments of the run: the mean difference of the twentieth of
/// the pairs (at least one) whose program ran fastest. Choosing by the program's time
/// picks the moments the host left the core alone; the empty run beside each was not
/// chosen, so its own jitter averages out rather than (as the fastest empty run
/// overall would) lowering the floor.
fn calm_pairs(by_program_time: &[(f64, f64)]) -> f64 {
    let calm = &by_program_time[..(by_program_time.len() / 20).max(1)];
    calm.iter().map(|(ns, empty)| ns - empty).sum::<f64>() / calm.len() as f64
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The empty programs (floor), loaded with the raw `bpf(2)` syscall: two instructions,
/// `r0 = verdict; exit`, no object file needed.
pub(super) mod raw {
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

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

    /// Average ns per run of the loaded program `fd` over `repeat` runs, and its return
    /// value.
    pub fn time_loaded(fd: BorrowedFd<'_>, data: &[u8], repeat: u32) -> Result<(f64, u32)> {
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
        let retval = u32::from_ne_bytes([attr[4], attr[5], attr[6], attr[7]]);
        let duration = u32::from_ne_bytes([attr[36], attr[37], attr[38], attr[39]]);
        Ok((f64::from(duration), retval))
    }
}
