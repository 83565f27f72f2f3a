//! Restarts, upgrades and crashes keep every flow (issue #11), with real traffic in
//! namespaces: established TCP downloads streaming through a published port and a UDP
//! flow go on while the daemon is restarted (SIGTERM and start), SIGKILLed and started
//! again, and replaced by a second copy of the binary (an upgrade: its programs go in
//! behind the pinned links with a link update; the links stay the same objects, so the
//! hooks are never empty). Every byte of every download is checked against the pattern,
//! the UDP flow keeps its replies, and `list` shows the same rules with counters that
//! went on counting. Then: what `--cleanup` removes, that it refuses while a daemon
//! runs, that maps of another layout are refused, and that 100 cycles of start, SIGKILL
//! and cleanup leave no program, map or link behind.
//!
//! Each daemon pins in a bpffs of the test's own ([`portfwd_tests::pins::PinFs`]).

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use portfwd::pin::{pinned_link_ids, LAYOUT_VERSION};
use portfwd_tests::{
    bins, client,
    daemon::{Daemon, Rule},
    pattern::Pattern,
    require_root,
    topology::{backend, body, published, udp_backend, Topology, HOST_IFACE},
};

/// Concurrent downloads per scenario (`PORTFWD_RESTART_CONNS` overrides it).
const DEFAULT_CONNS: usize = 200;
/// Bytes per download.
const BYTES: u64 = 4 << 20;
/// While the daemon restarts, each download reads this much per [`SLOW_PAUSE`]: about
/// 400 kB/s, so every connection is still streaming when the new daemon takes over.
const SLOW_CHUNK: usize = 8 << 10;
const SLOW_PAUSE: Duration = Duration::from_millis(20);

fn conns() -> usize {
    std::env::var("PORTFWD_RESTART_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CONNS)
}

/// How the daemon goes away before the next one starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum How {
    /// SIGTERM, then the same binary.
    Restart,
    /// SIGKILL, then the same binary.
    Crash,
    /// SIGTERM, then a second copy of the binary.
    Upgrade,
}

/// Downloads streaming slowly until [`Streams::release`], checked byte by byte.
struct Streams {
    handles: Vec<JoinHandle<Result<u64, String>>>,
    /// Bytes each has read so far.
    progress: Vec<Arc<AtomicU64>>,
    fast: Arc<AtomicBool>,
}

impl Streams {
    /// Opens `n` downloads of [`BYTES`] through the published `port` and waits until
    /// every one has received data.
    fn open(topo: &Topology, port: u16, n: usize) -> Self {
        let fast = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::with_capacity(n);
        let mut progress = Vec::with_capacity(n);
        for i in 0..n {
            let s = client::connect(&topo.client, published(port))
                .unwrap_or_else(|e| panic!("connection {i} to {}: {e}", published(port)));
            let p = Arc::new(AtomicU64::new(0));
            progress.push(p.clone());
            let fast = fast.clone();
            handles.push(std::thread::spawn(move || slow_download(s, &p, &fast)));
        }
        let streams = Self {
            handles,
            progress,
            fast,
        };
        streams.wait_all_past(1);
        streams
    }

