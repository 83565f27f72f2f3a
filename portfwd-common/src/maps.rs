//! Map names, capacities and the key/value layouts of every map the programs share with
//! the daemon. All types are `repr(C)`, `Copy`, have explicit padding and a size checked at
//! compile time; addresses and ports are network-order byte arrays behind accessors.

use core::net::{Ipv4Addr, Ipv6Addr};

/// Published rules, IPv4: (host address or 0.0.0.0 for "every host address", port,
/// protocol) to backend. Written by the daemon, read by the ingress programs.
pub const RULES_V4: &str = "RULES_V4";
/// Established flows, IPv4, keyed as the backend's replies look. Written by the reply
/// translator when the backend's answer proves a flow real (promoted from
/// [`EMBRYONIC_V4`]), read by it first. LRU: old flows age out, but only flows whose
/// handshake completed compete for its slots.
pub const CONNTRACK_V4: &str = "CONNTRACK_V4";
/// Embryonic flows, IPv4: what a TCP SYN or a UDP datagram records at ingress (same key
/// and value as [`CONNTRACK_V4`]) until the backend's answer promotes it. A flood of
/// spoofed SYNs churns this LRU table only. Read by the reply translator on a
/// [`CONNTRACK_V4`] miss.
pub const EMBRYONIC_V4: &str = "EMBRYONIC_V4";
/// The host's own IPv4 addresses: a wildcard rule only matches packets sent to one of
/// them (what Docker's `--dst-type LOCAL` does). Written by the daemon.
pub const HOST_ADDRS_V4: &str = "HOST_ADDRS_V4";
/// Per-rule counters, per CPU, indexed by the rule's `stats_slot`.
pub const RULE_STATS: &str = "RULE_STATS";
/// Per-reason packet counters, per CPU, indexed by [`crate::Reason`].
pub const REASON_STATS: &str = "REASON_STATS";

/// Local clients (socket hooks): the published address a socket asked for, keyed by the
/// socket and the backend it was sent to instead, so `recvmsg` and `getpeername` can show
/// the published address. Written by connect4/sendmsg4, read by recvmsg4/getpeername4.
pub const LOCAL_PEERS_V4: &str = "LOCAL_PEERS_V4";
/// Published rules, IPv6: (host address or `::` for "every host address", port,
/// protocol) to an IPv6 backend. Written by the daemon, read by the ingress programs
/// and the socket hooks.
pub const RULES_V6: &str = "RULES_V6";
/// The rule cache in front of [`RULES_V4`] (`rule_cache.rs`); not pinned.
pub const RULE_CACHE_V4: &str = "RULE_CACHE_V4";
/// The rule cache in front of [`RULES_V6`]; not pinned.
pub const RULE_CACHE_V6: &str = "RULE_CACHE_V6";
/// The reply cache in front of [`CONNTRACK_V4`] (`reply_cache.rs`); not pinned.
pub const REPLY_CACHE_V4: &str = "REPLY_CACHE_V4";
/// The reply cache in front of [`CONNTRACK_V6`]; not pinned.
pub const REPLY_CACHE_V6: &str = "REPLY_CACHE_V6";
/// A generation per reply cache slot (`reply_cache.rs`), bumped by whoever changes or
/// removes an IPv4 flow whose key has that slot; not pinned.
pub const FLOW_GENERATIONS_V4: &str = "FLOW_GENERATIONS_V4";
/// As [`FLOW_GENERATIONS_V4`], IPv6.
pub const FLOW_GENERATIONS_V6: &str = "FLOW_GENERATIONS_V6";
/// Per-flow translation state, IPv6, keyed as the backend's replies look (see
/// [`CONNTRACK_V4`]). Written by the ingress programs, read by the reply translator.
pub const CONNTRACK_V6: &str = "CONNTRACK_V6";
/// Embryonic flows, IPv6 (see [`EMBRYONIC_V4`]).
pub const EMBRYONIC_V6: &str = "EMBRYONIC_V6";
/// The host's own IPv6 addresses, for wildcard (`::`) rules. Written by the daemon.
pub const HOST_ADDRS_V6: &str = "HOST_ADDRS_V6";
/// Local clients over IPv6 (see [`LOCAL_PEERS_V4`]). Written by connect6/sendmsg6, read
/// by recvmsg6/getpeername6.
pub const LOCAL_PEERS_V6: &str = "LOCAL_PEERS_V6";
/// Entry 0: [`Config`], written by the daemon at start.
pub const CONFIG: &str = "CONFIG";
/// Fast path: (bridge ifindex, destination MAC) to the bridge port leading to that MAC,
/// from the bridges' forwarding databases. Written by the daemon, read by the ingress
/// programs to redirect a translated packet straight to the backend's port.
pub const BRIDGE_PORTS: &str = "BRIDGE_PORTS";
/// Fast path: (ingress ifindex, backend address) to the next hop the FIB and
/// [`BRIDGE_PORTS`] gave for it, kept [`NEXT_HOP_TTL_NS`]: the FIB lookup is the fast
/// path's largest cost. Written by the ingress programs; cleared by the daemon when the
/// bridge ports change. Not pinned: a cache, empty in each new load.
pub const NEXT_HOPS_V4: &str = "NEXT_HOPS_V4";
/// As [`NEXT_HOPS_V4`], for IPv6 backends.
pub const NEXT_HOPS_V6: &str = "NEXT_HOPS_V6";

/// Which (port, protocol) pairs rules publish, of either family, and how: entry = port,
/// value = bits: an address-bound entry of either family (expansions included), a
/// wildcard rule of either family ([`port_bits`]), and a wildcard rule of each family
/// ([`wildcard_bit`]; the either-family bit stays for earlier binaries over the same
/// pinned map). A cheap array filter before the rule lookup: traffic to unpublished
/// ports (most of a host's traffic) costs one array read. Written by the daemon (bits
/// set before an entry is inserted, cleared after the last one of that kind is removed).
pub const PUBLISHED_PORTS: &str = "PUBLISHED_PORTS";

/// The [`PUBLISHED_PORTS`] bits of a protocol: (address-bound entry, wildcard rule of
/// either family); zero for anything else.
#[inline(always)]
pub const fn port_bits(proto: u8) -> (u8, u8) {
    match proto {
        crate::proto::TCP => (1, 2),
        crate::proto::UDP => (4, 8),
        _ => (0, 0),
    }
}

