//! Header layouts the kernel programs parse and rewrite: Ethernet (with at most one
//! 802.1Q/802.1ad tag), IPv4, IPv6 (the fixed header), TCP and UDP. Offsets are from
//! the start of their own header; multi-byte fields are in network order on the wire.
//!
//! IPv6 extension headers are not walked by the kernel: [`is_ext_header`] names the
//! ones that make a packet pass untouched, and [`IPV6_NH_FRAGMENT`] the one counted as
//! a fragment (RFC 8200 and IANA's "IPv6 Extension Header Types").

use crate::proto;

/// Ethernet header length (no tag).
pub const ETH_HLEN: usize = 14;
/// Offset of the ethertype in the Ethernet header.
pub const ETH_PROTO_OFF: usize = 12;
/// Length of one 802.1Q/802.1ad tag.
pub const VLAN_HLEN: usize = 4;
/// Ethertype of IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// Ethertype of IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd;
/// Ethertype of an 802.1Q VLAN tag.
pub const ETH_P_8021Q: u16 = 0x8100;
/// Ethertype of an 802.1ad (QinQ outer) tag.
pub const ETH_P_8021AD: u16 = 0x88a8;

/// IPv4 header length without options.
pub const IPV4_MIN_HLEN: usize = 20;
/// Fragment offset and "more fragments": any set bit means the packet is a fragment.
pub const IP_FRAG_MASK: u16 = 0x3fff;
/// IPv4 "don't fragment", in the high byte of the flags/offset field.
pub const IP_DF: u8 = 0x40;
/// IPv4 total-length offset.
pub const IP_TOT_LEN_OFF: usize = 2;
/// IPv4 flags and fragment offset.
pub const IP_FRAG_OFF: usize = 6;
/// IPv4 TTL offset (the protocol byte follows it).
pub const IP_TTL_OFF: usize = 8;
/// IPv4 protocol offset.
pub const IP_PROTO_OFF: usize = 9;
/// IPv4 header checksum offset.
pub const IP_CSUM_OFF: usize = 10;
/// IPv4 source address offset.
pub const IP_SRC_OFF: usize = 12;
/// IPv4 destination address offset.
pub const IP_DST_OFF: usize = 16;

/// IPv6 fixed header length.
pub const IPV6_HLEN: usize = 40;
/// IPv6 payload length offset.
pub const IP6_PLEN_OFF: usize = 4;
/// IPv6 next-header offset.
pub const IP6_NEXT_OFF: usize = 6;
/// IPv6 hop limit offset.
pub const IP6_HOP_LIMIT_OFF: usize = 7;
/// IPv6 source address offset.
pub const IP6_SRC_OFF: usize = 8;
/// IPv6 destination address offset.
pub const IP6_DST_OFF: usize = 24;
/// IPv6 next-header value of the Fragment header.
pub const IPV6_NH_FRAGMENT: u8 = 44;
/// IPv6 next-header values of the other extension headers (Fragment is
/// [`IPV6_NH_FRAGMENT`]).
pub const IPV6_EXT_HEADERS: [u8; 9] = [0, 43, 50, 51, 60, 135, 139, 140, 253];

/// TCP header length without options.
pub const TCP_HLEN: usize = 20;
/// UDP header length.
pub const UDP_HLEN: usize = 8;
/// TCP checksum offset.
pub const TCP_CSUM_OFF: usize = 16;
/// UDP checksum offset.
pub const UDP_CSUM_OFF: usize = 6;
/// TCP data offset (header length in 32-bit words, high nibble) byte offset.
pub const TCP_DOFF_OFF: usize = 12;
/// Offset of the TCP sequence number in the TCP header.
pub const TCP_SEQ_OFF: usize = 4;
/// TCP flags byte offset.
pub const TCP_FLAGS_OFF: usize = 13;
/// TCP FIN flag.
pub const TCP_FIN: u8 = 0x01;
/// TCP SYN flag.
pub const TCP_SYN: u8 = 0x02;
/// TCP RST flag.
pub const TCP_RST: u8 = 0x04;
/// TCP ACK flag.
pub const TCP_ACK: u8 = 0x10;

/// Whether `next` is an IPv6 extension header other than Fragment.
#[inline(always)]
pub fn is_ext_header(next: u8) -> bool {
    // A counted loop, not an iterator: the kernel build keeps it bounded and unrolled.
    let mut i = 0;
    while i < IPV6_EXT_HEADERS.len() {
        if IPV6_EXT_HEADERS[i] == next {
            return true;
        }
        i += 1;
    }
    false
}

