//! The kernel side as the daemon sees it: loads the embedded object, attaches the
//! programs to interfaces, and gives typed access to the maps.
//!
//! Two lifetimes: [`Dataplane::load`] owns its maps and links, and dropping it
//! detaches everything (tests, `--no-pin`); [`Dataplane::load_pinned`] pins maps and
//! links in a [`PinDir`] (see [`crate::pin`]) and adopts what an earlier daemon pinned
//! there, so that forwarding outlives the process: dropping it leaves every hook
//! attached, and the next daemon replaces the programs behind the links with
//! `BPF_LINK_UPDATE`.

use std::{
    collections::BTreeSet,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues, ProgramArray},
    programs::{
        links::FdLink, tc::SchedClassifier, CgroupAttachMode, CgroupSockAddr, TcAttachType, Xdp,
        XdpMode,
    },
    Ebpf, EbpfLoader,
};
use portfwd_common::kctx;
use portfwd_common::reply_cache::CachedFlow;
use portfwd_common::rule_cache::{CachedRule, CachedRuleV4, CachedRuleV6};
use portfwd_common::{
    backend_port_bit, port_bits, programs, BackendV4, BackendV6, BridgePortKey, CachedHop, Config,
    FlowKeyV4, FlowKeyV6, FlowV4, FlowV6, Nat64Flow, Nat64Reply, NextHopKeyV4, NextHopKeyV6,
    Reason, RuleKeyV4, RuleKeyV6, RuleStats, BACKEND_PORTS, BRIDGE_PORTS, CONFIG, CONFIG_FAST_PATH,
    CONFIG_FAST_PATH_NATIVE_XDP, CONFIG_FAST_PATH_NO_PEER, CONFIG_NO_NAT64,
    CONFIG_SOCK_HOST_NETNS_ONLY, CONNTRACK_V4, CONNTRACK_V6, EMBRYONIC_V4, EMBRYONIC_V6,
    FLOW_GENERATIONS_V4, FLOW_GENERATIONS_V6, HOST_ADDRS_V4, HOST_ADDRS_V6, MAX_FLOWS, NAT64_FLOWS,
    NAT64_PROGS, NAT64_PROG_INDEX, NAT64_REPLIES, NEXT_HOPS_V4, NEXT_HOPS_V6, PUBLISHED_PORTS,
    REASON_STATS, REPLY_CACHE_V4, REPLY_CACHE_V6, RULES_V4, RULES_V6, RULE_CACHE_V4, RULE_CACHE_V6,
    RULE_STATS,
};
use thiserror::Error;

use crate::{
    expand,
    pin::{PinDir, PinError},
};

/// The compiled kernel programs (built by `build.rs` from `portfwd-ebpf`).
pub static BPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portfwd.bpf.o"));

/// [`BPF_OBJECT`] as the running kernel needs it (its TC programs read the skb's
/// checksum state through a kfunc: `portfwd_common::kctx`), prepared once.
pub fn prepared_object() -> &'static kctx::Prepared {
    static PREPARED: std::sync::OnceLock<kctx::Prepared> = std::sync::OnceLock::new();
    PREPARED.get_or_init(|| kctx::Prepared::for_running_kernel(BPF_OBJECT))
}

/// The benchmark's programs (`bench_gen`, `bench_sink`; `portfwd-ebpf/src/bench.rs`),
/// for the suites that generate traffic with them. The daemon never loads them (and,
/// not referring to them, does not carry them).
#[doc(hidden)]
pub static BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portfwd-bench.bpf.o"));

#[derive(Debug, Error)]
/// Why a dataplane operation failed.
pub enum DataplaneError {
    /// The object does not load (verifier, kernel version, permissions).
    #[error("cannot load the BPF programs")]
    Load(#[source] aya::EbpfError),
    /// The object lacks a program (a build mismatch).
    #[error("BPF object has no program `{0}`")]
    MissingProgram(&'static str),
    /// The object lacks a map (a build mismatch).
    #[error("BPF object has no map `{0}`")]
    MissingMap(&'static str),
    /// A program cannot be loaded or used.
    #[error("program `{name}`")]
    Program {
        /// The program.
        name: &'static str,
        /// Why.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A rules map is full.
    #[error(
        "map `{name}` is full ({max} entries: each published port, plus one per host \
         address of the family for each wildcard rule's port)"
    )]
    RulesFull {
        /// The map.
        name: &'static str,
        /// Its capacity.
        max: u32,
    },
    /// A map operation failed.
    #[error("map `{name}`")]
    Map {
        /// The map.
        name: &'static str,
        /// Why.
        #[source]
        source: aya::maps::MapError,
    },
    /// The number of possible CPUs cannot be read.
    #[error("cannot count the possible CPUs")]
    Cpus(#[source] std::io::Error),
    /// The cgroup cannot be opened.
    #[error("cannot open cgroup {path}")]
    Cgroup {
        /// The cgroup.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A socket program cannot be attached to the cgroup.
    #[error("cannot attach {name} to cgroup {path}")]
    AttachCgroup {
        /// The program.
        name: &'static str,
        /// The cgroup.
        path: String,
        /// Why.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// The pin directory cannot be used (or holds another layout).
    #[error(transparent)]
    Pin(#[from] PinError),
    /// The object cannot be parsed (a build mismatch).
    #[error("cannot parse the BPF object")]
    Object(#[source] aya_obj::ParseError),
    /// A link cannot be pinned, adopted or unpinned.
    #[error("cannot {action} the link {path}")]
    Link {
        /// `pin`, `adopt` or `unpin`.
        action: &'static str,
        /// The pin.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The network namespace's cookie cannot be read.
    #[error("cannot read this network namespace's cookie")]
    NetnsCookie(#[source] std::io::Error),
    /// No interface of that name in this network namespace.
    #[error("unknown interface `{0}`")]
    UnknownInterface(String),
    /// A program cannot be attached to an interface.
    #[error("cannot attach {hook} to {iface}")]
    Attach {
        /// Where.
        hook: Hook,
        /// The interface.
        iface: String,
        /// Why.
        #[source]
        source: aya::programs::ProgramError,
    },
}

/// Where the ingress program runs on an interface (`--ingress`).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum IngressMode {
    /// Native XDP on physical NICs whose driver supports it, TC on virtual interfaces
    /// (on a veth, native XDP splits GSO super-packets and costs throughput).
    Auto,
    /// Native (driver) XDP.
    Xdp,
    /// Generic (skb) XDP.
    XdpGeneric,
    /// TC ingress.
    Tc,
}

/// A hook a program is attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Hook {
    /// Native (driver) XDP.
    Xdp,
    /// Generic (skb) XDP.
    XdpGeneric,
    /// TC ingress.
    TcIngress,
    /// TC egress.
    TcEgress,
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hook::Xdp => "native XDP",
            Hook::XdpGeneric => "generic XDP",
            Hook::TcIngress => "TC ingress",
            Hook::TcEgress => "TC egress",
        })
    }
}

/// One interface's attachments.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Attachment {
    /// The interface's name.
    pub iface: String,
    /// Where the ingress program runs.
    pub ingress: Hook,
    /// Where the reply translator runs (TC egress).
    pub egress: Hook,
}

/// The socket programs serving local clients (IPv4 and IPv6), in attach order.
const SOCKET_PROGRAMS: [&str; 10] = [
    programs::SOCK_BIND4,
    programs::SOCK_RECVMSG4,
    programs::SOCK_GETPEERNAME4,
    programs::SOCK_SENDMSG4,
    programs::SOCK_CONNECT4,
    programs::SOCK_BIND6,
    programs::SOCK_RECVMSG6,
    programs::SOCK_GETPEERNAME6,
    programs::SOCK_SENDMSG6,
    programs::SOCK_CONNECT6,
];

/// The loaded kernel programs and maps, and where they are attached; dropping it detaches everything.
pub struct Dataplane {
    ebpf: Ebpf,
    attachments: Vec<Attachment>,
    local_cgroup: Option<std::path::PathBuf>,
    config: Config,
    /// The rule entries behind each bit of [`PUBLISHED_PORTS`] (their keys' ports) and
    /// of [`BACKEND_PORTS`] (their backends' ports), both families.
    port_refs: [PortRefs; 2],
    /// The host addresses of each family (IPv4, IPv6) as last read from or written to
    /// their map (`None`: read it), so that publishing a wildcard range does not walk
    /// the map for every port.
    host_cache: [Option<Vec<IpAddr>>; 2],
    /// Interfaces where NAT64's entry program is attached (see [`Self::sync_nat64`]).
    nat64_entries: Vec<String>,
    /// Where maps and links are pinned, if they are.
    pins: Option<PinDir>,
    /// Links adopted or pinned by this run, as (owner, hook): the others are stale.
    pinned_now: BTreeSet<(String, String)>,
    /// Links this run pinned, and whether it created the maps' pins too: removed on
    /// drop until [`Self::keep_pins`], so that a start that fails leaves nothing new
    /// behind (and what it adopted as it was).
    new_pins: Vec<std::path::PathBuf>,
    new_maps: Option<std::path::PathBuf>,
    /// Whether [`Self::keep_pins`] was called: links pinned from then on stay too.
    kept: bool,
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        // Links first: the programs are detached before their maps go.
        for p in self.new_pins.drain(..) {
            let _ = std::fs::remove_file(p);
        }
        if let Some(dir) = self.new_maps.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The flow tables `--max-flows` sizes: each holds up to that many flows. The one list
/// of them: loading sizes these, and adopting pinned maps checks these.
pub const FLOW_TABLE_MAPS: &[&str] = &[CONNTRACK_V4, CONNTRACK_V6];

/// `--max-flows` unless given: the size the object declares.
pub const DEFAULT_MAX_FLOWS: u32 = MAX_FLOWS;

/// `--max-flows`' bounds: below, a few hundred clients evict each other; above, the
/// tables take gigabytes (see [`flow_tables_bytes`]).
pub const MAX_FLOWS_RANGE: std::ops::RangeInclusive<u32> = 1_024..=16_777_216;

/// Kernel memory per flow entry, both tables together, measured on 6.18 (`bpftool map
/// show`'s `memlock`: 80 bytes an IPv4 entry, 112 an IPv6 one), besides the hash buckets
/// ([`BUCKET_BYTES`] each, a power of two of them per table). A table joining
/// [`FLOW_TABLE_MAPS`] adds its own.
pub const FLOW_BYTES: u64 = 192;

/// Kernel memory per hash bucket.
pub const BUCKET_BYTES: u64 = 16;

/// Parses and checks `--max-flows`: a number in [`MAX_FLOWS_RANGE`] (`_` and `,` allowed
/// as digit separators). The error is one line, for clap to prefix with the value.
pub fn parse_max_flows(s: &str) -> Result<u32, String> {
    let (lo, hi) = (*MAX_FLOWS_RANGE.start(), *MAX_FLOWS_RANGE.end());
    let digits: String = s.chars().filter(|c| !matches!(c, '_' | ',')).collect();
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("not a number of flows (from {lo} to {hi})"));
    }
    match digits.parse::<u32>() {
        Ok(n) if MAX_FLOWS_RANGE.contains(&n) => Ok(n),
        _ => Err(format!("must be from {lo} to {hi} flows")),
    }
}

/// Refuses a `max_flows` whose flow tables would not fit in `available` bytes of memory
/// (`MemAvailable`): the kernel allocates them whole at load time.
pub fn check_max_flows(max_flows: u32, available: u64) -> Result<(), String> {
    let need = flow_tables_bytes(max_flows);
    if need > available {
        return Err(format!(
            "--max-flows {max_flows} needs about {} MiB for its flow tables, only {} MiB \
             of memory is available",
            need >> 20,
            available >> 20
        ));
    }
    Ok(())
}

/// The flow tables' kernel memory for `max_flows`: 224 bytes a flow at a power of two,
/// up to 256 just above one (the kernel rounds the buckets up). Matches `memlock` within
/// 0.1 % at 1,024, 131,072, 1,000,000, 1,250,000 and 4,000,000.
pub fn flow_tables_bytes(max_flows: u32) -> u64 {
    let buckets = u64::from(max_flows).next_power_of_two();
    u64::from(max_flows) * FLOW_BYTES + FLOW_TABLE_MAPS.len() as u64 * buckets * BUCKET_BYTES
}

/// Maps of the object that are not pinned: per-run scratch space, the fast path's
/// next-hop caches, the rule caches (empty in each new load; the rule caches are
/// filled from the rules adopted) and the reply caches with their generations.
const UNPINNED_MAPS: [&str; 10] = [
    "NAT64_SCRATCH",
    "FIB_SCRATCH",
    NEXT_HOPS_V4,
    NEXT_HOPS_V6,
    RULE_CACHE_V4,
    RULE_CACHE_V6,
    REPLY_CACHE_V4,
    REPLY_CACHE_V6,
    FLOW_GENERATIONS_V4,
    FLOW_GENERATIONS_V6,
];

/// The maps of this binary's object that are pinned, as (name, type, key size, value
/// size): every named map but [`UNPINNED_MAPS`] and the compiler's sections (`.rodata`,
/// ...).
pub fn pinned_maps() -> Result<Vec<(String, u32, u32, u32)>, DataplaneError> {
    let obj = aya_obj::Object::parse(BPF_OBJECT).map_err(DataplaneError::Object)?;
    let mut maps: Vec<_> = obj
        .maps
        .iter()
        .filter(|(name, _)| !name.starts_with('.') && !UNPINNED_MAPS.contains(&name.as_str()))
        .map(|(name, m)| (name.clone(), m.map_type(), m.key_size(), m.value_size()))
        .collect();
    maps.sort();
    Ok(maps)
}

/// A pinned link's hook name for a [`Hook`].
fn hook_pin_name(hook: Hook) -> &'static str {
    match hook {
        Hook::Xdp => "xdp",
        Hook::XdpGeneric => "xdp-generic",
        Hook::TcIngress => "tc-ingress",
        Hook::TcEgress => "tc-egress",
    }
}

/// The program a hook runs on `iface`: native XDP runs its own program on a virtual
/// device, whose frames may carry partial (offloaded) checksums from a local sender;
/// on a NIC they come from the wire, complete, and the check would only cost.
pub fn hook_program(hook: Hook, iface: &str) -> &'static str {
    match hook {
        Hook::Xdp if crate::netinfo::is_virtual(iface) => programs::XDP_VIRTUAL_INGRESS,
        Hook::Xdp => programs::XDP_INGRESS,
        Hook::XdpGeneric => programs::XDP_GENERIC_INGRESS,
        Hook::TcIngress => programs::TC_INGRESS,
        Hook::TcEgress => programs::TC_EGRESS,
    }
}

