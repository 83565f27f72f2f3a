//! NAT64 for remote IPv6 clients of an IPv4-only backend, at TC (it needs
//! `bpf_skb_change_proto`, which XDP lacks).
//!
//! A `*` or IPv6 rule whose backend has no IPv6 address holds it IPv4-mapped
//! (`::ffff:a.b.c.d`). An IPv6 packet for it becomes IPv4: destination the backend,
//! source the host's own address towards the backend (`bpf_fib_lookup` with
//! `BPF_FIB_LOOKUP_SRC`) and a port of its own from `NAT64_PORT_MIN..`, since an IPv6
//! client address does not fit in IPv4 (what Docker's userland proxy does, without the
//! proxy). The packet is then sent to the backend's interface (`bpf_redirect_neigh`); it
//! cannot go up the stack, which drops a source that is one of the host's addresses.
//!
//! The backend answers the host's address, on the backend's interface: the TC ingress
//! there (`portfwd_tc_nat64_entry`, which the daemon attaches, or `portfwd_tc_ingress`
//! on an `--iface`) finds the flow in `NAT64_REPLIES` and jumps here, which makes the
//! packet IPv6 again (source the published address and port, destination the client)
//! and sends it out of the interface the client's packets came in on.
//!
//! This is a program of its own, reached by tail call: the ingress program's stack has
//! no room left for it, and a tail call starts a fresh one. Large temporaries live in a
//! per-CPU scratch map for the same reason.
//!
//! Checksums: the L4 checksum moves from one pseudo-header to the other by one
//! one's complement difference of the addresses, then the port changes; the new L3
//! header is written whole (with `BPF_F_RECOMPUTE_CSUM`, which keeps a complete
//! `skb->csum` right). MSS needs no clamping: the client's SYN announces an MSS for IPv6 headers, 20
//! bytes larger than IPv4's, so the backend's segments grow back to the client's MTU.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LOOKUP_SKIP_NEIGH, BPF_FIB_LOOKUP_SRC, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM,
    },
    helpers::{bpf_fib_lookup, bpf_ktime_get_coarse_ns},
    programs::TcContext,
    EbpfContext,
};
use portfwd_common::{
    addr,
    nat64::{
        fin_end, ipv4_header, ipv6_header, is_nat64_port, mtu_len, port_candidate, port_start,
        pseudo_diff, tcp_hlen, tcp_tsval, track_tcp,
    },
    packet::{
        l4_csum_off, may_start_flow, ETH_HLEN, ETH_PROTO_OFF, ETH_P_IP, ETH_P_IPV6, IPV4_MIN_HLEN,
        IPV6_HLEN, TCP_DOFF_OFF, TCP_FIN, TCP_HLEN, TCP_SEQ_OFF, TCP_SYN, UDP_CSUM_OFF, UDP_HLEN,
    },
    rules::{self, Caller},
    BackendV6, FlowKeyV4, FlowKeyV6, Nat64Flow, Nat64Reply, Reason, NAT64_FIN_CLIENT_TS,
    NAT64_PORT_TRIES,
};

use crate::{
    hook::{is_nat64_reply, nat64_jump, tc_ifindex, RewriteError, Verdict},
    maps::{self, count, Maps, Scratch},
    packet::{bytes_at, parse_eth, parse_ipv4, parse_ipv6, Ipv4Flow, Ipv6Flow, L3},
};

/// The IPv4 header NAT64 writes: no options.
const IPV4_HLEN: usize = IPV4_MIN_HLEN;
const AF_INET: u8 = 2;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

/// The NAT64 program (`portfwd_tc_nat64`), tail-called by TC ingress for an IPv6 packet
/// of an IPv4-mapped rule or an IPv4 packet of a tracked NAT64 reply: it parses the
/// packet again (a tail call carries nothing over) and translates it.
#[inline(always)]
pub fn program(ctx: &TcContext) -> Verdict {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let verdict = match parse_eth(data, data_end) {
        Ok(L3::Ipv6 { ip_off }) => parse_ipv6(data, data_end, ip_off).and_then(|f| {
            let backend = rules::lookup_ref(&Maps, Caller::Packet, &f.dst, f.dport, f.proto)?;
            // The rule changed since the jump: nothing NAT64 can do.
            if !backend.is_ipv4_mapped() {
                return Err(Reason::Nat64Failed);
            }
            Ok(forward(ctx, &f, &backend))
        }),
        Ok(L3::Ipv4 { ip_off }) => parse_ipv4(data, data_end, ip_off).and_then(|f| reply(ctx, &f)),
        Err(reason) => Err(reason),
    };
    verdict.unwrap_or_else(|reason| {
        count(reason);
        Verdict::Pass
    })
}

