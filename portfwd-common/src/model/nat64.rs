//! The NAT64 program (`portfwd_tc_nat64`, reached by tail call from TC ingress or from
//! `portfwd_tc_nat64_entry`) as a model: an IPv6 client's packet for an IPv4-only
//! backend becomes IPv4 (source: the host's address towards the backend and a NAT64
//! port; destination: the backend), and the backend's reply becomes IPv6 again.
//!
//! Invariant: the same decisions and bytes as `portfwd-ebpf/src/nat64.rs`, built on
//! [`crate::nat64`] (port search, headers, pseudo-header difference). The family change
//! is `bpf_skb_change_proto`'s: 6→4 removes the 20 bytes after the Ethernet header, 4→6
//! inserts 20 there; the program then writes the whole new L3 header. The L4 checksum
//! goes through the kernel's own helper arithmetic, in memory order
//! (`include/net/checksum.h`: `csum_add`, `csum_fold`, `inet_proto_csum_replace_by_diff`,
//! `inet_proto_csum_replace4`; `bpf_l4_csum_replace`'s `BPF_F_MARK_MANGLED_0`), as on a
//! `CHECKSUM_NONE` skb (BPF_PROG_RUN's, and a wire frame's). The FIB's answer, the time
//! and the ingress interface come from [`Nat64Maps`].

use crate::{
    addr,
    nat64::{
        fin_end, ipv4_header, ipv6_header, mtu_len, port_candidate, port_start, pseudo_diff,
        tcp_hlen, tcp_tsval, track_tcp,
    },
    packet::{
        may_start_flow, ETH_HLEN, ETH_PROTO_OFF, ETH_P_IP, ETH_P_IPV6, IPV4_MIN_HLEN, IPV6_HLEN,
        TCP_DOFF_OFF, TCP_FIN, TCP_HLEN, TCP_SEQ_OFF, TCP_SYN, UDP_CSUM_OFF, UDP_HLEN,
    },
    proto,
    rules::{self, Caller},
    BackendV6, FlowKeyV4, FlowKeyV6, Nat64Flow, Nat64Reply, Reason, NAT64_FIN_CLIENT_TS,
    NAT64_PORT_TRIES,
};

use super::{parse_eth, parse_ipv4, parse_ipv6, Flow, Maps, RuleCount, Verdict, L3};

/// The FIB's route to a backend: the host's address on it and the interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// The host's address on the route (the translated source).
    pub src: [u8; 4],
    /// The interface towards the backend.
    pub ifindex: u32,
    /// The route's MTU (the interface's).
    pub mtu: u16,
}

/// What NAT64 reads beyond [`Maps`].
pub trait Nat64Maps: Maps {
    /// `NAT64_FLOWS[key]`.
    fn nat64_flow(&self, key: &FlowKeyV6) -> Option<Nat64Flow>;
    /// `NAT64_REPLIES[key]`.
    fn nat64_reply(&self, key: &FlowKeyV4) -> Option<Nat64Reply>;
    /// `bpf_fib_lookup` (`BPF_FIB_LOOKUP_SRC`) towards `dst`.
    fn route_v4(&self, dst: [u8; 4]) -> Option<Route>;
    /// The interface the packet is on (`skb->ifindex`).
    fn ingress_ifindex(&self) -> u32;
    /// `bpf_ktime_get_coarse_ns` at the run.
    fn now_ns(&self) -> u64;
    /// `skb->gso_size`: a GSO packet's payload bytes a segment (0: not a GSO packet).
    fn gso_size(&self) -> u32 {
        0
    }
}

/// What the NAT64 program does with one frame; the output frame is `out[..len]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nat64Outcome {
    /// What the program returns.
    pub verdict: Verdict,
    /// The output frame's length.
    pub len: usize,
    /// The reason counted.
    pub reason: Reason,
    /// `NAT64_FLOWS` written.
    pub flow: Option<(FlowKeyV6, Nat64Flow)>,
    /// `NAT64_REPLIES` written: a new entry, or a known one marked seen (its time
    /// `now_ns`, and closing after a TCP FIN or RST).
    pub reply: Option<(FlowKeyV4, Nat64Reply)>,
    /// The rule counter incremented, if any.
    pub rule: Option<RuleCount>,
    /// A closed connection's port was taken over: [`Reason::Nat64PortReclaimed`] counted
    /// beside [`Reason::Nat64Translated`].
    pub reclaimed: bool,
    /// ... and none of the closed candidates was one the backend surely accepts the SYN
    /// on ([`Nat64Reply::may_take_over`]): [`Reason::Nat64PortReclaimedEarly`] counted too.
    pub reclaimed_early: bool,
}

