//! The maps, declared once here; names, layouts and capacities come from `portfwd-common`.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray},
};
use portfwd_common::rules::RuleMaps;
use portfwd_common::{
    BackendV4, BackendV6, BridgePortKey, Config, FlowKeyV4, FlowKeyV6, FlowV4, FlowV6,
    LocalPeerKeyV4, LocalPeerKeyV6, LocalPeerV4, LocalPeerV6, Nat64Flow, Nat64Reply, Reason,
    RuleKeyV4, RuleKeyV6, RuleStats, MAX_BRIDGE_PORTS, MAX_FLOWS, MAX_HOST_ADDRS, MAX_LOCAL_PEERS,
    MAX_NAT64_FLOWS, MAX_RULES, MAX_STATS_SLOTS,
};

#[map(name = "RULES_V4")]
pub static RULES_V4: HashMap<RuleKeyV4, BackendV4> = HashMap::with_max_entries(MAX_RULES, 0);

#[map(name = "CONNTRACK_V4")]
pub static CONNTRACK_V4: LruHashMap<FlowKeyV4, FlowV4> = LruHashMap::with_max_entries(MAX_FLOWS, 0);

#[map(name = "HOST_ADDRS_V4")]
pub static HOST_ADDRS_V4: HashMap<[u8; 4], u8> = HashMap::with_max_entries(MAX_HOST_ADDRS, 0);

#[map(name = "RULES_V6")]
pub static RULES_V6: HashMap<RuleKeyV6, BackendV6> = HashMap::with_max_entries(MAX_RULES, 0);

#[map(name = "CONNTRACK_V6")]
pub static CONNTRACK_V6: LruHashMap<FlowKeyV6, FlowV6> = LruHashMap::with_max_entries(MAX_FLOWS, 0);

#[map(name = "HOST_ADDRS_V6")]
pub static HOST_ADDRS_V6: HashMap<[u8; 16], u8> = HashMap::with_max_entries(MAX_HOST_ADDRS, 0);

#[map(name = "NAT64_FLOWS")]
pub static NAT64_FLOWS: LruHashMap<FlowKeyV6, Nat64Flow> =
    LruHashMap::with_max_entries(MAX_NAT64_FLOWS, 0);

#[map(name = "NAT64_REPLIES")]
pub static NAT64_REPLIES: LruHashMap<FlowKeyV4, Nat64Reply> =
    LruHashMap::with_max_entries(MAX_NAT64_FLOWS, 0);

#[map(name = "NAT64_PROGS")]
pub static NAT64_PROGS: ProgramArray = ProgramArray::with_max_entries(1, 0);

#[map(name = "RULE_STATS")]
pub static RULE_STATS: PerCpuArray<RuleStats> = PerCpuArray::with_max_entries(MAX_STATS_SLOTS, 0);

#[map(name = "REASON_STATS")]
pub static REASON_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Reason::COUNT, 0);

#[map(name = "LOCAL_PEERS_V4")]
pub static LOCAL_PEERS_V4: LruHashMap<LocalPeerKeyV4, LocalPeerV4> =
    LruHashMap::with_max_entries(MAX_LOCAL_PEERS, 0);

#[map(name = "LOCAL_PEERS_V6")]
pub static LOCAL_PEERS_V6: LruHashMap<LocalPeerKeyV6, LocalPeerV6> =
    LruHashMap::with_max_entries(MAX_LOCAL_PEERS, 0);

#[map(name = "PUBLISHED_PORTS")]
pub static PUBLISHED_PORTS: Array<u8> = Array::with_max_entries(65_536, 0);

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
        // SAFETY: copied out at once; the daemon may replace values concurrently.
        unsafe { RULES_V4.get(key) }.copied()
    }
    #[inline(always)]
    fn rule_v6(&self, key: &RuleKeyV6) -> Option<BackendV6> {
        // SAFETY: as above.
        unsafe { RULES_V6.get(key) }.copied()
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
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map(name = "BRIDGE_PORTS")]
pub static BRIDGE_PORTS: HashMap<BridgePortKey, u32> =
    HashMap::with_max_entries(MAX_BRIDGE_PORTS, 0);

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
