//! The daemon's rule logic against a fake kernel: conflicts, ranges, free ports,
//! families, flow forgetting, rollback on kernel failures, `apply`, and the request
//! handler.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use portfwd_common::{BackendV4, BackendV6, Reason, RuleStats};

use super::*;
use crate::{
    dataplane::Attachment,
    report::chain,
    rule::{Proto, Publish},
};

type Key = (Ipv4Addr, u16, u8);
type KeyV6 = (Ipv6Addr, u16, u8);

/// A kernel that records what the daemon asked of it and can be told to fail.
#[derive(Default)]
pub(super) struct FakeKernel {
    rules: BTreeMap<Key, BackendV4>,
    /// Writes (inserts and removes) of IPv4 rules per key, to see what was touched.
    writes: BTreeMap<Key, usize>,
    reset: Vec<u32>,
    forgotten: Vec<Key>,
    fail_insert: bool,
    /// Fail the insert after this many more succeed.
    fail_insert_after: Option<usize>,
    fail_remove: bool,
    held: Vec<(IpAddr, u16, Proto)>,
    ephemeral: Option<PortRange>,
    rules_v6: BTreeMap<KeyV6, BackendV6>,
    forgotten_v6: Vec<KeyV6>,
    /// What `host_addrs` answers, and what the daemon last synced.
    host: BTreeSet<IpAddr>,
    synced_host: BTreeSet<IpAddr>,
}

fn fake_err() -> DataplaneError {
    DataplaneError::MissingMap("TEST")
}

impl Kernel for FakeKernel {
    fn insert_rule<F: Family>(
        &mut self,
        k: F::RuleKey,
        b: F::Backend,
    ) -> Result<(), DataplaneError> {
        if self.fail_insert {
            return Err(fake_err());
        }
        if let Some(n) = self.fail_insert_after.as_mut() {
            if *n == 0 {
                return Err(fake_err());
            }
            *n -= 1;
        }
        let (addr, port, proto) = F::rule_key(&k);
        let (backend, backend_port, slot) = F::backend(&b);
        match (addr.into(), backend.into()) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                self.rules
                    .insert((a, port, proto), BackendV4::new(b, backend_port, slot));
                *self.writes.entry((a, port, proto)).or_default() += 1;
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                self.rules_v6
                    .insert((a, port, proto), BackendV6::new(b, backend_port, slot));
            }
            mixed => panic!("a rule entry of two families: {mixed:?}"),
        }
        Ok(())
    }
    fn remove_rule<F: Family>(&mut self, k: &F::RuleKey) -> Result<(), DataplaneError> {
        if self.fail_remove {
            return Err(fake_err());
        }
        let (addr, port, proto) = F::rule_key(k);
        match addr.into() {
            IpAddr::V4(a) => {
                self.rules.remove(&(a, port, proto));
                *self.writes.entry((a, port, proto)).or_default() += 1;
            }
            IpAddr::V6(a) => {
                self.rules_v6.remove(&(a, port, proto));
            }
        }
        Ok(())
    }
    fn reset_rule_stats(&mut self, slot: u32) -> Result<(), DataplaneError> {
        self.reset.push(slot);
        Ok(())
    }
    fn rule_stats(&self, slot: u32) -> Result<RuleStats, DataplaneError> {
        Ok(RuleStats {
            packets: slot.into(),
            ..RuleStats::default()
        })
    }
    fn forget_flows<F: Family>(
        &mut self,
        backends: &BTreeSet<(F::Addr, u16, u8)>,
    ) -> Result<usize, DataplaneError> {
        for &(ip, port, proto) in backends {
            match ip.into() {
                IpAddr::V4(ip) => self.forgotten.push((ip, port, proto)),
                IpAddr::V6(ip) => self.forgotten_v6.push((ip, port, proto)),
            }
        }
        Ok(0)
    }
    fn reason_stats(&self) -> Result<Vec<(Reason, u64)>, DataplaneError> {
        Ok(Reason::ALL.iter().map(|&r| (r, r as u64)).collect())
    }
    fn attachments(&self) -> Vec<Attachment> {
        Vec::new()
    }
    fn sync_nat64(&mut self, _: &BTreeSet<Ipv4Addr>) -> Result<Vec<String>, DataplaneError> {
        Ok(Vec::new())
    }
    fn nat64_entries(&self) -> Vec<String> {
        Vec::new()
    }
    fn host_addrs(&self) -> BTreeSet<IpAddr> {
        self.host.clone()
    }
    fn sync_host_addrs<F: Family>(
        &mut self,
        addrs: &BTreeSet<F::Addr>,
    ) -> Result<(), DataplaneError> {
        self.synced_host.retain(|ip| F::from_ip(*ip).is_none());
        self.synced_host.extend(addrs.iter().map(|&a| a.into()));
        Ok(())
    }
    fn local_cgroup(&self) -> Option<PathBuf> {
        None
    }
    fn held_locally(&self, ip: IpAddr, port: u16, proto: Proto) -> bool {
        self.held.contains(&(ip, port, proto))
    }
    fn ephemeral_ports(&self) -> PortRange {
        self.ephemeral.unwrap_or(PortRange::LINUX_EPHEMERAL)
    }
}

