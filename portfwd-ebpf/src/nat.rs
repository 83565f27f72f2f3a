//! The translation itself, written once for every hook: `ingress` (destination NAT of a
//! published port) and `reply` (source NAT of the backend's answers). How the bytes and
//! checksums are written differs per hook and lives behind [`Packet`].
//!
//! Both families share the entry points: the parser branches once on the ethertype, and
//! each family has its own maps (`RULES_V4`/`RULES_V6`, ...). IPv6 has no header
//! checksum; its pseudo-header covers both addresses, so an address rewrite changes the
//! L4 checksum only. The fast path (FIB lookup and redirect) is IPv4-only: translated
//! IPv6 packets always take the kernel's routing.

use aya_ebpf::helpers::bpf_csum_diff;
use aya_ebpf::{
    bindings::BPF_F_PSEUDO_HDR,
    programs::{TcContext, XdpContext},
    EbpfContext,
};
use portfwd_common::{
    csum,
    packet::{
        may_start_flow, IP6_DST_OFF, IP6_SRC_OFF, IPV4_MIN_HLEN, IPV6_HLEN, IP_CSUM_OFF,
        IP_DST_OFF, IP_SRC_OFF, IP_TTL_OFF,
    },
    rules::{self, Caller},
    BackendV4, BackendV6, FlowKeyV4, FlowKeyV6, FlowV4, FlowV6, Reason, CONFIG_NO_NAT64,
};

use crate::{
    count, fastpath,
    maps::{self, Maps, CONNTRACK_V4, CONNTRACK_V6},
    nat64,
    packet::{bytes_at, parse_eth, parse_ipv4, parse_ipv6, Ipv4Flow, Ipv6Flow, L3},
};

pub enum Verdict {
    Pass,
    Drop,
    /// Send out of this interface (the fast path), via the hook's redirect.
    Redirect(u32),
    /// Send out of this interface with the kernel's neighbour lookup filling the MACs
    /// (`bpf_redirect_neigh`, TC only: NAT64).
    RedirectNeigh(u32),
}

/// Which end of the flow a rewrite changes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    Src,
    Dst,
}

/// A packet at some hook: its bounds, its length, and how to rewrite one end of it.
pub trait Packet {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    fn len(&self) -> u64;
    fn ctx_ptr(&self) -> *mut core::ffi::c_void;
    fn ingress_ifindex(&self) -> u32;
    /// Forwards the packet one hop as the kernel would: new MACs, TTL minus one.
    fn forward(&mut self, f: &Ipv4Flow, smac: [u8; 6], dmac: [u8; 6]) -> Result<(), ()>;
    /// Rewrites the address and port of `end`, updating the IPv4 and L4 checksums.
    fn rewrite(&mut self, f: &Ipv4Flow, end: End, addr: [u8; 4], port: [u8; 2]) -> Result<(), ()>;
    /// Rewrites the address and port of `end` of an IPv6 packet, updating the L4 checksum.
    fn rewrite_v6(
        &mut self,
        f: &Ipv6Flow,
        end: End,
        addr: [u8; 16],
        port: [u8; 2],
    ) -> Result<(), ()>;
    /// An IPv6 packet for an IPv4-only backend (held IPv4-mapped): NAT64 where the hook
    /// can change a packet's family, else passed (see `nat64`).
    fn nat64(&mut self, f: &Ipv6Flow, backend: &BackendV6) -> Verdict;
    /// An IPv4 packet that may be a reply of a NAT64 flow: translated back, or `None`.
    fn nat64_reply(&mut self, f: &Ipv4Flow) -> Option<Verdict>;
}

#[inline(always)]
/// `fast_path_bit`: the `CONFIG_FAST_PATH_*` bit that enables the fast path at this hook.
pub fn ingress<P: Packet>(pkt: &mut P, fast_path_bit: u64) -> Verdict {
    let (data, data_end) = (pkt.data(), pkt.data_end());
    let parsed = match parse_eth(data, data_end) {
        Ok(L3::Ipv4 { ip_off }) => {
            parse_ipv4(data, data_end, ip_off).map(|f| ingress_v4(pkt, f, fast_path_bit))
        }
        Ok(L3::Ipv6 { ip_off }) => {
            parse_ipv6(data, data_end, ip_off).map(|f| ingress_v6(pkt, f, fast_path_bit))
        }
        Err(reason) => Err(reason),
    };
    parsed.unwrap_or_else(|reason| {
        count(reason);
        Verdict::Pass
    })
}

