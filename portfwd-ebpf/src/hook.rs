//! The hooks' side of a packet: what the translation in `nat.rs` and `nat64.rs` asks of
//! it ([`Packet`]: bounds, rewrites, forwarding) and gives back ([`Verdict`]), for XDP
//! ([`XdpPacket`]: direct writes, checksums updated in place) and TC ([`TcPacket`]: the
//! kernel's checksum helpers, which keep offloaded checksums and `skb->csum` right).
//!
//! Rewrites fail with a [`RewriteError`]; the translation maps it to the reason it
//! counts.

use aya_ebpf::helpers::bpf_csum_diff;
use aya_ebpf::{
    bindings::BPF_F_PSEUDO_HDR,
    programs::{TcContext, XdpContext},
    EbpfContext,
};
use portfwd_common::{
    csum, kctx,
    packet::{
        IP6_DST_OFF, IP6_HOP_LIMIT_OFF, IP6_PLEN_OFF, IP6_SRC_OFF, IPV4_MIN_HLEN, IPV6_HLEN,
        IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, IP_TOT_LEN_OFF, IP_TTL_OFF,
    },
    BackendV6, FlowKeyV4, Reason,
};

use crate::{
    maps::{self, count},
    packet::{bytes_at, write, Ipv4Flow, Ipv6Flow},
};

/// What the hook does with the packet; `main.rs` maps it to the hook's action.
pub enum Verdict {
    /// On to the kernel (TC: the next program on the hook).
    Pass,
    /// Dropped (a rewrite failed half-way).
    Drop,
    /// Send out of this interface (the fast path), via the hook's redirect.
    Redirect(u32),
    /// Hand to the peer of this veth, in its own namespace (the fast path at TC:
    /// `bpf_redirect_peer`); XDP, which has no such redirect, sends it out of the veth.
    RedirectPeer(u32),
    /// Send out of this interface with the kernel's neighbour lookup filling the MACs
    /// (`bpf_redirect_neigh`, TC only: NAT64).
    RedirectNeigh(u32),
}

/// Why a rewrite of the packet failed.
#[derive(Clone, Copy)]
pub enum RewriteError {
    /// The bytes to rewrite are not inside the packet's linear data.
    OutOfBounds,
    /// A kernel helper (load, store, checksum replace or difference) refused.
    Helper,
}

impl RewriteError {
    /// The reason counted when a translation's rewrite fails (the packet is dropped: it
    /// may be half-written, its checksum wrong).
    #[inline(always)]
    pub fn reason(self) -> Reason {
        match self {
            RewriteError::OutOfBounds => Reason::DropChecksum,
            RewriteError::Helper => Reason::DropChecksum,
        }
    }
}

/// Which end of the flow a rewrite changes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The source (replies: the backend becomes the published address).
    Src,
    /// The destination (ingress: the published address becomes the backend).
    Dst,
}

