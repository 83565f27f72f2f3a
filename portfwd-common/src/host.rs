//! Facts about the host that the daemon, the tests and the xtask rig all need (built with
//! the `user` feature only: this module uses `std`, the rest of the crate stays `no_std`).

extern crate std;

use std::{fs, path::PathBuf};

/// The cgroup2 mount point (the root of the unified hierarchy), on unified
/// (`/sys/fs/cgroup`) and hybrid (`/sys/fs/cgroup/unified`) layouts alike, as this process
/// sees it (`/proc/self/mountinfo`); `None` when cgroup2 is not mounted.
pub fn cgroup2_root() -> Option<PathBuf> {
    cgroup2_mount(&fs::read_to_string("/proc/self/mountinfo").ok()?)
}

/// The mount point of the first cgroup2 line of a `mountinfo` text.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS... - FSTYPE SOURCE SUPEROPTIONS
    // (the optional fields before `-` vary in number; the mount point is always the fifth).
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mountpoint = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mountpoint))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_on_hybrid_and_unified_layouts() {
        let hybrid = "\
25 30 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw
33 25 0:28 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
34 33 0:29 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
35 33 0:30 / /sys/fs/cgroup/systemd rw shared:11 - cgroup cgroup rw,name=systemd";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "35 24 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw";
        assert_eq!(
            cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let v1_only = "35 33 0:30 / /sys/fs/cgroup/systemd rw shared:11 - cgroup cgroup rw";
        assert_eq!(cgroup2_mount(v1_only), None);
    }
}