/// The [`PUBLISHED_PORTS`] bit of a wildcard rule of one family (`v6`: IPv6's); zero for
/// protocols other than TCP and UDP.
#[inline(always)]
pub const fn wildcard_bit(proto: u8, v6: bool) -> u8 {
    match (proto, v6) {
        (crate::proto::TCP, false) => 16,
        (crate::proto::TCP, true) => 32,
        (crate::proto::UDP, false) => 64,
        (crate::proto::UDP, true) => 128,
        _ => 0,
    }
}

/// Every [`PUBLISHED_PORTS`] bit a wildcard rule of one family sets.
#[inline(always)]
pub const fn wildcard_bits(proto: u8, v6: bool) -> u8 {
    port_bits(proto).1 | wildcard_bit(proto, v6)
}

/// Which (port, protocol) pairs some rule sends to, of either family: entry = the
/// backend's port, value = [`backend_port_bit`]s. The reply program's filter: a flow is
/// tracked only to a rule's backend (and forgotten once no rule sends there), so a
/// packet leaving a published interface from any other source port is no reply and
/// costs one array read, not the flow tables' two lookups (most of what a host sends
/// there). Written by the daemon as [`PUBLISHED_PORTS`] is: a bit set before the first
/// rule entry sending to the port goes in, cleared after the last one went out.
pub const BACKEND_PORTS: &str = "BACKEND_PORTS";

/// The [`BACKEND_PORTS`] bit of a protocol; zero for anything but TCP and UDP.
#[inline(always)]
pub const fn backend_port_bit(proto: u8) -> u8 {
    match proto {
        crate::proto::TCP => 1,
        crate::proto::UDP => 2,
        _ => 0,
    }
}

/// Entry points in the object, as their ELF symbols (aya finds programs by symbol).
pub mod programs {
    /// Ingress at native XDP on a NIC (frames from the wire: complete checksums).
    pub const XDP_INGRESS: &str = "portfwd_xdp_ingress";
    /// Ingress at native XDP on a virtual device (veth, tap): the same, and frames
    /// whose checksum is partial (offloaded by a local sender) get the update such a
    /// checksum needs and never take the fast path (an XDP redirect would lose the
    /// skb's checksum state).
    pub const XDP_VIRTUAL_INGRESS: &str = "portfwd_xdp_virtual";
    /// Ingress at generic (skb) XDP: the same code, its own fast-path switch; it handles
    /// partial checksums (local senders, GRO) as `XDP_VIRTUAL_INGRESS` does.
    pub const XDP_GENERIC_INGRESS: &str = "portfwd_xdp_generic";
    /// Ingress at TC (clsact/TCX ingress).
    pub const TC_INGRESS: &str = "portfwd_tc_ingress";
    /// Reply translation at TC egress.
    pub const TC_EGRESS: &str = "portfwd_tc_egress";
    /// NAT64, both directions: tail-called by the TC ingress program (its own stack).
    pub const TC_NAT64: &str = "portfwd_tc_nat64";
    /// NAT64's door where `portfwd_tc_ingress` is not attached: TC ingress of the
    /// backends' interfaces (replies) and of interfaces whose ingress is XDP (which
    /// cannot change a packet's family). Tail-calls NAT64, lets everything else by.
    pub const TC_NAT64_ENTRY: &str = "portfwd_tc_nat64_entry";
    /// cgroup/connect4: TCP connects and UDP connects of local clients.
    pub const SOCK_CONNECT4: &str = "portfwd_connect4";
    /// cgroup/sendmsg4: unconnected UDP sends of local clients.
    pub const SOCK_SENDMSG4: &str = "portfwd_sendmsg4";
    /// cgroup/recvmsg4: UDP replies show the published address as their source.
    pub const SOCK_RECVMSG4: &str = "portfwd_recvmsg4";
    /// cgroup/getpeername4: connected sockets show the published address as their peer.
    pub const SOCK_GETPEERNAME4: &str = "portfwd_getpeername4";
    /// cgroup/bind4: a published port belongs to the daemon; local binds are refused.
    pub const SOCK_BIND4: &str = "portfwd_bind4";
    /// cgroup/connect6: as connect4, for IPv6 sockets.
    pub const SOCK_CONNECT6: &str = "portfwd_connect6";
    /// cgroup/sendmsg6: as sendmsg4, for IPv6 sockets.
    pub const SOCK_SENDMSG6: &str = "portfwd_sendmsg6";
    /// cgroup/recvmsg6: as recvmsg4, for IPv6 sockets.
    pub const SOCK_RECVMSG6: &str = "portfwd_recvmsg6";
    /// cgroup/getpeername6: as getpeername4, for IPv6 sockets.
    pub const SOCK_GETPEERNAME6: &str = "portfwd_getpeername6";
    /// cgroup/bind6: as bind4, for IPv6 sockets.
    pub const SOCK_BIND6: &str = "portfwd_bind6";
}

/// Entries of each rules map: each published port of a range is one, and a wildcard
/// rule is one more per host address of the family (its expansions, see
/// [`BACKEND_EXPANDED`]): every port (1-65535) published as `*` on a host with up to 15
/// addresses of the family. The maps are allocated as they fill (`BPF_F_NO_PREALLOC`).
pub const MAX_RULES: u32 = 1_048_576;
/// `BPF_F_NO_PREALLOC` (include/uapi/linux/bpf.h): the rules maps take memory per entry
/// held, not per entry possible.
pub const RULES_MAP_FLAGS: u32 = 1;
/// Counter slots: one per published declaration (a range shares one slot).
pub const MAX_STATS_SLOTS: u32 = 16_384;
/// Established flows per family (`CONNTRACK_*`); the least recently used are evicted
/// first.
pub const MAX_FLOWS: u32 = 131_072;
/// Embryonic flows per family (`EMBRYONIC_*`): handshakes in progress, and whatever a
/// SYN flood leaves; the least recently used are evicted first.
pub const MAX_EMBRYONIC_FLOWS: u32 = 65_536;
/// Sockets of local clients tracked for `recvmsg`/`getpeername`.
pub const MAX_LOCAL_PEERS: u32 = 65_536;
/// Host addresses tracked for wildcard rules.
pub const MAX_HOST_ADDRS: u32 = 1_024;

/// Key of [`RULES_V4`].
// Aligned to 4: the rule cache reads keys 32 bits at a time (`rule_cache.rs`).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleKeyV4 {
    addr: [u8; 4],
    port: [u8; 2],
    proto: u8,
    _pad: u8,
}
const _: () = assert!(core::mem::size_of::<RuleKeyV4>() == 8);

