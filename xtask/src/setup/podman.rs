//! The container runtime the Podman tests drive (`tests/tests/podman.rs`): Debian's
//! podman with runc (crun fails on hybrid cgroup layouts) and the reference CNI plugins
//! (`bridge`, `host-local`) that `portfwd-cni` chains after. Installed without
//! recommended packages, like the Docker ones; the image's busybox comes with those.

use anyhow::Result;

/// Debian packages, with the reason each is needed.
const PACKAGES: &[(&str, &str)] = &[
    ("podman", "podman tests: podman and conmon"),
    ("runc", "podman tests: the OCI runtime"),
    (
        "containernetworking-plugins",
        "podman tests: the bridge and host-local CNI plugins",
    ),
];

/// Commands they provide, for the report on machines without apt.
pub const TOOLS: &[(&str, &str)] = &[("podman", "podman"), ("conmon", "conmon"), ("runc", "runc")];

/// Installs the missing ones (`--no-install-recommends`).
pub fn ensure() -> Result<()> {
    super::install_without_recommends("podman", PACKAGES)
}
