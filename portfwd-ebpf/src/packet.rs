//! Header parsing over `[data, data_end)`: Ethernet (with at most one 802.1Q/802.1ad tag),
//! then IPv4 (any IHL, options skipped) or IPv6 (the fixed header only), then the TCP or
//! UDP ports. Every read is bounds-checked against `data_end` before it happens, so the
//! verifier accepts it and a truncated packet is a [`Reason::PassMalformed`], never an
//! out-of-bounds read.
//!
//! IPv6 extension headers are not walked: a Fragment header is a [`Reason::PassFragment`]
//! (as an IPv4 fragment is), any other extension header before the transport header a
//! [`Reason::PassIpv6ExtHeader`]; both go to the stack untouched. TCP and UDP from hosts
//! almost never carry one, and a bounded walk costs verifier complexity on every packet.

use portfwd_common::{proto, Reason};

use portfwd_common::packet::{
    is_ext_header, ETH_HLEN, ETH_PROTO_OFF, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6,
    IP6_DST_OFF, IP6_NEXT_OFF, IP6_SRC_OFF, IPV4_MIN_HLEN, IPV6_HLEN, IPV6_NH_FRAGMENT, IP_DST_OFF,
    IP_FRAG_MASK, IP_FRAG_OFF, IP_PROTO_OFF, IP_SRC_OFF, TCP_FLAGS_OFF, TCP_HLEN, UDP_HLEN,
    VLAN_HLEN,
};

pub use portfwd_common::packet::Flow;

/// An IPv4 packet's [`Flow`].
pub type Ipv4Flow = Flow<4>;
/// An IPv6 packet's [`Flow`].
pub type Ipv6Flow = Flow<16>;

/// Returns a pointer to `len` bytes at `off`, if they lie inside the packet.
#[inline(always)]
pub fn bytes_at(data: usize, data_end: usize, off: usize, len: usize) -> Option<*mut u8> {
    let start = data + off;
    if start + len > data_end {
        return None;
    }
    Some(start as *mut u8)
}

/// Reads `N` bytes at `p + at`.
///
/// # Safety
/// `p + at .. p + at + N` must be inside the packet (checked with [`bytes_at`]).
#[inline(always)]
pub unsafe fn read<const N: usize>(p: *const u8, at: usize) -> [u8; N] {
    // SAFETY: the caller guarantees `p + at .. p + at + N` is inside the packet.
    unsafe { core::ptr::read_unaligned(p.add(at) as *const [u8; N]) }
}

/// Writes `bytes` at `p`.
///
/// # Safety
/// `p .. p + N` must be inside the packet (checked with [`bytes_at`]).
#[inline(always)]
pub unsafe fn write<const N: usize>(p: *mut u8, bytes: &[u8; N]) {
    // SAFETY: the caller guarantees `p .. p + N` is inside the packet.
    unsafe { core::ptr::write_unaligned(p as *mut [u8; N], *bytes) }
}

/// The network layer of a frame, after Ethernet and at most one VLAN tag.
pub enum L3 {
    Ipv4 { ip_off: usize },
    Ipv6 { ip_off: usize },
}

/// Parses Ethernet; callers dispatch on the result: one branch for IPv4, as before IPv6
/// existed, and IPv6 only on the other side of it.
#[inline(always)]
pub fn parse_eth(data: usize, data_end: usize) -> Result<L3, Reason> {
    let eth = bytes_at(data, data_end, 0, ETH_HLEN).ok_or(Reason::PassMalformed)?;
    // SAFETY (both reads): `eth` and `tag` span the bytes read (checked just before).
    let mut ethertype = u16::from_be_bytes(unsafe { read(eth, ETH_PROTO_OFF) });
    let mut ip_off = ETH_HLEN;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let tag = bytes_at(data, data_end, ETH_HLEN, VLAN_HLEN).ok_or(Reason::PassMalformed)?;
        ethertype = u16::from_be_bytes(unsafe { read(tag, 2) });
        ip_off += VLAN_HLEN;
    }
    if ethertype == ETH_P_IP {
        Ok(L3::Ipv4 { ip_off })
    } else if ethertype == ETH_P_IPV6 {
        Ok(L3::Ipv6 { ip_off })
    } else {
        Err(Reason::PassNotIp)
    }
}

/// A TCP or UDP packet whose IP header and transport header lie inside the packet,
/// before its flow is read. `N` is the address length: 4 or 16.
///
/// Ingress and reply each settle most packets on one port (is the destination port
/// published? is the source port a backend's?) with one map read. Read before that
/// call, the rest of the flow had to outlive it: a dozen stack stores on every packet
/// the programs have nothing to do with. [`Headers::flow`] reads it after.
pub struct Headers<const N: usize> {
    /// The IP header (`IPV4_MIN_HLEN` or `IPV6_HLEN` bytes inside the packet).
    ip: *mut u8,
    /// The transport header (`TCP_HLEN` bytes for TCP, `UDP_HLEN` for UDP, inside).
    l4: *mut u8,
    ip_off: usize,
    l4_off: usize,
    /// `proto::TCP` or `proto::UDP`.
    pub proto: u8,
}