/// The pin owner of the socket programs' links.
const CGROUP_OWNER: &str = "cgroup";
/// The pin hook name of NAT64's entry program.
const NAT64_ENTRY_HOOK: &str = "nat64-entry";

/// Sizes the flow tables a loader creates.
fn size_flow_tables(loader: &mut EbpfLoader<'_>, max_flows: u32) {
    for name in FLOW_TABLE_MAPS {
        loader.map_max_entries(name, max_flows);
    }
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

impl Dataplane {
    /// Loads every program and creates the maps; attaches nothing yet. Nothing is
    /// pinned: dropping it detaches everything.
    pub fn load() -> Result<Self, DataplaneError> {
        Self::load_sized(DEFAULT_MAX_FLOWS)
    }

    /// As [`Self::load`], with flow tables ([`FLOW_TABLE_MAPS`]) of `max_flows` entries.
    pub fn load_sized(max_flows: u32) -> Result<Self, DataplaneError> {
        let mut loader = EbpfLoader::new();
        size_flow_tables(&mut loader, max_flows);
        Self::load_with(loader, None)
    }

    /// Loads every program over the maps pinned in `pins` (creating and pinning the
    /// ones that are not yet), after checking that they have this binary's layout;
    /// adopts the links pinned there: the hooks keep running the earlier programs
    /// until [`Self::attach`], [`Self::attach_local`] and this call (for NAT64's entries)
    /// swap them for this binary's with `BPF_LINK_UPDATE`. Links and maps stay when it
    /// is dropped. The flow tables hold `max_flows` entries; pinned ones of another size
    /// are refused (a map cannot be resized, and two sizes must not mix).
    pub fn load_pinned(pins: PinDir, max_flows: u32) -> Result<Self, DataplaneError> {
        let maps = pinned_maps()?;
        pins.check_layout(&maps)?;
        pins.check_capacity(FLOW_TABLE_MAPS, max_flows)?;
        let dir = pins.maps_dir();
        std::fs::create_dir_all(&dir).map_err(|source| PinError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let paths: Vec<(String, std::path::PathBuf)> = maps
            .iter()
            .map(|(name, ..)| (name.clone(), dir.join(name)))
            .collect();
        let mut loader = EbpfLoader::new();
        size_flow_tables(&mut loader, max_flows);
        for (name, path) in &paths {
            loader.map_pin_path(name.as_str(), path.as_path());
        }
        let fresh = std::fs::read_dir(&dir)
            .map(|mut d| d.next().is_none())
            .unwrap_or(true);
        let mut dp = Self::load_with(loader, Some(pins))?;
        if fresh {
            dp.new_maps = Some(dir);
        }
        dp.adopt_maps()?;
        dp.adopt_nat64_entries()?;
        Ok(dp)
    }

    fn load_with(mut loader: EbpfLoader<'_>, pins: Option<PinDir>) -> Result<Self, DataplaneError> {
        let object = prepared_object();
        let mut ebpf = loader
            .override_global(kctx::SKB_IP_SUMMED_BIT, &object.ip_summed_bit, true)
            .load(object.bytes())
            .map_err(DataplaneError::Load)?;
        for name in [
            programs::TC_INGRESS,
            programs::TC_EGRESS,
            programs::TC_NAT64,
            programs::TC_NAT64_ENTRY,
        ] {
            let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|source| DataplaneError::Program { name, source })?;
        }
        // TC ingress tail-calls NAT64 through this array.
        let nat64 = program::<SchedClassifier>(&mut ebpf, programs::TC_NAT64)?
            .fd()
            .map_err(|source| DataplaneError::Program {
                name: programs::TC_NAT64,
                source,
            })?
            .try_clone()
            .map_err(|e| DataplaneError::Program {
                name: programs::TC_NAT64,
                source: aya::programs::ProgramError::IOError(e),
            })?;
        let map = ebpf
            .map_mut(NAT64_PROGS)
            .ok_or(DataplaneError::MissingMap(NAT64_PROGS))?;
        ProgramArray::try_from(map)
            .and_then(|mut a| a.set(NAT64_PROG_INDEX, &nat64, 0))
            .map_err(map_err(NAT64_PROGS))?;
        for name in [
            programs::XDP_INGRESS,
            programs::XDP_VIRTUAL_INGRESS,
            programs::XDP_GENERIC_INGRESS,
        ] {
            let xdp: &mut Xdp = program(&mut ebpf, name)?;
            xdp.load()
                .map_err(|source| DataplaneError::Program { name, source })?;
        }
        for name in SOCKET_PROGRAMS {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|source| DataplaneError::Program { name, source })?;
        }
        Ok(Self {
            ebpf,
            attachments: Vec::new(),
            local_cgroup: None,
            config: Config::default(),
            port_refs: Default::default(),
            host_cache: [None, None],
            nat64_entries: Vec::new(),
            pins,
            pinned_now: BTreeSet::new(),
            new_pins: Vec::new(),
            new_maps: None,
            kept: false,
        })
    }

    /// Keeps what this run pinned when it is dropped (the daemon started): forwarding
    /// outlives the process from now on.
    pub fn keep_pins(&mut self) {
        self.new_pins.clear();
        self.new_maps = None;
        self.kept = true;
    }

    /// Where maps and links are pinned, if they are.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pins.as_ref().map(PinDir::path)
    }

    /// After loading over pinned maps: the published-ports filter's reference counts
    /// from the pinned rules (and the filter rewritten from them: an earlier version's
    /// bits, or a daemon that died between two writes, leave none stale), and the configuration with its flags reset (the daemon
    /// sets them from its options) and the host's network namespace kept.
    fn adopt_maps(&mut self) -> Result<(), DataplaneError> {
        for (k, b) in self.rule_entries_of::<V4>()? {
            self.count_entry::<V4>(&k, &b);
            self.cache_rule::<V4>(&k, b)?;
        }
        for (k, b) in self.rule_entries_of::<V6>()? {
            self.count_entry::<V6>(&k, &b);
            self.cache_rule::<V6>(&k, b)?;
        }
        self.rewrite_port_map(PortMap::Published)?;
        self.rewrite_port_map(PortMap::Backends)?;
        let map = self
            .ebpf
            .map(CONFIG)
            .ok_or(DataplaneError::MissingMap(CONFIG))?;
        let a: Array<&MapData, Config> = Array::try_from(map).map_err(map_err(CONFIG))?;
        let pinned = a.get(&0, 0).map_err(map_err(CONFIG))?;
        self.config.host_netns_cookie = pinned.host_netns_cookie;
        if self.config != pinned {
            self.write_config()?;
        }
        Ok(())
    }

    /// Swaps this binary's NAT64 entry program in behind every pinned entry link.
    fn adopt_nat64_entries(&mut self) -> Result<(), DataplaneError> {
        let Some(pins) = &self.pins else {
            return Ok(());
        };
        let entries: Vec<String> = pins
            .links()?
            .into_iter()
            .filter(|(_, hook, _)| hook == NAT64_ENTRY_HOOK)
            .map(|(owner, ..)| owner)
            .collect();
        for iface in entries {
            self.adopt_link(&iface, NAT64_ENTRY_HOOK, programs::TC_NAT64_ENTRY)?;
            self.nat64_entries.push(iface);
        }
        Ok(())
    }

    /// Replaces the program behind the link pinned as `owner@hook` with this object's
    /// `prog`, in one `BPF_LINK_UPDATE`.
    fn adopt_link(
        &mut self,
        owner: &str,
        hook: &str,
        prog: &'static str,
    ) -> Result<(), DataplaneError> {
        let Some(pins) = &self.pins else {
            return Ok(());
        };
        let path = pins.link_path(owner, hook);
        let link_err = |source| DataplaneError::Link {
            action: "adopt",
            path: path.display().to_string(),
            source,
        };
        let link = crate::pin::obj_get(&path).map_err(link_err)?;
        let p = self
            .ebpf
            .program(prog)
            .ok_or(DataplaneError::MissingProgram(prog))?;
        let fd = p
            .fd()
            .map_err(|source| DataplaneError::Program { name: prog, source })?;
        use std::os::fd::AsFd as _;
        crate::pin::link_update(link.as_fd(), fd.as_fd()).map_err(link_err)?;
        log::debug!("adopted {}: now runs {prog}", path.display());
        self.pinned_now
            .insert((owner.to_string(), hook.to_string()));
        Ok(())
    }

    /// Pins a link just made as `owner@hook` (when pinning), so that it outlives the
    /// process.
    fn pin_new_link(
        &mut self,
        owner: &str,
        hook: &str,
        link: Result<FdLink, aya::programs::links::LinkError>,
    ) -> Result<(), DataplaneError> {
        let Some(pins) = &self.pins else {
            return Ok(());
        };
        let path = pins.link_path(owner, hook);
        let pin_err = |source| DataplaneError::Link {
            action: "pin",
            path: path.display().to_string(),
            source,
        };
        let link = link.map_err(|e| {
            pin_err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                format!("not a BPF link (TC needs TCX, kernel 6.6+; or run with --no-pin): {e}"),
            ))
        })?;
        link.pin(&path)
            .map_err(|e| pin_err(std::io::Error::other(e.to_string())))?;
        if !self.kept {
            self.new_pins.push(path);
        }
        self.pinned_now
            .insert((owner.to_string(), hook.to_string()));
        Ok(())
    }

    /// The cgroup (its id, the inode of its directory) of the socket program `name`'s
    /// pinned link.
    fn pinned_cgroup_id(&self, name: &str) -> Option<u64> {
        use std::os::fd::AsFd as _;
        let path = self.pins.as_ref()?.link_path(CGROUP_OWNER, name);
        let fd = crate::pin::obj_get(&path).ok()?;
        let info = crate::pin::link_info(fd.as_fd()).ok()?;
        Some(u64::from(info[4]) | (u64::from(info[5]) << 32))
    }

    /// Whether a link is pinned as `owner@hook`.
    fn is_pinned(&self, owner: &str, hook: &str) -> bool {
        self.pins
            .as_ref()
            .is_some_and(|p| p.link_path(owner, hook).exists())
    }

    /// Removes the pin `owner@hook`: its link is detached.
    fn unpin_link(&mut self, owner: &str, hook: &str) -> Result<(), DataplaneError> {
        let Some(pins) = &self.pins else {
            return Ok(());
        };
        let path = pins.link_path(owner, hook);
        std::fs::remove_file(&path).map_err(|source| DataplaneError::Link {
            action: "unpin",
            path: path.display().to_string(),
            source,
        })?;
        self.pinned_now
            .remove(&(owner.to_string(), hook.to_string()));
        log::info!("detached {owner} ({hook}): not asked for any more");
        Ok(())
    }

    /// After the attachments of a start: detaches the pinned links this run neither
    /// adopted nor made (interfaces no longer given, a cgroup no longer served).
    /// Returns them as `owner@hook`.
    pub fn drop_stale_links(&mut self) -> Result<Vec<String>, DataplaneError> {
        let Some(pins) = &self.pins else {
            return Ok(Vec::new());
        };
        let stale: Vec<(String, String)> = pins
            .links()?
            .into_iter()
            .map(|(owner, hook, _)| (owner, hook))
            .filter(|k| !self.pinned_now.contains(k))
            .collect();
        let mut gone = Vec::new();
        for (owner, hook) in stale {
            self.unpin_link(&owner, &hook)?;
            if hook == NAT64_ENTRY_HOOK {
                self.nat64_entries.retain(|i| *i != owner);
            }
            gone.push(format!("{owner}@{hook}"));
        }
        Ok(gone)
    }

    /// The loaded object, for BPF_PROG_RUN tests and benchmarks.
    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    /// The loaded object, mutable (for tests that reach into maps).
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// The interfaces attached so far, and how.
    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// Attaches the ingress program (hook chosen by `mode`) and the reply translator (TC
    /// egress) to `iface`.
    pub fn attach(&mut self, iface: &str, mode: IngressMode) -> Result<Attachment, DataplaneError> {
        if crate::netinfo::ifindex(iface).is_none() {
            return Err(DataplaneError::UnknownInterface(iface.to_string()));
        }
        // A hook pinned by an earlier daemon keeps running its program until the link
        // update: `auto` keeps the ingress hook it finds; another mode replaces it (the
        // one case with a gap).
        let pinned_ingress = [Hook::Xdp, Hook::XdpGeneric, Hook::TcIngress]
            .into_iter()
            .find(|&h| self.is_pinned(iface, hook_pin_name(h)));
        let wanted = match mode {
            IngressMode::Xdp => Some(Hook::Xdp),
            IngressMode::XdpGeneric => Some(Hook::XdpGeneric),
            IngressMode::Tc => Some(Hook::TcIngress),
            IngressMode::Auto => None,
        };
        let adopted = match pinned_ingress {
            Some(h) if wanted.is_none() || wanted == Some(h) => {
                self.adopt_link(iface, hook_pin_name(h), hook_program(h, iface))?;
                Some(h)
            }
            Some(h) => {
                self.unpin_link(iface, hook_pin_name(h))?;
                None
            }
            None => None,
        };
        let ingress = match (adopted, mode) {
            (Some(h), _) => h,
            (None, IngressMode::Xdp) => self.attach_xdp(iface, XdpMode::Driver)?,
            (None, IngressMode::XdpGeneric) => self.attach_xdp(iface, XdpMode::Skb)?,
            (None, IngressMode::Tc) => self.attach_tc(iface, Hook::TcIngress)?,
            (None, IngressMode::Auto) if crate::netinfo::is_virtual(iface) => {
                self.attach_tc(iface, Hook::TcIngress)?
            }
            (None, IngressMode::Auto) => match self.attach_xdp(iface, XdpMode::Driver) {
                Ok(hook) => hook,
                // The driver has no native XDP: TC costs less than generic XDP.
                Err(_) => self.attach_tc(iface, Hook::TcIngress)?,
            },
        };
        let egress = if self.is_pinned(iface, hook_pin_name(Hook::TcEgress)) {
            self.adopt_link(iface, hook_pin_name(Hook::TcEgress), programs::TC_EGRESS)?;
            Hook::TcEgress
        } else {
            self.attach_tc(iface, Hook::TcEgress)?
        };
        let a = Attachment {
            iface: iface.to_string(),
            ingress,
            egress,
        };
        self.attachments.push(a.clone());
        Ok(a)
    }

    /// Makes NAT64 reachable for the IPv4 backends `backends` (of rules serving IPv6
    /// clients): its entry program goes on the TC ingress of each backend's interface,
    /// where the replies arrive, and of each `--iface` whose ingress is XDP, where IPv6
    /// clients arrive and XDP cannot translate them; not where `portfwd_tc_ingress`
    /// already runs. Entries stay until the daemon stops. Returns the interfaces it
    /// attached to now.
    pub fn sync_nat64(
        &mut self,
        backends: &BTreeSet<Ipv4Addr>,
    ) -> Result<Vec<String>, DataplaneError> {
        if backends.is_empty() || self.config.flags & CONFIG_NO_NAT64 != 0 {
            return Ok(Vec::new());
        }
        let tc_ingress = |d: &Self, iface: &str| {
            d.attachments
                .iter()
                .any(|a| a.iface == iface && a.ingress == Hook::TcIngress)
        };
        let mut want: BTreeSet<String> = self
            .attachments
            .iter()
            .filter(|a| a.ingress != Hook::TcIngress)
            .map(|a| a.iface.clone())
            .collect();
        let subnets = crate::netinfo::v4_subnets();
        for b in backends {
            if let Some(iface) = crate::netinfo::iface_of_v4_subnet(&subnets, *b) {
                if !tc_ingress(self, &iface) {
                    want.insert(iface);
                }
            }
        }
        // One interface failing (it just went away, say) does not keep the others
        // without their entry; the first failure is reported.
        let (mut attached, mut failed) = (Vec::new(), None);
        for iface in want {
            if self.nat64_entries.contains(&iface) {
                continue;
            }
            let pinning = self.pins.is_some();
            let prog: &mut SchedClassifier = program(&mut self.ebpf, programs::TC_NAT64_ENTRY)?;
            match prog.attach(&iface, TcAttachType::Ingress) {
                Ok(id) => {
                    if pinning {
                        let link =
                            prog.take_link(id)
                                .map_err(|source| DataplaneError::Program {
                                    name: programs::TC_NAT64_ENTRY,
                                    source,
                                })?;
                        self.pin_new_link(&iface, NAT64_ENTRY_HOOK, FdLink::try_from(link))?;
                    }
                    self.nat64_entries.push(iface.clone());
                    attached.push(iface);
                }
                Err(source) => {
                    failed.get_or_insert(DataplaneError::Attach {
                        hook: Hook::TcIngress,
                        iface,
                        source,
                    });
                }
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(attached),
        }
    }

    /// Interfaces where NAT64's entry program runs.
    pub fn nat64_entries(&self) -> &[String] {
        &self.nat64_entries
    }

    /// Serves local clients of every process in the cgroup v2 at `cgroup` (and below):
    /// attaches the socket programs (IPv4 and IPv6) and records this network namespace as
    /// the host's.
    /// Attached as BPF links (5.7+), which coexist with other programs on the cgroup
    /// (the kernel refuses attach flags on link creation, hence `Single`).
    pub fn attach_local(&mut self, cgroup: &Path) -> Result<(), DataplaneError> {
        self.config.host_netns_cookie = current_netns_cookie()?;
        self.write_config()?;
        let cg = std::fs::File::open(cgroup).map_err(|source| DataplaneError::Cgroup {
            path: cgroup.display().to_string(),
            source,
        })?;
        let cgroup_id = {
            use std::os::unix::fs::MetadataExt as _;
            cg.metadata().map(|m| m.ino()).ok()
        };
        for name in SOCKET_PROGRAMS {
            if self.is_pinned(CGROUP_OWNER, name) {
                if self.pinned_cgroup_id(name) == cgroup_id {
                    self.adopt_link(CGROUP_OWNER, name, name)?;
                    continue;
                }
                // Another cgroup than the earlier daemon's: served from now on instead.
                self.unpin_link(CGROUP_OWNER, name)?;
            }
            let pinning = self.pins.is_some();
            let prog: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            let id = prog
                .attach(&cg, CgroupAttachMode::Single)
                .map_err(|source| DataplaneError::AttachCgroup {
                    name,
                    path: cgroup.display().to_string(),
                    source,
                })?;
            if pinning {
                let link = prog
                    .take_link(id)
                    .map_err(|source| DataplaneError::Program { name, source })?;
                self.pin_new_link(CGROUP_OWNER, name, FdLink::try_from(link))?;
            }
        }
        self.local_cgroup = Some(cgroup.to_path_buf());
        Ok(())
    }

    /// The cgroup whose processes are served as local clients, if any.
    pub fn local_cgroup(&self) -> Option<&Path> {
        self.local_cgroup.as_deref()
    }

    /// Turns the fast path on or off: translated packets are redirected straight to the
    /// backend's bridge port when the FIB, neighbour and bridge lookups all complete.
    /// `skb_hooks` covers TC and generic XDP ingress; `native_xdp` native XDP, whose
    /// redirects into a veth arrive only when the veth's peer runs NAPI (GRO on, or an
    /// XDP program there) and are dropped otherwise.
    pub fn set_fast_path(
        &mut self,
        skb_hooks: bool,
        native_xdp: bool,
    ) -> Result<(), DataplaneError> {
        self.config.flags &= !(CONFIG_FAST_PATH | CONFIG_FAST_PATH_NATIVE_XDP);
        if skb_hooks {
            self.config.flags |= CONFIG_FAST_PATH;
        }
        if native_xdp {
            self.config.flags |= CONFIG_FAST_PATH_NATIVE_XDP;
        }
        self.write_config()?;
        self.clear_next_hops()
    }

    /// Empties the fast path's next-hop caches: the next packet to each backend asks the
    /// FIB again.
    pub fn clear_next_hops(&mut self) -> Result<(), DataplaneError> {
        fn clear<K: aya::Pod>(ebpf: &mut Ebpf, name: &'static str) -> Result<(), DataplaneError> {
            let map = ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
            let mut m: HashMap<&mut MapData, K, CachedHop> =
                HashMap::try_from(map).map_err(map_err(name))?;
            let keys: Vec<K> = m.keys().filter_map(Result::ok).collect();
            for k in keys {
                // Gone already (evicted, or cleared by another writer): as wanted.
                let _ = m.remove(&k);
            }
            Ok(())
        }
        clear::<NextHopKeyV4>(&mut self.ebpf, NEXT_HOPS_V4)?;
        clear::<NextHopKeyV6>(&mut self.ebpf, NEXT_HOPS_V6)
    }

    /// Turns NAT64 (remote IPv6 clients of IPv4-only backends) on or off; on by default.
    /// Off, no entry program is attached and such clients are passed.
    pub fn set_nat64(&mut self, on: bool) -> Result<(), DataplaneError> {
        if on {
            self.config.flags &= !CONFIG_NO_NAT64;
        } else {
            self.config.flags |= CONFIG_NO_NAT64;
        }
        self.write_config()
    }

    /// Serves local clients of the host's network namespace only (`host_netns_only`), or
    /// of every namespace in the served cgroup (the default); see
    /// [`CONFIG_SOCK_HOST_NETNS_ONLY`].
    pub fn set_sock_host_netns_only(
        &mut self,
        host_netns_only: bool,
    ) -> Result<(), DataplaneError> {
        if host_netns_only {
            self.config.flags |= CONFIG_SOCK_HOST_NETNS_ONLY;
        } else {
            self.config.flags &= !CONFIG_SOCK_HOST_NETNS_ONLY;
        }
        self.write_config()
    }

    /// Whether the fast path at TC hands packets to a veth's peer (the default) or
    /// transmits them on the host's end ([`CONFIG_FAST_PATH_NO_PEER`]).
    pub fn set_fast_path_peer(&mut self, on: bool) -> Result<(), DataplaneError> {
        if on {
            self.config.flags &= !CONFIG_FAST_PATH_NO_PEER;
        } else {
            self.config.flags |= CONFIG_FAST_PATH_NO_PEER;
        }
        self.write_config()
    }

    /// Whether the fast path is on at any hook.
    pub fn fast_path(&self) -> bool {
        self.config.flags & (CONFIG_FAST_PATH | CONFIG_FAST_PATH_NATIVE_XDP) != 0
    }

    fn write_config(&mut self) -> Result<(), DataplaneError> {
        let map = self
            .ebpf
            .map_mut(CONFIG)
            .ok_or(DataplaneError::MissingMap(CONFIG))?;
        let mut a: Array<&mut MapData, Config> = Array::try_from(map).map_err(map_err(CONFIG))?;
        a.set(0, self.config, 0).map_err(map_err(CONFIG))
    }

    /// Makes the kernel's copy of the bridges' forwarding databases equal to `ports`.
    pub fn sync_bridge_ports(
        &mut self,
        ports: &std::collections::BTreeMap<BridgePortKey, u32>,
    ) -> Result<(), DataplaneError> {
        let map = self
            .ebpf
            .map_mut(BRIDGE_PORTS)
            .ok_or(DataplaneError::MissingMap(BRIDGE_PORTS))?;
        let mut m: HashMap<&mut MapData, BridgePortKey, u32> =
            HashMap::try_from(map).map_err(map_err(BRIDGE_PORTS))?;
        let current: Vec<(BridgePortKey, u32)> = m.iter().filter_map(Result::ok).collect();
        for (k, v) in &current {
            if ports.get(k) != Some(v) {
                let _ = m.remove(k);
            }
        }
        let mut changed = false;
        for (k, v) in &current {
            changed |= ports.get(k) != Some(v);
        }
        for (k, v) in ports {
            if !current.contains(&(*k, *v)) {
                m.insert(*k, *v, 0).map_err(map_err(BRIDGE_PORTS))?;
                changed = true;
            }
        }
        // Cached next hops may name a port that moved or went away.
        if changed {
            self.clear_next_hops()?;
        }
        Ok(())
    }

    fn attach_xdp(&mut self, iface: &str, mode: XdpMode) -> Result<Hook, DataplaneError> {
        let hook = if mode == XdpMode::Skb {
            Hook::XdpGeneric
        } else {
            Hook::Xdp
        };
        let name = hook_program(hook, iface);
        let pinning = self.pins.is_some();
        let prog: &mut Xdp = program(&mut self.ebpf, name)?;
        let id = prog
            .attach(iface, mode)
            .map_err(|source| DataplaneError::Attach {
                hook,
                iface: iface.to_string(),
                source,
            })?;
        if pinning {
            let link = prog
                .take_link(id)
                .map_err(|source| DataplaneError::Program { name, source })?;
            self.pin_new_link(iface, hook_pin_name(hook), FdLink::try_from(link))?;
        }
        Ok(hook)
    }

    fn attach_tc(&mut self, iface: &str, hook: Hook) -> Result<Hook, DataplaneError> {
        let (name, attach_type) = match hook {
            Hook::TcEgress => (programs::TC_EGRESS, TcAttachType::Egress),
            _ => (programs::TC_INGRESS, TcAttachType::Ingress),
        };
        let pinning = self.pins.is_some();
        let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
        let id = prog
            .attach(iface, attach_type)
            .map_err(|source| DataplaneError::Attach {
                hook,
                iface: iface.to_string(),
                source,
            })?;
        if pinning {
            let link = prog
                .take_link(id)
                .map_err(|source| DataplaneError::Program { name, source })?;
            self.pin_new_link(iface, hook_pin_name(hook), FdLink::try_from(link))?;
        }
        Ok(hook)
    }

    // One body per operation for both families, through [`Family`]; the `_v6`-less and
    // `_v6` methods below are the same operations with the family named.

    fn rules_of<F: Family>(
        &mut self,
    ) -> Result<HashMap<&mut MapData, F::RuleKey, F::Backend>, DataplaneError> {
        let map = self
            .ebpf
            .map_mut(F::RULES)
            .ok_or(DataplaneError::MissingMap(F::RULES))?;
        HashMap::try_from(map).map_err(map_err(F::RULES))
    }

    /// Publishes (or replaces) one port of family `F`. The key's address unspecified: a
    /// wildcard, served at every host address in [`Self::sync_host_addrs_of`] through its
    /// expansions (`expand.rs`), written here too; an address-bound key takes the place
    /// of an expansion there.
    pub fn insert_rule_of<F: Family>(
        &mut self,
        key: F::RuleKey,
        backend: F::Backend,
    ) -> Result<(), DataplaneError> {
        let before = self.rules_of::<F>()?.get(&key, 0).ok();
        self.put_entry::<F>(key, backend)?;
        if !expand::is_wildcard::<F>(&key) {
            return Ok(());
        }
        let expanded = self.expand_wildcard::<F>(&key, backend);
        if expanded.is_err() {
            // All or nothing (a full map refuses the rule): the map as it was.
            let _ = self.remove_rule_of::<F>(&key);
            if let Some(b) = before {
                let _ = self.insert_rule_of::<F>(key, b);
            }
        }
        expanded
    }

    /// Writes the wildcard `key`'s expansions, where no address-bound rule holds the key.
    fn expand_wildcard<F: Family>(
        &mut self,
        key: &F::RuleKey,
        backend: F::Backend,
    ) -> Result<(), DataplaneError> {
        let value = expand::expanded::<F>(backend);
        for h in self.host_addrs_of::<F>()? {
            self.put_entry_if::<F>(F::with_addr(key, h), value, |b| {
                expand::is_expansion::<F>(b)
            })?;
        }
        Ok(())
    }

    /// Unpublishes one port of family `F`; absent keys are not an error. A wildcard's
    /// expansions go with it; a host address's rule leaves the place to the wildcard's
    /// expansion, if there is one.
    pub fn remove_rule_of<F: Family>(&mut self, key: &F::RuleKey) -> Result<(), DataplaneError> {
        self.remove_entry::<F>(key)?;
        let (addr, _, _) = F::rule_key(key);
        if expand::is_wildcard::<F>(key) {
            for h in self.host_addrs_of::<F>()? {
                let k = F::with_addr(key, h);
                if let Ok(b) = self.rules_of::<F>()?.get(&k, 0) {
                    if expand::is_expansion::<F>(&b) {
                        self.remove_entry::<F>(&k)?;
                    }
                }
            }
        } else if self.host_addrs_of::<F>()?.contains(&addr) {
            let wildcard = F::with_addr(key, F::UNSPECIFIED);
            if let Ok(w) = self.rules_of::<F>()?.get(&wildcard, 0) {
                self.put_entry::<F>(*key, expand::expanded::<F>(w))?;
            }
        }
        Ok(())
    }

    /// Writes one entry of family `F`'s rules map; the published-ports filter learns a
    /// new key first. A full map is a clear error (rules times host addresses).
    fn put_entry<F: Family>(
        &mut self,
        key: F::RuleKey,
        backend: F::Backend,
    ) -> Result<(), DataplaneError> {
        self.put_entry_if::<F>(key, backend, |_| true)
    }

    /// [`Self::put_entry`], unless the key holds a value `replace` refuses (one lookup).
    fn put_entry_if<F: Family>(
        &mut self,
        key: F::RuleKey,
        backend: F::Backend,
        replace: impl Fn(&F::Backend) -> bool,
    ) -> Result<(), DataplaneError> {
        let (port, bits) = F::port_bits(&key);
        let (to_port, to_bit) = F::backend_port_bit(&key, &backend);
        let old = match self.rules_of::<F>()?.get(&key, 0) {
            Ok(b) if !replace(&b) => return Ok(()),
            Ok(b) => Some(b),
            Err(_) => None,
        };
        let new = old.is_none();
        if new {
            self.port_ref(PortMap::Published, port, bits, true)?;
        }
        self.port_ref(PortMap::Backends, to_port, to_bit, true)?;
        let inserted = self
            .rules_of::<F>()?
            .insert(key, backend, 0)
            .map_err(|e| match &e {
                aya::maps::MapError::SyscallError(s)
                    if s.io_error.raw_os_error() == Some(libc::E2BIG) =>
                {
                    DataplaneError::RulesFull {
                        name: F::RULES,
                        max: portfwd_common::MAX_RULES,
                    }
                }
                _ => map_err(F::RULES)(e),
            });
        if inserted.is_err() {
            if new {
                self.port_ref(PortMap::Published, port, bits, false)?;
            }
            self.port_ref(PortMap::Backends, to_port, to_bit, false)?;
        }
        inserted?;
        if let Some(old) = old {
            let (from_port, from_bit) = F::backend_port_bit(&key, &old);
            self.port_ref(PortMap::Backends, from_port, from_bit, false)?;
        }
        self.cache_rule::<F>(&key, backend)
    }

    /// Deletes one entry of family `F`'s rules map; an absent key is not an error. Its
    /// cached copy goes first: no packet finds it once the rules map has lost the key.
    fn remove_entry<F: Family>(&mut self, key: &F::RuleKey) -> Result<(), DataplaneError> {
        let (port, bits) = F::port_bits(key);
        self.uncache_rule::<F>(key)?;
        let mut rules = self.rules_of::<F>()?;
        let old = rules.get(key, 0).ok();
        match rules.remove(key) {
            Err(e) if !is_not_found(&e) => Err(map_err(F::RULES)(e)),
            Err(_) => Ok(()),
            Ok(()) => {
                self.port_ref(PortMap::Published, port, bits, false)?;
                match old {
                    Some(b) => {
                        let (to_port, to_bit) = F::backend_port_bit(key, &b);
                        self.port_ref(PortMap::Backends, to_port, to_bit, false)
                    }
                    None => Ok(()),
                }
            }
        }
    }

    fn rule_cache_of<F: Family>(
        &mut self,
    ) -> Result<Array<&mut MapData, F::Cached>, DataplaneError> {
        let map = self
            .ebpf
            .map_mut(F::RULE_CACHE)
            .ok_or(DataplaneError::MissingMap(F::RULE_CACHE))?;
        Array::try_from(map).map_err(map_err(F::RULE_CACHE))
    }

    /// Copies a rules map entry into the rule cache (`portfwd_common::rule_cache`), if
    /// its slot is free or holds the key already; another key's slot stays as it is
    /// (the rules map serves the key).
    fn cache_rule<F: Family>(
        &mut self,
        key: &F::RuleKey,
        backend: F::Backend,
    ) -> Result<(), DataplaneError> {
        let slot = F::cache_slot(key);
        let mut cache = self.rule_cache_of::<F>()?;
        let held = cache.get(&slot, 0).map_err(map_err(F::RULE_CACHE))?;
        if F::cached_key(&held).is_some_and(|k| k != *key) {
            return Ok(());
        }
        cache
            .set(slot, F::cache_entry(key, backend), 0)
            .map_err(map_err(F::RULE_CACHE))
    }

    /// Empties `key`'s slot of the rule cache if it holds the key.
    fn uncache_rule<F: Family>(&mut self, key: &F::RuleKey) -> Result<(), DataplaneError> {
        let slot = F::cache_slot(key);
        let mut cache = self.rule_cache_of::<F>()?;
        let held = cache.get(&slot, 0).map_err(map_err(F::RULE_CACHE))?;
        if F::cached_key(&held) != Some(*key) {
            return Ok(());
        }
        cache
            .set(slot, F::Cached::default(), 0)
            .map_err(map_err(F::RULE_CACHE))
    }

    /// Every rule of family `F` the kernel holds, without the wildcards' expansions
    /// (internal: they follow the rules and the host addresses).
    pub fn rules_snapshot_of<F: Family>(&mut self) -> Result<Vec<RuleEntry<F>>, DataplaneError> {
        let mut all = self.rule_entries_of::<F>()?;
        all.retain(|(_, b)| !expand::is_expansion::<F>(b));
        Ok(all)
    }

    /// Every entry of family `F`'s rules map, expansions included.
    pub fn rule_entries_of<F: Family>(&mut self) -> Result<Vec<RuleEntry<F>>, DataplaneError> {
        let rules = self.rules_of::<F>()?;
        rules
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(F::RULES))
    }

    /// The host addresses of family `F` in the kernel's map (cached: only
    /// [`Self::sync_host_addrs_of`] writes it).
    fn host_addrs_of<F: Family>(&mut self) -> Result<BTreeSet<F::Addr>, DataplaneError> {
        let slot = usize::from(F::V6);
        if let Some(cached) = &self.host_cache[slot] {
            return Ok(cached.iter().filter_map(|&ip| F::from_ip(ip)).collect());
        }
        let map = self
            .ebpf
            .map_mut(F::HOST_ADDRS)
            .ok_or(DataplaneError::MissingMap(F::HOST_ADDRS))?;
        let m: HashMap<&mut MapData, F::Octets, u8> =
            HashMap::try_from(map).map_err(map_err(F::HOST_ADDRS))?;
        let addrs: BTreeSet<F::Addr> = m.keys().filter_map(Result::ok).map(F::addr).collect();
        self.host_cache[slot] = Some(addrs.iter().map(|&a| a.into()).collect());
        Ok(addrs)
    }

    /// Makes the wildcards' expansions of family `F` exactly what the rules and the host
    /// addresses in the kernel's maps call for (after a host-address change, and for
    /// maps a daemon that died half-way left behind). Returns how many entries it wrote
    /// or deleted; every write is tried, the first failure returned.
    pub fn sync_expansions_of<F: Family>(&mut self) -> Result<usize, DataplaneError> {
        let hosts = self.host_addrs_of::<F>()?;
        let entries = self.rule_entries_of::<F>()?;
        let want = expand::wanted::<F>(&entries, &hosts);
        let (put, remove) = expand::plan::<F>(&entries, &want);
        let mut failed = None;
        let n = put.len() + remove.len();
        for (k, b) in put {
            if let Err(e) = self.put_entry::<F>(k, b) {
                failed.get_or_insert(e);
            }
        }
        for k in remove {
            if let Err(e) = self.remove_entry::<F>(&k) {
                failed.get_or_insert(e);
            }
        }
        failed.map_or(Ok(n), Err)
    }

    /// Removes the entries of `name` (an LRU map keyed by the family's flow key) whose
    /// backend is one of `backends`; their keys.
    fn forget_in<F: Family, V: aya::Pod>(
        &mut self,
        name: &'static str,
        backends: &BTreeSet<(F::Addr, u16, u8)>,
    ) -> Result<Vec<F::FlowKey>, DataplaneError> {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DataplaneError::MissingMap(name))?;
        // aya's HashMap also handles LRU hash maps.
        let mut ct: HashMap<&mut MapData, F::FlowKey, V> =
            HashMap::try_from(map).map_err(map_err(name))?;
        let stale: Vec<F::FlowKey> = ct
            .keys()
            .filter_map(Result::ok)
            .filter(|k| backends.contains(&F::flow_backend(k)))
            .collect();
        for k in &stale {
            // Gone already (LRU eviction, flow ended): nothing to forget.
            let _ = ct.remove(k);
        }
        Ok(stale)
    }

    /// Marks the reply cache entries of `removed` (conntrack keys, deleted already)
    /// stale on every CPU: bumps their slots' generations (`portfwd_common::reply_cache`).
    /// A plain read and write: a bump racing the kernel's may store the same value,
    /// which still differs from what any entry filled before the removal recorded.
    pub fn forget_cached_replies<F: Family>(
        &mut self,
        removed: &[F::FlowKey],
    ) -> Result<(), DataplaneError> {
        if removed.is_empty() {
            return Ok(());
        }
        let name = F::FLOW_GENERATIONS;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DataplaneError::MissingMap(name))?;
        let mut generations: Array<&mut MapData, u64> =
            Array::try_from(map).map_err(map_err(name))?;
        let slots: BTreeSet<u32> = removed.iter().map(F::reply_cache_slot).collect();
        for slot in slots {
            let g = generations.get(&slot, 0).map_err(map_err(name))?;
            generations
                .set(slot, g.wrapping_add(1), 0)
                .map_err(map_err(name))?;
        }
        Ok(())
    }

    /// Makes the kernel's set of the family's host addresses (what wildcard rules
    /// match) equal to `addrs`, and the wildcards' expansions follow them
    /// ([`Self::sync_expansions_of`]). An address that cannot be removed would keep
    /// matching wildcard rules: each such failure is logged, the others are still made,
    /// and the first is returned (the caller retries the whole set).
    pub fn sync_host_addrs_of<F: Family>(
        &mut self,
        addrs: &BTreeSet<F::Addr>,
    ) -> Result<(), DataplaneError> {
        self.host_cache[usize::from(F::V6)] = None;
        let map = self
            .ebpf
            .map_mut(F::HOST_ADDRS)
            .ok_or(DataplaneError::MissingMap(F::HOST_ADDRS))?;
        let mut m: HashMap<&mut MapData, F::Octets, u8> =
            HashMap::try_from(map).map_err(map_err(F::HOST_ADDRS))?;
        let current: BTreeSet<F::Addr> = m.keys().filter_map(Result::ok).map(F::addr).collect();
        let mut failed = None;
        for &gone in current.difference(addrs) {
            match m.remove(&F::octets(gone)) {
                Err(e) if !is_not_found(&e) => {
                    let e = map_err(F::HOST_ADDRS)(e);
                    log::error!(
                        "cannot remove the host address {gone:?} from {}: {}",
                        F::HOST_ADDRS,
                        crate::report::Chain(&e)
                    );
                    failed.get_or_insert(e);
                }
                _ => {}
            }
        }
        for &new in addrs.difference(&current) {
            m.insert(F::octets(new), 1, 0)
                .map_err(map_err(F::HOST_ADDRS))?;
        }
        // The wildcards follow the addresses.
        if let Err(e) = self.sync_expansions_of::<F>() {
            failed.get_or_insert(e);
        }
        failed.map_or(Ok(()), Err)
    }

    /// Forgets every tracked flow of family `F` to one of `backends` (address, port,
    /// protocol number), in one pass over the flow table; returns how many. NAT64's
    /// flows to the IPv4 ones go too, both ways (its replies are keyed as conntrack is).
    pub fn forget_flows_of<F: Family>(
        &mut self,
        backends: &BTreeSet<(F::Addr, u16, u8)>,
    ) -> Result<usize, DataplaneError> {
        if backends.is_empty() {
            return Ok(0);
        }
        let established = self.forget_in::<F, F::Flow>(F::CONNTRACK, backends)?;
        self.forget_cached_replies::<F>(&established)?;
        let n = established.len() + self.forget_in::<F, F::Flow>(F::EMBRYONIC, backends)?.len();
        let v4: BTreeSet<(Ipv4Addr, u16, u8)> = backends
            .iter()
            .filter_map(|&(ip, port, proto)| Some((V4::from_ip(ip.into())?, port, proto)))
            .collect();
        if !v4.is_empty() {
            self.forget_nat64(&v4)?;
        }
        Ok(n)
    }

    /// Forgets NAT64's flows to `backends`, both ways.
    fn forget_nat64(
        &mut self,
        backends: &BTreeSet<(Ipv4Addr, u16, u8)>,
    ) -> Result<(), DataplaneError> {
        self.forget_in::<V4, Nat64Reply>(NAT64_REPLIES, backends)?;
        let map = self
            .ebpf
            .map_mut(NAT64_FLOWS)
            .ok_or(DataplaneError::MissingMap(NAT64_FLOWS))?;
        let mut flows: HashMap<&mut MapData, FlowKeyV6, Nat64Flow> =
            HashMap::try_from(map).map_err(map_err(NAT64_FLOWS))?;
        let stale: Vec<FlowKeyV6> = flows
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| {
                let ip = Ipv4Addr::from(v.backend_addr);
                backends.contains(&(ip, u16::from_be_bytes(v.backend_port), k.proto()))
            })
            .map(|(k, _)| k)
            .collect();
        for k in &stale {
            let _ = flows.remove(k);
        }
        Ok(())
    }

    /// Publishes (or replaces) one port.
    pub fn insert_rule(
        &mut self,
        key: RuleKeyV4,
        backend: BackendV4,
    ) -> Result<(), DataplaneError> {
        self.insert_rule_of::<V4>(key, backend)
    }

    /// Unpublishes one port; absent keys are not an error.
    pub fn remove_rule(&mut self, key: &RuleKeyV4) -> Result<(), DataplaneError> {
        self.remove_rule_of::<V4>(key)
    }

    /// Makes the kernel's set of host addresses (for wildcard rules) equal to `addrs`.
    pub fn sync_host_addrs(&mut self, addrs: &BTreeSet<Ipv4Addr>) -> Result<(), DataplaneError> {
        self.sync_host_addrs_of::<V4>(addrs)
    }

    /// Publishes (or replaces) one IPv6 port (`::` as the key's address: every host
    /// address in [`Self::sync_host_addrs_v6`]).
    pub fn insert_rule_v6(
        &mut self,
        key: RuleKeyV6,
        backend: BackendV6,
    ) -> Result<(), DataplaneError> {
        self.insert_rule_of::<V6>(key, backend)
    }

    /// Unpublishes one IPv6 port; absent keys are not an error.
    pub fn remove_rule_v6(&mut self, key: &RuleKeyV6) -> Result<(), DataplaneError> {
        self.remove_rule_of::<V6>(key)
    }

    /// Every IPv6 rule the kernel holds.
    pub fn rules_snapshot_v6(&mut self) -> Result<Vec<(RuleKeyV6, BackendV6)>, DataplaneError> {
        self.rules_snapshot_of::<V6>()
    }

    /// Makes the kernel's set of IPv6 host addresses (for `::` rules) equal to `addrs`.
    pub fn sync_host_addrs_v6(&mut self, addrs: &BTreeSet<Ipv6Addr>) -> Result<(), DataplaneError> {
        self.sync_host_addrs_of::<V6>(addrs)
    }

    /// Counts one rule entry more (`add`) or less on `port` for each of `bits` in the
    /// filter `which` ([`Family::port_bits`], [`Family::backend_port_bit`]), keeping its
    /// array's bits: set before the first such entry goes in, cleared after the last one
    /// went out, so the filter never hides a rule or a reply.
    fn port_ref(
        &mut self,
        which: PortMap,
        port: u16,
        bits: u8,
        add: bool,
    ) -> Result<(), DataplaneError> {
        let (set, clear) = self.port_refs[which as usize].change(port, bits, add);
        if set | clear == 0 {
            return Ok(());
        }
        let name = which.name();
        let mut ports = self.port_map(name)?;
        let old = ports.get(&u32::from(port), 0).map_err(map_err(name))?;
        ports
            .set(u32::from(port), (old | set) & !clear, 0)
            .map_err(map_err(name))
    }

    /// Counts a pinned rule entry in both filters (adoption).
    fn count_entry<F: Family>(&mut self, key: &F::RuleKey, backend: &F::Backend) {
        let (port, bits) = F::port_bits(key);
        self.port_refs[PortMap::Published as usize].change(port, bits, true);
        let (to_port, to_bit) = F::backend_port_bit(key, backend);
        self.port_refs[PortMap::Backends as usize].change(to_port, to_bit, true);
    }

    /// Makes every port's bits in the filter `which` those of its reference counts.
    fn rewrite_port_map(&mut self, which: PortMap) -> Result<(), DataplaneError> {
        let want = self.port_refs[which as usize].bits();
        let name = which.name();
        let mut ports = self.port_map(name)?;
        for (port, &bits) in (0u32..).zip(&want) {
            if ports.get(&port, 0).map_err(map_err(name))? != bits {
                ports.set(port, bits, 0).map_err(map_err(name))?;
            }
        }
        Ok(())
    }

    fn port_map(&mut self, name: &'static str) -> Result<Array<&mut MapData, u8>, DataplaneError> {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DataplaneError::MissingMap(name))?;
        Array::try_from(map).map_err(map_err(name))
    }

    /// A rule's counters, summed over CPUs.
    pub fn rule_stats(&self, slot: u32) -> Result<RuleStats, DataplaneError> {
        let map = self
            .ebpf
            .map(RULE_STATS)
            .ok_or(DataplaneError::MissingMap(RULE_STATS))?;
        let stats: PerCpuArray<&MapData, RuleStats> =
            PerCpuArray::try_from(map).map_err(map_err(RULE_STATS))?;
        let per_cpu = stats.get(&slot, 0).map_err(map_err(RULE_STATS))?;
        Ok(per_cpu.iter().fold(RuleStats::default(), |mut acc, s| {
            acc.packets += s.packets;
            acc.bytes += s.bytes;
            acc.reply_packets += s.reply_packets;
            acc.reply_bytes += s.reply_bytes;
            acc.local += s.local;
            acc
        }))
    }

    /// Zeroes a counter slot before it is given to a new rule.
    pub fn reset_rule_stats(&mut self, slot: u32) -> Result<(), DataplaneError> {
        let map = self
            .ebpf
            .map_mut(RULE_STATS)
            .ok_or(DataplaneError::MissingMap(RULE_STATS))?;
        let mut stats: PerCpuArray<&mut MapData, RuleStats> =
            PerCpuArray::try_from(map).map_err(map_err(RULE_STATS))?;
        let ncpu = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Cpus(e))?;
        let zero = PerCpuValues::try_from(vec![RuleStats::default(); ncpu])
            .map_err(DataplaneError::Cpus)?;
        stats.set(slot, zero, 0).map_err(map_err(RULE_STATS))
    }

    /// Packet counts per [`Reason`], summed over CPUs.
    pub fn reason_stats(&self) -> Result<Vec<(Reason, u64)>, DataplaneError> {
        let map = self
            .ebpf
            .map(REASON_STATS)
            .ok_or(DataplaneError::MissingMap(REASON_STATS))?;
        let stats: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(map_err(REASON_STATS))?;
        Reason::ALL
            .iter()
            .map(|&r| {
                let v = stats.get(&(r as u32), 0).map_err(map_err(REASON_STATS))?;
                Ok((r, v.iter().sum()))
            })
            .collect()
    }

    /// Forgets every tracked IPv6 flow of a backend (its rule changed or went away), so
    /// that UDP flows are not black-holed by stale state.
    pub fn forget_flows_to_v6(
        &mut self,
        backend: (Ipv6Addr, u16),
        proto: u8,
    ) -> Result<usize, DataplaneError> {
        self.forget_flows_of::<V6>(&[(backend.0, backend.1, proto)].into_iter().collect())
    }
}

