//! Internet checksum arithmetic (RFC 1071) and its incremental update (RFC 1624).
//!
//! Checksum words are handled as `u16` read from the packet in network order
//! (`u16::from_be_bytes`); the one's complement sum is byte-order independent as long as
//! fields and checksum are read the same way, and reading them big-endian keeps tests
//! readable.
//!
//! Why the pseudo-header matters: TCP and UDP checksums cover the IPv4 source and
//! destination addresses, so rewriting an address changes both the IP header checksum
//! and the L4 checksum, while rewriting a port changes only the L4 checksum.
//!
//! IPv6 has no header checksum, but its pseudo-header (RFC 8200 section 8.1) covers both
//! 16-byte addresses: rewriting one changes the L4 checksum by the difference of its
//! eight 16-bit words ([`replace16`]). A UDP checksum of zero is invalid over IPv6 (the
//! receiver drops the datagram); the update leaves it zero, as the kernel's
//! `BPF_F_MARK_MANGLED_0` does, so the XDP and TC paths agree byte for byte.

/// Folds a 32-bit one's complement accumulator into 16 bits.
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// RFC 1624 eqn. 3: `HC' = ~(~HC + ~m + m')` for one 16-bit word `m` changed to `m_new`.
#[inline(always)]
pub const fn replace2(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check as u32) + (!old as u32 & 0xffff) + new as u32;
    !fold(sum)
}

/// Incremental update for a 32-bit field (an IPv4 address) given as its two
/// network-order words.
#[inline(always)]
pub const fn replace4(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let old_hi = u16::from_be_bytes([old[0], old[1]]);
    let old_lo = u16::from_be_bytes([old[2], old[3]]);
    let new_hi = u16::from_be_bytes([new[0], new[1]]);
    let new_lo = u16::from_be_bytes([new[2], new[3]]);
    let sum = (!check as u32)
        + (!old_hi as u32 & 0xffff)
        + (!old_lo as u32 & 0xffff)
        + new_hi as u32
        + new_lo as u32;
    !fold(sum)
}

/// Incremental update (RFC 1624 eqn. 3, over eight words) for a 128-bit field (an IPv6
/// address).
#[inline(always)]
pub const fn replace16(check: u16, old: [u8; 16], new: [u8; 16]) -> u16 {
    let mut sum = !check as u32;
    let mut i = 0;
    while i < 16 {
        let o = u16::from_be_bytes([old[i], old[i + 1]]);
        let n = u16::from_be_bytes([new[i], new[i + 1]]);
        // At most 1 + 16 * 0xffff: no overflow of the 32-bit accumulator.
        sum += (!o as u32 & 0xffff) + n as u32;
        i += 2;
    }
    !fold(sum)
}

/// Updates an IPv6 transport checksum after an address and a port change. A UDP
/// checksum of zero (invalid over IPv6) stays zero; a computed zero is sent as `0xFFFF`
/// (RFC 8200 section 8.1).
#[inline(always)]
pub const fn l4_update_v6(
    check: u16,
    old_addr: [u8; 16],
    new_addr: [u8; 16],
    old_port: u16,
    new_port: u16,
    is_udp: bool,
) -> u16 {
    udp_zero_rules(
        check,
        replace2(replace16(check, old_addr, new_addr), old_port, new_port),
        is_udp,
    )
}

/// Updates a transport checksum after an address and a port change.
///
/// `is_udp`: a UDP checksum of zero means "no checksum" and stays zero (RFC 768), and
/// a computed zero is sent as `0xFFFF`.
#[inline(always)]
pub const fn l4_update(
    check: u16,
    old_addr: [u8; 4],
    new_addr: [u8; 4],
    old_port: u16,
    new_port: u16,
    is_udp: bool,
) -> u16 {
    udp_zero_rules(
        check,
        replace2(replace4(check, old_addr, new_addr), old_port, new_port),
        is_udp,
    )
}

