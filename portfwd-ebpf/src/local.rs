//! Local clients, served at the socket instead of the packet (what Cilium does for
//! host-originated traffic): processes on the host, and containers calling the host's
//! address, connect straight to the backend. No packet is translated, no proxy runs, and
//! `route_localnet` stays off.
//!
//! - connect4 / sendmsg4 rewrite the destination to the backend and remember, per socket,
//!   the published address that was asked for;
//! - recvmsg4 / getpeername4 put that published address back where the application
//!   looks (the source of a UDP reply, the peer of a connected socket);
//! - bind4 refuses a local `bind()` of a published port, which would otherwise shadow it.
//!
//! Whose sockets: every process of the served cgroup (`portfwd --cgroup`), in every
//! network namespace, so containers calling the host's address are served (their
//! packets would enter on the bridge, where nothing translates, and the backend's reply
//! to a neighbour on the same bridge would bypass the host). With
//! [`CONFIG_SOCK_HOST_NETNS_ONLY`] (`--local-clients host-netns`), only the host's
//! namespace: another namespace's connection to the host's address then goes by packet,
//! through the ingress hooks, as a remote client's does, which serves a namespace that
//! reaches the host but has no route to the backends.
//!
//! Loopback is the host's only in the host's network namespace: a container's
//! `127.0.0.1:9000` is its own, so loopback destinations and binds are left alone in
//! other namespaces. The host's other addresses are reachable from every namespace
//! (hairpin).
//!
//! IPv6 sockets get the same five programs (`connect6`, ...), over `RULES_V6`,
//! `HOST_ADDRS_V6` and `LOCAL_PEERS_V6`, with `::1` as the loopback. A dual-stack IPv6
//! socket addressing an IPv4-mapped address (`::ffff:a.b.c.d`) never reaches the IPv4
//! programs (the kernel connects it as IPv4 without running connect4), so the IPv6
//! programs serve it from the IPv4 rules, and give it the backend as a mapped address.
//! The same holds for an IPv6 rule whose backend is IPv4 only (`RULES_V6` holds it as
//! `::ffff:a.b.c.d`): `curl [::1]:9000` connects to the mapped backend. Only connects can
//! be redirected so (the kernel refuses a `sendmsg6` rewritten to a mapped address).

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext,
};
use portfwd_common::{
    rules::{self, Caller},
    LocalPeerKeyV4, LocalPeerKeyV6, LocalPeerV4, LocalPeerV6, Reason, CONFIG_SOCK_HOST_NETNS_ONLY,
};

use crate::maps::{self, count, Maps};

/// sock_addr programs: 1 lets the call proceed, 0 fails it with EPERM.
const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn portfwd_connect4(ctx: SockAddrContext) -> i32 {
    redirect_to_backend(&ctx);
    ALLOW
}

#[cgroup_sock_addr(sendmsg4)]
pub fn portfwd_sendmsg4(ctx: SockAddrContext) -> i32 {
    redirect_to_backend(&ctx);
    ALLOW
}

