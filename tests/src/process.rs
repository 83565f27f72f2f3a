//! Child processes that cannot outlive their test ([`portfwd_netkit::process::ChildGuard`]:
//! SIGTERM on drop, SIGKILL if they do not exit within 5 s), started the harness's way:
//! a failure to start is a panic, and a server can be awaited until it says it is ready.

use std::{
    io::{BufRead, BufReader},
    ops::{Deref, DerefMut},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use crate::netns::fail;

/// A child process stopped on drop; derefs to [`portfwd_netkit::process::ChildGuard`]
/// (`id`, `try_wait`, `wait_timeout`, `terminate`).
#[derive(Debug)]
pub struct ChildGuard(portfwd_netkit::process::ChildGuard);

impl ChildGuard {
    /// Spawns `cmd` (stdin closed; stdout and stderr as `cmd` sets them).
    pub fn spawn(name: &str, cmd: &mut Command) -> Self {
        Self(portfwd_netkit::process::ChildGuard::spawn(name, cmd).unwrap_or_else(|e| fail(&e)))
    }

    /// Spawns `cmd` with stdout piped and waits (up to `timeout`) for a line equal to
    /// `ready`; panics with what the process said if it exits or stays silent.
    pub fn spawn_until_line(name: &str, cmd: &mut Command, ready: &str, timeout: Duration) -> Self {
        let mut guard = Self::spawn(name, cmd.stdout(Stdio::piped()));
        let stdout = guard.take_stdout().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.trim() == ready => return guard,
                Ok(_) => continue,
                Err(_) => {
                    let status = guard.try_wait();
                    panic!(
                        "{name} did not print `{ready}` within {timeout:?} (status: {status:?})"
                    );
                }
            }
        }
    }
}

impl Deref for ChildGuard {
    type Target = portfwd_netkit::process::ChildGuard;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}
