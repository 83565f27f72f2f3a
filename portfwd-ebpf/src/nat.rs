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
    rules::{self, Caller},
    BackendV4, BackendV6, FlowKeyV4, FlowKeyV6, FlowV4, FlowV6, Reason, CONFIG_FAST_PATH_NO_PEER,
    CONFIG_NO_NAT64,
};

use crate::{
    fastpath,
    hook::{End, Packet, Verdict},
    maps::{self, count, Maps},
    packet::{parse_eth, parse_ipv4, parse_ipv6, Ipv4Flow, Ipv6Flow, L3},
};

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
fn reply_v4<P: Packet>(pkt: &mut P, flow: Ipv4Flow) -> Verdict {
    // Most of what leaves a published interface is the host's own traffic: one array
    // read tells it from a backend's reply.
    if !maps::is_backend_port(flow.sport, flow.proto) {
        count(Reason::PassNoFlow);
        return Verdict::Pass;
    }
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
            None => {
                count(Reason::PassNoFlow);
                return Verdict::Pass;
            }
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
fn reply_v6<P: Packet>(pkt: &mut P, flow: Ipv6Flow) -> Verdict {
    if !maps::is_backend_port(flow.sport, flow.proto) {
        count(Reason::PassNoFlow);
        return Verdict::Pass;
    }
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
            None => {
                count(Reason::PassNoFlow);
                return Verdict::Pass;
            }
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