fn decl(p: &str, b: &str) -> Declaration {
    Declaration::parse(p, b).unwrap_or_else(|e| panic!("{p} {b}: {e}"))
}

fn publish(p: &str) -> Publish {
    p.parse().unwrap_or_else(|e| panic!("{p}: {e}"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn kernel_rules(d: &Daemon<FakeKernel>) -> Vec<String> {
    d.kernel()
        .rules
        .iter()
        .map(|((a, p, pr), b)| {
            format!(
                "{a}:{p}/{pr} -> {}:{} #{}",
                b.addr(),
                b.port(),
                b.stats_slot()
            )
        })
        .collect()
}

fn table_rules(d: &Daemon<FakeKernel>) -> Vec<String> {
    d.table()
        .iter()
        .map(|(p, e)| format!("{p} -> {} ({})", e.backend, e.source))
        .collect()
}

#[test]
fn add_refuses_a_port_a_local_process_holds() {
    let mut d = Daemon::new(FakeKernel {
        held: vec![
            (ip("0.0.0.0"), 9000, Proto::Tcp),
            (ip("0.0.0.0"), 9105, Proto::Tcp),
        ],
        ..FakeKernel::default()
    });
    let err = d.add(decl("9000", "198.18.1.2:8080")).expect_err("held");
    assert_eq!(
        chain(&err),
        "cannot publish *:9000/tcp: a local process already uses it (address already in use)"
    );
    let err = d
        .add(decl("9100-9109", "198.18.1.2:8100-8109"))
        .expect_err("held");
    assert_eq!(
        chain(&err),
        "cannot publish *:9100-9109/tcp: a local process already uses port 9105 (address already in use)"
    );
    assert!(kernel_rules(&d).is_empty() && d.table().is_empty());
    d.add(decl("9000/udp", "198.18.1.2:8080"))
        .expect("udp is free");
}

#[test]
fn a_runtime_reservation_is_not_refused_for_its_own_socket() {
    let mut d = Daemon::new(FakeKernel {
        held: vec![(ip("0.0.0.0"), 9000, Proto::Tcp)],
        ..FakeKernel::default()
    });
    let owner = || Some(Owner::new("cni:abc/eth0").expect("valid"));
    // Without an owner, no reservation; without the flag, refused as before.
    let err = d
        .add_runtime(decl("9000", "198.18.1.2:8080"), None, true)
        .expect_err("no owner");
    assert_eq!(
        chain(&err),
        "reservation_ok needs an owner (the runtime whose reservation socket holds the port)"
    );
    d.add_runtime(decl("9000", "198.18.1.2:8080"), owner(), false)
        .expect_err("held");
    assert!(d.table().is_empty());
    d.add_runtime(decl("9000", "198.18.1.2:8080"), owner(), true)
        .expect("the runtime's own reservation");
    let (p, e) = d.table().iter().next().expect("published");
    assert!(e.reservation, "{p}");
    assert_eq!(kernel_rules(&d).len(), 1);
    assert_eq!(kernel_rules_v6(&d).len(), 1);
    // Other rules keep refusing held ports and binds.
    d.add(decl("9001", "198.18.1.2:8080")).expect("free");
    let plain = d.table().iter().find(|(p, _)| p.host_port() == 9001);
    assert!(!plain.expect("published").1.reservation);
}

#[test]
fn conflicts_follow_docker() {
    // (already published, then added, expected error or None)
    let table: &[(&[&str], &str, Option<&str>)] = &[
        (
            &["9000"],
            "9000",
            Some("Bind for 0.0.0.0:9000 failed: port is already allocated"),
        ),
        (
            &["9000"],
            "9000/tcp",
            Some("Bind for 0.0.0.0:9000 failed: port is already allocated"),
        ),
        (&["9000"], "9000/udp", None),
        (&["9000"], "9001", None),
        (
            &["9000"],
            "198.51.100.7:9000",
            Some("Bind for 198.51.100.7:9000 failed: port is already allocated"),
        ),
        (
            &["198.51.100.7:9000"],
            "9000",
            Some("Bind for 0.0.0.0:9000 failed: port is already allocated"),
        ),
        (&["198.51.100.7:9000"], "198.51.100.8:9000", None),
        (&["198.51.100.7:9000"], "198.51.100.7:9000/udp", None),
        (
            &["198.51.100.7:9000", "198.51.100.8:9000"],
            "*:9000",
            Some("Bind for 0.0.0.0:9000 failed: port is already allocated"),
        ),
        // Per port: a range fails at its first port that is taken.
        (
            &["9005"],
            "9000-9009",
            Some("Bind for 0.0.0.0:9005 failed: port is already allocated"),
        ),
        (
            &["9007", "9003/udp", "9004"],
            "9000-9009",
            Some("Bind for 0.0.0.0:9004 failed: port is already allocated"),
        ),
        (
            &["8995-9001"],
            "198.51.100.7:9000-9009",
            Some("Bind for 198.51.100.7:9000 failed: port is already allocated"),
        ),
        (&["8990-8999"], "9000-9009", None),
        (&["9010-9019"], "9000-9009", None),
    ];
    for &(existing, new, want) in table {
        let mut d = Daemon::new(FakeKernel::default());
        for p in existing {
            let n = publish(p).ports().len();
            let be = if n == 1 {
                "172.17.0.2:8080".to_string()
            } else {
                format!("172.17.0.2:1000-{}", 999 + n)
            };
            d.add(decl(p, &be)).expect("setup");
        }
        let before = kernel_rules(&d);
        let n = publish(new).ports().len();
        let be = if n == 1 {
            "172.17.0.3:8081".to_string()
        } else {
            format!("172.17.0.3:2000-{}", 1999 + n)
        };
        let got = d.add(decl(new, &be)).err().map(|e| chain(&e));
        assert_eq!(got.as_deref(), want, "{existing:?} then {new}");
        if want.is_some() {
            assert_eq!(kernel_rules(&d), before, "nothing applied");
            assert_eq!(d.table().len(), existing.len());
        }
    }
}

#[test]
fn a_range_is_one_entry_per_port_and_one_slot() {
    let mut d = Daemon::new(FakeKernel::default());
    let r = d
        .add(decl("9000-9009", "172.17.0.2:8000-8009"))
        .expect("range");
    assert_eq!(r.to_string(), "*:9000-9009/tcp -> 172.17.0.2:8000-8009");
    let k = &d.kernel().rules;
    assert_eq!(k.len(), 10);
    for (hp, bp) in (9000..=9009).zip(8000..=8009) {
        let b = k[&(Ipv4Addr::UNSPECIFIED, hp, 6)];
        assert_eq!((b.port(), b.stats_slot()), (bp, 0), "port {hp}");
    }
    assert_eq!(d.kernel().reset, vec![0], "one counter slot");
    let list = d.list().expect("list");
    assert_eq!(list.rules.len(), 1, "one row");
    let row = &list.rules[0];
    assert_eq!(
        (
            row.host_port,
            row.host_port_end,
            row.backend_port,
            row.backend_port_end
        ),
        (9000, 9009, 8000, 8009)
    );
    assert_eq!(row.source, Source::Cli);

    // A port inside it cannot be deleted alone; the whole range can.
    let err = d.del(publish("9005")).expect_err("part of a range");
    assert_eq!(
        chain(&err),
        "No published port *:9005/tcp: it is part of *:9000-9009/tcp, which is removed whole"
    );
    d.del(publish("9000-9009")).expect("del range");
    assert!(d.kernel().rules.is_empty());
    assert_eq!(d.kernel().forgotten.len(), 10, "each backend port's flows");

    // A 10,000-port range: 10,000 entries, one slot.
    d.add(decl("20000-29999/udp", "172.17.0.2:30000-39999"))
        .expect("10k range");
    assert_eq!(d.kernel().rules.len(), 10_000);
    assert_eq!(d.table().len(), 1);
}

#[test]
fn first_free_and_any_free_ports() {
    let mut d = Daemon::new(FakeKernel {
        ephemeral: Some(PortRange::new(40000, 40009).expect("range")),
        held: vec![(ip("0.0.0.0"), 40001, Proto::Tcp)],
        ..FakeKernel::default()
    });
    d.add(decl("8000", "172.17.0.2:80")).expect("8000");
    // A host range to one backend port: the first free port of the range.
    let r = d
        .add(decl("8000-8010", "172.17.0.3:80"))
        .expect("first free");
    assert_eq!(r.to_string(), "*:8001/tcp -> 172.17.0.3:80");
    // No host port: the ephemeral range, skipping published and held ports.
    let r = d.add(decl("", "172.17.0.2:80")).expect("any");
    assert_eq!(r.to_string(), "*:40000/tcp -> 172.17.0.2:80");
    let r = d.add(decl("0", "172.17.0.2:81")).expect("any");
    assert_eq!(
        r.to_string(),
        "*:40002/tcp -> 172.17.0.2:81",
        "40001 is held"
    );
    // Several container ports: as many consecutive free host ports.
    d.add(decl("40004", "172.17.0.2:90")).expect("40004");
    let r = d.add(decl("/udp", "172.17.0.2:53")).expect("udp any");
    assert_eq!(r.to_string(), "*:40000/udp -> 172.17.0.2:53");
    let r = d.add(decl("", "172.17.0.2:100-102")).expect("block");
    assert_eq!(r.to_string(), "*:40005-40007/tcp -> 172.17.0.2:100-102");
    let err = d.add(decl("", "172.17.0.2:200-203")).expect_err("no block");
    assert_eq!(
        chain(&err),
        "cannot publish *:(any)/tcp -> 172.17.0.2:200-203: no 4 free consecutive ports in the ephemeral range 40000-40009"
    );
    let err = d.add(decl("8000-8001", "172.17.0.4:80")).expect_err("full");
    assert_eq!(
        chain(&err),
        "cannot publish *:(first free of 8000-8001)/tcp -> 172.17.0.4:80: every port of 8000-8001 is already allocated or in use"
    );
}

fn kernel_rules_v6(d: &Daemon<FakeKernel>) -> Vec<String> {
    d.kernel()
        .rules_v6
        .iter()
        .map(|((a, p, pr), b)| {
            format!(
                "[{a}]:{p}/{pr} -> [{}]:{} #{}",
                b.addr(),
                b.port(),
                b.stats_slot()
            )
        })
        .collect()
}

/// IPv6 rules go to the IPv6 map, one entry per port; `*` becomes the wildcard of
/// each family it can serve; del forgets the IPv6 flows.
#[test]
fn ipv6_rules_go_to_the_v6_map() {
    let mut d = Daemon::new(FakeKernel::default());
    for (p, b) in [
        ("[2001:db8::1]:9000", "[2001:db8::2]:8080"),
        ("[::1]:9001-9002/udp", "[2001:db8::2]:53-54"),
        ("9003", "[2001:db8::3]:80"),
        ("[::]:9004", "[2001:db8::3]:81"),
        ("[::]:9005", "172.17.0.2:80"),
        // `*` to an IPv4-only backend: IPv6 clients get it IPv4-mapped.
        ("9006", "172.17.0.2:80"),
        // A dual-stack backend: each family to its own address.
        ("9007", "172.17.0.3:80,[2001:db8::3]:80"),
        ("0.0.0.0:9008", "172.17.0.3:80,[2001:db8::3]:80"),
    ] {
        d.add(decl(p, b)).unwrap_or_else(|e| panic!("{p} {b}: {e}"));
    }
    assert_eq!(
        kernel_rules_v6(&d),
        [
            "[::]:9003/6 -> [2001:db8::3]:80 #2",
            "[::]:9004/6 -> [2001:db8::3]:81 #3",
            "[::]:9005/6 -> [::ffff:172.17.0.2]:80 #4",
            "[::]:9006/6 -> [::ffff:172.17.0.2]:80 #5",
            "[::]:9007/6 -> [2001:db8::3]:80 #6",
            "[::1]:9001/17 -> [2001:db8::2]:53 #1",
            "[::1]:9002/17 -> [2001:db8::2]:54 #1",
            "[2001:db8::1]:9000/6 -> [2001:db8::2]:8080 #0",
        ]
    );
    // Only `*` and `0.0.0.0` rules serve IPv4 clients, and only with an IPv4 backend.
    assert_eq!(
        kernel_rules(&d),
        [
            "0.0.0.0:9006/6 -> 172.17.0.2:80 #5",
            "0.0.0.0:9007/6 -> 172.17.0.3:80 #6",
            "0.0.0.0:9008/6 -> 172.17.0.3:80 #7",
        ]
    );

    d.del(publish("[2001:db8::1]:9000")).expect("del");
    assert!(!kernel_rules_v6(&d)
        .iter()
        .any(|r| r.starts_with("[2001:db8::1]")));
    assert_eq!(
        d.kernel().forgotten_v6,
        [(ip6("2001:db8::2"), 8080, 6)],
        "the backend's IPv6 flows are forgotten"
    );
    assert!(d.kernel().forgotten.is_empty());
}

/// A failing IPv6 write undoes the writes made before it, in both maps.
#[test]
fn ipv6_apply_rolls_back_across_families() {
    let mut d = Daemon::new(FakeKernel::default());
    d.add(decl("9000", "172.17.0.2:80")).expect("add");
    let (k0, k60) = (kernel_rules(&d), kernel_rules_v6(&d));
    d.kernel.fail_insert_after = Some(2);
    let decls = file(&[
        (1, "9100:80", "172.17.0.3"),
        (2, "[2001:db8::1]:9101-9102:80-81", "2001:db8::2"),
    ]);
    d.apply("f.toml", &decls, false)
        .expect_err("third insert fails");
    assert_eq!((kernel_rules(&d), kernel_rules_v6(&d)), (k0, k60));
}

fn ip6(s: &str) -> Ipv6Addr {
    s.parse().expect("ip6")
}

#[test]
fn same_backend_on_two_ports_and_flow_forgetting() {
    let mut d = Daemon::new(FakeKernel::default());
    d.add(decl("9000", "172.17.0.2:8080")).expect("first");
    d.add(decl("9001", "172.17.0.2:8080"))
        .expect("same backend, other port");
    d.add(decl("9000/udp", "172.17.0.2:8080"))
        .expect("same backend, udp");
    assert_eq!(d.kernel().rules.len(), 3);

    // Another TCP rule still uses the backend: its flows stay.
    d.del(publish("9000")).expect("del");
    assert!(d.kernel().forgotten.is_empty());
    // The last TCP rule to it: TCP flows go, UDP ones are another matter.
    d.del(publish("9001")).expect("del");
    let be = Ipv4Addr::new(172, 17, 0, 2);
    assert_eq!(d.kernel().forgotten, vec![(be, 8080, 6)]);
    d.del(publish("9000/udp")).expect("del");
    assert_eq!(d.kernel().forgotten, vec![(be, 8080, 6), (be, 8080, 17)]);
    assert!(d.kernel().rules.is_empty());
    assert!(d.table().is_empty());
}

#[test]
fn del_of_unpublished() {
    let mut d = Daemon::new(FakeKernel::default());
    d.add(decl("198.51.100.7:9000", "172.17.0.2:8080"))
        .expect("add");
    d.add(decl("[::]:9001", "[2001:db8::2]:8080")).expect("add");
    for (spec, want) in [
        (
            "9000",
            "No published port *:9000/tcp (published there: 198.51.100.7:9000/tcp)",
        ),
        ("9000/udp", "No published port *:9000/udp"),
        (
            "198.51.100.8:9000",
            "No published port 198.51.100.8:9000/tcp",
        ),
        (
            "*:9001",
            "No published port *:9001/tcp (published there: [::]:9001/tcp)",
        ),
        ("0.0.0.0:9001", "No published port 0.0.0.0:9001/tcp"),
    ] {
        let err = d.del(publish(spec)).expect_err(spec);
        assert_eq!(chain(&err), want);
    }
    assert_eq!(d.kernel().rules.len(), 1);
    d.del(publish("198.51.100.7:9000")).expect("del");
    d.del(publish("[::]:9001")).expect("del");
}

#[test]
fn kernel_failures_change_nothing() {
    let mut d = Daemon::new(FakeKernel::default());
    d.add(decl("9000", "172.17.0.2:8080")).expect("add");
    d.kernel.fail_insert = true;
    let err = d
        .add(decl("9001", "172.17.0.2:8080"))
        .expect_err("insert fails");
    assert!(
        chain(&err).starts_with("cannot publish *:9001/tcp: "),
        "{err}"
    );
    assert_eq!(d.table().len(), 1);
    d.kernel.fail_insert = false;
    d.kernel.fail_remove = true;
    let err = d.del(publish("9000")).expect_err("remove fails");
    assert!(
        chain(&err).starts_with("cannot unpublish *:9000/tcp: "),
        "{err}"
    );
    assert_eq!(d.table().len(), 1);
    assert_eq!(d.kernel().rules.len(), 1);
    d.kernel.fail_remove = false;
    d.del(publish("9000")).expect("del");

    // A range that fails midway is rolled back: nothing of it stays.
    d.add(decl("7000", "172.17.0.2:80")).expect("add");
    let before = kernel_rules(&d);
    d.kernel.fail_insert_after = Some(5);
    d.add(decl("9000-9009", "172.17.0.2:8000-8009"))
        .expect_err("fails at the 6th port");
    assert_eq!(kernel_rules(&d), before);
    assert_eq!(d.table().len(), 1);
    d.kernel.fail_insert_after = None;
    // Its slot went back: the next rule still works.
    d.add(decl("9000-9009", "172.17.0.2:8000-8009"))
        .expect("then it works");
}

#[test]
fn slots_are_reset_and_reused_last() {
    let mut d = Daemon::new(FakeKernel::default());
    d.add(decl("1", "10.0.0.1:1")).expect("add");
    d.add(decl("2", "10.0.0.1:1")).expect("add");
    d.del(publish("1")).expect("del");
    d.add(decl("3", "10.0.0.1:1")).expect("add");
    assert_eq!(d.kernel().reset, vec![0, 1, 2]);
    let slots: Vec<u32> = d.table().iter().map(|(_, e)| e.stats_slot).collect();
    assert_eq!(slots, vec![1, 2]);
}

/// The refresh writes each family's host addresses once, and again only when they
/// change.
#[test]
fn refresh_syncs_the_host_addresses_of_both_families() {
    let mut d = Daemon::new(FakeKernel {
        host: [ip("198.51.100.7"), ip("2001:db8::1")]
            .into_iter()
            .collect(),
        ..FakeKernel::default()
    });
    d.refresh();
    assert_eq!(d.kernel().synced_host, d.kernel().host);
    d.kernel.host.insert(ip("fe80::1"));
    d.kernel.host.remove(&ip("198.51.100.7"));
    d.refresh();
    assert_eq!(d.kernel().synced_host, d.kernel().host);
}

fn file(entries: &[(u32, &str, &str)]) -> Vec<FileDeclaration> {
    entries
        .iter()
        .map(|&(line, mapping, to)| {
            let to = crate::rule::Addrs::new(ip(to)).expect("backend address");
            let d =
                Declaration::from_mapping(mapping, to).unwrap_or_else(|e| panic!("{mapping}: {e}"));
            FileDeclaration {
                line,
                entry: mapping.to_string(),
                publish: d.spec(),
                backend: d.backend(),
            }
        })
        .collect()
}

fn shown(list: &[RuleReply]) -> Vec<String> {
    list.iter().map(ToString::to_string).collect()
}

const A: &str = "172.17.0.2";
const B: &str = "172.17.0.3";

#[test]
fn apply_adds_removes_and_keeps() {
    let mut d = Daemon::new(FakeKernel {
        ephemeral: Some(PortRange::new(40000, 40099).expect("range")),
        ..FakeKernel::default()
    });
    d.add(decl("6000", "172.17.0.9:80"))
        .expect("a runtime rule");
    let first = file(&[
        (3, "9000:8080", A),
        (3, "5353:53/udp", A),
        (4, "7000-7009:7000-7009", A),
        (5, "80", B),
    ]);
    let r = d.apply("f.toml", &first, false).expect("first apply");
    assert_eq!(
        shown(&r.added),
        vec![
            "*:5353/udp -> 172.17.0.2:53",
            "*:7000-7009/tcp -> 172.17.0.2:7000-7009",
            "*:9000/tcp -> 172.17.0.2:8080",
            "*:40000/tcp -> 172.17.0.3:80",
        ]
    );
    assert!(r.removed.is_empty() && r.unchanged.is_empty());
    assert_eq!(d.kernel().rules.len(), 1 + 13);
    let writes_before = d.kernel().writes.clone();

    // Keep 9000 and the random one, change 5353's backend, drop the range, add 9443.
    let second = file(&[
        (3, "9000:8080", A),
        (4, "5353:53/udp", B),
        (5, "80", B),
        (6, "127.0.0.1:9443:443", A),
    ]);
    let dry = d.apply("f.toml", &second, true).expect("dry run");
    assert!(dry.dry_run);
    assert_eq!(d.kernel().writes, writes_before, "a dry run writes nothing");
    let r = d.apply("f.toml", &second, false).expect("second apply");
    assert_eq!(
        (dry.added.clone(), dry.removed.clone()),
        (r.added.clone(), r.removed.clone())
    );
    assert_eq!(
        shown(&r.added),
        vec![
            "*:5353/udp -> 172.17.0.3:53",
            "127.0.0.1:9443/tcp -> 172.17.0.2:443",
        ]
    );
    assert_eq!(
        shown(&r.removed),
        vec![
            "*:5353/udp -> 172.17.0.2:53",
            "*:7000-7009/tcp -> 172.17.0.2:7000-7009",
        ]
    );
    assert_eq!(
        shown(&r.unchanged),
        vec![
            "*:9000/tcp -> 172.17.0.2:8080",
            "*:40000/tcp -> 172.17.0.3:80",
        ]
    );
    // Unchanged rules (and the runtime rule) were not written at all.
    let w = &d.kernel().writes;
    let any = Ipv4Addr::UNSPECIFIED;
    for k in [(any, 9000, 6), (any, 40000, 6), (any, 6000, 6)] {
        assert_eq!(w.get(&k), writes_before.get(&k), "{k:?} untouched");
    }
    // The changed port was overwritten in place (one more write, no delete).
    assert_eq!(w[&(any, 5353, 17)], writes_before[&(any, 5353, 17)] + 1);
    assert_eq!(
        d.kernel().rules[&(any, 5353, 17)].addr(),
        Ipv4Addr::new(172, 17, 0, 3)
    );
    // Flows of the old backends are forgotten: 5353's old backend and the range's.
    let fa = Ipv4Addr::new(172, 17, 0, 2);
    assert!(d.kernel().forgotten.contains(&(fa, 53, 17)));
    assert!(d.kernel().forgotten.contains(&(fa, 7005, 6)));
    assert!(!d.kernel().forgotten.contains(&(fa, 8080, 6)));
    assert_eq!(
        table_rules(&d),
        vec![
            "*:5353/udp -> 172.17.0.3:53 (file)",
            "*:6000/tcp -> 172.17.0.9:80 (cli)",
            "*:9000/tcp -> 172.17.0.2:8080 (file)",
            "127.0.0.1:9443/tcp -> 172.17.0.2:443 (file)",
            "*:40000/tcp -> 172.17.0.3:80 (file)",
        ]
    );
    // An empty file removes the file rules only.
    let r = d.apply("f.toml", &[], false).expect("empty");
    assert_eq!(r.removed.len(), 4);
    assert_eq!(table_rules(&d), vec!["*:6000/tcp -> 172.17.0.9:80 (cli)"]);
    assert_eq!(d.kernel().rules.len(), 1);
}

#[test]
fn apply_refuses_and_changes_nothing() {
    let mut d = Daemon::new(FakeKernel::default());
    d.add(decl("6000", "172.17.0.9:80")).expect("runtime rule");
    d.apply(
        "f.toml",
        &file(&[(2, "9000:80", A), (3, "7000:70", A)]),
        false,
    )
    .expect("initial");
    let (k0, t0) = (kernel_rules(&d), table_rules(&d));
    let table: Vec<(Vec<FileDeclaration>, &str)> = vec![
        (
            file(&[(2, "9000:80", A), (4, "5990-6010:5990-6010", B)]),
            "f.toml:4: entry `5990-6010:5990-6010`: *:5990-6010/tcp -> 172.17.0.3:5990-6010 conflicts with the runtime rule *:6000/tcp at port 6000 (added with portfwd-ctl add; del it first or drop it from the file)",
        ),
        (
            file(&[(2, "9000:80", A), (5, "127.0.0.1:9000:81", B)]),
            "f.toml:5: entry `127.0.0.1:9000:81`: Bind for 127.0.0.1:9000 failed: port is already allocated (by line 2)",
        ),
    ];
    for (decls, want) in table {
        for dry in [true, false] {
            let err = d.apply("f.toml", &decls, dry).expect_err(want);
            assert_eq!(chain(&err), want);
            assert_eq!(
                (kernel_rules(&d), table_rules(&d)),
                (k0.clone(), t0.clone())
            );
        }
    }
    // A kernel failure midway is rolled back, removed rules included.
    d.kernel.fail_insert_after = Some(3);
    let err = d
        .apply(
            "f.toml",
            &file(&[(2, "9000:80", A), (3, "8000-8009:8000-8009", B)]),
            false,
        )
        .expect_err("fails midway");
    assert!(
        chain(&err).starts_with("cannot publish *:8000-8009/tcp: "),
        "{err}"
    );
    assert_eq!((kernel_rules(&d), table_rules(&d)), (k0, t0));
    d.kernel.fail_insert_after = None;
}

#[test]
fn handle_line_never_fails() {
    let mut d = Daemon::new(FakeKernel::default());
    let ok =
        |r: Vec<u8>| -> serde_json::Value { serde_json::from_slice(&r).expect("response is JSON") };
    let add =
        br#"{"cmd":"add","publish":{"host_port":9000},"backend":{"ip":"172.17.0.2","port":8080}}"#;
    assert_eq!(ok(d.handle_line(add))["ok"], true);
    let again = ok(d.handle_line(add));
    assert_eq!(again["ok"], false);
    assert_eq!(
        again["error"],
        "Bind for 0.0.0.0:9000 failed: port is already allocated"
    );
    let mismatch = br#"{"cmd":"add","publish":{"host_port":7000,"host_port_end":7009},"backend":{"ip":"172.17.0.2","port":80,"port_end":81}}"#;
    let r = ok(d.handle_line(mismatch));
    assert_eq!(
        r["error"],
        "port ranges `7000-7009` (10 ports) and `80-81` (2 ports) differ in length"
    );
    for garbage in [
        &b""[..],
        b"\xff\xfe",
        b"{",
        b"null",
        b"{\"cmd\":\"add\"}",
        b"{\"cmd\":\"nope\"}",
        b"{\"cmd\":\"del\",\"publish\":{\"host_port\":0}}",
        b"{\"cmd\":\"apply\",\"file\":\"f\"}",
    ] {
        let r = ok(d.handle_line(garbage));
        assert_eq!(r["ok"], false, "{garbage:?}");
        let msg = r["error"].as_str().expect("error is a string");
        assert!(
            msg.starts_with("invalid request: ") && !msg.contains('\n'),
            "{msg}"
        );
    }
    let list = ok(d.handle_line(br#"{"cmd":"list"}"#));
    assert_eq!(list["ok"], true);
    assert_eq!(list["rules"][0]["host_port"], 9000);
    assert_eq!(list["rules"][0]["backend_ip"], "172.17.0.2");
    assert_eq!(list["rules"][0]["source"], "cli");
    assert_eq!(list["reasons"]["translated"], 0);
    assert_eq!(list["reasons"]["drop_checksum"], 10);
    let del = ok(d.handle_line(br#"{"cmd":"del","publish":{"host_port":9000}}"#));
    assert_eq!(del["ok"], true);
    let del = ok(d.handle_line(br#"{"cmd":"del","publish":{"host_port":9000}}"#));
    assert_eq!(del["error"], "No published port *:9000/tcp");
}

#[test]
fn owners_remove_only_their_own_rules() {
    let mut d = Daemon::new(FakeKernel::default());
    let ok =
        |r: Vec<u8>| -> serde_json::Value { serde_json::from_slice(&r).expect("response is JSON") };
    let add = |host: &str, port: u16, owner: Option<&str>| {
        let mut v = serde_json::json!({"cmd":"add","publish":{"host_ip":host,"host_port":port},
                                       "backend":{"ip":"172.17.0.2","port":8080}});
        if let Some(o) = owner {
            v["owner"] = o.into();
        }
        v.to_string().into_bytes()
    };
    let del = |host: &str, port: u16, owner: Option<&str>| {
        let mut v = serde_json::json!({"cmd":"del","publish":{"host_ip":host,"host_port":port}});
        if let Some(o) = owner {
            v["owner"] = o.into();
        }
        v.to_string().into_bytes()
    };
    // Two plugin instances, one per family, and an operator's rule on another address.
    assert_eq!(
        ok(d.handle_line(&add("0.0.0.0", 9000, Some("docker:11"))))["ok"],
        true
    );
    assert_eq!(
        ok(d.handle_line(&add("::", 9000, Some("docker:12"))))["ok"],
        true
    );
    assert_eq!(ok(d.handle_line(&add("127.0.0.2", 9001, None)))["ok"], true);
    let list = ok(d.handle_line(br#"{"cmd":"list"}"#));
    let owners: Vec<&serde_json::Value> = list["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .map(|r| &r["owner"])
        .collect();
    // Publish order (port, then address): 0.0.0.0:9000, [::]:9000, 127.0.0.2:9001.
    assert_eq!(
        owners,
        [
            &serde_json::json!("docker:11"),
            &serde_json::json!("docker:12"),
            &serde_json::Value::Null,
        ]
    );
    // No owner, no field.
    assert!(list["rules"][2].get("owner").is_none(), "{list}");
    let before = (kernel_rules(&d), table_rules(&d));

    // Another owner's rule, or one without an owner, is refused and left alone.
    for (host, port, owner, want) in [
        (
            "0.0.0.0",
            9000,
            "docker:12",
            "cannot unpublish 0.0.0.0:9000/tcp for docker:12: it belongs to docker:11",
        ),
        (
            "127.0.0.2",
            9001,
            "docker:11",
            "cannot unpublish 127.0.0.2:9001/tcp for docker:11: it has no owner",
        ),
    ] {
        let r = ok(d.handle_line(&del(host, port, Some(owner))));
        assert_eq!(r["error"], want);
    }
    assert_eq!((kernel_rules(&d), table_rules(&d)), before);
    // Not published at all: the usual message.
    let r = ok(d.handle_line(&del("198.18.0.9", 9000, Some("docker:11"))));
    assert_eq!(
        r["error"],
        "No published port 198.18.0.9:9000/tcp (published there: 0.0.0.0:9000/tcp)"
    );

    // The owner removes its own; the operator (no owner named) removes any.
    assert_eq!(
        ok(d.handle_line(&del("0.0.0.0", 9000, Some("docker:11"))))["ok"],
        true
    );
    assert_eq!(ok(d.handle_line(&del("::", 9000, None)))["ok"], true);
    assert_eq!(
        table_rules(&d),
        ["127.0.0.2:9001/tcp -> 172.17.0.2:8080 (cli)"]
    );
    // A rule published again on a freed port has no stale owner.
    assert_eq!(ok(d.handle_line(&add("0.0.0.0", 9000, None)))["ok"], true);
    assert_eq!(d.table().owner(&publish("0.0.0.0:9000")), None);
}

fn saved(p: &str, b: &str, slot: u32, source: Source) -> crate::state::Adopted {
    (
        publish(p),
        Entry {
            backend: b.parse().unwrap_or_else(|e| panic!("{b}: {e}")),
            stats_slot: slot,
            source,
            reservation: false,
        },
        None,
    )
}

#[test]
fn adopt_takes_back_rules_with_their_slots_and_sources() {
    let mut d = Daemon::new(FakeKernel::default());
    // This kernel keeps nothing across daemons: every entry is written back.
    let fixed = d
        .adopt(vec![
            saved("0.0.0.0:9000-9001/tcp", "10.0.0.2:80-81", 5, Source::Cli),
            saved("127.0.0.1:53/udp", "10.0.0.3:53", 2, Source::File),
        ])
        .expect("adopt");
    assert_eq!(fixed, 3);
    assert_eq!(
        kernel_rules(&d),
        [
            "0.0.0.0:9000/6 -> 10.0.0.2:80 #5",
            "0.0.0.0:9001/6 -> 10.0.0.2:81 #5",
            "127.0.0.1:53/17 -> 10.0.0.3:53 #2",
        ]
    );
    assert_eq!(
        table_rules(&d),
        [
            "127.0.0.1:53/udp -> 10.0.0.3:53 (file)",
            "0.0.0.0:9000-9001/tcp -> 10.0.0.2:80-81 (cli)",
        ]
    );
    // Adopted counters are not reset; the next rule gets a slot none of them holds.
    assert!(d.kernel().reset.is_empty());
    d.add(decl("9100", "10.0.0.4:80")).expect("add");
    assert_eq!(
        d.table().get(&publish("9100")).map(|e| e.stats_slot),
        Some(6)
    );
    // A second adoption, or saved rules that conflict or share a slot, are refused.
    assert!(matches!(
        d.adopt(Vec::new()),
        Err(DaemonError::AdoptInvalid(_))
    ));
    for rules in [
        vec![
            saved("9000/tcp", "10.0.0.2:80", 1, Source::Cli),
            saved("0.0.0.0:9000/tcp", "10.0.0.3:80", 2, Source::Cli),
        ],
        vec![
            saved("9000/tcp", "10.0.0.2:80", 1, Source::Cli),
            saved("9001/tcp", "10.0.0.3:80", 1, Source::Cli),
        ],
        vec![saved(
            "9000/tcp",
            "10.0.0.2:80",
            MAX_STATS_SLOTS,
            Source::Cli,
        )],
    ] {
        let mut d = Daemon::new(FakeKernel::default());
        let e = d.adopt(rules).expect_err("refused");
        assert!(matches!(e, DaemonError::AdoptInvalid(_)), "{e}");
        assert!(d.table().is_empty() && d.kernel().rules.is_empty());
    }
}

#[test]
fn adopt_keeps_owners_and_reservations() {
    let mut d = Daemon::new(FakeKernel::default());
    let (p, mut e, _) = saved("0.0.0.0:8080/tcp", "10.0.0.4:80", 7, Source::Cli);
    e.reservation = true;
    let owner: crate::protocol::Owner = "cni:0123abcd/eth0".parse().expect("owner");
    d.adopt(vec![(p, e, Some(owner.clone()))]).expect("adopt");
    assert_eq!(d.table().owner(&publish("0.0.0.0:8080/tcp")), Some(&owner));
    assert_eq!(
        d.table()
            .get(&publish("0.0.0.0:8080/tcp"))
            .map(|e| e.reservation),
        Some(true)
    );
    // The owner still guards its rule after the adoption.
    let r: serde_json::Value = serde_json::from_slice(&d.handle_line(
        br#"{"cmd":"del","publish":{"host_ip":"0.0.0.0","host_port":8080},"owner":"docker:1"}"#,
    ))
    .expect("JSON");
    assert_eq!(
        r["error"],
        "cannot unpublish 0.0.0.0:8080/tcp for docker:1: it belongs to cni:0123abcd/eth0"
    );
}
