//! The container runtime the Docker tests drive (`tests/tests/docker.rs`): Debian's
//! dockerd with its containerd and runc, and a static busybox for the image. Installed
//! without recommended packages: the tests need nothing else, and a test run must not
//! pull in a desktop's worth of tools.

use anyhow::Result;

/// Debian packages, with the reason each is needed.
const PACKAGES: &[(&str, &str)] = &[
    ("docker.io", "docker tests: dockerd and the docker client"),
    ("containerd", "docker tests: dockerd's container supervisor"),
    ("runc", "docker tests: the OCI runtime"),
    (
        "busybox-static",
        "docker tests: the container image's only binary",
    ),
];

/// Commands they provide, for the report on machines without apt.
pub const TOOLS: &[(&str, &str)] = &[
    ("dockerd", "docker (moby)"),
    ("containerd", "containerd"),
    ("runc", "runc"),
    ("busybox", "busybox (static)"),
];

/// Installs the missing ones (`--no-install-recommends`).
pub fn ensure() -> Result<()> {
    super::install_without_recommends("container runtime", PACKAGES)
}
