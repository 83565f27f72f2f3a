//! Helpers of the suites that drive real container runtimes (`tests/tests/docker.rs`,
//! `tests/tests/podman.rs`): building an image's root file system from host binaries,
//! and unmounting what a runtime left under its directories.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// The shared libraries `bin` loads (ldd), as absolute paths.
pub fn shared_libs(bin: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(bin).output().expect("run ldd");
    assert!(out.status.success(), "ldd {}", bin.display());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or `/lib64/ld-linux-x86-64.so.2 (0x...)`.
        .filter_map(|l| {
            let path = l
                .split_once("=>")
                .map_or(l, |(_, p)| p)
                .split_whitespace()
                .next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Lazily unmounts every mount point under `dir`, deepest first (overlays, network
/// namespace files a killed runtime left), so the directory can be removed.
pub fn unmount_under(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|p| Path::new(p).starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = Command::new("umount").args(["-l", p]).status();
    }
}
