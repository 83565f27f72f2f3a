//! The harness's network namespaces ([`portfwd_netkit::netns::Netns`] guards that panic
//! instead of returning errors), commands run inside them, and sockets made inside them
//! from the test process.
//!
//! Names are `pft-<pid>-<tag>-<n>-<role>`: the prefix marks them as this harness's, the
//! pid says which process owns them (several test binaries run at once), `n` keeps one
//! process's tests apart. Interfaces live inside the namespaces, so their names (at most
//! 15 characters) only need to be unique within one namespace, and deleting a namespace
//! deletes its interfaces.

use std::{
    ffi::OsStr,
    path::PathBuf,
    process::{Command, Output},
    sync::{
        atomic::{AtomicU32, Ordering},
        Once,
    },
};

use portfwd_netkit::{cmd, owned_name};

pub use portfwd_netkit::cmd::describe;

/// Every namespace (and cgroup) this harness creates starts with this.
pub const PREFIX: &str = "pft-";

/// Panics with `e` and every cause under it.
pub(crate) fn fail(e: &dyn std::error::Error) -> ! {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text += &format!(": {c}");
        cause = c.source();
    }
    panic!("{text}")
}

/// Runs `cmd`, panicking with its output if it fails; returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    cmd::stdout(cmd).unwrap_or_else(|e| fail(&e))
}

/// Runs `cmd` to completion with captured output, whatever its exit status.
pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", describe(cmd)))
}

/// A named network namespace, deleted on drop together with its interfaces; processes
/// still inside are killed first.
#[derive(Debug)]
pub struct Netns {
    ns: portfwd_netkit::netns::Netns,
}

impl Netns {
    /// Creates `pft-<pid>-<tag>-<n>-<role>` with `lo` up. The first call in a process
    /// sweeps stale namespaces and cgroups of dead processes ([`sweep_stale`]).
    pub fn new(tag: &str, role: &str) -> Self {
        static SWEEP: Once = Once::new();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        SWEEP.call_once(sweep_stale);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = owned_name(PREFIX, &format!("{tag}-{n}-{role}"));
        let ns = portfwd_netkit::netns::Netns::create(name).unwrap_or_else(|e| fail(&e));
        Self { ns }
    }

    pub fn name(&self) -> &str {
        self.ns.name()
    }

    /// `/run/netns/<name>`, for `nsenter --net=` and `setns`.
    pub fn path(&self) -> PathBuf {
        self.ns.path()
    }

    /// `ip -n <ns> <args>` (args split on whitespace); panics on failure.
    pub fn ip(&self, args: &str) -> String {
        self.ns.ip(args).unwrap_or_else(|e| fail(&e))
    }

    /// `ip -o link show dev IF` here: (ifindex, MAC).
    pub fn link(&self, ifname: &str) -> (u32, [u8; 6]) {
        // `N: d0@d1: <...> ... link/ether MAC brd ...`
        let out = self.ip(&format!("-o link show dev {ifname}"));
        let index = out
            .split(':')
            .next()
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("ifindex of {ifname} in {out:?}"));
        let mac = out
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .map(|m| {
                let b: Vec<u8> = m
                    .split(':')
                    .map(|x| u8::from_str_radix(x, 16).expect("MAC"))
                    .collect();
                <[u8; 6]>::try_from(b).expect("MAC")
            })
            .unwrap_or_else(|| panic!("MAC of {ifname} in {out:?}"));
        (index, mac)
    }

    /// A command that runs `program` inside this namespace, through
    /// `nsenter --net=/run/netns/<ns>` (which, unlike `ip netns exec`, leaves `/sys` and so
    /// the cgroup2 mount visible).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        self.ns.command(program)
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
        self.ns.run(f).unwrap_or_else(|e| fail(&e))
    }
}

/// Deletes this harness's namespaces and empty cgroups whose owning process is gone (a
/// test binary killed outright cannot run its guards). Only names with [`PREFIX`] are
/// touched, and only when the pid in the name is not a live process.
pub fn sweep_stale() {
    for (name, pid) in portfwd_netkit::netns::sweep_stale(PREFIX) {
        eprintln!("swept stale namespace {name} (pid {pid} is gone)");
    }
    portfwd_netkit::cgroup::sweep_stale(PREFIX);
}