/// One address family's map names and types, so that the `Dataplane` operations on
/// rules, flows and host addresses (and the daemon's use of them) are written once for
/// IPv4 and IPv6.
pub trait Family {
    /// `IPv4` or `IPv6`, for messages.
    const NAME: &'static str;
    /// The family's address type.
    type Addr: Copy + Ord + fmt::Debug + Into<IpAddr>;
    /// The address as map keys hold it (network order).
    type Octets: aya::Pod;
    /// `0.0.0.0` / `::`: a wildcard rule's key address.
    const UNSPECIFIED: Self::Addr;
    /// IPv6 (its own wildcard bits in [`PUBLISHED_PORTS`]).
    const V6: bool;
    /// A key of the family's rules map.
    type RuleKey: aya::Pod + Eq + std::hash::Hash + fmt::Debug;
    /// A value of the family's rules map.
    type Backend: aya::Pod + PartialEq + fmt::Debug;
    /// A key of the family's conntrack map (a flow as its replies carry it).
    type FlowKey: aya::Pod;
    /// A value of the family's conntrack map.
    type Flow: aya::Pod;
    /// The rules map's name.
    const RULES: &'static str;
    /// The rule cache's name (`portfwd_common::rule_cache`).
    const RULE_CACHE: &'static str;
    /// A slot of the rule cache.
    type Cached: aya::Pod + Default;
    /// The rule cache's slot of `key`.
    fn cache_slot(key: &Self::RuleKey) -> u32;
    /// The rule cache's entry for `key`, served by `backend`.
    fn cache_entry(key: &Self::RuleKey, backend: Self::Backend) -> Self::Cached;
    /// The key a rule cache slot holds, if it holds a valid entry.
    fn cached_key(c: &Self::Cached) -> Option<Self::RuleKey>;
    /// The host-address map's name.
    const HOST_ADDRS: &'static str;
    /// The conntrack map's name (established flows).
    const CONNTRACK: &'static str;
    /// The embryonic flows' map's name (conntrack's layout).
    const EMBRYONIC: &'static str;
    /// The reply cache's generations' map's name (`portfwd_common::reply_cache`).
    const FLOW_GENERATIONS: &'static str;
    /// The reply cache's slot of a conntrack key.
    fn reply_cache_slot(k: &Self::FlowKey) -> u32;
    /// An address as map keys hold it.
    fn octets(a: Self::Addr) -> Self::Octets;
    /// An address from map key bytes.
    fn addr(o: Self::Octets) -> Self::Addr;
    /// `ip`, if it is of this family.
    fn from_ip(ip: IpAddr) -> Option<Self::Addr>;
    /// A rule key's host address (unspecified: the wildcard), port and protocol number.
    fn rule_key(k: &Self::RuleKey) -> (Self::Addr, u16, u8);
    /// A rule value's backend address, port and counter slot.
    fn backend(b: &Self::Backend) -> (Self::Addr, u16, u32);
    /// A flow key's backend: address, port, protocol.
    fn flow_backend(k: &Self::FlowKey) -> (Self::Addr, u16, u8);
    /// The rule key with another address.
    fn with_addr(k: &Self::RuleKey, a: Self::Addr) -> Self::RuleKey;
    /// A rule value's flags.
    fn flags(b: &Self::Backend) -> u8;
    /// The rule value with other flags.
    fn with_flags(b: Self::Backend, flags: u8) -> Self::Backend;
    /// A rule key's port, protocol and whether it is the wildcard.
    fn rule_port(k: &Self::RuleKey) -> (u16, u8, bool) {
        let (addr, port, proto) = Self::rule_key(k);
        (port, proto, addr.into().is_unspecified())
    }
    /// A rule key's port and its [`PUBLISHED_PORTS`] bits: the wildcard's (of either
    /// family and of this one), or the address-bound one.
    fn port_bits(k: &Self::RuleKey) -> (u16, u8) {
        let (port, proto, wildcard) = Self::rule_port(k);
        let bits = if wildcard {
            portfwd_common::wildcard_bits(proto, Self::V6)
        } else {
            port_bits(proto).0
        };
        (port, bits)
    }
    /// A rule entry's backend port and its [`BACKEND_PORTS`] bit.
    fn backend_port_bit(k: &Self::RuleKey, b: &Self::Backend) -> (u16, u8) {
        let (_, _, proto) = Self::rule_key(k);
        let (_, port, _) = Self::backend(b);
        (port, backend_port_bit(proto))
    }
}

