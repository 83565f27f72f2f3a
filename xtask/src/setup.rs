//! `cargo xtask setup`: makes this machine able to build and test portfwd, installing
//! only what is missing and saying what and why. Idempotent: a second run installs
//! nothing.
//!
//! On Debian (the project's machines) the BPF toolchain is Debian's `rustc-web` with its
//! prebuilt `core` for the BPF targets plus `bpf-linker` 0.13.0 built against LLVM 22
//! (../shared/BPF-TOOLCHAIN.md); the tests and benchmarks need a few network tools. On
//! another distribution nothing is installed: the missing pieces are listed instead.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

mod docker;
mod podman;

/// Debian packages, with the reason each is needed.
const APT_PACKAGES: &[(&str, &str)] = &[
    (
        "rustc-web",
        "BPF toolchain: a rustc with core for bpfel-unknown-none",
    ),
    ("cargo-web", "BPF toolchain: its cargo"),
    (
        "libstd-rust-web-dev-bpf",
        "BPF toolchain: prebuilt core for the BPF targets",
    ),
    ("llvm-22-dev", "BPF toolchain: LLVM 22 for bpf-linker"),
    ("iproute2", "tests: ip netns, veth, bridge"),
    ("ethtool", "tests: checksum offload off on the client veth"),
    ("iputils-ping", "tests and demo: ping"),
    ("curl", "demo: HTTP requests from the client namespace"),
    ("iperf3", "bench: throughput"),
    ("socat", "bench: userspace proxy baseline"),
    ("iptables", "bench: iptables DNAT baseline"),
    ("nftables", "bench: nftables DNAT baseline"),
    ("bpftool", "tests: check what is attached"),
    ("wrk", "bench: HTTP load"),
    ("prometheus", "tests: promtool check metrics"),
    ("systemd", "tests: systemd-analyze verify of the unit"),
];

/// The linker the eBPF crate links with, and the exact install command.
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Commands the suites need, for the report on machines without apt.
const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("setpriv", "util-linux"),
    ("ethtool", "ethtool"),
    ("ping", "iputils"),
    ("curl", "curl"),
    ("iperf3", "iperf3"),
    ("socat", "socat"),
    ("iptables", "iptables"),
    ("nft", "nftables"),
    ("bpftool", "bpftool"),
    ("wrk", "wrk"),
    ("promtool", "prometheus"),
    ("systemd-analyze", "systemd"),
];

pub fn run() -> Result<()> {
    ensure()
}

