//! The daemon's rule table on disk, so that a new daemon adopting the pinned maps (see
//! [`crate::pin`]) gets back what the maps alone cannot say: each rule as declared (a
//! range is one rule), its source, its owner (a runtime plugin's rule) and its counter slot.
//!
//! One small versioned JSON file next to the control socket (`portfwd.sock` →
//! `portfwd.state.json`), rewritten atomically (a temporary file renamed over it) after
//! every committed change. The maps stay the truth of what is forwarded: on adoption the
//! daemon makes them equal to the file's rules and logs any difference.

use std::{
    io::{self, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{
    daemon::Entry,
    pin::LAYOUT_VERSION,
    protocol::{Owner, Source},
    rule::{Backend, Publish},
};

/// The file format's version.
pub const STATE_VERSION: u32 = 1;

/// Why the state file cannot be used.
#[derive(Debug, Error)]
pub enum StateError {
    /// It cannot be read or written.
    #[error("state file {path}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// It is not a state file of this version.
    #[error("state file {path} is not valid: {why} (portfwd --cleanup removes it)")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
}

/// The file's content.
#[derive(Debug, Serialize, Deserialize)]
pub struct SavedState {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// The maps' [`LAYOUT_VERSION`] when written.
    pub layout: u32,
    /// Every rule.
    pub rules: Vec<SavedRule>,
}

/// One rule.
#[derive(Debug, Serialize, Deserialize)]
pub struct SavedRule {
    /// As [`Publish`] writes it (`*:9000-9009/tcp`).
    pub publish: String,
    /// As [`Backend`] writes it.
    pub backend: String,
    /// Its counter slot.
    pub stats_slot: u32,
    /// Who published it.
    pub source: Source,
    /// The plugin it belongs to, if any (`docker:…`, `cni:…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
    /// A runtime's reservation (its local binds are let through).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reservation: bool,
}

/// A saved rule as the daemon takes it back: what is published, its entry, its owner.
pub type Adopted = (Publish, Entry, Option<Owner>);

/// The state file of the daemon serving `socket`.
pub fn path_for(socket: &Path) -> PathBuf {
    socket.with_extension("state.json")
}

/// The rules of a table (with their owners), to save.
pub fn from_rules<'a>(
    rules: impl Iterator<Item = (&'a Publish, &'a Entry, Option<&'a Owner>)>,
) -> SavedState {
    SavedState {
        version: STATE_VERSION,
        layout: LAYOUT_VERSION,
        rules: rules
            .map(|(p, e, owner)| SavedRule {
                publish: p.to_string(),
                backend: e.backend.to_string(),
                stats_slot: e.stats_slot,
                source: e.source,
                owner: owner.cloned(),
                reservation: e.reservation,
            })
            .collect(),
    }
}

/// Reads the rules saved at `path`; `None` when there is no file.
pub fn load(path: &Path) -> Result<Option<Vec<Adopted>>, StateError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateError::Io {
                path: path.display().to_string(),
                source,
            })
        }
    };
    let invalid = |why: String| StateError::Invalid {
        path: path.display().to_string(),
        why,
    };
    let saved: SavedState = serde_json::from_slice(&text).map_err(|e| invalid(e.to_string()))?;
    if saved.version != STATE_VERSION || saved.layout != LAYOUT_VERSION {
        return Err(invalid(format!(
            "version {} of layout {}, this binary reads version {STATE_VERSION} of layout \
             {LAYOUT_VERSION}",
            saved.version, saved.layout
        )));
    }
    saved
        .rules
        .iter()
        .map(|r| {
            let publish: Publish = r
                .publish
                .parse()
                .map_err(|e| invalid(format!("rule `{}`: {e}", r.publish)))?;
            let backend: Backend = r
                .backend
                .parse()
                .map_err(|e| invalid(format!("backend `{}`: {e}", r.backend)))?;
            Ok((
                publish,
                Entry {
                    backend,
                    stats_slot: r.stats_slot,
                    source: r.source,
                    reservation: r.reservation,
                },
                r.owner.clone(),
            ))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// Writes `state` to `path` atomically: a temporary file in the same directory, synced,
/// renamed over it.
pub fn save(path: &Path, state: &SavedState) -> Result<(), StateError> {
    let io_err = |source| StateError::Io {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(state).map_err(|e| io_err(io::Error::other(e)))?;
    // Root's only, as the socket is: the table says which traffic goes where.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err)?;
    f.write_all(&text).map_err(io_err)?;
    f.sync_all().map_err(io_err)?;
    std::fs::rename(&tmp, path).map_err(io_err)
}

/// Removes the state file; whether there was one.
pub fn remove(path: &Path) -> Result<bool, StateError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(StateError::Io {
            path: path.display().to_string(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_survive_a_save_and_load() {
        let dir = std::env::temp_dir().join(format!("portfwd-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("portfwd.state.json");
        let owner = |o: &str| Some(o.parse::<Owner>().expect("owner"));
        let rules: Vec<Adopted> = [
            (
                "*:9000-9009/tcp",
                "10.0.0.2:8000-8009",
                3,
                Source::File,
                None,
                false,
            ),
            (
                "127.0.0.1:53/udp",
                "[2001:db8::2]:53",
                0,
                Source::Cli,
                None,
                false,
            ),
            (
                "[::]:8443/tcp",
                "10.0.0.3:443,[2001:db8::3]:443",
                4095,
                Source::Cli,
                owner("docker:4711"),
                false,
            ),
            (
                "0.0.0.0:8080/tcp",
                "10.0.0.4:80",
                7,
                Source::Cli,
                owner("cni:0123abcd/eth0"),
                true,
            ),
        ]
        .into_iter()
        .map(|(p, b, slot, source, owner, reservation)| {
            (
                p.parse().expect("publish"),
                Entry {
                    backend: b.parse().expect("backend"),
                    stats_slot: slot,
                    source,
                    reservation,
                },
                owner,
            )
        })
        .collect();
        save(
            &path,
            &from_rules(rules.iter().map(|(p, e, o)| (p, e, o.as_ref()))),
        )
        .expect("save");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).expect("saved").permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "the saved table is root's only");
        let back = load(&path).expect("load").expect("a file");
        assert_eq!(back, rules);
        std::fs::write(&path, b"{\"version\":99,\"layout\":1,\"rules\":[]}").expect("write");
        assert!(matches!(load(&path), Err(StateError::Invalid { .. })));
        assert!(remove(&path).expect("remove"));
        assert!(load(&path).expect("load").is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