/// The per-port filters the programs read before a lookup, as indexes of
/// `Dataplane::port_refs`.
#[derive(Clone, Copy)]
enum PortMap {
    /// [`PUBLISHED_PORTS`], by rule keys' ports.
    Published = 0,
    /// [`BACKEND_PORTS`], by backends' ports.
    Backends = 1,
}

impl PortMap {
    fn name(self) -> &'static str {
        match self {
            PortMap::Published => PUBLISHED_PORTS,
            PortMap::Backends => BACKEND_PORTS,
        }
    }
}

/// The rule entries behind each bit of a per-port filter, per (port, bit).
#[derive(Default)]
struct PortRefs(std::collections::HashMap<(u16, u8), u32>);

impl PortRefs {
    /// Counts one entry more (`add`) or less on `port` for each of `bits`; returns the
    /// bits that turned on and those that turned off.
    fn change(&mut self, port: u16, bits: u8, add: bool) -> (u8, u8) {
        let (mut set, mut clear) = (0u8, 0u8);
        for bit in (0..8).map(|i| 1u8 << i).filter(|b| bits & b != 0) {
            let refs = self.0.entry((port, bit)).or_insert(0);
            let before = *refs;
            *refs = if add {
                before + 1
            } else {
                before.saturating_sub(1)
            };
            let after = *refs;
            if after == 0 {
                self.0.remove(&(port, bit));
            }
            match (before == 0, after == 0) {
                (true, false) => set |= bit,
                (false, true) => clear |= bit,
                _ => {}
            }
        }
        (set, clear)
    }

