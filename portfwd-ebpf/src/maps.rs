//! The maps, declared once here; names, layouts and capacities come from `portfwd-common`.
//!
//! Every map access (and its `unsafe`) is here, behind typed functions: the statics are
//! private. Lookups copy the value out, or hand out a reference for the length of the
//! program run (map memory stays valid that long; the daemon or another CPU may write
//! it concurrently, so callers read what they need at once).

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, BPF_ANY, BPF_NOEXIST},
    helpers::bpf_jiffies64,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray},
    programs::TcContext,
};
use portfwd_common::{
    packet::IPV6_HLEN,
    reply_cache::{CachedFlow, CachedFlowV4, CachedFlowV6, REPLY_CACHE_SLOTS},
    rule_cache::{CachedRule, CachedRuleV4, CachedRuleV6, RULE_CACHE_SLOTS},
    rules::RuleMaps,
};
use portfwd_common::{
    BackendV4, BackendV6, BridgePortKey, CachedHop, Config, FlowKeyV4, FlowKeyV6, FlowV4, FlowV6,
    LocalPeerKeyV4, LocalPeerKeyV6, LocalPeerV4, LocalPeerV6, Nat64Flow, Nat64Reply, NextHopKeyV4,
    NextHopKeyV6, Reason, RuleKeyV4, RuleKeyV6, RuleStats, MAX_BRIDGE_PORTS, MAX_EMBRYONIC_FLOWS,
    MAX_FLOWS, MAX_HOST_ADDRS, MAX_LOCAL_PEERS, MAX_NAT64_FLOWS, MAX_NEXT_HOPS, MAX_RULES,
    MAX_STATS_SLOTS, NAT64_PROG_INDEX, RULES_MAP_FLAGS,
};

#[map(name = "RULES_V4")]
static RULES_V4: HashMap<RuleKeyV4, BackendV4> =
    HashMap::with_max_entries(MAX_RULES, RULES_MAP_FLAGS);

#[map(name = "CONNTRACK_V4")]
static CONNTRACK_V4: LruHashMap<FlowKeyV4, FlowV4> = LruHashMap::with_max_entries(MAX_FLOWS, 0);

#[map(name = "EMBRYONIC_V4")]
static EMBRYONIC_V4: LruHashMap<FlowKeyV4, FlowV4> =
    LruHashMap::with_max_entries(MAX_EMBRYONIC_FLOWS, 0);

#[map(name = "HOST_ADDRS_V4")]
static HOST_ADDRS_V4: HashMap<[u8; 4], u8> = HashMap::with_max_entries(MAX_HOST_ADDRS, 0);

#[map(name = "RULES_V6")]
static RULES_V6: HashMap<RuleKeyV6, BackendV6> =
    HashMap::with_max_entries(MAX_RULES, RULES_MAP_FLAGS);

#[map(name = "CONNTRACK_V6")]
static CONNTRACK_V6: LruHashMap<FlowKeyV6, FlowV6> = LruHashMap::with_max_entries(MAX_FLOWS, 0);

#[map(name = "EMBRYONIC_V6")]
static EMBRYONIC_V6: LruHashMap<FlowKeyV6, FlowV6> =
    LruHashMap::with_max_entries(MAX_EMBRYONIC_FLOWS, 0);

#[map(name = "HOST_ADDRS_V6")]
static HOST_ADDRS_V6: HashMap<[u8; 16], u8> = HashMap::with_max_entries(MAX_HOST_ADDRS, 0);

#[map(name = "NAT64_FLOWS")]
static NAT64_FLOWS: LruHashMap<FlowKeyV6, Nat64Flow> =
    LruHashMap::with_max_entries(MAX_NAT64_FLOWS, 0);

#[map(name = "NAT64_REPLIES")]
static NAT64_REPLIES: LruHashMap<FlowKeyV4, Nat64Reply> =
    LruHashMap::with_max_entries(MAX_NAT64_FLOWS, 0);

#[map(name = "NAT64_PROGS")]
static NAT64_PROGS: ProgramArray = ProgramArray::with_max_entries(1, 0);

