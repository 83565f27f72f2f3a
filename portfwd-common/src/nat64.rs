//! NAT64's pure parts (the kernel side is `portfwd-ebpf/src/nat64.rs`): which ports it
//! hands out and in what order it tries them, the L3 headers it writes, and the
//! checksum difference that moves an L4 checksum from one family's pseudo-header to the
//! other's.
//!
//! Byte order: addresses and ports are network-order bytes. [`pseudo_diff`] and the
//! port hash read 16- and 32-bit words in memory order, as the kernel's checksum helpers
//! do (`__wsum`); portfwd runs on little-endian targets only (bpfel), so host tests
//! compute the same values as the kernel.

use crate::{
    csum,
    packet::{IPV4_MIN_HLEN, IPV6_HLEN, IP_DF, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    NAT64_CLOSED, NAT64_CLOSING, NAT64_FIN_BACKEND, NAT64_FIN_BACKEND_FIRST, NAT64_FIN_CLIENT,
    NAT64_PORT_COUNT, NAT64_PORT_MIN,
};

/// Whether `port` (network order) is one NAT64 hands out: only those can be replies.
#[inline(always)]
pub fn is_nat64_port(port: [u8; 2]) -> bool {
    let p = u16::from_be_bytes(port);
    p >= NAT64_PORT_MIN && p - NAT64_PORT_MIN < NAT64_PORT_COUNT
}

/// Where a new flow's port search starts, `0..NAT64_PORT_COUNT`: a hash of the client's
/// address and port, so one client's flows spread and a retried one lands where it did.
#[inline(always)]
pub fn port_start(client: &[u8; 16], client_port: [u8; 2]) -> u16 {
    let mut seed: u32 = u16::from_ne_bytes(client_port) as u32;
    let mut i = 0;
    while i < 4 {
        seed = seed.rotate_left(5) ^ word(client, i);
        i += 1;
    }
    (seed ^ (seed >> 16)) as u16 % NAT64_PORT_COUNT
}

/// The `n`-th port tried from `start` (network order), wrapping inside NAT64's range.
/// `start < NAT64_PORT_COUNT` and `n < NAT64_PORT_TRIES` (no overflow).
#[inline(always)]
pub fn port_candidate(start: u16, n: u16) -> [u8; 2] {
    (NAT64_PORT_MIN + (start + n) % NAT64_PORT_COUNT).to_be_bytes()
}

/// Word `i` of an IPv6 address, 32 bits in memory order (a hash input).
#[inline(always)]
fn word(a: &[u8; 16], i: usize) -> u32 {
    u32::from_ne_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]])
}

/// A 20-byte IPv4 header (no options, DF set, ID 0) with its checksum, into the start
/// of `h` (the buffer is IPv6-sized so one scratch buffer serves both directions).
#[inline(always)]
pub fn ipv4_header(
    h: &mut [u8; IPV6_HLEN],
    tos: u8,
    tot_len: u16,
    ttl: u8,
    proto: u8,
    src: [u8; 4],
    dst: [u8; 4],
) {
    let len = tot_len.to_be_bytes();
    h[0] = 0x45;
    h[1] = tos;
    h[2] = len[0];
    h[3] = len[1];
    h[4] = 0;
    h[5] = 0;
    h[6] = IP_DF;
    h[7] = 0;
    h[8] = ttl;
    h[9] = proto;
    h[10] = 0;
    h[11] = 0;
    let mut i = 0;
    while i < 4 {
        h[12 + i] = src[i];
        h[16 + i] = dst[i];
        i += 1;
    }
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < IPV4_MIN_HLEN {
        sum += u16::from_be_bytes([h[i], h[i + 1]]) as u32;
        i += 2;
    }
    let check = (!csum::fold(sum)).to_be_bytes();
    h[10] = check[0];
    h[11] = check[1];
}

