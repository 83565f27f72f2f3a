//! Frame fuzzing against the model at volume (`tests/tests/fuzz_packets.rs`): a cheaper
//! per-frame path than [`fixture::compare_in`] with the same reach.
//!
//! [`compare_in`] reads the kernel's maps for every decision, so a frame costs dozens of
//! syscalls. Here the model decides on a host-side copy of the maps ([`Mirror`]: the
//! kernel's rules, host addresses, published ports, configuration and bridge ports read
//! once, the flow tables kept by applying the model's own writes), so a frame costs one
//! BPF_PROG_RUN. Per frame: the verdict and the output bytes are compared at once.
//! Per batch ([`Fuzzer::end_batch`]): the reason counters and the rule counters against
//! the sums the model predicted, and every flow table (conntrack and embryonic of both
//! families, NAT64 both ways) diffed whole against the mirror's; then the flow tables are emptied on
//! both sides, so each batch starts from the same known state. On any disagreement the
//! batch is replayed frame by frame through [`compare_in`] from that state, which
//! names the first frame the kernel and the model disagree on (printed as hex).

use std::collections::{BTreeMap, HashMap as StdHashMap};

use aya::maps::{Array, HashMap, MapData};
use portfwd::dataplane::{Dataplane, V4, V6};
use portfwd_common::model::nat64::{self, Nat64Maps, Route};
use portfwd_common::model::{self, FibQuery, FlowWrite, Maps, NextHop, Outcome, Verdict};
use portfwd_common::rules::RuleMaps;
use portfwd_common::{
    BackendV4, BackendV6, BridgePortKey, Config, FlowKeyV4, FlowKeyV6, FlowV4, FlowV6, Nat64Flow,
    Nat64Reply, Reason, RuleKeyV4, RuleKeyV6, BACKEND_PORTS, BRIDGE_PORTS, CONFIG, CONNTRACK_V4,
    CONNTRACK_V6, EMBRYONIC_V4, EMBRYONIC_V6, HOST_ADDRS_V4, HOST_ADDRS_V6, NAT64_FLOWS,
    NAT64_REPLIES, PUBLISHED_PORTS, RULES_V4, RULES_V6,
};

use crate::fixture::{self, action, compare_in, hook, refuses, Env, FastPathFib, Prog};

/// A small deterministic generator (SplitMix64): the run is reproducible from its seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    pub fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }
    pub fn u16(&mut self) -> u16 {
        self.next_u64() as u16
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// The kernel's maps as the model reads them, held on the host: the static part read
/// from the kernel once ([`Mirror::read`]), the flow tables kept by the model's writes.
#[derive(Clone, Debug, Default)]
pub struct Mirror {
    published: Vec<u8>,
    backend_ports: Vec<u8>,
    rules_v4: StdHashMap<RuleKeyV4, BackendV4>,
    rules_v6: StdHashMap<RuleKeyV6, BackendV6>,
    hosts_v4: Vec<[u8; 4]>,
    hosts_v6: Vec<[u8; 16]>,
    config_flags: u64,
    bridge_ports: StdHashMap<BridgePortKey, u32>,
    fib: Option<FastPathFib>,
    route: Option<Route>,
    now_ns: u64,
    pub flows_v4: StdHashMap<FlowKeyV4, FlowV4>,
    pub flows_v6: StdHashMap<FlowKeyV6, FlowV6>,
    pub embryonic_v4: StdHashMap<FlowKeyV4, FlowV4>,
    pub embryonic_v6: StdHashMap<FlowKeyV6, FlowV6>,
    pub nat64_flows: StdHashMap<FlowKeyV6, Nat64Flow>,
    pub nat64_replies: StdHashMap<FlowKeyV4, Nat64Reply>,
}

fn map<'a>(dp: &'a Dataplane, name: &str) -> &'a aya::maps::Map {
    dp.ebpf().map(name).unwrap_or_else(|| panic!("map {name}"))
}

/// Every entry of a hash map of the loaded object.
pub fn entries<K: aya::Pod + Eq + std::hash::Hash, V: aya::Pod>(
    dp: &Dataplane,
    name: &str,
) -> StdHashMap<K, V> {
    let m: HashMap<&MapData, K, V> = HashMap::try_from(map(dp, name)).expect(name);
    m.iter()
        .map(|r| r.unwrap_or_else(|e| panic!("{name}: {e}")))
        .collect()
}

