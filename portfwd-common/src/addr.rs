//! IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, RFC 4291 section 2.5.5.2), in one
//! place: how an IPv6 rule holds an IPv4-only backend, how a dual-stack socket names an
//! IPv4 peer, and where NAT64 finds the IPv4 address. Addresses are network-order bytes.

/// The IPv4 address inside an IPv4-mapped IPv6 address, or `None` for any other.
#[inline(always)]
pub fn ipv4_mapped(a: &[u8; 16]) -> Option<[u8; 4]> {
    if is_ipv4_mapped(a) {
        Some(mapped_low(a))
    } else {
        None
    }
}

/// Whether `a` is IPv4-mapped.
#[inline(always)]
pub fn is_ipv4_mapped(a: &[u8; 16]) -> bool {
    // One OR over the ten zero bytes: no loop, no early exits (fewer instructions in the
    // kernel programs than a loop or an `Option` built first).
    a[0] | a[1] | a[2] | a[3] | a[4] | a[5] | a[6] | a[7] | a[8] | a[9] == 0
        && a[10] == 0xff
        && a[11] == 0xff
}

/// The IPv4 address inside `a`, which the caller knows is IPv4-mapped (its last four
/// bytes; no check).
#[inline(always)]
pub fn mapped_low(a: &[u8; 16]) -> [u8; 4] {
    [a[12], a[13], a[14], a[15]]
}

/// `a` as an IPv4-mapped IPv6 address.
#[inline(always)]
pub fn to_ipv4_mapped(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::net::{Ipv4Addr, Ipv6Addr};
    use proptest::prelude::*;

    #[test]
    fn table() {
        let mapped: Ipv6Addr = "::ffff:192.0.2.7".parse().expect("an address");
        assert_eq!(ipv4_mapped(&mapped.octets()), Some([192, 0, 2, 7]));
        for not in [
            "::",
            "::1",
            "::192.0.2.7",
            "64:ff9b::c000:207",
            "2001:db8::ffff:c000:207",
            "::fffe:c000:207",
            "1::ffff:c000:207",
        ] {
            let a: Ipv6Addr = not.parse().expect("an address");
            assert_eq!(ipv4_mapped(&a.octets()), None, "{not}");
        }
    }

    proptest! {
        #[test]
        fn round_trip(v4 in any::<[u8; 4]>()) {
            let m = to_ipv4_mapped(v4);
            prop_assert_eq!(m, Ipv4Addr::from(v4).to_ipv6_mapped().octets());
            prop_assert_eq!(ipv4_mapped(&m), Some(v4));
        }

        #[test]
        fn agrees_with_std(a in any::<[u8; 16]>()) {
            let std = Ipv6Addr::from(a).to_ipv4_mapped().map(|v| v.octets());
            prop_assert_eq!(ipv4_mapped(&a), std);
            if let Some(v4) = ipv4_mapped(&a) {
                prop_assert_eq!(to_ipv4_mapped(v4), a);
                prop_assert_eq!(mapped_low(&a), v4);
            }
        }
    }
}