/// A 40-byte IPv6 header (flow label 0), into `h`.
#[inline(always)]
pub fn ipv6_header(
    h: &mut [u8; IPV6_HLEN],
    tclass: u8,
    payload_len: u16,
    next: u8,
    hop_limit: u8,
    src: &[u8; 16],
    dst: &[u8; 16],
) {
    let len = payload_len.to_be_bytes();
    h[0] = 0x60 | (tclass >> 4);
    h[1] = tclass << 4;
    h[2] = 0;
    h[3] = 0;
    h[4] = len[0];
    h[5] = len[1];
    h[6] = next;
    h[7] = hop_limit;
    let mut i = 0;
    while i < 16 {
        h[8 + i] = src[i];
        h[24 + i] = dst[i];
        i += 1;
    }
}

/// The length a translated packet of IPv4 length `tot_len` must fit in the route's MTU
/// with: `tot_len`, or for a GSO packet (`gso_size` payload bytes a segment: a GRO or TSO
/// super-packet) one segment's, IPv4 and L4 headers (`l4_hlen` bytes) included. Such a
/// packet leaves as segments (`bpf_skb_change_proto` keeps `gso_size`), so its total
/// length says nothing of what the MTU must hold.
#[inline(always)]
pub fn mtu_len(tot_len: u16, gso_size: u32, l4_hlen: u8) -> u16 {
    if gso_size == 0 {
        return tot_len;
    }
    let segment = IPV4_MIN_HLEN as u32 + u32::from(l4_hlen) + gso_size;
    segment.min(u32::from(tot_len)) as u16
}

/// The TCP state NAT64 keeps of a flow ([`Nat64Reply::flags`](crate::Nat64Reply)) after
/// one of its packets with `tcp_flags`, sent by the client (`from_client`) or by the
/// backend:
/// - the client's SYN (without ACK) starts a connection: the state starts over, since
///   a client port that comes back finds its old, closed flow and reuses it;
/// - a FIN marks its side's half closed ([`NAT64_FIN_CLIENT`], [`NAT64_FIN_BACKEND`]),
///   a FIN or an RST marks the flow closing ([`NAT64_CLOSING`]);
/// - an RST, or an ACK without FIN once both sides sent theirs (the last packet of a
///   close), marks it closed ([`NAT64_CLOSED`]): conntrack's `TIME_WAIT` or `CLOSE`,
///   the states whose tuple its NAT takes over when it runs out of ports;
/// - the backend's FIN before the client's marks [`NAT64_FIN_BACKEND_FIRST`] (the
///   backend will hold the tuple in `TIME_WAIT`).
///
/// [`NAT64_FIN_CLIENT_TS`](crate::NAT64_FIN_CLIENT_TS) is the caller's.
#[inline(always)]
pub fn track_tcp(state: u8, tcp_flags: u8, from_client: bool) -> u8 {
    if from_client && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        return 0;
    }
    let both = NAT64_FIN_CLIENT | NAT64_FIN_BACKEND;
    let mut s = state;
    if tcp_flags & TCP_RST != 0 {
        s |= NAT64_CLOSING | NAT64_CLOSED;
    } else if tcp_flags & TCP_FIN != 0 {
        if !from_client && s & NAT64_FIN_CLIENT == 0 {
            s |= NAT64_FIN_BACKEND_FIRST;
        }
        s |= NAT64_CLOSING
            | if from_client {
                NAT64_FIN_CLIENT
            } else {
                NAT64_FIN_BACKEND
            };
    } else if s & both == both && tcp_flags & TCP_ACK != 0 {
        s |= NAT64_CLOSED;
    }
    s
}

/// The sequence number just past a client's TCP segment with FIN, sequence number `seq`
/// and `data_len` bytes of data (the FIN counts one): what
/// [`Nat64Reply::client_fin_end`](crate::Nat64Reply) keeps.
#[inline(always)]
pub fn fin_end(seq: u32, data_len: u16) -> u32 {
    seq.wrapping_add(u32::from(data_len)).wrapping_add(1)
}

