//! The daemon under test, run inside the topology's host namespace, and `portfwd-ctl`
//! pointed at its socket.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{bins, cgroup::Cgroup, netns::Netns, pins::PinFs, process::ChildGuard};

/// How long the daemon may take to load, attach and answer (generous: only to avoid
/// hanging).
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// What one `portfwd-ctl` run did.
#[derive(Debug, Clone)]
pub struct CtlOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CtlOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Asserts a failure that says one clear line on stderr (and nothing on stdout), and
    /// returns that line.
    #[track_caller]
    pub fn expect_error(&self, what: &str) -> String {
        assert!(
            !self.status.success(),
            "{what}: expected a non-zero exit, got {}; stdout: {:?}",
            self.status,
            self.stdout
        );
        assert!(
            self.status.code().is_some(),
            "{what}: expected an exit code, not a signal: {}",
            self.status
        );
        let lines: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "{what}: expected exactly one line on stderr, got {:?}",
            self.stderr
        );
        lines[0].to_string()
    }

    /// Asserts success and returns stdout.
    #[track_caller]
    pub fn expect_ok(&self, what: &str) -> &str {
        assert!(
            self.status.success(),
            "{what}: failed ({}): {}{}",
            self.status,
            self.stdout,
            self.stderr
        );
        &self.stdout
    }
}

/// Runs `portfwd-ctl --socket SOCKET ARGS...`.
pub fn ctl_at(socket: &Path, args: &[&str]) -> CtlOutput {
    let mut cmd = Command::new(bins::bin(bins::PORTFWD_CTL));
    cmd.arg("--socket").arg(socket).args(args);
    run_ctl(&mut cmd)
}

/// Runs `portfwd-ctl` as given (for tests of `PORTFWD_SOCKET` and argument handling).
pub fn run_ctl(cmd: &mut Command) -> CtlOutput {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run portfwd-ctl: {e}"));
    CtlOutput {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// One row of `list --json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub host_ip: String,
    pub host_port: u16,
    pub proto: String,
    pub backend_ip: String,
    pub backend_port: u16,
    pub packets: u64,
    pub bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    /// Connections (TCP) or datagrams (UDP) of local clients served at the socket.
    pub local: u64,
}

impl Rule {
    fn from_json(v: &Value) -> Self {
        let s = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("rule without string `{k}`: {v}"))
                .to_string()
        };
        let n = |k: &str| {
            v.get(k)
                .and_then(Value::as_u64)
                .unwrap_or_else(|| panic!("rule without number `{k}`: {v}"))
        };
        Self {
            host_ip: s("host_ip"),
            host_port: n("host_port") as u16,
            proto: s("proto"),
            backend_ip: s("backend_ip"),
            backend_port: n("backend_port") as u16,
            packets: n("packets"),
            bytes: n("bytes"),
            reply_packets: n("reply_packets"),
            reply_bytes: n("reply_bytes"),
            local: n("local"),
        }
    }

    /// The rule without its counters, to compare configurations.
    pub fn config(&self) -> (String, u16, String, String, u16) {
        (
            self.host_ip.clone(),
            self.host_port,
            self.proto.clone(),
            self.backend_ip.clone(),
            self.backend_port,
        )
    }
}

/// A running `portfwd` daemon; SIGTERM on drop.
#[derive(Debug)]
pub struct Daemon {
    child: ChildGuard,
    socket: PathBuf,
    log: PathBuf,
    /// Where the daemon's socket programs apply: the test's own cgroup, never the root
    /// (see [`crate::cgroup`]). Dropped after the daemon.
    cgroup: Arc<Cgroup>,
    /// The bpffs of its `--pin-dir` (shared by the daemons of a restart test): when the
    /// last holder drops it, whatever the daemons left pinned goes with it.
    pins: Arc<PinFs>,
}

impl Daemon {
    /// Starts `portfwd --socket DIR/portfwd.sock --cgroup <own cgroup> --iface IF...
    /// [extra...]` inside `ns` (through nsenter), its output going to `DIR/portfwd.log`.
    /// Does not wait.
    pub fn spawn(ns: &Netns, dir: &Path, ifaces: &[&str], extra: &[&str]) -> Self {
        Self::spawn_over(ns, dir, ifaces, extra, None, None)
    }

    /// As [`Self::spawn`]; with `after`, a restart of that (stopped or killed) daemon:
    /// the same pin directory (whose state it adopts) and cgroup; with `bin`, that
    /// binary instead of the built daemon (an upgrade).
    pub fn spawn_over(
        ns: &Netns,
        dir: &Path,
        ifaces: &[&str],
        extra: &[&str],
        after: Option<&Daemon>,
        bin: Option<&Path>,
    ) -> Self {
        let (pins, cgroup) = match after {
            Some(d) => (d.pins.clone(), d.cgroup.clone()),
            None => (Arc::new(PinFs::new()), Arc::new(Cgroup::new("d"))),
        };
        let socket = dir.join("portfwd.sock");
        let log = dir.join("portfwd.log");
        let logf = std::fs::File::create(&log).expect("daemon log file");
        let mut cmd = ns.command(bin.map_or_else(|| bins::bin(bins::PORTFWD), Path::to_path_buf));
        cmd.arg("--socket")
            .arg(&socket)
            .arg("--pin-dir")
            .arg(pins.pin_dir())
            .arg("--cgroup")
            .arg(cgroup.path());
        for i in ifaces {
            cmd.args(["--iface", i]);
        }
        cmd.args(extra)
            .env("RUST_LOG", "info")
            .stdout(logf.try_clone().expect("log fd"))
            .stderr(logf);
        let child = ChildGuard::spawn("portfwd", &mut cmd);
        Self {
            child,
            socket,
            log,
            cgroup,
            pins,
        }
    }

