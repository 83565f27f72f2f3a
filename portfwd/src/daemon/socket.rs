//! The daemon's claim on its control socket path: an exclusive lock taken before
//! anything is loaded (so a second daemon on the same path refuses without touching the
//! first one's interfaces), and the socket itself, bound for root only.

use std::{
    fs::{self, File, OpenOptions},
    io,
    os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt, PermissionsExt},
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