/// Empties a hash map of the loaded object; the keys it held.
fn clear<K: aya::Pod, V: aya::Pod>(dp: &mut Dataplane, name: &str) -> Vec<K> {
    let m = dp
        .ebpf_mut()
        .map_mut(name)
        .unwrap_or_else(|| panic!("map {name}"));
    let mut m: HashMap<&mut MapData, K, V> = HashMap::try_from(m).expect(name);
    let keys: Vec<K> = m.keys().map(|k| k.expect(name)).collect();
    for k in &keys {
        m.remove(k).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    keys
}

/// Empties the flow tables (conntrack and embryonic of both families, NAT64 both ways),
/// the reply caches' entries of the established flows with them, as the daemon does.
pub fn clear_flows(dp: &mut Dataplane) {
    let v4 = clear::<FlowKeyV4, FlowV4>(dp, CONNTRACK_V4);
    dp.forget_cached_replies::<V4>(&v4)
        .expect("reply cache, IPv4");
    let v6 = clear::<FlowKeyV6, FlowV6>(dp, CONNTRACK_V6);
    dp.forget_cached_replies::<V6>(&v6)
        .expect("reply cache, IPv6");
    clear::<FlowKeyV4, FlowV4>(dp, EMBRYONIC_V4);
    clear::<FlowKeyV6, FlowV6>(dp, EMBRYONIC_V6);
    clear::<FlowKeyV6, Nat64Flow>(dp, NAT64_FLOWS);
    clear::<FlowKeyV4, Nat64Reply>(dp, NAT64_REPLIES);
}

fn config_flags(dp: &Dataplane) -> u64 {
    let config: Array<&MapData, Config> = Array::try_from(map(dp, CONFIG)).expect(CONFIG);
    config.get(&0, 0).expect("config").flags
}

impl Mirror {
    /// The kernel's maps as they are now, in `env` (its FIB and NAT64 route).
    pub fn read(dp: &Dataplane, env: Env<'_>) -> Self {
        let published: Array<&MapData, u8> =
            Array::try_from(map(dp, PUBLISHED_PORTS)).expect(PUBLISHED_PORTS);
        let backend_ports: Array<&MapData, u8> =
            Array::try_from(map(dp, BACKEND_PORTS)).expect(BACKEND_PORTS);
        Self {
            published: published.iter().map(|b| b.expect("published")).collect(),
            backend_ports: backend_ports
                .iter()
                .map(|b| b.expect("backend ports"))
                .collect(),
            rules_v4: entries(dp, RULES_V4),
            rules_v6: entries(dp, RULES_V6),
            hosts_v4: entries::<[u8; 4], u8>(dp, HOST_ADDRS_V4)
                .into_keys()
                .collect(),
            hosts_v6: entries::<[u8; 16], u8>(dp, HOST_ADDRS_V6)
                .into_keys()
                .collect(),
            config_flags: config_flags(dp),
            bridge_ports: entries(dp, BRIDGE_PORTS),
            fib: env.fib.cloned(),
            route: env.route,
            now_ns: fixture::coarse_now_ns(),
            flows_v4: entries(dp, CONNTRACK_V4),
            flows_v6: entries(dp, CONNTRACK_V6),
            embryonic_v4: entries(dp, EMBRYONIC_V4),
            embryonic_v6: entries(dp, EMBRYONIC_V6),
            nat64_flows: entries(dp, NAT64_FLOWS),
            nat64_replies: entries(dp, NAT64_REPLIES),
        }
    }
}

impl RuleMaps for Mirror {
    fn published(&self, port_be: [u8; 2]) -> u8 {
        self.published[usize::from(u16::from_be_bytes(port_be))]
    }
    fn rule_v4(&self, key: &RuleKeyV4) -> Option<BackendV4> {
        self.rules_v4.get(key).copied()
    }
    fn rule_v6(&self, key: &RuleKeyV6) -> Option<BackendV6> {
        self.rules_v6.get(key).copied()
    }
    fn is_host_v4(&self, addr: &[u8; 4]) -> bool {
        self.hosts_v4.contains(addr)
    }
    fn is_host_v6(&self, addr: &[u8; 16]) -> bool {
        self.hosts_v6.contains(addr)
    }
}

impl Maps for Mirror {
    fn backend_ports(&self, port_be: [u8; 2]) -> u8 {
        self.backend_ports[usize::from(u16::from_be_bytes(port_be))]
    }
    fn flow_v4(&self, key: &FlowKeyV4) -> Option<FlowV4> {
        self.flows_v4.get(key).copied()
    }
    fn flow_v6(&self, key: &FlowKeyV6) -> Option<FlowV6> {
        self.flows_v6.get(key).copied()
    }
    fn embryonic_v4(&self, key: &FlowKeyV4) -> Option<FlowV4> {
        self.embryonic_v4.get(key).copied()
    }
    fn embryonic_v6(&self, key: &FlowKeyV6) -> Option<FlowV6> {
        self.embryonic_v6.get(key).copied()
    }
    fn is_nat64_reply(&self, key: &FlowKeyV4) -> bool {
        self.nat64_replies.contains_key(key)
    }
    fn config_flags(&self) -> u64 {
        self.config_flags
    }
    fn next_hop(&self, q: &FibQuery) -> Option<NextHop> {
        fixture::bridge_next_hop(self.fib.as_ref()?.lookup(q.dst, q.tot_len)?, |k| {
            self.bridge_ports.get(k).copied()
        })
    }
    fn next_hop_v6(&self, q: &FibQuery<16>) -> Option<NextHop> {
        fixture::bridge_next_hop(
            self.fib.as_ref()?.lookup_v6(q.src, q.dst, q.tot_len)?,
            |k| self.bridge_ports.get(k).copied(),
        )
    }
}

impl Nat64Maps for Mirror {
    fn nat64_flow(&self, key: &FlowKeyV6) -> Option<Nat64Flow> {
        self.nat64_flows.get(key).copied()
    }
    fn nat64_reply(&self, key: &FlowKeyV4) -> Option<Nat64Reply> {
        self.nat64_replies.get(key).copied()
    }
    fn route_v4(&self, _: [u8; 4]) -> Option<Route> {
        self.route
    }
    fn ingress_ifindex(&self) -> u32 {
        1
    }
    fn now_ns(&self) -> u64 {
        self.now_ns
    }
}

/// What the model says one run does, on the mirror (whose flow tables it updates).
pub struct Predicted {
    /// `None`: the kernel's test run refuses the frame.
    pub verdict: Option<u32>,
    pub output: Vec<u8>,
    pub reasons: Vec<Reason>,
    /// (slot, reply, bytes).
    pub rule: Option<(u32, bool, u64)>,
    /// The embryonic entry written (the backend's reply is worth sending).
    pub flow: Option<FlowWrite>,
    /// The NAT64 flow written (the backend's answer is worth sending).
    pub nat64_flow: Option<(FlowKeyV6, Nat64Flow)>,
}

/// The model's run of `prog` on `input`, as [`compare_in`] computes it, the mirror
/// updated with the flows it writes.
pub fn predict(mirror: &mut Mirror, prog: Prog, input: &[u8]) -> Predicted {
    if refuses(prog, input) {
        return Predicted {
            verdict: None,
            output: Vec::new(),
            reasons: Vec::new(),
            rule: None,
            flow: None,
            nat64_flow: None,
        };
    }
    let mut expect = input.to_vec();
    let outcome = match hook(prog) {
        Some(h) => model::run(h, mirror, &mut expect),
        None if nat64::entry(mirror, input) => Outcome::uncounted(Verdict::TailCallNat64),
        None => Outcome::uncounted(Verdict::Pass),
    };
    let n64 = (outcome.verdict == Verdict::TailCallNat64).then(|| {
        let mut out = vec![0u8; input.len() + 20];
        let o = nat64::program(mirror, input, &mut out);
        out.truncate(o.len);
        expect = out;
        o
    });
    let (verdict, reasons, rule) = match &n64 {
        Some(o) => (o.verdict, vec![o.reason], o.rule),
        None => (outcome.verdict, outcome.counted().collect(), outcome.rule),
    };
    match outcome.flow {
        Some(FlowWrite::V4(k, v)) => {
            mirror.flows_v4.remove(&k);
            mirror.embryonic_v4.insert(k, v);
        }
        Some(FlowWrite::V6(k, v)) => {
            mirror.flows_v6.remove(&k);
            mirror.embryonic_v6.insert(k, v);
        }
        None => {}
    }
    match outcome.promoted {
        Some(FlowWrite::V4(k, v)) => {
            mirror.embryonic_v4.remove(&k);
            mirror.flows_v4.insert(k, v);
        }
        Some(FlowWrite::V6(k, v)) => {
            mirror.embryonic_v6.remove(&k);
            mirror.flows_v6.insert(k, v);
        }
        None => {}
    }
    if let Some(o) = &n64 {
        if let Some((k, v)) = o.flow {
            mirror.nat64_flows.insert(k, v);
        }
        if let Some((k, v)) = o.reply {
            mirror.nat64_replies.insert(k, v);
        }
    }
    Predicted {
        verdict: Some(action(prog, verdict)),
        rule: rule.map(|r| (r.slot, r.reply, expect.len() as u64)),
        output: expect,
        reasons,
        flow: outcome.flow,
        nat64_flow: n64.and_then(|o| o.flow),
    }
}

/// The counters a batch is checked against: reasons, and per rule slot (packets,
/// bytes, reply packets, reply bytes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// By [`Reason`]'s index.
    pub reasons: BTreeMap<u32, u64>,
    pub rules: BTreeMap<u32, [u64; 4]>,
}