    /// Waits until every download has read more than `bytes` (each is streaming).
    fn wait_all_past(&self, bytes: u64) {
        let deadline = Instant::now() + client::IO_TIMEOUT;
        while self
            .progress
            .iter()
            .any(|p| p.load(Ordering::Relaxed) < bytes)
        {
            assert!(
                Instant::now() < deadline,
                "downloads stalled: {} of {} past {bytes} bytes",
                self.progress
                    .iter()
                    .filter(|p| p.load(Ordering::Relaxed) >= bytes)
                    .count(),
                self.progress.len()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Bytes read by all so far.
    fn total(&self) -> u64 {
        self.progress
            .iter()
            .map(|p| p.load(Ordering::Relaxed))
            .sum()
    }

    /// Lets them read at full speed, and checks that every one completes intact.
    fn finish(self) {
        self.fast.store(true, Ordering::Relaxed);
        let n = self.handles.len();
        let failed: Vec<String> = self
            .handles
            .into_iter()
            .enumerate()
            .filter_map(|(i, h)| match h.join() {
                Ok(Ok(len)) if len == BYTES => None,
                Ok(Ok(len)) => Some(format!("#{i}: {len} of {BYTES} bytes")),
                Ok(Err(e)) => Some(format!("#{i}: {e}")),
                Err(_) => Some(format!("#{i}: panicked")),
            })
            .collect();
        assert!(
            failed.is_empty(),
            "{} of {n} connections lost or damaged: {failed:?}",
            failed.len()
        );
    }
}

/// `GET /bytes/BYTES` on `s`, read slowly until `fast`; every byte compared with the
/// pattern. Returns the body's length.
fn slow_download(
    mut s: std::net::TcpStream,
    progress: &AtomicU64,
    fast: &AtomicBool,
) -> Result<u64, String> {
    write!(
        s,
        "GET /bytes/{BYTES} HTTP/1.1\r\nHost: portfwd-test\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("request: {e}"))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(0) => return Err("closed before the headers".into()),
            Ok(_) => head.push(byte[0]),
            Err(e) => return Err(format!("headers: {e}")),
        }
    }
    let mut expected = Pattern::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut want = vec![0u8; 256 << 10];
    let mut len = 0u64;
    loop {
        let slow = !fast.load(Ordering::Relaxed);
        let cap = if slow { SLOW_CHUNK } else { buf.len() };
        let k = s
            .read(&mut buf[..cap])
            .map_err(|e| format!("after {len} bytes: {e}"))?;
        if k == 0 {
            return Ok(len);
        }
        expected.fill(&mut want[..k]);
        if let Some(i) = buf[..k].iter().zip(&want[..k]).position(|(a, b)| a != b) {
            return Err(format!("byte {} differs from the pattern", len + i as u64));
        }
        len += k as u64;
        progress.store(len, Ordering::Relaxed);
        if slow {
            std::thread::sleep(SLOW_PAUSE);
        }
    }
}

/// A UDP flow: one client socket, its datagrams echoed by a container through the
/// published port.
struct UdpFlow {
    sock: UdpSocket,
    to: SocketAddr,
}

impl UdpFlow {
    fn open(topo: &Topology, port: u16) -> Self {
        let sock = topo
            .client
            .run(|| UdpSocket::bind("0.0.0.0:0"))
            .expect("UDP socket");
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        Self {
            sock,
            to: published(port).into(),
        }
    }

    /// Sends `text` and returns the echo's source and payload (a few tries: a
    /// datagram may be lost, never the flow).
    #[track_caller]
    fn echo(&self, text: &str) -> (SocketAddr, String) {
        let mut buf = [0u8; 2048];
        for _ in 0..10 {
            self.sock.send_to(text.as_bytes(), self.to).expect("send");
            if let Ok((n, from)) = self.sock.recv_from(&mut buf) {
                let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
                if reply.ends_with(text) {
                    return (from, reply);
                }
            }
        }
        panic!("no echo of {text:?} from {}", self.to);
    }
}

/// The pinned links of a daemon as (link id, program id), by pin name.
fn link_ids(d: &Daemon) -> BTreeMap<String, (u32, u32)> {
    let dir = d.pins().pin_dir().join("links");
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let e = e.expect("dir entry");
            let ids = pinned_link_ids(&e.path())
                .unwrap_or_else(|err| panic!("{}: {err}", e.path().display()));
            (e.file_name().to_string_lossy().into_owned(), ids)
        })
        .collect()
}

fn by_port(rules: &[Rule]) -> BTreeMap<(u16, String), Rule> {
    rules
        .iter()
        .map(|r| ((r.host_port, r.proto.clone()), r.clone()))
        .collect()
}

/// A copy of the daemon's binary elsewhere: the "new version" of an upgrade.
fn second_copy(dir: &Path) -> PathBuf {
    let copy = dir.join("portfwd-upgrade");
    std::fs::copy(bins::bin(bins::PORTFWD), &copy).expect("copy the daemon");
    copy
}