/// `portfwd_tc_nat64_entry`: a NAT64 packet (an IPv6 one of an IPv4-mapped rule, an
/// IPv4 tracked reply) jumps to NAT64; anything else goes on, untouched and uncounted
/// (the interface's own programs, if any, count it).
#[inline(always)]
pub fn entry(ctx: &TcContext) -> Option<Verdict> {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let is_nat64 = match parse_eth(data, data_end).ok()? {
        L3::Ipv4 { ip_off } => {
            let f = parse_ipv4(data, data_end, ip_off).ok()?;
            is_nat64_port(f.dport) && is_nat64_reply(&f)
        }
        L3::Ipv6 { ip_off } => {
            let f = parse_ipv6(data, data_end, ip_off).ok()?;
            rules::lookup_ref(&Maps, Caller::Packet, &f.dst, f.dport, f.proto)
                .is_ok_and(|b| b.is_ipv4_mapped())
        }
    };
    is_nat64.then(|| nat64_jump(ctx))
}

/// An IPv6 client's packet for `backend` (IPv4-mapped): translated and redirected, or
/// passed untouched when it cannot be.
#[inline(always)]
fn forward(ctx: &TcContext, f: &Ipv6Flow, backend: &BackendV6) -> Verdict {
    let Some(s) = maps::nat64_scratch() else {
        count(Reason::Nat64Failed);
        return Verdict::Pass;
    };
    match try_forward(ctx, f, backend, s) {
        Ok(v) => v,
        Err(reason) => {
            count(reason);
            Verdict::Pass
        }
    }
}

