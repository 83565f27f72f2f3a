//! A model of the whole packet path: what the kernel programs do with one frame, given
//! the maps' contents, computed on the host from plain slices. The BPF_PROG_RUN suites
//! run the real programs and this model on the same frames and compare verdict, output
//! bytes, reason counted and the flow recorded; the fuzzing that follows reuses it.
//!
//! Invariant: the model decides exactly as `portfwd-ebpf` does (`nat.rs`, `packet.rs`):
//! the same parsing order and reasons, the same rule lookup ([`rules::lookup`] over
//! [`Maps`], which answers what the maps hold), the same flow decision
//! ([`may_start_flow`]) and rewrite, with the checksums updated by the same
//! [`crate::csum`] functions and header offsets from [`crate::packet`]. XDP updates
//! checksums incrementally in place (RFC 1624); so does TC, by the skb's checksum state
//! (`crate::kctx`; BPF_PROG_RUN's skbs have none: a full update), or through the
//! kernel's helpers where it cannot read it; on any frame with a complete checksum
//! their bytes agree (UDP's zero checksum stays zero on all: `BPF_F_MARK_MANGLED_0` for
//! the helpers, [`csum::l4_update`] in place), so one rewrite models both. Where XDP may see partial (offloaded) checksums ([`Hook::sees_partial`]),
//! an L4 checksum equal to the pseudo-header sum gets the address-only update
//! ([`csum::partial_replace4`]), as TC's helpers give a `CHECKSUM_PARTIAL` skb, and
//! never takes the fast path. The NAT64 program, which TC ingress tail-calls
//! ([`Verdict::TailCallNat64`]), is [`nat64`]. What only the kernel knows comes in
//! through the traits: the FIB's answers ([`Maps::next_hop`], [`nat64::Nat64Maps`]),
//! the time, the interface.
//!
//! `no_std`, no allocation: a frame is rewritten in place (`&mut [u8]`); every read is
//! a checked slice access, so a truncated frame is a [`Reason::PassMalformed`], never a
//! panic.

use crate::{
    csum,
    packet::{
        is_ext_header, may_start_flow, promotes, Flow, ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q,
        ETH_P_IP, ETH_P_IPV6, IP6_DST_OFF, IP6_HOP_LIMIT_OFF, IP6_NEXT_OFF, IP6_PLEN_OFF,
        IP6_SRC_OFF, IPV4_MIN_HLEN, IPV6_HLEN, IPV6_NH_FRAGMENT, IP_CSUM_OFF, IP_DST_OFF,
        IP_FRAG_MASK, IP_FRAG_OFF, IP_PROTO_OFF, IP_SRC_OFF, IP_TOT_LEN_OFF, IP_TTL_OFF,
        TCP_FLAGS_OFF, TCP_HLEN, UDP_HLEN, VLAN_HLEN,
    },
    port_bits, proto,
    rules::{self, Caller, RuleMaps},
    wildcard_bits, BackendV4, BackendV6, FlowKeyV4, FlowKeyV6, FlowV4, FlowV6, Nat64Flow,
    Nat64Reply, Reason, RuleKeyV4, RuleKeyV6, CONFIG_FAST_PATH, CONFIG_FAST_PATH_NATIVE_XDP,
    CONFIG_FAST_PATH_NO_PEER, CONFIG_NO_NAT64,
};

/// Which program runs the frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// `portfwd_xdp_ingress` (native XDP on a NIC; fast path under
    /// [`CONFIG_FAST_PATH_NATIVE_XDP`]).
    XdpIngress,
    /// `portfwd_xdp_virtual` (native XDP on a virtual device): as [`Hook::XdpIngress`],
    /// and a partial checksum (see [`Hook::sees_partial`]) gets the address-only update
    /// and never takes the fast path (so at generic XDP too).
    XdpVirtual,
    /// `portfwd_xdp_generic` (generic XDP; fast path under [`CONFIG_FAST_PATH`]).
    XdpGeneric,
    /// `portfwd_tc_ingress`.
    TcIngress,
    /// `portfwd_tc_egress`: replies.
    TcEgress,
}

impl Hook {
    fn is_xdp(self) -> bool {
        matches!(self, Hook::XdpIngress | Hook::XdpVirtual | Hook::XdpGeneric)
    }
    /// Whether the program takes an L4 checksum equal to the packet's pseudo-header sum
    /// for a partial (offloaded, `CHECKSUM_PARTIAL`) one: at XDP where frames may come
    /// from a local stack (a virtual device) or GRO (generic XDP). TC reads the skb's
    /// state instead (none, in BPF_PROG_RUN).
    pub fn sees_partial(self) -> bool {
        matches!(self, Hook::XdpVirtual | Hook::XdpGeneric)
    }
    fn fast_path_bit(self) -> u64 {
        match self {
            Hook::XdpIngress | Hook::XdpVirtual => CONFIG_FAST_PATH_NATIVE_XDP,
            _ => CONFIG_FAST_PATH,
        }
    }
}