/// A packet at some hook: its bounds, its length, and how to rewrite one end of it.
pub trait Packet {
    /// Start of the linear packet data.
    fn data(&self) -> usize;
    /// End of the linear packet data.
    fn data_end(&self) -> usize;
    /// The packet's whole length (rule byte counters).
    fn len(&self) -> u64;
    /// The program context, for helpers.
    fn ctx_ptr(&self) -> *mut core::ffi::c_void;
    /// The interface the packet arrived on.
    fn ingress_ifindex(&self) -> u32;
    /// Forwards the packet one hop as the kernel would: new MACs, TTL minus one.
    fn forward(&mut self, f: &Ipv4Flow, smac: [u8; 6], dmac: [u8; 6]) -> Result<(), RewriteError>;
    /// The same for IPv6: new MACs, hop limit minus one (no header checksum).
    fn forward_v6(
        &mut self,
        f: &Ipv6Flow,
        smac: [u8; 6],
        dmac: [u8; 6],
    ) -> Result<(), RewriteError>;
    /// Rewrites the address and port of `end`, updating the IPv4 and L4 checksums.
    fn rewrite(
        &mut self,
        f: &Ipv4Flow,
        end: End,
        addr: [u8; 4],
        port: [u8; 2],
    ) -> Result<(), RewriteError>;
    /// Rewrites the address and port of `end` of an IPv6 packet, updating the L4 checksum.
    fn rewrite_v6(
        &mut self,
        f: &Ipv6Flow,
        end: End,
        addr: [u8; 16],
        port: [u8; 2],
    ) -> Result<(), RewriteError>;
    /// Whether the packet, as rewritten, may take the fast path (redirect). False for a
    /// partial (offloaded) checksum at XDP (see [`XdpPacket`]).
    #[inline(always)]
    fn may_redirect(&self) -> bool {
        true
    }
    /// An IPv6 packet for an IPv4-only backend (held IPv4-mapped): NAT64 where the hook
    /// can change a packet's family, else passed (see `nat64`).
    fn nat64(&mut self, f: &Ipv6Flow, backend: &BackendV6) -> Verdict;
    /// An IPv4 packet that may be a reply of a NAT64 flow: translated back, or `None`.
    fn nat64_reply(&mut self, f: &Ipv4Flow) -> Option<Verdict>;
}

/// `data`, which the kernel starts on an even address (`NET_IP_ALIGN`, XDP's headroom),
/// said to the compiler: header fields at even offsets are then read and written 16 bits
/// at a time, not byte by byte (the verifier takes packet loads of any alignment here).
#[inline(always)]
fn even(data: usize) -> usize {
    // SAFETY: the kernel starts packet data 2-aligned (headroom and header lengths are
    // even); were one not, the only effect is 16-bit loads at odd addresses, which the
    // verifier allows where misaligned access is efficient (x86, arm64) and executes.
    unsafe { core::hint::assert_unchecked(data % 2 == 0) };
    data
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

/// Offsets (from the start of the packet) of `end`'s IPv4 address and port.
#[inline(always)]
fn field_offsets(f: &Ipv4Flow, end: End) -> (usize, usize) {
    match end {
        End::Src => (f.ip_off + IP_SRC_OFF, f.l4_off),
        End::Dst => (f.ip_off + IP_DST_OFF, f.l4_off + 2),
    }
}

/// XDP: checksums updated in place with direct packet writes: a complete one
/// incrementally (RFC 1624) for address and port; a partial one for the address only.
///
/// A frame from a wire has a complete checksum; one sent by a local stack with checksum
/// offload on (over a veth, a tap) or merged by GRO (generic XDP runs after it) is
/// `CHECKSUM_PARTIAL`: its L4 checksum field holds the folded pseudo-header sum only,
/// and the kernel or NIC completes it later over the segment, ports included. Such a
/// packet never takes the fast path: native XDP's redirect makes an `xdp_frame`, which
/// loses the partial state (the backend then rejects the sum), and generic XDP's
/// transmits the skb without the checksum completion a device without offload needs.
/// XDP_PASS keeps the skb's state.
///
/// XDP cannot read the skb's state, so a checksum equal to the pseudo-header sum of the
/// frame's addresses, protocol and L4 length is taken as partial. A complete one is
/// equal by chance once in 65,536 frames: only the programs for hooks where partial
/// frames occur look (`portfwd_xdp_virtual`, which the daemon attaches for native XDP on
/// virtual devices, never on a NIC, and `portfwd_xdp_generic`), and there such a frame
/// gets the address-only update: its checksum field is then wrong, its data untouched,
/// so at worst a verifying receiver drops that one packet, as if lost on the way.
pub struct XdpPacket<'a> {
    ctx: &'a XdpContext,
    /// Frames at this hook may carry partial checksums.
    may_be_partial: bool,
    /// The last rewrite found a partial checksum.
    partial: bool,
}

impl<'a> XdpPacket<'a> {
    #[inline(always)]
    pub fn new(ctx: &'a XdpContext, may_be_partial: bool) -> Self {
        Self {
            ctx,
            may_be_partial,
            partial: false,
        }
    }
}