/// The scenario: rules and flows, the daemon going away as `how` says, a new one over
/// the pinned state, and every flow checked.
fn keeps_every_flow(how: How, tag: &str, ingress: &str) {
    let test = format!("keeps_every_flow_{how:?}");
    let Some(mut topo) = Topology::with_daemon(&test, tag, ingress) else {
        return;
    };
    topo.daemon().add("9000", &backend(0));
    topo.daemon().add("9001/udp", &udp_backend(1));
    let udp = UdpFlow::open(&topo, 9001);
    let (from, before) = udp.echo("before");
    assert_eq!(from, SocketAddr::from(published(9001)), "{before}");

    let n = conns();
    let started = Instant::now();
    let streams = Streams::open(&topo, 9000, n);
    let rules_before = by_port(&topo.daemon().rules());
    let links_before = link_ids(topo.daemon());

    let mut old = topo.take_daemon().expect("daemon");
    let status = match how {
        How::Crash => old.kill(),
        _ => old.stop(Duration::from_secs(30)),
    };
    let status = status.unwrap_or_else(|| panic!("the daemon did not exit ({how:?})"));
    match how {
        How::Crash => assert!(!status.success(), "SIGKILL: {status}"),
        _ => assert!(status.success(), "SIGTERM: {status}\n{}", old.log_text()),
    }
    // No daemon: the pinned programs forward on, new connections included.
    let at_stop = streams.total();
    assert_eq!(topo.get_published(9000).body_text(), body(0));
    let (from, reply) = udp.echo("no daemon");
    assert_eq!(from, SocketAddr::from(published(9001)), "{reply}");
    streams.wait_all_past(at_stop / n as u64 + 1);
    assert!(
        streams.total() > at_stop,
        "the downloads stopped with the daemon"
    );

    let copy = (how == How::Upgrade).then(|| second_copy(topo.dir()));
    let args = ["--ingress", ingress];
    let mut new = Daemon::spawn_over(
        &topo.host,
        topo.dir(),
        &[HOST_IFACE],
        &args,
        Some(&old),
        copy.as_deref(),
    );
    new.wait_ready();
    drop(old);
    let d = topo.set_daemon(new);

    // The same links, now running the new daemon's programs.
    let links_after = link_ids(d);
    assert_eq!(
        links_before.keys().collect::<Vec<_>>(),
        links_after.keys().collect::<Vec<_>>(),
        "pinned links"
    );
    for (name, (link, prog)) in &links_before {
        let (link_after, prog_after) = links_after[name];
        assert_eq!(
            *link,
            link_after,
            "{name}: the link was replaced, not updated\n{}",
            d.log_text()
        );
        assert_ne!(*prog, prog_after, "{name}: still the old daemon's program");
    }
    // The same rules, sources and counter slots: the counters went on.
    let rules_after = by_port(&d.rules());
    assert_eq!(
        rules_before.values().map(Rule::config).collect::<Vec<_>>(),
        rules_after.values().map(Rule::config).collect::<Vec<_>>()
    );
    for (k, r) in &rules_before {
        let a = &rules_after[k];
        assert!(
            a.packets > r.packets && a.bytes > r.bytes,
            "{k:?}: counters did not go on: before {r:?}, after {a:?}"
        );
    }
    let log = d.log_text();
    assert!(
        log.contains("adopted 2 rules"),
        "the new daemon should say it adopted the rules:\n{log}"
    );
    assert!(
        !log.contains("differed"),
        "the saved rules and the maps should agree:\n{log}"
    );

    let (from, after) = udp.echo("after");
    assert_eq!(from, SocketAddr::from(published(9001)), "{after}");
    assert_eq!(
        before.lines().next(),
        after.lines().next(),
        "the UDP flow was seen from another address"
    );
    streams.finish();
    eprintln!(
        "{how:?}: {n} downloads of {BYTES} bytes through {ingress} ingress completed intact in \
         {:?}",
        started.elapsed()
    );
    // New connections and rules work with the new daemon.
    assert_eq!(topo.get_published(9000).body_text(), body(0));
    topo.daemon().add("9002", &backend(1));
    assert_eq!(topo.get_published(9002).body_text(), body(1));
}

#[test]
fn restart_keeps_every_flow() {
    keeps_every_flow(How::Restart, "rst", "tc");
}

#[test]
fn crash_keeps_every_flow() {
    keeps_every_flow(How::Crash, "kil", "xdp");
}

#[test]
fn upgrade_keeps_every_flow() {
    keeps_every_flow(How::Upgrade, "upg", "tc");
}

