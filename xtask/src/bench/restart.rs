//! Restarts, upgrades and crashes (issue #11): established connections through a
//! published port while the daemon is restarted (SIGTERM and start), upgraded (SIGTERM
//! and start of a second copy of the binary over the pinned state) and crashed (SIGKILL
//! and start). Each connection ping-pongs 64-byte messages with the container's echo
//! server, one every millisecond; the case reports the connections lost (target 0) and
//! the longest time any connection went without an answer around the event (the longest
//! gap in forwarding, next to the usual gap between answers), and how long the control
//! socket was away. A fresh topology and a bpffs of its own per case.
//!
//! The SYN-flood case (`syn-flood`) keeps the daemon and instead floods the published
//! port with SYNs from random spoofed sources (10.99.0.0/16, random ports: `bench_gen`
//! in BPF_PROG_RUN live-frames mode from the client's veth with `BENCH_SPREAD` random,
//! as fast as the machine goes): the connections lost (target 0) at the flood rate
//! reached, offered by the generator and seen by portfwd (the rule's packet counter).

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::Array,
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp},
    EbpfLoader,
};

use super::{
    frame::syn_frame,
    serve::ECHO_LEN,
    sys::{self, Proc},
    topo::{Artifacts, Topology, CLIENT_IF, CLIENT_IP, CT_IP, ECHO, HOST_IP},
};

#[derive(Clone, Debug, serde::Serialize)]
pub struct RestartResult {
    /// `restart`, `upgrade` or `crash`.
    pub event: String,
    pub connections: usize,
    pub lost: Option<usize>,
    /// Longest time any connection waited for an answer from 0.5 s before the event to
    /// the end, ms.
    pub longest_gap_ms: Option<f64>,
    /// The same before the event, ms: the gap forwarding would have anyway.
    pub baseline_gap_ms: Option<f64>,
    /// From the signal to the new daemon answering on its socket, ms.
    pub control_away_ms: Option<f64>,
    /// `syn-flood`: spoofed SYNs per second the generator offered.
    pub flood_offered_pps: Option<f64>,
    /// `syn-flood`: spoofed SYNs per second portfwd translated (the rule's counter).
    pub flood_seen_pps: Option<f64>,
    pub note: String,
}

/// The events, in order.
pub const EVENTS: [&str; 4] = ["restart", "upgrade", "crash", "syn-flood"];

/// The spoofed sources of the SYN flood (bench_gen randomizes the low 16 bits), routed
/// from the host back towards the client, which drops the backend's SYN-ACKs.
const SPOOFED: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 0);

pub fn run(
    art: &Artifacts,
    prefix: &str,
    sock_dir: &str,
    connections: usize,
    flood: Duration,
) -> Vec<RestartResult> {
    EVENTS
        .iter()
        .enumerate()
        .map(|(i, &event)| {
            let unavailable = |note: String| RestartResult {
                event: event.into(),
                connections,
                lost: None,
                longest_gap_ms: None,
                baseline_gap_ms: None,
                control_away_ms: None,
                flood_offered_pps: None,
                flood_seen_pps: None,
                note,
            };
            let Some(daemon) = &art.daemon else {
                return unavailable("not available: the daemon is not built".into());
            };
            if !super::variants::daemon_has_flag(daemon, "--pin-dir") {
                return unavailable("not available: this daemon pins nothing".into());
            }
            case(
                art,
                daemon,
                &format!("{prefix}r{i}"),
                sock_dir,
                event,
                connections,
                flood,
            )
            .unwrap_or_else(|e| unavailable(format!("failed: {e:#}")))
        })
        .collect()
}

/// A private bpffs, unmounted (dropping whatever is pinned in it) on drop.
struct PinFs(PathBuf);