#[cgroup_sock_addr(recvmsg4)]
pub fn portfwd_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_published(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn portfwd_getpeername4(ctx: SockAddrContext) -> i32 {
    restore_published(&ctx);
    ALLOW
}

#[cgroup_sock_addr(bind4)]
pub fn portfwd_bind4(ctx: SockAddrContext) -> i32 {
    let sa = fields(&ctx);
    let caller = Caller::Bind {
        host_netns: in_host_netns(&ctx),
    };
    if rules::lookup_ref(&Maps, caller, &sa.addr, sa.port, sa.proto).is_err() {
        return ALLOW;
    }
    count(Reason::LocalBindRefused);
    DENY
}

/// The address, port (both network order) and protocol of a sock_addr call.
struct SockAddr {
    addr: [u8; 4],
    port: [u8; 2],
    proto: u8,
}

#[inline(always)]
fn raw(ctx: &SockAddrContext) -> *mut bpf_sock_addr {
    ctx.sock_addr
}

#[inline(always)]
fn fields(ctx: &SockAddrContext) -> SockAddr {
    // SAFETY: the kernel passes a valid bpf_sock_addr; these fields are readable with
    // 4-byte loads in every sock_addr program.
    unsafe {
        let sa = raw(ctx);
        SockAddr {
            addr: (*sa).user_ip4.to_ne_bytes(),
            port: ((*sa).user_port as u16).to_ne_bytes(),
            proto: (*sa).protocol as u8,
        }
    }
}

#[inline(always)]
fn set_addr(ctx: &SockAddrContext, addr: [u8; 4], port: [u8; 2]) {
    // SAFETY: user_ip4 and user_port are writable with 4-byte stores in these programs.
    unsafe {
        let sa = raw(ctx);
        (*sa).user_ip4 = u32::from_ne_bytes(addr);
        (*sa).user_port = u16::from_ne_bytes(port) as u32;
    }
}

#[inline(always)]
fn in_host_netns(ctx: &SockAddrContext) -> bool {
    let cfg = maps::config();
    // SAFETY: plain helper call on the program's own context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    cfg.host_netns_cookie == 0 || cookie == cfg.host_netns_cookie
}

/// Whether the socket hooks serve this call's namespace (`None`: not served, see
/// [`CONFIG_SOCK_HOST_NETNS_ONLY`]), and whether it is the host's.
#[inline(always)]
fn served_netns(ctx: &SockAddrContext) -> Option<bool> {
    let host_netns = in_host_netns(ctx);
    if !host_netns && maps::config().flags & CONFIG_SOCK_HOST_NETNS_ONLY != 0 {
        return None;
    }
    Some(host_netns)
}

#[inline(always)]
fn redirect_to_backend(ctx: &SockAddrContext) {
    let sa = fields(ctx);
    if sa.addr == [0; 4] {
        return;
    }
    let Some(host_netns) = served_netns(ctx) else {
        return;
    };
    let caller = Caller::Socket { host_netns };
    let Ok(backend) = rules::lookup_ref(&Maps, caller, &sa.addr, sa.port, sa.proto) else {
        return;
    };
    // SAFETY: plain helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = LocalPeerKeyV4::new(cookie, backend.addr_bytes(), backend.port_be(), sa.proto);
    let published = LocalPeerV4::new(sa.addr, sa.port);
    if maps::record_local_peer_v4(&key, &published).is_err() {
        count(Reason::FlowInsertFailed);
    }
    set_addr(ctx, backend.addr_bytes(), backend.port_be());
    maps::count_local(backend.stats_slot());
    count(Reason::LocalTranslated);
}

#[inline(always)]
fn restore_published(ctx: &SockAddrContext) {
    let sa = fields(ctx);
    // SAFETY: plain helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = LocalPeerKeyV4::new(cookie, sa.addr, sa.port, sa.proto);
    if let Some(p) = maps::local_peer_v4(&key) {
        set_addr(ctx, p.host_addr_bytes(), p.host_port_be());
    }
}

#[cgroup_sock_addr(connect6)]
pub fn portfwd_connect6(ctx: SockAddrContext) -> i32 {
    redirect_to_backend6(&ctx, true);
    ALLOW
}

#[cgroup_sock_addr(sendmsg6)]
pub fn portfwd_sendmsg6(ctx: SockAddrContext) -> i32 {
    redirect_to_backend6(&ctx, false);
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn portfwd_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore_published6(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn portfwd_getpeername6(ctx: SockAddrContext) -> i32 {
    restore_published6(&ctx);
    ALLOW
}

#[cgroup_sock_addr(bind6)]
pub fn portfwd_bind6(ctx: SockAddrContext) -> i32 {
    let sa = fields6(&ctx);
    let caller = Caller::Bind {
        host_netns: in_host_netns(&ctx),
    };
    // `[::]` on a dual-stack socket also takes the IPv4 wildcard's port: see `rules`.
    if rules::lookup_ref(&Maps, caller, &sa.addr, sa.port, sa.proto).is_err() {
        return ALLOW;
    }
    count(Reason::LocalBindRefused);
    DENY
}

/// [`SockAddr`] of an IPv6 sock_addr call.
struct SockAddr6 {
    addr: [u8; 16],
    port: [u8; 2],
    proto: u8,
}

#[inline(always)]
fn fields6(ctx: &SockAddrContext) -> SockAddr6 {
    let mut addr = [0u8; 16];
    // SAFETY: the kernel passes a valid bpf_sock_addr; user_ip6 words, user_port and
    // protocol are readable with 4-byte loads in every IPv6 sock_addr program (volatile
    // keeps each load 4 bytes wide, the width the verifier expects).
    unsafe {
        let sa = raw(ctx);
        let mut i = 0;
        while i < 4 {
            let w = core::ptr::read_volatile(&(*sa).user_ip6[i]).to_ne_bytes();
            addr[4 * i] = w[0];
            addr[4 * i + 1] = w[1];
            addr[4 * i + 2] = w[2];
            addr[4 * i + 3] = w[3];
            i += 1;
        }
        SockAddr6 {
            addr,
            port: (core::ptr::read_volatile(&(*sa).user_port) as u16).to_ne_bytes(),
            proto: core::ptr::read_volatile(&(*sa).protocol) as u8,
        }
    }
}

#[inline(always)]
fn set_addr6(ctx: &SockAddrContext, addr: [u8; 16], port: [u8; 2]) {
    // SAFETY: user_ip6 words and user_port are writable with 4-byte stores in these
    // programs.
    unsafe {
        let sa = raw(ctx);
        let mut i = 0;
        while i < 4 {
            let w = u32::from_ne_bytes([
                addr[4 * i],
                addr[4 * i + 1],
                addr[4 * i + 2],
                addr[4 * i + 3],
            ]);
            core::ptr::write_volatile(&mut (*sa).user_ip6[i], w);
            i += 1;
        }
        core::ptr::write_volatile(&mut (*sa).user_port, u16::from_ne_bytes(port) as u32);
    }
}

/// `connect`: the call is a connect (TCP, or UDP `connect()`), which the kernel lets
/// a dual-stack socket make to an IPv4-mapped address; an unconnected UDP `sendmsg`
/// rewritten to one fails with ENOTSUPP, so it is left alone.
#[inline(always)]
fn redirect_to_backend6(ctx: &SockAddrContext, connect: bool) {
    let sa = fields6(ctx);
    if sa.addr == [0; 16] {
        return;
    }
    let Some(host_netns) = served_netns(ctx) else {
        return;
    };
    let caller = Caller::Socket { host_netns };
    let Ok(target) = rules::lookup_ref(&Maps, caller, &sa.addr, sa.port, sa.proto) else {
        return;
    };
    if !connect && target.is_ipv4_mapped() {
        count(Reason::PassNoIpv6Backend);
        return;
    }
    // SAFETY: plain helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = LocalPeerKeyV6::new(cookie, target.addr_bytes(), target.port_be(), sa.proto);
    let published = LocalPeerV6::new(sa.addr, sa.port);
    if maps::record_local_peer_v6(&key, &published).is_err() {
        count(Reason::FlowInsertFailed);
    }
    set_addr6(ctx, target.addr_bytes(), target.port_be());
    maps::count_local(target.stats_slot());
    count(Reason::LocalTranslated);
}

#[inline(always)]
fn restore_published6(ctx: &SockAddrContext) {
    let sa = fields6(ctx);
    // SAFETY: plain helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = LocalPeerKeyV6::new(cookie, sa.addr, sa.port, sa.proto);
    if let Some(p) = maps::local_peer_v6(&key) {
        set_addr6(ctx, p.host_addr_bytes(), p.host_port_be());
    }
}
