//! The dataplane's pinned state in bpffs, which outlives the daemon: a crash, a restart
//! or an upgrade leaves the programs attached and the maps (rules, flows, counters)
//! in place, and the next daemon adopts them.
//!
//! Layout of a pin directory (default [`DEFAULT_PIN_DIR`]):
//! - `maps-v<LAYOUT_VERSION>/<MAP NAME>`: every map the programs share (see
//!   [`crate::dataplane::pinned_maps`]). The version in the directory's name is the
//!   layout of the maps' keys and values: a binary with another layout refuses to
//!   start over it rather than mix layouts, and each pinned map's type and key and
//!   value sizes are checked against this binary's object too.
//! - `links/<IFACE>@<HOOK>` (bpffs refuses `.` in names: an interface's dots are
//!   written `:`, which interface names cannot hold; hooks: `xdp`, `xdp-generic`, `tc-ingress`, `tc-egress`,
//!   `nat64-entry`) and `links/cgroup@<PROGRAM>`: the BPF links that attach the
//!   programs. A link pinned here stays attached until its pin is removed; a new
//!   daemon swaps the program behind it in one `BPF_LINK_UPDATE`, so no packet finds
//!   the hook empty.
//!
//! One daemon at a time owns a pin directory: it holds an exclusive `flock` on it.
//! `portfwd --cleanup` takes the same lock and removes the directory, which detaches
//! every link and frees every map (the kernel frees an object with its last reference).

use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use thiserror::Error;

/// Where the state is pinned unless `--pin-dir` says otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/portfwd";

/// The layout of the pinned maps' keys and values. Bump it with every change to a
/// pinned map's key or value type (or its meaning): a daemon refuses to adopt maps of
/// another layout. 2: the embryonic flow tables (`EMBRYONIC_*`; `CONNTRACK_*` now holds
/// established flows only) and the `flow_promoted` counter. 3: NAT64's failures split
/// into their own reasons (`REASON_STATS` grew). 4: NAT64 replies keep the client's FIN
/// (`Nat64Reply` grew) and `nat64_port_reclaimed_early`.
pub const LAYOUT_VERSION: u32 = 4;

/// bpffs's `f_type` (`BPF_FS_MAGIC`, include/uapi/linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Why the pin directory cannot be used.
#[derive(Debug, Error)]
pub enum PinError {
    /// The directory cannot be created or read.
    #[error("pin directory {path}")]
    Io {
        /// The directory.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The directory is not on a BPF file system.
    #[error("pin directory {path} is not on a BPF file system (mount -t bpf bpf /sys/fs/bpf)")]
    NotBpffs {
        /// The directory.
        path: String,
    },
    /// Another daemon holds the directory.
    #[error("pin directory {path} is in use by another portfwd daemon")]
    InUse {
        /// The directory.
        path: String,
    },
    /// The pinned maps are of another layout version.
    #[error(
        "pinned maps in {path} have layout version {found}, this binary has {LAYOUT_VERSION}: \
         start the binary that pinned them, or run `portfwd --cleanup --pin-dir {path}` \
         (stops forwarding and drops every flow)"
    )]
    OtherVersion {
        /// The directory.
        path: String,
        /// The version found.
        found: String,
    },
    /// A pinned map's type or sizes differ from this binary's.
    #[error(
        "pinned map {name} in {path} has {what} {found}, this binary {expected}: start the \
         binary that pinned it, or run `portfwd --cleanup --pin-dir {path}` (stops forwarding \
         and drops every flow)"
    )]
    Layout {
        /// The directory.
        path: String,
        /// The map.
        name: String,
        /// `type`, `key size` or `value size`.
        what: &'static str,
        /// The pinned map's.
        found: u32,
        /// This binary's.
        expected: u32,
    },
    /// A pinned flow table holds another number of flows than asked for.
    #[error(
        "pinned flow table {name} in {path} holds {found} flows, --max-flows asks for \
         {requested}: start with --max-flows {found}, or run `portfwd --cleanup --pin-dir \
         {path}` first (stops forwarding and drops every flow)"
    )]
    Capacity {
        /// The directory.
        path: String,
        /// The map.
        name: String,
        /// The pinned map's `max_entries`.
        found: u32,
        /// `--max-flows`.
        requested: u32,
    },
    /// A pinned map cannot be read.
    #[error("cannot read the pinned map {path}")]
    Map {
        /// The pin.
        path: String,
        /// Why.
        #[source]
        source: aya::maps::MapError,
    },
}

