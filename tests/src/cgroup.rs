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
    path::Path,
    sync::atomic::{AtomicU32, Ordering},
};

use portfwd_netkit::owned_name;

use crate::netns::{fail, PREFIX};

/// `<cgroup2 root>/pft-<pid>-<tag>-<n>` ([`portfwd_netkit::cgroup::Cgroup`], panicking);
/// stale ones are swept with the namespaces ([`crate::netns::sweep_stale`]).
#[derive(Debug)]
pub struct Cgroup {
    cg: portfwd_netkit::cgroup::Cgroup,
}

impl Cgroup {
    /// Creates `<cgroup2 root>/pft-<pid>-<tag>-<n>`.
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = owned_name(PREFIX, &format!("{tag}-{n}"));
        let cg = portfwd_netkit::cgroup::Cgroup::create(&name).unwrap_or_else(|e| fail(&e));
        Self { cg }
    }

    pub fn path(&self) -> &Path {
        self.cg.path()
    }

    /// Moves process `pid` into this cgroup.
    pub fn add(&self, pid: u32) {
        self.cg.add(pid).unwrap_or_else(|e| fail(&e));
    }
}
