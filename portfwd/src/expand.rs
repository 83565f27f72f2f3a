//! Wildcard rules expanded into address-bound entries, so that the packet path serves
//! either kind with one exact lookup and no host-address check.
//!
//! A wildcard entry (key `0.0.0.0` / `::`) is also written under each host address of its
//! family, with the same value and [`BACKEND_EXPANDED`] set. The wildcard's own entry
//! stays (the socket hooks serve loopback and the unspecified address through it). An
//! address-bound rule on the same key takes the expansion's place, and the expansion
//! comes back when that rule goes. The [`crate::dataplane::Dataplane`] keeps them in step
//! with every rule write and host-address change; expansions are recognised in the maps
//! by their flag alone, so a new daemon over pinned maps needs no other record of them.
//! They are internal: the rules snapshot (what `adopt` compares with the saved state)
//! leaves them out.

use std::collections::{BTreeSet, HashMap, HashSet};

use portfwd_common::BACKEND_EXPANDED;

use crate::dataplane::{Family, RuleEntry};

/// Whether a rules map value is an expansion.
pub fn is_expansion<F: Family>(b: &F::Backend) -> bool {
    F::flags(b) & BACKEND_EXPANDED != 0
}

/// A wildcard's value as its expansions hold it.
pub fn expanded<F: Family>(b: F::Backend) -> F::Backend {
    F::with_flags(b, F::flags(&b) | BACKEND_EXPANDED)
}

/// Whether a rules map key is a wildcard's.
pub fn is_wildcard<F: Family>(k: &F::RuleKey) -> bool {
    F::rule_port(k).2
}

/// The expansions a rules map holding `entries` needs with host addresses `hosts`: each
/// wildcard under each host address, where no address-bound rule holds that key.
pub fn wanted<F: Family>(
    entries: &[RuleEntry<F>],
    hosts: &BTreeSet<F::Addr>,
) -> HashMap<F::RuleKey, F::Backend> {
    let rules: HashSet<F::RuleKey> = entries
        .iter()
        .filter(|(_, b)| !is_expansion::<F>(b))
        .map(|(k, _)| *k)
        .collect();
    let mut want = HashMap::new();
    for (k, b) in entries {
        if is_expansion::<F>(b) || !is_wildcard::<F>(k) {
            continue;
        }
        for &h in hosts {
            let key = F::with_addr(k, h);
            if !rules.contains(&key) {
                want.insert(key, expanded::<F>(*b));
            }
        }
    }
    want
}

