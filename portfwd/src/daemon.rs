//! The daemon: its rule table (the source of truth for what is published), the counter
//! slot allocator, the request handler, and the control-socket server.
//!
//! Invariants:
//! - Every rule in [`RuleTable`] is in the kernel's [`portfwd_common::RULES_V4`] with the
//!   same backend and counter slot, and nothing else is. An operation changes the table
//!   only after the kernel accepted the change, so a failed request leaves both untouched.
//! - Conflicts follow Docker: one (address, port, protocol) at a time, and a wildcard
//!   (0.0.0.0) rule excludes every specific-address rule on the same port and protocol.
//! - Nothing a client sends can stop the daemon: each connection is its own task with a
//!   read timeout and a size limit, every failure becomes an error response, and the
//!   code has no `unwrap`.
//!
//! Later (not built yet) this table is also what a declarations file's atomic `apply`
//! diffs against, and what a restarted daemon rebuilds from pinned maps.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    fs::{self, File, OpenOptions},
    future::Future,
    io,
    net::Ipv4Addr,
    os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use log::{debug, info, warn};
use nix::fcntl::{Flock, FlockArg};
use portfwd_common::{BackendV4, Reason, RuleKeyV4, RuleStats, MAX_STATS_SLOTS};
use thiserror::Error;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::Semaphore,
};

use crate::{
    dataplane::{self, Attachment, Dataplane, DataplaneError},
    protocol::{self, ListReply, LocalClients, Request, RuleReply, RuleStatus, MAX_REQUEST},
    rule::{Backend, Proto, Publish, Rule},
};

/// How long a client may take to send its request (and to read the answer).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are refused with an error response.
pub const MAX_CONNECTIONS: usize = 64;
/// How often the host's addresses are re-read for wildcard rules.
pub const HOST_ADDR_REFRESH: Duration = Duration::from_secs(1);

