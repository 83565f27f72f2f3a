//! Why a packet was translated, passed or dropped. Each reason is a counter slot in
//! [`crate::REASON_STATS`], so the reasons double as metrics.

/// Index into [`crate::REASON_STATS`]. Values are stable: they are the map's indices.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Ingress: destination rewritten to a backend.
    Translated = 0,
    /// Reply side: source rewritten back to the published address.
    ReplyTranslated = 1,
    /// Neither IPv4 nor IPv6 (ARP, LLDP, ...): passed untouched.
    PassNotIp = 2,
    /// IPv4 or IPv6 but neither TCP nor UDP (ICMP, ICMPv6, ...): passed untouched.
    PassNotTcpUdp = 3,
    /// A fragment (IPv4 MF/offset, or an IPv6 Fragment header): only the first carries
    /// ports, so none is translated.
    PassFragment = 4,
    /// Headers shorter than they claim, or a bad IHL: passed for the stack to judge.
    PassMalformed = 5,
    /// No rule for the destination.
    PassNoRule = 6,
    /// A wildcard rule's port, but sent to an address that is not the host's.
    PassNotHostAddr = 7,
    /// Reply side: no tracked flow for this packet.
    PassNoFlow = 8,
    /// The flow could not be recorded (map update failed); forwarded anyway.
    FlowInsertFailed = 9,
    /// A checksum helper failed on the TC path: the packet is dropped, not sent corrupt.
    DropChecksum = 10,
    /// Socket hooks: a local client's connect or send went straight to a backend.
    LocalTranslated = 11,
    /// Socket hooks: a local `bind()` of a published port was refused.
    LocalBindRefused = 12,
    /// Fast path: translated and redirected straight to the backend's bridge port.
    Redirected = 13,
    /// Fast path: no route, neighbour or bridge port known yet, TTL expiring, or a
    /// redirect failure: the kernel routes the translated packet instead.
    FastPathFallback = 14,
    /// IPv6 with an extension header (hop-by-hop, routing, destination options, AH,
    /// ESP, ...) before the transport header: passed untouched, the chain is not walked.
    PassIpv6ExtHeader = 15,
    /// An IPv6 client of a rule whose backend has only an IPv4 address, where it cannot
    /// be served: at XDP (NAT64 runs at TC), or a local unconnected UDP `sendmsg` (the
    /// kernel refuses one redirected to a mapped address). Passed untouched.
    PassNoIpv6Backend = 16,
    /// NAT64 (TC ingress): an IPv6 client's packet to an IPv4-only backend, translated
    /// to IPv4 and sent to the backend's interface.
    Nat64Translated = 17,
    /// NAT64 (TC ingress of the backend's interface): a backend's reply translated back
    /// to IPv6 and sent to the client's interface.
    Nat64ReplyTranslated = 18,
    /// NAT64 could not translate because the kernel refused: the tail call to the NAT64
    /// program, `bpf_skb_change_proto`, or the per-CPU scratch map. Passed untouched. The
    /// other causes have their own `nat64_*` reasons.
    Nat64Failed = 19,
    /// Reply side, counted beside [`Reason::ReplyTranslated`]: the backend's first packet
    /// that proves a handshake completed (TCP without SYN or RST; any UDP reply) moved
    /// its flow from the embryonic table to the established one.
    FlowPromoted = 20,
    /// NAT64: the FIB has no usable route to the backend (unreachable, blackhole,
    /// forwarding off on the client's interface, ...). Passed untouched.
    Nat64NoRoute = 21,
    /// NAT64: the translated packet (or, for a GSO packet, one segment) exceeds the
    /// backend route's MTU, or the IPv6 payload is too long for an IPv4 packet. Passed
    /// untouched.
    Nat64TooBig = 22,
    /// NAT64: a new flow found every candidate port held by a flow that is not over (a
    /// live one, or a UDP flow not idle long enough). Passed untouched.
    Nat64NoPort = 23,
    /// NAT64: an IPv4 packet to a NAT64 port whose flow was gone when the NAT64 program
    /// ran (taken over or evicted between the entry's lookup and the program's). Passed
    /// untouched.
    Nat64ReplyNoFlow = 24,
    /// NAT64: a packet it does not translate: a VLAN tag, IPv4 options, a UDP reply
    /// without a checksum, headers outside the linear data. Passed untouched.
    Nat64Unsupported = 25,
    /// NAT64: a hop limit (client side) or TTL (backend side) that would expire on this
    /// hop: passed untouched, for the stack to answer with ICMP.
    Nat64HopLimit = 26,
    /// NAT64, counted beside [`Reason::Nat64Translated`]: a new TCP flow found every
    /// candidate port held and took over the port of a flow that had closed (RST, or a
    /// FIN each way and the ACK after them), as conntrack's NAT evicts a closing entry
    /// whose tuple it needs (`nf_nat_used_tuple_harder`).
    Nat64PortReclaimed = 27,
    /// NAT64, counted beside [`Reason::Nat64PortReclaimed`]: no closed candidate was one
    /// the backend surely takes the new SYN on (after a FIN each way it may hold the old
    /// connection in `TIME_WAIT`, and the SYN's sequence number was not past the old
    /// one's: [`crate::Nat64Reply::may_take_over`]), so the port of the connection
    /// closed longest ago was taken over all the same (a Linux backend still takes the
    /// SYN if its timestamp is newer; if not, the client retransmits its SYN).
    Nat64PortReclaimedEarly = 28,
}

