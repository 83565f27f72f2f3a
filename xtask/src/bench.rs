//! `cargo xtask bench`: portfwd side by side with direct routing, iptables DNAT and
//! userspace proxies, in network namespaces (../shared/NETWORK-TESTING.md), variants
//! alternating and rotating order over rounds, a fresh topology per (round, variant)
//! (TIME_WAIT and conntrack state must not leak between variants). Writes
//! `bench-results/<timestamp>/`: raw samples, `summary.md`, SVG charts. See
//! docs/benchmarks.md for the method and the traps it avoids.

mod control;
mod frame;
mod micro;
mod report;
mod restart;
mod scale;
mod serve;
mod sys;
mod topo;
mod variants;
mod work;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use report::{Failure, Results, Sample};
use topo::{Artifacts, Topology};
use variants::Variant;
use work::Workload;

#[derive(clap::Args)]
pub struct Args {
    /// Smoke run: one round, one-second workloads, small control-plane counts (CI; the
    /// numbers are not meant to be quoted).
    #[arg(long)]
    quick: bool,
    /// Rounds (each runs every variant once, in a rotated order). Default 5, quick 1.
    #[arg(long)]
    rounds: Option<u32>,
    /// Seconds per throughput/rate workload. Default 5, quick 1.
    #[arg(long)]
    duration: Option<u64>,
    /// Variants to run, comma-separated (default: every available one): direct, iptables,
    /// socat, docker-proxy, portfwd-tc, portfwd-xdp-generic, portfwd-xdp-native.
    #[arg(long, value_delimiter = ',')]
    variants: Vec<String>,
    /// Workloads, comma-separated (default all): tcp1, tcp1-tso, tcp4, crr, keepalive,
    /// latency, local-crr, local-tcp1, v6-tcp1, v6-tcp1-tso, v6-crr, udp64, v6-udp64.
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// Extra rounds, at most, of the portfwd variants and the workloads where their
    /// min–max range overlaps iptables' or docker-proxy's or lies behind it (only those
    /// variants and workloads run again). Default 4, quick 0.
    #[arg(long)]
    extra_rounds: Option<u32>,
    /// Skip the BPF_PROG_RUN program costs.
    #[arg(long)]
    no_micro: bool,
    /// Only the BPF_PROG_RUN program costs (no variants, control plane or restarts).
    #[arg(long, conflicts_with = "no_micro")]
    micro_only: bool,
    /// Skip the control-plane measurements.
    #[arg(long)]
    no_control: bool,
    /// Skip the restart, upgrade, crash and SYN-flood cases (connections lost, longest
    /// gap, flood rate).
    #[arg(long)]
    no_restart: bool,
    /// Skip the scale cases (hit cost and forwarding with up to 1,000,000 live flows,
    /// publishing 65,535 ports).
    #[arg(long)]
    no_scale: bool,
    /// Results directory (default: bench-results/<UTC timestamp>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Internal: serve HTTP on this address (run inside the container namespace).
    #[arg(long, hide = true)]
    serve_http: Option<SocketAddr>,
    /// Internal: serve 64-byte echo on this address.
    #[arg(long, hide = true)]
    serve_echo: Option<SocketAddr>,
}

struct Config {
    rounds: u32,
    extra_rounds: u32,
    secs: u64,
    latency_secs: u64,
    variants: Vec<Variant>,
    workloads: Vec<Workload>,
    micro_runs: usize,
    micro_repeat: u32,
    control_counts: Vec<u32>,
    per_rule_iptables_max: u32,
    proxy_ports: u32,
    /// Established connections through a restart, upgrade, crash or SYN flood.
    restart_connections: usize,
    /// How long the SYN flood runs.
    flood: Duration,
    /// Longest wait for an idle machine before each case.
    settle: Duration,
    scale: scale::Plan,
}