#[inline(always)]
fn try_forward(
    ctx: &TcContext,
    f: &Ipv6Flow,
    backend: &BackendV6,
    s: &mut Scratch,
) -> Result<Verdict, Reason> {
    // VLAN-tagged frames keep their tag's offsets: not translated.
    if f.ip_off != ETH_HLEN {
        return Err(Reason::Nat64Unsupported);
    }
    let ip = bytes_at(ctx.data(), ctx.data_end(), f.ip_off, IPV6_HLEN)
        .ok_or(Reason::Nat64Unsupported)?;
    // SAFETY: the 40-byte IPv6 header is inside the packet (checked above).
    let (tclass, payload_len, hop_limit) = unsafe {
        (
            (*ip << 4) | (*ip.add(1) >> 4),
            u16::from_be_bytes([*ip.add(4), *ip.add(5)]),
            *ip.add(7),
        )
    };
    // Forwarded, so the hop limit drops by one; an expiring one is the stack's to answer.
    if hop_limit <= 1 {
        return Err(Reason::Nat64HopLimit);
    }
    // The translated packet's IPv4 length: an IPv6 payload too long for one is not
    // translated.
    let tot_len = payload_len
        .checked_add(IPV4_HLEN as u16)
        .ok_or(Reason::Nat64TooBig)?;
    let backend_addr = addr::mapped_low(&backend.addr_bytes());
    let backend_port = backend.port_be();

    // Every packet: the route to the backend (it may change), and the host's address on it.
    // SAFETY: all-zero is a valid (empty) bpf_fib_lookup request.
    unsafe { core::ptr::write_bytes(&mut s.fib, 0, 1) };
    s.fib.family = AF_INET;
    s.fib.l4_protocol = f.proto;
    s.fib.ifindex = tc_ifindex(ctx);
    // The translated packet's length, or a GSO packet's segment's ([`mtu_len`]), checked
    // against the route's MTU (without it the FIB would check the IPv6 frame, 20 bytes
    // longer than what leaves, and let any GSO packet through).
    let (hlen, seq) = l4_header(ctx, f)?;
    s.fib.__bindgen_anon_1.tot_len = mtu_len(tot_len, gso_size(ctx), hlen);
    s.fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(backend_addr);
    // SAFETY: a valid request in map memory, of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &mut s.fib,
            core::mem::size_of::<FibParams>() as i32,
            BPF_FIB_LOOKUP_SRC | BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    };
    if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
        return Err(Reason::Nat64TooBig);
    }
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return Err(Reason::Nat64NoRoute);
    }
    // SAFETY: BPF_FIB_LOOKUP_SRC filled the source in on success.
    let snat_addr = unsafe { s.fib.__bindgen_anon_3.ipv4_src }.to_ne_bytes();
    let out_ifindex = s.fib.ifindex;

    // TCP: where a FIN of this segment ends, and a SYN's or FIN's timestamp.
    let tsval = if f.proto == portfwd_common::proto::TCP && f.tcp_flags & (TCP_SYN | TCP_FIN) != 0 {
        let (data, data_end) = (ctx.data(), ctx.data_end());
        let opts = f.l4_off + TCP_HLEN;
        tcp_tsval(usize::from(hlen).saturating_sub(TCP_HLEN), |i| {
            // SAFETY: one byte inside the packet (checked by bytes_at).
            bytes_at(data, data_end, opts + i, 1).map(|p| unsafe { *p })
        })
    } else {
        None
    };
    let fin = (fin_end(seq, payload_len.saturating_sub(hlen.into())), tsval);
    s.key6 = FlowKeyV6::new(f.dst, f.dport, f.src, f.sport, f.proto);
    let known = maps::nat64_flow(&s.key6);
    let flow = match known {
        Some(t)
            if t.backend_addr == backend_addr
                && t.backend_port == backend_port
                && t.snat_addr == snat_addr
                && still_ours(f, &t, fin, s) =>
        {
            t
        }
        // A new flow (or the rule or the route changed): a new source port.
        _ if may_start_flow(f.proto, f.tcp_flags) => {
            let flow = Nat64Flow {
                snat_addr,
                backend_addr,
                snat_port: [0; 2],
                backend_port,
                stats_slot: backend.stats_slot(),
            };
            allocate(ctx, f, (seq, tsval), s, flow)?
        }
        _ => return Err(Reason::PassNoFlow),
    };

    // The checksum difference of the pseudo-header addresses, taken before they go.
    let diff = pseudo_diff((&f.src, &f.dst), (&flow.snat_addr, &flow.backend_addr));
    ipv4_header(
        &mut s.header,
        tclass,
        tot_len,
        hop_limit - 1,
        f.proto,
        flow.snat_addr,
        flow.backend_addr,
    );
    // SAFETY: the first 20 bytes of the 40-byte buffer, as an array reference.
    let header = unsafe { &*(s.header.as_ptr() as *const [u8; IPV4_HLEN]) };
    let ports = ((f.sport, flow.snat_port), (f.dport, flow.backend_port));
    if !change_family(ctx, ETH_P_IP, header, f.proto, diff, ports)? {
        return Ok(Verdict::Drop);
    }
    maps::count_rule(flow.stats_slot, ctx.len() as u64, false);
    count(Reason::Nat64Translated);
    Ok(Verdict::RedirectNeigh(out_ifindex))
}

/// `skb->gso_size`: a GSO packet's payload bytes a segment (0: not a GSO packet).
#[inline(always)]
fn gso_size(ctx: &TcContext) -> u32 {
    // SAFETY: reading a field of the kernel-provided __sk_buff.
    unsafe { (*ctx.skb.skb).gso_size }
}

/// The length of `f`'s TCP (with options) or UDP header, and its TCP sequence number
/// (0 for UDP).
#[inline(always)]
fn l4_header(ctx: &TcContext, f: &Ipv6Flow) -> Result<(u8, u32), Reason> {
    if f.is_udp() {
        return Ok((UDP_HLEN as u8, 0));
    }
    let l4 =
        bytes_at(ctx.data(), ctx.data_end(), f.l4_off, TCP_HLEN).ok_or(Reason::Nat64Unsupported)?;
    // SAFETY: the 20-byte TCP header is inside the packet (checked above).
    unsafe {
        let q = l4.add(TCP_SEQ_OFF);
        Ok((
            tcp_hlen(*l4.add(TCP_DOFF_OFF)),
            u32::from_be_bytes([*q, *q.add(1), *q.add(2), *q.add(3)]),
        ))
    }
}

