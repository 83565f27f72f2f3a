//! `portfwd-ctl del [--owner NAME] SPEC`.

use std::path::Path;

use portfwd::{
    protocol::{self, Owner, Request, RuleReply},
    rule::Publish,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to unpublish: `[HOST_IP:]HOST_PORT[-END][/tcp|/udp]`, as `list` shows it (a
    /// range is removed whole).
    #[arg(value_name = "SPEC", allow_hyphen_values = true)]
    publish: String,
    /// Only if the rule is this owner's (anything else is refused and left as it is).
    #[arg(long, value_name = "NAME")]
    owner: Option<Owner>,
}

pub fn run(socket: &Path, args: Args) -> anyhow::Result<()> {
    let publish: Publish = args.publish.parse()?;
    let reply: RuleReply = protocol::call(
        socket,
        &Request::Del {
            publish,
            owner: args.owner,
        },
    )?;
    println!("unpublished {reply}");
    Ok(())
}
