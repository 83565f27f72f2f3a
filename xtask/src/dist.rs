//! `cargo xtask dist`: builds the release binaries and writes what a package ships
//! beside them into `target/dist`: the binaries, shell completions (bash, zsh, fish) and
//! man pages generated from their clap definitions (each binary's hidden
//! `generate-docs`), the systemd unit and the Prometheus examples from `dist/`.

use std::{path::Path, process::Command};

use anyhow::{bail, Context, Result};

use crate::{
    demo::target_dir,
    setup::{cargo, describe, workspace_root},
};

pub fn run() -> Result<()> {
    let root = workspace_root();
    let status = Command::new(cargo())
        .args(["build", "--release", "-p", "portfwd"])
        .current_dir(&root)
        .status()
        .context("cannot run cargo build")?;
    if !status.success() {
        bail!("cargo build --release -p portfwd failed");
    }
    let target = target_dir()?;
    let out = target.join("dist");
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("cannot clear {}", out.display()))?;
    }
    let docs = out.join("share");
    for bin in ["portfwd", "portfwd-ctl"] {
        let from = target.join("release").join(bin);
        copy(&from, &out.join("bin").join(bin))?;
        let mut cmd = Command::new(&from);
        match bin {
            "portfwd" => cmd.arg("--generate-docs"),
            _ => cmd.arg("generate-docs"),
        };
        cmd.arg(&docs);
        let o = cmd.output().with_context(|| describe(&cmd))?;
        if !o.status.success() {
            bail!(
                "{} failed: {}",
                describe(&cmd),
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
    }
    copy(
        &root.join("dist/portfwd.service"),
        &out.join("portfwd.service"),
    )?;
    for f in ["prometheus.yml", "portfwd-alerts.yml"] {
        copy(
            &root.join("dist/prometheus").join(f),
            &out.join("prometheus").join(f),
        )?;
    }
    println!("==> dist: {}", out.display());
    Ok(())
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::copy(from, to)
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    Ok(())
}