impl PinFs {
    fn new(name: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&dir)?;
        nix::mount::mount(
            Some("bpf"),
            &dir,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("cannot mount a bpffs on {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for PinFs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn case(
    art: &Artifacts,
    daemon: &Path,
    prefix: &str,
    sock_dir: &str,
    event: &str,
    connections: usize,
    flood: Duration,
) -> Result<RestartResult> {
    let host_if = format!("{}h", &prefix[prefix.len().saturating_sub(10)..]);
    let topo = Topology::build(prefix, &host_if, &art.xtask)?;
    let pins = PinFs::new(&format!("{prefix}-bpf"))?;
    let pin_dir = pins.0.join("portfwd");
    let sock = format!("{sock_dir}/{prefix}.sock");
    let ctl = art.ctl.as_ref().context("portfwd-ctl is not built")?;
    let start = |bin: &Path, n: u32| -> Result<Proc> {
        let log = std::fs::File::create(art.log_dir.join(format!("{prefix}-{n}.log")))?;
        let mut cmd = sys::daemon_cmd(&topo.host, bin);
        cmd.args(["--iface", &host_if, "--ingress", "tc", "--socket", &sock])
            .arg("--pin-dir")
            .arg(&pin_dir)
            .arg("--cgroup")
            .arg(&topo.cgroup.daemon_path)
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut d = Proc::spawn("portfwd", &mut cmd)?;
        sys::wait_for("the portfwd socket", Duration::from_secs(30), || {
            Command::new(ctl)
                .args(["--socket", &sock, "list"])
                .output()
                .is_ok_and(|o| o.status.success())
        })?;
        d.check_alive()?;
        Ok(d)
    };
    let mut d = start(daemon, 0)?;
    sys::run(Command::new(ctl).args([
        "--socket",
        &sock,
        "add",
        &format!("{}/tcp", ECHO.1),
        &format!("{CT_IP}:{}", ECHO.0),
    ]))?;

    let stop = Arc::new(AtomicBool::new(false));
    let to = SocketAddrV4::new(HOST_IP, ECHO.1);
    let mut threads = Vec::with_capacity(connections);
    for _ in 0..connections {
        let s = sys::on_thread(&topo.client, || {
            Ok(TcpStream::connect_timeout(
                &to.into(),
                Duration::from_secs(5),
            )?)
        })?;
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || ping_pong(s, &stop)));
    }
    std::thread::sleep(Duration::from_secs(1));

    // The event.
    let copy;
    let event_at = Instant::now();
    let (mut d, control_away, rates) = if event == "syn-flood" {
        let seen = || rule_packets(ctl, &sock, ECHO.1);
        let before = seen()?;
        let (sent, secs) = syn_flood(&topo, art, &host_if, flood)?;
        let seen = (seen()? - before) as f64 / secs;
        (d, None, Some((sent as f64 / secs, seen)))
    } else {
        let bin = match event {
            "crash" => {
                // SAFETY: kill(2) on our own child, not yet reaped.
                unsafe { libc::kill(d.pid() as i32, libc::SIGKILL) };
                drop(d);
                daemon
            }
            "upgrade" => {
                copy = art.log_dir.join(format!("{prefix}-portfwd-upgrade"));
                std::fs::copy(daemon, &copy)?;
                d.stop();
                &copy
            }
            _ => {
                d.stop();
                daemon
            }
        };
        let d = start(bin, 1)?;
        (d, Some(event_at.elapsed()), None)
    };
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);

    let (mut lost, mut longest, mut baseline) = (0, Duration::ZERO, Duration::ZERO);
    let mut errors = Vec::new();
    let window = event_at - Duration::from_millis(500);
    for t in threads {
        match t.join() {
            Ok(Ok(replies)) => {
                let mut prev: Option<Instant> = None;
                for r in replies {
                    if let Some(p) = prev {
                        let gap = r - p;
                        if p >= window {
                            longest = longest.max(gap);
                        } else {
                            baseline = baseline.max(gap);
                        }
                    }
                    prev = Some(r);
                }
            }
            Ok(Err(e)) => {
                lost += 1;
                if errors.len() < 3 {
                    errors.push(e);
                }
            }
            Err(_) => {
                lost += 1;
            }
        }
    }
    d.stop();
    let cleanup = Command::new(daemon)
        .arg("--cleanup")
        .arg("--pin-dir")
        .arg(&pin_dir)
        .arg("--socket")
        .arg(&sock)
        .output()?;
    if !cleanup.status.success() {
        bail!(
            "portfwd --cleanup: {}",
            String::from_utf8_lossy(&cleanup.stderr).trim()
        );
    }
    drop(pins);
    drop(topo);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok(RestartResult {
        event: event.into(),
        connections,
        lost: Some(lost),
        longest_gap_ms: Some(ms(longest)),
        baseline_gap_ms: Some(ms(baseline)),
        control_away_ms: control_away.map(ms),
        flood_offered_pps: rates.map(|r| r.0),
        flood_seen_pps: rates.map(|r| r.1),
        note: if errors.is_empty() {
            String::new()
        } else {
            format!("first errors: {}", errors.join("; "))
        },
    })
}

