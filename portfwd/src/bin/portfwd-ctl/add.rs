//! `portfwd-ctl add [--owner NAME] SPEC BACKEND [BACKEND_IPV6]`.

use std::path::Path;

use portfwd::{
    protocol::{self, Owner, Request, RuleReply},
    rule::Declaration,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to publish: `[HOST_IP:][HOST_PORT[-END]][/tcp|/udp]`. No host address: every
    /// address of both families (`0.0.0.0` narrows to IPv4, `[::]` to IPv6). No host
    /// port (or 0): any free port; a host range to a single backend port: the first free
    /// one.
    #[arg(value_name = "SPEC", allow_hyphen_values = true)]
    publish: String,
    /// Where it goes: `BACKEND_IP:BACKEND_PORT[-END]` (IPv6 in brackets).
    #[arg(value_name = "BACKEND", allow_hyphen_values = true)]
    backend: String,
    /// A dual-stack backend's other address, same ports (`[2001:db8::2]:8080`): each
    /// family's clients go to the backend address of their family.
    #[arg(value_name = "BACKEND_OTHER_FAMILY", allow_hyphen_values = true)]
    other: Option<String>,
    /// Mark the rule as this plugin's (`list` shows it; `del --owner` removes only its
    /// own): 1 to 128 printable characters, e.g. `backup:nightly`.
    #[arg(long, value_name = "NAME")]
    owner: Option<Owner>,
}

pub fn run(socket: &Path, args: Args) -> anyhow::Result<()> {
    let backend = match &args.other {
        None => args.backend.clone(),
        Some(other) => format!("{},{other}", args.backend),
    };
    let decl = Declaration::parse(&args.publish, &backend)?;
    let reply: RuleReply = protocol::call(
        socket,
        &Request::Add {
            publish: decl.spec(),
            backend: decl.backend(),
            owner: args.owner,
            reservation_ok: false,
        },
    )?;
    // The chosen ports, for scripts: `published *:32768/tcp -> 172.17.0.2:80`.
    println!("published {reply}");
    Ok(())
}
