//! `portfwd-ctl`: publishes and unpublishes ports through the `portfwd` daemon.
//!
//! Arguments are validated here first, with the daemon's own parser and messages, so bad
//! input fails the same way with or without a daemon. Every failure is one line on
//! stderr, `portfwd-ctl: <message>`, and exit code 1; success is exit code 0.

mod add;
mod apply;
mod del;
mod flows;
mod import_compose;
mod list;
mod trace;

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser, Subcommand};
use portfwd::protocol::{DEFAULT_SOCKET, SOCKET_ENV};

/// Publish container ports with portfwd's in-kernel forwarding.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The daemon's control socket.
    #[arg(long, global = true, value_name = "PATH", env = SOCKET_ENV, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publish ports: `add [HOST_IP:][HOST_PORT[-END]][/tcp|/udp] BACKEND_IP:PORT[-END]`.
    Add(add::Args),
    /// Unpublish a rule: `del [HOST_IP:]HOST_PORT[-END][/tcp|/udp]`.
    Del(del::Args),
    /// Show the published ports, their source and their counters.
    List(list::Args),
    /// Replace the file-sourced rules with a declarations file's, atomically, and print
    /// the difference: `apply [--dry-run] -f FILE`.
    Apply(apply::Args),
    /// Print a declarations file for a Compose file's published ports:
    /// `import-compose FILE --to SERVICE=IP ...`.
    ImportCompose(import_compose::Args),
    /// Show the live flows of remote clients and how full the flow tables are:
    /// `flows [--json] [--limit N] [PORT|BACKEND]`.
    Flows(flows::Args),
    /// Run one packet through the ingress program (BPF_PROG_RUN on a copy, nothing live
    /// changes) and say what happens: `trace [--iface IF] CLIENT_IP[:PORT] HOST_IP:PORT[/udp]`.
    Trace(trace::Args),
    /// Write shell completions and man pages into DIR (`cargo xtask dist`).
    #[command(hide = true)]
    GenerateDocs {
        /// Where to write them.
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => {
            // --help, --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("portfwd-ctl: {} (see portfwd-ctl --help)", usage_error(&e));
            return ExitCode::FAILURE;
        }
    };
    let result = match args.command {
        Command::Add(a) => add::run(&args.socket, a),
        Command::Del(a) => del::run(&args.socket, a),
        Command::List(a) => list::run(&args.socket, a),
        Command::Apply(a) => apply::run(&args.socket, a),
        Command::ImportCompose(a) => import_compose::run(a),
        Command::Flows(a) => flows::run(&args.socket, a),
        Command::Trace(a) => trace::run(&args.socket, a),
        Command::GenerateDocs { dir } => {
            portfwd::service::write_docs(Args::command().name("portfwd-ctl"), &dir)
                .map(|files| {
                    for f in files {
                        println!("{}", f.display());
                    }
                })
                .with_context(|| format!("cannot write into {}", dir.display()))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The error and its causes, on one line.
            eprintln!(
                "portfwd-ctl: {}",
                portfwd::protocol::one_line(&format!("{e:#}"))
            );
            ExitCode::FAILURE
        }
    }
}

/// clap's message without its usage block, on one line.
fn usage_error(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let first = text.split("\n\n").next().unwrap_or_default();
    portfwd::protocol::one_line(first.strip_prefix("error: ").unwrap_or(first))
}