impl RuleKeyV4 {
    /// `addr` 0.0.0.0 means every host address.
    #[inline(always)]
    pub const fn new(addr: [u8; 4], port_be: [u8; 2], proto: u8) -> Self {
        Self {
            addr,
            port: port_be,
            proto,
            _pad: 0,
        }
    }
    /// From host types; the port in host order.
    pub fn from_parts(addr: Ipv4Addr, port: u16, proto: u8) -> Self {
        Self::new(addr.octets(), port.to_be_bytes(), proto)
    }
    /// The address.
    pub fn addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.addr)
    }
    /// The port, host order.
    pub fn port(&self) -> u16 {
        u16::from_be_bytes(self.port)
    }
    /// The IP protocol (TCP or UDP).
    pub fn proto(&self) -> u8 {
        self.proto
    }
}

/// A flag of [`BackendV4`] / [`BackendV6`]: the rule is a container runtime's whose
/// port the runtime holds with its own idle reservation socket (podman's conmon): a
/// local `bind()` of it is let through instead of refused. Its traffic still goes to the
/// backend: ingress translates before the socket lookup, and the connect hooks rewrite
/// local clients first.
pub const BACKEND_RESERVATION: u8 = 1;

/// A flag of [`BackendV4`] / [`BackendV6`]: the entry is an expansion of a wildcard rule
/// (key `0.0.0.0` / `::`), written by the daemon under each host address of the family
/// and kept in step with them, so that a packet to a wildcard rule costs one exact
/// lookup. Internal: never a rule of its own (`list`, the saved state and adoption skip
/// it); an address-bound rule on the same key takes its place.
pub const BACKEND_EXPANDED: u8 = 2;

/// Value of [`RULES_V4`]: where a published port goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendV4 {
    addr: [u8; 4],
    port: [u8; 2],
    flags: u8,
    _pad: u8,
    stats_slot: u32,
}
const _: () = assert!(core::mem::size_of::<BackendV4>() == 12);

impl BackendV4 {
    /// From host types; the port in host order.
    pub fn new(addr: Ipv4Addr, port: u16, stats_slot: u32) -> Self {
        Self {
            addr: addr.octets(),
            port: port.to_be_bytes(),
            flags: 0,
            _pad: 0,
            stats_slot,
        }
    }
    /// The same backend with `flags` ([`BACKEND_RESERVATION`]).
    pub const fn with_flags(mut self, flags: u8) -> Self {
        self.flags = flags;
        self
    }
    /// Its flags ([`BACKEND_RESERVATION`]).
    #[inline(always)]
    pub const fn flags(&self) -> u8 {
        self.flags
    }
    /// The address, network-order bytes.
    #[inline(always)]
    pub const fn addr_bytes(&self) -> [u8; 4] {
        self.addr
    }
    /// The port, network order.
    #[inline(always)]
    pub const fn port_be(&self) -> [u8; 2] {
        self.port
    }
    /// The rule's slot in [`RULE_STATS`].
    #[inline(always)]
    pub const fn stats_slot(&self) -> u32 {
        self.stats_slot
    }
    /// The address.
    pub fn addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.addr)
    }
    /// The port, host order.
    pub fn port(&self) -> u16 {
        u16::from_be_bytes(self.port)
    }
}

/// Key of [`CONNTRACK_V4`]: a flow as the backend's replies carry it
/// (source = backend, destination = client).
// Aligned to 4: the reply cache reads keys 32 bits at a time (`reply_cache.rs`).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKeyV4 {
    backend_addr: [u8; 4],
    client_addr: [u8; 4],
    backend_port: [u8; 2],
    client_port: [u8; 2],
    proto: u8,
    // Split in power-of-two pieces: zeroing a 3-byte array compiles to a call to
    // `memset` in BPF (a function call on every reply); these are plain stores.
    _pad: u8,
    _pad2: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FlowKeyV4>() == 16);

impl FlowKeyV4 {
    /// From network-order bytes.
    #[inline(always)]
    pub const fn new(
        backend_addr: [u8; 4],
        backend_port_be: [u8; 2],
        client_addr: [u8; 4],
        client_port_be: [u8; 2],
        proto: u8,
    ) -> Self {
        Self {
            backend_addr,
            client_addr,
            backend_port: backend_port_be,
            client_port: client_port_be,
            proto,
            _pad: 0,
            _pad2: [0; 2],
        }
    }
    /// The backend's address and port (host order).
    pub fn backend(&self) -> (Ipv4Addr, u16) {
        (
            Ipv4Addr::from(self.backend_addr),
            u16::from_be_bytes(self.backend_port),
        )
    }
    /// The client's address and port (host order).
    pub fn client(&self) -> (Ipv4Addr, u16) {
        (
            Ipv4Addr::from(self.client_addr),
            u16::from_be_bytes(self.client_port),
        )
    }
    /// The IP protocol (TCP or UDP).
    pub fn proto(&self) -> u8 {
        self.proto
    }
}

/// Value of [`CONNTRACK_V4`]: the published address the client sent to, which replies
/// must carry as their source.
// Aligned to 4, as the reply cache reads it (`reply_cache.rs`).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowV4 {
    host_addr: [u8; 4],
    host_port: [u8; 2],
    _pad: [u8; 2],
    stats_slot: u32,
}
const _: () = assert!(core::mem::size_of::<FlowV4>() == 12);

impl FlowV4 {
    /// From network-order bytes.
    #[inline(always)]
    pub const fn new(host_addr: [u8; 4], host_port_be: [u8; 2], stats_slot: u32) -> Self {
        Self {
            host_addr,
            host_port: host_port_be,
            _pad: [0; 2],
            stats_slot,
        }
    }
    /// The published address, network-order bytes.
    #[inline(always)]
    pub const fn host_addr_bytes(&self) -> [u8; 4] {
        self.host_addr
    }
    /// The published port, network order.
    #[inline(always)]
    pub const fn host_port_be(&self) -> [u8; 2] {
        self.host_port
    }
    /// The rule's slot in [`RULE_STATS`].
    #[inline(always)]
    pub const fn stats_slot(&self) -> u32 {
        self.stats_slot
    }
    /// The published address and port the client used (host order).
    pub fn host(&self) -> (Ipv4Addr, u16) {
        (
            Ipv4Addr::from(self.host_addr),
            u16::from_be_bytes(self.host_port),
        )
    }
}

