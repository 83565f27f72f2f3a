//! The declarations file: what a host publishes, in TOML, one `[[publish]]` per backend
//! with Docker/Compose port strings, or Compose's long form as a table:
//!
//! ```toml
//! [[publish]]
//! to = "172.17.0.2"
//! ports = ["9000:8080", "127.0.0.1:9443:443", "5353:53/udp", "7000-7010:7000-7010"]
//!
//! [[publish]]
//! to = "172.17.0.3"
//! ports = [{ target = 80, published = "8080", host_ip = "127.0.0.1", protocol = "tcp" }]
//!
//! [[publish]]
//! to = ["172.17.0.4", "2001:db8::4"]   # a dual-stack container: each family to its own
//! ports = ["9080:80"]
//! ```
//!
//! Parsing validates everything the grammar can ([`crate::rule`]), and conflicts between
//! the file's own fixed ports; every error is one line naming the file, the line and the
//! entry as written. Each entry keeps its line, and the whole parsed list travels to the
//! daemon ([`crate::protocol::Request::Apply`]), which validates it again.

use std::{collections::BTreeMap, ops::Range, path::Path};

use serde::Deserialize;
use thiserror::Error;
use toml::Spanned;

use crate::{
    protocol::FileDeclaration,
    rule::{
        self, Addrs, Backend, Declaration, Host, HostPorts, PortRange, Proto, Publish, PublishSpec,
        RuleError,
    },
};

/// Why a declarations file was refused. One line each, naming the file and the line.
#[derive(Debug, Error)]
pub enum FileError {
    /// The file cannot be read.
    #[error("cannot read {file}")]
    Read {
        /// The file.
        file: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not TOML, or not of the declarations file's shape.
    #[error("{file}:{line}: {message}")]
    Syntax {
        /// The file.
        file: String,
        /// The line (1-based).
        line: u32,
        /// The parser's message, on one line.
        message: String,
    },
    /// An entry is not a valid rule.
    #[error("{file}:{line}: entry `{entry}`")]
    Entry {
        /// The file.
        file: String,
        /// The entry's line (1-based).
        line: u32,
        /// The entry as written.
        entry: String,
        /// Why.
        #[source]
        source: RuleError,
    },
    /// Two entries of the file take the same port.
    #[error(
        "{file}:{line}: entry `{entry}`: Bind for {addr_port} failed: port is already allocated (by line {other})"
    )]
    Conflict {
        /// The file.
        file: String,
        /// The later entry's line.
        line: u32,
        /// The later entry as written.
        entry: String,
        /// The address and port as Docker writes them.
        addr_port: String,
        /// The earlier entry's line.
        other: u32,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc {
    #[serde(default)]
    publish: Vec<PublishTable>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishTable {
    to: Spanned<To>,
    ports: Vec<Spanned<PortEntry>>,
}

/// `to`: one address, or one per family.
#[derive(Deserialize)]
#[serde(untagged)]
enum To {
    One(String),
    Many(Vec<String>),
}

impl To {
    fn addrs(&self) -> Result<Addrs, RuleError> {
        match self {
            To::One(ip) => Addrs::new(rule::parse_ip(ip)?),
            To::Many(ips) => {
                let ips = ips
                    .iter()
                    .map(|ip| rule::parse_ip(ip))
                    .collect::<Result<Vec<_>, _>>()?;
                Addrs::from_list(&ips)
            }
        }
    }
}

/// A `ports` item: a Docker/Compose short string, or Compose's long form.
#[derive(Deserialize)]
#[serde(untagged)]
enum PortEntry {
    Short(String),
    Long(LongPort),
}

/// Compose's long syntax (`mode`, `name` and `app_protocol` are accepted and ignored: they
/// mean nothing to a port forwarder).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LongPort {
    /// The container port or ports.
    pub target: NumOrText,
    /// The host port or ports; none: any free port.
    #[serde(default)]
    pub published: Option<NumOrText>,
    /// The host address; none: `*`.
    #[serde(default)]
    pub host_ip: Option<String>,
    /// `tcp` (the default) or `udp`.
    #[serde(default)]
    pub protocol: Option<String>,
    /// Compose's `mode` (ignored).
    #[serde(default)]
    pub mode: Option<String>,
    /// Compose's `name` (ignored).
    #[serde(default)]
    pub name: Option<String>,
    /// Compose's `app_protocol` (ignored).
    #[serde(default)]
    pub app_protocol: Option<String>,
}

/// A port written as a number or a string (`8080`, `"8080"`, `"8080-8081"`).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum NumOrText {
    /// A number.
    Num(u64),
    /// A string.
    Text(String),
}