/// Whether the flow `t` of the client's packet `f` still holds its port (the port may
/// have gone to a new flow once this one looked over); if so, its last packet is now
/// (`fin`: where the packet's FIN, if any, ends, and its timestamp).
#[inline(always)]
fn still_ours(f: &Ipv6Flow, t: &Nat64Flow, fin: (u32, Option<u32>), s: &mut Scratch) -> bool {
    s.key4 = FlowKeyV4::new(
        t.backend_addr,
        t.backend_port,
        t.snat_addr,
        t.snat_port,
        f.proto,
    );
    let Some(r) = maps::nat64_reply_mut(&s.key4) else {
        return false;
    };
    if !r.belongs_to(f) {
        return false;
    }
    seen(r, f.proto, f.tcp_flags, true);
    // What a takeover of the port compares a SYN with (Nat64Reply::may_take_over).
    if f.proto == portfwd_common::proto::TCP && f.tcp_flags & TCP_FIN != 0 {
        r.client_fin_end = fin.0;
        r.client_fin_tsval = fin.1.unwrap_or(0);
        r.flags &= !NAT64_FIN_CLIENT_TS;
        if fin.1.is_some() {
            r.flags |= NAT64_FIN_CLIENT_TS;
        }
    }
    true
}

/// Marks a packet of the flow `r`, from the client or the backend: its time, and the
/// TCP state it leads to ([`track_tcp`]).
#[inline(always)]
fn seen(r: &mut Nat64Reply, proto: u8, tcp_flags: u8, from_client: bool) {
    // SAFETY: a plain helper call.
    r.last_seen_ns = unsafe { bpf_ktime_get_coarse_ns() };
    if proto == portfwd_common::proto::TCP {
        r.flags = track_tcp(r.flags, tcp_flags, from_client);
    }
}

/// A source port for a new flow (`flow` without one): tried from a hash of the client,
/// the first one whose reply key is free (`BPF_NOEXIST`), or held by a flow that is over
/// ([`Nat64Reply::reusable`]), wins; failing that, the first one held by a closed TCP
/// connection that the SYN (sequence number and timestamp `syn`) may take over
/// ([`Nat64Reply::may_take_over`]: the backend takes the SYN even if it holds the old
/// connection in `TIME_WAIT`), as conntrack's NAT does when it runs out of tuples
/// (without it, a client's connection churn holds every port for 10 s after each close:
/// 4,536 ports last 454 connections a second); failing that, the one closed longest ago
/// (its port has waited longest), counted apart. Then the flow is recorded both ways
/// (`s.key6` is its key).
#[inline(always)]
fn allocate(
    ctx: &TcContext,
    f: &Ipv6Flow,
    syn: (u32, Option<u32>),
    s: &mut Scratch,
    flow: Nat64Flow,
) -> Result<Nat64Flow, Reason> {
    let start = port_start(&f.src, f.sport);
    s.reply = Nat64Reply {
        client_addr: f.src,
        host_addr: f.dst,
        client_port: f.sport,
        host_port: f.dport,
        stats_slot: flow.stats_slot,
        client_ifindex: tc_ifindex(ctx),
        client_fin_end: 0,
        client_fin_tsval: 0,
        flags: 0,
        _pad: [0; 3],
        // SAFETY: a plain helper call.
        last_seen_ns: unsafe { bpf_ktime_get_coarse_ns() },
    };
    let mut n: u16 = 0;
    // The first candidate a closed connection holds that may be taken over, and the one
    // closed longest ago, with its time (NAT64_PORT_TRIES: none).
    let (mut safe, mut oldest, mut oldest_ns) = (NAT64_PORT_TRIES, NAT64_PORT_TRIES, u64::MAX);
    while n < NAT64_PORT_TRIES {
        let port = port_candidate(start, n);
        s.key4 = FlowKeyV4::new(
            flow.backend_addr,
            flow.backend_port,
            flow.snat_addr,
            port,
            f.proto,
        );
        // A free port is claimed only if still free, so two CPUs cannot both get it; a
        // port whose flow is over is taken over.
        let claimed = match maps::nat64_reply(&s.key4) {
            None => maps::insert_nat64_reply(&s.key4, &s.reply, false).is_ok(),
            Some(r) if r.reusable(s.reply.last_seen_ns, f.proto) => {
                maps::insert_nat64_reply(&s.key4, &s.reply, true).is_ok()
            }
            Some(r) => {
                if safe == NAT64_PORT_TRIES && r.may_take_over(f.proto, syn.0, syn.1) {
                    safe = n;
                }
                if r.closed(f.proto) && (oldest == NAT64_PORT_TRIES || r.last_seen_ns < oldest_ns) {
                    oldest = n;
                    oldest_ns = r.last_seen_ns;
                }
                false
            }
        };
        if claimed {
            return record(s, flow, port);
        }
        n += 1;
    }
    let early = safe == NAT64_PORT_TRIES;
    let closed = if early { oldest } else { safe };
    if closed < NAT64_PORT_TRIES {
        let port = port_candidate(start, closed);
        s.key4 = FlowKeyV4::new(
            flow.backend_addr,
            flow.backend_port,
            flow.snat_addr,
            port,
            f.proto,
        );
        if maps::insert_nat64_reply(&s.key4, &s.reply, true).is_ok() {
            count(Reason::Nat64PortReclaimed);
            if early {
                count(Reason::Nat64PortReclaimedEarly);
            }
            return record(s, flow, port);
        }
    }
    Err(Reason::Nat64NoPort)
}