#[inline(always)]
pub fn reply<P: Packet>(pkt: &mut P) -> Verdict {
    let (data, data_end) = (pkt.data(), pkt.data_end());
    let parsed = match parse_eth(data, data_end) {
        Ok(L3::Ipv4 { ip_off }) => parse_ipv4(data, data_end, ip_off).map(|f| reply_v4(pkt, f)),
        Ok(L3::Ipv6 { ip_off }) => parse_ipv6(data, data_end, ip_off).map(|f| reply_v6(pkt, f)),
        Err(reason) => Err(reason),
    };
    parsed.unwrap_or_else(|reason| {
        count(reason);
        Verdict::Pass
    })
}

#[inline(always)]
fn ingress_v4<P: Packet>(pkt: &mut P, flow: Ipv4Flow, fast_path_bit: u64) -> Verdict {
    // A NAT64 flow's reply, on the backend's interface: its port is no published one.
    if portfwd_common::nat64::is_nat64_port(flow.dport) {
        if let Some(v) = pkt.nat64_reply(&flow) {
            return v;
        }
    }
    let backend = match rules::lookup_ref(&Maps, Caller::Packet, &flow.dst, flow.dport, flow.proto)
    {
        Ok(b) => b,
        Err(reason) => {
            count(reason);
            return Verdict::Pass;
        }
    };
    record_flow(&flow, &backend);
    if pkt
        .rewrite(&flow, End::Dst, backend.addr_bytes(), backend.port_be())
        .is_err()
    {
        count(Reason::DropChecksum);
        return Verdict::Drop;
    }
    maps::count_rule(backend.stats_slot(), pkt.len(), false);
    count(Reason::Translated);
    let translated = Ipv4Flow {
        dst: backend.addr_bytes(),
        dport: backend.port_be(),
        ..flow
    };
    if maps::config().flags & fast_path_bit == 0 {
        return Verdict::Pass;
    }
    match fastpath::next_hop(pkt, &translated) {
        Some(hop) if pkt.forward(&translated, hop.smac, hop.dmac).is_ok() => {
            count(Reason::Redirected);
            Verdict::Redirect(hop.port_ifindex)
        }
        _ => {
            count(Reason::FastPathFallback);
            Verdict::Pass
        }
    }
}

#[inline(always)]
fn reply_v4<P: Packet>(pkt: &mut P, flow: Ipv4Flow) -> Verdict {
    let key = FlowKeyV4::new(flow.src, flow.sport, flow.dst, flow.dport, flow.proto);
    // SAFETY: the value is copied out at once; LRU entries may be evicted concurrently.
    let Some(tracked) = (unsafe { CONNTRACK_V4.get(&key) }).copied() else {
        count(Reason::PassNoFlow);
        return Verdict::Pass;
    };
    if pkt
        .rewrite(
            &flow,
            End::Src,
            tracked.host_addr_bytes(),
            tracked.host_port_be(),
        )
        .is_err()
    {
        count(Reason::DropChecksum);
        return Verdict::Drop;
    }
    maps::count_rule(tracked.stats_slot(), pkt.len(), true);
    count(Reason::ReplyTranslated);
    Verdict::Pass
}

/// Records the flow so that replies are translated back. Written once per flow: only a
/// packet that may start one (UDP, TCP SYN) is looked at, and an existing identical
/// entry is left alone (the egress lookups of replies keep it fresh in the LRU).
#[inline(always)]
fn record_flow(flow: &Ipv4Flow, backend: &BackendV4) {
    if !may_start_flow(flow.proto, flow.tcp_flags) {
        return;
    }
    let key = FlowKeyV4::new(
        backend.addr_bytes(),
        backend.port_be(),
        flow.src,
        flow.sport,
        flow.proto,
    );
    let value = FlowV4::new(flow.dst, flow.dport, backend.stats_slot());
    // SAFETY: compared by value at once.
    if let Some(existing) = unsafe { CONNTRACK_V4.get(&key) } {
        if *existing == value {
            return;
        }
    }
    if CONNTRACK_V4.insert(&key, &value, 0).is_err() {
        count(Reason::FlowInsertFailed);
    }
}