/// The writes that make a map holding `entries` hold exactly the expansions `want`:
/// entries to write (new or changed), then keys to delete (stale expansions).
pub fn plan<F: Family>(
    entries: &[RuleEntry<F>],
    want: &HashMap<F::RuleKey, F::Backend>,
) -> (Vec<RuleEntry<F>>, Vec<F::RuleKey>) {
    let have: HashMap<F::RuleKey, F::Backend> = entries.iter().copied().collect();
    let mut put: Vec<RuleEntry<F>> = want
        .iter()
        .filter(|(k, b)| have.get(k) != Some(b))
        .map(|(k, b)| (*k, *b))
        .collect();
    let mut remove: Vec<F::RuleKey> = entries
        .iter()
        .filter(|(k, b)| is_expansion::<F>(b) && !want.contains_key(k))
        .map(|(k, _)| *k)
        .collect();
    // A stable order, for logs and tests.
    put.sort_by_key(|(k, _)| F::rule_key(k));
    remove.sort_by_key(|k| F::rule_key(k));
    (put, remove)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use portfwd_common::{proto, BackendV4, BackendV6, RuleKeyV4, RuleKeyV6, BACKEND_RESERVATION};

    use super::*;
    use crate::dataplane::{V4, V6};

    const H1: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
    const H2: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
    const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    fn key(a: Ipv4Addr, port: u16) -> RuleKeyV4 {
        RuleKeyV4::from_parts(a, port, proto::TCP)
    }

    /// Applies a plan to a map held as a vector (as the dataplane does to the kernel's).
    fn apply(entries: &mut Vec<RuleEntry<V4>>, hosts: &BTreeSet<Ipv4Addr>) {
        let want = wanted::<V4>(entries, hosts);
        let (put, remove) = plan::<V4>(entries, &want);
        entries.retain(|(k, _)| !remove.contains(k) && !put.iter().any(|(p, _)| p == k));
        entries.extend(put);
        entries.sort_by_key(|(k, _)| V4::rule_key(k));
    }

    #[test]
    fn a_wildcard_is_expanded_per_host_address() {
        let w = BackendV4::new(B, 80, 3).with_flags(BACKEND_RESERVATION);
        let mut m = vec![(key(Ipv4Addr::UNSPECIFIED, 9000), w)];
        apply(&mut m, &[H1, H2].into());
        let ex = w.with_flags(BACKEND_RESERVATION | BACKEND_EXPANDED);
        assert_eq!(
            m,
            vec![
                (key(Ipv4Addr::UNSPECIFIED, 9000), w),
                (key(H1, 9000), ex),
                (key(H2, 9000), ex),
            ]
        );
        // Nothing more to do.
        let want = wanted::<V4>(&m, &[H1, H2].into());
        assert_eq!(plan::<V4>(&m, &want), (vec![], vec![]));
    }

    #[test]
    fn addresses_come_and_go() {
        let w = BackendV4::new(B, 80, 3);
        let mut m = vec![(key(Ipv4Addr::UNSPECIFIED, 9000), w)];
        apply(&mut m, &[H1].into());
        assert!(m.contains(&(key(H1, 9000), expanded::<V4>(w))));
        // H1 goes, H2 appears.
        let want = wanted::<V4>(&m, &[H2].into());
        let (put, remove) = plan::<V4>(&m, &want);
        assert_eq!(put, vec![(key(H2, 9000), expanded::<V4>(w))]);
        assert_eq!(remove, vec![key(H1, 9000)]);
        // No host address: the wildcard alone.
        apply(&mut m, &BTreeSet::new());
        assert_eq!(m, vec![(key(Ipv4Addr::UNSPECIFIED, 9000), w)]);
    }

    #[test]
    fn an_address_bound_rule_wins_over_an_expansion() {
        let w = BackendV4::new(B, 80, 3);
        let exact = BackendV4::new(B, 81, 4);
        let mut m = vec![
            (key(Ipv4Addr::UNSPECIFIED, 9000), w),
            (key(H1, 9000), exact),
        ];
        apply(&mut m, &[H1, H2].into());
        assert!(m.contains(&(key(H1, 9000), exact)));
        assert!(m.contains(&(key(H2, 9000), expanded::<V4>(w))));
        // The rule goes: the expansion comes back.
        m.retain(|(k, _)| *k != key(H1, 9000));
        apply(&mut m, &[H1, H2].into());
        assert!(m.contains(&(key(H1, 9000), expanded::<V4>(w))));
    }

    #[test]
    fn a_changed_or_removed_wildcard_changes_its_expansions() {
        let w = BackendV4::new(B, 80, 3);
        let mut m = vec![(key(Ipv4Addr::UNSPECIFIED, 9000), w)];
        apply(&mut m, &[H1].into());
        let w2 = BackendV4::new(B, 8080, 3);
        m[0].1 = w2;
        apply(&mut m, &[H1].into());
        assert!(m.contains(&(key(H1, 9000), expanded::<V4>(w2))));
        // The wildcard gone (as after a daemon died between two writes): its orphans go.
        m.remove(0);
        apply(&mut m, &[H1].into());
        assert!(m.is_empty());
    }

    #[test]
    fn ipv6_expands_too() {
        let h: Ipv6Addr = "2001:db8::1".parse().expect("addr");
        let k = RuleKeyV6::from_parts(Ipv6Addr::UNSPECIFIED, 53, proto::UDP);
        let b = BackendV6::new("fd00::2".parse().expect("addr"), 53, 1);
        let want = wanted::<V6>(&[(k, b)], &[h].into());
        let kh = RuleKeyV6::from_parts(h, 53, proto::UDP);
        assert_eq!(want.get(&kh), Some(&expanded::<V6>(b)));
        assert_eq!(want.len(), 1);
    }
}