impl Counters {
    /// The kernel's, for the rule slots `slots`.
    pub fn read(dp: &Dataplane, slots: &[u32]) -> Self {
        Self {
            reasons: dp
                .reason_stats()
                .expect("reason stats")
                .into_iter()
                .map(|(r, n)| (r as u32, n))
                .collect(),
            rules: slots
                .iter()
                .map(|&s| {
                    let r = dp.rule_stats(s).expect("rule stats");
                    (s, [r.packets, r.bytes, r.reply_packets, r.reply_bytes])
                })
                .collect(),
        }
    }
    fn add(&mut self, p: &Predicted) {
        for r in &p.reasons {
            *self.reasons.entry(*r as u32).or_default() += 1;
        }
        if let Some((slot, reply, bytes)) = p.rule {
            let c = self.rules.entry(slot).or_default();
            let i = if reply { 2 } else { 0 };
            c[i] += 1;
            c[i + 1] += bytes;
        }
    }
}

/// One run of a batch, kept for the replay.
type Run = (Prog, Vec<u8>);

/// The fuzzing loop's state: the dataplane, where it runs, the mirror, the counters the
/// model predicts, the batch so far.
pub struct Fuzzer<'a> {
    pub dp: &'a mut Dataplane,
    env: Env<'a>,
    pub mirror: Mirror,
    slots: Vec<u32>,
    expected: Counters,
    batch: Vec<Run>,
    /// BPF_PROG_RUN calls made.
    pub runs: u64,
    /// What the seed and batch number print as, for a failure.
    pub label: String,
}