/// Value of [`RULE_STATS`] (per CPU; the daemon sums the CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleStats {
    /// Client-to-backend packets and bytes translated by the ingress programs.
    pub packets: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Backend-to-client packets and bytes translated back.
    pub reply_packets: u64,
    /// Their bytes.
    pub reply_bytes: u64,
    /// Connections (TCP) or datagrams (UDP) of local clients served at the socket.
    pub local: u64,
    /// Zero; room for a counter without a layout change.
    pub _reserved: u64,
}
const _: () = assert!(core::mem::size_of::<RuleStats>() == 48);

/// Key of [`LOCAL_PEERS_V4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LocalPeerKeyV4 {
    socket_cookie: u64,
    backend_addr: [u8; 4],
    backend_port: [u8; 2],
    proto: u8,
    _pad: u8,
}
const _: () = assert!(core::mem::size_of::<LocalPeerKeyV4>() == 16);

impl LocalPeerKeyV4 {
    /// From network-order bytes.
    #[inline(always)]
    pub const fn new(
        socket_cookie: u64,
        backend_addr: [u8; 4],
        backend_port_be: [u8; 2],
        proto: u8,
    ) -> Self {
        Self {
            socket_cookie,
            backend_addr,
            backend_port: backend_port_be,
            proto,
            _pad: 0,
        }
    }
}

/// Value of [`LOCAL_PEERS_V4`]: the published address the local client used.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalPeerV4 {
    host_addr: [u8; 4],
    host_port: [u8; 2],
    _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<LocalPeerV4>() == 8);

impl LocalPeerV4 {
    /// From network-order bytes.
    #[inline(always)]
    pub const fn new(host_addr: [u8; 4], host_port_be: [u8; 2]) -> Self {
        Self {
            host_addr,
            host_port: host_port_be,
            _pad: [0; 2],
        }
    }
    /// The published address, network-order bytes.
    #[inline(always)]
    pub const fn host_addr_bytes(&self) -> [u8; 4] {
        self.host_addr
    }
    /// The published port, network order.
    #[inline(always)]
    pub const fn host_port_be(&self) -> [u8; 2] {
        self.host_port
    }
}

/// Key of [`RULES_V6`].
// Aligned to 4: the rule cache reads keys 32 bits at a time (`rule_cache.rs`).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleKeyV6 {
    addr: [u8; 16],
    port: [u8; 2],
    proto: u8,
    _pad: u8,
}
const _: () = assert!(core::mem::size_of::<RuleKeyV6>() == 20);

impl RuleKeyV6 {
    /// `addr` `::` means every host address.
    #[inline(always)]
    pub const fn new(addr: [u8; 16], port_be: [u8; 2], proto: u8) -> Self {
        Self {
            addr,
            port: port_be,
            proto,
            _pad: 0,
        }
    }
    /// From host types; the port in host order.
    pub fn from_parts(addr: Ipv6Addr, port: u16, proto: u8) -> Self {
        Self::new(addr.octets(), port.to_be_bytes(), proto)
    }
    /// The address.
    pub fn addr(&self) -> Ipv6Addr {
        Ipv6Addr::from(self.addr)
    }
    /// The port, host order.
    pub fn port(&self) -> u16 {
        u16::from_be_bytes(self.port)
    }
    /// The IP protocol (TCP or UDP).
    pub fn proto(&self) -> u8 {
        self.proto
    }
}

/// Value of [`RULES_V6`]: where a published port goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendV6 {
    addr: [u8; 16],
    port: [u8; 2],
    flags: u8,
    _pad: u8,
    stats_slot: u32,
}
const _: () = assert!(core::mem::size_of::<BackendV6>() == 24);

impl BackendV6 {
    /// From host types; the port in host order.
    pub fn new(addr: Ipv6Addr, port: u16, stats_slot: u32) -> Self {
        Self::from_bytes(addr.octets(), port.to_be_bytes(), stats_slot)
    }
    /// From network-order bytes (the kernel's side).
    #[inline(always)]
    pub const fn from_bytes(addr: [u8; 16], port_be: [u8; 2], stats_slot: u32) -> Self {
        Self {
            addr,
            port: port_be,
            flags: 0,
            _pad: 0,
            stats_slot,
        }
    }
    /// The same backend with `flags` ([`BACKEND_RESERVATION`]).
    pub const fn with_flags(mut self, flags: u8) -> Self {
        self.flags = flags;
        self
    }
    /// Its flags ([`BACKEND_RESERVATION`]).
    #[inline(always)]
    pub const fn flags(&self) -> u8 {
        self.flags
    }
    /// An IPv4 backend as an IPv4-mapped one (how a dual-stack socket reaches it),
    /// flags kept.
    #[inline(always)]
    pub fn from_v4_mapped(b: BackendV4) -> Self {
        Self::from_bytes(
            crate::addr::to_ipv4_mapped(b.addr_bytes()),
            b.port_be(),
            b.stats_slot(),
        )
        .with_flags(b.flags())
    }
    /// The address, network-order bytes.
    #[inline(always)]
    pub const fn addr_bytes(&self) -> [u8; 16] {
        self.addr
    }
    /// The port, network order.
    #[inline(always)]
    pub const fn port_be(&self) -> [u8; 2] {
        self.port
    }
    /// The rule's slot in [`RULE_STATS`].
    #[inline(always)]
    pub const fn stats_slot(&self) -> u32 {
        self.stats_slot
    }
    /// An IPv4 backend written as `::ffff:a.b.c.d`: the rule of an IPv6 host address
    /// whose backend has no IPv6 address. Local clients reach it (the socket hooks
    /// connect a dual-stack socket to the mapped address); the packet path cannot, since
    /// it does not translate between families.
    #[inline(always)]
    pub fn is_ipv4_mapped(&self) -> bool {
        crate::addr::is_ipv4_mapped(&self.addr)
    }
    /// The address.
    pub fn addr(&self) -> Ipv6Addr {
        Ipv6Addr::from(self.addr)
    }
    /// The port, host order.
    pub fn port(&self) -> u16 {
        u16::from_be_bytes(self.port)
    }
}