impl Reason {
    /// How many reasons there are (the length of `REASON_STATS`).
    pub const COUNT: u32 = 29;
    /// Every reason, in counter order.
    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::Translated,
        Reason::ReplyTranslated,
        Reason::PassNotIp,
        Reason::PassNotTcpUdp,
        Reason::PassFragment,
        Reason::PassMalformed,
        Reason::PassNoRule,
        Reason::PassNotHostAddr,
        Reason::PassNoFlow,
        Reason::FlowInsertFailed,
        Reason::DropChecksum,
        Reason::LocalTranslated,
        Reason::LocalBindRefused,
        Reason::Redirected,
        Reason::FastPathFallback,
        Reason::PassIpv6ExtHeader,
        Reason::PassNoIpv6Backend,
        Reason::Nat64Translated,
        Reason::Nat64ReplyTranslated,
        Reason::Nat64Failed,
        Reason::FlowPromoted,
        Reason::Nat64NoRoute,
        Reason::Nat64TooBig,
        Reason::Nat64NoPort,
        Reason::Nat64ReplyNoFlow,
        Reason::Nat64Unsupported,
        Reason::Nat64HopLimit,
        Reason::Nat64PortReclaimed,
        Reason::Nat64PortReclaimedEarly,
    ];

    /// Stable snake_case name, for `list` and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::Translated => "translated",
            Reason::ReplyTranslated => "reply_translated",
            Reason::PassNotIp => "pass_not_ip",
            Reason::PassNotTcpUdp => "pass_not_tcp_udp",
            Reason::PassFragment => "pass_fragment",
            Reason::PassMalformed => "pass_malformed",
            Reason::PassNoRule => "pass_no_rule",
            Reason::PassNotHostAddr => "pass_not_host_addr",
            Reason::PassNoFlow => "pass_no_flow",
            Reason::FlowInsertFailed => "flow_insert_failed",
            Reason::DropChecksum => "drop_checksum",
            Reason::LocalTranslated => "local_translated",
            Reason::LocalBindRefused => "local_bind_refused",
            Reason::Redirected => "redirected",
            Reason::FastPathFallback => "fast_path_fallback",
            Reason::PassIpv6ExtHeader => "pass_ipv6_ext_header",
            Reason::PassNoIpv6Backend => "pass_no_ipv6_backend",
            Reason::Nat64Translated => "nat64_translated",
            Reason::Nat64ReplyTranslated => "nat64_reply_translated",
            Reason::Nat64Failed => "nat64_failed",
            Reason::FlowPromoted => "flow_promoted",
            Reason::Nat64NoRoute => "nat64_no_route",
            Reason::Nat64TooBig => "nat64_too_big",
            Reason::Nat64NoPort => "nat64_no_port",
            Reason::Nat64ReplyNoFlow => "nat64_reply_no_flow",
            Reason::Nat64Unsupported => "nat64_unsupported",
            Reason::Nat64HopLimit => "nat64_hop_limit",
            Reason::Nat64PortReclaimed => "nat64_port_reclaimed",
            Reason::Nat64PortReclaimedEarly => "nat64_port_reclaimed_early",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Reason;

    #[test]
    fn all_is_in_index_order() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
    }
}