/// What the program returns, before the hook's action codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// On to the stack (translated or not).
    Pass,
    /// Dropped (a checksum helper failed after the packet changed).
    Drop,
    /// Out of this interface (the fast path).
    Redirect(u32),
    /// Into the peer of this veth (the fast path at TC ingress: `bpf_redirect_peer`).
    RedirectPeer(u32),
    /// TC ingress jumps to the NAT64 program, which decides from there ([`nat64`]).
    TailCallNat64,
    /// Out of this interface, the kernel filling in the MACs (`bpf_redirect_neigh`:
    /// NAT64).
    RedirectNeigh(u32),
}

/// Where the fast path sends a translated packet: the FIB's next hop and the
/// bridge port that leads to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextHop {
    /// The bridge port to redirect to.
    pub ifindex: u32,
    /// The port is a veth whose peer is in another namespace
    /// ([`crate::BRIDGE_PORT_PEER`]): TC ingress redirects into the peer.
    pub peer: bool,
    /// The source MAC the frame gets (the egress interface's).
    pub smac: [u8; 6],
    /// The next hop's MAC.
    pub dmac: [u8; 6],
}

/// The translated packet the fast path asks the FIB about (`N`: 4 for IPv4, 16 for
/// IPv6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FibQuery<const N: usize = 4> {
    /// `proto::TCP` or `proto::UDP`.
    pub proto: u8,
    /// The packet's length from its IP header on: IPv4's total length, IPv6's payload
    /// length plus the 40-byte header (saturating), as the header says. The FIB checks
    /// it against the route's MTU (`BPF_FIB_LKUP_RET_FRAG_NEEDED` above it).
    pub tot_len: u16,
    /// Source address (the client's).
    pub src: [u8; N],
    /// Destination address (the backend's).
    pub dst: [u8; N],
    /// Source port.
    pub sport: [u8; 2],
    /// Destination port (the backend's).
    pub dport: [u8; 2],
}

/// What the maps hold beyond the rules ([`RuleMaps`]: rules, host addresses,
/// `PUBLISHED_PORTS`), and, for the fast path, what the FIB would answer. Addresses and
/// ports in network order, as in the maps.
pub trait Maps: RuleMaps {
    /// `BACKEND_PORTS[port]` (`port_be` in network order): the
    /// [`crate::backend_port_bit`]s of the protocols some rule sends to that port over.
    fn backend_ports(&self, port_be: [u8; 2]) -> u8;
    /// `CONNTRACK_V4[key]`.
    fn flow_v4(&self, key: &FlowKeyV4) -> Option<FlowV4>;
    /// `CONNTRACK_V6[key]`.
    fn flow_v6(&self, key: &FlowKeyV6) -> Option<FlowV6>;
    /// `EMBRYONIC_V4[key]`.
    fn embryonic_v4(&self, key: &FlowKeyV4) -> Option<FlowV4>;
    /// `EMBRYONIC_V6[key]`.
    fn embryonic_v6(&self, key: &FlowKeyV6) -> Option<FlowV6>;
    /// Whether `NAT64_REPLIES` holds `key`.
    fn is_nat64_reply(&self, key: &FlowKeyV4) -> bool;
    /// `CONFIG.flags`.
    fn config_flags(&self) -> u64;
    /// The fast path's next hop for `q`, if the FIB and the bridge ports know one.
    fn next_hop(&self, q: &FibQuery) -> Option<NextHop>;
    /// The same for an IPv6 packet.
    fn next_hop_v6(&self, q: &FibQuery<16>) -> Option<NextHop>;
}