/// Whether sequence number `a` comes after `b`, modulo 2^32 (Linux's `after()`).
#[inline(always)]
pub fn seq_after(a: u32, b: u32) -> bool {
    (b.wrapping_sub(a) as i32) < 0
}

/// How many options [`tcp_tsval`] looks at, at most (a bound for the verifier): enough
/// for what stacks send (Linux's SYN: MSS, SACK permitted, timestamps; macOS's: MSS,
/// NOP, window scale, NOP, NOP, timestamps; later segments: NOP, NOP, timestamps).
pub const TCP_OPTION_STEPS: usize = 8;

/// The TSval of the timestamp option among a TCP header's `len` bytes of options, each
/// read through `byte` (`None` past the packet's end), if there is one.
#[inline(always)]
pub fn tcp_tsval(len: usize, byte: impl Fn(usize) -> Option<u8>) -> Option<u32> {
    let (mut i, mut step) = (0, 0);
    while step < TCP_OPTION_STEPS && i < len {
        match byte(i)? {
            // End of options.
            0 => return None,
            // NOP.
            1 => i += 1,
            kind => {
                let l = byte(i + 1)? as usize;
                if kind == TCP_OPT_TIMESTAMP {
                    if l != 10 || i + 10 > len {
                        return None;
                    }
                    let b = [byte(i + 2)?, byte(i + 3)?, byte(i + 4)?, byte(i + 5)?];
                    return Some(u32::from_be_bytes(b));
                }
                if l < 2 {
                    return None;
                }
                i += l;
            }
        }
        step += 1;
    }
    None
}

/// The TCP timestamp option's kind (RFC 7323).
const TCP_OPT_TIMESTAMP: u8 = 8;

/// A TCP header's length in bytes, from its data offset byte
/// ([`TCP_DOFF_OFF`](crate::packet::TCP_DOFF_OFF)).
#[inline(always)]
pub fn tcp_hlen(doff_byte: u8) -> u8 {
    (doff_byte >> 4) * 4
}

/// The one's complement difference, as a `__wsum`, of a pseudo-header's addresses going
/// from `old` (source, destination) to `new`, whatever their families: what
/// `bpf_l4_csum_replace` takes with size 0 and `BPF_F_PSEUDO_HDR`. The rest of the
/// pseudo-header (length, protocol) sums the same in both families.
#[inline(always)]
pub fn pseudo_diff<const A: usize, const B: usize>(
    old: (&[u8; A], &[u8; A]),
    new: (&[u8; B], &[u8; B]),
) -> u64 {
    let out = words(words(0, old.0, true), old.1, true);
    words(words(out, new.0, false), new.1, false)
}