#[map(name = "RULE_STATS")]
static RULE_STATS: PerCpuArray<RuleStats> = PerCpuArray::with_max_entries(MAX_STATS_SLOTS, 0);

#[map(name = "REASON_STATS")]
static REASON_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Reason::COUNT, 0);

#[map(name = "LOCAL_PEERS_V4")]
static LOCAL_PEERS_V4: LruHashMap<LocalPeerKeyV4, LocalPeerV4> =
    LruHashMap::with_max_entries(MAX_LOCAL_PEERS, 0);

#[map(name = "LOCAL_PEERS_V6")]
static LOCAL_PEERS_V6: LruHashMap<LocalPeerKeyV6, LocalPeerV6> =
    LruHashMap::with_max_entries(MAX_LOCAL_PEERS, 0);

#[map(name = "RULE_CACHE_V4")]
static RULE_CACHE_V4: Array<CachedRuleV4> = Array::with_max_entries(RULE_CACHE_SLOTS, 0);

#[map(name = "RULE_CACHE_V6")]
static RULE_CACHE_V6: Array<CachedRuleV6> = Array::with_max_entries(RULE_CACHE_SLOTS, 0);

/// `key`'s rule from the rule cache (`portfwd_common::rule_cache`), if its slot holds a
/// whole entry for it.
#[inline(always)]
fn cached_rule<K: Copy + PartialEq, B: Copy>(
    cache: &Array<CachedRule<K, B>>,
    key: &K,
) -> Option<B> {
    let (slot, hash) = CachedRule::<K, B>::slot_and_hash(key);
    cache.get(slot)?.backend_for(key, hash)
}

#[map(name = "REPLY_CACHE_V4")]
static REPLY_CACHE_V4: Array<CachedFlowV4> = Array::with_max_entries(REPLY_CACHE_SLOTS, 0);

#[map(name = "REPLY_CACHE_V6")]
static REPLY_CACHE_V6: Array<CachedFlowV6> = Array::with_max_entries(REPLY_CACHE_SLOTS, 0);

#[map(name = "FLOW_GENERATIONS_V4")]
static FLOW_GENERATIONS_V4: Array<u64> = Array::with_max_entries(REPLY_CACHE_SLOTS, 0);

#[map(name = "FLOW_GENERATIONS_V6")]
static FLOW_GENERATIONS_V6: Array<u64> = Array::with_max_entries(REPLY_CACHE_SLOTS, 0);

#[map(name = "PUBLISHED_PORTS")]
static PUBLISHED_PORTS: Array<u8> = Array::with_max_entries(65_536, 0);

#[map(name = "BACKEND_PORTS")]
static BACKEND_PORTS: Array<u8> = Array::with_max_entries(65_536, 0);

/// Whether some rule sends to `port_be` (network order) over `proto`: else a packet
/// from that port is no reply (`portfwd_common::BACKEND_PORTS`).
#[inline(always)]
pub fn is_backend_port(port_be: [u8; 2], proto: u8) -> bool {
    match BACKEND_PORTS.get(u16::from_be_bytes(port_be) as u32) {
        Some(bits) => *bits & portfwd_common::backend_port_bit(proto) != 0,
        None => false,
    }
}

/// The rule maps, as rule matching (`portfwd_common::rules`) reads them.
pub struct Maps;

impl RuleMaps for Maps {
    #[inline(always)]
    fn published(&self, port_be: [u8; 2]) -> u8 {
        match PUBLISHED_PORTS.get(u16::from_be_bytes(port_be) as u32) {
            Some(bits) => *bits,
            None => 0,
        }
    }
    #[inline(always)]
    fn rule_v4(&self, key: &RuleKeyV4) -> Option<BackendV4> {
        // The cache first (no call into the kernel), then the rules map, the authority.
        // SAFETY: copied out at once; the daemon may replace values concurrently.
        cached_rule(&RULE_CACHE_V4, key).or_else(|| unsafe { RULES_V4.get(key) }.copied())
    }
    #[inline(always)]
    fn rule_v6(&self, key: &RuleKeyV6) -> Option<BackendV6> {
        // SAFETY: as above.
        cached_rule(&RULE_CACHE_V6, key).or_else(|| unsafe { RULES_V6.get(key) }.copied())
    }
    #[inline(always)]
    fn is_host_v4(&self, addr: &[u8; 4]) -> bool {
        // SAFETY: only tested for presence.
        unsafe { HOST_ADDRS_V4.get(addr) }.is_some()
    }
    #[inline(always)]
    fn is_host_v6(&self, addr: &[u8; 16]) -> bool {
        // SAFETY: only tested for presence.
        unsafe { HOST_ADDRS_V6.get(addr) }.is_some()
    }
}