impl<const N: usize> Headers<N> {
    /// The destination port, network order.
    #[inline(always)]
    pub fn dport(&self) -> [u8; 2] {
        // SAFETY: the transport header's first 8 bytes are inside the packet.
        unsafe { read(self.l4, 2) }
    }

    /// The source port, network order.
    #[inline(always)]
    pub fn sport(&self) -> [u8; 2] {
        // SAFETY: as above.
        unsafe { read(self.l4, 0) }
    }

    /// The whole flow.
    #[inline(always)]
    pub fn flow(&self) -> Flow<N> {
        let (src_off, dst_off) = if N == 4 {
            (IP_SRC_OFF, IP_DST_OFF)
        } else {
            (IP6_SRC_OFF, IP6_DST_OFF)
        };
        // SAFETY: both addresses lie inside the IP header, which is inside the packet;
        // the TCP flags are read only for TCP, whose 20-byte header is inside.
        unsafe {
            Flow {
                ip_off: self.ip_off,
                l4_off: self.l4_off,
                proto: self.proto,
                src: read(self.ip, src_off),
                dst: read(self.ip, dst_off),
                sport: self.sport(),
                dport: self.dport(),
                tcp_flags: if self.proto == proto::TCP {
                    let [flags] = read::<1>(self.l4, TCP_FLAGS_OFF);
                    flags
                } else {
                    0
                },
            }
        }
    }
}

/// The [`Headers`] of an IPv4 packet whose header starts at `ip_off`.
#[inline(always)]
pub fn locate_ipv4(data: usize, data_end: usize, ip_off: usize) -> Result<Headers<4>, Reason> {
    let ip = bytes_at(data, data_end, ip_off, IPV4_MIN_HLEN).ok_or(Reason::PassMalformed)?;
    // SAFETY (every read of `ip` below): `ip` spans the 20-byte header (checked above).
    let [ver_ihl] = unsafe { read::<1>(ip, 0) };
    let ihl = ((ver_ihl & 0x0f) as usize) * 4;
    if ver_ihl >> 4 != 4 || ihl < IPV4_MIN_HLEN {
        return Err(Reason::PassMalformed);
    }
    if u16::from_be_bytes(unsafe { read(ip, IP_FRAG_OFF) }) & IP_FRAG_MASK != 0 {
        return Err(Reason::PassFragment);
    }
    let [l4_proto] = unsafe { read::<1>(ip, IP_PROTO_OFF) };
    let l4_hlen = match l4_proto {
        proto::TCP => TCP_HLEN,
        proto::UDP => UDP_HLEN,
        _ => return Err(Reason::PassNotTcpUdp),
    };
    let l4_off = ip_off + ihl;
    let l4 = bytes_at(data, data_end, l4_off, l4_hlen).ok_or(Reason::PassMalformed)?;
    Ok(Headers {
        ip,
        l4,
        ip_off,
        l4_off,
        proto: l4_proto,
    })
}

/// The [`Headers`] of an IPv6 packet whose header starts at `ip_off`.
#[inline(always)]
pub fn locate_ipv6(data: usize, data_end: usize, ip_off: usize) -> Result<Headers<16>, Reason> {
    let ip = bytes_at(data, data_end, ip_off, IPV6_HLEN).ok_or(Reason::PassMalformed)?;
    // SAFETY (both reads of `ip` below): `ip` spans the 40-byte header (checked above).
    let [ver] = unsafe { read::<1>(ip, 0) };
    if ver >> 4 != 6 {
        return Err(Reason::PassMalformed);
    }
    let [next] = unsafe { read::<1>(ip, IP6_NEXT_OFF) };
    let l4_hlen = match next {
        proto::TCP => TCP_HLEN,
        proto::UDP => UDP_HLEN,
        IPV6_NH_FRAGMENT => return Err(Reason::PassFragment),
        n if is_ext_header(n) => return Err(Reason::PassIpv6ExtHeader),
        _ => return Err(Reason::PassNotTcpUdp),
    };
    let l4_off = ip_off + IPV6_HLEN;
    let l4 = bytes_at(data, data_end, l4_off, l4_hlen).ok_or(Reason::PassMalformed)?;
    Ok(Headers {
        ip,
        l4,
        ip_off,
        l4_off,
        proto: next,
    })
}

/// An IPv4 packet's whole flow.
#[inline(always)]
pub fn parse_ipv4(data: usize, data_end: usize, ip_off: usize) -> Result<Ipv4Flow, Reason> {
    locate_ipv4(data, data_end, ip_off).map(|h| h.flow())
}

/// An IPv6 packet's whole flow.
#[inline(always)]
pub fn parse_ipv6(data: usize, data_end: usize, ip_off: usize) -> Result<Ipv6Flow, Reason> {
    locate_ipv6(data, data_end, ip_off).map(|h| h.flow())
}