/// Key of [`CONNTRACK_V6`]: a flow as the backend's replies carry it
/// (source = backend, destination = client).
// Aligned to 4: the reply cache reads keys 32 bits at a time (`reply_cache.rs`).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKeyV6 {
    backend_addr: [u8; 16],
    client_addr: [u8; 16],
    backend_port: [u8; 2],
    client_port: [u8; 2],
    proto: u8,
    // Split in power-of-two pieces: zeroing a 3-byte array compiles to a call to
    // `memset` in BPF (a function call on every reply); these are plain stores.
    _pad: u8,
    _pad2: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FlowKeyV6>() == 40);

impl FlowKeyV6 {
    /// From network-order bytes.
    #[inline(always)]
    pub const fn new(
        backend_addr: [u8; 16],
        backend_port_be: [u8; 2],
        client_addr: [u8; 16],
        client_port_be: [u8; 2],
        proto: u8,
    ) -> Self {
        Self {
            backend_addr,
            client_addr,
            backend_port: backend_port_be,
            client_port: client_port_be,
            proto,
            _pad: 0,
            _pad2: [0; 2],
        }
    }
    /// The backend's address and port (host order).
    pub fn backend(&self) -> (Ipv6Addr, u16) {
        (
            Ipv6Addr::from(self.backend_addr),
            u16::from_be_bytes(self.backend_port),
        )
    }
    /// The client's address and port (host order).
    pub fn client(&self) -> (Ipv6Addr, u16) {
        (
            Ipv6Addr::from(self.client_addr),
            u16::from_be_bytes(self.client_port),
        )
    }
    /// The IP protocol (TCP or UDP).
    pub fn proto(&self) -> u8 {
        self.proto
    }
}

/// Value of [`CONNTRACK_V6`]: the published address the client sent to, which replies
/// must carry as their source.
// Aligned to 4, as the reply cache reads it (`reply_cache.rs`).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowV6 {
    host_addr: [u8; 16],
    host_port: [u8; 2],
    _pad: [u8; 2],
    stats_slot: u32,
}
const _: () = assert!(core::mem::size_of::<FlowV6>() == 24);

impl FlowV6 {
    /// From network-order bytes.
    #[inline(always)]
    pub const fn new(host_addr: [u8; 16], host_port_be: [u8; 2], stats_slot: u32) -> Self {
        Self {
            host_addr,
            host_port: host_port_be,
            _pad: [0; 2],
            stats_slot,
        }
    }
    /// The published address, network-order bytes.
    #[inline(always)]
    pub const fn host_addr_bytes(&self) -> [u8; 16] {
        self.host_addr
    }
    /// The published port, network order.
    #[inline(always)]
    pub const fn host_port_be(&self) -> [u8; 2] {
        self.host_port
    }
    /// The rule's slot in [`RULE_STATS`].
    #[inline(always)]
    pub const fn stats_slot(&self) -> u32 {
        self.stats_slot
    }
    /// The published address and port the client used (host order).
    pub fn host(&self) -> (Ipv6Addr, u16) {
        (
            Ipv6Addr::from(self.host_addr),
            u16::from_be_bytes(self.host_port),
        )
    }
}

/// Key of [`LOCAL_PEERS_V6`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LocalPeerKeyV6 {
    socket_cookie: u64,
    backend_addr: [u8; 16],
    backend_port: [u8; 2],
    proto: u8,
    // Power-of-two pieces, as in `FlowKeyV4`.
    _pad: u8,
    _pad4: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<LocalPeerKeyV6>() == 32);

impl LocalPeerKeyV6 {
    /// From network-order bytes.
    #[inline(always)]
    pub const fn new(
        socket_cookie: u64,
        backend_addr: [u8; 16],
        backend_port_be: [u8; 2],
        proto: u8,
    ) -> Self {
        Self {
            socket_cookie,
            backend_addr,
            backend_port: backend_port_be,
            proto,
            _pad: 0,
            _pad4: [0; 4],
        }
    }
}

/// Value of [`LOCAL_PEERS_V6`]: the published address the local client used.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalPeerV6 {
    host_addr: [u8; 16],
    host_port: [u8; 2],
    _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<LocalPeerV6>() == 20);

impl LocalPeerV6 {
    /// From network-order bytes.
    #[inline(always)]
    pub const fn new(host_addr: [u8; 16], host_port_be: [u8; 2]) -> Self {
        Self {
            host_addr,
            host_port: host_port_be,
            _pad: [0; 2],
        }
    }
    /// The published address, network-order bytes.
    #[inline(always)]
    pub const fn host_addr_bytes(&self) -> [u8; 16] {
        self.host_addr
    }
    /// The published port, network order.
    #[inline(always)]
    pub const fn host_port_be(&self) -> [u8; 2] {
        self.host_port
    }
}

/// Value of [`CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Network namespace cookie of the host (the daemon's namespace): loopback
    /// destinations and binds are only the host's own in that namespace.
    pub host_netns_cookie: u64,
    /// `CONFIG_*` bits.
    pub flags: u64,
}
const _: () = assert!(core::mem::size_of::<Config>() == 16);

/// [`Config::flags`]: redirect translated packets straight to the backend's bridge port
/// (FIB lookup, MAC rewrite, redirect) instead of letting the kernel route them, from
/// the skb hooks (TC, generic XDP), whose redirects every device accepts.
pub const CONFIG_FAST_PATH: u64 = 1;
/// [`Config::flags`]: the same from native XDP. A veth delivers redirected XDP frames
/// only when its peer runs NAPI (GRO on, or an XDP program) and drops them otherwise,
/// so this is a switch of its own.
pub const CONFIG_FAST_PATH_NATIVE_XDP: u64 = 2;
/// [`Config::flags`]: no NAT64 (`portfwd --no-nat64`): remote IPv6 clients of an
/// IPv4-only backend are passed (`pass_no_ipv6_backend`) instead of translated.
pub const CONFIG_NO_NAT64: u64 = 4;
/// [`Config::flags`]: the socket hooks serve only the host's network namespace
/// (`portfwd --local-clients host-netns`, Cilium's host-namespace-only socket LB): a
/// process of another namespace in the served cgroup (a VPN or test namespace that
/// reaches the host's address but has no route to the backends) is left to the packet
/// path, like a remote client.
pub const CONFIG_SOCK_HOST_NETNS_ONLY: u64 = 8;
/// [`Config::flags`]: the fast path at TC transmits on the bridge port even when it is a
/// veth whose peer is in another namespace ([`BRIDGE_PORT_PEER`]), instead of handing the
/// packet to the peer (`portfwd --fast-path-no-peer`): slower, but the host end's egress
/// (qdiscs such as a bandwidth limit, TC egress programs) sees the packets.
pub const CONFIG_FAST_PATH_NO_PEER: u64 = 16;