#[inline(always)]
fn ingress_v6<P: Packet>(pkt: &mut P, flow: Ipv6Flow, fast_path_bit: u64) -> Verdict {
    let backend = match rules::lookup_ref(&Maps, Caller::Packet, &flow.dst, flow.dport, flow.proto)
    {
        Ok(b) => b,
        Err(reason) => {
            count(reason);
            return Verdict::Pass;
        }
    };
    if backend.is_ipv4_mapped() {
        if maps::config().flags & CONFIG_NO_NAT64 != 0 {
            count(Reason::PassNoIpv6Backend);
            return Verdict::Pass;
        }
        return pkt.nat64(&flow, &backend);
    }
    record_flow_v6(&flow, &backend);
    if pkt
        .rewrite_v6(&flow, End::Dst, backend.addr_bytes(), backend.port_be())
        .is_err()
    {
        count(Reason::DropChecksum);
        return Verdict::Drop;
    }
    maps::count_rule(backend.stats_slot(), pkt.len(), false);
    count(Reason::Translated);
    // No IPv6 fast path: the kernel routes the translated packet.
    if maps::config().flags & fast_path_bit != 0 {
        count(Reason::FastPathFallback);
    }
    Verdict::Pass
}

#[inline(always)]
fn reply_v6<P: Packet>(pkt: &mut P, flow: Ipv6Flow) -> Verdict {
    let key = FlowKeyV6::new(flow.src, flow.sport, flow.dst, flow.dport, flow.proto);
    // SAFETY: the value is copied out at once; LRU entries may be evicted concurrently.
    let Some(tracked) = (unsafe { CONNTRACK_V6.get(&key) }).copied() else {
        count(Reason::PassNoFlow);
        return Verdict::Pass;
    };
    if pkt
        .rewrite_v6(
            &flow,
            End::Src,
            tracked.host_addr_bytes(),
            tracked.host_port_be(),
        )
        .is_err()
    {
        count(Reason::DropChecksum);
        return Verdict::Drop;
    }
    maps::count_rule(tracked.stats_slot(), pkt.len(), true);
    count(Reason::ReplyTranslated);
    Verdict::Pass
}

/// As [`record_flow`], for IPv6.
#[inline(always)]
fn record_flow_v6(flow: &Ipv6Flow, backend: &BackendV6) {
    if !may_start_flow(flow.proto, flow.tcp_flags) {
        return;
    }
    let key = FlowKeyV6::new(
        backend.addr_bytes(),
        backend.port_be(),
        flow.src,
        flow.sport,
        flow.proto,
    );
    let value = FlowV6::new(flow.dst, flow.dport, backend.stats_slot());
    // SAFETY: compared by value at once.
    if let Some(existing) = unsafe { CONNTRACK_V6.get(&key) } {
        if *existing == value {
            return;
        }
    }
    if CONNTRACK_V6.insert(&key, &value, 0).is_err() {
        count(Reason::FlowInsertFailed);
    }
}

/// Offsets (from the start of the IPv6 header, and of the L4 header) of `end`'s address
/// and port.
#[inline(always)]
fn v6_field_offsets(end: End) -> (usize, usize) {
    match end {
        End::Src => (IP6_SRC_OFF, 0),
        End::Dst => (IP6_DST_OFF, 2),
    }
}

#[inline(always)]
fn field_offsets(f: &Ipv4Flow, end: End) -> (usize, usize) {
    match end {
        End::Src => (f.ip_off + IP_SRC_OFF, f.l4_off),
        End::Dst => (f.ip_off + IP_DST_OFF, f.l4_off + 2),
    }
}

/// XDP: frames arrive with complete checksums (as from a wire), so both checksums are
/// updated incrementally in place (RFC 1624) with direct packet writes.
pub struct XdpPacket<'a> {
    ctx: &'a XdpContext,
}

impl<'a> XdpPacket<'a> {
    #[inline(always)]
    pub fn new(ctx: &'a XdpContext) -> Self {
        Self { ctx }
    }
}