/// Whether `portfwd_tc_nat64_entry` jumps to NAT64 for `frame` (else the frame goes on,
/// untouched and uncounted).
pub fn entry(maps: &impl Nat64Maps, frame: &[u8]) -> bool {
    match parse_eth(frame) {
        Ok(L3::Ipv4(ip_off)) => parse_ipv4(frame, ip_off).is_ok_and(|f| {
            crate::nat64::is_nat64_port(f.dport) && maps.is_nat64_reply(&reply_key(&f))
        }),
        Ok(L3::Ipv6(ip_off)) => parse_ipv6(frame, ip_off).is_ok_and(|f| {
            rules::lookup(maps, Caller::Packet, f.dst, f.dport, f.proto)
                .is_ok_and(|b: BackendV6| b.is_ipv4_mapped())
        }),
        Err(_) => false,
    }
}

/// Runs the NAT64 program on `input`, writing the output frame to `out` (at least
/// `input.len() + 20` bytes).
pub fn program(maps: &impl Nat64Maps, input: &[u8], out: &mut [u8]) -> Nat64Outcome {
    out[..input.len()].copy_from_slice(input);
    let mut o = Nat64Outcome {
        verdict: Verdict::Pass,
        len: input.len(),
        reason: Reason::Nat64Failed,
        flow: None,
        reply: None,
        rule: None,
        reclaimed: false,
        reclaimed_early: false,
    };
    let done = match parse_eth(input) {
        Ok(L3::Ipv6(ip_off)) => parse_ipv6(input, ip_off).and_then(|f| {
            let b: BackendV6 = rules::lookup(maps, Caller::Packet, f.dst, f.dport, f.proto)?;
            if !b.is_ipv4_mapped() {
                return Err(Reason::Nat64Failed);
            }
            forward(maps, input, out, &f, &b, &mut o)
        }),
        Ok(L3::Ipv4(ip_off)) => {
            parse_ipv4(input, ip_off).and_then(|f| reply(maps, input, out, &f, &mut o))
        }
        Err(reason) => Err(reason),
    };
    if let Err(reason) = done {
        // Passed as it came (nothing changed before a failure that passes).
        out[..input.len()].copy_from_slice(input);
        o.verdict = Verdict::Pass;
        o.len = input.len();
        o.reason = reason;
        o.rule = None;
        o.reclaimed = false;
        o.reclaimed_early = false;
    }
    o
}

fn reply_key(f: &Flow<4>) -> FlowKeyV4 {
    FlowKeyV4::new(f.src, f.sport, f.dst, f.dport, f.proto)
}

/// A packet of the flow `r` seen now, from the client or the backend: its time, the
/// TCP state it leads to ([`track_tcp`]), and for the client's FIN, `fin` (the sequence
/// number past it, its timestamp).
fn seen(
    maps: &impl Nat64Maps,
    mut r: Nat64Reply,
    l4: u8,
    tcp_flags: u8,
    from_client: bool,
    fin: (u32, Option<u32>),
) -> Nat64Reply {
    r.last_seen_ns = maps.now_ns();
    if l4 == proto::TCP {
        r.flags = track_tcp(r.flags, tcp_flags, from_client);
        if from_client && tcp_flags & TCP_FIN != 0 {
            r.client_fin_end = fin.0;
            r.client_fin_tsval = fin.1.unwrap_or(0);
            r.flags &= !NAT64_FIN_CLIENT_TS;
            if fin.1.is_some() {
                r.flags |= NAT64_FIN_CLIENT_TS;
            }
        }
    }
    r
}

