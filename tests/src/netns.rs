//! Network namespaces as RAII guards, commands run inside them, and sockets made inside
//! them from the test process.
//!
//! Names are `pft-<tag>-<pid>-<n>-<role>`: the prefix marks them as this harness's, the
//! pid says which process owns them (several test binaries run at once), `n` keeps one
//! process's tests apart. Interfaces live inside the namespaces, so their names (at most
//! 15 characters) only need to be unique within one namespace, and deleting a namespace
//! deletes its interfaces.

use std::{
    ffi::OsStr,
    fs::File,
    path::PathBuf,
    process::{Command, Output, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Once,
    },
};

use nix::sched::{setns, CloneFlags};

/// Every namespace this harness creates starts with this.
pub const PREFIX: &str = "pft-";

/// Runs `cmd`, panicking with its output if it fails.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "`{}` failed ({}):\n{}{}",
        describe(cmd),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `cmd` to completion with captured output.
pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", describe(cmd)))
}

/// The command line, for messages.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A named network namespace (`ip netns add`), deleted on drop together with its
/// interfaces; processes still inside are killed first.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `pft-<tag>-<pid>-<n>-<role>` with `lo` up. The first call in a process
    /// sweeps stale namespaces of dead processes ([`sweep_stale`]).
    pub fn new(tag: &str, role: &str) -> Self {
        static SWEEP: Once = Once::new();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        SWEEP.call_once(|| {
            sweep_stale();
            crate::cgroup::sweep_stale();
        });
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{tag}-{}-{n}-{role}", std::process::id());
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name };
        ns.ip("link set lo up");
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, for `nsenter --net=` and `setns`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n <ns> <args>` (args split on whitespace); panics on failure.
    pub fn ip(&self, args: &str) -> String {
        run_ok(
            Command::new("ip")
                .args(["-n", &self.name])
                .args(args.split_whitespace()),
        )
    }

    /// A command that runs `program` inside this namespace, through
    /// `nsenter --net=/run/netns/<ns>` (which, unlike `ip netns exec`, leaves `/sys` and so
    /// the cgroup2 mount visible).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `program args...` inside; panics on failure; returns stdout.
    pub fn exec_ok(&self, program: &str, args: &[&str]) -> String {
        run_ok(self.command(program).args(args))
    }

    /// Sets a sysctl of this namespace only (`/proc/sys/net` follows the writer's netns).
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.run(|| {
            std::fs::write(&path, value).unwrap_or_else(|e| panic!("cannot set {key}={value}: {e}"))
        });
    }

    /// Runs `f` on a thread that has entered this namespace and returns its result.
    /// Sockets `f` creates belong to this namespace for their whole life, wherever they
    /// are used afterwards.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = File::open(self.path())
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.path().display()));
        std::thread::scope(|s| {
            s.spawn(move || {
                // Only this thread changes namespace; it ends when `f` returns.
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns({}): {e}", self.name));
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete(&self.name);
    }
}

/// Kills what still runs in `name` and deletes it.
fn delete(name: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stderr(Stdio::null())
        .status();
}

/// Deletes this harness's namespaces whose owning process is gone (a test binary killed
/// outright cannot run its guards). Only names with [`PREFIX`] are touched, and only when
/// the pid in the name is not a live process.
pub fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        // <tag>-<pid>-<n>-<role>: the pid is the third field from the end.
        let fields: Vec<&str> = rest.rsplitn(4, '-').collect();
        let Some(pid) = fields.get(2).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !PathBuf::from(format!("/proc/{pid}")).exists() {
            eprintln!("sweeping stale namespace {name} (pid {pid} is gone)");
            delete(name);
        }
    }
}