impl Packet for XdpPacket<'_> {
    #[inline(always)]
    fn nat64(&mut self, _: &Ipv6Flow, _: &BackendV6) -> Verdict {
        // XDP cannot change a packet's family (no bpf_skb_change_proto): TC can.
        count(Reason::PassNoIpv6Backend);
        Verdict::Pass
    }
    #[inline(always)]
    fn nat64_reply(&mut self, _: &Ipv4Flow) -> Option<Verdict> {
        None
    }
    #[inline(always)]
    fn data(&self) -> usize {
        self.ctx.data()
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        self.ctx.data_end()
    }
    #[inline(always)]
    fn len(&self) -> u64 {
        (self.ctx.data_end() - self.ctx.data()) as u64
    }
    #[inline(always)]
    fn ctx_ptr(&self) -> *mut core::ffi::c_void {
        self.ctx.as_ptr()
    }
    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        self.ctx.ingress_ifindex() as u32
    }

    #[inline(always)]
    fn forward(&mut self, f: &Ipv4Flow, smac: [u8; 6], dmac: [u8; 6]) -> Result<(), ()> {
        let (data, data_end) = (self.data(), self.data_end());
        let eth = bytes_at(data, data_end, 0, 12).ok_or(())?;
        let ip = bytes_at(data, data_end, f.ip_off, IPV4_MIN_HLEN).ok_or(())?;
        // SAFETY: 12 bytes of Ethernet and 20 of IPv4 header are inside the packet.
        unsafe {
            write(eth, &dmac);
            write(eth.add(6), &smac);
            let (ttl, l4) = (*ip.add(IP_TTL_OFF), *ip.add(IP_TTL_OFF + 1));
            let check = u16::from_be_bytes([*ip.add(IP_CSUM_OFF), *ip.add(IP_CSUM_OFF + 1)]);
            let check = csum::replace2(
                check,
                u16::from_be_bytes([ttl, l4]),
                u16::from_be_bytes([ttl - 1, l4]),
            );
            *ip.add(IP_TTL_OFF) = ttl - 1;
            write(ip.add(IP_CSUM_OFF), &check.to_be_bytes());
        }
        Ok(())
    }

    #[inline(always)]
    fn rewrite(&mut self, f: &Ipv4Flow, end: End, addr: [u8; 4], port: [u8; 2]) -> Result<(), ()> {
        let (data, data_end) = (self.data(), self.data_end());
        let ip = bytes_at(data, data_end, f.ip_off, IPV4_MIN_HLEN).ok_or(())?;
        let l4 = bytes_at(data, data_end, f.l4_off, f.l4_hlen()).ok_or(())?;
        let (old_addr, old_port) = match end {
            End::Src => (f.src, f.sport),
            End::Dst => (f.dst, f.dport),
        };
        let (addr_at, port_at) = match end {
            End::Src => (IP_SRC_OFF, 0),
            End::Dst => (IP_DST_OFF, 2),
        };
        let l4_csum_at = f.l4_csum_off() - f.l4_off;
        // SAFETY: `ip` spans 20 bytes and `l4` the whole L4 header (checked above); every
        // offset below is inside them.
        unsafe {
            let ip_check = u16::from_be_bytes([*ip.add(IP_CSUM_OFF), *ip.add(IP_CSUM_OFF + 1)]);
            let ip_check = csum::replace4(ip_check, old_addr, addr);
            write(ip.add(IP_CSUM_OFF), &ip_check.to_be_bytes());
            write(ip.add(addr_at), &addr);

            let l4_check = u16::from_be_bytes([*l4.add(l4_csum_at), *l4.add(l4_csum_at + 1)]);
            let l4_check = csum::l4_update(
                l4_check,
                old_addr,
                addr,
                u16::from_be_bytes(old_port),
                u16::from_be_bytes(port),
                f.is_udp(),
            );
            write(l4.add(l4_csum_at), &l4_check.to_be_bytes());
            write(l4.add(port_at), &port);
        }
        Ok(())
    }

    #[inline(always)]
    fn rewrite_v6(
        &mut self,
        f: &Ipv6Flow,
        end: End,
        addr: [u8; 16],
        port: [u8; 2],
    ) -> Result<(), ()> {
        let (data, data_end) = (self.data(), self.data_end());
        let ip = bytes_at(data, data_end, f.ip_off, IPV6_HLEN).ok_or(())?;
        let l4 = bytes_at(data, data_end, f.l4_off, f.l4_hlen()).ok_or(())?;
        let (old_addr, old_port) = match end {
            End::Src => (f.src, f.sport),
            End::Dst => (f.dst, f.dport),
        };
        let (addr_at, port_at) = v6_field_offsets(end);
        let l4_csum_at = f.l4_csum_off() - f.l4_off;
        // SAFETY: `ip` spans the 40-byte IPv6 header and `l4` the whole L4 header
        // (checked above); every offset below is inside them.
        unsafe {
            write(ip.add(addr_at), &addr);
            let l4_check = u16::from_be_bytes([*l4.add(l4_csum_at), *l4.add(l4_csum_at + 1)]);
            let l4_check = csum::l4_update_v6(
                l4_check,
                old_addr,
                addr,
                u16::from_be_bytes(old_port),
                u16::from_be_bytes(port),
                f.is_udp(),
            );
            write(l4.add(l4_csum_at), &l4_check.to_be_bytes());
            write(l4.add(port_at), &port);
        }
        Ok(())
    }
}