#[map(name = "CONFIG")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map(name = "BRIDGE_PORTS")]
static BRIDGE_PORTS: HashMap<BridgePortKey, u32> = HashMap::with_max_entries(MAX_BRIDGE_PORTS, 0);

/// The daemon's configuration (all zero until it writes it).
#[inline(always)]
pub fn config() -> Config {
    CONFIG.get(0).copied().unwrap_or_default()
}

#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(c) = REASON_STATS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, so no other writer runs on it concurrently.
        unsafe { *c += 1 };
    }
}

/// Adds one packet of `len` bytes to a rule's counters, in the given direction.
#[inline(always)]
pub fn count_rule(slot: u32, len: u64, reply: bool) {
    if let Some(s) = RULE_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, so no other writer runs on it concurrently.
        let s = unsafe { &mut *s };
        if reply {
            s.reply_packets += 1;
            s.reply_bytes += len;
        } else {
            s.packets += 1;
            s.bytes += len;
        }
    }
}

/// Counts one connection or datagram of a local client on a rule.
#[inline(always)]
pub fn count_local(slot: u32) {
    if let Some(s) = RULE_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, so no other writer runs on it concurrently.
        unsafe { (*s).local += 1 };
    }
}

/// A map insert failed (full, or out of memory): counted as
/// [`Reason::FlowInsertFailed`] by the caller.
#[derive(Clone, Copy)]
pub struct InsertFailed;

/// Writes `value` under `key` unless the entry already holds it: flows are written once,
/// not per packet. Whether it wrote.
#[inline(always)]
fn record<K, V: PartialEq>(
    map: &LruHashMap<K, V>,
    key: &K,
    value: &V,
) -> Result<bool, InsertFailed> {
    // SAFETY: compared by value at once.
    if let Some(existing) = unsafe { map.get(key) } {
        if existing == value {
            return Ok(false);
        }
    }
    map.insert(key, value, 0).map_err(|_| InsertFailed)?;
    Ok(true)
}

/// The established IPv4 flow of a reply (`key`: backend to client), through the reply
/// cache.
#[inline(always)]
pub fn conntrack_v4(key: &FlowKeyV4) -> Option<FlowV4> {
    established(&REPLY_CACHE_V4, &FLOW_GENERATIONS_V4, &CONNTRACK_V4, key)
}

/// The embryonic IPv4 flow of a reply (looked up after a [`conntrack_v4`] miss).
#[inline(always)]
pub fn embryonic_v4(key: &FlowKeyV4) -> Option<FlowV4> {
    // SAFETY: copied out at once; LRU entries may be evicted concurrently.
    unsafe { EMBRYONIC_V4.get(key) }.copied()
}

/// Records a packet that may start an IPv4 flow: nothing if the flow is established
/// with this value already; else into the embryonic table, a stale established entry
/// under the key removed (the client's new connection on it goes elsewhere).
#[inline(always)]
pub fn record_embryonic_v4(key: &FlowKeyV4, value: &FlowV4) -> Result<(), InsertFailed> {
    record_embryonic(
        &CONNTRACK_V4,
        &EMBRYONIC_V4,
        &FLOW_GENERATIONS_V4,
        key,
        value,
    )
}