/// Why a request failed. Each message is one line; the first two are Docker's words.
#[derive(Debug, Error)]
pub enum DaemonError {
    #[error("Bind for {addr_port} failed: port is already allocated")]
    PortAllocated { addr_port: String },
    #[error("No published port {publish}")]
    NotPublished { publish: Publish },
    #[error("cannot publish {publish}: all {max} counter slots are in use", max = MAX_STATS_SLOTS)]
    NoSlot { publish: Publish },
    #[error("cannot {action} {publish}: {source}")]
    Kernel {
        action: &'static str,
        publish: Publish,
        #[source]
        source: Box<DataplaneError>,
    },
    #[error("cannot publish {publish}: a local process already uses it (address already in use)")]
    HeldLocally { publish: Publish },
    #[error("cannot read the counters: {0}")]
    Stats(#[source] Box<DataplaneError>),
}

/// The dataplane as the daemon uses it: a trait so that the rule logic is testable
/// without BPF. [`Dataplane`] is the real one.
pub trait Kernel {
    fn insert_rule(&mut self, key: RuleKeyV4, backend: BackendV4) -> Result<(), DataplaneError>;
    fn remove_rule(&mut self, key: &RuleKeyV4) -> Result<(), DataplaneError>;
    fn reset_rule_stats(&mut self, slot: u32) -> Result<(), DataplaneError>;
    fn rule_stats(&self, slot: u32) -> Result<RuleStats, DataplaneError>;
    fn forget_flows_to(
        &mut self,
        backend: (Ipv4Addr, u16),
        proto: u8,
    ) -> Result<usize, DataplaneError>;
    fn reason_stats(&self) -> Result<Vec<(Reason, u64)>, DataplaneError>;
    fn attachments(&self) -> Vec<Attachment>;
    fn sync_host_addrs(&mut self, addrs: &BTreeSet<Ipv4Addr>) -> Result<(), DataplaneError>;
    /// The cgroup whose processes are served as local clients, if any.
    fn local_cgroup(&self) -> Option<PathBuf>;
    /// Whether a local process already holds `publish` (a TCP listener, a bound UDP
    /// socket): publishing it would silently take its traffic.
    fn held_locally(&self, publish: &Publish) -> bool;
    /// Re-reads what the fast path needs from the host (the bridges' forwarding
    /// databases); nothing when the fast path is off.
    fn refresh_fast_path(&mut self) -> Result<(), DataplaneError> {
        Ok(())
    }
}

impl Kernel for Dataplane {
    fn insert_rule(&mut self, key: RuleKeyV4, backend: BackendV4) -> Result<(), DataplaneError> {
        Dataplane::insert_rule(self, key, backend)
    }
    fn remove_rule(&mut self, key: &RuleKeyV4) -> Result<(), DataplaneError> {
        Dataplane::remove_rule(self, key)
    }
    fn reset_rule_stats(&mut self, slot: u32) -> Result<(), DataplaneError> {
        Dataplane::reset_rule_stats(self, slot)
    }
    fn rule_stats(&self, slot: u32) -> Result<RuleStats, DataplaneError> {
        Dataplane::rule_stats(self, slot)
    }
    fn forget_flows_to(
        &mut self,
        backend: (Ipv4Addr, u16),
        proto: u8,
    ) -> Result<usize, DataplaneError> {
        Dataplane::forget_flows_to(self, backend, proto)
    }
    fn reason_stats(&self) -> Result<Vec<(Reason, u64)>, DataplaneError> {
        Dataplane::reason_stats(self)
    }
    fn attachments(&self) -> Vec<Attachment> {
        Dataplane::attachments(self).to_vec()
    }
    fn sync_host_addrs(&mut self, addrs: &BTreeSet<Ipv4Addr>) -> Result<(), DataplaneError> {
        Dataplane::sync_host_addrs(self, addrs)
    }
    fn local_cgroup(&self) -> Option<PathBuf> {
        Dataplane::local_cgroup(self).map(Path::to_path_buf)
    }
    fn held_locally(&self, publish: &Publish) -> bool {
        port_held_locally(publish)
    }
    fn refresh_fast_path(&mut self) -> Result<(), DataplaneError> {
        if self.fast_path() {
            // A failed read keeps the last known ports: stale entries only fall back.
            if let Ok(ports) = dataplane::bridge_ports() {
                self.sync_bridge_ports(&ports)?;
            }
        }
        Ok(())
    }
}

/// Tries to bind `publish` in this namespace. TCP uses `SO_REUSEADDR`, so only a
/// listener (not a connection in TIME_WAIT or a client's ephemeral port) counts. An
/// address that is not the host's (`EADDRNOTAVAIL`) is held by no local process.
pub fn port_held_locally(publish: &Publish) -> bool {
    use nix::sys::socket::{
        bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn,
    };
    let ty = match publish.proto() {
        Proto::Tcp => SockType::Stream,
        Proto::Udp => SockType::Datagram,
    };
    let Ok(fd) = socket(AddressFamily::Inet, ty, SockFlag::SOCK_CLOEXEC, None) else {
        return false;
    };
    if ty == SockType::Stream {
        let _ = setsockopt(&fd, sockopt::ReuseAddr, &true);
    }
    let addr = SockaddrIn::from(std::net::SocketAddrV4::new(
        publish.host_ip(),
        publish.host_port(),
    ));
    matches!(
        bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr),
        Err(nix::errno::Errno::EADDRINUSE)
    )
}

/// Hands out counter slots `0..MAX_STATS_SLOTS`. Fresh slots go first and freed ones are
/// reused oldest first, so a slot rests as long as possible before reuse (a deleted
/// rule's last packets may still be counted in it).
#[derive(Debug, Default)]
pub struct SlotAllocator {
    next: u32,
    free: VecDeque<u32>,
}

impl SlotAllocator {
    pub fn alloc(&mut self) -> Option<u32> {
        if self.next < MAX_STATS_SLOTS {
            self.next += 1;
            Some(self.next - 1)
        } else {
            self.free.pop_front()
        }
    }
    pub fn release(&mut self, slot: u32) {
        self.free.push_back(slot);
    }
}

/// One published rule as the daemon holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub backend: Backend,
    pub stats_slot: u32,
}

/// The published rules, keyed by what is published. Pure: no kernel calls.
#[derive(Debug, Default)]
pub struct RuleTable {
    rules: BTreeMap<Publish, Entry>,
}

impl RuleTable {
    /// Docker's conflict check: the error `add` gives if `publish` cannot be added.
    pub fn check_free(&self, publish: &Publish) -> Result<(), DaemonError> {
        let taken = self.rules.keys().any(|p| {
            p.host_port() == publish.host_port()
                && p.proto() == publish.proto()
                && (p.host_ip() == publish.host_ip() || p.is_wildcard() || publish.is_wildcard())
        });
        if taken {
            Err(DaemonError::PortAllocated {
                addr_port: publish.addr_port(),
            })
        } else {
            Ok(())
        }
    }
    pub fn get(&self, publish: &Publish) -> Option<&Entry> {
        self.rules.get(publish)
    }
    pub fn iter(&self) -> impl Iterator<Item = (&Publish, &Entry)> {
        self.rules.iter()
    }
    pub fn len(&self) -> usize {
        self.rules.len()
    }
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
    /// Whether any rule sends `proto` traffic to `backend`.
    pub fn uses_backend(&self, backend: Backend, proto: Proto) -> bool {
        self.rules
            .iter()
            .any(|(p, e)| e.backend == backend && p.proto() == proto)
    }
    fn insert(&mut self, publish: Publish, entry: Entry) {
        self.rules.insert(publish, entry);
    }
    fn remove(&mut self, publish: &Publish) -> Option<Entry> {
        self.rules.remove(publish)
    }
}

