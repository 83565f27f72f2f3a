//! `portfwd-ctl flows [--json] [--limit N] [PORT|BACKEND]`: the live flows of remote
//! clients, like `conntrack -L`, and how full the flow tables are.

use std::path::Path;

use anyhow::Context as _;

use portfwd::{
    flows::{FlowFilter, FlowsReply, DEFAULT_FLOW_LIMIT},
    protocol::{self, Request},
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only flows to this published port, or to this backend (`IP` or `IP:PORT`).
    #[arg(value_name = "PORT|BACKEND", value_parser = FlowFilter::parse)]
    filter: Option<FlowFilter>,
    /// The most flows listed; a last line says how many more there are.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_FLOW_LIMIT)]
    limit: u32,
    /// Print `{"flows":[...],"more":N,"tables":[...]}` instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(socket: &Path, args: Args) -> anyhow::Result<()> {
    let reply: FlowsReply = protocol::call(
        socket,
        &Request::Flows {
            filter: args.filter,
            limit: args.limit,
        },
    )?;
    if args.json {
        let json = serde_json::to_string_pretty(&reply).context("cannot encode the flows")?;
        println!("{json}");
    } else {
        print!("{}", table(&reply));
    }
    Ok(())
}

/// Columns PROTO, CLIENT, PUBLISHED, BACKEND, TABLE, IDLE; then a line for the flows
/// not shown and one with the tables' usage.
pub fn table(reply: &FlowsReply) -> String {
    let header = ["PROTO", "CLIENT", "PUBLISHED", "BACKEND", "TABLE", "IDLE"].map(String::from);
    let rows: Vec<[String; 6]> = reply
        .flows
        .iter()
        .map(|f| {
            [
                f.proto.to_string(),
                f.client.to_string(),
                f.published.to_string(),
                f.backend.to_string(),
                f.table.name().to_string(),
                f.idle_secs.map_or("-".to_string(), |s| format!("{s}s")),
            ]
        })
        .collect();
    let mut width = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(width)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    if reply.more > 0 {
        out.push_str(&format!(
            "... {} more (raise --limit, or filter by PORT or BACKEND)\n",
            reply.more
        ));
    }
    let usage: Vec<String> = reply
        .tables
        .iter()
        .map(|t| format!("{} {}/{}", t.table.name(), t.entries, t.capacity))
        .collect();
    out.push_str(&format!("tables: {}\n", usage.join(", ")));
    out
}