pub fn run(args: Args) -> Result<()> {
    if let Some(http) = args.serve_http {
        let echo = args.serve_echo.context("--serve-http needs --serve-echo")?;
        return serve::serve(http, echo);
    }
    if !nix::unistd::Uid::effective().is_root() {
        bail!("cargo xtask bench needs root (namespaces, BPF); run it with sudo");
    }
    for tool in [
        "ip", "nsenter", "iperf3", "wrk", "ethtool", "nstat", "ss", "taskset",
    ] {
        if !sys::have(tool) {
            bail!("`{tool}` is missing: run `cargo xtask setup`, or install it (Debian: iproute2, util-linux, iperf3, wrk, ethtool)");
        }
    }
    let cfg = config(&args)?;
    // Every full run compares with the proxy Docker users actually run.
    if cfg.variants.contains(&Variant::DockerProxy) && !sys::have("docker-proxy") {
        if !args.quick {
            bail!("docker-proxy is not installed: a full run compares with it; run `cargo xtask setup` (installs Debian's docker.io), or use --quick");
        }
        eprintln!("bench: note: docker-proxy is not installed; --quick runs without it");
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_path_buf();
    eprintln!("bench: building portfwd and the rig (release)");
    let mut art = build(&root)?;
    // The rig's own servers and clients must not be a debug build: run the release one.
    if cfg!(debug_assertions) && std::env::var_os("PORTFWD_BENCH_REEXEC").is_none() {
        use std::os::unix::process::CommandExt;
        let err = Command::new(&art.xtask)
            .args(std::env::args_os().skip(1))
            .env("PORTFWD_BENCH_REEXEC", "1")
            .exec();
        bail!(
            "cannot run the release build {}: {err}",
            art.xtask.display()
        );
    }

    let pid = std::process::id();
    // Names are `pfb-<pid>-...`: what a killed run left behind goes first.
    for (name, pid) in portfwd_netkit::netns::sweep_stale("pfb-") {
        eprintln!("bench: swept stale namespace {name} (pid {pid} is gone)");
    }
    portfwd_netkit::cgroup::sweep_stale("pfb-");
    let stamp = timestamp();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("bench-results").join(&stamp));
    std::fs::create_dir_all(out.join("logs"))?;
    art.log_dir = out.join("logs");
    let sock_dir = format!("/run/pfb-{pid}");
    std::fs::create_dir_all(&sock_dir)?;
    let _sock_dir_guard = RemoveDir(PathBuf::from(&sock_dir));

    let mut res = Results::default();
    meta(&mut res, &cfg, &args, &stamp);
    let mut active_variants = Vec::new();
    for v in &cfg.variants {
        match v.unavailable(&art) {
            Some(why) => res.unavailable.push((v.name().into(), why)),
            None => active_variants.push(*v),
        }
    }
    res.variants = active_variants
        .iter()
        .map(|v| v.name().to_string())
        .collect();
    res.meta.insert(
        "variants".into(),
        active_variants
            .iter()
            .map(|v| format!("`{}` = {}", v.name(), v.label()))
            .collect::<Vec<_>>()
            .join("; "),
    );
    res.meta.insert(
        "workloads".into(),
        cfg.workloads
            .iter()
            .map(|w| format!("`{}` = {}", w.name(), w.label()))
            .collect::<Vec<_>>()
            .join("; "),
    );

    if !args.no_micro {
        eprintln!("bench: program cost (BPF_PROG_RUN)");
        match micro::run(&art.bpf_object, cfg.micro_runs, cfg.micro_repeat) {
            Ok(m) => res.micro = m,
            Err(e) => res.failures.push(Failure {
                round: 0,
                variant: "micro".into(),
                workload: "BPF_PROG_RUN".into(),
                error: format!("{e:#}"),
            }),
        }
    }

    if args.micro_only {
        res.write(&out)?;
        println!("{}", res.summary());
        eprintln!("bench: results in {}", out.display());
        return Ok(());
    }

    let started = Instant::now();
    let ctx = RunCtx {
        cfg: &cfg,
        art: &art,
        pid,
        sock_dir: &sock_dir,
        started,
    };
    for round in 0..cfg.rounds {
        let plan: Vec<(Variant, Vec<Workload>)> = active_variants
            .iter()
            .map(|v| (*v, cfg.workloads.clone()))
            .collect();
        run_round(&mut res, &ctx, plan, round, cfg.rounds)?;
        res.meta.insert(
            "rounds completed".into(),
            format!("{} of {}", round + 1, cfg.rounds),
        );
        res.write(&out)?;
    }
    // More rounds where a verdict is open: portfwd's range overlaps iptables' or
    // docker-proxy's, or is behind it. Only those variants and workloads run again,
    // interleaved, until every verdict is a clear lead or the extra rounds run out.
    let mut extra_done = Vec::new();
    for extra in 0..cfg.extra_rounds {
        let open = res.open_verdicts();
        let plan: Vec<(Variant, Vec<Workload>)> = active_variants
            .iter()
            .filter_map(|v| {
                let ws: Vec<Workload> = cfg
                    .workloads
                    .iter()
                    .copied()
                    .filter(|w| open.contains(&(v.name().to_string(), w.name().to_string())))
                    .collect();
                (!ws.is_empty()).then_some((*v, ws))
            })
            .collect();
        if plan.is_empty() {
            break;
        }
        let what = plan
            .iter()
            .map(|(v, ws)| {
                let ws: Vec<&str> = ws.iter().map(|w| w.name()).collect();
                format!("{} ({})", v.name(), ws.join(", "))
            })
            .collect::<Vec<_>>()
            .join("; ");
        eprintln!("bench: extra round {}: {what}", extra + 1);
        run_round(&mut res, &ctx, plan, cfg.rounds + extra, cfg.rounds)?;
        extra_done.push(format!("{}. {what}", extra + 1));
        res.extra_rounds = extra_done.len() as u32;
        // No `|`: the value lands in Markdown.
        res.meta.insert(
            "extra rounds (ranges overlapped)".into(),
            extra_done.join(" / "),
        );
        res.write(&out)?;
    }
    if cfg.extra_rounds > 0 && extra_done.is_empty() {
        res.meta.insert(
            "extra rounds (ranges overlapped)".into(),
            "none needed".into(),
        );
    }

    if !args.no_control {
        eprintln!("bench: control plane");
        match control::run(
            &art,
            &format!("pfb-{pid}-"),
            &sock_dir,
            &cfg.control_counts,
            cfg.per_rule_iptables_max,
            cfg.proxy_ports,
        ) {
            Ok(c) => res.control = c,
            Err(e) => res.failures.push(Failure {
                round: 0,
                variant: "control".into(),
                workload: "publish".into(),
                error: format!("{e:#}"),
            }),
        }
    }
    if !args.no_restart {
        eprintln!("bench: restart, upgrade, crash, SYN flood");
        res.restart = restart::run(
            &art,
            &format!("pfb-{pid}-"),
            &sock_dir,
            cfg.restart_connections,
            cfg.flood,
        );
    }
    if !args.no_scale {
        eprintln!("bench: scale (live flows, published ports)");
        res.scale = scale::run(&art, &format!("pfb-{pid}-"), &sock_dir, &cfg.scale);
    }
    res.meta.insert(
        "wall time".into(),
        format!("{:.0} s", started.elapsed().as_secs_f64()),
    );
    res.write(&out)?;
    println!("{}", res.summary());
    eprintln!("bench: results in {}", out.display());
    Ok(())
}

