//! Test support for the privileged suites: RAII guards for network namespaces, cgroups,
//! child processes (panicking wrappers of `portfwd_netkit`'s, shared with the xtask rig)
//! and temporary directories, the namespace topology the traffic tests share
//! ([`topology::Topology`]), the running daemon ([`daemon::Daemon`]), a tiny HTTP/UDP
//! client ([`client`]) and the deterministic byte stream of large transfers ([`pattern`]).
//!
//! Everything a test creates lives in network namespaces whose names start with
//! [`netns::PREFIX`] and carry the test process's pid; nothing is attached to, or sent
//! through, the root namespace's interfaces, and no root-namespace sysctl is changed.
//! Guards clean up on drop, so a failing or panicking test leaves nothing behind; a
//! process killed outright leaves namespaces that the next run sweeps
//! ([`netns::sweep_stale`]).

pub mod bins;
pub mod cgroup;
pub mod client;
pub mod daemon;
pub mod fixture;
pub mod fuzz;
pub mod netns;
pub mod pattern;
pub mod pins;
pub mod process;
pub mod runtime;
pub mod tmp;
pub mod topology;

/// Whether this process can run the privileged suites (root, with `ip` and `nsenter`).
///
/// Without root a test is skipped (returns `false`, after saying so on stderr), except
/// under CI (`CI=true`), where the missing privilege is a failure: a CI run that skips
/// the traffic tests must not look green.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let missing: Vec<&str> = ["ip", "nsenter", "ethtool"]
        .into_iter()
        .filter(|tool| bins::find_in_path(tool).is_none())
        .collect();
    let problem = if euid != 0 {
        Some("needs root (network namespaces, BPF)".to_string())
    } else if !missing.is_empty() {
        Some(format!(
            "needs {} (run `cargo xtask setup`)",
            missing.join(", ")
        ))
    } else {
        None
    };
    match problem {
        None => true,
        Some(why) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{test}: {why}; CI=true, so this is a failure, not a skip")
        }
        Some(why) => {
            eprintln!("SKIPPED {test}: {why}");
            false
        }
    }
}

/// The number in the environment variable `name` (a run's size or seed), or `default`
/// when it is unset; panics on anything else, so a typo cannot shrink a run silently.
pub fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?}: not a number")),
        Err(_) => default,
    }
}
