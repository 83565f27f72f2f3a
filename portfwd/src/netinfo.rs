//! The host probes: what the daemon reads about the host, each answered for the
//! *calling* network namespace — its interfaces (index, virtual or not, IPv4 subnets) and
//! addresses, the bridges' forwarding databases (netlink, ioctls), whether a local
//! process holds a port (a trial bind), the ephemeral port range and IPv4 forwarding
//! (`/proc/sys/net`, per namespace), and the cgroup2 mount. sysfs is not used:
//! `/sys/class/net` shows the namespace of whoever mounted `/sys`, which is not the
//! daemon's when it runs under `nsenter --net=...`. The daemon reaches these through its
//! `Kernel` seam ([`crate::daemon::Kernel`]), never directly.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io, mem,
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use portfwd_common::{BridgePortKey, BRIDGE_PORT_PEER};

use crate::rule::{PortRange, Proto};

/// The interface's index, if it exists in this namespace.
pub fn ifindex(iface: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(iface).ok()
}

/// Whether `iface` is virtual (veth, bridge, tap, ...): its driver reports no bus
/// (`ETHTOOL_GDRVINFO`), where a NIC, virtio included, reports its PCI address.
pub fn is_virtual(iface: &str) -> bool {
    drvinfo_bus(iface).is_none_or(|bus| bus.is_empty())
}

const ETHTOOL_GDRVINFO: u32 = 0x3;

#[repr(C)]
struct EthtoolDrvinfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

#[repr(C)]
struct IfreqData {
    name: [u8; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

/// The driver's bus address (`ethtool -i`'s bus-info), or `None` if it cannot be read.
fn drvinfo_bus(iface: &str) -> Option<String> {
    if iface.len() >= libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is a fresh, valid descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero is a valid value for these plain-data structs.
    let mut info: EthtoolDrvinfo = unsafe { mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut req = IfreqData {
        name: [0; libc::IFNAMSIZ],
        data: (&mut info as *mut EthtoolDrvinfo).cast(),
        _pad: [0; 16],
    };
    req.name[..iface.len()].copy_from_slice(iface.as_bytes());
    // SAFETY: SIOCETHTOOL with an ifreq whose data points to a live ethtool_drvinfo.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &mut req) };
    if rc != 0 {
        return None;
    }
    let end = info.bus_info.iter().position(|&b| b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.bus_info[..end]).into_owned())
}

/// One learnt entry of a bridge's forwarding database.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdbEntry {
    /// The bridge's interface index.
    pub bridge_ifindex: u32,
    /// The learnt MAC address.
    pub mac: [u8; 6],
    /// The index of the bridge port that leads to it.
    pub port_ifindex: u32,
}

const NDA_LLADDR: u16 = 2;
const NDA_MASTER: u16 = 9;
const NUD_PERMANENT: u16 = 0x80;

#[repr(C)]
struct Ndmsg {
    family: u8,
    pad1: u8,
    pad2: u16,
    ifindex: i32,
    state: u16,
    flags: u8,
    ty: u8,
}

/// The learnt (not the bridges' own, permanent) entries of every bridge's forwarding
/// database, from an `RTM_GETNEIGH` dump of family `AF_BRIDGE`.
pub fn bridge_fdb() -> io::Result<Vec<FdbEntry>> {
    let nd = Ndmsg {
        family: libc::AF_BRIDGE as u8,
        pad1: 0,
        pad2: 0,
        ifindex: 0,
        state: 0,
        flags: 0,
        ty: 0,
    };
    // SAFETY: Ndmsg is plain data (repr(C), no padding bytes left uninitialised).
    let nd = unsafe {
        std::slice::from_raw_parts((&nd as *const Ndmsg).cast::<u8>(), mem::size_of::<Ndmsg>())
    };
    let mut out = Vec::new();
    netlink_dump(libc::RTM_GETNEIGH, nd, libc::RTM_NEWNEIGH, |m| {
        if let Some(e) = parse_neigh(m) {
            out.push(e);
        }
    })?;
    Ok(out)
}

const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_LINK_NETNSID: u16 = 37;
/// `struct ifinfomsg`: family, type, index, flags, change.
const IFINFOMSG_LEN: usize = 16;

/// The interfaces of this namespace that are one end of a veth or netkit pair whose
/// other end lives in another namespace (a container's `eth0`): the ones
/// `bpf_redirect_peer` can deliver through. From an `RTM_GETLINK` dump: the kind in
/// `IFLA_LINKINFO`, and `IFLA_LINK_NETNSID`, which the kernel adds only when the peer is
/// in another namespace.
pub fn peer_links() -> io::Result<BTreeSet<u32>> {
    let mut out = BTreeSet::new();
    let req = [0u8; IFINFOMSG_LEN]; // AF_UNSPEC: every interface
    netlink_dump(libc::RTM_GETLINK, &req, libc::RTM_NEWLINK, |m| {
        let Some(index) = m.get(4..8) else { return };
        let index = i32::from_ne_bytes([index[0], index[1], index[2], index[3]]);
        let (mut kind, mut other_ns) = (None, false);
        for (ty, data) in attrs(m.get(IFINFOMSG_LEN..).unwrap_or(&[])) {
            match ty {
                IFLA_LINK_NETNSID => other_ns = true,
                IFLA_LINKINFO => {
                    kind = attrs(data)
                        .find(|(t, _)| *t == IFLA_INFO_KIND)
                        .map(|(_, k)| k.split(|b| *b == 0).next().unwrap_or(k))
                }
                _ => {}
            }
        }
        if other_ns && matches!(kind, Some(b"veth" | b"netkit")) {
            if let Ok(i) = u32::try_from(index) {
                out.insert(i);
            }
        }
    })?;
    Ok(out)
}

/// The (type, payload) of each netlink attribute in `buf` (nested flags masked).
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let alen = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let atype = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if alen < 4 || alen > buf.len() {
            return None;
        }
        let data = &buf[4..alen];
        buf = buf.get((alen + 3) & !3..).unwrap_or(&[]);
        Some((atype, data))
    })
}