fn forward(
    maps: &impl Nat64Maps,
    input: &[u8],
    out: &mut [u8],
    f: &Flow<16>,
    backend: &BackendV6,
    o: &mut Nat64Outcome,
) -> Result<(), Reason> {
    // A VLAN tag keeps its offsets: not translated.
    if f.ip_off != ETH_HLEN {
        return Err(Reason::Nat64Unsupported);
    }
    let ip = &input[ETH_HLEN..ETH_HLEN + IPV6_HLEN];
    let tclass = (ip[0] << 4) | (ip[1] >> 4);
    let payload_len = u16::from_be_bytes([ip[4], ip[5]]);
    let hop_limit = ip[7];
    if hop_limit <= 1 {
        return Err(Reason::Nat64HopLimit);
    }
    let backend_addr = addr::ipv4_mapped(&backend.addr_bytes()).ok_or(Reason::Nat64Failed)?;
    let backend_port = backend.port_be();
    // An IPv6 payload too long for an IPv4 packet is not translated.
    let tot_len = payload_len
        .checked_add(IPV4_MIN_HLEN as u16)
        .ok_or(Reason::Nat64TooBig)?;
    let route = maps.route_v4(backend_addr).ok_or(Reason::Nat64NoRoute)?;
    // `bpf_fib_lookup` is given the translated packet's length, or a GSO packet's
    // segment's, and refuses a route whose MTU it exceeds.
    let l4_hlen = match f.proto {
        proto::UDP => UDP_HLEN as u8,
        _ => tcp_hlen(input[f.l4_off + TCP_DOFF_OFF]),
    };
    if mtu_len(tot_len, maps.gso_size(), l4_hlen) > route.mtu {
        return Err(Reason::Nat64TooBig);
    }
    // TCP: the segment's sequence number, where a FIN of it ends, and a SYN's or FIN's
    // timestamp.
    let (seq, tsval) = match f.proto {
        proto::TCP => {
            let at = f.l4_off + TCP_SEQ_OFF;
            let seq = u32::from_be_bytes([input[at], input[at + 1], input[at + 2], input[at + 3]]);
            let opts = f.l4_off + TCP_HLEN;
            let tsval = if f.tcp_flags & (TCP_SYN | TCP_FIN) != 0 {
                tcp_tsval(usize::from(l4_hlen).saturating_sub(TCP_HLEN), |i| {
                    input.get(opts + i).copied()
                })
            } else {
                None
            };
            (seq, tsval)
        }
        _ => (0, None),
    };
    let fin = (
        fin_end(seq, payload_len.saturating_sub(l4_hlen.into())),
        tsval,
    );

    let key6 = FlowKeyV6::new(f.dst, f.dport, f.src, f.sport, f.proto);
    let flow = match maps.nat64_flow(&key6) {
        Some(t)
            if t.backend_addr == backend_addr
                && t.backend_port == backend_port
                && t.snat_addr == route.src
                && still_ours(maps, f, &t, fin, o) =>
        {
            t
        }
        _ if may_start_flow(f.proto, f.tcp_flags) => {
            let flow = Nat64Flow {
                snat_addr: route.src,
                backend_addr,
                snat_port: [0; 2],
                backend_port,
                stats_slot: backend.stats_slot(),
            };
            allocate(maps, f, (seq, tsval), key6, flow, o)?
        }
        _ => return Err(Reason::PassNoFlow),
    };

    let diff = pseudo_diff((&f.src, &f.dst), (&flow.snat_addr, &flow.backend_addr));
    let mut h = [0u8; IPV6_HLEN];
    ipv4_header(
        &mut h,
        tclass,
        tot_len,
        hop_limit - 1,
        f.proto,
        flow.snat_addr,
        flow.backend_addr,
    );
    // bpf_skb_change_proto 6→4: the 20 bytes after the Ethernet header go.
    let len = input.len() - (IPV6_HLEN - IPV4_MIN_HLEN);
    out[..ETH_HLEN].copy_from_slice(&input[..ETH_HLEN]);
    out[ETH_HLEN + IPV4_MIN_HLEN..len].copy_from_slice(&input[ETH_HLEN + IPV6_HLEN..]);
    out[ETH_HLEN..ETH_HLEN + IPV4_MIN_HLEN].copy_from_slice(&h[..IPV4_MIN_HLEN]);
    out[ETH_PROTO_OFF..ETH_PROTO_OFF + 2].copy_from_slice(&ETH_P_IP.to_be_bytes());
    let l4_off = ETH_HLEN + IPV4_MIN_HLEN;
    l4_rewrite(
        &mut out[..len],
        f.proto,
        l4_off,
        diff,
        (f.sport, flow.snat_port),
        (f.dport, flow.backend_port),
    );
    o.verdict = Verdict::RedirectNeigh(route.ifindex);
    o.len = len;
    o.reason = Reason::Nat64Translated;
    o.rule = Some(RuleCount {
        slot: flow.stats_slot,
        reply: false,
    });
    Ok(())
}