/// [`Maps`] as plain slices (linear search): fixture tables and host tests. The rules
/// read as the daemon writes them: each wildcard also under every host address of its
/// family ([`crate::BACKEND_EXPANDED`]), the published-port bits to match.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tables<'a> {
    /// `RULES_V4` (`PUBLISHED_PORTS` is derived from both families' rules).
    pub rules_v4: &'a [(RuleKeyV4, BackendV4)],
    /// `RULES_V6`.
    pub rules_v6: &'a [(RuleKeyV6, BackendV6)],
    /// `HOST_ADDRS_V4`.
    pub host_addrs_v4: &'a [[u8; 4]],
    /// `HOST_ADDRS_V6`.
    pub host_addrs_v6: &'a [[u8; 16]],
    /// `CONNTRACK_V4`.
    pub flows_v4: &'a [(FlowKeyV4, FlowV4)],
    /// `CONNTRACK_V6`.
    pub flows_v6: &'a [(FlowKeyV6, FlowV6)],
    /// `EMBRYONIC_V4`.
    pub embryonic_v4: &'a [(FlowKeyV4, FlowV4)],
    /// `EMBRYONIC_V6`.
    pub embryonic_v6: &'a [(FlowKeyV6, FlowV6)],
    /// `NAT64_FLOWS`.
    pub nat64_flows: &'a [(FlowKeyV6, Nat64Flow)],
    /// `NAT64_REPLIES`.
    pub nat64_replies: &'a [(FlowKeyV4, Nat64Reply)],
    /// `CONFIG.flags`.
    pub config_flags: u64,
    /// The fast path's answer for every query (`None`: no next hop).
    pub next_hop: Option<NextHop>,
    /// NAT64's route for every backend (`None`: no route).
    pub route: Option<nat64::Route>,
    /// The interface the packet arrived on.
    pub ingress_ifindex: u32,
    /// The time of the run (`bpf_ktime_get_coarse_ns`).
    pub now_ns: u64,
}

impl RuleMaps for Tables<'_> {
    /// The bits the daemon derives from the rules of both families.
    fn published(&self, port_be: [u8; 2]) -> u8 {
        let port = u16::from_be_bytes(port_be);
        let keys_v4 = self
            .rules_v4
            .iter()
            .map(|(k, _)| (k.port(), k.proto(), k.addr().is_unspecified()));
        let keys_v6 = self
            .rules_v6
            .iter()
            .map(|(k, _)| (k.port(), k.proto(), k.addr().is_unspecified()));
        let mut bits = 0;
        let keys = keys_v4
            .map(|k| (k, false))
            .chain(keys_v6.map(|k| (k, true)));
        for ((p, l4, wildcard), v6) in keys {
            if p == port {
                bits |= if wildcard {
                    wildcard_bits(l4, v6)
                } else {
                    port_bits(l4).0
                };
            }
        }
        // A wildcard's expansions are address-bound entries.
        let expanded = |hosts: bool, wildcards: &mut dyn Iterator<Item = (u16, u8)>| {
            let mut b = 0;
            if hosts {
                for (p, l4) in wildcards {
                    if p == port {
                        b |= port_bits(l4).0;
                    }
                }
            }
            b
        };
        bits |= expanded(
            !self.host_addrs_v4.is_empty(),
            &mut self
                .rules_v4
                .iter()
                .filter(|(k, _)| k.addr().is_unspecified())
                .map(|(k, _)| (k.port(), k.proto())),
        );
        bits |= expanded(
            !self.host_addrs_v6.is_empty(),
            &mut self
                .rules_v6
                .iter()
                .filter(|(k, _)| k.addr().is_unspecified())
                .map(|(k, _)| (k.port(), k.proto())),
        );
        bits
    }
    /// The rule under `key`, or the wildcard's expansion for a host address (as the
    /// daemon writes them).
    fn rule_v4(&self, key: &RuleKeyV4) -> Option<BackendV4> {
        let find = |key: &RuleKeyV4| {
            self.rules_v4
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, b)| *b)
        };
        find(key).or_else(|| {
            let a = key.addr().octets();
            if !self.host_addrs_v4.contains(&a) {
                return None;
            }
            let w = find(&RuleKeyV4::new(
                [0; 4],
                key.port().to_be_bytes(),
                key.proto(),
            ))?;
            Some(w.with_flags(w.flags() | crate::BACKEND_EXPANDED))
        })
    }
    fn rule_v6(&self, key: &RuleKeyV6) -> Option<BackendV6> {
        let find = |key: &RuleKeyV6| {
            self.rules_v6
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, b)| *b)
        };
        find(key).or_else(|| {
            let a = key.addr().octets();
            if !self.host_addrs_v6.contains(&a) {
                return None;
            }
            let w = find(&RuleKeyV6::new(
                [0; 16],
                key.port().to_be_bytes(),
                key.proto(),
            ))?;
            Some(w.with_flags(w.flags() | crate::BACKEND_EXPANDED))
        })
    }
    fn is_host_v4(&self, addr: &[u8; 4]) -> bool {
        self.host_addrs_v4.contains(addr)
    }
    fn is_host_v6(&self, addr: &[u8; 16]) -> bool {
        self.host_addrs_v6.contains(addr)
    }
}