    /// Every port's bits (65,536 entries).
    fn bits(&self) -> Vec<u8> {
        let mut want = vec![0u8; 65_536];
        for &(port, bit) in self.0.keys() {
            want[usize::from(port)] |= bit;
        }
        want
    }
}

/// One entry of a family's rules map.
pub type RuleEntry<F> = (<F as Family>::RuleKey, <F as Family>::Backend);

/// IPv4's maps.
pub enum V4 {}
/// IPv6's maps.
pub enum V6 {}

/// The two families' impls differ only in names and types.
macro_rules! family {
    ($family:ident, $name:literal, $variant:ident, $addr:ty, $len:literal,
     $rule_key:ty, $backend:ty, $cached:ty, $flow_key:ty, $flow:ty,
     $rules:expr, $rule_cache:expr, $host_addrs:expr, $conntrack:expr, $embryonic:expr,
     $generations:expr) => {
        impl Family for $family {
            const NAME: &'static str = $name;
            type Addr = $addr;
            type Octets = [u8; $len];
            const UNSPECIFIED: $addr = <$addr>::UNSPECIFIED;
            const V6: bool = $len == 16;
            type RuleKey = $rule_key;
            type Backend = $backend;
            type FlowKey = $flow_key;
            type Flow = $flow;
            const RULES: &'static str = $rules;
            const RULE_CACHE: &'static str = $rule_cache;
            type Cached = $cached;
            fn cache_slot(key: &$rule_key) -> u32 {
                <$cached>::slot(key)
            }
            fn cache_entry(key: &$rule_key, backend: $backend) -> $cached {
                CachedRule::new(*key, backend)
            }
            fn cached_key(c: &$cached) -> Option<$rule_key> {
                c.key()
            }
            const HOST_ADDRS: &'static str = $host_addrs;
            const CONNTRACK: &'static str = $conntrack;
            const EMBRYONIC: &'static str = $embryonic;
            const FLOW_GENERATIONS: &'static str = $generations;
            fn reply_cache_slot(k: &$flow_key) -> u32 {
                CachedFlow::<$flow_key, $flow>::slot(k)
            }
            fn octets(a: $addr) -> [u8; $len] {
                a.octets()
            }
            fn addr(o: [u8; $len]) -> $addr {
                <$addr>::from(o)
            }
            fn from_ip(ip: IpAddr) -> Option<$addr> {
                match ip {
                    IpAddr::$variant(a) => Some(a),
                    _ => None,
                }
            }
            fn rule_key(k: &$rule_key) -> ($addr, u16, u8) {
                (k.addr(), k.port(), k.proto())
            }
            fn backend(b: &$backend) -> ($addr, u16, u32) {
                (b.addr(), b.port(), b.stats_slot())
            }
            fn flow_backend(k: &$flow_key) -> ($addr, u16, u8) {
                let (ip, port) = k.backend();
                (ip, port, k.proto())
            }
            fn with_addr(k: &$rule_key, a: $addr) -> $rule_key {
                <$rule_key>::from_parts(a, k.port(), k.proto())
            }
            fn flags(b: &$backend) -> u8 {
                b.flags()
            }
            fn with_flags(b: $backend, flags: u8) -> $backend {
                b.with_flags(flags)
            }
        }
    };
}