/// What every round needs from the run.
struct RunCtx<'a> {
    cfg: &'a Config,
    art: &'a Artifacts,
    pid: u32,
    sock_dir: &'a str,
    started: Instant,
}

/// One round: each variant in `plan` (rotated by the round number) runs its workloads in
/// a fresh topology. Rounds from `planned` on are extra ones.
fn run_round(
    res: &mut Results,
    ctx: &RunCtx,
    mut plan: Vec<(Variant, Vec<Workload>)>,
    round: u32,
    planned: u32,
) -> Result<()> {
    let n = plan.len().max(1);
    plan.rotate_left(round as usize % n);
    let of = if round < planned {
        format!("{}/{planned}", round + 1)
    } else {
        format!("{} (extra)", round + 1)
    };
    for (i, (v, workloads)) in plan.iter().enumerate() {
        eprintln!(
            "bench: round {of} variant {} ({}/{}), {:.0} s elapsed",
            v.name(),
            i + 1,
            plan.len(),
            ctx.started.elapsed().as_secs_f64()
        );
        let prefix = format!("pfb-{}-{round}{i}", ctx.pid);
        let host_if = format!("pb{:x}h", ctx.pid & 0xfffff);
        if let Err(e) = run_variant(res, ctx, *v, workloads, round, &prefix, &host_if) {
            eprintln!("bench:   {} failed: {e:#}", v.name());
            res.failures.push(Failure {
                round,
                variant: v.name().into(),
                workload: "setup".into(),
                error: format!("{e:#}"),
            });
        }
    }
    Ok(())
}

