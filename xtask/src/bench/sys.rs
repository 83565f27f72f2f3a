//! Processes, namespaces and CPU accounting for the rig. Everything created here is owned
//! by an RAII guard, so a failing run leaves no namespace or child process behind.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

pub use portfwd_netkit::{
    cmd::run,
    netns::{enter, Netns},
};

/// `sh -c SCRIPT` with `set -e`, for the topology's many `ip` lines.
pub fn sh(script: &str) -> Result<()> {
    run(Command::new("sh").arg("-ec").arg(script))?;
    Ok(())
}

pub fn have(tool: &str) -> bool {
    portfwd_netkit::cmd::find_in_path(tool).is_some()
}

/// The daemon inside namespace `ns`, in a private mount namespace where /sys is this
/// namespace's sysfs (the daemon looks interfaces up there) and cgroup2 is mounted at
/// /sys/fs/cgroup (the cgroup it serves). Same pid all along (`exec` chain), so it can be
/// signalled and measured.
pub fn daemon_cmd(ns: &Netns, prog: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = ns.command("unshare");
    c.args([
        "--mount",
        "--propagation",
        "slave",
        "sh",
        "-ec",
        r#"mount -t sysfs sysfs /sys; mount -t cgroup2 cgroup2 /sys/fs/cgroup; exec "$0" "$@""#,
    ]);
    c.arg(prog);
    c
}

/// Runs `f` on a thread that has entered `ns` (BPF_PROG_RUN live frames and attachments
/// resolve interfaces in the caller's namespace); a panic in `f` is an error of the case,
/// not the end of the run.
pub fn on_thread<T: Send>(ns: &Netns, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ns.run(f)))
        .map_err(|_| anyhow::anyhow!("namespace thread panicked"))??
}

/// A child process, stopped (SIGTERM, then SIGKILL after 5 s) and reaped on drop.
pub struct Proc(portfwd_netkit::process::ChildGuard);

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Self> {
        Ok(Self(portfwd_netkit::process::ChildGuard::spawn(name, cmd)?))
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Fails if the process has already exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self.0.try_wait() {
            bail!("{} exited early: {st}", self.0.name());
        }
        Ok(())
    }

    /// SIGTERM and wait (up to 5 s) for a clean exit, SIGKILL after that.
    pub fn stop(&mut self) {
        self.0.stop();
    }
}

/// Waits until `f` holds, up to `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(20));
    }
    bail!("timed out waiting for {what}")
}

/// Busy and total jiffies of every CPU (`cpu` line of /proc/stat) and of each CPU.
#[derive(Clone, Debug)]
pub struct CpuStat {
    pub all: (u64, u64),
    pub per_cpu: Vec<(u64, u64)>,
}

fn parse_cpu_line(line: &str) -> (u64, u64) {
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal guest guest_nice
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    let idle = get(3) + get(4);
    let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    (busy, busy + idle)
}

impl CpuStat {
    pub fn now() -> Self {
        let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let mut all = (0, 0);
        let mut per_cpu = Vec::new();
        for line in s.lines() {
            if line.starts_with("cpu ") {
                all = parse_cpu_line(line);
            } else if line.starts_with("cpu") {
                per_cpu.push(parse_cpu_line(line));
            }
        }
        Self { all, per_cpu }
    }

    /// Busy CPU time in seconds since `earlier`, over every CPU.
    pub fn busy_since(&self, earlier: &CpuStat) -> f64 {
        jiffies_to_s(self.all.0.saturating_sub(earlier.all.0))
    }

    /// Busy CPU time in seconds of one CPU since `earlier`.
    pub fn cpu_busy_since(&self, earlier: &CpuStat, cpu: usize) -> f64 {
        let (a, b) = (self.per_cpu.get(cpu), earlier.per_cpu.get(cpu));
        match (a, b) {
            (Some(a), Some(b)) => jiffies_to_s(a.0.saturating_sub(b.0)),
            _ => 0.0,
        }
    }

    /// Fraction of all CPUs busy since `earlier`.
    pub fn load_since(&self, earlier: &CpuStat) -> f64 {
        let busy = self.all.0.saturating_sub(earlier.all.0) as f64;
        let total = self.all.1.saturating_sub(earlier.all.1) as f64;
        if total > 0.0 {
            busy / total
        } else {
            0.0
        }
    }
}

fn jiffies_to_s(j: u64) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    j as f64 / if hz > 0 { hz as f64 } else { 100.0 }
}

/// Waits (up to `max`) for the machine to be mostly idle before a case, and returns the
/// load seen in the last sampling window, recorded with the case.
pub fn settle(max: Duration) -> f64 {
    let deadline = Instant::now() + max;
    loop {
        let a = CpuStat::now();
        thread::sleep(Duration::from_millis(300));
        let load = CpuStat::now().load_since(&a);
        if load < 0.15 || Instant::now() >= deadline {
            return load;
        }
    }
}

/// Pins the calling thread to one CPU.
pub fn pin_current_thread(cpu: usize) -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

/// Pins every kernel thread whose name starts with `prefix` (e.g. a threaded NAPI poller,
/// `napi/IFNAME-ID`) to `cpu`. Returns how many were pinned.
pub fn pin_kthreads(prefix: &str, cpu: usize) -> usize {
    let mut n = 0;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for e in dir.flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        if pid.parse::<u32>().is_err() {
            continue;
        }
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim().starts_with(prefix) {
            let ok = Command::new("taskset")
                .args(["-pc", &cpu.to_string(), &pid])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            n += usize::from(ok);
        }
    }
    n
}

/// VmRSS of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A cgroup v2 made for the rig (the daemon serves local clients of this cgroup only,
/// never the whole machine's); removed on drop.
pub struct Cgroup {
    cg: portfwd_netkit::cgroup::Cgroup,
    /// The same cgroup as the daemon sees it (cgroup2 mounted at /sys/fs/cgroup).
    pub daemon_path: PathBuf,
}

impl Cgroup {
    /// `<cgroup2 root>/<name>`; `name` starts `pfb-<pid>-`, so a later run can sweep it.
    pub fn new(name: &str) -> Result<Self> {
        Ok(Self {
            cg: portfwd_netkit::cgroup::Cgroup::create(name)?,
            daemon_path: Path::new("/sys/fs/cgroup").join(name),
        })
    }

    pub fn path(&self) -> &Path {
        self.cg.path()
    }
}

/// `prog` in namespace `ns`, started inside `cgroup` when given (nsenter keeps the
/// cgroup: it only changes the network namespace).
pub fn client_cmd(ns: &Netns, cgroup: Option<&Cgroup>, prog: &str) -> Command {
    match cgroup {
        None => ns.command(prog),
        Some(cg) => {
            let mut c = Command::new("sh");
            c.arg("-ec")
                .arg(r#"echo $$ > "$0/cgroup.procs"; ns=$1; shift; exec nsenter --net="$ns" "$@""#);
            c.arg(cg.path()).arg(ns.path()).arg(prog);
            c
        }
    }
}