impl Maps for Tables<'_> {
    /// The bits the daemon derives from the backends of both families' rules.
    fn backend_ports(&self, port_be: [u8; 2]) -> u8 {
        let v4 = self.rules_v4.iter().map(|(k, b)| (b.port_be(), k.proto()));
        let v6 = self.rules_v6.iter().map(|(k, b)| (b.port_be(), k.proto()));
        v4.chain(v6)
            .filter(|&(p, _)| p == port_be)
            .fold(0, |bits, (_, proto)| bits | crate::backend_port_bit(proto))
    }
    fn flow_v4(&self, key: &FlowKeyV4) -> Option<FlowV4> {
        self.flows_v4
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, f)| *f)
    }
    fn flow_v6(&self, key: &FlowKeyV6) -> Option<FlowV6> {
        self.flows_v6
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, f)| *f)
    }
    fn embryonic_v4(&self, key: &FlowKeyV4) -> Option<FlowV4> {
        self.embryonic_v4
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, f)| *f)
    }
    fn embryonic_v6(&self, key: &FlowKeyV6) -> Option<FlowV6> {
        self.embryonic_v6
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, f)| *f)
    }
    fn is_nat64_reply(&self, key: &FlowKeyV4) -> bool {
        self.nat64_replies.iter().any(|(k, _)| k == key)
    }
    fn config_flags(&self) -> u64 {
        self.config_flags
    }
    fn next_hop(&self, _: &FibQuery) -> Option<NextHop> {
        self.next_hop
    }
    fn next_hop_v6(&self, _: &FibQuery<16>) -> Option<NextHop> {
        self.next_hop
    }
}

impl nat64::Nat64Maps for Tables<'_> {
    fn nat64_flow(&self, key: &FlowKeyV6) -> Option<Nat64Flow> {
        self.nat64_flows
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, f)| *f)
    }
    fn nat64_reply(&self, key: &FlowKeyV4) -> Option<Nat64Reply> {
        self.nat64_replies
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, r)| *r)
    }
    fn route_v4(&self, _: [u8; 4]) -> Option<nat64::Route> {
        self.route
    }
    fn ingress_ifindex(&self) -> u32 {
        self.ingress_ifindex
    }
    fn now_ns(&self) -> u64 {
        self.now_ns
    }
}

/// A flow entry a program writes (or finds identical): which table it goes to is the
/// [`Outcome`] field that holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowWrite {
    /// `key → value`, IPv4.
    V4(FlowKeyV4, FlowV4),
    /// `key → value`, IPv6.
    V6(FlowKeyV6, FlowV6),
}

/// A packet counted on a rule's statistics slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleCount {
    /// The rule's `RULE_STATS` slot.
    pub slot: u32,
    /// The reply direction (`reply_packets`), else the forward one.
    pub reply: bool,
}

/// What the program does with one frame. The frame itself is rewritten in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// What the program returns.
    pub verdict: Verdict,
    /// The reasons counted, in order (a translation on the fast path counts two).
    pub reasons: [Option<Reason>; 2],
    /// Ingress, a packet that may start a flow whose `CONNTRACK` entry is not already
    /// this one: the `EMBRYONIC` entry written (or found identical). A `CONNTRACK` entry
    /// under the same key with another value is removed (the client's new connection
    /// on that 4-tuple goes elsewhere now).
    pub flow: Option<FlowWrite>,
    /// Reply, a packet that proves an embryonic flow real: the entry moved from
    /// `EMBRYONIC` to `CONNTRACK` (inserted there, removed here).
    pub promoted: Option<FlowWrite>,
    /// The rule counter incremented, if any.
    pub rule: Option<RuleCount>,
}

impl Outcome {
    fn pass(reason: Reason) -> Self {
        Self {
            verdict: Verdict::Pass,
            reasons: [Some(reason), None],
            flow: None,
            promoted: None,
            rule: None,
        }
    }
    /// Nothing counted (a tail call, or a program that leaves counting to others).
    pub fn uncounted(verdict: Verdict) -> Self {
        Self {
            verdict,
            reasons: [None, None],
            flow: None,
            promoted: None,
            rule: None,
        }
    }
    /// The reasons counted, in order.
    pub fn counted(&self) -> impl Iterator<Item = Reason> + '_ {
        self.reasons.iter().flatten().copied()
    }
}