#[inline(always)]
unsafe fn write<const N: usize>(p: *mut u8, bytes: &[u8; N]) {
    let mut i = 0;
    while i < N {
        // SAFETY: the caller guarantees `p .. p + N` is inside the packet.
        unsafe { *p.add(i) = bytes[i] };
        i += 1;
    }
}

/// TC: an skb may carry a partial (offloaded) checksum or a complete one; the kernel's
/// checksum helpers keep every case right (`BPF_F_PSEUDO_HDR` for the address, which the
/// pseudo-header covers), so the TC side uses them instead of plain arithmetic.
pub struct TcPacket<'a> {
    ctx: &'a TcContext,
}

/// Enough linear bytes for Ethernet + VLAN + the longest IPv4 header + TCP (more than
/// Ethernet + VLAN + IPv6 + TCP).
const TC_LINEAR_WANT: u32 = 14 + 4 + 60 + 20;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;
/// `bpf_l4_csum_replace` on IPv6 (include/uapi/linux/bpf.h, 6.16+; not in aya's bindings).
const BPF_F_IPV6: u64 = 1 << 7;

impl<'a> TcPacket<'a> {
    #[inline(always)]
    pub fn new(ctx: &'a TcContext) -> Self {
        // Headers may sit in paged data (GRO, tunnels): make them linear when they are not.
        let linear = (ctx.data_end() - ctx.data()) as u32;
        let want = if ctx.len() < TC_LINEAR_WANT {
            ctx.len()
        } else {
            TC_LINEAR_WANT
        };
        if linear < want {
            let _ = ctx.pull_data(want);
        }
        Self { ctx }
    }
}