/// [`record_embryonic_v4`] for either family. A change to the tables bumps the key's
/// reply cache generation after it is made (`portfwd_common::reply_cache`): the new
/// flow may reuse the key of one that conntrack evicted but a cache slot still holds.
#[inline(always)]
fn record_embryonic<K: Copy, F: Copy + PartialEq>(
    conntrack: &LruHashMap<K, F>,
    embryonic: &LruHashMap<K, F>,
    generations: &Array<u64>,
    key: &K,
    value: &F,
) -> Result<(), InsertFailed> {
    let mut changed = false;
    // SAFETY: compared by value at once.
    match unsafe { conntrack.get(key) } {
        Some(existing) if existing == value => return Ok(()),
        Some(_) => {
            let _ = conntrack.remove(key);
            changed = true;
        }
        None => {}
    }
    let recorded = record(embryonic, key, value);
    // A failed insert counts as a change: it may have evicted, and a spare bump only
    // costs a cache refill.
    if changed || !matches!(recorded, Ok(false)) {
        bump_generation(generations, CachedFlow::<K, F>::slot(key));
    }
    recorded.map(|_| ())
}

/// Marks the reply cache entries of `slot` stale on every CPU. Not atomic (BPF has no
/// read-modify-write in `core`): two bumps racing may store the same value, which still
/// differs from the one any entry filled before either change recorded, as each writer
/// reads the generation after making its change.
#[inline(always)]
fn bump_generation(generations: &Array<u64>, slot: u32) {
    if let Some(g) = generations.get_ptr_mut(slot) {
        // SAFETY: a map value, valid and aligned for the program's run.
        unsafe { core::ptr::write_volatile(g, core::ptr::read_volatile(g).wrapping_add(1)) };
    }
}

/// The low 32 bits of jiffies: a load, as the verifier inlines the helper.
#[inline(always)]
fn jiffies() -> u32 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_jiffies64() as u32 }
}

/// `key`'s established flow: from the reply cache while its entry is current
/// (`portfwd_common::reply_cache`), else from `conntrack`, whose answer fills the slot.
#[inline(always)]
fn established<K: Copy, F: Copy>(
    cache: &Array<CachedFlow<K, F>>,
    generations: &Array<u64>,
    conntrack: &LruHashMap<K, F>,
    key: &K,
) -> Option<F> {
    let (slot, hash) = CachedFlow::<K, F>::slot_and_hash(key);
    let (Some(generation), Some(entry)) = (generations.get(slot), cache.get_ptr_mut(slot)) else {
        // Not reached: both maps have REPLY_CACHE_SLOTS entries.
        // SAFETY: copied out at once.
        return unsafe { conntrack.get(key) }.copied();
    };
    // Read before conntrack: a change made after this read bumps the generation past
    // what the entry filled below records.
    // SAFETY: a map value, valid for the program's run.
    let generation = unsafe { core::ptr::read_volatile(generation) } as u32;
    let now = jiffies();
    // SAFETY: as above; another CPU may write the slot meanwhile: `flow_for` refuses a
    // torn read.
    if let Some(flow) = unsafe { &*entry }.flow_for(key, hash, generation, now) {
        return Some(flow);
    }
    // SAFETY: copied out at once; LRU entries may be evicted concurrently.
    let flow = unsafe { conntrack.get(key) }.copied()?;
    // SAFETY: as above; a whole entry, whose check covers what a concurrent writer may
    // mix into it.
    unsafe { CachedFlow::new(*key, hash, flow, generation, now).write_to(entry) };
    Some(flow)
}

/// Moves an IPv4 flow from the embryonic table to the established one. On a failed
/// insert the embryonic entry stays, for the next packet to try again.
#[inline(always)]
pub fn promote_v4(key: &FlowKeyV4, value: &FlowV4) -> Result<(), InsertFailed> {
    CONNTRACK_V4
        .insert(key, value, 0)
        .map_err(|_| InsertFailed)?;
    let _ = EMBRYONIC_V4.remove(key);
    Ok(())
}

/// As [`conntrack_v4`], IPv6.
#[inline(always)]
pub fn conntrack_v6(key: &FlowKeyV6) -> Option<FlowV6> {
    established(&REPLY_CACHE_V6, &FLOW_GENERATIONS_V6, &CONNTRACK_V6, key)
}

/// As [`embryonic_v4`], IPv6.
#[inline(always)]
pub fn embryonic_v6(key: &FlowKeyV6) -> Option<FlowV6> {
    // SAFETY: copied out at once; LRU entries may be evicted concurrently.
    unsafe { EMBRYONIC_V6.get(key) }.copied()
}

