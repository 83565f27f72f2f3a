//! A cgroup v2 of the test's own, removed on drop.
//!
//! The daemon serves local clients with cgroup socket programs (connect4, sendmsg4, ...)
//! attached to a cgroup, by default the cgroup2 root, which holds every process of the
//! machine, the test process (and so its "remote" client sockets) and other tests'
//! daemons included. Each test's daemon gets an empty cgroup of its own instead
//! (`--cgroup`), so its socket programs touch no process outside the test: the client
//! namespace is then really remote, its packets go through the ingress hook under test,
//! and parallel tests cannot rewrite each other's connections.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use portfwd_common::host::cgroup2_root;

#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `<cgroup2 root>/pft-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let root = cgroup2_root().expect("cgroup2 is not mounted");
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = root.join(format!("pft-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", path.display()));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves process `pid` into this cgroup.
    pub fn add(&self, pid: u32) {
        std::fs::write(self.path.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("cannot move {pid} into {}: {e}", self.path.display()));
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Processes still inside go back to the root first (rmdir needs an empty cgroup).
        if let (Ok(procs), Some(root)) = (
            std::fs::read_to_string(self.path.join("cgroup.procs")),
            cgroup2_root(),
        ) {
            for pid in procs.split_whitespace() {
                let _ = std::fs::write(root.join("cgroup.procs"), pid);
            }
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Removes this harness's empty cgroups left by dead test processes.
pub fn sweep_stale() {
    let Some(root) = cgroup2_root() else { return };
    let Ok(entries) = std::fs::read_dir(&root) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("pft-") else {
            continue;
        };
        let fields: Vec<&str> = rest.rsplitn(3, '-').collect();
        let Some(pid) = fields.get(1).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir(e.path());
        }
    }
}
