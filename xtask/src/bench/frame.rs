//! The frames the bench sends: TCP segments and an ARP request for the BPF_PROG_RUN costs
//! (`micro`), 64-byte UDP frames and TCP SYNs for the live-frames generator
//! (`work::udp64`, the SYN flood of `restart`). Every
//! checksum is valid, as from a wire, and computed with `portfwd_common::csum`, the
//! arithmetic the dataplane's own updates are tested against.

use std::net::{Ipv4Addr, Ipv6Addr};

use portfwd_common::{csum, proto};

/// The MACs of the BPF_PROG_RUN frames (the programs do not look at them).
const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];
const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
const ETH_IPV4: u16 = 0x0800;
const ETH_ARP: u16 = 0x0806;
const ETH_IPV6: u16 = 0x86dd;

fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// An IPv4 header (no options, DF, TTL 64) for `payload_len` bytes of `proto`, with its
/// checksum.
fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload_len: u16) -> [u8; 20] {
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(20 + payload_len).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = !csum::sum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip
}

/// The TCP or UDP checksum of `segment` (its checksum field zero), pseudo-header included.
fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, segment: &[u8]) -> u16 {
    let len = u16::try_from(segment.len()).unwrap_or(u16::MAX);
    let pseudo = csum::pseudo_header_v4(src.octets(), dst.octets(), proto, len);
    !csum::sum(segment, pseudo)
}

/// A TCP segment (PSH+ACK, 10 bytes of payload) with valid checksums.
pub fn tcp_frame(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let payload = b"0123456789";
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[8..12].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18; // PSH, ACK
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    tcp.extend_from_slice(payload);
    let c = l4_checksum(src, dst, proto::TCP, &tcp);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    let mut f = eth(DST_MAC, SRC_MAC, ETH_IPV4);
    f.extend_from_slice(&ipv4_header(src, dst, proto::TCP, tcp.len() as u16));
    f.extend_from_slice(&tcp);
    f
}

/// Ethernet + IPv4 + a TCP SYN (no payload), padded to 64 bytes, with valid checksums.
pub fn syn_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
) -> [u8; 64] {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let c = l4_checksum(src, dst, proto::TCP, &tcp);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    let mut f = [0u8; 64];
    f[..14].copy_from_slice(&eth(dst_mac, src_mac, ETH_IPV4));
    f[14..34].copy_from_slice(&ipv4_header(src, dst, proto::TCP, 20));
    f[34..54].copy_from_slice(&tcp);
    f
}

/// An ARP request from the client for the host (padded to the 60-byte minimum).
pub fn arp_frame(client: Ipv4Addr, host: Ipv4Addr) -> Vec<u8> {
    let mut f = eth(DST_MAC, SRC_MAC, ETH_ARP);
    // Ethernet, IPv4, 6-byte MACs, 4-byte addresses, request.
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&SRC_MAC);
    f.extend_from_slice(&client.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&host.octets());
    f.resize(60, 0);
    f
}

/// Ethernet + IPv4 + UDP, 64 bytes (22 bytes of payload), with valid checksums.
pub fn udp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
) -> [u8; 64] {
    const UDP_LEN: u16 = 30;
    let mut udp = [0u8; UDP_LEN as usize];
    udp[0..2].copy_from_slice(&sport.to_be_bytes());
    udp[2..4].copy_from_slice(&dport.to_be_bytes());
    udp[4..6].copy_from_slice(&UDP_LEN.to_be_bytes());
    for (i, b) in udp[8..].iter_mut().enumerate() {
        *b = i as u8;
    }
    // A computed zero is sent as 0xFFFF: zero means "no checksum" (RFC 768).
    let c = match l4_checksum(src, dst, proto::UDP, &udp) {
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    let mut f = [0u8; 64];
    f[..14].copy_from_slice(&eth(dst_mac, src_mac, ETH_IPV4));
    f[14..34].copy_from_slice(&ipv4_header(src, dst, proto::UDP, UDP_LEN));
    f[34..].copy_from_slice(&udp);
    f
}

/// Ethernet + IPv6 + UDP, 64 bytes (2 bytes of payload), hop limit 64, with a valid
/// checksum.
pub fn udp6_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    sport: u16,
    dport: u16,
) -> [u8; 64] {
    const UDP_LEN: u16 = 10;
    let mut udp = [0u8; UDP_LEN as usize];
    udp[0..2].copy_from_slice(&sport.to_be_bytes());
    udp[2..4].copy_from_slice(&dport.to_be_bytes());
    udp[4..6].copy_from_slice(&UDP_LEN.to_be_bytes());
    udp[8..].copy_from_slice(b"v6");
    let pseudo = csum::pseudo_header_v6(src.octets(), dst.octets(), proto::UDP, u32::from(UDP_LEN));
    // A computed zero is sent as 0xFFFF (IPv6 forbids a zero UDP checksum).
    let c = match !csum::sum(&udp, pseudo) {
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    let mut f = [0u8; 64];
    f[..14].copy_from_slice(&eth(dst_mac, src_mac, ETH_IPV6));
    f[14] = 0x60;
    f[18..20].copy_from_slice(&UDP_LEN.to_be_bytes());
    f[20] = proto::UDP;
    f[21] = 64;
    f[22..38].copy_from_slice(&src.octets());
    f[38..54].copy_from_slice(&dst.octets());
    f[54..].copy_from_slice(&udp);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
    const B: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);

    /// A valid checksum makes the sum over what it covers (itself included) all ones.
    fn verifies(f: &[u8], proto: u8) {
        assert_eq!(csum::sum(&f[14..34], 0), 0xffff, "IPv4 header checksum");
        let l4 = &f[34..];
        let pseudo = csum::pseudo_header_v4(A.octets(), B.octets(), proto, l4.len() as u16);
        assert_eq!(csum::sum(l4, pseudo), 0xffff, "L4 checksum");
    }

    #[test]
    fn checksums_verify() {
        let t = tcp_frame(A, 40_000, B, 9000);
        assert_eq!(t.len(), 14 + 20 + 30);
        verifies(&t, proto::TCP);
        let u = udp_frame([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], A, B, 40_000, 9000);
        verifies(&u, proto::UDP);
        assert_eq!(u16::from_be_bytes([u[16], u[17]]), 50, "IPv4 total length");
        assert_eq!(arp_frame(A, B).len(), 60);
        let s = syn_frame([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], A, B, 40_000, 9000);
        verifies(&s[..54], proto::TCP);
        assert_eq!(s[47], 0x02, "SYN");
    }

    #[test]
    fn udp6_checksum_verifies() {
        let (a, b) = (
            Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2),
            Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1),
        );
        let u = udp6_frame([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], a, b, 40_000, 9000);
        let pseudo = csum::pseudo_header_v6(a.octets(), b.octets(), proto::UDP, 10);
        assert_eq!(csum::sum(&u[54..], pseudo), 0xffff, "UDP checksum");
        assert_eq!(
            u16::from_be_bytes([u[18], u[19]]),
            10,
            "IPv6 payload length"
        );
    }
}