/// Prints a frame as one hex line, a corpus file's format.
pub fn hex(frame: &[u8]) -> String {
    frame.iter().map(|b| format!("{b:02x}")).collect()
}

impl<'a> Fuzzer<'a> {
    /// Must run on a thread inside `env`'s namespace (if any): the runs do not enter
    /// it. The flow tables start empty. `slots`: the rules' counter slots.
    pub fn new(dp: &'a mut Dataplane, env: Env<'a>, slots: &[u32]) -> Self {
        clear_flows(dp);
        let mirror = Mirror::read(dp, env);
        let expected = Counters::read(dp, slots);
        Self {
            dp,
            env: Env { ns: None, ..env },
            mirror,
            slots: slots.to_vec(),
            expected,
            batch: Vec::new(),
            runs: 0,
            label: String::new(),
        }
    }

    /// Runs `prog` on `input` in the kernel and in the model; the verdict and bytes must
    /// agree now, the rest at the batch's end. Returns the model's prediction.
    pub fn step(&mut self, prog: Prog, input: &[u8]) -> Predicted {
        self.batch.push((prog, input.to_vec()));
        let want = predict(&mut self.mirror, prog, input);
        let got = fixture::try_run(self.dp, prog, input);
        self.runs += 1;
        let agree = match (&got, want.verdict) {
            (Ok((v, out)), Some(w)) => *v == w && *out == want.output,
            (Err(_), None) => true,
            _ => false,
        };
        if !agree {
            let got = got.map(|(v, out)| format!("verdict {v}, output {}", hex(&out)));
            self.fail(&format!(
                "{prog:?}: kernel {got:?}, model verdict {:?}, output {}",
                want.verdict,
                hex(&want.output)
            ));
        }
        self.expected.add(&want);
        want
    }