/// The daemon's state: the kernel side and the table that mirrors it.
pub struct Daemon<K> {
    kernel: K,
    table: RuleTable,
    slots: SlotAllocator,
    host_addrs: Option<BTreeSet<Ipv4Addr>>,
    host_addrs_failing: bool,
}

impl<K: Kernel> Daemon<K> {
    pub fn new(kernel: K) -> Self {
        Self {
            kernel,
            table: RuleTable::default(),
            slots: SlotAllocator::default(),
            host_addrs: None,
            host_addrs_failing: false,
        }
    }

    pub fn kernel(&self) -> &K {
        &self.kernel
    }

    pub fn table(&self) -> &RuleTable {
        &self.table
    }

    /// Publishes `rule`, or fails leaving everything as it was.
    pub fn add(&mut self, rule: Rule) -> Result<RuleReply, DaemonError> {
        let Rule { publish, backend } = rule;
        self.table.check_free(&publish)?;
        if self.kernel.held_locally(&publish) {
            return Err(DaemonError::HeldLocally { publish });
        }
        let slot = self.slots.alloc().ok_or(DaemonError::NoSlot { publish })?;
        let kernel_err = |source| DaemonError::Kernel {
            action: "publish",
            publish,
            source: Box::new(source),
        };
        let inserted = self.kernel.reset_rule_stats(slot).and_then(|()| {
            self.kernel.insert_rule(
                publish.map_key(),
                BackendV4::new(backend.ip(), backend.port(), slot),
            )
        });
        if let Err(e) = inserted {
            self.slots.release(slot);
            return Err(kernel_err(e));
        }
        self.table.insert(
            publish,
            Entry {
                backend,
                stats_slot: slot,
            },
        );
        info!("published {rule} (counter slot {slot})");
        Ok(RuleReply { publish, backend })
    }

    /// Unpublishes `publish`: new flows stop at once; tracked flows to its backend are
    /// forgotten unless another rule still sends to that backend.
    pub fn del(&mut self, publish: Publish) -> Result<RuleReply, DaemonError> {
        let entry = *self
            .table
            .get(&publish)
            .ok_or(DaemonError::NotPublished { publish })?;
        self.kernel
            .remove_rule(&publish.map_key())
            .map_err(|source| DaemonError::Kernel {
                action: "unpublish",
                publish,
                source: Box::new(source),
            })?;
        self.table.remove(&publish);
        self.slots.release(entry.stats_slot);
        let backend = entry.backend;
        info!("unpublished {publish} -> {backend}");
        if !self.table.uses_backend(backend, publish.proto()) {
            match self
                .kernel
                .forget_flows_to((backend.ip(), backend.port()), publish.proto().number())
            {
                Ok(n) => debug!("forgot {n} tracked flows to {backend}/{}", publish.proto()),
                Err(e) => warn!("cannot forget the tracked flows to {backend}: {e}"),
            }
        }
        Ok(RuleReply { publish, backend })
    }

    /// Every rule with its counters, the attachments and the reason counters.
    pub fn list(&self) -> Result<ListReply, DaemonError> {
        let rules = self
            .table
            .iter()
            .map(|(p, e)| {
                let s = self
                    .kernel
                    .rule_stats(e.stats_slot)
                    .map_err(|e| DaemonError::Stats(Box::new(e)))?;
                Ok(RuleStatus {
                    host_ip: p.host_ip(),
                    host_port: p.host_port(),
                    proto: p.proto(),
                    backend_ip: e.backend.ip(),
                    backend_port: e.backend.port(),
                    packets: s.packets,
                    bytes: s.bytes,
                    reply_packets: s.reply_packets,
                    reply_bytes: s.reply_bytes,
                    local: s.local,
                })
            })
            .collect::<Result<_, DaemonError>>()?;
        let reasons = self
            .kernel
            .reason_stats()
            .map_err(|e| DaemonError::Stats(Box::new(e)))?
            .into_iter()
            .map(|(r, n)| (r.name().to_string(), n))
            .collect();
        let cgroup = self.kernel.local_cgroup();
        Ok(ListReply {
            rules,
            interfaces: self.kernel.attachments(),
            reasons,
            local_clients: LocalClients {
                served: cgroup.is_some(),
                cgroup: cgroup.map(|c| c.display().to_string()),
            },
        })
    }