fn run_variant(
    res: &mut Results,
    ctx: &RunCtx,
    v: Variant,
    workloads: &[Workload],
    round: u32,
    prefix: &str,
    host_if: &str,
) -> Result<()> {
    let (cfg, art, sock_dir) = (ctx.cfg, ctx.art, ctx.sock_dir);
    let topo = Topology::build(prefix, host_if, &art.xtask)?;
    let active = variants::setup(v, &topo, art, sock_dir)?;
    if let Err(why) = &active.local {
        if !res.local_unavailable.iter().any(|(n, _)| n == v.name()) {
            res.local_unavailable
                .push((v.name().into(), format!("{why:#}")));
        }
    }
    let t = active.targets;
    for &w in workloads {
        let local = matches!(w, Workload::LocalCrr | Workload::LocalTcp1);
        if local && active.local.is_err() {
            continue;
        }
        if (w == Workload::Udp64 && t.udp.is_none()) || (w == Workload::V6Udp64 && t.udp6.is_none())
        {
            continue;
        }
        if v.udp_only() && !matches!(w, Workload::Udp64 | Workload::V6Udp64) {
            continue;
        }
        if w.is_v6() && t.addr6.is_none() {
            continue;
        }
        let bg_load = sys::settle(cfg.settle);
        let syn_ns = if local { &topo.host } else { &topo.client };
        let syn0 = work::syn_retrans(syn_ns);
        let cpu0 = sys::CpuStat::now();
        let r = match w {
            Workload::Tcp1 | Workload::Tcp1Tso => work::bulk(
                &topo.client,
                t.addr.into(),
                t.iperf,
                w == Workload::Tcp1Tso,
                cfg.secs,
            )
            .map(|m| vec![m]),
            Workload::Tcp4 => work::iperf3(&topo.client, None, t.addr.into(), t.iperf, 4, cfg.secs)
                .map(|m| vec![m]),
            Workload::Crr => work::wrk(&topo.client, None, t.addr.into(), t.http, true, cfg.secs),
            Workload::KeepAlive => {
                work::wrk(&topo.client, None, t.addr.into(), t.http, false, cfg.secs)
            }
            Workload::V6Tcp1 | Workload::V6Tcp1Tso | Workload::V6Crr => {
                let Some(addr6) = t.addr6 else { continue };
                if w != Workload::V6Crr {
                    let offloads = w == Workload::V6Tcp1Tso;
                    work::bulk(&topo.client, addr6.into(), t.iperf, offloads, cfg.secs)
                        .map(|m| vec![m])
                } else {
                    work::wrk(&topo.client, None, addr6.into(), t.http, true, cfg.secs)
                }
            }
            Workload::Latency => work::latency(&topo.client, t.addr, t.echo, cfg.latency_secs),
            Workload::Udp64 => work::udp64(
                &topo,
                art,
                t.addr.into(),
                t.udp.unwrap_or(0),
                cfg.latency_secs,
                0,
            )
            .map(|m| vec![m]),
            Workload::V6Udp64 => {
                let Some((addr, port)) = t.udp6 else { continue };
                work::udp64(&topo, art, addr.into(), port, cfg.latency_secs, 0).map(|m| vec![m])
            }
            Workload::LocalCrr | Workload::LocalTcp1 => {
                let Ok(&(addr, http, iperf)) = active.local.as_ref() else {
                    continue;
                };
                if w == Workload::LocalCrr {
                    work::wrk(
                        &topo.host,
                        Some(&topo.cgroup),
                        addr.into(),
                        http,
                        true,
                        cfg.secs,
                    )
                } else {
                    work::iperf3(
                        &topo.host,
                        Some(&topo.cgroup),
                        addr.into(),
                        iperf,
                        1,
                        cfg.secs,
                    )
                    .map(|m| vec![m])
                }
            }
        };
        let cpu1 = sys::CpuStat::now();
        let syn = matches!(w, Workload::Crr | Workload::LocalCrr | Workload::V6Crr)
            .then(|| work::syn_retrans(syn_ns).saturating_sub(syn0));
        match r {
            Ok(ms) => {
                for m in ms {
                    let cpu_s = m.cpu_override.unwrap_or_else(|| cpu1.busy_since(&cpu0));
                    let (unit, scale) = work::cpu_unit(m.metric);
                    let per = (m.units > 0.0 && scale > 0.0).then(|| cpu_s * scale / m.units);
                    eprintln!(
                        "bench:   {:<10} {:<12} {:>10.3}{}",
                        w.name(),
                        m.metric,
                        m.value,
                        per.map(|p| format!("  {p:.2} {unit}")).unwrap_or_default()
                    );
                    res.samples.push(Sample {
                        round,
                        variant: v.name().into(),
                        workload: w.name().into(),
                        metric: m.metric.into(),
                        value: m.value,
                        cpu_s,
                        units: m.units,
                        cpu_per_unit: per,
                        cpu_unit: unit.into(),
                        bg_load,
                        syn_retrans: if m.metric == "req_s" { syn } else { None },
                        note: m.note,
                    });
                }
                if let Some(n) = syn.filter(|n| *n > 0) {
                    eprintln!("bench:   warning: {n} SYN retransmissions in {}", w.name());
                }
            }
            Err(e) => {
                eprintln!("bench:   {} failed: {e:#}", w.name());
                res.failures.push(Failure {
                    round,
                    variant: v.name().into(),
                    workload: w.name().into(),
                    error: format!("{e:#}"),
                });
            }
        }
    }
    if v.is_portfwd() {
        counters_to_log(art, &topo, sock_dir);
    }
    drop(active);
    drop(topo);
    Ok(())
}