/// A pin directory, owned (locked) by this process until dropped.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
    /// The lock: an open descriptor of the directory with an exclusive `flock`.
    _lock: File,
}

impl PinDir {
    /// Creates (if needed) and locks `path`, which must be on bpffs.
    pub fn open(path: &Path) -> Result<Self, PinError> {
        let io_err = |source| PinError::Io {
            path: path.display().to_string(),
            source,
        };
        std::fs::create_dir_all(path.join("links")).map_err(io_err)?;
        if !is_bpffs(path).map_err(io_err)? {
            return Err(PinError::NotBpffs {
                path: path.display().to_string(),
            });
        }
        let lock = lock_dir(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            _lock: lock,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where this binary's maps are pinned (the directory holds the layout version).
    pub fn maps_dir(&self) -> PathBuf {
        self.path.join(format!("maps-v{LAYOUT_VERSION}"))
    }

    /// Where a link is pinned: `links/<owner>@<hook>`.
    pub fn link_path(&self, owner: &str, hook: &str) -> PathBuf {
        let owner = owner.replace('.', ":");
        self.path.join("links").join(format!("{owner}@{hook}"))
    }

    /// Every pinned link as (owner, hook, path).
    pub fn links(&self) -> Result<Vec<(String, String, PathBuf)>, PinError> {
        let dir = self.path.join("links");
        let io_err = |source| PinError::Io {
            path: dir.display().to_string(),
            source,
        };
        let mut links = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(io_err)? {
            let e = e.map_err(io_err)?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some((owner, hook)) = name.rsplit_once('@') {
                links.push((owner.replace(':', "."), hook.to_string(), e.path()));
            }
        }
        links.sort();
        Ok(links)
    }

    /// Refuses maps pinned by a binary of another layout: another `maps-v*` directory
    /// holding pins, or a pinned map whose type or sizes differ from `expected` (name,
    /// type, key size, value size).
    pub fn check_layout(&self, expected: &[(String, u32, u32, u32)]) -> Result<(), PinError> {
        let io_err = |source| PinError::Io {
            path: self.path.display().to_string(),
            source,
        };
        let ours = format!("maps-v{LAYOUT_VERSION}");
        for e in std::fs::read_dir(&self.path).map_err(io_err)? {
            let name = e
                .map_err(io_err)?
                .file_name()
                .to_string_lossy()
                .into_owned();
            if let Some(v) = name.strip_prefix("maps-v") {
                let empty = std::fs::read_dir(self.path.join(&name))
                    .map(|mut d| d.next().is_none())
                    .unwrap_or(false);
                if name != ours && !empty {
                    return Err(PinError::OtherVersion {
                        path: self.path.display().to_string(),
                        found: v.to_string(),
                    });
                }
            }
        }
        for (name, map_type, key, value) in expected {
            let pin = self.maps_dir().join(name);
            if !pin.exists() {
                continue;
            }
            let info = aya::maps::MapInfo::from_pin(&pin).map_err(|source| PinError::Map {
                path: pin.display().to_string(),
                source,
            })?;
            let found_type = map_type_number(&info);
            for (what, found, expected) in [
                ("type", found_type, *map_type),
                ("key size", info.key_size(), *key),
                ("value size", info.value_size(), *value),
            ] {
                if found != expected {
                    return Err(PinError::Layout {
                        path: self.path.display().to_string(),
                        name: name.clone(),
                        what,
                        found,
                        expected,
                    });
                }
            }
        }
        Ok(())
    }

    /// Refuses pinned maps among `names` whose capacity (`max_entries`) is not
    /// `requested`: a map cannot be resized, and tables of two sizes must not mix.
    pub fn check_capacity(&self, names: &[&str], requested: u32) -> Result<(), PinError> {
        for name in names {
            let pin = self.maps_dir().join(name);
            if !pin.exists() {
                continue;
            }
            let info = aya::maps::MapInfo::from_pin(&pin).map_err(|source| PinError::Map {
                path: pin.display().to_string(),
                source,
            })?;
            if info.max_entries() != requested {
                return Err(PinError::Capacity {
                    path: self.path.display().to_string(),
                    name: name.to_string(),
                    found: info.max_entries(),
                    requested,
                });
            }
        }
        Ok(())
    }
}

/// The kernel's number for a map's type (`bpf_map_type`).
fn map_type_number(info: &aya::maps::MapInfo) -> u32 {
    // aya's `MapType` is `bpf_map_type` with the kernel's numbers; an unknown type
    // counts as none.
    info.map_type().map(|t| t as u32).unwrap_or(u32::MAX)
}

/// Whether `path` is on bpffs.
fn is_bpffs(path: &Path) -> io::Result<bool> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `statfs` is plain old data, zero is a valid value for it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` writable memory of the right type.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // `f_type`'s width varies by architecture.
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Opens `path` and takes an exclusive, non-blocking `flock` on it.
fn lock_dir(path: &Path) -> Result<File, PinError> {
    let dir = File::open(path).map_err(|source| PinError::Io {
        path: path.display().to_string(),
        source,
    })?;
    // SAFETY: a valid descriptor owned by `dir`.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(PinError::InUse {
                path: path.display().to_string(),
            });
        }
        return Err(PinError::Io {
            path: path.display().to_string(),
            source: e,
        });
    }
    Ok(dir)
}

/// Removes the pinned state at `path` (links first, so every program is detached before
/// its maps go); refuses while a daemon holds it. Returns whether there was anything.
pub fn cleanup(path: &Path) -> Result<bool, PinError> {
    if !path.exists() {
        return Ok(false);
    }
    let lock = lock_dir(path)?;
    let io_err = |source| PinError::Io {
        path: path.display().to_string(),
        source,
    };
    let links = path.join("links");
    if links.exists() {
        std::fs::remove_dir_all(&links).map_err(io_err)?;
    }
    drop(lock);
    std::fs::remove_dir_all(path).map_err(io_err)?;
    Ok(true)
}

/// `bpf_attr` for `BPF_OBJ_GET` (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `bpf_attr` for `BPF_LINK_UPDATE`.
#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

// `enum bpf_cmd`, from aya's bindings of include/uapi/linux/bpf.h.
const BPF_OBJ_GET: libc::c_long = aya_obj::generated::bpf_cmd::BPF_OBJ_GET as libc::c_long;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long =
    aya_obj::generated::bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_long;
const BPF_LINK_UPDATE: libc::c_long = aya_obj::generated::bpf_cmd::BPF_LINK_UPDATE as libc::c_long;

/// Opens a pinned object (a link) at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid `bpf_attr` prefix for BPF_OBJ_GET of the size given,
    // and `c` outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjGetAttr,
            std::mem::size_of::<ObjGetAttr>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Replaces the program behind the link `link` with `prog`, atomically
/// (`BPF_LINK_UPDATE`, 5.7+; XDP 5.9+, TCX 6.6+): the hook is never empty.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid `bpf_attr` prefix for BPF_LINK_UPDATE of the size given;
    // both descriptors are borrowed for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &attr as *const LinkUpdateAttr,
            std::mem::size_of::<LinkUpdateAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The start of a link's `struct bpf_link_info` (`BPF_OBJ_GET_INFO_BY_FD`) as 32-bit
/// words: `[0]` type, `[1]` link id, `[2]` program id, then the type's union from `[4]`
/// (a cgroup link's cgroup id in `[4..6]`).
pub fn link_info(link: BorrowedFd<'_>) -> io::Result<[u32; 32]> {
    #[repr(C)]
    #[derive(Default)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut info = [0u32; 32];
    let attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: `attr` points to `info`, writable for `info_len` bytes, for the call; the
    // descriptor is borrowed for it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &attr as *const InfoAttr,
            std::mem::size_of::<InfoAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

/// The (link id, program id) of the link pinned at `path`: a link update keeps the
/// first and changes the second.
pub fn pinned_link_ids(path: &Path) -> io::Result<(u32, u32)> {
    let fd = obj_get(path)?;
    let info = link_info(fd.as_fd())?;
    Ok((info[1], info[2]))
}