family!(
    V4,
    "IPv4",
    V4,
    Ipv4Addr,
    4,
    RuleKeyV4,
    BackendV4,
    CachedRuleV4,
    FlowKeyV4,
    FlowV4,
    RULES_V4,
    RULE_CACHE_V4,
    HOST_ADDRS_V4,
    CONNTRACK_V4,
    EMBRYONIC_V4,
    FLOW_GENERATIONS_V4
);
family!(
    V6,
    "IPv6",
    V6,
    Ipv6Addr,
    16,
    RuleKeyV6,
    BackendV6,
    CachedRuleV6,
    FlowKeyV6,
    FlowV6,
    RULES_V6,
    RULE_CACHE_V6,
    HOST_ADDRS_V6,
    CONNTRACK_V6,
    EMBRYONIC_V6,
    FLOW_GENERATIONS_V6
);

/// A map delete of an absent key: aya reports it as the syscall's ENOENT.
fn is_not_found(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DataplaneError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or(DataplaneError::MissingProgram(name))?;
    prog.try_into()
        .map_err(|source| DataplaneError::Program { name, source })
}

/// The cookie the kernel gives this thread's network namespace (`SO_NETNS_COOKIE`, 5.14+),
/// the same value `bpf_get_netns_cookie` returns in the programs.
pub fn current_netns_cookie() -> Result<u64, DataplaneError> {
    use std::os::fd::AsRawFd;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("0.0.0.0:0"))
        .map_err(DataplaneError::NetnsCookie)?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket, and `cookie`/`len` point to writable memory of the right size.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(DataplaneError::NetnsCookie(std::io::Error::last_os_error()));
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_flows_parses_and_bounds() {
        assert_eq!(parse_max_flows("1024"), Ok(1024));
        assert_eq!(parse_max_flows("1_000_000"), Ok(1_000_000));
        assert_eq!(parse_max_flows("16,777,216"), Ok(16_777_216));
        for bad in [
            "0",
            "1023",
            "16777217",
            "99999999999",
            "-5",
            "",
            "1e6",
            "lots",
            " 2048",
        ] {
            let e = parse_max_flows(bad).expect_err(bad);
            assert!(!e.contains('\n') && e.contains("1024"), "{bad}: {e}");
        }
    }

    #[test]
    fn flow_memory_matches_the_kernels() {
        // memlock of CONNTRACK_V4 + CONNTRACK_V6, bpftool, kernel 6.18.
        for (n, memlock) in [
            (131_072, 12_583_872 + 16_778_176),
            (1_000_000, 96_778_176 + 128_778_176),
            (4_000_000, 387_109_824 + 515_109_824),
        ] {
            let est = flow_tables_bytes(n) as f64;
            assert!(
                (est / memlock as f64 - 1.0).abs() < 0.001,
                "{n}: {est} {memlock}"
            );
        }
    }

    #[test]
    fn max_flows_must_fit_in_memory() {
        assert!(check_max_flows(DEFAULT_MAX_FLOWS, 1 << 30).is_ok());
        let e = check_max_flows(16_777_216, 1 << 30).expect_err("5 GiB in 1 GiB");
        assert!(e.contains("16777216") && e.contains("1024 MiB"), "{e}");
    }
}
