//! The translation itself, written once for every hook: `ingress` (destination NAT of a
//! published port) and `reply` (source NAT of the backend's answers). How the bytes and
//! checksums are written differs per hook and lives behind [`Packet`] (`hook.rs`).
//!
//! Both families share the entry points: the parser branches once on the ethertype, and
//! each family has its own maps (`RULES_V4`/`RULES_V6`, ...). IPv6 has no header
//! checksum; its pseudo-header covers both addresses, so an address rewrite changes the
//! L4 checksum only. The fast path (FIB lookup and redirect, `fastpath.rs`) serves
//! both families.

use portfwd_common::{
    packet::{may_start_flow, promotes},
    rules, BackendV4, BackendV6, FlowKeyV4, FlowKeyV6, FlowV4, FlowV6, Reason,
    CONFIG_FAST_PATH_NO_PEER, CONFIG_NO_NAT64,
};

use crate::{
    fastpath,
    hook::{End, Packet, Verdict},
    maps::{self, count, Maps},
    packet::{locate_ipv4, locate_ipv6, parse_eth, Headers, Ipv4Flow, Ipv6Flow, L3},
};

#[inline(always)]
/// `fast_path_bit`: the `CONFIG_FAST_PATH_*` bit that enables the fast path at this hook.
pub fn ingress<P: Packet>(pkt: &mut P, fast_path_bit: u64) -> Verdict {
    let (data, data_end) = (pkt.data(), pkt.data_end());
    let parsed = match parse_eth(data, data_end) {
        Ok(L3::Ipv4 { ip_off }) => {
            locate_ipv4(data, data_end, ip_off).map(|h| ingress_v4(pkt, h, fast_path_bit))
        }
        Ok(L3::Ipv6 { ip_off }) => {
            locate_ipv6(data, data_end, ip_off).map(|h| ingress_v6(pkt, h, fast_path_bit))
        }
        Err(reason) => Err(reason),
    };
    parsed.unwrap_or_else(pass)
}

#[inline(always)]
pub fn reply<P: Packet>(pkt: &mut P) -> Verdict {
    let (data, data_end) = (pkt.data(), pkt.data_end());
    let parsed = match parse_eth(data, data_end) {
        Ok(L3::Ipv4 { ip_off }) => locate_ipv4(data, data_end, ip_off).map(|h| reply_v4(pkt, h)),
        Ok(L3::Ipv6 { ip_off }) => locate_ipv6(data, data_end, ip_off).map(|h| reply_v6(pkt, h)),
        Err(reason) => Err(reason),
    };
    parsed.unwrap_or_else(pass)
}

#[inline(always)]
fn ingress_v4<P: Packet>(pkt: &mut P, headers: Headers<4>, fast_path_bit: u64) -> Verdict {
    let dport = headers.dport();
    // A NAT64 flow's reply, on the backend's interface: its port is no published one.
    if portfwd_common::nat64::is_nat64_port(dport) {
        if let Some(v) = pkt.nat64_reply(&headers.flow()) {
            return v;
        }
    }
    // The destination port settles most packets; the rest of the flow is read after.
    let port = match rules::packet_port::<[u8; 4], _>(&Maps, dport, headers.proto) {
        Ok(port) => port,
        Err(reason) => return pass(reason),
    };
    let flow = headers.flow();
    let backend = match rules::packet_rule(&Maps, port, &flow.dst, flow.dport, flow.proto) {
        Ok(b) => b,
        Err(reason) => return pass(reason),
    };
    record_flow(&flow, &backend);
    if let Err(e) = pkt.rewrite(&flow, End::Dst, backend.addr_bytes(), backend.port_be()) {
        count(e.reason());
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
    if !pkt.may_redirect() {
        count(Reason::FastPathFallback);
        return Verdict::Pass;
    }
    match fastpath::next_hop(pkt, &translated) {
        Some(hop) if pkt.forward(&translated, hop.smac, hop.dmac).is_ok() => {
            count(Reason::Redirected);
            redirect(&hop)
        }
        _ => {
            count(Reason::FastPathFallback);
            Verdict::Pass
        }
    }
}

/// Counts why the packet is passed untouched, and passes it.
#[inline(always)]
fn pass(reason: Reason) -> Verdict {
    count(reason);
    Verdict::Pass
}

/// The fast path's verdict for `hop`.
#[inline(always)]
fn redirect(hop: &fastpath::NextHop) -> Verdict {
    if hop.peer && maps::config().flags & CONFIG_FAST_PATH_NO_PEER == 0 {
        Verdict::RedirectPeer(hop.port_ifindex)
    } else {
        Verdict::Redirect(hop.port_ifindex)
    }
}

#[inline(always)]
fn reply_v4<P: Packet>(pkt: &mut P, headers: Headers<4>) -> Verdict {
    // Most of what leaves a published interface is the host's own traffic: one array
    // read of the source port tells it from a backend's reply, before the flow is read.
    if !maps::is_backend_port(headers.sport(), headers.proto) {
        return pass(Reason::PassNoFlow);
    }
    let flow = headers.flow();
    let key = FlowKeyV4::new(flow.src, flow.sport, flow.dst, flow.dport, flow.proto);
    // Established flows first: they pay one lookup, as before embryonic state existed.
    let tracked = match maps::conntrack_v4(&key) {
        Some(t) => t,
        None => match maps::embryonic_v4(&key) {
            Some(t) => {
                if promotes(flow.proto, flow.tcp_flags) {
                    promote(maps::promote_v4(&key, &t));
                }
                t
            }
            None => return pass(Reason::PassNoFlow),
        },
    };
    if let Err(e) = pkt.rewrite(
        &flow,
        End::Src,
        tracked.host_addr_bytes(),
        tracked.host_port_be(),
    ) {
        count(e.reason());
        return Verdict::Drop;
    }
    maps::count_rule(tracked.stats_slot(), pkt.len(), true);
    count(Reason::ReplyTranslated);
    Verdict::Pass
}

/// Counts a promotion, or its failed insert (the flow stays embryonic and the next
/// packet tries again).
#[inline(always)]
fn promote(done: Result<(), maps::InsertFailed>) {
    count(match done {
        Ok(()) => Reason::FlowPromoted,
        Err(_) => Reason::FlowInsertFailed,
    });
}

/// Records the flow so that replies are translated back: only a packet that may start
/// one (UDP, TCP SYN) is looked at; it goes to the embryonic table unless the flow is
/// established already (`maps::record_embryonic_v4`), so spoofed SYNs never compete
/// with established flows for their table's slots.
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
    if maps::record_embryonic_v4(&key, &value).is_err() {
        count(Reason::FlowInsertFailed);
    }
}