/// Whether this packet may start a flow: any UDP datagram, or a TCP SYN without ACK.
/// Flow state is written only for these, so an established TCP flow costs no conntrack
/// work at ingress (its replies keep the entry fresh in the LRU).
#[inline(always)]
pub fn may_start_flow(proto: u8, tcp_flags: u8) -> bool {
    proto != proto::TCP || tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// Whether a backend's packet on an embryonic flow proves the flow real, promoting it
/// to the established table: a spoofed client never ACKs the backend's SYN-ACK, so
/// until the handshake completes the backend sends only SYN-ACKs and RSTs. Any UDP
/// answer promotes (UDP has no handshake: the backend's first reply is the proof).
#[inline(always)]
pub fn promotes(proto: u8, tcp_flags: u8) -> bool {
    proto != proto::TCP || tcp_flags & (TCP_SYN | TCP_RST) == 0
}

/// Offset of the L4 checksum field in a TCP or UDP header.
#[inline(always)]
pub fn l4_csum_off(proto: u8) -> usize {
    if proto == proto::UDP {
        UDP_CSUM_OFF
    } else {
        TCP_CSUM_OFF
    }
}

/// What the translation needs of a TCP or UDP packet, as parsed by the kernel's parser
/// and the model's alike: offsets from the start of the frame and the fields, in network
/// order. `N` is the address length: 4 or 16.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow<const N: usize> {
    /// Where the IP header starts.
    pub ip_off: usize,
    /// Where the TCP/UDP header starts.
    pub l4_off: usize,
    /// `proto::TCP` or `proto::UDP`.
    pub proto: u8,
    /// Source address.
    pub src: [u8; N],
    /// Destination address.
    pub dst: [u8; N],
    /// Source port.
    pub sport: [u8; 2],
    /// Destination port.
    pub dport: [u8; 2],
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
}

impl<const N: usize> Flow<N> {
    /// Whether the transport is UDP (else TCP).
    #[inline(always)]
    pub fn is_udp(&self) -> bool {
        self.proto == proto::UDP
    }
    /// Offset of the L4 checksum field in the frame.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        self.l4_off + l4_csum_off(self.proto)
    }
    /// Bytes of L4 header that must be present.
    #[inline(always)]
    pub fn l4_hlen(&self) -> usize {
        if self.is_udp() {
            UDP_HLEN
        } else {
            TCP_HLEN
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn extension_headers() {
        for nh in [0u8, 43, 50, 51, 60, 135, 139, 140, 253] {
            assert!(is_ext_header(nh), "{nh}");
        }
        for nh in [
            IPV6_NH_FRAGMENT,
            proto::TCP,
            proto::UDP,
            58,
            59,
            1,
            254,
            255,
        ] {
            assert!(!is_ext_header(nh), "{nh}");
        }
    }

    #[test]
    fn flow_starts() {
        // (proto, flags, starts)
        let table = [
            (proto::UDP, 0, true),
            (proto::UDP, TCP_ACK, true),
            (proto::TCP, TCP_SYN, true),
            (proto::TCP, TCP_SYN | TCP_FIN, true),
            (proto::TCP, TCP_SYN | TCP_ACK, false),
            (proto::TCP, TCP_ACK, false),
            (proto::TCP, 0, false),
            (proto::TCP, TCP_RST, false),
        ];
        for (p, flags, starts) in table {
            assert_eq!(may_start_flow(p, flags), starts, "{p} {flags:#x}");
        }
    }

    #[test]
    fn checksum_offsets() {
        assert_eq!(l4_csum_off(proto::UDP), UDP_CSUM_OFF);
        assert_eq!(l4_csum_off(proto::TCP), TCP_CSUM_OFF);
    }

    #[test]
    fn what_promotes() {
        let table = [
            (proto::UDP, 0, true),
            (proto::TCP, TCP_ACK, true),
            (proto::TCP, TCP_ACK | TCP_FIN, true),
            (proto::TCP, TCP_SYN | TCP_ACK, false),
            (proto::TCP, TCP_RST, false),
            (proto::TCP, TCP_RST | TCP_ACK, false),
            (proto::TCP, TCP_SYN, false),
        ];
        for (p, flags, yes) in table {
            assert_eq!(promotes(p, flags), yes, "{p} {flags:#x}");
        }
    }

    proptest! {
        #[test]
        fn tcp_starts_only_on_a_bare_syn(flags in any::<u8>()) {
            let syn = flags & TCP_SYN != 0 && flags & TCP_ACK == 0;
            prop_assert_eq!(may_start_flow(proto::TCP, flags), syn);
            prop_assert!(may_start_flow(proto::UDP, flags));
        }
    }
}
