//! `portfwd-ctl import-compose`: a declarations file ([`crate::declfile`]) from a Compose
//! file's `services.*.ports`, short syntax (`"8080:80"`, `3000`, `"127.0.0.1::80/udp"`)
//! and long syntax (`target`, `published`, `host_ip`, `protocol`). Compose knows the
//! containers by service name; portfwd needs their addresses, given as `--to SERVICE=IP`
//! (`--to SERVICE=IPV4,IPV6` for a dual-stack container).
//!
//! The output is checked by parsing it back ([`crate::declfile::parse`]), so what it
//! prints always loads.

use std::{collections::BTreeMap, fmt::Write as _};

use serde_norway::Value;
use thiserror::Error;

use crate::{
    declfile::{self, LongPort},
    rule::{Addrs, Declaration, RuleError},
};

#[derive(Debug, Error)]
/// Why a Compose file could not be imported. One line each, naming the file.
pub enum ComposeError {
    /// The file is not YAML.
    #[error("{file}: not a Compose file: {message}")]
    Yaml {
        /// The Compose file.
        file: String,
        /// The parser's message, on one line.
        message: String,
    },
    /// The file has no `services` mapping.
    #[error("{file}: no `services`")]
    NoServices {
        /// The Compose file.
        file: String,
    },
    /// A service's `ports` is not a list.
    #[error("{file}: service `{service}`: `ports` must be a list")]
    PortsNotList {
        /// The Compose file.
        file: String,
        /// The service.
        service: String,
    },
    /// Services with ports that no `--to` gives an address for.
    #[error(
        "{file}: no address for service{} {} (give --to SERVICE=IP for each service with ports)",
        if services.len() == 1 { "" } else { "s" },
        services.join(", ")
    )]
    MissingTo {
        /// The Compose file.
        file: String,
        /// The services.
        services: Vec<String>,
    },
    /// `--to` names services the file does not have.
    #[error("{file}: --to names no service of the file: {}", services.join(", "))]
    UnknownService {
        /// The Compose file.
        file: String,
        /// The services named.
        services: Vec<String>,
    },
    /// A `ports` entry that is not a valid rule.
    #[error("{file}: service `{service}`: ports entry `{entry}`: {message}")]
    Entry {
        /// The Compose file.
        file: String,
        /// The service.
        service: String,
        /// The entry as written.
        entry: String,
        /// Why it is not valid.
        message: String,
    },
    /// The generated declarations do not load (a bug).
    #[error("internal error: the generated file does not load")]
    Generated(#[source] declfile::FileError),
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A YAML scalar as text (Compose writes ports as strings or numbers).
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// One `ports` item as a TOML array element, checked against `to`.
fn entry(v: &Value, to: Addrs) -> Result<String, (String, String)> {
    let shown = |v: &Value| {
        serde_norway::to_string(v)
            .map(|s| crate::protocol::one_line(&s))
            .unwrap_or_default()
    };
    if let Some(short) = scalar(v) {
        Declaration::from_mapping(&short, to)
            .map_err(|e: RuleError| (short.clone(), e.to_string()))?;
        return Ok(toml_str(&short));
    }
    let Value::Mapping(_) = v else {
        return Err((shown(v), "expected a string, a number or a mapping".into()));
    };
    let long: LongPort = serde_norway::from_value(v.clone())
        .map_err(|e| (shown(v), crate::protocol::one_line(&e.to_string())))?;
    long.declaration(to)
        .map_err(|e| (shown(v), e.to_string()))?;
    let mut fields = vec![format!("target = {}", toml_str(&scalar_of(&long.target)))];
    if let Some(p) = &long.published {
        fields.push(format!("published = {}", toml_str(&scalar_of(p))));
    }
    if let Some(ip) = long.host_ip.as_deref().filter(|s| !s.is_empty()) {
        fields.push(format!("host_ip = {}", toml_str(ip)));
    }
    if let Some(p) = long.protocol.as_deref().filter(|s| !s.is_empty()) {
        fields.push(format!("protocol = {}", toml_str(p)));
    }
    Ok(format!("{{ {} }}", fields.join(", ")))
}

fn scalar_of(n: &declfile::NumOrText) -> String {
    match n {
        declfile::NumOrText::Num(n) => n.to_string(),
        declfile::NumOrText::Text(s) => s.clone(),
    }
}

/// The declarations file for the Compose file `yaml` (named `file`), with each service's
/// address from `to`.
pub fn import(
    file: &str,
    yaml: &str,
    to: &BTreeMap<String, Addrs>,
) -> Result<String, ComposeError> {
    let doc: Value = serde_norway::from_str(yaml).map_err(|e| ComposeError::Yaml {
        file: file.to_string(),
        message: crate::protocol::one_line(&e.to_string()),
    })?;
    let Some(Value::Mapping(services)) = doc.get("services") else {
        return Err(ComposeError::NoServices {
            file: file.to_string(),
        });
    };
    let mut with_ports: Vec<(String, Vec<Value>)> = Vec::new();
    for (name, svc) in services {
        let name = scalar(name).unwrap_or_default();
        match svc.get("ports") {
            None | Some(Value::Null) => {}
            Some(Value::Sequence(items)) => with_ports.push((name, items.clone())),
            Some(_) => {
                return Err(ComposeError::PortsNotList {
                    file: file.to_string(),
                    service: name,
                })
            }
        }
    }
    let unknown: Vec<String> = to
        .keys()
        .filter(|s| {
            !services
                .iter()
                .any(|(n, _)| scalar(n).as_deref() == Some(s.as_str()))
        })
        .cloned()
        .collect();
    if !unknown.is_empty() {
        return Err(ComposeError::UnknownService {
            file: file.to_string(),
            services: unknown,
        });
    }
    let missing: Vec<String> = with_ports
        .iter()
        .filter(|(n, items)| !items.is_empty() && !to.contains_key(n))
        .map(|(n, _)| n.clone())
        .collect();
    if !missing.is_empty() {
        return Err(ComposeError::MissingTo {
            file: file.to_string(),
            services: missing,
        });
    }
    let mut out = format!("# portfwd declarations, imported from {file}\n");
    for (name, items) in &with_ports {
        if items.is_empty() {
            continue;
        }
        let Some(&ip) = to.get(name) else { continue };
        let mut entries = Vec::new();
        for item in items {
            entries.push(
                entry(item, ip).map_err(|(entry, message)| ComposeError::Entry {
                    file: file.to_string(),
                    service: name.clone(),
                    entry,
                    message,
                })?,
            );
        }
        let to_text: Vec<String> = ip.ips().map(|a| toml_str(&a.to_string())).collect();
        let to_text = match to_text.as_slice() {
            [one] => one.clone(),
            many => format!("[{}]", many.join(", ")),
        };
        let _ = write!(
            out,
            "\n# service {name}\n[[publish]]\nto = {to_text}\nports = [\n"
        );
        for e in entries {
            let _ = writeln!(out, "  {e},");
        }
        out.push_str("]\n");
    }
    declfile::parse("(generated)", &out).map_err(ComposeError::Generated)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) const COMPOSE: &str = r#"
services:
  web:
    image: nginx
    ports:
      - "8080:80"
      - 3000
      - "127.0.0.1:9443:443"
      - "6060:6060/udp"
      - "9090-9091:8080-8081"
      - target: 80
        published: "8081"
        host_ip: 127.0.0.1
        protocol: tcp
        mode: host
  db:
    image: postgres
    expose: ["5432"]
  dns:
    ports:
      - target: 53
        published: 5353
        protocol: udp
"#;

    fn to(pairs: &[(&str, &str)]) -> BTreeMap<String, Addrs> {
        pairs
            .iter()
            .map(|(s, ip)| {
                let ip = ip.parse().expect("ip");
                (s.to_string(), Addrs::new(ip).expect("backend address"))
            })
            .collect()
    }

    #[test]
    fn imports_short_and_long_syntax() {
        let out = import(
            "docker-compose.yml",
            COMPOSE,
            &to(&[("web", "172.17.0.2"), ("dns", "172.17.0.3")]),
        )
        .expect("imports");
        assert_eq!(
            out,
            r#"# portfwd declarations, imported from docker-compose.yml

# service web
[[publish]]
to = "172.17.0.2"
ports = [
  "8080:80",
  "3000",
  "127.0.0.1:9443:443",
  "6060:6060/udp",
  "9090-9091:8080-8081",
  { target = "80", published = "8081", host_ip = "127.0.0.1", protocol = "tcp" },
]

# service dns
[[publish]]
to = "172.17.0.3"
ports = [
  { target = "53", published = "5353", protocol = "udp" },
]
"#
        );
        let decls = declfile::parse("out.toml", &out).expect("loads");
        assert_eq!(decls.len(), 7);
    }

    /// `--to web=IPV4,IPV6`: `to` lists both addresses, and the file loads back.
    #[test]
    fn imports_a_dual_stack_service() {
        let yaml = "services:\n  web:\n    ports: [\"8080:80\"]\n";
        let mut to = BTreeMap::new();
        let addrs = Addrs::from_list(&[
            "172.17.0.2".parse().expect("ip"),
            "2001:db8::2".parse().expect("ip"),
        ])
        .expect("dual");
        to.insert("web".to_string(), addrs);
        let out = import("compose.yml", yaml, &to).expect("imports");
        assert!(
            out.contains("to = [\"172.17.0.2\", \"2001:db8::2\"]"),
            "{out}"
        );
        let decls = declfile::parse("out.toml", &out).expect("loads");
        assert_eq!(decls[0].backend.addrs(), addrs);
    }

    #[test]
    fn errors() {
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let table: &[Case] = &[
            (
                COMPOSE,
                &[("web", "172.17.0.2")],
                "c.yml: no address for service dns (give --to SERVICE=IP for each service with ports)",
            ),
            (
                COMPOSE,
                &[],
                "c.yml: no address for services web, dns (give --to SERVICE=IP for each service with ports)",
            ),
            (
                COMPOSE,
                &[("web", "172.17.0.2"), ("dns", "172.17.0.3"), ("api", "172.17.0.4")],
                "c.yml: --to names no service of the file: api",
            ),
            (
                "services:\n  web:\n    ports: [\"80:80/sctp\"]\n",
                &[("web", "172.17.0.2")],
                "c.yml: service `web`: ports entry `80:80/sctp`: protocol `sctp` is not supported: portfwd forwards tcp and udp",
            ),
            (
                "services:\n  web:\n    ports: [\"${PORT}:80\"]\n",
                &[("web", "172.17.0.2")],
                "c.yml: service `web`: ports entry `${PORT}:80`: invalid port `${PORT}`: not a number",
            ),
            (
                "services:\n  web:\n    ports: [{target: 80, published: \"9-1\"}]\n",
                &[("web", "172.17.0.2")],
                "c.yml: service `web`: ports entry `target: 80 published: 9-1`: invalid port range `9-1`: it ends before it starts",
            ),
            ("version: '2'\n", &[], "c.yml: no `services`"),
            ("services: [\n", &[], "c.yml: not a Compose file: "),
        ];
        for (yaml, pairs, want) in table {
            let err = import("c.yml", yaml, &to(pairs))
                .expect_err(want)
                .to_string();
            assert!(err.starts_with(want), "{err}\nwanted {want}");
            assert!(!err.contains('\n'), "{err}");
        }
    }
}