    /// Checks the counters and the flow tables against the model's, then empties the
    /// flow tables for the next batch.
    pub fn end_batch(&mut self) {
        let counters = Counters::read(self.dp, &self.slots);
        if counters != self.expected {
            let msg = format!("counters: kernel {counters:?}, model {:?}", self.expected);
            self.fail(&msg);
        }
        let m = &self.mirror;
        let flows_v4 = entries::<FlowKeyV4, FlowV4>(self.dp, CONNTRACK_V4);
        let flows_v6 = entries::<FlowKeyV6, FlowV6>(self.dp, CONNTRACK_V6);
        let embryonic_v4 = entries::<FlowKeyV4, FlowV4>(self.dp, EMBRYONIC_V4);
        let embryonic_v6 = entries::<FlowKeyV6, FlowV6>(self.dp, EMBRYONIC_V6);
        let nat64_flows = entries::<FlowKeyV6, Nat64Flow>(self.dp, NAT64_FLOWS);
        // The kernel's time is its own, read during the run: not before the mirror's.
        let mut times_ok = true;
        let nat64_replies: StdHashMap<FlowKeyV4, Nat64Reply> =
            entries::<FlowKeyV4, Nat64Reply>(self.dp, NAT64_REPLIES)
                .into_iter()
                .map(|(k, v)| {
                    times_ok &= v.last_seen_ns >= m.now_ns;
                    let t = m.nat64_replies.get(&k).map_or(0, |r| r.last_seen_ns);
                    (
                        k,
                        Nat64Reply {
                            last_seen_ns: t,
                            ..v
                        },
                    )
                })
                .collect();
        let same = flows_v4 == m.flows_v4
            && flows_v6 == m.flows_v6
            && embryonic_v4 == m.embryonic_v4
            && embryonic_v6 == m.embryonic_v6
            && nat64_flows == m.nat64_flows
            && nat64_replies == m.nat64_replies
            && times_ok;
        if !same {
            let msg = format!(
                "flow tables: kernel {} + {} conntrack, {} + {} embryonic, {} + {} NAT64; \
                 model {} + {}, {} + {}, {} + {}",
                flows_v4.len(),
                flows_v6.len(),
                embryonic_v4.len(),
                embryonic_v6.len(),
                nat64_flows.len(),
                nat64_replies.len(),
                m.flows_v4.len(),
                m.flows_v6.len(),
                m.embryonic_v4.len(),
                m.embryonic_v6.len(),
                m.nat64_flows.len(),
                m.nat64_replies.len()
            );
            self.fail(&msg);
        }
        self.reset();
    }

    /// Empties the flow tables on both sides and starts a new batch; the configuration
    /// bridge ports and the time are read again (the caller may have changed the
    /// first two; the rules and host addresses must not change).
    pub fn reset(&mut self) {
        clear_flows(self.dp);
        let m = &mut self.mirror;
        m.flows_v4.clear();
        m.flows_v6.clear();
        m.embryonic_v4.clear();
        m.embryonic_v6.clear();
        m.nat64_flows.clear();
        m.nat64_replies.clear();
        m.config_flags = config_flags(self.dp);
        m.bridge_ports = entries(self.dp, BRIDGE_PORTS);
        m.now_ns = fixture::coarse_now_ns();
        self.expected = Counters::read(self.dp, &self.slots);
        self.batch.clear();
    }

    /// The batch disagreed with the model: replays it from its start (the flow tables
    /// empty) through [`compare_in`], which panics on the first frame the kernel and
    /// the model disagree on, naming it. A batch that agrees on replay fails anyway.
    fn fail(&mut self, what: &str) -> ! {
        let batch = std::mem::take(&mut self.batch);
        eprintln!(
            "{}: kernel and model disagree: {what}; replaying the batch's {} runs",
            self.label,
            batch.len()
        );
        clear_flows(self.dp);
        for (i, (prog, frame)) in batch.iter().enumerate() {
            let dp = &*self.dp;
            let env = self.env;
            let replay = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                compare_in(dp, env, *prog, frame);
            }));
            if let Err(e) = replay {
                eprintln!(
                    "{}: run {i} of the batch, {prog:?}, frame (hex, for the corpus):\n{}",
                    self.label,
                    hex(frame)
                );
                std::panic::resume_unwind(e);
            }
        }
        panic!(
            "{}: kernel and model disagree ({what}), but not on replay",
            self.label
        );
    }
}
