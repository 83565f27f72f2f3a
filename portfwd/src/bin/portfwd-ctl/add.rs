//! `portfwd-ctl add SPEC BACKEND`.

use std::path::Path;

use portfwd::{
    protocol::{self, Request, RuleReply},
    rule::{Backend, Publish},
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to publish: `[HOST_IP:]HOST_PORT[/tcp|/udp]` (default: every host address, tcp).
    #[arg(value_name = "SPEC", allow_hyphen_values = true)]
    publish: String,
    /// Where it goes: `BACKEND_IP:BACKEND_PORT`.
    #[arg(value_name = "BACKEND", allow_hyphen_values = true)]
    backend: String,
}

pub fn run(socket: &Path, args: Args) -> Result<(), String> {
    let publish: Publish = args.publish.parse().map_err(|e| format!("{e}"))?;
    let backend: Backend = args.backend.parse().map_err(|e| format!("{e}"))?;
    let reply: RuleReply =
        protocol::call(socket, &Request::Add { publish, backend }).map_err(|e| e.to_string())?;
    println!("published {} -> {}", reply.publish, reply.backend);
    Ok(())
}