/// Sends an `NLM_F_DUMP` request of type `request` (payload `body`) on a fresh
/// NETLINK_ROUTE socket and calls `each` with the payload of every `reply`-typed message.
fn netlink_dump(
    request: u16,
    body: &[u8],
    reply: u16,
    mut each: impl FnMut(&[u8]),
) -> io::Result<()> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh, valid descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };

    let hdr_len = mem::size_of::<libc::nlmsghdr>();
    let mut req = vec![0u8; hdr_len + body.len()];
    let hdr = libc::nlmsghdr {
        nlmsg_len: req.len() as u32,
        nlmsg_type: request,
        nlmsg_flags: (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
        nlmsg_seq: 1,
        nlmsg_pid: 0,
    };
    // SAFETY: the header is plain data; the buffer holds it.
    unsafe { std::ptr::write_unaligned(req.as_mut_ptr().cast(), hdr) };
    req[hdr_len..].copy_from_slice(body);
    // SAFETY: sending our own buffer on our own socket (to the kernel: address zeroed).
    let sent = unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }

    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: receiving into our own buffer of the given length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut msgs = &buf[..n as usize];
        while msgs.len() >= hdr_len {
            // SAFETY: at least a header's worth of bytes remain.
            let h: libc::nlmsghdr = unsafe { std::ptr::read_unaligned(msgs.as_ptr().cast()) };
            let len = h.nlmsg_len as usize;
            if len < hdr_len || len > msgs.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "truncated netlink message",
                ));
            }
            match i32::from(h.nlmsg_type) {
                libc::NLMSG_DONE => return Ok(()),
                libc::NLMSG_ERROR => return Err(io::Error::other("netlink dump failed")),
                t if t == i32::from(reply) => each(&msgs[hdr_len..len]),
                _ => {}
            }
            // Messages are 4-byte aligned.
            msgs = msgs.get((len + 3) & !3..).unwrap_or(&[]);
        }
    }
}

/// A learnt FDB entry from one RTM_NEWNEIGH payload.
fn parse_neigh(payload: &[u8]) -> Option<FdbEntry> {
    let nd_len = mem::size_of::<Ndmsg>();
    if payload.len() < nd_len {
        return None;
    }
    // SAFETY: at least an ndmsg's worth of bytes.
    let nd: Ndmsg = unsafe { std::ptr::read_unaligned(payload.as_ptr().cast()) };
    if nd.family != libc::AF_BRIDGE as u8 || nd.state & NUD_PERMANENT != 0 {
        return None;
    }
    let (mut mac, mut master) = (None, None);
    for (atype, data) in attrs(&payload[nd_len..]) {
        match atype {
            NDA_LLADDR if data.len() == 6 => mac = Some(<[u8; 6]>::try_from(data).ok()?),
            NDA_MASTER if data.len() == 4 => {
                master = Some(u32::from_ne_bytes(<[u8; 4]>::try_from(data).ok()?))
            }
            _ => {}
        }
    }
    Some(FdbEntry {
        bridge_ifindex: master?,
        mac: mac?,
        port_ifindex: u32::try_from(nd.ifindex).ok()?,
    })
}