/// The packets `portfwd-ctl list --json` counts on the rule of `port`/tcp.
fn rule_packets(ctl: &Path, sock: &str, port: u16) -> Result<u64> {
    let out = Command::new(ctl)
        .args(["--socket", sock, "list", "--json"])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("list --json")?;
    v["rules"]
        .as_array()
        .and_then(|rules| {
            rules
                .iter()
                .find(|r| r["host_port"] == port && r["proto"] == "tcp")
        })
        .and_then(|r| r["packets"].as_u64())
        .context("no rule counter in list --json")
}

/// Floods the published echo port from the client's veth for `secs`: 64-byte SYNs from
/// random spoofed sources (`bench_gen`, live frames, `BENCH_SPREAD` random). The host's
/// veth gets GRO (NAPI), without which a veth drops XDP-transmitted frames. Returns
/// (frames offered, seconds).
fn syn_flood(
    topo: &Topology,
    art: &Artifacts,
    host_if: &str,
    secs: Duration,
) -> Result<(u64, f64)> {
    topo.host.sh(&format!(
        "ethtool -K {host_if} gro on >/dev/null
         ip route add {SPOOFED}/16 via {CLIENT_IP}"
    ))?;
    let frame = syn_frame(
        Topology::mac(&topo.host, host_if)?,
        Topology::mac(&topo.client, CLIENT_IF)?,
        SPOOFED,
        HOST_IP,
        1024,
        ECHO.1,
    );
    let ifindex = Topology::ifindex(&topo.client, CLIENT_IF)?;
    let obj = art.bench_object.clone();
    sys::on_thread(&topo.client, move || {
        let mut ebpf = EbpfLoader::new().load_file(&obj)?;
        let mut tpl: Array<_, [u8; 64]> =
            Array::try_from(ebpf.map_mut("BENCH_TEMPLATE").context("BENCH_TEMPLATE")?)?;
        tpl.set(0, frame, 0)?;
        let mut spread: Array<_, [u32; 2]> =
            Array::try_from(ebpf.map_mut("BENCH_SPREAD").context("BENCH_SPREAD")?)?;
        spread.set(0, [1, 1], 0)?;
        let gen: &mut Xdp = ebpf
            .program_mut("bench_gen")
            .context("bench_gen")?
            .try_into()?;
        gen.load()?;
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, ...
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&64u32.to_ne_bytes());
        ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        let (start, chunk) = (Instant::now(), 1u32 << 16);
        let mut sent = 0u64;
        while start.elapsed() < secs {
            gen.test_run(TestRunOptions {
                data_in: Some(&frame),
                ctx_in: Some(&ctx),
                repeat: chunk,
                attrs: TestRunAttrs::new().xdp_live_frames(64),
                ..Default::default()
            })
            .context("BPF_PROG_RUN live frames")?;
            sent += u64::from(chunk);
        }
        Ok((sent, start.elapsed().as_secs_f64()))
    })
}

/// Sends 64 bytes and waits for their echo, once a millisecond, until `stop`; returns
/// when each answer came, or the first error (the connection is lost).
fn ping_pong(mut s: TcpStream, stop: &AtomicBool) -> Result<Vec<Instant>, String> {
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let _ = s.set_nodelay(true);
    let msg = [0x5au8; ECHO_LEN];
    let mut buf = [0u8; ECHO_LEN];
    let mut replies = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        s.write_all(&msg).map_err(|e| format!("write: {e}"))?;
        s.read_exact(&mut buf).map_err(|e| format!("read: {e}"))?;
        if buf != msg {
            return Err("the echo differs".into());
        }
        replies.push(Instant::now());
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(replies)
}
