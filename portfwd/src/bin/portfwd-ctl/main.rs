//! `portfwd-ctl`: publishes and unpublishes ports through the `portfwd` daemon.
//!
//! Arguments are validated here first, with the daemon's own parser and messages, so bad
//! input fails the same way with or without a daemon. Every failure is one line on
//! stderr, `portfwd-ctl: <message>`, and exit code 1; success is exit code 0.

mod add;
mod del;
mod list;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
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
    /// Publish a port: `add [HOST_IP:]HOST_PORT[/tcp|/udp] BACKEND_IP:BACKEND_PORT`.
    Add(add::Args),
    /// Unpublish a port: `del [HOST_IP:]HOST_PORT[/tcp|/udp]`.
    Del(del::Args),
    /// Show the published ports and their counters.
    List(list::Args),
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
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("portfwd-ctl: {}", portfwd::protocol::one_line(&msg));
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