/// Runs `hook` on `frame` (rewritten in place) against `maps`.
pub fn run(hook: Hook, maps: &impl Maps, frame: &mut [u8]) -> Outcome {
    let parsed = match parse_eth(frame) {
        Ok(L3::Ipv4(ip_off)) => parse_ipv4(frame, ip_off).map(|f| match hook {
            Hook::TcEgress => reply_v4(maps, frame, &f),
            _ => ingress_v4(hook, maps, frame, &f),
        }),
        Ok(L3::Ipv6(ip_off)) => parse_ipv6(frame, ip_off).map(|f| match hook {
            Hook::TcEgress => reply_v6(maps, frame, &f),
            _ => ingress_v6(hook, maps, frame, &f),
        }),
        Err(reason) => Err(reason),
    };
    parsed.unwrap_or_else(Outcome::pass)
}

/// The network layer: where its header starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L3 {
    /// IPv4 at this offset.
    Ipv4(usize),
    /// IPv6 at this offset.
    Ipv6(usize),
}

fn bytes<const N: usize>(frame: &[u8], at: usize) -> Option<[u8; N]> {
    frame.get(at..at.checked_add(N)?)?.try_into().ok()
}

fn be16(frame: &[u8], at: usize) -> Option<u16> {
    bytes::<2>(frame, at).map(u16::from_be_bytes)
}

/// Ethernet, at most one 802.1Q/802.1ad tag, then the ethertype.
pub fn parse_eth(frame: &[u8]) -> Result<L3, Reason> {
    let mut ethertype = be16(frame, 12).ok_or(Reason::PassMalformed)?;
    let mut ip_off = ETH_HLEN;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = be16(frame, ETH_HLEN + 2).ok_or(Reason::PassMalformed)?;
        ip_off += VLAN_HLEN;
    }
    match ethertype {
        ETH_P_IP => Ok(L3::Ipv4(ip_off)),
        ETH_P_IPV6 => Ok(L3::Ipv6(ip_off)),
        _ => Err(Reason::PassNotIp),
    }
}

/// The L4 header's length for `l4`, if portfwd translates it.
fn l4_hlen(l4: u8) -> Option<usize> {
    match l4 {
        proto::TCP => Some(TCP_HLEN),
        proto::UDP => Some(UDP_HLEN),
        _ => None,
    }
}

fn parse_l4<const N: usize>(
    frame: &[u8],
    ip_off: usize,
    l4_off: usize,
    l4: u8,
    src: [u8; N],
    dst: [u8; N],
) -> Result<Flow<N>, Reason> {
    let hlen = l4_hlen(l4).ok_or(Reason::PassNotTcpUdp)?;
    if frame.len() < l4_off + hlen {
        return Err(Reason::PassMalformed);
    }
    Ok(Flow {
        ip_off,
        l4_off,
        proto: l4,
        src,
        dst,
        sport: [frame[l4_off], frame[l4_off + 1]],
        dport: [frame[l4_off + 2], frame[l4_off + 3]],
        tcp_flags: if l4 == proto::TCP {
            frame[l4_off + TCP_FLAGS_OFF]
        } else {
            0
        },
    })
}

/// IPv4 (options skipped); fragments and other protocols are passed.
pub fn parse_ipv4(frame: &[u8], ip_off: usize) -> Result<Flow<4>, Reason> {
    let ip: [u8; IPV4_MIN_HLEN] = bytes(frame, ip_off).ok_or(Reason::PassMalformed)?;
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < IPV4_MIN_HLEN {
        return Err(Reason::PassMalformed);
    }
    if u16::from_be_bytes([ip[IP_FRAG_OFF], ip[IP_FRAG_OFF + 1]]) & IP_FRAG_MASK != 0 {
        return Err(Reason::PassFragment);
    }
    let mut src = [0; 4];
    src.copy_from_slice(&ip[IP_SRC_OFF..IP_SRC_OFF + 4]);
    let mut dst = [0; 4];
    dst.copy_from_slice(&ip[IP_DST_OFF..IP_DST_OFF + 4]);
    parse_l4(frame, ip_off, ip_off + ihl, ip[IP_PROTO_OFF], src, dst)
}

/// IPv6, the fixed header only: an extension header before TCP/UDP is passed.
pub fn parse_ipv6(frame: &[u8], ip_off: usize) -> Result<Flow<16>, Reason> {
    let ip: [u8; IPV6_HLEN] = bytes(frame, ip_off).ok_or(Reason::PassMalformed)?;
    if ip[0] >> 4 != 6 {
        return Err(Reason::PassMalformed);
    }
    let next = ip[IP6_NEXT_OFF];
    if next == IPV6_NH_FRAGMENT {
        return Err(Reason::PassFragment);
    }
    if is_ext_header(next) {
        return Err(Reason::PassIpv6ExtHeader);
    }
    let mut src = [0; 16];
    src.copy_from_slice(&ip[IP6_SRC_OFF..IP6_SRC_OFF + 16]);
    let mut dst = [0; 16];
    dst.copy_from_slice(&ip[IP6_DST_OFF..IP6_DST_OFF + 16]);
    parse_l4(frame, ip_off, ip_off + IPV6_HLEN, next, src, dst)
}