/// As [`record_embryonic_v4`], IPv6.
#[inline(always)]
pub fn record_embryonic_v6(key: &FlowKeyV6, value: &FlowV6) -> Result<(), InsertFailed> {
    record_embryonic(
        &CONNTRACK_V6,
        &EMBRYONIC_V6,
        &FLOW_GENERATIONS_V6,
        key,
        value,
    )
}

/// As [`promote_v4`], IPv6.
#[inline(always)]
pub fn promote_v6(key: &FlowKeyV6, value: &FlowV6) -> Result<(), InsertFailed> {
    CONNTRACK_V6
        .insert(key, value, 0)
        .map_err(|_| InsertFailed)?;
    let _ = EMBRYONIC_V6.remove(key);
    Ok(())
}

/// The published address a local IPv4 socket asked for, by (socket, backend).
#[inline(always)]
pub fn local_peer_v4(key: &LocalPeerKeyV4) -> Option<LocalPeerV4> {
    // SAFETY: copied out at once.
    unsafe { LOCAL_PEERS_V4.get(key) }.copied()
}

/// Remembers the published address a local IPv4 socket asked for.
#[inline(always)]
pub fn record_local_peer_v4(key: &LocalPeerKeyV4, value: &LocalPeerV4) -> Result<(), InsertFailed> {
    record(&LOCAL_PEERS_V4, key, value).map(|_| ())
}

/// As [`local_peer_v4`], IPv6.
#[inline(always)]
pub fn local_peer_v6(key: &LocalPeerKeyV6) -> Option<LocalPeerV6> {
    // SAFETY: copied out at once.
    unsafe { LOCAL_PEERS_V6.get(key) }.copied()
}

/// As [`record_local_peer_v4`], IPv6.
#[inline(always)]
pub fn record_local_peer_v6(key: &LocalPeerKeyV6, value: &LocalPeerV6) -> Result<(), InsertFailed> {
    record(&LOCAL_PEERS_V6, key, value).map(|_| ())
}

#[map(name = "NEXT_HOPS_V4")]
static NEXT_HOPS_V4: LruHashMap<NextHopKeyV4, CachedHop> =
    LruHashMap::with_max_entries(MAX_NEXT_HOPS, 0);

#[map(name = "NEXT_HOPS_V6")]
static NEXT_HOPS_V6: LruHashMap<NextHopKeyV6, CachedHop> =
    LruHashMap::with_max_entries(MAX_NEXT_HOPS, 0);

/// A key of a next-hop cache (`NEXT_HOPS_V4` / `_V6`), with its map's accessors.
pub trait NextHopKey {
    /// The cached next hop, as last written (the caller checks its age). A reference,
    /// not a copy: the fast path runs close to the stack limit. An update replaces the
    /// whole element (the old one stays readable until the run ends).
    fn cached(&self) -> Option<&'static CachedHop>;
    /// Caches a next hop; a failed insert only costs the next packet a FIB lookup.
    fn cache(&self, hop: &CachedHop);
}

impl NextHopKey for NextHopKeyV4 {
    #[inline(always)]
    fn cached(&self) -> Option<&'static CachedHop> {
        // SAFETY: map memory outlives the program run.
        unsafe { NEXT_HOPS_V4.get(self) }
    }
    #[inline(always)]
    fn cache(&self, hop: &CachedHop) {
        let _ = NEXT_HOPS_V4.insert(self, hop, 0);
    }
}

impl NextHopKey for NextHopKeyV6 {
    #[inline(always)]
    fn cached(&self) -> Option<&'static CachedHop> {
        // SAFETY: as above.
        unsafe { NEXT_HOPS_V6.get(self) }
    }
    #[inline(always)]
    fn cache(&self, hop: &CachedHop) {
        let _ = NEXT_HOPS_V6.insert(self, hop, 0);
    }
}

/// The bridge port (ifindex) behind which the daemon saw `key`'s MAC.
#[inline(always)]
pub fn bridge_port(key: &BridgePortKey) -> Option<u32> {
    // SAFETY: copied out at once.
    unsafe { BRIDGE_PORTS.get(key) }.copied()
}