/// The flow's port is `port` (its reply entry, `s.key4`, written): records the flow.
#[inline(always)]
fn record(s: &mut Scratch, mut flow: Nat64Flow, port: [u8; 2]) -> Result<Nat64Flow, Reason> {
    flow.snat_port = port;
    if maps::insert_nat64_flow(&s.key6, &flow).is_err() {
        maps::remove_nat64_reply(&s.key4);
        return Err(Reason::FlowInsertFailed);
    }
    Ok(flow)
}

/// A backend's IPv4 packet to one of NAT64's ports: back to IPv6 and the client, if it
/// is a tracked reply (`Err`: passed, for that reason).
#[inline(always)]
fn reply(ctx: &TcContext, f: &Ipv4Flow) -> Result<Verdict, Reason> {
    let s = maps::nat64_scratch().ok_or(Reason::Nat64Failed)?;
    s.key4 = FlowKeyV4::new(f.src, f.sport, f.dst, f.dport, f.proto);
    // The entry found the flow; it can have gone since (taken over, evicted).
    let r = maps::nat64_reply_mut(&s.key4).ok_or(Reason::Nat64ReplyNoFlow)?;
    seen(r, f.proto, f.tcp_flags, false);
    s.reply = *r;
    Ok(match try_reply(ctx, f, s) {
        Ok(v) => v,
        Err(reason) => {
            count(reason);
            Verdict::Pass
        }
    })
}

