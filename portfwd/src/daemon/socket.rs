//! The daemon's claim on its control socket path: an exclusive lock taken before
//! anything is loaded (so a second daemon on the same path refuses without touching the
//! first one's interfaces), and the socket itself, bound for root only; then who may use
//! it ([`SocketAccess`]): root, and the groups of `--socket-group` (full access) and
//! `--socket-read-group` (read-only), decided per connection from the peer's credentials
//! as the kernel recorded them at `connect` ([`Peer`]: SO_PEERCRED and SO_PEERGROUPS).

use std::{
    fs::{self, File, OpenOptions},
    io,
    os::{
        fd::AsRawFd,
        unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt, PermissionsExt},
    },
    path::{Path, PathBuf},
};

use log::{info, warn};
use nix::fcntl::{Flock, FlockArg};
use thiserror::Error;

/// Why the daemon could not start its control socket.
#[derive(Debug, Error)]
pub enum SocketError {
    /// The socket's directory cannot be created.
    #[error("cannot create the socket directory {}", dir.display())]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The lock file cannot be opened.
    #[error("cannot open the lock file {}", path.display())]
    LockFile {
        /// The lock file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Another daemon holds the lock.
    #[error("another portfwd daemon is already running on {}", socket.display())]
    AlreadyRunning {
        /// The socket path.
        socket: PathBuf,
    },
    /// The lock cannot be taken (for another reason than another daemon holding it).
    #[error("cannot lock {}", path.display())]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// Something other than a socket is at the path.
    #[error("{} exists and is not a socket: refusing to replace it", path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// A `--socket-group` or `--socket-read-group` that is neither a group name nor a
    /// number.
    #[error("unknown group `{name}` (give a group name from the group database, or a gid)")]
    UnknownGroup {
        /// What was given.
        name: String,
    },
    /// The socket cannot be bound or set up.
    #[error("cannot use the control socket {}", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
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

    /// The socket path.
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

/// A group given to `--socket-group` or `--socket-read-group`: as given (for messages)
/// and its gid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketGroup {
    /// The name or number as given.
    pub name: String,
    /// The gid.
    pub gid: u32,
}

impl SocketGroup {
    /// A group name from the group database (NSS), or else a number, as `chown` takes
    /// them.
    pub fn resolve(name: &str) -> Result<Self, SocketError> {
        let unknown = || SocketError::UnknownGroup {
            name: name.to_string(),
        };
        let gid = match nix::unistd::Group::from_name(name) {
            Ok(Some(g)) => g.gid.as_raw(),
            _ => name.parse::<u32>().map_err(|_| unknown())?,
        };
        Ok(Self {
            name: name.to_string(),
            gid,
        })
    }
}

impl std::fmt::Display for SocketGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "group {}", self.name)
    }
}

/// What a peer may do on the control socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Every request (root, `--socket-group`).
    Full,
    /// Requests that change nothing (`--socket-read-group`).
    Read,
    /// Nothing: the connection gets one refusal line.
    Refused,
}

/// The credentials of a control socket's peer, as the kernel recorded them when the
/// peer connected: its effective uid and gid (SO_PEERCRED) and its supplementary groups
/// (SO_PEERGROUPS, Linux 4.13). Taken from the socket, not from `/proc/PID/status` (the
/// pid may be gone and reused by the time it is read, and a process may have changed
/// its groups since) nor from the group database (`getgrouplist`: a process that dropped
/// its groups, as `setpriv --clear-groups` does, would still count as a member): these
/// are exactly the credentials the kernel checked against the socket file's mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
    /// Process id, in the daemon's pid namespace (0 when the peer's is not visible).
    pub pid: i32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

impl Peer {
    /// The credentials of `socket`'s peer.
    pub fn of(socket: &impl AsRawFd) -> io::Result<Self> {
        let fd = socket.as_raw_fd();
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: `cred` is a valid, writable ucred and `len` its size, as SO_PEERCRED
        // expects.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut groups: Vec<libc::gid_t> = vec![0; 32];
        loop {
            let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
            // SAFETY: `groups` has room for `len` bytes; the kernel writes at most that
            // and sets `len` to what it wrote, or to what it needs with ERANGE.
            let r = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_PEERGROUPS,
                    groups.as_mut_ptr().cast(),
                    &mut len,
                )
            };
            let n = len as usize / std::mem::size_of::<libc::gid_t>();
            if r == 0 {
                groups.truncate(n);
                break;
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ERANGE) && n > groups.len() {
                groups.resize(n, 0);
            } else {
                return Err(e);
            }
        }
        Ok(Self {
            uid: cred.uid,
            gid: cred.gid,
            pid: cred.pid,
            groups,
        })
    }

    /// Whether the peer is in group `gid` (effective or supplementary).
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "uid {} gid {} (pid {})", self.uid, self.gid, self.pid)
    }
}

/// Who may use the control socket: root always; `full` (`--socket-group`) for every
/// request; `read` (`--socket-read-group`) for requests that change nothing. The socket
/// file follows: `0600 root` with no group, `0660` owned by the one group given, and
/// `0666` when both are given (a file has one group: the daemon's check is then the only
/// guard, as it is the decisive one in every case).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SocketAccess {
    /// Full access.
    pub full: Option<SocketGroup>,
    /// Read-only access.
    pub read: Option<SocketGroup>,
}

