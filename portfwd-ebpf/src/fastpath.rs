//! The fast path: a translated packet goes straight to the backend's bridge port instead
//! of up the host's stack. The kernel's FIB and neighbour tables decide the next hop
//! (`bpf_fib_lookup`), the daemon's copy of the bridges' forwarding databases names the
//! port (`BRIDGE_PORTS`), and the packet is forwarded as the kernel would: MACs
//! rewritten, TTL (IPv6: hop limit) decremented. Whenever any step cannot complete (no
//! route, neighbour not resolved yet, MAC not learnt, TTL expiring, packet over the
//! route's MTU) the kernel path takes the packet instead.
//!
//! The FIB lookup costs more than the whole rest of the program (several hundred ns on
//! these machines, BPF_PROG_RUN): its answer is cached per (ingress interface, backend)
//! for `NEXT_HOP_TTL_NS` (`NEXT_HOPS_V4`/`_V6`), with the longest packet the MTU check
//! passed. Only answers are cached, never a fallback; the daemon clears the caches when
//! the bridge ports change. The key has no source or ports: a multipath route's
//! per-flow choice is not kept (backends sit on the host's bridges, one path each).

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_SUCCESS},
    helpers::{bpf_fib_lookup, bpf_ktime_get_coarse_ns},
};
use portfwd_common::{
    packet::{
        IP6_HOP_LIMIT_OFF, IP6_PLEN_OFF, IPV4_MIN_HLEN, IPV6_HLEN, IP_TOT_LEN_OFF, IP_TTL_OFF,
    },
    BridgePortKey, CachedHop, NextHopKeyV4, NextHopKeyV6, BRIDGE_PORT_PEER,
};