impl Packet for TcPacket<'_> {
    #[inline(always)]
    fn nat64(&mut self, _: &Ipv6Flow, _: &BackendV6) -> Verdict {
        nat64::tail_call(self.ctx)
    }
    #[inline(always)]
    fn nat64_reply(&mut self, f: &Ipv4Flow) -> Option<Verdict> {
        nat64::is_reply(f).then(|| nat64::tail_call(self.ctx))
    }
    #[inline(always)]
    fn data(&self) -> usize {
        self.ctx.data()
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        self.ctx.data_end()
    }
    #[inline(always)]
    fn len(&self) -> u64 {
        self.ctx.len() as u64
    }
    #[inline(always)]
    fn ctx_ptr(&self) -> *mut core::ffi::c_void {
        self.ctx.as_ptr()
    }
    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        nat64::ingress_ifindex(self.ctx)
    }

    #[inline(always)]
    fn forward(&mut self, f: &Ipv4Flow, smac: [u8; 6], dmac: [u8; 6]) -> Result<(), ()> {
        let c = self.ctx;
        let ttl: u8 = c.load(f.ip_off + IP_TTL_OFF).map_err(|_| ())?;
        let l4: u8 = c.load(f.ip_off + IP_TTL_OFF + 1).map_err(|_| ())?;
        let old = u16::from_ne_bytes([ttl, l4]) as u64;
        let new = u16::from_ne_bytes([ttl - 1, l4]) as u64;
        c.l3_csum_replace(f.ip_off + IP_CSUM_OFF, old, new, 2)
            .map_err(|_| ())?;
        c.store(f.ip_off + IP_TTL_OFF, &(ttl - 1), 0)
            .map_err(|_| ())?;
        c.store(0, &dmac, 0).map_err(|_| ())?;
        c.store(6, &smac, 0).map_err(|_| ())?;
        Ok(())
    }

    #[inline(always)]
    fn rewrite(&mut self, f: &Ipv4Flow, end: End, addr: [u8; 4], port: [u8; 2]) -> Result<(), ()> {
        let (old_addr, old_port) = match end {
            End::Src => (f.src, f.sport),
            End::Dst => (f.dst, f.dport),
        };
        let (addr_off, port_off) = field_offsets(f, end);
        let (data, data_end) = (self.data(), self.data_end());
        let ip = bytes_at(data, data_end, f.ip_off, IPV4_MIN_HLEN).ok_or(())?;
        let l4 = bytes_at(data, data_end, f.l4_off, f.l4_hlen()).ok_or(())?;
        // The IPv4 header checksum is never offloaded: update it in place (RFC 1624),
        // and write the new address and port directly.
        // SAFETY: `ip` spans 20 bytes and `l4` the whole L4 header (checked above).
        unsafe {
            let check = u16::from_be_bytes([*ip.add(IP_CSUM_OFF), *ip.add(IP_CSUM_OFF + 1)]);
            write(
                ip.add(IP_CSUM_OFF),
                &csum::replace4(check, old_addr, addr).to_be_bytes(),
            );
            write(ip.add(addr_off - f.ip_off), &addr);
            write(l4.add(port_off - f.l4_off), &port);
        }
        // The L4 checksum may be partial (offloaded) or complete: the helpers handle
        // both, and keep skb->csum right. The address is in the pseudo-header.
        let l4_csum = f.l4_csum_off();
        let mangled = if f.is_udp() { BPF_F_MARK_MANGLED_0 } else { 0 };
        let (old_a, new_a) = (
            u32::from_ne_bytes(old_addr) as u64,
            u32::from_ne_bytes(addr) as u64,
        );
        let (old_p, new_p) = (
            u16::from_ne_bytes(old_port) as u64,
            u16::from_ne_bytes(port) as u64,
        );
        let c = self.ctx;
        c.l4_csum_replace(l4_csum, old_a, new_a, BPF_F_PSEUDO_HDR as u64 | mangled | 4)
            .map_err(|_| ())?;
        c.l4_csum_replace(l4_csum, old_p, new_p, mangled | 2)
            .map_err(|_| ())?;
        Ok(())
    }

    #[inline(always)]
    fn rewrite_v6(
        &mut self,
        f: &Ipv6Flow,
        end: End,
        addr: [u8; 16],
        port: [u8; 2],
    ) -> Result<(), ()> {
        let (old_addr, old_port) = match end {
            End::Src => (f.src, f.sport),
            End::Dst => (f.dst, f.dport),
        };
        let (addr_at, port_at) = v6_field_offsets(end);
        let (data, data_end) = (self.data(), self.data_end());
        let ip = bytes_at(data, data_end, f.ip_off, IPV6_HLEN).ok_or(())?;
        let l4 = bytes_at(data, data_end, f.l4_off, f.l4_hlen()).ok_or(())?;
        // SAFETY: `ip` spans the IPv6 header and `l4` the whole L4 header (checked above).
        unsafe {
            write(ip.add(addr_at), &addr);
            write(l4.add(port_at), &port);
        }
        // The 16-byte address change as one checksum difference (bpf_csum_diff), applied
        // with size 0 ("`to` is a diff"); the pseudo-header flag keeps a partial
        // (offloaded) checksum and skb->csum right, as for IPv4.
        let mut from = words(old_addr);
        let mut to = words(addr);
        // SAFETY: both buffers are 16 bytes on our stack, sizes multiples of 4.
        let diff = unsafe { bpf_csum_diff(from.as_mut_ptr(), 16, to.as_mut_ptr(), 16, 0) };
        if diff < 0 {
            return Err(());
        }
        let l4_csum = f.l4_csum_off();
        let mangled = if f.is_udp() { BPF_F_MARK_MANGLED_0 } else { 0 };
        let (old_p, new_p) = (
            u16::from_ne_bytes(old_port) as u64,
            u16::from_ne_bytes(port) as u64,
        );
        let c = self.ctx;
        // BPF_F_IPV6 (6.16+): the address change is not compensated by an IP header
        // checksum, so skb->csum (CHECKSUM_COMPLETE) must be left alone. Kernels without
        // the flag refuse it (EINVAL) before touching anything: retry without it there.
        let flags = BPF_F_PSEUDO_HDR as u64 | mangled;
        let diff = diff as u32 as u64;
        if c.l4_csum_replace(l4_csum, 0, diff, flags | BPF_F_IPV6)
            .is_err()
        {
            c.l4_csum_replace(l4_csum, 0, diff, flags).map_err(|_| ())?;
        }
        c.l4_csum_replace(l4_csum, old_p, new_p, mangled | 2)
            .map_err(|_| ())?;
        Ok(())
    }
}

/// An address as the 32-bit words `bpf_csum_diff` reads (memory order kept).
#[inline(always)]
fn words(a: [u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}
