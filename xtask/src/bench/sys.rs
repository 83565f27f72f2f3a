//! Processes, namespaces and CPU accounting for the rig. Everything created here is owned
//! by an RAII guard, so a failing run leaves no namespace or child process behind.

use std::{
    fs::File,
    path::Path,
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use portfwd_common::host::cgroup2_root;

/// Runs a command to completion; fails with its stderr when it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(out)
}

/// `sh -c SCRIPT` with `set -e`, for the topology's many `ip` lines.
pub fn sh(script: &str) -> Result<()> {
    run(Command::new("sh").arg("-ec").arg(script)).map(|_| ())
}

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A network namespace, deleted on drop (with every interface inside it).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Result<Self> {
        run(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Self {
            name: name.to_string(),
        };
        ns.sh("ip link set lo up")?;
        Ok(ns)
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// A command that runs inside the namespace (`nsenter`, so cgroups stay visible).
    pub fn cmd(&self, prog: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path())).arg(prog);
        c
    }

    /// The daemon inside the namespace, in a private mount namespace where /sys is this
    /// namespace's sysfs (the daemon looks interfaces up there) and cgroup2 is mounted at
    /// /sys/fs/cgroup (the cgroup it serves). Same pid all along (`exec` chain), so it
    /// can be signalled and measured.
    pub fn daemon_cmd(&self, prog: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path())).args([
            "unshare",
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

    /// A shell script inside the namespace; `ip netns exec` so that /sys shows its devices.
    pub fn sh(&self, script: &str) -> Result<()> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-ec"])
            .arg(script))
        .map(|_| ())
    }

    pub fn output(&self, script: &str) -> Result<String> {
        let out = run(Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-ec"])
            .arg(script))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `f` on a thread that has entered the namespace (BPF_PROG_RUN live frames and
    /// attachments resolve interfaces in the caller's namespace).
    pub fn on_thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let path = self.path();
        thread::spawn(move || {
            enter(&path)?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
    }
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter(path: &str) -> Result<()> {
    let f = File::open(path).with_context(|| format!("open {path}"))?;
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("setns {path}"))
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Deletes namespaces left by an earlier, killed run of this rig (prefix `pfb-`) whose
/// owning process is gone.
pub fn sweep_stale(prefix: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        // Names are `pfb-<pid>-...`: only sweep those whose process has exited.
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// A child process, killed (SIGTERM, then SIGKILL) and reaped on drop.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Self> {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {name}: {cmd:?}"))?;
        Ok(Self {
            name: name.to_string(),
            child: Some(child),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Fails if the process has already exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut() {
            if let Some(st) = c.try_wait()? {
                bail!("{} exited early: {st}", self.name);
            }
        }
        Ok(())
    }

    /// SIGTERM and wait (up to 5 s) for a clean exit.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut c) = self.child.take() else {
            return Ok(());
        };
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if c.try_wait()?.is_some() {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.stop();
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
/// never the whole machine's); removed on drop once its processes have exited.
pub struct Cgroup {
    pub path: std::path::PathBuf,
    /// The same cgroup as the daemon sees it (cgroup2 mounted at /sys/fs/cgroup).
    pub daemon_path: std::path::PathBuf,
}

impl Cgroup {
    pub fn new(name: &str) -> Result<Self> {
        let root = cgroup2_root().context("no cgroup2 mount")?;
        let path = root.join(name);
        std::fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(Self {
            path,
            daemon_path: Path::new("/sys/fs/cgroup").join(name),
        })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Deletes rig cgroups (`pfb-<pid>-...`) left by a killed run whose process is gone.
pub fn sweep_stale_cgroups(prefix: &str) {
    let Some(root) = cgroup2_root() else { return };
    let Ok(dir) = std::fs::read_dir(&root) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

/// `prog` in namespace `ns`, started inside `cgroup` when given (nsenter keeps the
/// cgroup: it only changes the network namespace).
pub fn client_cmd(ns: &Netns, cgroup: Option<&Cgroup>, prog: &str) -> Command {
    match cgroup {
        None => ns.cmd(prog),
        Some(cg) => {
            let mut c = Command::new("sh");
            c.arg("-ec")
                .arg(r#"echo $$ > "$0/cgroup.procs"; ns=$1; shift; exec nsenter --net="$ns" "$@""#);
            c.arg(&cg.path).arg(ns.path()).arg(prog);
            c
        }
    }
}