impl NumOrText {
    fn text(&self) -> String {
        match self {
            NumOrText::Num(n) => n.to_string(),
            NumOrText::Text(s) => s.clone(),
        }
    }
}

impl LongPort {
    /// The declaration this long-form entry stands for, to the backend at `to`.
    pub fn declaration(&self, to: Addrs) -> Result<Declaration, RuleError> {
        let host = match self.host_ip.as_deref() {
            None | Some("") => Host::Any,
            Some(ip) => rule::parse_host_text(ip)?,
        };
        let proto: Proto = match self.protocol.as_deref() {
            None | Some("") => Proto::Tcp,
            Some(p) => p.parse()?,
        };
        let ports = match &self.published {
            None => None,
            Some(p) => rule::parse_host_ports(&p.text())?,
        };
        let target: PortRange = self.target.text().parse()?;
        Declaration::new(
            PublishSpec { host, ports, proto },
            Backend::with_addrs(to, target),
        )
    }
}

/// The 1-based line of byte `offset` of `text`.
fn line_of(text: &str, offset: usize) -> u32 {
    let upto = text.get(..offset).unwrap_or(text);
    u32::try_from(upto.matches('\n').count() + 1).unwrap_or(u32::MAX)
}

/// The entry as written, on one line.
fn entry_text(text: &str, span: Range<usize>) -> String {
    let raw = text.get(span).unwrap_or_default();
    crate::protocol::one_line(raw)
}

/// Parses and validates a declarations file's `text`; `file` names it in messages.
pub fn parse(file: &str, text: &str) -> Result<Vec<FileDeclaration>, FileError> {
    let doc: Doc = toml::from_str(text).map_err(|e| FileError::Syntax {
        file: file.to_string(),
        line: e.span().map_or(1, |s| line_of(text, s.start)),
        message: crate::protocol::one_line(e.message()),
    })?;
    let mut out = Vec::new();
    for table in &doc.publish {
        let to_line = line_of(text, table.to.span().start);
        let to = table
            .to
            .get_ref()
            .addrs()
            .map_err(|source| FileError::Entry {
                file: file.to_string(),
                line: to_line,
                entry: format!("to = {}", entry_text(text, table.to.span())),
                source,
            })?;
        for port in &table.ports {
            let line = line_of(text, port.span().start);
            let (entry, decl) = match port.get_ref() {
                PortEntry::Short(s) => (s.clone(), Declaration::from_mapping(s, to)),
                PortEntry::Long(l) => (entry_text(text, port.span()), l.declaration(to)),
            };
            let decl = decl.map_err(|source| FileError::Entry {
                file: file.to_string(),
                line,
                entry: entry.clone(),
                source,
            })?;
            out.push(FileDeclaration {
                line,
                entry,
                publish: decl.spec(),
                backend: decl.backend(),
            });
        }
    }
    check_conflicts(file, &out)?;
    Ok(out)
}

/// Reads and parses the file at `path`.
pub fn load(path: &Path) -> Result<Vec<FileDeclaration>, FileError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
        file: file.clone(),
        source,
    })?;
    parse(&file, &text)
}

