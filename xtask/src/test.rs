//! `cargo xtask test`: everything CI runs, in order, with a summary at the end:
//! setup, `cargo fmt --check`, `cargo clippy -D warnings`, build the binaries, then
//! `cargo test --workspace` (unit tests, BPF_PROG_RUN fixtures, namespace traffic tests,
//! which find the binaries built in the step before, in the same target directory).

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

use crate::setup::{self, cargo, describe, workspace_root};

#[derive(clap::Args)]
pub struct Args {
    /// Skip `cargo xtask setup` (the machine is known to be ready).
    #[arg(long)]
    no_setup: bool,
    /// Skip fmt and clippy.
    #[arg(long)]
    no_lint: bool,
    /// Passed to `cargo test --workspace` after `--`, e.g. a test name filter.
    #[arg(last = true)]
    test_args: Vec<String>,
}

struct StepResult {
    name: &'static str,
    ok: bool,
    took: Duration,
}

pub fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    let mut results = Vec::new();
    if !args.no_setup {
        let t = Instant::now();
        let ok = match setup::ensure() {
            Ok(()) => true,
            Err(e) => {
                eprintln!("setup failed: {e:#}");
                false
            }
        };
        results.push(StepResult {
            name: "setup",
            ok,
            took: t.elapsed(),
        });
        if !ok {
            return finish(&results, started);
        }
    }
    if !args.no_lint {
        results.push(cargo_step("fmt", &["fmt", "--all", "--check"]));
        // The kernel crate is outside the workspace (its own target and lock file).
        results.push(cargo_step(
            "fmt (kernel programs)",
            &[
                "fmt",
                "--manifest-path",
                "portfwd-ebpf/Cargo.toml",
                "--check",
            ],
        ));
        results.push(cargo_step(
            "clippy",
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
        ));
    }
    let mut tally = None;
    let build = cargo_step("build", &["build", "--workspace", "--bins"]);
    let built = build.ok;
    results.push(build);
    if built {
        let mut test: Vec<&str> = vec!["test", "--workspace", "--no-fail-fast"];
        if !args.test_args.is_empty() {
            test.push("--");
            test.extend(args.test_args.iter().map(String::as_str));
        }
        let (step, counts) = cargo_test_step(&test);
        results.push(step);
        tally = Some(counts);
    } else {
        println!("==> test: skipped, the build failed");
    }
    let outcome = finish(&results, started);
    // The last line: every test counted, in the plain form CI reads.
    if let Some(t) = tally {
        println!(
            "tests: {} passed, {} failed, {} skipped",
            t.passed, t.failed, t.ignored
        );
    }
    outcome
}

/// Totals over every `test result:` line of a `cargo test` run.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Tally {
    /// Adds a libtest summary line: `test result: ok. 5 passed; 0 failed; 1 ignored; ...`.
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

/// Runs `cargo test`, echoing its output as it comes and counting its results.
fn cargo_test_step(args: &[&str]) -> (StepResult, Tally) {
    use std::io::{BufRead, BufReader};
    let mut cmd = Command::new(cargo());
    cmd.args(args)
        .current_dir(workspace_root())
        .stdout(std::process::Stdio::piped());
    println!("==> test: {}", describe(&cmd));
    let t = Instant::now();
    let mut tally = Tally::default();
    let ok = match cmd.spawn() {
        Ok(mut child) => {
            if let Some(out) = child.stdout.take() {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    println!("{line}");
                    tally.add_line(&line);
                }
            }
            child.wait().map(|s| s.success()).unwrap_or(false)
        }
        Err(e) => {
            eprintln!("cannot run cargo: {e}");
            false
        }
    };
    let step = StepResult {
        name: "test",
        ok: ok && tally.failed == 0,
        took: t.elapsed(),
    };
    (step, tally)
}

fn cargo_step(name: &'static str, args: &[&str]) -> StepResult {
    let mut cmd = Command::new(cargo());
    cmd.args(args).current_dir(workspace_root());
    println!("==> {name}: {}", describe(&cmd));
    let t = Instant::now();
    let ok = match cmd.status() {
        Ok(s) => s.success(),
        Err(e) => {
            eprintln!("cannot run cargo: {e}");
            false
        }
    };
    StepResult {
        name,
        ok,
        took: t.elapsed(),
    }
}

fn finish(results: &[StepResult], started: Instant) -> Result<()> {
    println!();
    println!("==> summary of cargo xtask test");
    for r in results {
        println!(
            "    {:<7} {:<5} {:>7.1} s",
            r.name,
            if r.ok { "ok" } else { "FAIL" },
            r.took.as_secs_f64()
        );
    }
    let failed: Vec<&str> = results.iter().filter(|r| !r.ok).map(|r| r.name).collect();
    println!(
        "    total           {:>7.1} s",
        started.elapsed().as_secs_f64()
    );
    if failed.is_empty() {
        println!("==> every step succeeded");
        Ok(())
    } else {
        bail!("failed step(s): {}", failed.join(", "))
    }
}