/// Whether the flow `t` still holds its port; if so it is marked seen (`fin`: where the
/// packet's FIN, if any, ends, and its timestamp).
fn still_ours(
    maps: &impl Nat64Maps,
    f: &Flow<16>,
    t: &Nat64Flow,
    fin: (u32, Option<u32>),
    o: &mut Nat64Outcome,
) -> bool {
    let key4 = FlowKeyV4::new(
        t.backend_addr,
        t.backend_port,
        t.snat_addr,
        t.snat_port,
        f.proto,
    );
    let Some(r) = maps.nat64_reply(&key4) else {
        return false;
    };
    if !r.belongs_to(f) {
        return false;
    }
    o.reply = Some((key4, seen(maps, r, f.proto, f.tcp_flags, true, fin)));
    true
}

/// The first port from the client's hash whose reply key is free or whose flow is over;
/// failing that, the first one held by a closed TCP connection the SYN (sequence number
/// and timestamp `syn`) may take over ([`Nat64Reply::may_take_over`]); failing that, the
/// one held by the connection closed longest ago (the first of equals), taken over all
/// the same.
fn allocate(
    maps: &impl Nat64Maps,
    f: &Flow<16>,
    syn: (u32, Option<u32>),
    key6: FlowKeyV6,
    mut flow: Nat64Flow,
    o: &mut Nat64Outcome,
) -> Result<Nat64Flow, Reason> {
    let start = port_start(&f.src, f.sport);
    let now = maps.now_ns();
    let value = Nat64Reply {
        client_addr: f.src,
        host_addr: f.dst,
        client_port: f.sport,
        host_port: f.dport,
        stats_slot: flow.stats_slot,
        client_ifindex: maps.ingress_ifindex(),
        client_fin_end: 0,
        client_fin_tsval: 0,
        flags: 0,
        _pad: [0; 3],
        last_seen_ns: now,
    };
    let key = |n: u16| {
        let port = port_candidate(start, n);
        let key4 = FlowKeyV4::new(
            flow.backend_addr,
            flow.backend_port,
            flow.snat_addr,
            port,
            f.proto,
        );
        (port, key4)
    };
    let (mut safe, mut oldest) = (None, None::<(u16, u64)>);
    for n in 0..NAT64_PORT_TRIES {
        let (port, key4) = key(n);
        let claimed = match maps.nat64_reply(&key4) {
            None => true,
            Some(r) if r.reusable(now, f.proto) => true,
            Some(r) => {
                if safe.is_none() && r.may_take_over(f.proto, syn.0, syn.1) {
                    safe = Some(n);
                }
                if r.closed(f.proto) && oldest.is_none_or(|(_, t)| r.last_seen_ns < t) {
                    oldest = Some((n, r.last_seen_ns));
                }
                false
            }
        };
        if claimed {
            flow.snat_port = port;
            o.reply = Some((key4, value));
            o.flow = Some((key6, flow));
            return Ok(flow);
        }
    }
    let n = match (safe, oldest) {
        (Some(n), _) => n,
        (None, Some((n, _))) => {
            o.reclaimed_early = true;
            n
        }
        (None, None) => return Err(Reason::Nat64NoPort),
    };
    let (port, key4) = key(n);
    flow.snat_port = port;
    o.reply = Some((key4, value));
    o.flow = Some((key6, flow));
    o.reclaimed = true;
    Ok(flow)
}

