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
//! Loopback is the host's only in the host's network namespace: a container's
//! `127.0.0.1:9000` is its own, so loopback destinations and binds are left alone in
//! other namespaces. The host's other addresses are reachable from every namespace
//! (hairpin).

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext,
};
use portfwd_common::{proto, BackendV4, LocalPeerKeyV4, LocalPeerV4, Reason, RuleKeyV4};

use crate::{
    count,
    maps::{self, HOST_ADDRS_V4, LOCAL_PEERS_V4, RULES_V4},
};

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
    if !in_host_netns(&ctx) {
        return ALLOW;
    }
    // Port 0 asks for an ephemeral port: never a published one.
    if sa.port == [0, 0] || lookup(sa.addr, sa.port, sa.proto, true).is_none() {
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

/// The rule serving a local client that addresses `addr:port`. `host_ns`: the caller
/// runs in the host's namespace, where loopback is the host's.
#[inline(always)]
fn lookup(addr: [u8; 4], port: [u8; 2], l4: u8, host_ns: bool) -> Option<BackendV4> {
    if l4 != proto::TCP && l4 != proto::UDP {
        return None;
    }
    let loopback = addr[0] == 127;
    if loopback && !host_ns {
        return None;
    }
    // SAFETY (all three): values are copied out at once.
    if let Some(b) = unsafe { RULES_V4.get(&RuleKeyV4::new(addr, port, l4)) } {
        return Some(*b);
    }
    let wildcard = unsafe { RULES_V4.get(&RuleKeyV4::new([0; 4], port, l4)) }.copied()?;
    if loopback || unsafe { HOST_ADDRS_V4.get(&addr) }.is_some() {
        return Some(wildcard);
    }
    // A bind to 0.0.0.0 would take the wildcard's port on every address.
    if addr == [0; 4] {
        return Some(wildcard);
    }
    None
}

#[inline(always)]
fn redirect_to_backend(ctx: &SockAddrContext) {
    let sa = fields(ctx);
    if sa.addr == [0; 4] {
        return;
    }
    let Some(backend) = lookup(sa.addr, sa.port, sa.proto, in_host_netns(ctx)) else {
        return;
    };
    // SAFETY: plain helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = LocalPeerKeyV4::new(cookie, backend.addr_bytes(), backend.port_be(), sa.proto);
    let published = LocalPeerV4::new(sa.addr, sa.port);
    // SAFETY: compared by value at once.
    let known = matches!(unsafe { LOCAL_PEERS_V4.get(&key) }, Some(p) if *p == published);
    if !known && LOCAL_PEERS_V4.insert(&key, &published, 0).is_err() {
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
    // SAFETY: copied out at once.
    if let Some(p) = unsafe { LOCAL_PEERS_V4.get(&key) }.copied() {
        set_addr(ctx, p.host_addr_bytes(), p.host_port_be());
    }
}
