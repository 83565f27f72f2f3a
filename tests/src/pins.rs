//! A bpffs of the test's own for the daemon's pinned state (`--pin-dir`), unmounted on
//! drop.
//!
//! Every mount of bpffs is a new, empty instance, so concurrent test daemons never see
//! each other's pins, and unmounting drops every pin left in it: its links detach and its
//! maps are freed once nothing else holds them, whatever the test did (a daemon killed,
//! a cleanup never run). Restart tests hand the same one to each daemon they start.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

/// `$TMPDIR/pft-bpf-<pid>-<n>`, a fresh bpffs; the daemon's pin directory is
/// [`Self::pin_dir`] inside it.
#[derive(Debug)]
pub struct PinFs {
    mount: PathBuf,
}

impl PinFs {
    /// Mounts a new bpffs.
    pub fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let mount = std::env::temp_dir().join(format!("pft-bpf-{}-{n}", std::process::id()));
        let _ = std::fs::create_dir_all(&mount);
        nix::mount::mount(
            Some("bpf"),
            &mount,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("cannot mount a bpffs on {}: {e}", mount.display()));
        Self { mount }
    }

    /// The daemon's `--pin-dir`.
    pub fn pin_dir(&self) -> PathBuf {
        self.mount.join("portfwd")
    }

    /// Where the bpffs is mounted.
    pub fn mount(&self) -> &Path {
        &self.mount
    }
}

impl Default for PinFs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinFs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.mount, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.mount);
    }
}