impl Packet for XdpPacket<'_> {
    #[inline(always)]
    fn may_redirect(&self) -> bool {
        !self.partial
    }
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
        even(self.ctx.data())
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
    fn forward(&mut self, f: &Ipv4Flow, smac: [u8; 6], dmac: [u8; 6]) -> Result<(), RewriteError> {
        let (data, data_end) = (self.data(), self.data_end());
        let eth = bytes_at(data, data_end, 0, 12).ok_or(RewriteError::OutOfBounds)?;
        let ip =
            bytes_at(data, data_end, f.ip_off, IPV4_MIN_HLEN).ok_or(RewriteError::OutOfBounds)?;
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
    fn forward_v6(
        &mut self,
        f: &Ipv6Flow,
        smac: [u8; 6],
        dmac: [u8; 6],
    ) -> Result<(), RewriteError> {
        let (data, data_end) = (self.data(), self.data_end());
        let eth = bytes_at(data, data_end, 0, 12).ok_or(RewriteError::OutOfBounds)?;
        let ip = bytes_at(data, data_end, f.ip_off, IPV6_HLEN).ok_or(RewriteError::OutOfBounds)?;
        // SAFETY: 12 bytes of Ethernet and the 40-byte IPv6 header are inside the packet.
        unsafe {
            write(eth, &dmac);
            write(eth.add(6), &smac);
            *ip.add(IP6_HOP_LIMIT_OFF) -= 1;
        }
        Ok(())
    }

    #[inline(always)]
    fn rewrite(
        &mut self,
        f: &Ipv4Flow,
        end: End,
        addr: [u8; 4],
        port: [u8; 2],
    ) -> Result<(), RewriteError> {
        let (data, data_end) = (self.data(), self.data_end());
        let ip =
            bytes_at(data, data_end, f.ip_off, IPV4_MIN_HLEN).ok_or(RewriteError::OutOfBounds)?;
        let l4 =
            bytes_at(data, data_end, f.l4_off, f.l4_hlen()).ok_or(RewriteError::OutOfBounds)?;
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
            // The L4 length the pseudo-header covers: total length less the IP header.
            let l4_len = u16::from_be_bytes([*ip.add(IP_TOT_LEN_OFF), *ip.add(IP_TOT_LEN_OFF + 1)])
                .wrapping_sub((f.l4_off - f.ip_off) as u16);
            self.partial = self.may_be_partial
                && l4_check == csum::pseudo_sum_v4(f.src, f.dst, f.proto, l4_len);
            let l4_check = if self.partial {
                csum::partial_replace4(l4_check, old_addr, addr)
            } else {
                csum::l4_update(
                    l4_check,
                    old_addr,
                    addr,
                    u16::from_be_bytes(old_port),
                    u16::from_be_bytes(port),
                    f.is_udp(),
                )
            };
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
    ) -> Result<(), RewriteError> {
        let (data, data_end) = (self.data(), self.data_end());
        let ip = bytes_at(data, data_end, f.ip_off, IPV6_HLEN).ok_or(RewriteError::OutOfBounds)?;
        let l4 =
            bytes_at(data, data_end, f.l4_off, f.l4_hlen()).ok_or(RewriteError::OutOfBounds)?;
        let (old_addr, old_port) = match end {
            End::Src => (f.src, f.sport),
            End::Dst => (f.dst, f.dport),
        };
        let (addr_at, port_at) = v6_field_offsets(end);
        let l4_csum_at = f.l4_csum_off() - f.l4_off;
        // SAFETY: `ip` spans the 40-byte IPv6 header and `l4` the whole L4 header
        // (checked above); every offset below is inside them.
        unsafe {
            let l4_check = u16::from_be_bytes([*l4.add(l4_csum_at), *l4.add(l4_csum_at + 1)]);
            // No extension headers get here: the payload length is the L4 length.
            let l4_len = u16::from_be_bytes([*ip.add(IP6_PLEN_OFF), *ip.add(IP6_PLEN_OFF + 1)]);
            self.partial = self.may_be_partial
                && l4_check == csum::pseudo_sum_v6(f.src, f.dst, f.proto, l4_len as u32);
            write(ip.add(addr_at), &addr);
            let l4_check = if self.partial {
                csum::partial_replace16(l4_check, old_addr, addr)
            } else {
                csum::l4_update_v6(
                    l4_check,
                    old_addr,
                    addr,
                    u16::from_be_bytes(old_port),
                    u16::from_be_bytes(port),
                    f.is_udp(),
                )
            };
            write(l4.add(l4_csum_at), &l4_check.to_be_bytes());
            write(l4.add(port_at), &port);
        }
        Ok(())
    }
}

