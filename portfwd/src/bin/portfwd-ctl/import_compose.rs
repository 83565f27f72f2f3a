//! `portfwd-ctl import-compose FILE --to SERVICE=IP[,IPV6] ...`.

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::{bail, Context as _};
use portfwd::{compose, rule};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The Compose file (docker-compose.yml, compose.yaml).
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// The address of a service's container (repeatable; one per service with ports);
    /// `SERVICE=IPV4,IPV6` for a dual-stack container.
    #[arg(long = "to", value_name = "SERVICE=IP[,IPV6]")]
    to: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut to: BTreeMap<String, rule::Addrs> = BTreeMap::new();
    for pair in &args.to {
        let Some((service, ips)) = pair.split_once('=') else {
            bail!("--to `{pair}`: expected SERVICE=IP");
        };
        let ip = ips
            .split(',')
            .map(rule::parse_ip)
            .collect::<Result<Vec<_>, _>>()
            .and_then(|ips| rule::Addrs::from_list(&ips))
            .with_context(|| format!("--to `{pair}`"))?;
        if to.insert(service.to_string(), ip).is_some() {
            bail!("--to: service `{service}` given twice");
        }
    }
    let file = args.file.display().to_string();
    let yaml =
        std::fs::read_to_string(&args.file).with_context(|| format!("cannot read {file}"))?;
    let out = compose::import(&file, &yaml, &to)?;
    print!("{out}");
    Ok(())
}