/// UDP's special checksum values, for both families: a zero checksum ("none sent")
/// stays zero, and a computed zero is sent as `0xFFFF` (RFC 768, RFC 8200 8.1).
#[inline(always)]
const fn udp_zero_rules(old: u16, updated: u16, is_udp: bool) -> u16 {
    if !is_udp {
        updated
    } else if old == 0 {
        0
    } else if updated == 0 {
        0xffff
    } else {
        updated
    }
}

/// The folded IPv4 pseudo-header sum (RFC 793 / 768) of a segment of `len` bytes: what
/// an offloaded (`CHECKSUM_PARTIAL`) TCP or UDP segment carries in its checksum field
/// (not complemented; the kernel or NIC adds the segment's bytes later). Never zero.
#[inline(always)]
pub const fn pseudo_sum_v4(src: [u8; 4], dst: [u8; 4], proto: u8, len: u16) -> u16 {
    let sum = u16::from_be_bytes([src[0], src[1]]) as u32
        + u16::from_be_bytes([src[2], src[3]]) as u32
        + u16::from_be_bytes([dst[0], dst[1]]) as u32
        + u16::from_be_bytes([dst[2], dst[3]]) as u32
        + proto as u32
        + len as u32;
    fold(sum)
}

/// As [`pseudo_sum_v4`], for IPv6 (RFC 8200 section 8.1), `len` the upper-layer length.
#[inline(always)]
pub const fn pseudo_sum_v6(src: [u8; 16], dst: [u8; 16], next_header: u8, len: u32) -> u16 {
    // At most 34 words of 0xffff: no overflow of the 32-bit accumulator.
    let mut sum = (len >> 16) + (len & 0xffff) + next_header as u32;
    let mut i = 0;
    while i < 16 {
        sum += u16::from_be_bytes([src[i], src[i + 1]]) as u32
            + u16::from_be_bytes([dst[i], dst[i + 1]]) as u32;
        i += 2;
    }
    fold(sum)
}

/// Updates a partial (offloaded) checksum field, which holds the pseudo-header sum
/// itself (not its complement), after an IPv4 address change: `field + ~old + new`, as
/// the kernel's `inet_proto_csum_replace4` does for a `CHECKSUM_PARTIAL` skb. Ports are
/// in the data the kernel sums later, so they never enter a partial field.
#[inline(always)]
pub const fn partial_replace4(field: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    !replace4(!field, old, new)
}

/// As [`partial_replace4`], for an IPv6 address.
#[inline(always)]
pub const fn partial_replace16(field: u16, old: [u8; 16], new: [u8; 16]) -> u16 {
    !replace16(!field, old, new)
}

/// Full one's complement sum over `data` (odd length padded with a zero byte), folded.
/// The checksum field itself must be zero (or excluded) when computing a checksum.
pub fn sum(data: &[u8], initial: u32) -> u16 {
    let mut acc: u64 = initial as u64;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        acc += (*last as u64) << 8;
    }
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The IPv4 pseudo-header sum (RFC 793 / 768) for a segment of `len` bytes.
pub fn pseudo_header_v4(src: [u8; 4], dst: [u8; 4], proto: u8, len: u16) -> u32 {
    let mut p = [0u8; 12];
    p[..4].copy_from_slice(&src);
    p[4..8].copy_from_slice(&dst);
    p[9] = proto;
    p[10..].copy_from_slice(&len.to_be_bytes());
    sum(&p, 0) as u32
}