/// NAT64 (remote IPv6 clients of an IPv4-only backend, at TC): the translation of each
/// such flow, keyed by the client's flow as it arrives ([`FlowKeyV6`]: client address
/// and port, published address and port). Written by the TC ingress program on the
/// flow's first packet (UDP datagram, TCP SYN).
pub const NAT64_FLOWS: &str = "NAT64_FLOWS";
/// NAT64, the other way: the backend's replies ([`FlowKeyV4`]: backend, host's source
/// address and NAT64 port) back to the IPv6 flow. Written with [`NAT64_FLOWS`]; an
/// insert that finds the key taken moves on to the next port, so ports are unique.
pub const NAT64_REPLIES: &str = "NAT64_REPLIES";
/// Program array: entry [`NAT64_PROG_INDEX`] is [`programs::TC_NAT64`], which the TC
/// ingress program tail-calls (a tail call starts a fresh 512-byte stack, which the
/// ingress program's own frame leaves no room for). Written by the daemon at load.
pub const NAT64_PROGS: &str = "NAT64_PROGS";
/// The index of [`programs::TC_NAT64`] in [`NAT64_PROGS`].
pub const NAT64_PROG_INDEX: u32 = 0;
/// Flows NAT64 tracks at once (each map; LRU).
pub const MAX_NAT64_FLOWS: u32 = 65_536;
/// The source ports NAT64 gives its IPv4 side: above Linux's default ephemeral range
/// (32768-60999), so the host's own connections do not pick them.
pub const NAT64_PORT_MIN: u16 = 61_000;
/// How many ports NAT64 hands out, from [`NAT64_PORT_MIN`] up to 65535.
pub const NAT64_PORT_COUNT: u16 = 4_536;
/// How many ports an allocation tries before giving up (the flow is then passed).
pub const NAT64_PORT_TRIES: u16 = 8;
/// When a NAT64 flow's port may go to a new flow: a TCP flow that saw a FIN or RST,
/// this long after its last packet; a UDP flow, this long idle; any flow, this long
/// idle. Without reuse, 4,536 flows to one backend port would use the ports up for good.
pub const NAT64_CLOSED_REUSE_NS: u64 = 10_000_000_000;
/// How long a UDP flow's port stays its own while idle (see [`NAT64_CLOSED_REUSE_NS`]).
pub const NAT64_UDP_IDLE_NS: u64 = 60_000_000_000;
/// How long any flow's port stays its own while idle (see [`NAT64_CLOSED_REUSE_NS`]).
pub const NAT64_IDLE_NS: u64 = 7_200_000_000_000;
/// [`Nat64Reply::flags`]: the TCP flow saw a FIN or an RST.
pub const NAT64_CLOSING: u8 = 1;
/// [`Nat64Reply::flags`]: the client sent a FIN.
pub const NAT64_FIN_CLIENT: u8 = 2;
/// [`Nat64Reply::flags`]: the backend sent a FIN.
pub const NAT64_FIN_BACKEND: u8 = 4;
/// [`Nat64Reply::flags`]: the TCP connection is over (an RST, or the ACK after a FIN each
/// way): a new flow that finds every candidate port held may take its port over
/// (see [`crate::nat64::track_tcp`]).
pub const NAT64_CLOSED: u8 = 8;
/// [`Nat64Reply::flags`]: the backend sent its FIN before the client's (it closed
/// first, so it will hold the connection's tuple in `TIME_WAIT`).
pub const NAT64_FIN_BACKEND_FIRST: u8 = 16;
/// [`Nat64Reply::flags`]: the client's FIN carried a TCP timestamp
/// ([`Nat64Reply::client_fin_tsval`]).
pub const NAT64_FIN_CLIENT_TS: u8 = 32;

/// Value of [`NAT64_FLOWS`]: the IPv4 side of a translated flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nat64Flow {
    /// The host's address towards the backend (the translated source).
    pub snat_addr: [u8; 4],
    /// The backend's address.
    pub backend_addr: [u8; 4],
    /// The host's NAT64 port of the flow (the translated source port).
    pub snat_port: [u8; 2],
    /// The backend's port, network order.
    pub backend_port: [u8; 2],
    /// The rule's slot in [`RULE_STATS`].
    pub stats_slot: u32,
}
const _: () = assert!(core::mem::size_of::<Nat64Flow>() == 16);

/// Value of [`NAT64_REPLIES`]: the IPv6 flow a reply belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nat64Reply {
    /// The IPv6 client's address.
    pub client_addr: [u8; 16],
    /// The published IPv6 address the client sent to.
    pub host_addr: [u8; 16],
    /// The client's port, network order.
    pub client_port: [u8; 2],
    /// The published port, network order.
    pub host_port: [u8; 2],
    /// The rule's slot in [`RULE_STATS`].
    pub stats_slot: u32,
    /// Where the client's packets arrive: replies leave there (no IPv6 route lookup, so
    /// IPv6 forwarding need not be on).
    pub client_ifindex: u32,
    /// The TCP sequence number just past the client's FIN (host order; 0 before one):
    /// the backend's `rcv_nxt` from then on ([`Nat64Reply::may_take_over`]).
    pub client_fin_end: u32,
    /// The timestamp (TSval) of the client's FIN, if it had one
    /// ([`NAT64_FIN_CLIENT_TS`]): the backend's `ts_recent` from then on.
    pub client_fin_tsval: u32,
    /// The TCP state: [`NAT64_CLOSING`], [`NAT64_FIN_CLIENT`], [`NAT64_FIN_BACKEND`],
    /// [`NAT64_CLOSED`], [`NAT64_FIN_BACKEND_FIRST`] ([`crate::nat64::track_tcp`]), and
    /// [`NAT64_FIN_CLIENT_TS`].
    pub flags: u8,
    /// Zero.
    pub _pad: [u8; 3],
    /// `bpf_ktime_get_coarse_ns` of the flow's last packet, either way.
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Nat64Reply>() == 64);