/// TC: the skb's checksum state (`ip_summed`, read from the kernel's `sk_buff`: see
/// `portfwd_common::kctx`) says how the L4 checksum is updated: a partial (offloaded)
/// one for the address only, a full one (none, or checked by the device) for address
/// and port, both with plain arithmetic as at XDP. A `CHECKSUM_COMPLETE` skb, or any
/// where the loader found no way to read the state, goes through the kernel's checksum
/// helpers, which also keep `skb->csum` right (`BPF_F_PSEUDO_HDR` for the address,
/// which the pseudo-header covers).
pub struct TcPacket<'a> {
    ctx: &'a TcContext,
}

/// The bit offset of `ip_summed` in `struct sk_buff`, set by the loader from the running
/// kernel's BTF (`portfwd_common::kctx::SKB_IP_SUMMED_BIT`); 0: unknown.
#[unsafe(no_mangle)]
static SKB_IP_SUMMED_BIT: u32 = 0;

/// How the L4 checksum of a translated skb is updated.
#[derive(Clone, Copy, PartialEq, Eq)]
enum L4Csum {
    /// Partial: the address only, in place.
    Partial,
    /// Full (none, or checked by the device): address and port, in place.
    Full,
    /// Complete, or the state unknown: the kernel's helpers.
    Helpers,
}