fn reply(
    maps: &impl Nat64Maps,
    input: &[u8],
    out: &mut [u8],
    f: &Flow<4>,
    o: &mut Nat64Outcome,
) -> Result<(), Reason> {
    let key4 = reply_key(f);
    let back = maps.nat64_reply(&key4).ok_or(Reason::Nat64ReplyNoFlow)?;
    // Marked seen before anything else can fail.
    let back = seen(maps, back, f.proto, f.tcp_flags, false, (0, None));
    o.reply = Some((key4, back));
    // No VLAN tag, no IPv4 options.
    if f.ip_off != ETH_HLEN || f.l4_off != ETH_HLEN + IPV4_MIN_HLEN {
        return Err(Reason::Nat64Unsupported);
    }
    let ip = &input[ETH_HLEN..ETH_HLEN + IPV4_MIN_HLEN];
    let (tos, tot_len, ttl) = (ip[1], u16::from_be_bytes([ip[2], ip[3]]), ip[8]);
    if ttl <= 1 {
        return Err(Reason::Nat64HopLimit);
    }
    if tot_len < IPV4_MIN_HLEN as u16 {
        return Err(Reason::Nat64Unsupported);
    }
    // A UDP datagram without a checksum cannot be made IPv6 by a difference.
    let csum_at = f.l4_off + UDP_CSUM_OFF;
    if f.proto == proto::UDP && input[csum_at] | input[csum_at + 1] == 0 {
        return Err(Reason::Nat64Unsupported);
    }
    let diff = pseudo_diff((&f.src, &f.dst), (&back.host_addr, &back.client_addr));
    let mut h = [0u8; IPV6_HLEN];
    ipv6_header(
        &mut h,
        tos,
        tot_len - IPV4_MIN_HLEN as u16,
        f.proto,
        ttl - 1,
        &back.host_addr,
        &back.client_addr,
    );
    // bpf_skb_change_proto 4→6: 20 bytes inserted after the Ethernet header; the new
    // header covers them and the old one.
    let len = input.len() + (IPV6_HLEN - IPV4_MIN_HLEN);
    out[..ETH_HLEN].copy_from_slice(&input[..ETH_HLEN]);
    out[ETH_HLEN..ETH_HLEN + IPV6_HLEN].copy_from_slice(&h);
    out[ETH_HLEN + IPV6_HLEN..len].copy_from_slice(&input[ETH_HLEN + IPV4_MIN_HLEN..]);
    out[ETH_PROTO_OFF..ETH_PROTO_OFF + 2].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
    l4_rewrite(
        &mut out[..len],
        f.proto,
        ETH_HLEN + IPV6_HLEN,
        diff,
        (f.sport, back.host_port),
        (f.dport, back.client_port),
    );
    o.verdict = Verdict::RedirectNeigh(back.client_ifindex);
    o.len = len;
    o.reason = Reason::Nat64ReplyTranslated;
    o.rule = Some(RuleCount {
        slot: back.stats_slot,
        reply: true,
    });
    Ok(())
}

/// The L4 side of a family change: the pseudo-header difference, then both ports, each
/// as one `bpf_l4_csum_replace` (UDP with `BPF_F_MARK_MANGLED_0`).
fn l4_rewrite(
    frame: &mut [u8],
    l4: u8,
    l4_off: usize,
    diff: u64,
    sport: ([u8; 2], [u8; 2]),
    dport: ([u8; 2], [u8; 2]),
) {
    let udp = l4 == proto::UDP;
    let at = l4_off + crate::packet::l4_csum_off(l4);
    let field = |frame: &[u8]| u16::from_ne_bytes([frame[at], frame[at + 1]]);
    let check = l4_csum_replace(field(frame), udp, |sum| replace_by_diff(sum, diff as u32));
    frame[at..at + 2].copy_from_slice(&check.to_ne_bytes());
    for (port_at, (old, new)) in [(0, sport), (2, dport)] {
        frame[l4_off + port_at..l4_off + port_at + 2].copy_from_slice(&new);
        let (old, new) = (u16::from_ne_bytes(old), u16::from_ne_bytes(new));
        let check = l4_csum_replace(field(frame), udp, |sum| {
            replace4(sum, old.into(), new.into())
        });
        frame[at..at + 2].copy_from_slice(&check.to_ne_bytes());
    }
}

/// `bpf_l4_csum_replace`'s frame around one update: with `BPF_F_MARK_MANGLED_0` (UDP),
/// a zero checksum is left alone and a computed zero written as `0xffff`.
fn l4_csum_replace(sum: u16, mmzero: bool, update: impl Fn(u16) -> u16) -> u16 {
    if mmzero && sum == 0 {
        return 0;
    }
    match update(sum) {
        0 if mmzero => 0xffff,
        s => s,
    }
}

/// `csum_add`: 32-bit one's complement addition.
fn csum_add(a: u32, b: u32) -> u32 {
    let r = a.wrapping_add(b);
    r.wrapping_add(u32::from(r < b))
}

/// `csum_fold`: the complement of the 32-bit sum folded to 16 bits.
fn csum_fold(c: u32) -> u16 {
    let s = c.wrapping_add(c.rotate_left(16));
    !((s >> 16) as u16)
}

/// `inet_proto_csum_replace_by_diff` on a `CHECKSUM_NONE` skb.
fn replace_by_diff(sum: u16, diff: u32) -> u16 {
    csum_fold(csum_add(diff, !u32::from(sum)))
}

/// `csum_replace4` (what `inet_proto_csum_replace2/4` do on a `CHECKSUM_NONE` skb).
fn replace4(sum: u16, from: u32, to: u32) -> u16 {
    let tmp = csum_add(!u32::from(sum), !from);
    csum_fold(csum_add(tmp, to))
}