/// Writes the daemon's rules and counters, with the reasons packets were passed or
/// dropped (`portfwd-ctl list --json`), next to its log after the workloads: why a case
/// failed or fell short.
fn counters_to_log(art: &Artifacts, topo: &Topology, sock_dir: &str) {
    let Some(ctl) = &art.ctl else { return };
    let sock = format!("{sock_dir}/{}.sock", topo.host.name());
    if let Ok(out) = Command::new(ctl)
        .args(["--socket", &sock, "list", "--json"])
        .output()
    {
        let path = art
            .log_dir
            .join(format!("{}.counters.json", topo.host.name()));
        let _ = std::fs::write(path, out.stdout);
    }
}

fn config(args: &Args) -> Result<Config> {
    let q = args.quick;
    let variants = if args.variants.is_empty() {
        Variant::ALL.to_vec()
    } else {
        args.variants
            .iter()
            .map(|s| Variant::from_name(s).with_context(|| format!("unknown variant `{s}`")))
            .collect::<Result<_>>()?
    };
    let workloads = if args.workloads.is_empty() {
        Workload::ALL.to_vec()
    } else {
        let mut w: Vec<Workload> = args
            .workloads
            .iter()
            .map(|s| Workload::from_name(s).with_context(|| format!("unknown workload `{s}`")))
            .collect::<Result<_>>()?;
        w.sort_by_key(|x| Workload::ALL.iter().position(|y| y == x));
        w
    };
    let secs = args.duration.unwrap_or(if q { 1 } else { 5 });
    Ok(Config {
        rounds: args.rounds.unwrap_or(if q { 1 } else { 5 }).max(1),
        extra_rounds: args.extra_rounds.unwrap_or(if q { 0 } else { 4 }),
        secs,
        latency_secs: if q { 1 } else { secs.clamp(1, 3) },
        variants,
        workloads,
        micro_runs: if q { 11 } else { 101 },
        micro_repeat: if q { 10_000 } else { 100_000 },
        control_counts: if q {
            vec![1, 100]
        } else {
            vec![1, 100, 10_000]
        },
        per_rule_iptables_max: if q { 100 } else { 1_000 },
        proxy_ports: if q { 10 } else { 100 },
        restart_connections: if q { 20 } else { 200 },
        flood: Duration::from_secs(if q { 2 } else { 8 }),
        // The smoke run does not wait for quiet: it makes no timing claims.
        settle: Duration::from_millis(if q { 0 } else { 5_000 }),
        scale: scale::Plan {
            cost_flows: if q {
                vec![1_000, 10_000]
            } else {
                vec![1_000, 100_000, 1_000_000]
            },
            frames: if q { 2_000 } else { 20_000 },
            passes: if q { 3 } else { 7 },
            // One flow first: what the others compare with.
            rate_flows: if q {
                vec![1, 1_000]
            } else {
                vec![1, 1_000, 100_000, 1_000_000]
            },
            rate_runs: if q { 1 } else { 3 },
            secs: if q { 1 } else { secs.clamp(1, 3) },
            ports: if q { 1_000 } else { 65_535 },
            settle: Duration::from_millis(if q { 0 } else { 5_000 }),
        },
    })
}

