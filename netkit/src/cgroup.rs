//! cgroup v2 directories as RAII guards. A daemon under test serves local clients of one
//! cgroup (`--cgroup`): giving it an empty one of its own keeps its socket programs away
//! from every other process of the machine, other runs' included.

use std::path::{Path, PathBuf};

use portfwd_common::host::cgroup2_root;

use crate::{stale_owner, Error, Result};

/// `<cgroup2 root>/<name>`, removed on drop.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `<cgroup2 root>/<name>` (name it with [`crate::owned_name`]).
    pub fn create(name: &str) -> Result<Self> {
        let path = cgroup2_root().ok_or(Error::NoCgroup2)?.join(name);
        std::fs::create_dir(&path).map_err(|source| Error::Io {
            what: "create cgroup",
            path: path.clone(),
            source,
        })?;
        Ok(Self { path })
    }

    /// Where it is, as this process sees it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves process `pid` into this cgroup.
    pub fn add(&self, pid: u32) -> Result<()> {
        let procs = self.path.join("cgroup.procs");
        std::fs::write(&procs, pid.to_string()).map_err(|source| Error::Io {
            what: "move a process into",
            path: self.path.clone(),
            source,
        })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // rmdir needs an empty cgroup: what still runs inside goes back to the root, and
        // processes that are exiting get a second to leave.
        if let (Ok(procs), Some(root)) = (
            std::fs::read_to_string(self.path.join("cgroup.procs")),
            cgroup2_root(),
        ) {
            for pid in procs.split_whitespace() {
                let _ = std::fs::write(root.join("cgroup.procs"), pid);
            }
        }
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// Removes the cgroups named `<prefix><pid>-...` whose process is gone (empty ones only:
/// rmdir refuses the others). Only `prefix`'s names are touched.
pub fn sweep_stale(prefix: &str) {
    let Some(root) = cgroup2_root() else { return };
    let Ok(entries) = std::fs::read_dir(&root) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        if stale_owner(&name, prefix).is_some() {
            let _ = std::fs::remove_dir(e.path());
        }
    }
}
