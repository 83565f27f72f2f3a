//! The seam between the daemon's rule logic and the host: the [`Kernel`] trait, and its
//! implementation for [`Dataplane`] (the maps and programs) together with the host probes
//! of [`crate::netinfo`] (addresses, local listeners, ephemeral range, bridges). The
//! daemon reaches the host only through it, so its logic is testable without BPF or root.
//! Rule, flow and host-address operations are generic over the address [`Family`]: one
//! method per operation for IPv4 and IPv6. Every map write of [`Dataplane`]'s impl that
//! fails is counted in the metrics' `portfwd_map_update_errors_total`.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use portfwd_common::{Reason, RuleStats};

use crate::{
    dataplane::{Attachment, Dataplane, DataplaneError, Family, RuleEntry},
    flows::{FlowFilter, FlowTables, FlowsReply},
    metrics::count_map_update,
    netinfo,
    rule::{PortRange, Proto},
    trace::{TraceError, TraceQuery, TraceReply},
};

/// The dataplane and the host as the daemon uses them: a trait so that the rule logic is
/// testable without BPF. [`Dataplane`] is the real one.
pub trait Kernel {
    /// Publishes (or replaces) one port of family `F`.
    fn insert_rule<F: Family>(
        &mut self,
        key: F::RuleKey,
        backend: F::Backend,
    ) -> Result<(), DataplaneError>;
    /// Unpublishes one port of family `F`; an absent key is not an error.
    fn remove_rule<F: Family>(&mut self, key: &F::RuleKey) -> Result<(), DataplaneError>;
    /// Every rule entry of family `F` the kernel holds (to adopt pinned maps); none
    /// unless the kernel keeps state across daemons.
    fn rules_snapshot<F: Family>(&mut self) -> Result<Vec<RuleEntry<F>>, DataplaneError> {
        Ok(Vec::new())
    }
    /// Zeroes a counter slot before it is given to a new rule.
    fn reset_rule_stats(&mut self, slot: u32) -> Result<(), DataplaneError>;
    /// A rule's counters, summed over CPUs.
    fn rule_stats(&self, slot: u32) -> Result<RuleStats, DataplaneError>;
    /// Forgets every tracked flow of family `F` to one of `backends` (address, port,
    /// protocol number), in one pass over the flow table; returns how many.
    fn forget_flows<F: Family>(
        &mut self,
        backends: &BTreeSet<(F::Addr, u16, u8)>,
    ) -> Result<usize, DataplaneError>;
    /// Packet counts per [`Reason`], summed over CPUs.
    fn reason_stats(&self) -> Result<Vec<(Reason, u64)>, DataplaneError>;
    /// The interfaces the programs are attached to, and how.
    fn attachments(&self) -> Vec<Attachment>;
    /// The host's addresses, both families: what wildcard rules match.
    fn host_addrs(&self) -> BTreeSet<IpAddr>;
    /// Makes the kernel's set of family `F`'s host addresses equal to `addrs`.
    fn sync_host_addrs<F: Family>(
        &mut self,
        addrs: &BTreeSet<F::Addr>,
    ) -> Result<(), DataplaneError>;
    /// Puts NAT64's entry where the IPv4 `backends` of IPv6 rules need it (see
    /// [`Dataplane::sync_nat64`]); the interfaces newly attached.
    fn sync_nat64(&mut self, backends: &BTreeSet<Ipv4Addr>) -> Result<Vec<String>, DataplaneError>;
    /// Interfaces where NAT64's entry runs.
    fn nat64_entries(&self) -> Vec<String>;
    /// The cgroup whose processes are served as local clients, if any.
    fn local_cgroup(&self) -> Option<PathBuf>;
    /// Whether a local process already holds `ip:port` for `proto` (a TCP listener, a
    /// bound UDP socket): publishing it would silently take its traffic.
    fn held_locally(&self, ip: IpAddr, port: u16, proto: Proto) -> bool;
    /// The host's ephemeral ports (`net.ipv4.ip_local_port_range` of the daemon's
    /// namespace), where "any free port" is chosen.
    fn ephemeral_ports(&self) -> PortRange;
    /// Re-reads what the fast path needs from the host (the bridges' forwarding
    /// databases); nothing when the fast path is off.
    fn refresh_fast_path(&mut self) -> Result<(), DataplaneError> {
        Ok(())
    }
    /// The live flows `filter` keeps (at most `limit`) and how full the flow tables are;
    /// a kernel without flow tables has none.
    fn flows(&self, filter: Option<FlowFilter>, limit: u32) -> Result<FlowsReply, DataplaneError> {
        let _ = (filter, limit);
        Ok(FlowsReply::default())
    }
    /// What the ingress program does with one packet ([`crate::trace`]); a kernel without
    /// programs cannot say.
    fn trace(&self, query: &TraceQuery) -> Result<TraceReply, TraceError> {
        let _ = query;
        Err(TraceError::Unsupported)
    }
}

