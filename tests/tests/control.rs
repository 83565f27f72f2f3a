//! The control socket as a privileged interface, against the real daemon in a namespace
//! (`portfwd_tests::topology`, TC ingress): who may connect and what each peer may do
//! (root; `--socket-group`, full access; `--socket-read-group`, read-only), decided by
//! the peer's credentials (SO_PEERCRED, SO_PEERGROUPS); and the bounds that keep the
//! socket answering: a request's size, its deadline, and thousands of idle or slow
//! clients that must not starve `list`.
//!
//! Unprivileged peers are `portfwd-ctl` run under `setpriv --reuid 65534 --regid G
//! --groups ...|--clear-groups` (util-linux). Groups are numeric gids that no entry of
//! `/etc/group` uses (the flags take numbers, as `chown` does), so the host's group
//! database is never touched.

use std::{
    io::{Read, Write},
    os::unix::{
        fs::{MetadataExt, PermissionsExt},
        net::UnixStream,
    },
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use portfwd::{
    daemon::{CLIENT_TIMEOUT, MAX_CONNECTIONS},
    protocol::{self, Request, MAX_REQUEST},
};
use portfwd_tests::{
    bins,
    daemon::{run_ctl, CtlOutput, Daemon},
    require_root,
    topology::{backend, Topology},
};

/// The unprivileged user the peers run as (`nobody`).
const NOBODY: &str = "65534";

/// Rules as `list --json` shows them, counters left out.
fn configs(d: &Daemon) -> Vec<(String, u16, String, String, u16)> {
    let mut v: Vec<_> = d.rules().iter().map(|r| r.config()).collect();
    v.sort();
    v
}

/// Two gids no `/etc/group` entry uses.
fn unused_gids() -> (u32, u32) {
    let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let used: Vec<u32> = groups
        .lines()
        .filter_map(|l| l.split(':').nth(2)?.parse().ok())
        .collect();
    let mut free = (61000..65000).filter(|g| !used.contains(g));
    let a = free.next().expect("a free gid");
    let b = free.next().expect("a second free gid");
    (a, b)
}

/// The network and a daemon with these extra arguments; the test directory opened for
/// traversal so that unprivileged peers reach the socket.
fn setup(test: &str, tag: &str, args: &[&str]) -> Option<Topology> {
    if !require_root(test) {
        return None;
    }
    assert!(
        bins::find_in_path("setpriv").is_some(),
        "{test}: needs setpriv (util-linux) to run portfwd-ctl as another user"
    );
    let mut topo = Topology::new(tag);
    let mut all = vec!["--ingress", "tc"];
    all.extend_from_slice(args);
    topo.start_daemon_with(&all);
    std::fs::set_permissions(topo.dir(), std::fs::Permissions::from_mode(0o711))
        .expect("chmod the test directory");
    Some(topo)
}

/// `portfwd-ctl ARGS` as uid 65534 with primary group `gid` and exactly the
/// supplementary `groups`.
fn ctl_as(d: &Daemon, gid: &str, groups: &[u32], args: &[&str]) -> CtlOutput {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", NOBODY, "--regid", gid]);
    if groups.is_empty() {
        cmd.arg("--clear-groups");
    } else {
        let list: Vec<String> = groups.iter().map(u32::to_string).collect();
        cmd.args(["--groups", &list.join(",")]);
    }
    cmd.arg(bins::bin(bins::PORTFWD_CTL))
        .arg("--socket")
        .arg(d.socket())
        .args(args);
    run_ctl(&mut cmd)
}

/// The socket's mode bits and group.
fn socket_mode(d: &Daemon) -> (u32, u32) {
    let m = std::fs::metadata(d.socket()).expect("socket metadata");
    (m.permissions().mode() & 0o7777, m.gid())
}

fn make_world_connectable(d: &Daemon) {
    std::fs::set_permissions(d.socket(), std::fs::Permissions::from_mode(0o666))
        .expect("chmod the socket");
}

/// How many lines of the daemon's log contain `needle`.
fn log_lines(d: &Daemon, needle: &str) -> usize {
    d.log_text().lines().filter(|l| l.contains(needle)).count()
}

/// Without `--socket-group`, only root: a peer that can connect (the socket made
/// world-writable, as in the issue) is refused with one line, for reading and for
/// changing, and nothing changes; the refusals are logged, not once per request.
#[test]
fn non_root_peer_is_refused_and_nothing_changes() {
    let Some(topo) = setup("non_root_peer_is_refused", "crf", &[]) else {
        return;
    };
    let d = topo.daemon();
    d.add("9000", &backend(0));
    let before = configs(d);
    assert_eq!(socket_mode(d), (0o600, 0), "root only by default");
    make_world_connectable(d);

    let line = ctl_as(d, NOBODY, &[], &["add", "9998", &backend(1)]).expect_error("add as nobody");
    assert_eq!(
        line,
        "portfwd-ctl: permission denied: portfwd's control socket accepts root only"
    );
    let line = ctl_as(d, NOBODY, &[], &["del", "9000"]).expect_error("del as nobody");
    assert!(line.contains("permission denied"), "{line}");
    let line = ctl_as(d, NOBODY, &[], &["list"]).expect_error("list as nobody");
    assert!(line.contains("permission denied"), "{line}");
    assert_eq!(configs(d), before, "a refused peer changed the rules");

    // Refusals are logged, and a burst of them is not one line each.
    for _ in 0..30 {
        ctl_as(d, NOBODY, &[], &["list"]).expect_error("list as nobody");
    }
    let logged = log_lines(d, "refused a control connection");
    assert!(
        (1..=3).contains(&logged),
        "expected 1 to 3 refusal lines for 33 refusals, got {logged}:\n{}",
        d.log_text()
    );
    assert!(
        d.log_text().contains("uid 65534"),
        "the log names the refused uid:\n{}",
        d.log_text()
    );
    // Root still has full access.
    d.add("9001", &backend(1));
}

/// `--socket-group` (full access) and `--socket-read-group` (read-only), given as
/// numbers: the primary group and supplementary groups of the peer count; a read-only
/// peer may list but not add, delete or apply, and its refusal changes nothing.
#[test]
fn socket_groups_grant_full_and_read_access() {
    let (full, read) = unused_gids();
    let (f, r) = (full.to_string(), read.to_string());
    let Some(topo) = setup(
        "socket_groups_grant_full_and_read_access",
        "cgr",
        &["--socket-group", &f, "--socket-read-group", &r],
    ) else {
        return;
    };
    let d = topo.daemon();
    // Two groups cannot both own the file: it is connectable by all, and the daemon
    // decides.
    assert_eq!(socket_mode(d).0, 0o666);

    // A supplementary group, and the primary one, both count.
    let out = ctl_as(d, NOBODY, &[full], &["add", "9000", &backend(0)]);
    assert_eq!(
        out.expect_ok("add in the full group").trim(),
        "published *:9000/tcp -> 198.18.1.2:8080"
    );
    ctl_as(d, &f, &[], &["add", "9001", &backend(1)]).expect_ok("add with the full gid");
    let before = configs(d);
    assert_eq!(before.len(), 2);

    // Read-only: list, yes; changes, no.
    let out = ctl_as(d, NOBODY, &[read], &["list"]);
    assert!(out.expect_ok("list in the read group").contains("9000"));
    let line =
        ctl_as(d, NOBODY, &[read], &["add", "9002", &backend(0)]).expect_error("add read-only");
    assert_eq!(
        line,
        format!(
            "portfwd-ctl: permission denied: group {read} may only read (list); \
             changes need root or group {full}"
        )
    );
    ctl_as(d, &r, &[], &["del", "9000"]).expect_error("del read-only");
    let file = topo.dir().join("decl.toml");
    std::fs::write(
        &file,
        "[[publish]]\nto = \"198.18.1.2\"\nports = [\"9003:8080\"]\n",
    )
    .expect("write the declarations file");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let f_arg = file.display().to_string();
    let line = ctl_as(d, NOBODY, &[read], &["apply", "-f", &f_arg]).expect_error("apply read-only");
    assert!(line.contains("permission denied"), "{line}");
    // A request longer than any read is refused as a change, without being kept.
    let mut long = connections_as(d.socket(), read, 1).remove(0);
    let mut big = vec![b' '; 100_000];
    big.push(b'\n');
    long.write_all(&big).expect("send");
    assert_eq!(
        read_all(&long),
        String::from_utf8(protocol::encode_err(&line["portfwd-ctl: ".len()..])).expect("utf-8")
    );
    assert_eq!(configs(d), before, "a read-only peer changed the rules");

    // In neither group.
    let line = ctl_as(d, NOBODY, &[], &["list"]).expect_error("list in no group");
    assert_eq!(
        line,
        format!(
            "portfwd-ctl: permission denied: portfwd's control socket accepts root, \
             group {full} and group {read} (read-only)"
        )
    );
    assert_eq!(configs(d), before);
    // The file itself was fine: root applies it.
    d.ctl(&["apply", "-f", &f_arg]).expect_ok("apply as root");
    assert_eq!(configs(d).len(), 3);
}

/// One group: the socket file is `0660 root:GROUP`, so the kernel keeps everyone else
/// from even connecting.
#[test]
fn one_socket_group_owns_the_socket_file() {
    let (full, other) = unused_gids();
    let f = full.to_string();
    let Some(topo) = setup(
        "one_socket_group_owns_the_socket_file",
        "cog",
        &["--socket-group", &f],
    ) else {
        return;
    };
    let d = topo.daemon();
    assert_eq!(socket_mode(d), (0o660, full));
    ctl_as(d, NOBODY, &[full], &["add", "9000", &backend(0)]).expect_ok("add in the group");
    let line = ctl_as(d, NOBODY, &[other], &["list"]).expect_error("list in another group");
    assert_eq!(
        line,
        format!(
            "portfwd-ctl: permission denied: cannot connect to the portfwd daemon at {} \
             (it admits root and the groups of its --socket-group and --socket-read-group)",
            d.socket().display()
        )
    );
    assert_eq!(configs(d).len(), 1);
}

/// Sends `bytes` on a fresh connection and returns what the daemon answered.
fn exchange(socket: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    // The daemon may answer and close before an oversized request is fully sent.
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// A request line one byte over the limit gets one error line; the daemon keeps
/// serving with its rules.
#[test]
fn oversized_request_is_refused_and_rules_stay() {
    let Some(topo) = setup("oversized_request_is_refused", "cbig", &[]) else {
        return;
    };
    let d = topo.daemon();
    d.add("9000", &backend(0));
    let before = configs(d);
    let mut huge = vec![b' '; MAX_REQUEST + 1];
    huge.push(b'\n');
    let reply = exchange(d.socket(), &huge);
    assert_eq!(
        reply,
        format!("{{\"ok\":false,\"error\":\"request larger than {MAX_REQUEST} bytes\"}}\n")
    );
    // Exactly the limit is read (and judged by the parser).
    let mut max = serde_json::to_vec(&Request::List).expect("encode");
    max.resize(MAX_REQUEST, b' ');
    max.push(b'\n');
    assert!(exchange(d.socket(), &max).starts_with("{\"ok\":true"));
    assert_eq!(configs(d), before);
}

/// Opens `n` connections to `socket` that never send a byte.
fn idle_connections(socket: &Path, n: usize) -> Vec<UnixStream> {
    (0..n)
        .map(|i| UnixStream::connect(socket).unwrap_or_else(|e| panic!("idle connection {i}: {e}")))
        .collect()
}

/// Raises this process's open-file limit to its hard limit (2,000 sockets and more).
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct passed, nothing else.
    unsafe {
        assert_eq!(
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim),
            0,
            "getrlimit"
        );
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0, "setrlimit");
    }
    assert!(
        lim.rlim_max >= 4096,
        "the open-file hard limit {} is too low",
        lim.rlim_max
    );
}