/// Jumps to the NAT64 program; returns only if the jump failed (not loaded).
#[inline(always)]
pub fn tail_call_nat64(ctx: &TcContext) {
    // SAFETY: a tail call either does not return or leaves everything as it was.
    unsafe { NAT64_PROGS.tail_call(ctx, NAT64_PROG_INDEX) };
}

/// Whether NAT64 tracks a reply under `key` (backend to the host's NAT64 port).
#[inline(always)]
pub fn nat64_reply_exists(key: &FlowKeyV4) -> bool {
    // SAFETY: only tested for presence.
    unsafe { NAT64_REPLIES.get(key) }.is_some()
}

/// The NAT64 reply state under `key`, read-only.
#[inline(always)]
pub fn nat64_reply(key: &FlowKeyV4) -> Option<&'static Nat64Reply> {
    // SAFETY: map memory stays valid for the program run; callers read it at once.
    unsafe { NAT64_REPLIES.get(key) }
}

/// The NAT64 reply state under `key`, to update in place.
#[inline(always)]
pub fn nat64_reply_mut(key: &FlowKeyV4) -> Option<&'static mut Nat64Reply> {
    let r = NAT64_REPLIES.get_ptr_mut(key)?;
    // SAFETY: a live map value, valid for the program run; fields are read and written
    // in place (a racing CPU writes the same fields: last writer wins, as in C).
    Some(unsafe { &mut *r })
}

/// Claims `key` (a NAT64 port) for `value`: only if free (`BPF_NOEXIST`, so two CPUs
/// cannot both get it) or, `take_over`, whatever holds it.
#[inline(always)]
pub fn insert_nat64_reply(
    key: &FlowKeyV4,
    value: &Nat64Reply,
    take_over: bool,
) -> Result<(), InsertFailed> {
    let flags = if take_over { BPF_ANY } else { BPF_NOEXIST };
    NAT64_REPLIES
        .insert(key, value, flags as u64)
        .map_err(|_| InsertFailed)
}

/// Forgets the NAT64 reply state under `key`.
#[inline(always)]
pub fn remove_nat64_reply(key: &FlowKeyV4) {
    let _ = NAT64_REPLIES.remove(key);
}

/// The NAT64 flow of an IPv6 client (`key`: client to published address).
#[inline(always)]
pub fn nat64_flow(key: &FlowKeyV6) -> Option<Nat64Flow> {
    // SAFETY: copied out at once; LRU entries may be evicted concurrently.
    unsafe { NAT64_FLOWS.get(key) }.copied()
}

/// Records a NAT64 flow.
#[inline(always)]
pub fn insert_nat64_flow(key: &FlowKeyV6, flow: &Nat64Flow) -> Result<(), InsertFailed> {
    NAT64_FLOWS.insert(key, flow, 0).map_err(|_| InsertFailed)
}

/// Room for what a NAT64 translation builds, per CPU: the program's 512-byte stack
/// cannot hold it next to the parsed packet.
#[repr(C)]
pub struct Scratch {
    pub fib: FibParams,
    pub key6: FlowKeyV6,
    pub key4: FlowKeyV4,
    pub reply: Nat64Reply,
    pub header: [u8; IPV6_HLEN],
}

#[map(name = "NAT64_SCRATCH")]
static NAT64_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// The fast path's FIB request, off the stack (the ingress programs run close to its
/// 512-byte limit).
#[map(name = "FIB_SCRATCH")]
static FIB_SCRATCH: PerCpuArray<FibParams> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's FIB request, zeroed (a valid, empty request).
#[inline(always)]
pub fn fib_scratch() -> Option<&'static mut FibParams> {
    let p = FIB_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: the per-CPU entry is this program run's alone; all zeroes is a valid
    // bpf_fib_lookup.
    unsafe {
        core::ptr::write_bytes(p, 0, 1);
        Some(&mut *p)
    }
}

/// This CPU's NAT64 scratch space.
#[inline(always)]
pub fn nat64_scratch() -> Option<&'static mut Scratch> {
    let s = NAT64_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: the per-CPU entry is this program run's alone (no other run uses this
    // CPU's entry until it ends).
    Some(unsafe { &mut *s })
}