fn meta(res: &mut Results, cfg: &Config, args: &Args, stamp: &str) {
    let m: &mut BTreeMap<String, String> = &mut res.meta;
    m.insert("run".into(), stamp.into());
    let uname = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    m.insert(
        "machine".into(),
        format!(
            "{} CPUs, kernel {uname}",
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0)
        ),
    );
    m.insert(
        "rounds".into(),
        format!(
            "{} (variants rotate order each round; fresh namespaces per round and variant)",
            cfg.rounds
        ),
    );
    m.insert(
        "durations".into(),
        format!(
            "{} s per rate/throughput run, {} s latency and 64-byte UDP",
            cfg.secs, cfg.latency_secs
        ),
    );
    if args.quick {
        m.insert(
            "mode".into(),
            "--quick smoke run: one short round, numbers are not meant to be quoted".into(),
        );
    }
    let rev = Command::new("git")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    m.insert("commit".into(), rev);
}

/// Builds portfwd in release mode and finds the binaries and the BPF objects through
/// cargo's JSON messages (never a hard-coded target path).
fn build(root: &Path) -> Result<Artifacts> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(root)
        .args([
            "build",
            "--release",
            "-p",
            "portfwd",
            "-p",
            "xtask",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cargo build -p portfwd")?;
    if !out.status.success() {
        bail!("building portfwd failed");
    }
    let (mut daemon, mut ctl, mut objdir, mut xtask) = (None, None, None, None);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        match msg["reason"].as_str() {
            Some("build-script-executed") => {
                if let Some(dir) = msg["out_dir"].as_str() {
                    if Path::new(dir).join("portfwd.bpf.o").exists() {
                        objdir = Some(PathBuf::from(dir));
                    }
                }
            }
            Some("compiler-artifact") => {
                let is_bin = msg["target"]["kind"]
                    .as_array()
                    .is_some_and(|k| k.iter().any(|x| x == "bin"));
                let exe = msg["executable"].as_str().map(PathBuf::from);
                match (is_bin, msg["target"]["name"].as_str()) {
                    (true, Some("portfwd")) => daemon = exe,
                    (true, Some("portfwd-ctl")) => ctl = exe,
                    (true, Some("xtask")) => xtask = exe,
                    _ => {}
                }
            }
            _ => {}
        }
    }
    let objdir = objdir.context("cargo did not report portfwd's BPF objects")?;
    Ok(Artifacts {
        xtask: xtask.context("cargo did not report the xtask binary")?,
        daemon,
        ctl,
        bpf_object: objdir.join("portfwd.bpf.o"),
        bench_object: objdir.join("portfwd-bench.bpf.o"),
        log_dir: std::env::temp_dir(),
    })
}

fn timestamp() -> String {
    Command::new("date")
        .args(["-u", "+%Y%m%dT%H%M%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "run".into())
}

struct RemoveDir(PathBuf);
impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
