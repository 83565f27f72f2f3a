//! Host-only plumbing shared by the privileged test harness (`portfwd-tests`) and the
//! xtask rig (`cargo xtask bench` and `demo`), which cannot depend on each other (xtask
//! must build before the BPF toolchain is installed): network namespaces and cgroups as
//! RAII guards, child processes that cannot outlive their owner, the sweep of what a
//! killed run left behind, and a command runner whose errors carry the command line and
//! what it printed.
//!
//! Ownership rule: every namespace and cgroup made through this crate is named
//! `<prefix><pid>-<rest>` ([`owned_name`]), where the prefix says whose it is (`pft-` for
//! the tests, `pfb-` for the bench, `pfdemo-` for the demo) and the pid which process owns
//! it. A sweep ([`netns::sweep_stale`], [`cgroup::sweep_stale`]) touches only names with
//! its own prefix whose process is gone, so parallel runs never remove each other's.

pub mod cgroup;
pub mod cmd;
pub mod netns;
pub mod process;

use std::{io, path::PathBuf, process::ExitStatus};

/// `<prefix><pid of this process>-<rest>`: a name the sweeps recognise as this process's.
pub fn owned_name(prefix: &str, rest: &str) -> String {
    format!("{prefix}{}-{rest}", std::process::id())
}

/// The pid in `name` if it is `<prefix><pid>[-...]` and that process no longer exists.
fn stale_owner(name: &str, prefix: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?;
    let pid: u32 = rest.split('-').next()?.parse().ok()?;
    (!PathBuf::from(format!("/proc/{pid}")).exists()).then_some(pid)
}

/// What went wrong, with the command line or path it concerns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot run `{cmd}`")]
    Spawn {
        cmd: String,
        #[source]
        source: io::Error,
    },
    /// The command ran and failed; what it printed comes first on the line (reports
    /// show an error's first line only).
    #[error("`{cmd}` failed ({status}): {}", output.trim())]
    Failed {
        cmd: String,
        status: ExitStatus,
        /// stderr, then stdout.
        output: String,
    },
    #[error("cannot {what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot enter the network namespace {}", path.display())]
    Setns {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cgroup2 is not mounted")]
    NoCgroup2,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_owner_pid() {
        let name = owned_name("pfx-", "tag-0-role");
        assert!(name.starts_with(&format!("pfx-{}-", std::process::id())));
        // This process is alive: its names are never stale.
        assert_eq!(stale_owner(&name, "pfx-"), None);
        // Another prefix, or no pid where the pid belongs: not ours to judge.
        assert_eq!(stale_owner("pfy-4194305-a", "pfx-"), None);
        assert_eq!(stale_owner("pfx-abc-4194305", "pfx-"), None);
        // Above the kernel's pid_max (2^22): no such process can exist.
        assert_eq!(stale_owner("pfx-4194305-a", "pfx-"), Some(4_194_305));
        assert_eq!(stale_owner("pfx-4194305", "pfx-"), Some(4_194_305));
    }
}
