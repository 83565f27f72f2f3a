//! Child processes that cannot outlive their owner: dropping the guard sends SIGTERM and,
//! if the process has not exited within 5 s, SIGKILL; either way it is reaped.

use std::{
    process::{Child, ChildStdout, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use crate::{cmd::describe, Error, Result};

/// How long a dropped (or stopped) process gets to exit after SIGTERM.
const GRACE: Duration = Duration::from_secs(5);

/// A running child process, stopped on drop.
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
}

impl ChildGuard {
    /// Spawns `cmd` (stdin closed; stdout and stderr as `cmd` sets them); `name` is for
    /// messages.
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Self> {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .map_err(|source| Error::Spawn {
                cmd: describe(cmd),
                source,
            })?;
        Ok(Self {
            name: name.to_string(),
            child: Some(child),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pid (0 once stopped).
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The process's stdout, if it was piped and not taken yet.
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.as_mut()?.stdout.take()
    }

    /// The exit status if the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        poll_exit(child, timeout)
    }

    /// Sends SIGTERM and waits (up to `timeout`) for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        terminate(self.child.as_mut()?, timeout)
    }

    /// SIGTERM, then SIGKILL after 5 s; reaps the process. What drop does, early.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Some(status) = terminate(&mut child, GRACE) {
            return Some(status);
        }
        eprintln!("{} ignored SIGTERM for {GRACE:?}; killing it", self.name);
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends SIGTERM to `child` (unless it has exited) and waits up to `timeout` for it.
pub fn terminate(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    // The pid is our own child's, not yet reaped, so it cannot name another process.
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    poll_exit(child, timeout)
}

fn poll_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminate_stops_and_reports() {
        let mut g = ChildGuard::spawn("sleep", Command::new("sleep").arg("30")).expect("spawn");
        assert!(g.id() > 0);
        assert_eq!(g.try_wait(), None, "still running");
        let status = g
            .terminate(Duration::from_secs(5))
            .expect("exits on SIGTERM");
        assert!(!status.success());
        let mut done = ChildGuard::spawn("true", &mut Command::new("true")).expect("spawn");
        assert!(done
            .wait_timeout(Duration::from_secs(5))
            .is_some_and(|s| s.success()));
        assert!(done.stop().is_some_and(|s| s.success()));
        assert_eq!(done.id(), 0);
    }
}