impl SocketAccess {
    /// What `peer` may do. A peer in both groups has full access.
    pub fn grant(&self, peer: &Peer) -> Access {
        let member = |g: &Option<SocketGroup>| g.as_ref().is_some_and(|g| peer.in_group(g.gid));
        if peer.uid == 0 || member(&self.full) {
            Access::Full
        } else if member(&self.read) {
            Access::Read
        } else {
            Access::Refused
        }
    }

    /// Who is admitted, in words: `root only`, `root and group G`, ...
    pub fn admitted(&self) -> String {
        match (&self.full, &self.read) {
            (None, None) => "root only".to_string(),
            (Some(f), None) => format!("root and {f}"),
            (None, Some(r)) => format!("root and {r} (read-only)"),
            (Some(f), Some(r)) => format!("root, {f} and {r} (read-only)"),
        }
    }

    /// The one line a refused peer gets.
    pub fn refusal(&self) -> String {
        format!(
            "permission denied: portfwd's control socket accepts {}",
            self.admitted()
        )
    }

    /// The one line a read-only peer gets for a request that would change something.
    pub fn read_only_refusal(&self) -> String {
        let read = self
            .read
            .as_ref()
            .map_or_else(|| "this peer".to_string(), ToString::to_string);
        let changes = match &self.full {
            Some(f) => format!("root or {f}"),
            None => "root".to_string(),
        };
        format!("permission denied: {read} may only read (list); changes need {changes}")
    }

    /// Gives the socket file at `path` (bound 0600 by [`SocketClaim::bind`]) the group
    /// and mode that let the groups connect: only ever widens a root-only socket.
    pub fn apply_to(&self, path: &Path) -> Result<(), SocketError> {
        let err = |source| SocketError::Bind {
            path: path.to_path_buf(),
            source,
        };
        let mode = match (&self.full, &self.read) {
            (None, None) => return Ok(()),
            (Some(g), None) | (None, Some(g)) => {
                std::os::unix::fs::lchown(path, None, Some(g.gid)).map_err(err)?;
                0o660
            }
            (Some(_), Some(_)) => 0o666,
        };
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(name: &str, gid: u32) -> Option<SocketGroup> {
        Some(SocketGroup {
            name: name.to_string(),
            gid,
        })
    }

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer {
            uid,
            gid,
            pid: 1,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn peer_credentials_are_the_connecting_process() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let p = Peer::of(&a).expect("credentials");
        assert_eq!(p.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(p.gid, nix::unistd::getegid().as_raw());
        assert_eq!(p.pid, std::process::id() as i32);
        let mut want: Vec<u32> = nix::unistd::getgroups()
            .expect("getgroups")
            .iter()
            .map(|g| g.as_raw())
            .collect();
        let mut got = p.groups.clone();
        want.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, want);
    }

    #[test]
    fn access_by_uid_primary_and_supplementary_groups() {
        let none = SocketAccess::default();
        let both = SocketAccess {
            full: group("pfadm", 5000),
            read: group("pfmon", 5001),
        };
        assert_eq!(none.grant(&peer(0, 0, &[])), Access::Full);
        assert_eq!(none.grant(&peer(1000, 5000, &[5000])), Access::Refused);
        assert_eq!(both.grant(&peer(0, 0, &[])), Access::Full);
        assert_eq!(both.grant(&peer(1000, 5000, &[])), Access::Full);
        assert_eq!(both.grant(&peer(1000, 100, &[7, 5000])), Access::Full);
        assert_eq!(both.grant(&peer(1000, 5001, &[])), Access::Read);
        assert_eq!(both.grant(&peer(1000, 100, &[5001])), Access::Read);
        assert_eq!(both.grant(&peer(1000, 5001, &[5000])), Access::Full);
        assert_eq!(both.grant(&peer(1000, 100, &[5002])), Access::Refused);
    }

    #[test]
    fn refusals_name_who_is_admitted() {
        let mut a = SocketAccess::default();
        assert_eq!(
            a.refusal(),
            "permission denied: portfwd's control socket accepts root only"
        );
        a.full = group("pfadm", 5000);
        assert_eq!(
            a.refusal(),
            "permission denied: portfwd's control socket accepts root and group pfadm"
        );
        a.read = group("pfmon", 5001);
        assert_eq!(
            a.refusal(),
            "permission denied: portfwd's control socket accepts root, group pfadm and \
             group pfmon (read-only)"
        );
        assert_eq!(
            a.read_only_refusal(),
            "permission denied: group pfmon may only read (list); changes need root or \
             group pfadm"
        );
        a.full = None;
        assert_eq!(
            a.read_only_refusal(),
            "permission denied: group pfmon may only read (list); changes need root"
        );
    }

    #[test]
    fn groups_by_name_or_number() {
        assert_eq!(SocketGroup::resolve("root").expect("root").gid, 0);
        assert_eq!(SocketGroup::resolve("61234").expect("number").gid, 61234);
        let e = SocketGroup::resolve("no-such-group-pf").expect_err("unknown");
        assert_eq!(
            e.to_string(),
            "unknown group `no-such-group-pf` (give a group name from the group database, \
             or a gid)"
        );
    }
}
