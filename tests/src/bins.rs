//! Where the binaries under test are: next to the running test executable, in the same
//! target directory and profile (`<target>/<profile>/deps/<test>` runs, and
//! `<target>/<profile>/portfwd` is what `cargo build --workspace --bins` made), so any
//! `CARGO_TARGET_DIR` and profile work.

use std::path::PathBuf;

/// The daemon.
pub const PORTFWD: &str = "portfwd";
/// The control client.
pub const PORTFWD_CTL: &str = "portfwd-ctl";
/// This crate's test server.
pub const TESTSRV: &str = "portfwd-testsrv";
/// This crate's local client for the socket-hook tests.
pub const TESTCLI: &str = "portfwd-testcli";

/// The directory that holds the workspace's binaries for the running test's profile.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let mut dir = exe
        .parent()
        .expect("the executable's directory")
        .to_path_buf();
    // Integration tests run from `<profile>/deps`; binaries sit one level up.
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir
}

/// The built binary `name`, or a panic that says how to build it.
pub fn bin(name: &str) -> PathBuf {
    let path = profile_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`, \
         which `cargo xtask test` does)",
        path.display()
    );
    path
}

pub use portfwd_netkit::cmd::find_in_path;