/// 2,000 idle connections and 100 slow writers (one byte every 100 ms, never a whole
/// request) hold the socket, and `list` is answered (the first once the daemon has
/// accepted the connects queued before it), then within a second, every time;
/// then a change goes through too. An idle connection is closed, with one error line,
/// once its deadline passes; a slow writer too.
#[test]
fn idle_and_slow_clients_do_not_starve_list() {
    let Some(topo) = setup("idle_and_slow_clients_do_not_starve_list", "cidl", &[]) else {
        return;
    };
    raise_nofile();
    let d = topo.daemon();
    d.add("9000", &backend(0));
    let socket = d.socket().to_path_buf();

    // The idle ones first: beyond MAX_CONNECTIONS the oldest are closed, and the slow
    // writers must be among those the daemon holds.
    let idle = idle_connections(&socket, 2000);
    let slow: Vec<UnixStream> = idle_connections(&socket, 100);
    let slow_opened = Instant::now();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let dribbler = {
        let stop = stop.clone();
        let mut slow: Vec<UnixStream> = slow.iter().map(|s| s.try_clone().expect("dup")).collect();
        std::thread::spawn(move || {
            let mut sent = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for s in &mut slow {
                    // Closed by the daemon at its deadline: that is the point.
                    let _ = s.write_all(b" ");
                }
                sent += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            sent
        })
    };

    // The first list waits in the listen queue behind the 2,100 connects (the daemon
    // accepts in order): it must be answered, not refused; its time is printed. Once it
    // is answered, every earlier connection has been accepted.
    let t = Instant::now();
    let r: protocol::ListReply =
        protocol::call(&socket, &Request::List).expect("list right after 2,100 connects");
    assert_eq!(r.rules.len(), 1);
    eprintln!(
        "list right after 2,100 connects (behind them in the listen queue): {:?}",
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());

    let mut worst = Duration::ZERO;
    for _ in 0..10 {
        let t = Instant::now();
        let r: Result<protocol::ListReply, _> = protocol::call(&socket, &Request::List);
        let took = t.elapsed();
        let r = r.unwrap_or_else(|e| panic!("list with 2,100 clients waiting: {e}"));
        assert_eq!(r.rules.len(), 1);
        worst = worst.max(took);
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("list with 2,000 idle and 100 slow clients: worst of 10 took {worst:?}");
    assert!(
        worst < Duration::from_secs(1),
        "list took {worst:?} with 2,000 idle and 100 slow clients"
    );
    d.add("9001", &backend(1));

    // The oldest idle connection was closed to make room, with one line that says so.
    let oldest = read_all(&idle[0]);
    assert_eq!(
        oldest,
        format!(
            "{{\"ok\":false,\"error\":\"closed: more than {MAX_CONNECTIONS} clients \
             connected, and this one waited longest; try again\"}}\n"
        )
    );
    // The newest idle connection and a slow writer are closed at their deadline, with
    // one line that says so.
    let expired = format!(
        "{{\"ok\":false,\"error\":\"no complete request within {} s\"}}\n",
        CLIENT_TIMEOUT.as_secs()
    );
    let last = idle.last().expect("an idle connection");
    assert_eq!(read_all(last), expired, "an idle connection");
    assert_eq!(read_all(&slow[0]), expired, "a slow writer");
    let lived = slow_opened.elapsed();
    assert!(
        lived < CLIENT_TIMEOUT + Duration::from_secs(3),
        "a slow writer lived {lived:?}"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = dribbler.join().expect("dribbler");
    assert!(rounds > 10, "the slow writers wrote {rounds} rounds");
    assert_eq!(configs(d).len(), 2);
}

/// What the daemon sent on `s` until it closed (read errors after its data, such as a
/// reset for bytes it left unread, end the read).
fn read_all(mut s: &UnixStream) -> String {
    s.set_read_timeout(Some(CLIENT_TIMEOUT + Duration::from_secs(10)))
        .expect("timeout");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Opens `n` connections to `socket` from a thread of its own running as uid 65534 with
/// primary group `gid` and no supplementary groups: Linux credentials are per thread,
/// and the raw system calls (unlike libc's wrappers, which change every thread) change
/// this thread's only. The thread ends there; the sockets stay the process's.
fn connections_as(socket: &Path, gid: u32, n: usize) -> Vec<UnixStream> {
    let socket = socket.to_path_buf();
    std::thread::spawn(move || {
        // SAFETY: plain credential system calls on this thread, which does nothing but
        // connect afterwards and then ends.
        unsafe {
            assert_eq!(
                libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()),
                0,
                "setgroups"
            );
            assert_eq!(
                libc::syscall(libc::SYS_setresgid, gid, gid, gid),
                0,
                "setresgid"
            );
            assert_eq!(
                libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534),
                0,
                "setresuid"
            );
        }
        idle_connections(&socket, n)
    })
    .join()
    .expect("the unprivileged thread")
}

/// 2,000 idle connections of a refused peer cannot close an admitted peer's connection
/// (they have a pool of their own) nor delay `list`; each gets its refusal line.
#[test]
fn refused_peers_cannot_crowd_out_admitted_ones() {
    let Some(topo) = setup("refused_peers_cannot_crowd_out_admitted_ones", "ccr", &[]) else {
        return;
    };
    raise_nofile();
    let d = topo.daemon();
    d.add("9000", &backend(0));
    make_world_connectable(d);
    let mut mine = UnixStream::connect(d.socket()).expect("connect as root");
    let theirs = connections_as(d.socket(), 65534, 2000);

    // As in `idle_and_slow_clients_do_not_starve_list`: the first list is answered once
    // the connects before it are accepted; the next within a second.
    let t = Instant::now();
    let r: protocol::ListReply =
        protocol::call(d.socket(), &Request::List).expect("list with 2,000 refused peers");
    assert_eq!(r.rules.len(), 1);
    eprintln!("list right after 2,000 refused connects: {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let t = Instant::now();
    let r: protocol::ListReply =
        protocol::call(d.socket(), &Request::List).expect("list with 2,000 refused peers");
    let took = t.elapsed();
    eprintln!("list with 2,000 refused peers connected: {took:?}");
    assert!(took < Duration::from_secs(1), "list took {took:?}");
    assert_eq!(r.rules.len(), 1);

    // The root connection made before the flood is still open and served.
    mine.write_all(b"{\"cmd\":\"list\"}\n").expect("send");
    assert!(read_all(&mine).starts_with("{\"ok\":true"));
    // The oldest of the refused connections was closed with its refusal; the newest
    // gets it for its request.
    let refusal = "{\"ok\":false,\"error\":\"permission denied: portfwd's control socket accepts root only\"}\n";
    assert_eq!(read_all(&theirs[0]), refusal);
    let mut last = theirs.last().expect("a refused connection");
    last.write_all(b"{\"cmd\":\"del\",\"publish\":{\"host_port\":9000}}\n")
        .expect("send");
    assert_eq!(read_all(last), refusal);
    assert_eq!(configs(d).len(), 1, "a refused peer changed the rules");
}