/// `--cleanup` refuses (one line, nothing changed) while a daemon holds the pin
/// directory.
#[test]
fn cleanup_refuses_while_a_daemon_runs() {
    let Some(topo) = Topology::with_daemon("cleanup_refuses", "clr", "tc") else {
        return;
    };
    let d = topo.daemon();
    d.add("9000", &backend(0));
    let line = d.cleanup().expect_error("--cleanup with a running daemon");
    assert!(line.contains("in use"), "{line}");
    assert_eq!(topo.get_published(9000).body_text(), body(0));
    assert_eq!(d.rules().len(), 1);
}

/// Maps pinned by a binary of another layout are refused with one line that says what
/// to do; nothing is attached or changed.
#[test]
fn another_layout_is_refused() {
    let Some(mut topo) = Topology::with_daemon("another_layout_is_refused", "lay", "tc") else {
        return;
    };
    topo.daemon().add("9000", &backend(0));
    let mut old = topo.take_daemon().expect("daemon");
    old.stop(Duration::from_secs(30)).expect("SIGTERM");
    let pins = old.pins().pin_dir();
    let other = pins.join(format!("maps-v{}", LAYOUT_VERSION + 1));
    std::fs::rename(pins.join(format!("maps-v{LAYOUT_VERSION}")), &other)
        .expect("rename the maps' directory");
    let line = Daemon::refused_over(
        &topo.host,
        topo.dir(),
        &[HOST_IFACE],
        &["--ingress", "tc"],
        &old,
    );
    assert!(
        line.contains("layout version") && line.contains("--cleanup"),
        "{line}"
    );
    // The old programs still forward from the pinned state.
    assert_eq!(topo.get_published(9000).body_text(), body(0));
    assert!(other.exists());
}

/// `--no-pin` over forwarding left pinned by an earlier daemon would run the programs
/// twice: refused with one line, and the pinned state keeps forwarding.
#[test]
fn no_pin_refuses_over_pinned_state() {
    let Some(mut topo) = Topology::with_daemon("no_pin_refuses", "nop", "tc") else {
        return;
    };
    topo.daemon().add("9000", &backend(0));
    let mut old = topo.take_daemon().expect("daemon");
    old.stop(Duration::from_secs(30)).expect("SIGTERM");
    let line = Daemon::refused_over(
        &topo.host,
        topo.dir(),
        &[HOST_IFACE],
        &["--ingress", "tc", "--no-pin"],
        &old,
    );
    assert!(line.contains("--cleanup"), "{line}");
    assert_eq!(topo.get_published(9000).body_text(), body(0));
}

/// The ids of every live BPF object of `kind` (`prog`, `map`, `link`), walked with
/// `BPF_*_GET_NEXT_ID`, which opens none of them. Not `bpftool TYPE show`: it opens
/// every map by id, and opening a program array by id between its last user reference
/// going and the kernel's deferred clear of it running makes the kernel queue a second
/// clear, whose map reference is never put (`prog_array_map_clear`: `bpf_map_inc` then
/// a `schedule_work` that is a no-op while the first is pending), so the empty array
/// stays forever (320 bytes). That was the cycles test's "known leak" of NAT64_PROGS.
fn live_ids(kind: &str) -> Vec<u64> {
    // enum bpf_cmd: BPF_PROG_GET_NEXT_ID, BPF_MAP_GET_NEXT_ID, BPF_LINK_GET_NEXT_ID.
    let cmd: libc::c_long = match kind {
        "prog" => 11,
        "map" => 12,
        _ => 31,
    };
    // union bpf_attr's GET_NEXT_ID member: start_id, next_id, open_flags.
    let mut attr = [0u32; 3];
    let mut ids = Vec::new();
    loop {
        // SAFETY: a GET_NEXT_ID command with its 12-byte attribute, which it writes.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr.as_mut_ptr(),
                std::mem::size_of_val(&attr) as libc::c_uint,
            )
        };
        if rc != 0 {
            // ENOENT: the last one.
            break;
        }
        ids.push(u64::from(attr[1]));
        attr[0] = attr[1];
    }
    ids
}