impl Kernel for Dataplane {
    fn rules_snapshot<F: Family>(&mut self) -> Result<Vec<RuleEntry<F>>, DataplaneError> {
        self.rules_snapshot_of::<F>()
    }
    fn insert_rule<F: Family>(
        &mut self,
        key: F::RuleKey,
        backend: F::Backend,
    ) -> Result<(), DataplaneError> {
        count_map_update(self.insert_rule_of::<F>(key, backend))
    }
    fn remove_rule<F: Family>(&mut self, key: &F::RuleKey) -> Result<(), DataplaneError> {
        count_map_update(self.remove_rule_of::<F>(key))
    }
    fn reset_rule_stats(&mut self, slot: u32) -> Result<(), DataplaneError> {
        count_map_update(Dataplane::reset_rule_stats(self, slot))
    }
    fn rule_stats(&self, slot: u32) -> Result<RuleStats, DataplaneError> {
        Dataplane::rule_stats(self, slot)
    }
    fn forget_flows<F: Family>(
        &mut self,
        backends: &BTreeSet<(F::Addr, u16, u8)>,
    ) -> Result<usize, DataplaneError> {
        count_map_update(self.forget_flows_of::<F>(backends))
    }
    fn reason_stats(&self) -> Result<Vec<(Reason, u64)>, DataplaneError> {
        Dataplane::reason_stats(self)
    }
    fn attachments(&self) -> Vec<Attachment> {
        Dataplane::attachments(self).to_vec()
    }
    fn host_addrs(&self) -> BTreeSet<IpAddr> {
        netinfo::local_addrs()
    }
    fn sync_host_addrs<F: Family>(
        &mut self,
        addrs: &BTreeSet<F::Addr>,
    ) -> Result<(), DataplaneError> {
        count_map_update(self.sync_host_addrs_of::<F>(addrs))
    }
    fn sync_nat64(&mut self, backends: &BTreeSet<Ipv4Addr>) -> Result<Vec<String>, DataplaneError> {
        count_map_update(Dataplane::sync_nat64(self, backends))
    }
    fn nat64_entries(&self) -> Vec<String> {
        Dataplane::nat64_entries(self).to_vec()
    }
    fn local_cgroup(&self) -> Option<PathBuf> {
        Dataplane::local_cgroup(self).map(Path::to_path_buf)
    }
    fn held_locally(&self, ip: IpAddr, port: u16, proto: Proto) -> bool {
        netinfo::port_held_locally(ip, port, proto)
    }
    fn ephemeral_ports(&self) -> PortRange {
        netinfo::ephemeral_ports()
    }
    fn refresh_fast_path(&mut self) -> Result<(), DataplaneError> {
        if self.fast_path() {
            // A failed read keeps the last known ports: stale entries only fall back.
            if let Ok(ports) = netinfo::bridge_ports() {
                count_map_update(self.sync_bridge_ports(&ports))?;
            }
        }
        Ok(())
    }
    fn flows(&self, filter: Option<FlowFilter>, limit: u32) -> Result<FlowsReply, DataplaneError> {
        FlowTables::new(self)?.list(filter, limit)
    }
    fn trace(&self, query: &TraceQuery) -> Result<TraceReply, TraceError> {
        crate::trace::trace(self, query)
    }
}