    /// Spawns a daemon over `after`'s pinned state (as [`Self::spawn_over`]) that must
    /// refuse to start: waits for its failing exit and returns the one `portfwd:` line
    /// (the error) it printed. Panics, with its log, otherwise.
    #[track_caller]
    pub fn refused_over(
        ns: &Netns,
        dir: &Path,
        ifaces: &[&str],
        extra: &[&str],
        after: &Daemon,
    ) -> String {
        let mut d = Self::spawn_over(ns, dir, ifaces, extra, Some(after), None);
        let status = d
            .child
            .wait_timeout(START_TIMEOUT)
            .unwrap_or_else(|| panic!("the daemon must refuse:\n{}", d.log_text()));
        let log = d.log_text();
        assert!(!status.success(), "{status}:\n{log}");
        let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("portfwd:")).collect();
        assert_eq!(errors.len(), 1, "one error line:\n{log}");
        errors[0].to_string()
    }

    /// SIGKILL (a crash), and the exit status.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        self.child.wait_timeout(Duration::from_secs(30))
    }

    /// The bpffs of its pin directory, to hand to the next daemon.
    pub fn pins(&self) -> &Arc<PinFs> {
        &self.pins
    }

    /// `portfwd --cleanup --pin-dir <its pin dir> --socket <its socket>`: stops
    /// forwarding for good (the daemon must have exited). Returns its output.
    pub fn cleanup(&self) -> CtlOutput {
        let mut cmd = Command::new(bins::bin(bins::PORTFWD));
        cmd.arg("--cleanup")
            .arg("--pin-dir")
            .arg(self.pins.pin_dir())
            .arg("--socket")
            .arg(&self.socket);
        run_ctl(&mut cmd)
    }

    /// Starts the daemon and waits until its socket answers `list`.
    /// `ingress` is an `--ingress` mode, optionally with `+fast` for `--fast-path`
    /// (e.g. `xdp+fast`).
    /// Starts with these arguments besides the interfaces, socket and cgroup, and waits
    /// until it answers.
    pub fn start_with(ns: &Netns, dir: &Path, ifaces: &[&str], args: &[&str]) -> Self {
        let mut d = Self::spawn(ns, dir, ifaces, args);
        d.wait_ready();
        d
    }

    pub fn start(ns: &Netns, dir: &Path, ifaces: &[&str], ingress: &str) -> Self {
        match ingress.split_once('+') {
            Some((mode, "fast")) => Self::start_with(
                ns,
                dir,
                ifaces,
                &["--ingress", mode, "--fast-path", "--fast-path-native-xdp"],
            ),
            _ => Self::start_with(ns, dir, ifaces, &["--ingress", ingress]),
        }
    }

    /// Waits until `portfwd-ctl list` succeeds; panics with the daemon's log if it exits
    /// or never answers.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait() {
                panic!(
                    "portfwd exited during start-up ({status}):\n{}",
                    self.log_text()
                );
            }
            if self.socket.exists() && self.ctl(&["list"]).success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "portfwd did not answer on {} within {START_TIMEOUT:?}:\n{}",
                self.socket.display(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The cgroup whose processes the daemon serves as local clients.
    pub fn cgroup(&self) -> &Cgroup {
        &self.cgroup
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// What the daemon printed so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn child(&mut self) -> &mut ChildGuard {
        &mut self.child
    }

    /// `portfwd-ctl --socket <this daemon's socket> ARGS...`.
    pub fn ctl(&self, args: &[&str]) -> CtlOutput {
        ctl_at(&self.socket, args)
    }

    /// `portfwd-ctl add HOST BACKEND`, asserting success; returns the line it printed.
    #[track_caller]
    pub fn add(&self, host: &str, backend: &str) -> String {
        self.ctl(&["add", host, backend])
            .expect_ok(&format!("add {host} {backend}"))
            .trim()
            .to_string()
    }

    /// `portfwd-ctl del SPEC`, asserting success.
    #[track_caller]
    pub fn del(&self, spec: &str) {
        self.ctl(&["del", spec]).expect_ok(&format!("del {spec}"));
    }

    /// `list --json`, parsed.
    #[track_caller]
    pub fn list_json(&self) -> Value {
        let out = self.ctl(&["list", "--json"]);
        let text = out.expect_ok("list --json");
        serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("list --json is not JSON ({e}): {text}"))
    }

    /// The rules of `list --json`.
    #[track_caller]
    pub fn rules(&self) -> Vec<Rule> {
        let v = self.list_json();
        v.get("rules")
            .and_then(Value::as_array)
            .unwrap_or_else(|| panic!("list --json has no `rules` array: {v}"))
            .iter()
            .map(Rule::from_json)
            .collect()
    }

    /// The rule published on `host_port`/`proto`.
    #[track_caller]
    pub fn rule(&self, host_port: u16, proto: &str) -> Rule {
        let rules = self.rules();
        rules
            .iter()
            .find(|r| r.host_port == host_port && r.proto == proto)
            .cloned()
            .unwrap_or_else(|| panic!("no rule for {host_port}/{proto} in {rules:?}"))
    }

    /// A reason counter of `list --json` (0 when absent).
    #[track_caller]
    pub fn reason(&self, name: &str) -> u64 {
        self.list_json()
            .get("reasons")
            .and_then(|r| r.get(name))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    }

    /// SIGTERM, and the exit status (None if it did not exit within `timeout`).
    pub fn stop(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.child.terminate(timeout)
    }
}