/// The skb's checksum state, read from the kernel's `sk_buff`.
#[inline(always)]
fn l4_csum(ctx: &TcContext) -> L4Csum {
    // SAFETY: a read of our own constant (volatile: the loader sets it, so it must not
    // be folded to its initial 0).
    let bit = unsafe { core::ptr::read_volatile(&SKB_IP_SUMMED_BIT) };
    if bit == 0 {
        return L4Csum::Helpers;
    }
    // `bpf_cast_to_kern_ctx`: the loader turns this call of a helper no kernel has into
    // the kfunc call (see `portfwd_common::kctx`); only reached when it did (bit != 0).
    // SAFETY: the kfunc takes the program's context and returns its `struct sk_buff`.
    let skb = unsafe {
        let cast: unsafe extern "C" fn(*mut core::ffi::c_void) -> *const u8 =
            core::mem::transmute(kctx::KFUNC_MARKER as usize);
        cast(ctx.as_ptr())
    };
    // SAFETY: the verifier checks this read against the kernel's BTF of `sk_buff`.
    let byte = unsafe { *skb.add((bit / 8) as usize) };
    match (byte >> (bit % 8)) & 3 {
        kctx::CHECKSUM_PARTIAL => L4Csum::Partial,
        kctx::CHECKSUM_NONE | kctx::CHECKSUM_UNNECESSARY => L4Csum::Full,
        _ => L4Csum::Helpers,
    }
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
        nat64_jump(self.ctx)
    }
    #[inline(always)]
    fn nat64_reply(&mut self, f: &Ipv4Flow) -> Option<Verdict> {
        is_nat64_reply(f).then(|| nat64_jump(self.ctx))
    }
    #[inline(always)]
    fn data(&self) -> usize {
        even(self.ctx.data())
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
        tc_ifindex(self.ctx)
    }

    #[inline(always)]
    fn forward(&mut self, f: &Ipv4Flow, smac: [u8; 6], dmac: [u8; 6]) -> Result<(), RewriteError> {
        let c = self.ctx;
        let ttl: u8 = c
            .load(f.ip_off + IP_TTL_OFF)
            .map_err(|_| RewriteError::Helper)?;
        let l4: u8 = c
            .load(f.ip_off + IP_TTL_OFF + 1)
            .map_err(|_| RewriteError::Helper)?;
        let old = u16::from_ne_bytes([ttl, l4]) as u64;
        let new = u16::from_ne_bytes([ttl - 1, l4]) as u64;
        c.l3_csum_replace(f.ip_off + IP_CSUM_OFF, old, new, 2)
            .map_err(|_| RewriteError::Helper)?;
        c.store(f.ip_off + IP_TTL_OFF, &(ttl - 1), 0)
            .map_err(|_| RewriteError::Helper)?;
        c.store(0, &dmac, 0).map_err(|_| RewriteError::Helper)?;
        c.store(6, &smac, 0).map_err(|_| RewriteError::Helper)?;
        Ok(())
    }

    #[inline(always)]
    fn forward_v6(
        &mut self,
        f: &Ipv6Flow,
        smac: [u8; 6],
        dmac: [u8; 6],
    ) -> Result<(), RewriteError> {
        let c = self.ctx;
        let at = f.ip_off + IP6_HOP_LIMIT_OFF;
        let hops: u8 = c.load(at).map_err(|_| RewriteError::Helper)?;
        // No checksum covers the hop limit.
        c.store(at, &(hops - 1), 0)
            .map_err(|_| RewriteError::Helper)?;
        c.store(0, &dmac, 0).map_err(|_| RewriteError::Helper)?;
        c.store(6, &smac, 0).map_err(|_| RewriteError::Helper)?;
        Ok(())
    }

    #[inline(always)]
    fn rewrite(
        &mut self,
        f: &Ipv4Flow,
        end: End,
        addr: [u8; 4],
        port: [u8; 2],
    ) -> Result<(), RewriteError> {
        let (old_addr, old_port) = match end {
            End::Src => (f.src, f.sport),
            End::Dst => (f.dst, f.dport),
        };
        let (addr_off, port_off) = field_offsets(f, end);
        let how = l4_csum(self.ctx);
        let (data, data_end) = (self.data(), self.data_end());
        let ip =
            bytes_at(data, data_end, f.ip_off, IPV4_MIN_HLEN).ok_or(RewriteError::OutOfBounds)?;
        let l4 =
            bytes_at(data, data_end, f.l4_off, f.l4_hlen()).ok_or(RewriteError::OutOfBounds)?;
        let l4_csum_at = f.l4_csum_off() - f.l4_off;
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
            if how != L4Csum::Helpers {
                let at = l4.add(l4_csum_at);
                let check = u16::from_be_bytes([*at, *at.add(1)]);
                let check = if how == L4Csum::Partial {
                    partial_update(check, f.is_udp(), |c| {
                        csum::partial_replace4(c, old_addr, addr)
                    })
                } else {
                    csum::l4_update(
                        check,
                        old_addr,
                        addr,
                        u16::from_be_bytes(old_port),
                        u16::from_be_bytes(port),
                        f.is_udp(),
                    )
                };
                write(at, &check.to_be_bytes());
                return Ok(());
            }
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
            .map_err(|_| RewriteError::Helper)?;
        port_csum_replace(c, l4_csum, old_p, new_p, mangled)
    }

    #[inline(always)]
    fn rewrite_v6(
        &mut self,
        f: &Ipv6Flow,
        end: End,
        addr: [u8; 16],
        port: [u8; 2],
    ) -> Result<(), RewriteError> {
        let (old_addr, old_port) = match end {
            End::Src => (f.src, f.sport),
            End::Dst => (f.dst, f.dport),
        };
        let (addr_at, port_at) = v6_field_offsets(end);
        let how = l4_csum(self.ctx);
        let (data, data_end) = (self.data(), self.data_end());
        let ip = bytes_at(data, data_end, f.ip_off, IPV6_HLEN).ok_or(RewriteError::OutOfBounds)?;
        let l4 =
            bytes_at(data, data_end, f.l4_off, f.l4_hlen()).ok_or(RewriteError::OutOfBounds)?;
        let l4_csum_at = f.l4_csum_off() - f.l4_off;
        // SAFETY: `ip` spans the IPv6 header and `l4` the whole L4 header (checked above).
        unsafe {
            write(ip.add(addr_at), &addr);
            write(l4.add(port_at), &port);
            if how != L4Csum::Helpers {
                let at = l4.add(l4_csum_at);
                let check = u16::from_be_bytes([*at, *at.add(1)]);
                let check = if how == L4Csum::Partial {
                    partial_update(check, f.is_udp(), |c| {
                        csum::partial_replace16(c, old_addr, addr)
                    })
                } else {
                    csum::l4_update_v6(
                        check,
                        old_addr,
                        addr,
                        u16::from_be_bytes(old_port),
                        u16::from_be_bytes(port),
                        f.is_udp(),
                    )
                };
                write(at, &check.to_be_bytes());
                return Ok(());
            }
        }
        // The 16-byte address change as one checksum difference (bpf_csum_diff), applied
        // with size 0 ("`to` is a diff"); the pseudo-header flag keeps a partial
        // (offloaded) checksum and skb->csum right, as for IPv4.
        let mut from = addr_words(old_addr);
        let mut to = addr_words(addr);
        // SAFETY: both buffers are 16 bytes on our stack, sizes multiples of 4.
        let diff = unsafe { bpf_csum_diff(from.as_mut_ptr(), 16, to.as_mut_ptr(), 16, 0) };
        if diff < 0 {
            return Err(RewriteError::Helper);
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
            c.l4_csum_replace(l4_csum, 0, diff, flags)
                .map_err(|_| RewriteError::Helper)?;
        }
        port_csum_replace(c, l4_csum, old_p, new_p, mangled)
    }
}