/// The file's own conflicts between fixed ports (Docker's rule, per port); open ports are
/// the daemon's to choose.
fn check_conflicts(file: &str, decls: &[FileDeclaration]) -> Result<(), FileError> {
    let mut fixed: BTreeMap<Publish, u32> = BTreeMap::new();
    for d in decls {
        let Ok(decl) = Declaration::new(d.publish, d.backend) else {
            continue;
        };
        let HostPorts::Exact(ports) = decl.host_ports() else {
            continue;
        };
        let Ok(publish) = Publish::new(decl.host(), ports, decl.proto()) else {
            continue;
        };
        let first = fixed
            .iter()
            .filter_map(|(p, line)| publish.conflict(p).map(|port| (port, *line)))
            .min();
        if let Some((port, other)) = first {
            return Err(FileError::Conflict {
                file: file.to_string(),
                line: d.line,
                entry: d.entry.clone(),
                addr_port: rule::addr_port(publish.host(), port),
                other,
            });
        }
        fixed.insert(publish, d.line);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::chain;

    pub(super) const GOOD: &str = r#"# the web tier
[[publish]]
to = "172.17.0.2"
ports = ["9000:8080", "127.0.0.1:9443:443", "5353:53/udp", "7000-7010:7000-7010"]

[[publish]]
to = "172.17.0.3"
ports = [
  "80",
  { target = 80, published = "8080", host_ip = "127.0.0.1", protocol = "tcp" },
  { target = 53, published = 10053, protocol = "udp", mode = "host" },
  { target = "6000-6001", published = "16000-16001" },
  "8000-8010:443",
]
"#;

    fn shown(d: &FileDeclaration) -> String {
        let decl = Declaration::new(d.publish, d.backend).expect("valid");
        format!("{}: {decl}", d.line)
    }

    #[test]
    fn parses_short_and_long_forms_with_lines() {
        let decls = parse("ports.toml", GOOD).expect("valid file");
        let got: Vec<String> = decls.iter().map(shown).collect();
        assert_eq!(
            got,
            vec![
                "4: *:9000/tcp -> 172.17.0.2:8080",
                "4: 127.0.0.1:9443/tcp -> 172.17.0.2:443",
                "4: *:5353/udp -> 172.17.0.2:53",
                "4: *:7000-7010/tcp -> 172.17.0.2:7000-7010",
                "9: *:(any)/tcp -> 172.17.0.3:80",
                "10: 127.0.0.1:8080/tcp -> 172.17.0.3:80",
                "11: *:10053/udp -> 172.17.0.3:53",
                "12: *:16000-16001/tcp -> 172.17.0.3:6000-6001",
                "13: *:(first free of 8000-8010)/tcp -> 172.17.0.3:443",
            ]
        );
        assert_eq!(decls[0].entry, "9000:8080");
        assert_eq!(
            decls[5].entry,
            r#"{ target = 80, published = "8080", host_ip = "127.0.0.1", protocol = "tcp" }"#
        );
        assert!(parse("empty.toml", "").expect("empty is valid").is_empty());
    }

    /// `to` with one address per family: one declaration per port string, both
    /// addresses on its backend; the families' wildcards apart.
    #[test]
    fn dual_stack_to_and_family_wildcards() {
        let text = "[[publish]]\nto = [\"172.17.0.4\", \"2001:db8::4\"]\nports = [\"9080:80\", \"0.0.0.0:9081:81\"]\n\n[[publish]]\nto = \"2001:db8::5\"\nports = [\"[::]:9081:81\"]\n";
        let decls = parse("dual.toml", text).expect("valid file");
        let got: Vec<String> = decls.iter().map(shown).collect();
        assert_eq!(
            got,
            vec![
                "3: *:9080/tcp -> 172.17.0.4:80,[2001:db8::4]:80",
                "3: 0.0.0.0:9081/tcp -> 172.17.0.4:81,[2001:db8::4]:81",
                "7: [::]:9081/tcp -> [2001:db8::5]:81",
            ]
        );
    }

    #[test]
    fn errors_name_file_line_and_entry() {
        let table: &[(&str, &str)] = &[
            (
                "[[publish]]\nto = \"172.17.0.2\"\nports = [\"9000:8080\",\n  \"9001-9000:80\"]\n",
                "f.toml:4: entry `9001-9000:80`: invalid port range `9001-9000`: it ends before it starts",
            ),
            (
                "[[publish]]\nto = \"172.17.0.2\"\nports = [\"9000-9009:8000-8004\"]\n",
                "f.toml:3: entry `9000-9009:8000-8004`: port ranges `9000-9009` (10 ports) and `8000-8004` (5 ports) differ in length",
            ),
            (
                "[[publish]]\nto = \"172.17.0.2\"\nports = [\"53/sctp\"]\n",
                "f.toml:3: entry `53/sctp`: protocol `sctp` is not supported: portfwd forwards tcp and udp",
            ),
            (
                "[[publish]]\nto = \"2001:db8::2\"\nports = [\"10.0.0.1:9000:8080\"]\n",
                "f.toml:3: entry `10.0.0.1:9000:8080`: host address 10.0.0.1 is IPv4 but backend [2001:db8::2] has no IPv4 address: IPv4 clients cannot reach it",
            ),
            (
                "[[publish]]\nto = [\"172.17.0.2\", \"172.17.0.3\"]\nports = [\"80\"]\n",
                "f.toml:2: entry `to = [\"172.17.0.2\", \"172.17.0.3\"]`: backend 172.17.0.2 cannot also have 172.17.0.3: a backend has at most one IPv4 and one IPv6 address",
            ),
            (
                "[[publish]]\nto = []\nports = [\"80\"]\n",
                "f.toml:2: entry `to = []`: empty backend",
            ),
            (
                "[[publish]]\nto = \"172.17.0\"\nports = [\"80\"]\n",
                "f.toml:2: entry `to = \"172.17.0\"`: invalid IP address `172.17.0`",
            ),
            (
                "[[publish]]\nto = \"127.0.0.1\"\nports = [\"80\"]\n",
                "f.toml:2: entry `to = \"127.0.0.1\"`: 127.0.0.1 cannot be a backend: loopback addresses are not routed to from outside the host",
            ),
            (
                "\n[[publish]]\nto = \"172.17.0.2\"\nports = [\n  { target = 80, published = \"0-5\" },\n]\n",
                "f.toml:5: entry `{ target = 80, published = \"0-5\" }`: invalid port range `0-5`: port 0 cannot be part of a range",
            ),
            (
                "[[publish]]\nto = \"172.17.0.2\"\nports = [\"9000:80\"]\n[[publish]]\nto = \"172.17.0.3\"\nports = [\"8990-9010:8990-9010\"]\n",
                "f.toml:6: entry `8990-9010:8990-9010`: Bind for 0.0.0.0:9000 failed: port is already allocated (by line 3)",
            ),
            (
                "[[publish]]\nto = \"172.17.0.2\"\nports = [\"127.0.0.1:9000:80\", \"9000:81\"]\n",
                "f.toml:3: entry `9000:81`: Bind for 0.0.0.0:9000 failed: port is already allocated (by line 3)",
            ),
        ];
        for (text, want) in table {
            let err = chain(&parse("f.toml", text).expect_err(want));
            assert_eq!(&err, want);
        }
    }

    #[test]
    fn syntax_and_shape_errors_have_lines() {
        for (text, prefix, part) in [
            (
                "[[publish]]\nto = \"172.17.0.2\"\nports = [\"80\"\n",
                "f.toml:3: ",
                "",
            ),
            (
                "[[publish]]\nto = \"172.17.0.2\"\n",
                "f.toml:1: ",
                "missing field `ports`",
            ),
            (
                "[[publish]]\nto = \"172.17.0.2\"\nports = [\"80\"]\nport = 1\n",
                "f.toml:4: ",
                "unknown field `port`",
            ),
            (
                "[[publish]]\nto = \"172.17.0.2\"\nports = [true]\n",
                "f.toml:3: ",
                "",
            ),
            (
                "[[publish]]\nto = \"172.17.0.2\"\nports = [{ target = 80, bogus = 1 }]\n",
                "f.toml:3: ",
                "",
            ),
            (
                "[[publsh]]\nto = \"172.17.0.2\"\n",
                "f.toml:1: ",
                "unknown field `publsh`",
            ),
        ] {
            let err = chain(&parse("f.toml", text).expect_err(text));
            assert!(err.starts_with(prefix), "{text:?}: {err}");
            assert!(err.contains(part), "{text:?}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }
}

/// Property tests: arbitrary text, and declarations files built from the grammar and
/// then mutated, never panic the parser; every refusal is one line.
#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::rule::fuzz::{backend, mutated, one_line, spec};
    use proptest::prelude::*;

    /// A TOML value of the shapes the file's fields take, right and wrong.
    fn value() -> BoxedStrategy<String> {
        prop_oneof![
            spec().prop_map(|s| format!("{s:?}")),
            backend().prop_map(|s| format!("{s:?}")),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<bool>().prop_map(|b| b.to_string()),
            Just("1.5".to_string()),
            Just("[]".to_string()),
            Just("{}".to_string()),
            Just("\"\"".to_string()),
            "\"[^\"\\\\]{0,12}\"",
        ]
        .boxed()
    }

    /// A `ports` item: a short-form string, or a long-form table with some of its keys.
    fn port_item() -> BoxedStrategy<String> {
        let key = prop_oneof![
            Just("target"),
            Just("published"),
            Just("host_ip"),
            Just("protocol"),
            Just("mode"),
            Just("name"),
            Just("app_protocol"),
            Just("bogus"),
        ];
        prop_oneof![
            3 => spec().prop_map(|s| format!("{s:?}")),
            2 => proptest::collection::vec((key, value()), 0..5).prop_map(|kv| {
                let fields: Vec<String> = kv.iter().map(|(k, v)| format!("{k} = {v}")).collect();
                format!("{{ {} }}", fields.join(", "))
            }),
            1 => value(),
        ]
        .boxed()
    }

    fn to_value() -> BoxedStrategy<String> {
        prop_oneof![
            Just("\"172.17.0.2\"".to_string()),
            Just("[\"172.17.0.4\", \"2001:db8::4\"]".to_string()),
            Just("[\"172.17.0.4\", \"172.17.0.5\"]".to_string()),
            Just("[]".to_string()),
            value(),
        ]
        .boxed()
    }

    /// A file of `[[publish]]` tables (sometimes other keys, other tables).
    fn file() -> BoxedStrategy<String> {
        let table = (
            proptest::option::weighted(0.9, to_value()),
            proptest::option::weighted(0.9, proptest::collection::vec(port_item(), 0..5)),
            proptest::option::weighted(0.1, value()),
        )
            .prop_map(|(to, ports, extra)| {
                let mut t = String::from("[[publish]]\n");
                if let Some(to) = to {
                    t += &format!("to = {to}\n");
                }
                if let Some(ports) = ports {
                    t += &format!("ports = [{}]\n", ports.join(", "));
                }
                if let Some(v) = extra {
                    t += &format!("other = {v}\n");
                }
                t
            });
        proptest::collection::vec(table, 0..4)
            .prop_map(|t| t.join("\n"))
            .boxed()
    }

    fn check(text: &str) -> Result<(), TestCaseError> {
        if let Err(e) = parse("f.toml", text) {
            one_line(&e)?;
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
        fn mutated_good_file_never_panics(text in mutated(Just(tests::GOOD.to_string()))) {
            check(&text)?;
        }
    }
}
