//! `portfwd-ctl apply [--dry-run] -f FILE`.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use portfwd::{
    declfile,
    protocol::{self, ApplyReply, Request},
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The declarations file (TOML, see the README's "Declarations file").
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    file: PathBuf,
    /// Print the difference only; change nothing.
    #[arg(long)]
    dry_run: bool,
}

pub fn run(socket: &Path, args: Args) -> anyhow::Result<()> {
    // Validated here first, so a broken file fails the same way with or without a
    // daemon; the daemon checks it all again before changing anything.
    let declarations = declfile::load(&args.file)?;
    let file = args.file.display().to_string();
    let reply: ApplyReply = protocol::call(
        socket,
        &Request::Apply {
            file: file.clone(),
            dry_run: args.dry_run,
            declarations,
        },
    )?;
    print!("{}", render(&file, &reply));
    Ok(())
}

/// `+ rule` (added), `- rule` (removed), `= rule` (unchanged), then a summary line.
pub fn render(file: &str, r: &ApplyReply) -> String {
    let mut out = String::new();
    for (sign, list) in [("-", &r.removed), ("+", &r.added), ("=", &r.unchanged)] {
        for rule in list {
            let _ = writeln!(out, "{sign} {rule}");
        }
    }
    let (a, d, u) = (r.added.len(), r.removed.len(), r.unchanged.len());
    let _ = if r.dry_run {
        writeln!(
            out,
            "dry run of {file}: {a} to add, {d} to remove, {u} unchanged (nothing changed)"
        )
    } else {
        writeln!(out, "applied {file}: {a} added, {d} removed, {u} unchanged")
    };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use portfwd::protocol::RuleReply;

    fn r(p: &str, b: &str) -> RuleReply {
        RuleReply {
            publish: p.parse().expect("publish"),
            backend: b.parse().expect("backend"),
        }
    }

    #[test]
    fn renders_the_difference() {
        let mut reply = ApplyReply {
            dry_run: false,
            added: vec![r("9000-9009", "172.17.0.2:8000-8009")],
            removed: vec![r("7000/udp", "172.17.0.3:53")],
            unchanged: vec![r("127.0.0.1:9443", "172.17.0.2:443")],
        };
        assert_eq!(
            render("ports.toml", &reply),
            "- *:7000/udp -> 172.17.0.3:53\n\
             + *:9000-9009/tcp -> 172.17.0.2:8000-8009\n\
             = 127.0.0.1:9443/tcp -> 172.17.0.2:443\n\
             applied ports.toml: 1 added, 1 removed, 1 unchanged\n"
        );
        reply.dry_run = true;
        assert!(render("ports.toml", &reply).ends_with(
            "dry run of ports.toml: 1 to add, 1 to remove, 1 unchanged (nothing changed)\n"
        ));
    }
}