/// Adds the 16-bit words of `a` (or their complements: `out`) to a one's complement
/// sum, read in memory order as the kernel's checksum helpers do; the result, folded
/// once, is the `__wsum` difference `bpf_l4_csum_replace` takes.
// `inline`, not `inline(always)`: LLVM still inlines it, and folds the four calls of
// `pseudo_diff` into less code (portfwd_tc_nat64: 2282 instructions with `always`,
// 2018 without; it was 2227 when this lived in the kernel crate).
#[inline]
pub fn words<const N: usize>(sum: u64, a: &[u8; N], out: bool) -> u64 {
    let mut s = sum;
    let mut i = 0;
    while i + 1 < N {
        let w = u16::from_ne_bytes([a[i], a[i + 1]]) as u64;
        s += if out { !w & 0xffff } else { w };
        i += 2;
    }
    (s & 0xffff) + (s >> 16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{proto, NAT64_PORT_TRIES};
    use etherparse::{IpNumber, Ipv4Header, Ipv6Header};
    use proptest::prelude::*;
    use std::vec::Vec;

    #[test]
    fn nat64_port_bounds() {
        // The range runs to the last port: nothing above it.
        let last = (NAT64_PORT_MIN as u32 + NAT64_PORT_COUNT as u32 - 1) as u16;
        assert_eq!(last, u16::MAX);
        for (p, yes) in [
            (0u16, false),
            (1024, false),
            (NAT64_PORT_MIN - 1, false),
            (NAT64_PORT_MIN, true),
            (NAT64_PORT_MIN + 1, true),
            (last, true),
        ] {
            assert_eq!(is_nat64_port(p.to_be_bytes()), yes, "{p}");
        }
    }

    #[test]
    fn mtu_len_is_one_segment_of_a_gso_packet() {
        // Not GSO: the whole packet.
        assert_eq!(mtu_len(2840, 0, 20), 2840);
        // GSO: IPv4 20 + TCP 32 (timestamps) + 1428 of data, a 1500-byte MTU's segment.
        assert_eq!(mtu_len(65_000, 1428, 32), 1480);
        assert_eq!(mtu_len(65_000, 1460, 20), 1500);
        // UDP GSO: 20 + 8 + gso_size.
        assert_eq!(mtu_len(9000, 1472, 8), 1500);
        // A GSO packet shorter than one full segment: its own length.
        assert_eq!(mtu_len(600, 1460, 20), 600);
        // The header nibble: 5 words (20 bytes) to 15 (60).
        assert_eq!(
            (tcp_hlen(0x50), tcp_hlen(0x80), tcp_hlen(0xf0)),
            (20, 32, 60)
        );
    }

    /// A connection's close, both ways round, and an RST: closed only once a FIN went
    /// each way and the last ACK followed, or at the RST; the client's next SYN starts
    /// over; a backend's SYN-ACK or a retransmitted FIN changes nothing.
    #[test]
    fn track_tcp_follows_a_close() {
        use crate::packet::{TCP_ACK as A, TCP_FIN as F, TCP_RST as R, TCP_SYN as S};
        const C: bool = true;
        const B: bool = false;
        let both = NAT64_CLOSING | NAT64_FIN_CLIENT | NAT64_FIN_BACKEND;
        let reset = NAT64_CLOSING | NAT64_CLOSED;
        let first = NAT64_FIN_BACKEND_FIRST;
        // (packets in order, state after each)
        let cases: [&[(u8, bool, u8)]; 4] = [
            // The backend closes first (HTTP with Connection: close).
            &[
                (S, C, 0),
                (S | A, B, 0),
                (A, C, 0),
                (A, B, 0),
                (F | A, B, NAT64_CLOSING | NAT64_FIN_BACKEND | first),
                (A, C, NAT64_CLOSING | NAT64_FIN_BACKEND | first),
                (F | A, C, both | first),
                (F | A, C, both | first),
                (F | A, B, both | first),
                (A, B, both | first | NAT64_CLOSED),
                // The client's port comes back: a new connection on the same flow.
                (S, C, 0),
            ],
            // The client closes first.
            &[
                (F | A, C, NAT64_CLOSING | NAT64_FIN_CLIENT),
                (A, B, NAT64_CLOSING | NAT64_FIN_CLIENT),
                (F | A, B, both),
                (A, C, both | NAT64_CLOSED),
            ],
            // A reset, from either side.
            &[(A, C, 0), (R, B, reset)],
            &[(R | A, C, reset), (S | A, B, reset)],
        ];
        for (i, packets) in cases.iter().enumerate() {
            let mut state = 0;
            for (j, &(flags, from_client, want)) in packets.iter().enumerate() {
                state = track_tcp(state, flags, from_client);
                assert_eq!(state, want, "case {i}, packet {j}");
            }
        }
    }

    /// The timestamp option wherever stacks put it; none where there is none, where it
    /// is malformed or cut off, or past the steps looked at.
    #[test]
    fn tcp_tsval_finds_the_timestamp() {
        let ts = [8, 10, 0x12, 0x34, 0x56, 0x78, 0, 0, 0, 9];
        let linux_syn: Vec<u8> = [&[2, 4, 5, 0xb4, 4, 2][..], &ts, &[1, 3, 3, 7]].concat();
        let macos_syn: Vec<u8> =
            [&[2, 4, 5, 0xb4, 1, 3, 3, 6, 1, 1][..], &ts, &[4, 2, 0, 0]].concat();
        let later: Vec<u8> = [&[1, 1][..], &ts].concat();
        let read = |o: &[u8], len: usize| tcp_tsval(len, |i| o.get(i).copied());
        for (what, opts) in [
            ("Linux SYN", &linux_syn),
            ("macOS SYN", &macos_syn),
            ("later", &later),
        ] {
            assert_eq!(read(opts, opts.len()), Some(0x1234_5678), "{what}");
            // The packet cut short inside the TSval, or the header's length short of
            // the option.
            let at = opts.windows(2).position(|w| w == [8, 10]).expect("option");
            assert_eq!(read(&opts[..at + 5], opts.len()), None, "{what} cut");
            assert_eq!(read(opts, at + 9), None, "{what} short");
            assert_eq!(
                read(opts, at + 10),
                Some(0x1234_5678),
                "{what} just long enough"
            );
        }
        assert_eq!(read(&[], 0), None);
        assert_eq!(read(&[2, 4, 5, 0xb4], 4), None);
        assert_eq!(
            read(&[0, 0, 8, 10, 1, 2, 3, 4, 5, 6, 7, 8], 12),
            None,
            "after EOL"
        );
        assert_eq!(read(&[8, 9, 1, 2, 3, 4, 5, 6, 7], 12), None, "bad length");
        assert_eq!(
            read(&[3, 1, 8, 10, 1, 2, 3, 4, 5, 6, 7, 8], 12),
            None,
            "length < 2"
        );
        let nops: Vec<u8> = [&[1; TCP_OPTION_STEPS][..], &ts].concat();
        assert_eq!(read(&nops, nops.len()), None, "past the steps");
        assert_eq!(read(&nops[1..], nops.len() - 1), Some(0x1234_5678));
    }

    #[test]
    fn fin_end_and_seq_after_wrap() {
        assert_eq!(fin_end(100, 0), 101);
        assert_eq!(fin_end(100, 20), 121);
        assert_eq!(fin_end(u32::MAX, 0), 0);
        assert_eq!(fin_end(u32::MAX - 9, 20), 11);
        assert!(seq_after(101, 100) && !seq_after(100, 100) && !seq_after(99, 100));
        assert!(seq_after(5, u32::MAX - 5) && !seq_after(u32::MAX - 5, 5));
    }

    proptest! {
        #[test]
        fn candidates_stay_in_range(client in any::<[u8; 16]>(), port in any::<[u8; 2]>()) {
            let start = port_start(&client, port);
            prop_assert!(start < NAT64_PORT_COUNT);
            let mut seen = Vec::new();
            for n in 0..NAT64_PORT_TRIES {
                let p = port_candidate(start, n);
                prop_assert!(is_nat64_port(p));
                prop_assert!(!seen.contains(&p));
                seen.push(p);
            }
            prop_assert_eq!(port_candidate(start, 0), (NAT64_PORT_MIN + start).to_be_bytes());
        }

        #[test]
        fn ipv4_header_parses(
            tos in any::<u8>(), tot_len in 20u16.., ttl in any::<u8>(),
            proto in prop_oneof![Just(proto::TCP), Just(proto::UDP)],
            src in any::<[u8; 4]>(), dst in any::<[u8; 4]>(), junk in any::<u8>(),
        ) {
            let mut h = [junk; IPV6_HLEN];
            ipv4_header(&mut h, tos, tot_len, ttl, proto, src, dst);
            let (ip, _) = Ipv4Header::from_slice(&h[..IPV4_MIN_HLEN]).expect("etherparse reads the header");
            prop_assert_eq!(ip.header_checksum, ip.calc_header_checksum());
            prop_assert_eq!(csum::sum(&h[..IPV4_MIN_HLEN], 0), 0xffff);
            prop_assert_eq!(ip.total_len, tot_len);
            prop_assert_eq!(ip.time_to_live, ttl);
            prop_assert_eq!(ip.protocol, IpNumber(proto));
            prop_assert_eq!((ip.source, ip.destination), (src, dst));
            prop_assert_eq!((ip.dscp.value() << 2) | ip.ecn.value(), tos);
            prop_assert!(ip.dont_fragment && !ip.more_fragments);
            prop_assert_eq!(ip.fragment_offset.value(), 0);
            prop_assert_eq!(ip.identification, 0);
            prop_assert!(ip.options.is_empty());
            // The rest of the buffer is left alone.
            prop_assert!(h[IPV4_MIN_HLEN..].iter().all(|&b| b == junk));
        }

        #[test]
        fn ipv6_header_parses(
            tclass in any::<u8>(), len in any::<u16>(), hop in any::<u8>(),
            next in prop_oneof![Just(proto::TCP), Just(proto::UDP)],
            src in any::<[u8; 16]>(), dst in any::<[u8; 16]>(), junk in any::<u8>(),
        ) {
            let mut h = [junk; IPV6_HLEN];
            ipv6_header(&mut h, tclass, len, next, hop, &src, &dst);
            let (ip, rest) = Ipv6Header::from_slice(&h).expect("etherparse reads the header");
            prop_assert!(rest.is_empty());
            prop_assert_eq!(ip.traffic_class, tclass);
            prop_assert_eq!(ip.flow_label.value(), 0);
            prop_assert_eq!(ip.payload_length, len);
            prop_assert_eq!(ip.next_header, IpNumber(next));
            prop_assert_eq!(ip.hop_limit, hop);
            prop_assert_eq!((ip.source, ip.destination), (src, dst));
        }

        /// A checksum valid under the IPv6 pseudo-header, moved by `pseudo_diff` as
        /// `bpf_l4_csum_replace` (size 0) applies it, is valid under the IPv4 one; and
        /// the other way.
        #[test]
        fn pseudo_diff_moves_a_checksum_between_families(
            src6 in any::<[u8; 16]>(), dst6 in any::<[u8; 16]>(),
            src4 in any::<[u8; 4]>(), dst4 in any::<[u8; 4]>(),
            udp in any::<bool>(), segment in proptest::collection::vec(any::<u8>(), 8..64),
        ) {
            let l4 = if udp { proto::UDP } else { proto::TCP };
            let len = segment.len() as u16;
            let full6 = !csum::sum(&segment, csum::pseudo_header_v6(src6, dst6, l4, len as u32));
            let full4 = !csum::sum(&segment, csum::pseudo_header_v4(src4, dst4, l4, len));

            let to4 = apply(full6, pseudo_diff((&src6, &dst6), (&src4, &dst4)));
            prop_assert!(same(to4, full4), "{:#06x} {:#06x}", to4, full4);
            let to6 = apply(full4, pseudo_diff((&src4, &dst4), (&src6, &dst6)));
            prop_assert!(same(to6, full6), "{:#06x} {:#06x}", to6, full6);
        }

        #[test]
        fn pseudo_diff_of_no_change_changes_nothing(
            a in any::<[u8; 16]>(), b in any::<[u8; 16]>(), check in any::<u16>(),
        ) {
            prop_assert!(same(apply(check, pseudo_diff((&a, &b), (&a, &b))), check));
        }
    }

    /// The kernel's `inet_proto_csum_replace_by_diff`: `check` is the field as read
    /// big-endian; the helper works on it in memory order.
    fn apply(check: u16, diff: u64) -> u16 {
        let field = u16::from_ne_bytes(check.to_be_bytes());
        let mut s = (!field as u64) + diff;
        while s >> 16 != 0 {
            s = (s & 0xffff) + (s >> 16);
        }
        u16::from_be_bytes((!(s as u16)).to_ne_bytes())
    }

    /// Equal in one's complement (0 and 0xffff are both zero).
    fn same(a: u16, b: u16) -> bool {
        a == b || (a | b == 0xffff && (a == 0 || b == 0))
    }
}