impl Nat64Reply {
    /// Whether this reply entry still belongs to the IPv6 client flow `f` (its port may
    /// have gone to a new flow once that one looked over).
    #[inline(always)]
    pub fn belongs_to(&self, f: &crate::packet::Flow<16>) -> bool {
        self.client_addr == f.src
            && self.client_port == f.sport
            && self.host_addr == f.dst
            && self.host_port == f.dport
    }
    /// Whether the flow is over (or long idle) at `now_ns`, so its port may be reused.
    #[inline(always)]
    pub fn reusable(&self, now_ns: u64, proto: u8) -> bool {
        let idle = now_ns.saturating_sub(self.last_seen_ns);
        (self.flags & NAT64_CLOSING != 0 && idle > NAT64_CLOSED_REUSE_NS)
            || (proto == crate::proto::UDP && idle > NAT64_UDP_IDLE_NS)
            || idle > NAT64_IDLE_NS
    }
    /// Whether the flow is a TCP connection that is over ([`NAT64_CLOSED`]): its port
    /// may go to a new flow that finds no other, as conntrack's NAT takes over the tuple
    /// of a connection in `TIME_WAIT` or `CLOSE` when it runs out of ports
    /// (`nf_nat_used_tuple_harder`, net/netfilter/nf_nat_core.c).
    #[inline(always)]
    pub fn closed(&self, proto: u8) -> bool {
        proto == crate::proto::TCP && self.flags & NAT64_CLOSED != 0
    }
    /// Whether a new connection whose SYN has sequence number `syn_seq` and timestamp
    /// `syn_tsval` (if it has one) can take over this closed connection's port at once
    /// ([`Nat64Reply::closed`]) and be accepted by the backend.
    ///
    /// A backend that closed first holds the tuple in `TIME_WAIT` once the client's FIN
    /// came ([`NAT64_FIN_BACKEND_FIRST`]; an HTTP server answering
    /// `Connection: close` does). Linux takes a SYN there only if PAWS passes (its
    /// timestamp not older than the client's last) and its timestamp is newer or its
    /// sequence number after the old connection's (`tcp_timewait_state_process`);
    /// otherwise it answers with the old connection's ACK, the client resets and
    /// retransmits its SYN. Timestamps start at a random offset for each connection, so
    /// a new connection's is older half the time. conntrack's NAT asks the sequence
    /// number half (`nf_seq_has_advanced`). A backend that did not close first (or was
    /// reset before the client's FIN) keeps no `TIME_WAIT`.
    #[inline(always)]
    pub fn may_take_over(&self, proto: u8, syn_seq: u32, syn_tsval: Option<u32>) -> bool {
        let time_wait = NAT64_FIN_BACKEND_FIRST | NAT64_FIN_CLIENT;
        if !self.closed(proto) || self.flags & time_wait != time_wait {
            return self.closed(proto);
        }
        let seq_after = crate::nat64::seq_after(syn_seq, self.client_fin_end);
        match syn_tsval {
            Some(t) if self.flags & NAT64_FIN_CLIENT_TS != 0 => {
                let newer = t.wrapping_sub(self.client_fin_tsval) as i32;
                newer > 0 || (newer == 0 && seq_after)
            }
            _ => seq_after,
        }
    }
}

/// Most bridge forwarding entries tracked for the fast path.
pub const MAX_BRIDGE_PORTS: u32 = 16_384;

/// Set in a [`BRIDGE_PORTS`] value (the port's ifindex): the port is one end of a veth
/// (or netkit) pair whose other end lives in another network namespace (a container's
/// `eth0`), so TC ingress can hand the packet straight to that end (`bpf_redirect_peer`)
/// instead of transmitting it on the port. Interface indexes stay below 2^31.
pub const BRIDGE_PORT_PEER: u32 = 1 << 31;

/// Entries of each [`NEXT_HOPS_V4`] / [`NEXT_HOPS_V6`] cache (least recently used out).
pub const MAX_NEXT_HOPS: u32 = 16_384;

/// How long a cached next hop is used before the FIB is asked again: a route or
/// neighbour change reaches the fast path within this time (a bridge port change at
/// once: the daemon clears the caches). Short enough that a stale hop is a blip, long
/// enough that the FIB is asked once per backend every few hundred thousand packets.
pub const NEXT_HOP_TTL_NS: u64 = 50_000_000;

/// Key of [`NEXT_HOPS_V4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextHopKeyV4 {
    /// The interface the packet arrived on (the FIB's answer may depend on it).
    pub ifindex: u32,
    /// The backend's address (the translated destination).
    pub addr: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<NextHopKeyV4>() == 8);

/// Key of [`NEXT_HOPS_V6`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextHopKeyV6 {
    /// As in [`NextHopKeyV4`].
    pub ifindex: u32,
    /// The backend's address (the translated destination).
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<NextHopKeyV6>() == 20);

/// Value of [`NEXT_HOPS_V4`] and [`NEXT_HOPS_V6`]: what the FIB and [`BRIDGE_PORTS`]
/// answered, and when.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CachedHop {
    /// `bpf_ktime_get_coarse_ns` when the FIB answered.
    pub stamp_ns: u64,
    /// The bridge port's ifindex, with [`BRIDGE_PORT_PEER`] as in [`BRIDGE_PORTS`].
    pub port: u32,
    /// The longest packet (IPv4 total length, IPv6 payload plus header) the FIB's MTU
    /// check has passed for this hop: a longer one asks the FIB again.
    pub fits: u16,
    /// The source MAC to write (the FIB's: the bridge's).
    pub smac: [u8; 6],
    /// The destination MAC to write (the backend's neighbour entry).
    pub dmac: [u8; 6],
    /// Zero.
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<CachedHop>() == 32);

impl CachedHop {
    /// Whether the hop may serve a packet of `len` bytes at `now_ns`.
    #[inline(always)]
    pub fn serves(&self, now_ns: u64, len: u16) -> bool {
        now_ns.wrapping_sub(self.stamp_ns) < NEXT_HOP_TTL_NS && len <= self.fits
    }
}

/// Key of [`BRIDGE_PORTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BridgePortKey {
    /// The bridge's ifindex.
    pub bridge_ifindex: u32,
    /// A MAC address the bridge has learnt.
    pub mac: [u8; 6],
    /// Zero.
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<BridgePortKey>() == 12);