/// Whether a leftover `map ID` is an empty program array named NAT64_PROGS (what a
/// by-id opener racing its deferred clear leaves: see [`live_ids`]), to say so.
fn is_empty_nat64_prog_array(entry: &str) -> bool {
    let Some(id) = entry.strip_prefix("map ") else {
        return false;
    };
    let bpftool = |args: &[&str]| {
        std::process::Command::new("bpftool")
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default()
    };
    let show = bpftool(&["-j", "map", "show", "id", id]);
    let dump = bpftool(&["-j", "map", "dump", "id", id]);
    show.contains("\"name\":\"NAT64_PROGS\"") && show.contains("prog_array") && dump.trim() == "[]"
}

/// Starts, SIGKILLs and cleans up `PORTFWD_CYCLES` (100) times, recording the ids of
/// every program, map and link the daemons pinned; afterwards the kernel holds none of
/// them (scoped to these ids: other tests may run at the same time).
#[test]
fn start_kill_cleanup_cycles_leave_nothing() {
    if !require_root("start_kill_cleanup_cycles_leave_nothing") {
        return;
    }
    let cycles: usize = std::env::var("PORTFWD_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let topo = Topology::new("cyc");
    let (mut progs, mut maps, mut links) = (Vec::new(), Vec::new(), Vec::new());
    let started = Instant::now();
    let mut prev: Option<Daemon> = None;
    for i in 0..cycles {
        let mut d = Daemon::spawn_over(
            &topo.host,
            topo.dir(),
            &[HOST_IFACE],
            &["--ingress", if i % 2 == 0 { "tc" } else { "xdp" }],
            prev.as_ref(),
            None,
        );
        d.wait_ready();
        d.add("9000", &backend(0));
        for (link, prog) in link_ids(&d).into_values() {
            links.push(u64::from(link));
            progs.push(u64::from(prog));
        }
        let maps_dir = d.pins().pin_dir().join(format!("maps-v{LAYOUT_VERSION}"));
        for e in std::fs::read_dir(&maps_dir).expect("pinned maps") {
            let info = aya::maps::MapInfo::from_pin(e.expect("entry").path()).expect("map");
            maps.push(u64::from(info.id()));
        }
        assert!(d.kill().is_some(), "SIGKILL");
        d.cleanup().expect_ok("portfwd --cleanup");
        assert!(!d.pins().pin_dir().exists(), "cycle {i}: pins left");
        assert!(
            !d.socket().with_extension("state.json").exists(),
            "cycle {i}: saved rules left"
        );
        prev = Some(d);
    }
    let elapsed = started.elapsed();
    // The kernel frees programs and maps after an RCU grace period: give it time.
    let deadline = Instant::now() + Duration::from_secs(30);
    let left = loop {
        let left: Vec<String> = [("prog", &progs), ("map", &maps), ("link", &links)]
            .into_iter()
            .flat_map(|(kind, ids)| {
                let now = live_ids(kind);
                ids.iter()
                    .filter(|id| now.contains(id))
                    .map(|id| format!("{kind} {id}"))
                    .collect::<Vec<_>>()
            })
            .collect();
        if left.is_empty() || Instant::now() > deadline {
            break left;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // Nothing may be left. An empty NAT64_PROGS left means something opened it by id
    // while the kernel was clearing it (a `bpftool map show` run by another process
    // at that moment, say): a kernel defect (see `live_ids`), said so.
    let races: Vec<&String> = left
        .iter()
        .filter(|e| is_empty_nat64_prog_array(e))
        .collect();
    assert!(
        left.is_empty(),
        "left after {cycles} cycles: {left:?}{}",
        if races.is_empty() {
            String::new()
        } else {
            format!(
                "; of which empty NAT64_PROGS arrays {races:?}: something opened them by id \
                 while the kernel cleared them (kernel: prog_array_map_clear)"
            )
        }
    );
    let net = topo
        .host
        .exec_ok("bpftool", &["net", "show", "dev", HOST_IFACE]);
    assert!(!net.contains("portfwd"), "still attached: {net}");
    eprintln!(
        "{cycles} cycles of start, SIGKILL and cleanup in {elapsed:?}: {} programs, {} maps, \
         {} links, none left",
        progs.len(),
        maps.len(),
        links.len()
    );
}