/// Checks everything and installs what is missing.
pub fn ensure() -> Result<()> {
    println!("==> setup: checking the toolchain and test tools");
    check_rust_components()?;
    if !is_debian() {
        return report_non_debian();
    }
    let missing: Vec<&(&str, &str)> = APT_PACKAGES
        .iter()
        .filter(|(pkg, _)| !dpkg_installed(pkg))
        .collect();
    if missing.is_empty() {
        println!("    apt packages: all {} present", APT_PACKAGES.len());
    } else {
        println!("    installing {} missing apt package(s):", missing.len());
        for (pkg, why) in &missing {
            println!("      {pkg:<26} {why}");
        }
        require_root("install apt packages")?;
        let names: Vec<&str> = missing.iter().map(|(p, _)| *p).collect();
        step(Command::new("apt-get").arg("update").arg("-q"))?;
        step(
            Command::new("apt-get")
                .args(["install", "-y", "-q"])
                .args(&names)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    docker::ensure()?;
    podman::ensure()?;
    ensure_bpf_linker()?;
    println!("==> setup: done");
    Ok(())
}

fn ensure_bpf_linker() -> Result<()> {
    if let Some(v) = bpf_linker_version() {
        if v.contains(BPF_LINKER_VERSION) {
            println!("    bpf-linker: {v}");
            return Ok(());
        }
        println!("    bpf-linker: found `{v}`, need {BPF_LINKER_VERSION}");
    }
    println!(
        "    installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (links the kernel programs; about a minute)"
    );
    step(
        Command::new(cargo())
            .args(["install", "--locked"])
            .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
            .args(["--no-default-features", "--features", "llvm-22"])
            // Without it bpf-linker's build finds LLVM 14's llvm-config and fails.
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )?;
    match bpf_linker_version() {
        Some(v) if v.contains(BPF_LINKER_VERSION) => Ok(()),
        other => {
            bail!("bpf-linker still not usable after install ({other:?}); is ~/.cargo/bin in PATH?")
        }
    }
}

fn bpf_linker_version() -> Option<String> {
    let candidates = [
        Some(PathBuf::from("bpf-linker")),
        home().map(|h| h.join(".cargo/bin/bpf-linker")),
    ];
    candidates.into_iter().flatten().find_map(|exe| {
        let out = Command::new(exe).arg("--version").output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    })
}

fn check_rust_components() -> Result<()> {
    let mut missing = Vec::new();
    for (sub, comp) in [("fmt", "rustfmt"), ("clippy", "clippy")] {
        let ok = Command::new(cargo())
            .args([sub, "--version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            missing.push(comp);
        }
    }
    if !missing.is_empty() {
        bail!(
            "the Rust toolchain lacks {}: run `rustup component add {}`",
            missing.join(" and "),
            missing.join(" ")
        );
    }
    Ok(())
}

fn is_debian() -> bool {
    Path::new("/usr/bin/dpkg-query").exists() && Path::new("/usr/bin/apt-get").exists()
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "install ok installed")
}

/// Without apt: say exactly what is missing, install nothing.
fn report_non_debian() -> Result<()> {
    let mut missing = Vec::new();
    for (tool, pkg) in TOOLS.iter().chain(docker::TOOLS).chain(podman::TOOLS) {
        if which(tool).is_none() {
            missing.push(format!("`{tool}` (package {pkg})"));
        }
    }
    let bpf_core = Path::new("/usr/lib/rustlib/bpfel-unknown-none/lib").is_dir()
        || std::env::var_os("PORTFWD_BPF_RUSTC").is_some();
    if !bpf_core {
        missing.push(
            "a rustc with core for bpfel-unknown-none: set PORTFWD_BPF_RUSTC to one \
             (aya's usual route: a nightly with rust-src)"
                .to_string(),
        );
    }
    if bpf_linker_version().is_none() {
        missing.push(format!(
            "bpf-linker {BPF_LINKER_VERSION} (`cargo install bpf-linker`)"
        ));
    }
    if missing.is_empty() {
        println!("    not Debian, but everything needed is present");
        return Ok(());
    }
    println!("    this is not a Debian machine, so nothing is installed; missing:");
    for m in &missing {
        println!("      - {m}");
    }
    bail!("{} prerequisite(s) missing (listed above)", missing.len())
}

fn require_root(what: &str) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX);
    if uid != 0 {
        bail!("need root to {what}: run `cargo xtask setup` as root");
    }
    Ok(())
}

/// Runs one install step, echoing it.
fn step(cmd: &mut Command) -> Result<()> {
    println!("    $ {}", describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot run `{}`", describe(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", describe(cmd));
    }
    Ok(())
}

pub use portfwd_netkit::cmd::describe;

/// The cargo running this xtask (rustup's, when `~/.cargo/bin` is first in PATH).
pub fn cargo() -> PathBuf {
    std::env::var_os("CARGO").map_or_else(|| PathBuf::from("cargo"), PathBuf::from)
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME").map(PathBuf::from)
}

/// `which`, without a dependency (also looks in the sbin directories).
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

/// Installs the `packages` (name, why) that dpkg does not have, without recommended
/// packages (the container runtimes' tests: `setup/docker.rs`, `setup/podman.rs`);
/// `what` names the group in the report.
fn install_without_recommends(what: &str, packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&(&str, &str)> = packages
        .iter()
        .filter(|(pkg, _)| !dpkg_installed(pkg))
        .collect();
    if missing.is_empty() {
        println!("    {what}: all {} present", packages.len());
        return Ok(());
    }
    println!(
        "    installing {} missing {what} package(s):",
        missing.len()
    );
    for (pkg, why) in &missing {
        println!("      {pkg:<28} {why}");
    }
    require_root("install apt packages")?;
    let names: Vec<&str> = missing.iter().map(|(p, _)| *p).collect();
    step(Command::new("apt-get").arg("update").arg("-q"))?;
    step(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&names)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}