impl BridgePortKey {
    /// From network-order bytes.
    #[inline(always)]
    pub const fn new(bridge_ifindex: u32, mac: [u8; 6]) -> Self {
        Self {
            bridge_ifindex,
            mac,
            _pad: [0; 2],
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (every impl below): each type is repr(C), Copy, has no implicit padding
    // (sizes asserted above) and every bit pattern is a valid value.
    unsafe impl aya::Pod for super::LocalPeerKeyV4 {}
    unsafe impl aya::Pod for super::LocalPeerV4 {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::BridgePortKey {}
    unsafe impl aya::Pod for super::NextHopKeyV4 {}
    unsafe impl aya::Pod for super::NextHopKeyV6 {}
    unsafe impl aya::Pod for super::CachedHop {}
    unsafe impl aya::Pod for super::RuleKeyV4 {}
    unsafe impl aya::Pod for super::BackendV4 {}
    unsafe impl aya::Pod for super::FlowKeyV4 {}
    unsafe impl aya::Pod for super::FlowV4 {}
    unsafe impl aya::Pod for super::RuleStats {}
    unsafe impl aya::Pod for super::RuleKeyV6 {}
    unsafe impl aya::Pod for super::BackendV6 {}
    unsafe impl aya::Pod for super::FlowKeyV6 {}
    unsafe impl aya::Pod for super::FlowV6 {}
    unsafe impl aya::Pod for super::LocalPeerKeyV6 {}
    unsafe impl aya::Pod for super::LocalPeerV6 {}
    unsafe impl aya::Pod for super::Nat64Flow {}
    unsafe impl aya::Pod for super::Nat64Reply {}
    unsafe impl aya::Pod for crate::rule_cache::CachedRuleV4 {}
    unsafe impl aya::Pod for crate::rule_cache::CachedRuleV6 {}
    unsafe impl aya::Pod for crate::reply_cache::CachedFlowV4 {}
    unsafe impl aya::Pod for crate::reply_cache::CachedFlowV6 {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(flags: u8, last_seen_ns: u64) -> Nat64Reply {
        Nat64Reply {
            client_addr: [0; 16],
            host_addr: [0; 16],
            client_port: [0; 2],
            host_port: [0; 2],
            stats_slot: 0,
            client_ifindex: 0,
            client_fin_end: 0,
            client_fin_tsval: 0,
            flags,
            _pad: [0; 3],
            last_seen_ns,
        }
    }

    #[test]
    fn nat64_ports_are_reused_once_a_flow_is_over() {
        let s = 1_000_000_000u64;
        let t0 = 100_000 * s;
        let (tcp, udp) = (crate::proto::TCP, crate::proto::UDP);
        // (flags, seconds since the last packet, protocol, reusable?)
        for (flags, ago, proto, want) in [
            (0, 5, tcp, false),
            (NAT64_CLOSING, 5, tcp, false),
            (NAT64_CLOSING, 11, tcp, true),
            (0, 3600, tcp, false),
            (0, 7201, tcp, true),
            (0, 59, udp, false),
            (0, 61, udp, true),
        ] {
            let r = reply(flags, t0 - ago * s);
            assert_eq!(r.reusable(t0, proto), want, "{flags} {ago} s {proto}");
        }
        // A clock behind the entry (another CPU wrote it just now) is not idle.
        assert!(!reply(NAT64_CLOSING, t0 + s).reusable(t0, tcp));
    }

    /// A closed connection's port goes to a SYN at once only if the backend takes it:
    /// the backend did not close first (no TIME_WAIT), or Linux's TIME_WAIT test passes
    /// (timestamp newer, or equal with the sequence number after the client's FIN; no
    /// timestamp to compare: the sequence number), all modulo 2^32.
    #[test]
    fn nat64_takes_over_only_what_time_wait_accepts() {
        let (tcp, udp) = (crate::proto::TCP, crate::proto::UDP);
        let fins = NAT64_CLOSING | NAT64_FIN_CLIENT | NAT64_FIN_BACKEND;
        let passive = fins | NAT64_CLOSED;
        let tw = passive | NAT64_FIN_BACKEND_FIRST;
        let ts = tw | NAT64_FIN_CLIENT_TS;
        let reset = NAT64_CLOSING | NAT64_CLOSED;
        // (flags, client FIN's end and TSval, SYN's seq and TSval, protocol, takes over?)
        for (flags, (end, tsval), (seq, syn_ts), proto, want) in [
            // The client closed first, or a reset: no TIME_WAIT on the backend.
            (passive, (1000, 0), (7, None), tcp, true),
            (reset, (0, 0), (7, Some(1)), tcp, true),
            (
                reset | NAT64_FIN_BACKEND | NAT64_FIN_BACKEND_FIRST,
                (0, 0),
                (7, None),
                tcp,
                true,
            ),
            // Not closed: a FIN each way without the last ACK.
            (
                fins | NAT64_FIN_BACKEND_FIRST,
                (1000, 0),
                (5000, None),
                tcp,
                false,
            ),
            // TIME_WAIT, no timestamps: the sequence number alone.
            (tw, (1000, 0), (1001, None), tcp, true),
            (tw, (1000, 0), (1000, None), tcp, false),
            (tw, (1000, 0), (999, None), tcp, false),
            (tw, (1000, 0), (1000 + (1 << 31) - 1, None), tcp, true),
            (tw, (1000, 0), (1000 + (1 << 31), None), tcp, true),
            (tw, (1000, 0), (1000 + (1 << 31) + 1, None), tcp, false),
            (tw, (u32::MAX - 5, 0), (3, None), tcp, true),
            (tw, (3, 0), (u32::MAX - 5, None), tcp, false),
            // The SYN's timestamp with none on the FIN: the sequence number.
            (tw, (1000, 0), (999, Some(5)), tcp, false),
            // Timestamps both: newer wins whatever the sequence number, older loses.
            (ts, (1000, 500), (999, Some(501)), tcp, true),
            (ts, (1000, 500), (5000, Some(499)), tcp, false),
            (ts, (1000, u32::MAX), (999, Some(2)), tcp, true),
            (ts, (1000, 2), (5000, Some(u32::MAX)), tcp, false),
            // Equal: the sequence number decides.
            (ts, (1000, 500), (1001, Some(500)), tcp, true),
            (ts, (1000, 500), (999, Some(500)), tcp, false),
            // A SYN without a timestamp passes PAWS: the sequence number.
            (ts, (1000, 500), (1001, None), tcp, true),
            (passive, (1000, 0), (7, None), udp, false),
        ] {
            let mut r = reply(flags, 0);
            (r.client_fin_end, r.client_fin_tsval) = (end, tsval);
            assert_eq!(
                r.may_take_over(proto, seq, syn_ts),
                want,
                "{flags:#x} FIN end {end} ts {tsval}, SYN {seq} {syn_ts:?}, {proto}"
            );
        }
    }
}