    /// Answers one request line with one response line (`\n` included).
    pub fn handle_line(&mut self, line: &[u8]) -> Vec<u8> {
        let req = match serde_json::from_slice::<Request>(line) {
            Ok(req) => req,
            Err(e) => return protocol::encode_err(&format!("invalid request: {e}")),
        };
        let reply = match req {
            Request::Add { publish, backend } => self
                .add(Rule { publish, backend })
                .map(|r| protocol::encode_ok(&r)),
            Request::Del { publish } => self.del(publish).map(|r| protocol::encode_ok(&r)),
            Request::List => self.list().map(|r| protocol::encode_ok(&r)),
        };
        reply.unwrap_or_else(|e| {
            debug!("request failed: {e}");
            protocol::encode_err(&e.to_string())
        })
    }

    /// Makes the kernel's host addresses (what wildcard rules match) equal to `addrs`;
    /// logs once when this starts or stops failing.
    pub fn set_host_addrs(&mut self, addrs: BTreeSet<Ipv4Addr>) {
        if self.host_addrs.as_ref() == Some(&addrs) {
            return;
        }
        match self.kernel.sync_host_addrs(&addrs) {
            Ok(()) => {
                debug!("host addresses: {addrs:?}");
                if self.host_addrs_failing {
                    info!("host addresses updated again");
                }
                self.host_addrs_failing = false;
                self.host_addrs = Some(addrs);
            }
            Err(e) => {
                if !self.host_addrs_failing {
                    warn!("cannot update the host addresses: {e}");
                }
                self.host_addrs_failing = true;
                self.host_addrs = None;
            }
        }
    }
}

/// The daemon shared between connection tasks. The lock is never held across an await.
pub type Shared<K> = Arc<Mutex<Daemon<K>>>;

/// Locks, recovering from poisoning: every operation keeps the table consistent before
/// it can fail, so the state behind a poisoned lock is still good.
fn lock<K>(d: &Mutex<Daemon<K>>) -> MutexGuard<'_, Daemon<K>> {
    d.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Serves the control socket and refreshes the host addresses until `shutdown`