/// A partial checksum field updated by `update`, as the kernel's helper does it with
/// `BPF_F_MARK_MANGLED_0`: a UDP field of zero (no checksum) stays zero, and one that
/// becomes zero is written as `0xFFFF`.
#[inline(always)]
fn partial_update(check: u16, is_udp: bool, update: impl FnOnce(u16) -> u16) -> u16 {
    if is_udp && check == 0 {
        return 0;
    }
    match update(check) {
        0 if is_udp => 0xffff,
        c => c,
    }
}

/// Updates the L4 checksum for a port change; none for the same port (`-p 80:80`),
/// which saves a helper call (a change of zero leaves every checksum state as it is).
#[inline(always)]
fn port_csum_replace(
    c: &TcContext,
    l4_csum: usize,
    old_p: u64,
    new_p: u64,
    mangled: u64,
) -> Result<(), RewriteError> {
    if old_p == new_p {
        return Ok(());
    }
    c.l4_csum_replace(l4_csum, old_p, new_p, mangled | 2)
        .map_err(|_| RewriteError::Helper)
}

/// An address as the 32-bit words `bpf_csum_diff` and `bpf_fib_lookup` read (memory
/// order kept).
#[inline(always)]
pub fn addr_words(a: [u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// Jumps to the NAT64 program (`nat64.rs`); if the jump fails (not loaded), the packet
/// is passed.
#[inline(always)]
pub fn nat64_jump(ctx: &TcContext) -> Verdict {
    maps::tail_call_nat64(ctx);
    count(Reason::Nat64Failed);
    Verdict::Pass
}

/// Whether an IPv4 packet is a tracked NAT64 reply (one lookup; callers ask only for
/// NAT64's ports).
#[inline(always)]
pub fn is_nat64_reply(f: &Ipv4Flow) -> bool {
    let key = FlowKeyV4::new(f.src, f.sport, f.dst, f.dport, f.proto);
    maps::nat64_reply_exists(&key)
}

/// The interface an skb is on (at ingress: where it arrived).
#[inline(always)]
pub fn tc_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: reading a field of the kernel-provided __sk_buff.
    unsafe { (*ctx.skb.skb).ifindex }
}