use crate::{
    hook::{addr_words, Packet},
    maps,
    packet::{bytes_at, Ipv4Flow, Ipv6Flow},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Where a translated packet is sent, and the MACs to give it.
pub struct NextHop {
    pub port_ifindex: u32,
    /// The port is a veth whose peer is in another namespace (`BRIDGE_PORT_PEER`).
    pub peer: bool,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

/// The bridge port leading to `f.dst` (already the backend), if every lookup completes.
/// The caller checks that the fast path is on at its hook.
#[inline(always)]
pub fn next_hop<P: Packet>(pkt: &P, f: &Ipv4Flow) -> Option<NextHop> {
    let ip = bytes_at(pkt.data(), pkt.data_end(), f.ip_off, IPV4_MIN_HLEN)?;
    // SAFETY: 20 bytes of IPv4 header are inside the packet (checked above).
    let (ttl, tot_len) = unsafe {
        (
            *ip.add(IP_TTL_OFF),
            u16::from_be_bytes([*ip.add(IP_TOT_LEN_OFF), *ip.add(IP_TOT_LEN_OFF + 1)]),
        )
    };
    // An expiring TTL needs an ICMP error: the kernel's job.
    if ttl <= 1 {
        return None;
    }
    let key = NextHopKeyV4 {
        ifindex: pkt.ingress_ifindex(),
        addr: f.dst,
    };
    cached_or_asked(pkt, &key, tot_len, |p| {
        p.family = AF_INET;
        p.l4_protocol = f.proto;
        p.sport = u16::from_ne_bytes(f.sport);
        p.dport = u16::from_ne_bytes(f.dport);
        p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(f.src);
        p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(f.dst);
    })
}

/// As [`next_hop`], for IPv6: the hop limit instead of the TTL, and the FIB's MTU check
/// on the whole packet (header included, as for IPv4's total length).
#[inline(always)]
pub fn next_hop_v6<P: Packet>(pkt: &P, f: &Ipv6Flow) -> Option<NextHop> {
    let ip = bytes_at(pkt.data(), pkt.data_end(), f.ip_off, IPV6_HLEN)?;
    // SAFETY: the 40-byte IPv6 header is inside the packet (checked above).
    let (hops, plen) = unsafe {
        (
            *ip.add(IP6_HOP_LIMIT_OFF),
            u16::from_be_bytes([*ip.add(IP6_PLEN_OFF), *ip.add(IP6_PLEN_OFF + 1)]),
        )
    };
    // An expiring hop limit needs an ICMPv6 error: the kernel's job.
    if hops <= 1 {
        return None;
    }
    let tot_len = plen.saturating_add(IPV6_HLEN as u16);
    // The kernel never forwards a multicast, link-local or loopback source: the FIB says
    // so for each such packet (the cache is per destination, blind to the source).
    if scoped_v6(&f.src) {
        return None;
    }
    let key = NextHopKeyV6 {
        ifindex: pkt.ingress_ifindex(),
        addr: f.dst,
    };
    cached_or_asked(pkt, &key, tot_len, |p| {
        p.family = AF_INET6;
        p.l4_protocol = f.proto;
        p.sport = u16::from_ne_bytes(f.sport);
        p.dport = u16::from_ne_bytes(f.dport);
        p.__bindgen_anon_3.ipv6_src = addr_words(f.src);
        p.__bindgen_anon_4.ipv6_dst = addr_words(f.dst);
    })
}

/// The next hop cached under `key` if it serves a packet of `tot_len` bytes now; else
/// the FIB's answer (`request` writes the family's part of the question), cached.
#[inline(always)]
fn cached_or_asked<P: Packet, K: maps::NextHopKey>(
    pkt: &P,
    key: &K,
    tot_len: u16,
    request: impl FnOnce(&mut FibParams),
) -> Option<NextHop> {
    let now = now_ns();
    let cached = key.cached();
    if let Some(c) = cached {
        if c.serves(now, tot_len) {
            return Some(NextHop::from(c));
        }
    }
    let mut entry = fresh_entry(now, tot_len);
    let p = maps::fib_scratch()?;
    request(p);
    p.__bindgen_anon_1.tot_len = tot_len;
    p.ifindex = pkt.ingress_ifindex();
    let hop = lookup(pkt, p)?;
    hop.fill(&mut entry, cached);
    key.cache(&entry);
    Some(hop)
}

/// Multicast (ff00::/8), link-local (fe80::/10) or loopback (::1): addresses the kernel
/// never forwards from (`rt6_need_strict`, which `bpf_fib_lookup` applies to the source).
#[inline(always)]
fn scoped_v6(a: &[u8; 16]) -> bool {
    let loopback = a[..15].iter().all(|&b| b == 0) && a[15] == 1;
    a[0] == 0xff || (a[0] == 0xfe && a[1] & 0xc0 == 0x80) || loopback
}

/// The coarse clock (jiffies resolution; a few ns, against the precise clock's tens).
#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// A cache entry stamped `now` for a packet of `len` bytes, its hop not filled yet
/// (built on the stack before the FIB lookup, so `len` is not held in a register across
/// the helper call).
#[inline(always)]
fn fresh_entry(now: u64, len: u16) -> CachedHop {
    CachedHop {
        stamp_ns: now,
        port: 0,
        fits: len,
        smac: [0; 6],
        dmac: [0; 6],
        _pad: [0; 6],
    }
}

impl NextHop {
    /// Writes this answer into `entry`; the longest packet known to fit stays when the
    /// previous entry named the same hop.
    #[inline(always)]
    fn fill(&self, entry: &mut CachedHop, previous: Option<&CachedHop>) {
        entry.port = self.port_ifindex | if self.peer { BRIDGE_PORT_PEER } else { 0 };
        entry.smac = self.smac;
        entry.dmac = self.dmac;
        if let Some(c) = previous {
            if c.port == entry.port && c.dmac == entry.dmac && c.fits > entry.fits {
                entry.fits = c.fits;
            }
        }
    }
}

impl From<&CachedHop> for NextHop {
    #[inline(always)]
    fn from(c: &CachedHop) -> Self {
        NextHop {
            port_ifindex: c.port & !BRIDGE_PORT_PEER,
            peer: c.port & BRIDGE_PORT_PEER != 0,
            smac: c.smac,
            dmac: c.dmac,
        }
    }
}

/// The FIB's answer for `p`, then the bridge port behind its next hop.
#[inline(always)]
fn lookup<P: Packet>(pkt: &P, p: &mut FibParams) -> Option<NextHop> {
    // SAFETY: `p` is a valid request on our stack, of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(
            pkt.ctx_ptr(),
            p,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return None;
    }
    let key = BridgePortKey::new(p.ifindex, p.dmac);
    let port = maps::bridge_port(&key)?;
    Some(NextHop {
        port_ifindex: port & !BRIDGE_PORT_PEER,
        peer: port & BRIDGE_PORT_PEER != 0,
        smac: p.smac,
        dmac: p.dmac,
    })
}