/// completes. Returns without touching the daemon's state.
pub async fn serve<K: Kernel + Send + 'static>(
    listener: UnixListener,
    daemon: Shared<K>,
    shutdown: impl Future<Output = ()>,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut refresh = tokio::time::interval(HOST_ADDR_REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = refresh.tick() => {
                let mut d = lock(&daemon);
                d.set_host_addrs(dataplane::local_ipv4_addrs());
                if let Err(e) = d.kernel.refresh_fast_path() {
                    debug!("cannot refresh the fast path's bridge ports: {e}");
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match limit.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let daemon = daemon.clone();
                        tokio::spawn(async move {
                            serve_connection(stream, &daemon).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        let _ = stream.try_write(&protocol::encode_err(
                            "too many connections to the daemon; try again",
                        ));
                    }
                },
                Err(e) => {
                    // E.g. out of file descriptors: wait instead of spinning.
                    warn!("cannot accept a control connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Reads one request (bounded in time and size), answers it, closes.
async fn serve_connection<K: Kernel>(mut stream: UnixStream, daemon: &Mutex<Daemon<K>>) {
    let reply = match tokio::time::timeout(CLIENT_TIMEOUT, read_request(&mut stream)).await {
        Err(_) => Some(protocol::encode_err(&format!(
            "no complete request within {} s",
            CLIENT_TIMEOUT.as_secs()
        ))),
        Ok(Err(ReadError::TooLarge)) => Some(protocol::encode_err(&format!(
            "request larger than {MAX_REQUEST} bytes"
        ))),
        Ok(Err(ReadError::Io(e))) => {
            debug!("control connection: {e}");
            None
        }
        // Connected and closed without a word: nothing to answer.
        Ok(Ok(None)) => None,
        Ok(Ok(Some(line))) => Some(lock(daemon).handle_line(&line)),
    };
    if let Some(reply) = reply {
        match tokio::time::timeout(CLIENT_TIMEOUT, stream.write_all(&reply)).await {
            Ok(Ok(())) => {
                let _ = stream.shutdown().await;
            }
            Ok(Err(e)) => debug!("cannot answer a control connection: {e}"),
            Err(_) => debug!("a control client did not read its answer"),
        }
    }
}

enum ReadError {
    TooLarge,
    Io(io::Error),
}

/// One line, without its `\n`. A request the client ended by closing its side (no
/// newline) is taken as is; the JSON parser judges it.
async fn read_request(stream: &mut UnixStream) -> Result<Option<Vec<u8>>, ReadError> {
    let mut buf = Vec::new();
    let mut reader = BufReader::new(stream.take(MAX_REQUEST as u64 + 1));
    reader
        .read_until(b'\n', &mut buf)
        .await
        .map_err(ReadError::Io)?;
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > MAX_REQUEST {
        return Err(ReadError::TooLarge);
    }
    Ok((!buf.is_empty()).then_some(buf))
}

/// Why the daemon could not start its control socket.
#[derive(Debug, Error)]
pub enum SocketError {
    #[error("cannot create the socket directory {}: {source}", dir.display())]
    Dir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open the lock file {}: {source}", path.display())]
    LockFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("another portfwd daemon is already running on {}", socket.display())]
    AlreadyRunning { socket: PathBuf },
    #[error("cannot lock {}: {source}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("{} exists and is not a socket: refusing to replace it", path.display())]
    NotASocket { path: PathBuf },
    #[error("cannot use the control socket {}: {source}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The daemon's claim on a control socket path: an exclusive `flock` on `<socket>.lock`,
/// held for the daemon's life, taken before anything is loaded. While it is held, any
/// socket file at the path is this daemon's or a stale one. Dropping it removes the
/// socket file (the lock file stays: removing it would race with a starting daemon).
pub struct SocketClaim {
    socket: PathBuf,
    _lock: Flock<File>,
}

impl SocketClaim {
    /// Creates the socket's directory (0755) if missing and takes the lock.
    pub fn acquire(socket: &Path) -> Result<Self, SocketError> {
        if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .map_err(|source| SocketError::Dir {
                    dir: dir.to_path_buf(),
                    source,
                })?;
        }
        let mut lock_path = socket.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock_path = PathBuf::from(lock_path);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|source| SocketError::LockFile {
                path: lock_path.clone(),
                source,
            })?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
            if errno == nix::Error::EWOULDBLOCK {
                SocketError::AlreadyRunning {
                    socket: socket.to_path_buf(),
                }
            } else {
                SocketError::Lock {
                    path: lock_path.clone(),
                    source: errno,
                }
            }
        })?;
        Ok(Self {
            socket: socket.to_path_buf(),
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.socket
    }

    /// Removes a stale socket and binds a fresh one, usable by root only (0600; created
    /// under umask 0177 so it is never briefly open to others). Call before the runtime
    /// starts threads: the umask is process-wide.
    pub fn bind(&self) -> Result<std::os::unix::net::UnixListener, SocketError> {
        let bind_err = |source| SocketError::Bind {
            path: self.socket.clone(),
            source,
        };
        match fs::symlink_metadata(&self.socket) {
            Ok(m) if m.file_type().is_socket() => {
                fs::remove_file(&self.socket).map_err(bind_err)?;
                info!("removed the stale socket {}", self.socket.display());
            }
            Ok(_) => {
                return Err(SocketError::NotASocket {
                    path: self.socket.clone(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind_err(e)),
        }
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
        let bound = std::os::unix::net::UnixListener::bind(&self.socket);
        nix::sys::stat::umask(old);
        let listener = bound.map_err(bind_err)?;
        fs::set_permissions(&self.socket, fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(listener)
    }
}

impl Drop for SocketClaim {
    fn drop(&mut self) {
        match fs::symlink_metadata(&self.socket) {
            Ok(m) if m.file_type().is_socket() => {
                if let Err(e) = fs::remove_file(&self.socket) {
                    warn!("cannot remove {}: {e}", self.socket.display());
                }
            }
            _ => {}
        }
    }
}

/// Whether IPv4 forwarding is off in this network namespace (`None`: cannot tell).
/// Without it the kernel drops translated packets to backends behind other interfaces.
pub fn ipv4_forwarding_disabled() -> Option<bool> {
    fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
        .ok()
        .map(|v| v.trim() == "0")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel that records what the daemon asked of it and can be told to fail.
    #[derive(Default)]
    struct FakeKernel {
        rules: BTreeMap<(Ipv4Addr, u16, u8), BackendV4>,
        reset: Vec<u32>,
        forgotten: Vec<((Ipv4Addr, u16), u8)>,
        fail_insert: bool,
        fail_remove: bool,
        held: Vec<Publish>,
    }

    fn fake_err() -> DataplaneError {
        DataplaneError::MissingMap("TEST")
    }

    impl Kernel for FakeKernel {
        fn insert_rule(&mut self, k: RuleKeyV4, b: BackendV4) -> Result<(), DataplaneError> {
            if self.fail_insert {
                return Err(fake_err());
            }
            self.rules.insert((k.addr(), k.port(), k.proto()), b);
            Ok(())
        }
        fn remove_rule(&mut self, k: &RuleKeyV4) -> Result<(), DataplaneError> {
            if self.fail_remove {
                return Err(fake_err());
            }
            self.rules.remove(&(k.addr(), k.port(), k.proto()));
            Ok(())
        }
        fn reset_rule_stats(&mut self, slot: u32) -> Result<(), DataplaneError> {
            self.reset.push(slot);
            Ok(())
        }
        fn rule_stats(&self, slot: u32) -> Result<RuleStats, DataplaneError> {
            Ok(RuleStats {
                packets: slot.into(),
                ..RuleStats::default()
            })
        }
        fn forget_flows_to(
            &mut self,
            backend: (Ipv4Addr, u16),
            proto: u8,
        ) -> Result<usize, DataplaneError> {
            self.forgotten.push((backend, proto));
            Ok(0)
        }
        fn reason_stats(&self) -> Result<Vec<(Reason, u64)>, DataplaneError> {
            Ok(Reason::ALL.iter().map(|&r| (r, r as u64)).collect())
        }
        fn attachments(&self) -> Vec<Attachment> {
            Vec::new()
        }
        fn sync_host_addrs(&mut self, _: &BTreeSet<Ipv4Addr>) -> Result<(), DataplaneError> {
            Ok(())
        }
        fn local_cgroup(&self) -> Option<PathBuf> {
            None
        }
        fn held_locally(&self, publish: &Publish) -> bool {
            self.held.contains(publish)
        }
    }

    fn rule(p: &str, b: &str) -> Rule {
        Rule {
            publish: p.parse().expect("valid publish"),
            backend: b.parse().expect("valid backend"),
        }
    }

    fn kernel_rules(d: &Daemon<FakeKernel>) -> Vec<String> {
        d.kernel()
            .rules
            .iter()
            .map(|((a, p, pr), b)| format!("{a}:{p}/{pr} -> {}:{}", b.addr(), b.port()))
            .collect()
    }

    #[test]
    fn add_refuses_a_port_a_local_process_holds() {
        let mut d = Daemon::new(FakeKernel {
            held: vec!["9000".parse().expect("publish")],
            ..FakeKernel::default()
        });
        let err = d.add(rule("9000", "198.18.1.2:8080")).expect_err("held");
        assert_eq!(
            err.to_string(),
            "cannot publish 0.0.0.0:9000/tcp: a local process already uses it (address already in use)"
        );
        assert!(kernel_rules(&d).is_empty() && d.table().is_empty());
        d.add(rule("9000/udp", "198.18.1.2:8080"))
            .expect("udp is free");
    }

    #[test]
    fn conflicts_follow_docker() {
        // (already published, then added, expected error or None)
        let table: &[(&[&str], &str, Option<&str>)] = &[
            (
                &["9000"],
                "9000",
                Some("Bind for 0.0.0.0:9000 failed: port is already allocated"),
            ),
            (
                &["9000"],
                "9000/tcp",
                Some("Bind for 0.0.0.0:9000 failed: port is already allocated"),
            ),
            (&["9000"], "9000/udp", None),
            (&["9000"], "9001", None),
            (
                &["9000"],
                "198.51.100.7:9000",
                Some("Bind for 198.51.100.7:9000 failed: port is already allocated"),
            ),
            (
                &["198.51.100.7:9000"],
                "9000",
                Some("Bind for 0.0.0.0:9000 failed: port is already allocated"),
            ),
            (
                &["198.51.100.7:9000"],
                "198.51.100.7:9000",
                Some("Bind for 198.51.100.7:9000 failed: port is already allocated"),
            ),
            (&["198.51.100.7:9000"], "198.51.100.8:9000", None),
            (&["198.51.100.7:9000"], "198.51.100.7:9000/udp", None),
            (
                &["198.51.100.7:9000", "198.51.100.8:9000"],
                "0.0.0.0:9000",
                Some("Bind for 0.0.0.0:9000 failed: port is already allocated"),
            ),
            (
                &["5353/udp"],
                "5353/udp",
                Some("Bind for 0.0.0.0:5353 failed: port is already allocated"),
            ),
        ];
        for &(existing, new, want) in table {
            let mut d = Daemon::new(FakeKernel::default());
            for p in existing {
                d.add(rule(p, "172.17.0.2:8080")).expect("setup");
            }
            let before = kernel_rules(&d);
            let got = d
                .add(rule(new, "172.17.0.3:8081"))
                .err()
                .map(|e| e.to_string());
            assert_eq!(got.as_deref(), want, "{existing:?} then {new}");
            if want.is_some() {
                assert_eq!(kernel_rules(&d), before, "existing rule untouched");
                assert_eq!(d.table().len(), existing.len());
            }
        }
    }

    #[test]
    fn same_backend_on_two_ports_and_flow_forgetting() {
        let mut d = Daemon::new(FakeKernel::default());
        d.add(rule("9000", "172.17.0.2:8080")).expect("first");
        d.add(rule("9001", "172.17.0.2:8080"))
            .expect("same backend, other port");
        d.add(rule("9000/udp", "172.17.0.2:8080"))
            .expect("same backend, udp");
        assert_eq!(d.kernel().rules.len(), 3);

        // Another TCP rule still uses the backend: its flows stay.
        d.del("9000".parse().expect("valid")).expect("del");
        assert!(d.kernel().forgotten.is_empty());
        // The last TCP rule to it: TCP flows go, UDP ones are another matter.
        d.del("9001".parse().expect("valid")).expect("del");
        let be = (Ipv4Addr::new(172, 17, 0, 2), 8080);
        assert_eq!(d.kernel().forgotten, vec![(be, 6)]);
        d.del("9000/udp".parse().expect("valid")).expect("del");
        assert_eq!(d.kernel().forgotten, vec![(be, 6), (be, 17)]);
        assert!(d.kernel().rules.is_empty());
        assert!(d.table().is_empty());
    }

    #[test]
    fn del_of_unpublished() {
        let mut d = Daemon::new(FakeKernel::default());
        d.add(rule("198.51.100.7:9000", "172.17.0.2:8080"))
            .expect("add");
        for (spec, want) in [
            ("9000", "No published port 0.0.0.0:9000/tcp"),
            ("9000/udp", "No published port 0.0.0.0:9000/udp"),
            (
                "198.51.100.8:9000",
                "No published port 198.51.100.8:9000/tcp",
            ),
        ] {
            let err = d.del(spec.parse().expect("valid")).expect_err(spec);
            assert_eq!(err.to_string(), want);
        }
        assert_eq!(d.kernel().rules.len(), 1);
        d.del("198.51.100.7:9000".parse().expect("valid"))
            .expect("del");
    }

    #[test]
    fn kernel_failures_change_nothing() {
        let mut d = Daemon::new(FakeKernel::default());
        d.add(rule("9000", "172.17.0.2:8080")).expect("add");
        d.kernel.fail_insert = true;
        let err = d
            .add(rule("9001", "172.17.0.2:8080"))
            .expect_err("insert fails");
        assert!(
            err.to_string()
                .starts_with("cannot publish 0.0.0.0:9001/tcp: "),
            "{err}"
        );
        assert_eq!(d.table().len(), 1);
        d.kernel.fail_insert = false;
        d.kernel.fail_remove = true;
        d.del("9000".parse().expect("valid"))
            .expect_err("remove fails");
        assert_eq!(d.table().len(), 1);
        assert_eq!(d.kernel().rules.len(), 1);
        d.kernel.fail_remove = false;
        d.del("9000".parse().expect("valid")).expect("del");
    }

    #[test]
    fn slots_are_reset_and_reused_last() {
        let mut d = Daemon::new(FakeKernel::default());
        d.add(rule("1", "10.0.0.1:1")).expect("add");
        d.add(rule("2", "10.0.0.1:1")).expect("add");
        d.del("1".parse().expect("valid")).expect("del");
        d.add(rule("3", "10.0.0.1:1")).expect("add");
        assert_eq!(d.kernel().reset, vec![0, 1, 2]);
        let slots: Vec<u32> = d.table().iter().map(|(_, e)| e.stats_slot).collect();
        assert_eq!(slots, vec![1, 2]);

        let mut a = SlotAllocator::default();
        for i in 0..MAX_STATS_SLOTS {
            assert_eq!(a.alloc(), Some(i));
        }
        assert_eq!(a.alloc(), None);
        a.release(7);
        a.release(3);
        assert_eq!((a.alloc(), a.alloc(), a.alloc()), (Some(7), Some(3), None));
    }

    #[test]
    fn handle_line_never_fails() {
        let mut d = Daemon::new(FakeKernel::default());
        let ok = |r: Vec<u8>| -> serde_json::Value {
            serde_json::from_slice(&r).expect("response is JSON")
        };
        let add = br#"{"cmd":"add","publish":{"host_port":9000},"backend":{"ip":"172.17.0.2","port":8080}}"#;
        assert_eq!(ok(d.handle_line(add))["ok"], true);
        let again = ok(d.handle_line(add));
        assert_eq!(again["ok"], false);
        assert_eq!(
            again["error"],
            "Bind for 0.0.0.0:9000 failed: port is already allocated"
        );
        for garbage in [
            &b""[..],
            b"\xff\xfe",
            b"{",
            b"null",
            b"{\"cmd\":\"add\"}",
            b"{\"cmd\":\"nope\"}",
            b"{\"cmd\":\"del\",\"publish\":{\"host_port\":0}}",
        ] {
            let r = ok(d.handle_line(garbage));
            assert_eq!(r["ok"], false, "{garbage:?}");
            let msg = r["error"].as_str().expect("error is a string");
            assert!(
                msg.starts_with("invalid request: ") && !msg.contains('\n'),
                "{msg}"
            );
        }
        let list = ok(d.handle_line(br#"{"cmd":"list"}"#));
        assert_eq!(list["ok"], true);
        assert_eq!(list["rules"][0]["host_port"], 9000);
        assert_eq!(list["rules"][0]["backend_ip"], "172.17.0.2");
        assert_eq!(list["reasons"]["translated"], 0);
        assert_eq!(list["reasons"]["drop_checksum"], 10);
        let del = ok(d.handle_line(br#"{"cmd":"del","publish":{"host_port":9000}}"#));
        assert_eq!(del["ok"], true);
        let del = ok(d.handle_line(br#"{"cmd":"del","publish":{"host_port":9000}}"#));
        assert_eq!(del["error"], "No published port 0.0.0.0:9000/tcp");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn server_survives_bad_clients() {
        use tokio::io::AsyncReadExt as _;
        let dir = std::env::temp_dir().join(format!("pfd-test-{}", std::process::id()));
        let sock = dir.join("s.sock");
        let claim = SocketClaim::acquire(&sock).expect("claim");
        assert!(matches!(
            SocketClaim::acquire(&sock),
            Err(SocketError::AlreadyRunning { .. })
        ));
        let listener = UnixListener::from_std(claim.bind().expect("bind")).expect("tokio");
        let mode = fs::metadata(&sock).expect("socket").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let daemon: Shared<FakeKernel> = Arc::new(Mutex::new(Daemon::new(FakeKernel::default())));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, daemon.clone(), async {
            let _ = stopped.await;
        }));

        async fn exchange(sock: &Path, send: &[u8], close_write: bool) -> String {
            let mut s = UnixStream::connect(sock).await.expect("connect");
            // The daemon may answer and close before a large request is fully sent.
            let _ = s.write_all(send).await;
            if close_write {
                let _ = s.shutdown().await;
            }
            // Read what arrived even if the connection was then reset (the daemon closes
            // with the rest of an oversized request unread).
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out).await;
            String::from_utf8_lossy(&out).into_owned()
        }
        let add = b"{\"cmd\":\"add\",\"publish\":{\"host_port\":9000},\"backend\":{\"ip\":\"10.0.0.2\",\"port\":80}}\n";
        assert!(exchange(&sock, add, false)
            .await
            .starts_with("{\"ok\":true"));
        let huge = vec![b'x'; MAX_REQUEST + 10];
        let r = exchange(&sock, &huge, false).await;
        assert!(r.contains("request larger than 65536 bytes"), "{r}");
        let r = exchange(&sock, b"garbage\n", false).await;
        assert!(r.contains("invalid request"), "{r}");
        let r = exchange(&sock, b"{\"cmd\":", true).await;
        assert!(r.contains("invalid request"), "{r}");
        assert_eq!(exchange(&sock, b"", true).await, "");
        // Still serving, and the rule is still there.
        let r = exchange(&sock, b"{\"cmd\":\"list\"}\n", false).await;
        assert!(r.contains("\"host_port\":9000"), "{r}");

        let _ = stop.send(());
        server.await.expect("server task");
        drop(claim);
        assert!(!sock.exists(), "socket removed");
        let _ = fs::remove_dir_all(&dir);
    }
}