#[inline(always)]
fn ingress_v6<P: Packet>(pkt: &mut P, headers: Headers<16>, fast_path_bit: u64) -> Verdict {
    // As for IPv4: the destination port first.
    let port = match rules::packet_port::<[u8; 16], _>(&Maps, headers.dport(), headers.proto) {
        Ok(port) => port,
        Err(reason) => return pass(reason),
    };
    let flow = headers.flow();
    let backend = match rules::packet_rule(&Maps, port, &flow.dst, flow.dport, flow.proto) {
        Ok(b) => b,
        Err(reason) => return pass(reason),
    };
    if backend.is_ipv4_mapped() {
        if maps::config().flags & CONFIG_NO_NAT64 != 0 {
            count(Reason::PassNoIpv6Backend);
            return Verdict::Pass;
        }
        return pkt.nat64(&flow, &backend);
    }
    record_flow_v6(&flow, &backend);
    if let Err(e) = pkt.rewrite_v6(&flow, End::Dst, backend.addr_bytes(), backend.port_be()) {
        count(e.reason());
        return Verdict::Drop;
    }
    maps::count_rule(backend.stats_slot(), pkt.len(), false);
    count(Reason::Translated);
    let translated = Ipv6Flow {
        dst: backend.addr_bytes(),
        dport: backend.port_be(),
        ..flow
    };
    if maps::config().flags & fast_path_bit == 0 {
        return Verdict::Pass;
    }
    if !pkt.may_redirect() {
        count(Reason::FastPathFallback);
        return Verdict::Pass;
    }
    match fastpath::next_hop_v6(pkt, &translated) {
        Some(hop) if pkt.forward_v6(&translated, hop.smac, hop.dmac).is_ok() => {
            count(Reason::Redirected);
            redirect(&hop)
        }
        _ => {
            count(Reason::FastPathFallback);
            Verdict::Pass
        }
    }
}

#[inline(always)]
fn reply_v6<P: Packet>(pkt: &mut P, headers: Headers<16>) -> Verdict {
    if !maps::is_backend_port(headers.sport(), headers.proto) {
        return pass(Reason::PassNoFlow);
    }
    let flow = headers.flow();
    let key = FlowKeyV6::new(flow.src, flow.sport, flow.dst, flow.dport, flow.proto);
    let tracked = match maps::conntrack_v6(&key) {
        Some(t) => t,
        None => match maps::embryonic_v6(&key) {
            Some(t) => {
                if promotes(flow.proto, flow.tcp_flags) {
                    promote(maps::promote_v6(&key, &t));
                }
                t
            }
            None => return pass(Reason::PassNoFlow),
        },
    };
    if let Err(e) = pkt.rewrite_v6(
        &flow,
        End::Src,
        tracked.host_addr_bytes(),
        tracked.host_port_be(),
    ) {
        count(e.reason());
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
    if maps::record_embryonic_v6(&key, &value).is_err() {
        count(Reason::FlowInsertFailed);
    }
}