/// Property tests: arbitrary text, and Compose files built from the grammar and then
/// mutated, never panic the import; every refusal is one line; what it writes is a
/// declarations file the parser accepts.
#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::rule::fuzz::{mutated, one_line, spec};
    use proptest::prelude::*;

    /// A YAML scalar of the shapes the ports' fields take, right and wrong.
    fn scalar() -> BoxedStrategy<String> {
        prop_oneof![
            spec().prop_map(|s| format!("{s:?}")),
            spec(),
            any::<i64>().prop_map(|n| n.to_string()),
            Just("1.5".to_string()),
            Just("true".to_string()),
            Just("null".to_string()),
            Just("~".to_string()),
            Just("[]".to_string()),
            Just("{}".to_string()),
            Just("${PORT}".to_string()),
            "[a-z0-9:./-]{0,10}",
        ]
        .boxed()
    }

    /// One `ports` item: short syntax, or the long syntax's mapping on one line.
    fn port_item() -> BoxedStrategy<String> {
        let key = prop_oneof![
            Just("target"),
            Just("published"),
            Just("host_ip"),
            Just("protocol"),
            Just("mode"),
            Just("name"),
            Just("bogus"),
        ];
        prop_oneof![
            3 => scalar(),
            2 => proptest::collection::vec((key, scalar()), 0..5).prop_map(|kv| {
                let fields: Vec<String> = kv.iter().map(|(k, v)| format!("{k}: {v}")).collect();
                format!("{{{}}}", fields.join(", "))
            }),
        ]
        .boxed()
    }

    fn service() -> BoxedStrategy<String> {
        (
            prop_oneof![Just("web"), Just("db"), Just("dns"), Just("other")],
            proptest::option::weighted(0.85, proptest::collection::vec(port_item(), 0..5)),
            proptest::option::weighted(0.1, scalar()),
        )
            .prop_map(|(name, ports, odd)| {
                let mut s = format!("  {name}:\n    image: x\n");
                if let Some(ports) = ports {
                    s += "    ports:\n";
                    for p in ports {
                        s += &format!("      - {p}\n");
                    }
                }
                if let Some(v) = odd {
                    s += &format!("    ports: {v}\n");
                }
                s
            })
            .boxed()
    }

    fn file() -> BoxedStrategy<String> {
        (
            proptest::option::weighted(0.2, scalar()),
            proptest::collection::vec(service(), 0..4),
        )
            .prop_map(|(version, services)| {
                let mut f = String::new();
                if let Some(v) = version {
                    f += &format!("version: {v}\n");
                }
                f += "services:\n";
                f += &services.concat();
                f
            })
            .boxed()
    }

    fn check(yaml: &str) -> Result<(), TestCaseError> {
        let to: BTreeMap<String, Addrs> = [("web", "172.17.0.2"), ("dns", "2001:db8::3")]
            .into_iter()
            .map(|(s, ip)| {
                let ip = ip.parse().expect("address");
                (s.to_string(), Addrs::new(ip).expect("backend address"))
            })
            .collect();
        match import("c.yml", yaml, &to) {
            Ok(text) => {
                let parsed = declfile::parse("imported.toml", &text);
                prop_assert!(parsed.is_ok(), "{yaml}\n->\n{text}\n{parsed:?}");
            }
            Err(e) => one_line(&e)?,
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
            check(&text)?;
        }

        #[test]
        fn grammar_shaped_files_never_panic(text in mutated(file())) {
            check(&text)?;
        }

        #[test]
        fn mutated_good_file_never_panics(text in mutated(Just(tests::COMPOSE.to_string()))) {
            check(&text)?;
        }
    }
}
