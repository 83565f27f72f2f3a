//! Child processes that cannot outlive their test: SIGTERM on drop, SIGKILL if they do
//! not exit within a few seconds.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use crate::netns::describe;

#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
}

impl ChildGuard {
    /// Spawns `cmd` (stdin closed; stdout and stderr as `cmd` sets them).
    pub fn spawn(name: &str, cmd: &mut Command) -> Self {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} (`{}`): {e}", describe(cmd)));
        Self {
            name: name.to_string(),
            child: Some(child),
        }
    }

    /// Spawns `cmd` with stdout piped and waits (up to `timeout`) for a line equal to
    /// `ready`; panics with what the process said if it exits or stays silent.
    pub fn spawn_until_line(name: &str, cmd: &mut Command, ready: &str, timeout: Duration) -> Self {
        let mut guard = Self::spawn(name, cmd.stdout(Stdio::piped()));
        let stdout = guard.child_mut().stdout.take().expect("piped stdout");
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

    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("child is running")
    }

    /// The exit status if the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child_mut().try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits (up to `timeout`) for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        terminate(self.child_mut(), timeout)
    }
}

fn terminate(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    // SAFETY: kill has no memory-safety preconditions; the pid is our own child's, not yet
    // reaped, so it cannot name another process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
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

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if terminate(&mut child, Duration::from_secs(5)).is_none() {
            eprintln!("{} ignored SIGTERM for 5 s; killing it", self.name);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
