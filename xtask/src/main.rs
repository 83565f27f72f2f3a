//! `cargo xtask`: orchestration only (toolchain setup, build, test, demo, bench).

mod bench;
mod demo;
mod dist;
mod setup;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "portfwd's development tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what a fresh machine lacks (BPF toolchain, test packages), saying what.
    Setup,
    /// Set up, then play Docker's story in network namespaces.
    Demo,
    /// Set up, then run every test (unit, BPF_PROG_RUN fixtures, namespace traffic).
    Test(test::Args),
    /// Benchmark portfwd against direct routing, iptables DNAT and userspace proxies.
    Bench(bench::Args),
    /// Build the release binaries and write them, their completions and man pages, the
    /// systemd unit and the Prometheus examples into target/dist.
    Dist,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup::run(),
        Cmd::Demo => demo::run(),
        Cmd::Test(args) => test::run(args),
        Cmd::Bench(args) => bench::run(args),
        Cmd::Dist => dist::run(),
    }
}
