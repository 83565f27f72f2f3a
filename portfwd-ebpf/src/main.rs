//! portfwd's kernel programs.
//!
//! - `portfwd_xdp_ingress` / `portfwd_tc_ingress`: the same destination NAT for a published
//!   port, at the XDP hook (physical NICs) or TC ingress (veth, bridge: see the daemon's
//!   `--ingress auto`). The rewritten packet goes on to the kernel, which routes it.
//!   `portfwd_xdp_virtual` (native XDP on a virtual device) and `portfwd_xdp_generic`
//!   also handle partial (offloaded) checksums (`hook::XdpPacket`).
//! - `portfwd_tc_egress`: translates the backend's replies back to the published address,
//!   driven by the flow recorded at ingress.
//! - `portfwd_{connect4,sendmsg4,recvmsg4,getpeername4,bind4}`: local clients, served at
//!   the socket (see `local.rs`).
//!
//! This crate is thin glue: it is the only code that touches packet memory or a map;
//! the decisions (checksum arithmetic, rule matching, NAT64's ports and headers) and
//! every map layout live in `portfwd-common`, tested on the host. Modules: `packet`
//! (parsing), `maps` (every map access), `hook` (the XDP and TC packet adapters),
//! `nat`, `fastpath`, `nat64` (translation), `local` (socket hooks); imports go one way.
#![no_std]
#![no_main]

mod fastpath;
mod hook;
mod local;
mod maps;
mod nat;
mod nat64;
mod packet;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use portfwd_common::{CONFIG_FAST_PATH, CONFIG_FAST_PATH_NATIVE_XDP};

use crate::hook::{TcPacket, Verdict, XdpPacket};

/// Ingress DNAT at the XDP hook, attached natively (in the driver) on a NIC: frames
/// come from the wire with complete checksums, so none is checked for being partial.
#[xdp]
pub fn portfwd_xdp_ingress(ctx: XdpContext) -> u32 {
    xdp_ingress(&ctx, CONFIG_FAST_PATH_NATIVE_XDP, false)
}

/// The same, attached natively on a virtual device (veth, tap), whose frames may carry
/// partial (offloaded) checksums from a local stack: see [`XdpPacket`].
#[xdp]
pub fn portfwd_xdp_virtual(ctx: XdpContext) -> u32 {
    xdp_ingress(&ctx, CONFIG_FAST_PATH_NATIVE_XDP, true)
}

/// The same, attached as generic (skb) XDP: its redirects take the skb path, which any
/// device accepts, so the fast path has its own switch. It runs after GRO, whose merged
/// packets carry partial checksums, on any device: it checks for them.
#[xdp]
pub fn portfwd_xdp_generic(ctx: XdpContext) -> u32 {
    xdp_ingress(&ctx, CONFIG_FAST_PATH, true)
}

#[inline(always)]
fn xdp_ingress(ctx: &XdpContext, fast_path_bit: u64, may_be_partial: bool) -> u32 {
    let mut pkt = XdpPacket::new(ctx, may_be_partial);
    match nat::ingress(&mut pkt, fast_path_bit) {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
        // SAFETY: plain helper call; it returns XDP_REDIRECT, or XDP_ABORTED on a bad index.
        Verdict::Redirect(ifindex) | Verdict::RedirectPeer(ifindex) => unsafe {
            bpf_redirect(ifindex, 0) as u32
        },
        // Never produced at XDP (NAT64 is TC's).
        Verdict::RedirectNeigh(_) => xdp_action::XDP_PASS,
    }
}

/// Ingress DNAT at TC (clsact/TCX ingress).
#[classifier]
pub fn portfwd_tc_ingress(ctx: TcContext) -> i32 {
    let mut pkt = TcPacket::new(&ctx);
    tc_action(nat::ingress(&mut pkt, CONFIG_FAST_PATH))
}

/// NAT64, tail-called from `portfwd_tc_ingress` (see `nat64.rs`).
#[classifier]
pub fn portfwd_tc_nat64(ctx: TcContext) -> i32 {
    tc_action(nat64::program(&ctx))
}

/// NAT64's entry where `portfwd_tc_ingress` is not attached (see `nat64::entry`).
#[classifier]
pub fn portfwd_tc_nat64_entry(ctx: TcContext) -> i32 {
    // Headers made linear as for the other TC programs.
    let _ = TcPacket::new(&ctx);
    match nat64::entry(&ctx) {
        Some(v) => tc_action(v),
        None => TC_ACT_UNSPEC,
    }
}

/// Reply translation at TC egress of the published interfaces.
#[classifier]
pub fn portfwd_tc_egress(ctx: TcContext) -> i32 {
    let mut pkt = TcPacket::new(&ctx);
    tc_action(nat::reply(&mut pkt))
}

/// `TC_ACT_UNSPEC` is TCX's "next": other programs on the hook still see the packet.
#[inline(always)]
fn tc_action(v: Verdict) -> i32 {
    match v {
        Verdict::Pass => TC_ACT_UNSPEC,
        Verdict::Drop => TC_ACT_SHOT as i32,
        // SAFETY: plain helper call; TC_ACT_REDIRECT on success.
        Verdict::Redirect(ifindex) => match unsafe { bpf_redirect(ifindex, 0) } as i32 {
            r if r == TC_ACT_REDIRECT as i32 => r,
            _ => TC_ACT_UNSPEC,
        },
        // Into the veth's peer, skipping the veth's transmit and the peer's backlog.
        // SAFETY: plain helper call; TC_ACT_REDIRECT on success.
        Verdict::RedirectPeer(ifindex) => match unsafe { bpf_redirect_peer(ifindex, 0) } as i32 {
            r if r == TC_ACT_REDIRECT as i32 => r,
            _ => TC_ACT_UNSPEC,
        },
        // SAFETY: plain helper call, no neighbour parameters; TC_ACT_REDIRECT on
        // success. The packet has changed family by now: on failure it is dropped.
        Verdict::RedirectNeigh(ifindex) => {
            match unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) } as i32 {
                r if r == TC_ACT_REDIRECT as i32 => r,
                _ => TC_ACT_SHOT as i32,
            }
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
