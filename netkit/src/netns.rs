//! Named network namespaces (`ip netns add`) as RAII guards: dropping one kills what still
//! runs inside and deletes it, which deletes its interfaces too. Interfaces live inside
//! the namespaces, so their names (at most 15 characters) only need to be unique within
//! one namespace.

use std::{
    ffi::OsStr,
    fs::File,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use nix::sched::{setns, CloneFlags};

use crate::{cmd, stale_owner, Error, Result};

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates namespace `name` with `lo` up (name it with [`crate::owned_name`] so a
    /// later sweep can tell whose it is).
    pub fn create(name: impl Into<String>) -> Result<Self> {
        let ns = Self { name: name.into() };
        cmd::run(Command::new("ip").args(["netns", "add", &ns.name]))?;
        // From here on, a failure drops `ns`, which deletes the namespace again.
        ns.ip("link set lo up")?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, for `nsenter --net=` and `setns`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n <name> <args>` (args split on whitespace); returns stdout.
    pub fn ip(&self, args: &str) -> Result<String> {
        cmd::stdout(
            Command::new("ip")
                .args(["-n", &self.name])
                .args(args.split_whitespace()),
        )
    }

    /// A command that runs `program` inside this namespace through
    /// `nsenter --net=/run/netns/<name>`, which, unlike `ip netns exec`, keeps the
    /// caller's `/sys` and so the cgroup2 mount visible.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        c
    }

    /// `sh -ec <script>` inside through `ip netns exec`, which mounts this namespace's
    /// sysfs (`/sys/class/net` shows its interfaces); returns stdout.
    pub fn sh(&self, script: &str) -> Result<String> {
        cmd::stdout(
            Command::new("ip")
                .args(["netns", "exec", &self.name, "sh", "-ec"])
                .arg(script),
        )
    }

    /// Runs `f` on a thread that has entered this namespace and returns its result; a
    /// panic in `f` goes on in the caller. Sockets `f` creates belong to this namespace
    /// for their whole life, wherever they are used afterwards.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = self.path();
        std::thread::scope(|s| {
            s.spawn(move || {
                // Only this thread changes namespace; it ends when `f` returns.
                enter(&path)?;
                Ok(f())
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

/// Moves the calling thread into the network namespace at `path` (for good: call it on
/// a thread of its own).
pub fn enter(path: &Path) -> Result<()> {
    let file = File::open(path).map_err(|source| Error::Io {
        what: "open",
        path: path.to_path_buf(),
        source,
    })?;
    setns(file, CloneFlags::CLONE_NEWNET).map_err(|source| Error::Setns {
        path: path.to_path_buf(),
        source,
    })
}

/// Kills what still runs in namespace `name` and deletes it (errors ignored: this runs
/// from destructors and sweeps).
pub fn delete(name: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: kill has no memory-safety preconditions; the pids are those
                // `ip` listed inside a namespace that this harness owns.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stderr(Stdio::null())
        .status();
}

/// Deletes the namespaces named `<prefix><pid>-...` whose process is gone (a run killed
/// outright cannot run its guards) and returns their names with the dead pid. Only
/// `prefix`'s names are touched.
pub fn sweep_stale(prefix: &str) -> Vec<(String, u32)> {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return Vec::new();
    };
    let mut swept = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // `NAME` or `NAME (id: N)`.
        let name = line.split_whitespace().next().unwrap_or("");
        if let Some(pid) = stale_owner(name, prefix) {
            delete(name);
            swept.push((name.to_string(), pid));
        }
    }
    swept
}