/// The IPv6 pseudo-header sum (RFC 8200 section 8.1) for an upper-layer packet of `len`
/// bytes.
pub fn pseudo_header_v6(src: [u8; 16], dst: [u8; 16], next_header: u8, len: u32) -> u32 {
    let mut p = [0u8; 40];
    p[..16].copy_from_slice(&src);
    p[16..32].copy_from_slice(&dst);
    p[32..36].copy_from_slice(&len.to_be_bytes());
    p[39] = next_header;
    sum(&p, 0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn full_l4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> u16 {
        // A UDP header with a zero checksum field, then the payload.
        let len = 8 + payload.len() as u16;
        let mut seg = [0u8; 64];
        seg[..2].copy_from_slice(&sport.to_be_bytes());
        seg[2..4].copy_from_slice(&dport.to_be_bytes());
        seg[4..6].copy_from_slice(&len.to_be_bytes());
        seg[8..8 + payload.len()].copy_from_slice(payload);
        let c = !sum(&seg[..len as usize], pseudo_header_v4(src, dst, 17, len));
        if c == 0 {
            0xffff
        } else {
            c
        }
    }

    /// A full IPv6 TCP or UDP checksum over a header with ports, then `payload`.
    fn full_l4_v6(
        src: [u8; 16],
        dst: [u8; 16],
        sport: u16,
        dport: u16,
        is_udp: bool,
        payload: &[u8],
    ) -> u16 {
        let hlen = if is_udp { 8 } else { 20 };
        let len = hlen + payload.len();
        let mut seg = [0u8; 96];
        seg[..2].copy_from_slice(&sport.to_be_bytes());
        seg[2..4].copy_from_slice(&dport.to_be_bytes());
        if is_udp {
            seg[4..6].copy_from_slice(&(len as u16).to_be_bytes());
        } else {
            seg[12] = 5 << 4; // data offset
            seg[13] = 0x02; // SYN
        }
        seg[hlen..len].copy_from_slice(payload);
        let proto = if is_udp { 17 } else { 6 };
        let c = !sum(&seg[..len], pseudo_header_v6(src, dst, proto, len as u32));
        if is_udp && c == 0 {
            0xffff
        } else {
            c
        }
    }

    #[test]
    fn rfc1624_example() {
        // RFC 1624 section 4: HC = 0xdd2f, m = 0x5555 -> m' = 0x3285, HC' = 0x0000.
        assert_eq!(replace2(0xdd2f, 0x5555, 0x3285), 0x0000);
    }

    #[test]
    fn udp_zero_checksum_stays_zero() {
        assert_eq!(l4_update(0, [1, 2, 3, 4], [5, 6, 7, 8], 1, 2, true), 0);
        assert_eq!(l4_update_v6(0, [1; 16], [2; 16], 1, 2, true), 0);
    }

    #[test]
    fn v6_same_address_changes_nothing() {
        let a = [0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
        assert_eq!(replace16(0x1234, a, a), 0x1234);
    }

    #[test]
    fn pseudo_sums_match_the_slice_versions() {
        let (a, b) = ([198, 18, 0, 2], [198, 18, 0, 1]);
        assert_eq!(
            pseudo_sum_v4(a, b, 6, 1480) as u32,
            pseudo_header_v4(a, b, 6, 1480)
        );
        let (a6, b6) = ([0x20; 16], [0xfe; 16]);
        assert_eq!(
            pseudo_sum_v6(a6, b6, 17, 70_000) as u32,
            pseudo_header_v6(a6, b6, 17, 70_000)
        );
    }

    proptest! {
        #[test]
        fn incremental_equals_full_recompute(
            src in any::<[u8; 4]>(), dst in any::<[u8; 4]>(), new_dst in any::<[u8; 4]>(),
            sport in any::<u16>(), dport in any::<u16>(), new_dport in any::<u16>(),
            payload in proptest::collection::vec(any::<u8>(), 0..48),
        ) {
            let before = full_l4(src, dst, sport, dport, &payload);
            let after = full_l4(src, new_dst, sport, new_dport, &payload);
            let incr = l4_update(before, dst, new_dst, dport, new_dport, true);
            // 0x0000 and 0xffff are the same value in one's complement; UDP sends 0xffff.
            prop_assert_eq!(incr, after);
        }

        #[test]
        fn v6_incremental_equals_full_recompute(
            src in any::<[u8; 16]>(), dst in any::<[u8; 16]>(), new_addr in any::<[u8; 16]>(),
            sport in any::<u16>(), dport in any::<u16>(), new_port in any::<u16>(),
            is_udp in any::<bool>(), rewrite_src in any::<bool>(),
            payload in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let before = full_l4_v6(src, dst, sport, dport, is_udp, &payload);
            let (after, incr) = if rewrite_src {
                (
                    full_l4_v6(new_addr, dst, new_port, dport, is_udp, &payload),
                    l4_update_v6(before, src, new_addr, sport, new_port, is_udp),
                )
            } else {
                (
                    full_l4_v6(src, new_addr, sport, new_port, is_udp, &payload),
                    l4_update_v6(before, dst, new_addr, dport, new_port, is_udp),
                )
            };
            // TCP: 0x0000 and 0xffff are one value; a recompute never yields 0xffff
            // unless every word is zero, so compare as one's complement values.
            prop_assert!(
                incr == after || (!is_udp && (incr == 0 || incr == 0xffff) && (after == 0 || after == 0xffff)),
                "incr {incr:#06x} full {after:#06x}"
            );
        }

        /// A partial field updated for an address change is the new pseudo-header sum,
        /// and completing it over the segment (as the kernel or NIC does later, ports
        /// included) gives the full checksum of the rewritten segment.
        #[test]
        fn partial_update_then_completion_equals_full(
            src in any::<[u8; 4]>(), dst in any::<[u8; 4]>(), new_dst in any::<[u8; 4]>(),
            sport in any::<u16>(), new_dport in any::<u16>(),
            payload in proptest::collection::vec(any::<u8>(), 0..48),
        ) {
            let len = 8 + payload.len() as u16;
            let field = pseudo_sum_v4(src, dst, 17, len);
            let updated = partial_replace4(field, dst, new_dst);
            prop_assert_eq!(updated, pseudo_sum_v4(src, new_dst, 17, len));
            // Completion: the sum over the segment with the partial field in place.
            let mut seg = [0u8; 64];
            seg[..2].copy_from_slice(&sport.to_be_bytes());
            seg[2..4].copy_from_slice(&new_dport.to_be_bytes());
            seg[4..6].copy_from_slice(&len.to_be_bytes());
            seg[6..8].copy_from_slice(&updated.to_be_bytes());
            seg[8..len as usize].copy_from_slice(&payload);
            let completed = match !sum(&seg[..len as usize], 0) { 0 => 0xffff, c => c };
            prop_assert_eq!(completed, full_l4(src, new_dst, sport, new_dport, &payload));
        }

        #[test]
        fn v6_partial_update_is_the_new_pseudo_sum(
            src in any::<[u8; 16]>(), dst in any::<[u8; 16]>(), new_dst in any::<[u8; 16]>(),
            len in any::<u16>(), udp in any::<bool>(),
        ) {
            let nh = if udp { 17 } else { 6 };
            let field = pseudo_sum_v6(src, dst, nh, len.into());
            prop_assert_eq!(
                partial_replace16(field, dst, new_dst),
                pseudo_sum_v6(src, new_dst, nh, len.into())
            );
        }

        #[test]
        fn replace16_is_replace4_four_times(
            check in any::<u16>(), old in any::<[u8; 16]>(), new in any::<[u8; 16]>(),
        ) {
            let mut c = check;
            for i in 0..4 {
                let o = [old[4 * i], old[4 * i + 1], old[4 * i + 2], old[4 * i + 3]];
                let n = [new[4 * i], new[4 * i + 1], new[4 * i + 2], new[4 * i + 3]];
                c = replace4(c, o, n);
            }
            let d = replace16(check, old, new);
            prop_assert!(c == d || (c == 0 && d == 0xffff) || (c == 0xffff && d == 0));
        }

        #[test]
        fn ip_header_incremental(hdr in any::<[u8; 20]>(), new_dst in any::<[u8; 4]>()) {
            let mut h = hdr;
            h[10] = 0; h[11] = 0;
            let c = !sum(&h, 0);
            let mut h2 = h;
            h2[16..20].copy_from_slice(&new_dst);
            let full = !sum(&h2, 0);
            let old: [u8; 4] = [h[16], h[17], h[18], h[19]];
            let incr = replace4(c, old, new_dst);
            // Both represent the same one's complement value.
            prop_assert!(incr == full || (incr == 0xffff && full == 0) || (incr == 0 && full == 0xffff));
        }
    }
}