#[inline(always)]
fn try_reply(ctx: &TcContext, f: &Ipv4Flow, s: &mut Scratch) -> Result<Verdict, Reason> {
    // No VLAN tag, no IPv4 options: the fixed layout the header rewrite assumes.
    if f.ip_off != ETH_HLEN || f.l4_off != ETH_HLEN + IPV4_HLEN {
        return Err(Reason::Nat64Unsupported);
    }
    let ip = bytes_at(ctx.data(), ctx.data_end(), f.ip_off, IPV4_HLEN)
        .ok_or(Reason::Nat64Unsupported)?;
    // SAFETY: the 20-byte IPv4 header is inside the packet (checked above).
    let (tos, tot_len, ttl) = unsafe {
        (
            *ip.add(1),
            u16::from_be_bytes([*ip.add(2), *ip.add(3)]),
            *ip.add(8),
        )
    };
    if ttl <= 1 {
        return Err(Reason::Nat64HopLimit);
    }
    if tot_len < IPV4_HLEN as u16 {
        return Err(Reason::Nat64Unsupported);
    }
    // A UDP datagram without a checksum cannot be made IPv6 by a difference.
    if f.is_udp() {
        let l4 = bytes_at(ctx.data(), ctx.data_end(), f.l4_off, UDP_HLEN)
            .ok_or(Reason::Nat64Unsupported)?;
        // SAFETY: the 8-byte UDP header is inside the packet (checked above).
        if unsafe { *l4.add(UDP_CSUM_OFF) | *l4.add(UDP_CSUM_OFF + 1) } == 0 {
            return Err(Reason::Nat64Unsupported);
        }
    }
    let back = &s.reply;
    let diff = pseudo_diff((&f.src, &f.dst), (&back.host_addr, &back.client_addr));
    let (host_port, client_port, slot, out) = (
        back.host_port,
        back.client_port,
        back.stats_slot,
        back.client_ifindex,
    );
    ipv6_header(
        &mut s.header,
        tos,
        tot_len - IPV4_HLEN as u16,
        f.proto,
        ttl - 1,
        &s.reply.host_addr,
        &s.reply.client_addr,
    );
    let ports = ((f.sport, host_port), (f.dport, client_port));
    if !change_family(ctx, ETH_P_IPV6, &s.header, f.proto, diff, ports)? {
        return Ok(Verdict::Drop);
    }
    maps::count_rule(slot, ctx.len() as u64, true);
    count(Reason::Nat64ReplyTranslated);
    Ok(Verdict::RedirectNeigh(out))
}

/// Changes the packet's family to `ethertype`: the new L3 `header` (its length is the
/// family's), the Ethernet type, then the L4 side ([`l4_rewrite`]). `Err`: nothing
/// changed (the packet may go on as it was); `Ok(false)`: a helper failed after the
/// family changed, the packet must be dropped (counted).
#[inline(always)]
fn change_family<const H: usize>(
    ctx: &TcContext,
    ethertype: u16,
    header: &[u8; H],
    proto: u8,
    diff: u64,
    ports: PortChanges,
) -> Result<bool, Reason> {
    ctx.change_proto(ethertype.to_be(), 0)
        .map_err(|_| Reason::Nat64Failed)?;
    let written = ctx
        .store(ETH_HLEN, header, BPF_F_RECOMPUTE_CSUM as u64)
        .and_then(|_| ctx.store(ETH_PROTO_OFF, &ethertype.to_be_bytes(), 0))
        .map_err(|_| RewriteError::Helper)
        .and_then(|_| l4_rewrite(ctx, proto, ETH_HLEN + H, diff, ports.0, ports.1));
    match written {
        Ok(()) => Ok(true),
        Err(e) => {
            count(e.reason());
            Ok(false)
        }
    }
}

/// (old, new) of the source port, then of the destination port.
type PortChanges = (([u8; 2], [u8; 2]), ([u8; 2], [u8; 2]));

/// The L4 side of a family change at `l4_off`: the pseudo-header difference `diff`, then
/// the source and destination ports (old, new).
#[inline(always)]
fn l4_rewrite(
    ctx: &TcContext,
    proto: u8,
    l4_off: usize,
    diff: u64,
    sport: ([u8; 2], [u8; 2]),
    dport: ([u8; 2], [u8; 2]),
) -> Result<(), RewriteError> {
    let udp = proto == portfwd_common::proto::UDP;
    let csum_off = l4_off + l4_csum_off(proto);
    let mangled = if udp { BPF_F_MARK_MANGLED_0 } else { 0 };
    // Size 0: `diff` is a precomputed difference. No BPF_F_IPV6: the header bytes were
    // written with BPF_F_RECOMPUTE_CSUM, so only the checksum field's own change is left
    // to account for in a complete skb->csum.
    ctx.l4_csum_replace(csum_off, 0, diff, BPF_F_PSEUDO_HDR as u64 | mangled)
        .map_err(|_| RewriteError::Helper)?;
    let port = |at: usize, (old, new): ([u8; 2], [u8; 2])| {
        ctx.store(l4_off + at, &new, 0)
            .map_err(|_| RewriteError::Helper)?;
        ctx.l4_csum_replace(
            csum_off,
            u16::from_ne_bytes(old) as u64,
            u16::from_ne_bytes(new) as u64,
            mangled | 2,
        )
        .map_err(|_| RewriteError::Helper)
    };
    port(0, sport)?;
    port(2, dport)
}
