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
    if is_udp && check == 0 {
        return 0;
    }
    let c = replace2(replace4(check, old_addr, new_addr), old_port, new_port);
    if is_udp && c == 0 {
        0xffff
    } else {
        c
    }
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

    #[test]
    fn rfc1624_example() {
        // RFC 1624 section 4: HC = 0xdd2f, m = 0x5555 -> m' = 0x3285, HC' = 0x0000.
        assert_eq!(replace2(0xdd2f, 0x5555, 0x3285), 0x0000);
    }

    #[test]
    fn udp_zero_checksum_stays_zero() {
        assert_eq!(l4_update(0, [1, 2, 3, 4], [5, 6, 7, 8], 1, 2, true), 0);
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
