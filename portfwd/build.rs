//! Builds the kernel programs (`../portfwd-ebpf`) for `bpfel-unknown-none` and places the
//! objects in `OUT_DIR`, where `src/dataplane.rs` embeds them.
//!
//! The BPF target needs a compiler that ships `core` for it: on Debian that is
//! `rustc-web` (`/usr/bin/rustc`, see ../shared/BPF-TOOLCHAIN.md); elsewhere set
//! `PORTFWD_BPF_RUSTC` to one (e.g. a nightly with rust-src is not supported by this
//! script: use aya's usual route). `cargo xtask setup` installs what is missing.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let ebpf_dir = manifest_dir.join("../portfwd-ebpf");
    let common_dir = manifest_dir.join("../portfwd-common");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    for p in [
        ebpf_dir.join("src"),
        ebpf_dir.join("Cargo.toml"),
        ebpf_dir.join("Cargo.lock"),
        ebpf_dir.join(".cargo/config.toml"),
        common_dir.join("src"),
    ] {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    println!("cargo:rerun-if-env-changed=PORTFWD_BPF_RUSTC");

    let rustc = bpf_rustc().unwrap_or_else(|msg| fail(&msg));
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = out_dir.join("ebpf-target");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&ebpf_dir)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "bpfel-unknown-none",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTC", &rustc);
    // The outer build's settings are for the host and must not leak into the BPF build
    // (clippy's wrapper, host rustflags, the outer target).
    for key in [
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "RUSTDOCFLAGS",
        "CARGO_MAKEFLAGS",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(key);
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| fail(&format!("cannot run cargo for the eBPF build: {e}")));
    if !status.success() {
        fail("building portfwd-ebpf failed (see the errors above)");
    }
    for bin in ["portfwd", "portfwd-bench"] {
        let obj = target_dir.join("bpfel-unknown-none/release").join(bin);
        std::fs::copy(&obj, out_dir.join(format!("{bin}.bpf.o")))
            .unwrap_or_else(|e| fail(&format!("cannot copy {}: {e}", obj.display())));
    }
}

/// A rustc with the prebuilt `core` for bpfel-unknown-none.
fn bpf_rustc() -> Result<PathBuf, String> {
    if let Some(r) = env::var_os("PORTFWD_BPF_RUSTC") {
        return Ok(PathBuf::from(r));
    }
    let debian = Path::new("/usr/bin/rustc");
    if Path::new("/usr/lib/rustlib/bpfel-unknown-none/lib").is_dir() && debian.exists() {
        return Ok(debian.to_path_buf());
    }
    Err(
        "no Rust compiler for the BPF target: run `cargo xtask setup` (installs Debian's \
         rustc-web, libstd-rust-web-dev-bpf and bpf-linker), or set PORTFWD_BPF_RUSTC"
            .into(),
    )
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1);
}