/// The IPv4 subnets of this namespace's interfaces (loopback skipped): (interface,
/// address, netmask), host order.
pub fn v4_subnets() -> Vec<(String, u32, u32)> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|a| {
            let ip = a.address?.as_sockaddr_in()?.ip();
            let mask = a.netmask?.as_sockaddr_in()?.ip();
            (u32::from(ip) >> 24 != 127).then(|| (a.interface_name, u32::from(ip), u32::from(mask)))
        })
        .collect()
}

/// The interface of `subnets` ([`v4_subnets`]) that holds `addr`, the longest prefix
/// winning: where a directly connected backend is, and where its packets arrive.
pub fn iface_of_v4_subnet(subnets: &[(String, u32, u32)], addr: Ipv4Addr) -> Option<String> {
    let addr = u32::from(addr);
    subnets
        .iter()
        .filter(|(_, ip, mask)| ip & mask == addr & mask)
        // `max_by_key` keeps the last of equals: reversed, the first listed wins a tie.
        .rev()
        .max_by_key(|(_, _, mask)| mask.count_ones())
        .map(|(name, _, _)| name.clone())
}

/// The addresses configured on this network namespace's interfaces, both families
/// (IPv6 link-local ones included: a wildcard rule answers on them too, as a socket bound
/// to `::` does).
pub fn local_addrs() -> BTreeSet<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return BTreeSet::new();
    };
    addrs
        .filter_map(|a| {
            let s = a.address?;
            s.as_sockaddr_in()
                .map(|sin| IpAddr::V4(sin.ip()))
                .or_else(|| s.as_sockaddr_in6().map(|sin6| IpAddr::V6(sin6.ip())))
        })
        .collect()
}

/// The cgroup2 mount point (one copy for the daemon, the tests and xtask).
pub use portfwd_common::host::cgroup2_root;

/// The forwarding databases of this namespace's bridges, as (bridge ifindex, MAC) to the
/// ifindex of the port that leads to the MAC (learnt entries only).
/// A port that is a veth whose peer is in another namespace carries
/// [`BRIDGE_PORT_PEER`] (TC then redirects into the peer); if the links cannot be read,
/// no port does (a plain redirect, always right).
pub fn bridge_ports() -> io::Result<BTreeMap<BridgePortKey, u32>> {
    let peers = peer_links().unwrap_or_default();
    Ok(bridge_fdb()?
        .into_iter()
        .map(|e| {
            let flag = if peers.contains(&e.port_ifindex) {
                BRIDGE_PORT_PEER
            } else {
                0
            };
            (
                BridgePortKey::new(e.bridge_ifindex, e.mac),
                e.port_ifindex | flag,
            )
        })
        .collect())
}

/// Tries to bind `ip:port` in this namespace. TCP uses `SO_REUSEADDR`, so only a
/// listener (not a connection in TIME_WAIT or a client's ephemeral port) counts. An
/// address that is not the host's (`EADDRNOTAVAIL`) is held by no local process, and
/// neither is a port the daemon publishes (its bind4 program refuses with `EPERM`).
pub fn port_held_locally(ip: IpAddr, port: u16, proto: Proto) -> bool {
    use nix::sys::socket::{
        bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn,
        SockaddrIn6,
    };
    use std::os::fd::AsRawFd;
    let ty = match proto {
        Proto::Tcp => SockType::Stream,
        Proto::Udp => SockType::Datagram,
    };
    let family = match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    let Ok(fd) = socket(family, ty, SockFlag::SOCK_CLOEXEC, None) else {
        return false;
    };
    if ty == SockType::Stream {
        let _ = setsockopt(&fd, sockopt::ReuseAddr, &true);
    }
    let bound = match ip {
        IpAddr::V4(v4) => bind(
            fd.as_raw_fd(),
            &SockaddrIn::from(std::net::SocketAddrV4::new(v4, port)),
        ),
        IpAddr::V6(v6) => bind(
            fd.as_raw_fd(),
            &SockaddrIn6::from(std::net::SocketAddrV6::new(v6, port, 0, 0)),
        ),
    };
    matches!(bound, Err(nix::errno::Errno::EADDRINUSE))
}

/// `net.ipv4.ip_local_port_range` of this network namespace, or Linux's default.
pub fn ephemeral_ports() -> PortRange {
    let read = || -> Option<PortRange> {
        let text = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
        let mut it = text.split_whitespace().map(str::parse::<u16>);
        let (lo, hi) = (it.next()?.ok()?, it.next()?.ok()?);
        PortRange::new(lo, hi).ok()
    };
    read().unwrap_or(PortRange::LINUX_EPHEMERAL)
}

/// Whether IPv4 forwarding is off in this network namespace (`None`: cannot tell).
/// Without it the kernel drops translated packets to backends behind other interfaces.
pub fn ipv4_forwarding_disabled() -> Option<bool> {
    fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
        .ok()
        .map(|v| v.trim() == "0")
}