/// Which end of the flow a rewrite changes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Src,
    Dst,
}

fn put(frame: &mut [u8], at: usize, bytes: &[u8]) {
    frame[at..at + bytes.len()].copy_from_slice(bytes);
}

/// Rewrites one end's address and port of a parsed (so bounds-checked) IPv4 packet, and
/// both checksums. `sees_partial`: an L4 checksum equal to the pseudo-header sum is
/// partial, and gets the address change only. Returns whether it was taken as partial.
fn rewrite_v4(
    frame: &mut [u8],
    f: &Flow<4>,
    end: End,
    addr: [u8; 4],
    port: [u8; 2],
    sees_partial: bool,
) -> bool {
    let (old_addr, old_port, addr_at, port_at) = match end {
        End::Src => (f.src, f.sport, f.ip_off + IP_SRC_OFF, f.l4_off),
        End::Dst => (f.dst, f.dport, f.ip_off + IP_DST_OFF, f.l4_off + 2),
    };
    let ip_csum_at = f.ip_off + IP_CSUM_OFF;
    let ip_check = csum::replace4(
        u16::from_be_bytes([frame[ip_csum_at], frame[ip_csum_at + 1]]),
        old_addr,
        addr,
    );
    put(frame, ip_csum_at, &ip_check.to_be_bytes());
    put(frame, addr_at, &addr);
    let l4_csum_at = f.l4_csum_off();
    let check = u16::from_be_bytes([frame[l4_csum_at], frame[l4_csum_at + 1]]);
    let tot_len = u16::from_be_bytes([
        frame[f.ip_off + IP_TOT_LEN_OFF],
        frame[f.ip_off + IP_TOT_LEN_OFF + 1],
    ]);
    let l4_len = tot_len.wrapping_sub((f.l4_off - f.ip_off) as u16);
    let partial = sees_partial && check == csum::pseudo_sum_v4(f.src, f.dst, f.proto, l4_len);
    let l4_check = if partial {
        csum::partial_replace4(check, old_addr, addr)
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
    put(frame, l4_csum_at, &l4_check.to_be_bytes());
    put(frame, port_at, &port);
    partial
}

/// As [`rewrite_v4`], for IPv6 (no header checksum; the pseudo-header moves the L4 one).
fn rewrite_v6(
    frame: &mut [u8],
    f: &Flow<16>,
    end: End,
    addr: [u8; 16],
    port: [u8; 2],
    sees_partial: bool,
) -> bool {
    let (old_addr, old_port, addr_at, port_at) = match end {
        End::Src => (f.src, f.sport, f.ip_off + IP6_SRC_OFF, f.l4_off),
        End::Dst => (f.dst, f.dport, f.ip_off + IP6_DST_OFF, f.l4_off + 2),
    };
    put(frame, addr_at, &addr);
    let l4_csum_at = f.l4_csum_off();
    let check = u16::from_be_bytes([frame[l4_csum_at], frame[l4_csum_at + 1]]);
    // No extension headers get here: the payload length is the L4 length.
    let l4_len = u16::from_be_bytes([
        frame[f.ip_off + IP6_PLEN_OFF],
        frame[f.ip_off + IP6_PLEN_OFF + 1],
    ]);
    let partial =
        sees_partial && check == csum::pseudo_sum_v6(f.src, f.dst, f.proto, l4_len.into());
    let l4_check = if partial {
        csum::partial_replace16(check, old_addr, addr)
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
    put(frame, l4_csum_at, &l4_check.to_be_bytes());
    put(frame, port_at, &port);
    partial
}

fn ingress_v4(hook: Hook, maps: &impl Maps, frame: &mut [u8], f: &Flow<4>) -> Outcome {
    // A NAT64 flow's reply on the backend's interface (TC only: XDP has no NAT64).
    if !hook.is_xdp()
        && crate::nat64::is_nat64_port(f.dport)
        && maps.is_nat64_reply(&FlowKeyV4::new(f.src, f.sport, f.dst, f.dport, f.proto))
    {
        return Outcome::uncounted(Verdict::TailCallNat64);
    }
    let backend = match rules::lookup(maps, Caller::Packet, f.dst, f.dport, f.proto) {
        Ok(b) => b,
        Err(reason) => return Outcome::pass(reason),
    };
    let flow = may_start_flow(f.proto, f.tcp_flags)
        .then(|| {
            let key = FlowKeyV4::new(
                backend.addr_bytes(),
                backend.port_be(),
                f.src,
                f.sport,
                f.proto,
            );
            let value = FlowV4::new(f.dst, f.dport, backend.stats_slot());
            // Established already (a retransmitted SYN, the next datagram): nothing.
            (maps.flow_v4(&key) != Some(value)).then_some(FlowWrite::V4(key, value))
        })
        .flatten();
    let partial = rewrite_v4(
        frame,
        f,
        End::Dst,
        backend.addr_bytes(),
        backend.port_be(),
        hook.sees_partial(),
    );
    let mut out = Outcome {
        verdict: Verdict::Pass,
        reasons: [Some(Reason::Translated), None],
        flow,
        promoted: None,
        rule: Some(RuleCount {
            slot: backend.stats_slot(),
            reply: false,
        }),
    };
    if maps.config_flags() & hook.fast_path_bit() == 0 {
        return out;
    }
    // A partial checksum goes on to the stack, which keeps the skb's CHECKSUM_PARTIAL:
    // native XDP's redirect would lose it, generic XDP's skip its completion.
    if partial {
        out.reasons[1] = Some(Reason::FastPathFallback);
        return out;
    }
    let ttl = frame[f.ip_off + IP_TTL_OFF];
    let query = FibQuery {
        proto: f.proto,
        tot_len: u16::from_be_bytes([
            frame[f.ip_off + IP_TOT_LEN_OFF],
            frame[f.ip_off + IP_TOT_LEN_OFF + 1],
        ]),
        src: f.src,
        dst: backend.addr_bytes(),
        sport: f.sport,
        dport: backend.port_be(),
    };
    // An expiring TTL needs an ICMP error: the kernel's job.
    match (ttl > 1).then(|| maps.next_hop(&query)).flatten() {
        Some(hop) => {
            forward(frame, f.ip_off, hop.smac, hop.dmac);
            out.verdict = redirect(hook, maps.config_flags(), &hop);
            out.reasons[1] = Some(Reason::Redirected);
        }
        None => out.reasons[1] = Some(Reason::FastPathFallback),
    }
    out
}

/// The fast path's verdict: into the veth's peer where TC can (unless switched off),
/// else out of the port.
fn redirect(hook: Hook, flags: u64, hop: &NextHop) -> Verdict {
    if hop.peer && hook == Hook::TcIngress && flags & CONFIG_FAST_PATH_NO_PEER == 0 {
        Verdict::RedirectPeer(hop.ifindex)
    } else {
        Verdict::Redirect(hop.ifindex)
    }
}

/// Forwards one hop as the kernel would: new MACs, TTL minus one (header checksum
/// updated over the TTL/protocol word).
fn forward(frame: &mut [u8], ip_off: usize, smac: [u8; 6], dmac: [u8; 6]) {
    put(frame, 0, &dmac);
    put(frame, 6, &smac);
    let (ttl, l4) = (frame[ip_off + IP_TTL_OFF], frame[ip_off + IP_TTL_OFF + 1]);
    let at = ip_off + IP_CSUM_OFF;
    let check = csum::replace2(
        u16::from_be_bytes([frame[at], frame[at + 1]]),
        u16::from_be_bytes([ttl, l4]),
        u16::from_be_bytes([ttl - 1, l4]),
    );
    frame[ip_off + IP_TTL_OFF] = ttl - 1;
    put(frame, at, &check.to_be_bytes());
}

fn ingress_v6(hook: Hook, maps: &impl Maps, frame: &mut [u8], f: &Flow<16>) -> Outcome {
    let backend = match rules::lookup(maps, Caller::Packet, f.dst, f.dport, f.proto) {
        Ok(b) => b,
        Err(reason) => return Outcome::pass(reason),
    };
    if backend.is_ipv4_mapped() {
        // An IPv4-only backend: NAT64, at TC and unless switched off.
        if hook.is_xdp() || maps.config_flags() & CONFIG_NO_NAT64 != 0 {
            return Outcome::pass(Reason::PassNoIpv6Backend);
        }
        return Outcome::uncounted(Verdict::TailCallNat64);
    }
    let flow = may_start_flow(f.proto, f.tcp_flags)
        .then(|| {
            let key = FlowKeyV6::new(
                backend.addr_bytes(),
                backend.port_be(),
                f.src,
                f.sport,
                f.proto,
            );
            let value = FlowV6::new(f.dst, f.dport, backend.stats_slot());
            (maps.flow_v6(&key) != Some(value)).then_some(FlowWrite::V6(key, value))
        })
        .flatten();
    let partial = rewrite_v6(
        frame,
        f,
        End::Dst,
        backend.addr_bytes(),
        backend.port_be(),
        hook.sees_partial(),
    );
    let mut out = Outcome {
        verdict: Verdict::Pass,
        reasons: [Some(Reason::Translated), None],
        flow,
        promoted: None,
        rule: Some(RuleCount {
            slot: backend.stats_slot(),
            reply: false,
        }),
    };
    if maps.config_flags() & hook.fast_path_bit() == 0 {
        return out;
    }
    // A partial checksum goes on to the stack, which keeps the skb's CHECKSUM_PARTIAL:
    // native XDP's redirect would lose it, generic XDP's skip its completion.
    if partial {
        out.reasons[1] = Some(Reason::FastPathFallback);
        return out;
    }
    let hops = frame[f.ip_off + IP6_HOP_LIMIT_OFF];
    let plen = u16::from_be_bytes([
        frame[f.ip_off + IP6_PLEN_OFF],
        frame[f.ip_off + IP6_PLEN_OFF + 1],
    ]);
    let query = FibQuery {
        proto: f.proto,
        tot_len: plen.saturating_add(IPV6_HLEN as u16),
        src: f.src,
        dst: backend.addr_bytes(),
        sport: f.sport,
        dport: backend.port_be(),
    };
    // An expiring hop limit needs an ICMPv6 error: the kernel's job.
    match (hops > 1).then(|| maps.next_hop_v6(&query)).flatten() {
        Some(hop) => {
            put(frame, 0, &hop.dmac);
            put(frame, 6, &hop.smac);
            // No checksum covers the hop limit.
            frame[f.ip_off + IP6_HOP_LIMIT_OFF] = hops - 1;
            out.verdict = redirect(hook, maps.config_flags(), &hop);
            out.reasons[1] = Some(Reason::Redirected);
        }
        None => out.reasons[1] = Some(Reason::FastPathFallback),
    }
    out
}

fn reply_v4(maps: &impl Maps, frame: &mut [u8], f: &Flow<4>) -> Outcome {
    if maps.backend_ports(f.sport) & crate::backend_port_bit(f.proto) == 0 {
        return Outcome::pass(Reason::PassNoFlow);
    }
    let key = FlowKeyV4::new(f.src, f.sport, f.dst, f.dport, f.proto);
    let (tracked, promoted) = match maps.flow_v4(&key) {
        Some(t) => (t, None),
        None => match maps.embryonic_v4(&key) {
            Some(t) => (
                t,
                promotes(f.proto, f.tcp_flags).then_some(FlowWrite::V4(key, t)),
            ),
            None => return Outcome::pass(Reason::PassNoFlow),
        },
    };
    // TC egress: a full update (BPF_PROG_RUN's skbs carry no checksum state).
    rewrite_v4(
        frame,
        f,
        End::Src,
        tracked.host_addr_bytes(),
        tracked.host_port_be(),
        false,
    );
    translated_reply(tracked.stats_slot(), promoted)
}

fn reply_v6(maps: &impl Maps, frame: &mut [u8], f: &Flow<16>) -> Outcome {
    if maps.backend_ports(f.sport) & crate::backend_port_bit(f.proto) == 0 {
        return Outcome::pass(Reason::PassNoFlow);
    }
    let key = FlowKeyV6::new(f.src, f.sport, f.dst, f.dport, f.proto);
    let (tracked, promoted) = match maps.flow_v6(&key) {
        Some(t) => (t, None),
        None => match maps.embryonic_v6(&key) {
            Some(t) => (
                t,
                promotes(f.proto, f.tcp_flags).then_some(FlowWrite::V6(key, t)),
            ),
            None => return Outcome::pass(Reason::PassNoFlow),
        },
    };
    // TC egress: a full update (BPF_PROG_RUN's skbs carry no checksum state).
    rewrite_v6(
        frame,
        f,
        End::Src,
        tracked.host_addr_bytes(),
        tracked.host_port_be(),
        false,
    );
    translated_reply(tracked.stats_slot(), promoted)
}

fn translated_reply(slot: u32, promoted: Option<FlowWrite>) -> Outcome {
    Outcome {
        verdict: Verdict::Pass,
        reasons: [
            Some(Reason::ReplyTranslated),
            promoted.map(|_| Reason::FlowPromoted),
        ],
        flow: None,
        promoted,
        rule: Some(RuleCount { slot, reply: true }),
    }
}

pub mod nat64;

#[cfg(test)]
mod tests;
