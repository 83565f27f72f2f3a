//! What a service manager needs from the daemon: readiness ([`notify_ready`], systemd's
//! `sd_notify` protocol), `--check-config` ([`check_config`]: the declarations file
//! validated as `apply` would, without touching the kernel), and the shell completions
//! and man pages generated from the command-line definitions ([`write_docs`]).

use std::{
    collections::BTreeSet,
    io,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use portfwd_common::{Reason, RuleStats};

use crate::{
    daemon::{Daemon, Kernel, Shared},
    dataplane::{Attachment, DataplaneError, Family},
    declfile,
    protocol::ApplyReply,
    rule::{PortRange, Proto},
};

/// The variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";

/// Sends `state` (`READY=1`, `RELOADING=1`, ...) to the service manager if it asked for
/// notifications (`$NOTIFY_SOCKET`: a datagram socket's path, or `@name` for the
/// abstract namespace); `Ok(false)` when it did not.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os(NOTIFY_SOCKET_ENV) else {
        return Ok(false);
    };
    let sock = std::os::unix::net::UnixDatagram::unbound()?;
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(name)?,
        None => std::os::unix::net::SocketAddr::from_pathname(Path::new(&path))?,
    };
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(true)
}

/// Tells the service manager the daemon is ready: the programs are attached and the
/// control socket accepts requests.
pub fn notify_ready() -> io::Result<bool> {
    notify("READY=1\nSTATUS=serving")
}

/// Applies the declarations file at `path` again on every SIGHUP (systemd's
/// `ExecReload`), as `portfwd-ctl apply -f FILE` would: file rules follow the file, rules
/// added at run time stay; a file with an error changes nothing and is logged. Without a
/// file (no `--config`), a SIGHUP is logged and changes nothing. The handler is in place
/// when this returns (call it inside the runtime, before telling anyone the daemon is
/// ready): from then on SIGHUP no longer ends the process.
pub fn reload_on_sighup<K: Kernel>(
    path: Option<PathBuf>,
    state: Shared<K>,
) -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let hup = signal(SignalKind::hangup());
    async move {
        let mut hup = match hup {
            Ok(s) => s,
            Err(e) => {
                log::warn!("cannot handle SIGHUP (no reload): {e}");
                return;
            }
        };
        while hup.recv().await.is_some() {
            match &path {
                Some(path) => reload(path, &state),
                None => log::info!("SIGHUP: no --config file to reload"),
            }
        }
    }
}

/// Applies the file at `path` (one SIGHUP's work).
fn reload<K: Kernel>(path: &Path, state: &Shared<K>) {
    let file = path.display().to_string();
    let result = declfile::load(path)
        .map_err(anyhow::Error::from)
        .and_then(|decls| {
            let mut d = state.lock().unwrap_or_else(|p| p.into_inner());
            Ok(d.apply(&file, &decls, false)?)
        });
    match result {
        Ok(r) => {
            log::info!(
                "SIGHUP: reloaded {file}: {} added, {} removed, {} unchanged",
                r.added.len(),
                r.removed.len(),
                r.unchanged.len()
            );
            let _ = notify(&format!("STATUS=serving; reloaded {file}"));
        }
        Err(e) => {
            log::error!("SIGHUP: {file} not applied, nothing changed: {e:#}");
            let _ = notify(&format!("STATUS=serving; reload of {file} failed"));
        }
    }
}

/// Validates the declarations file at `path` as `portfwd --config` and `apply` would:
/// its syntax, every entry, and the conflicts between its entries. Touches no kernel
/// state and needs no privilege; local listeners are not checked (they belong to the
/// host the file will run on). Returns what the file would publish on an empty daemon.
pub fn check_config(path: &Path) -> anyhow::Result<ApplyReply> {
    let decls = declfile::load(path)?;
    let mut d = Daemon::new(Offline);
    Ok(d.apply(&path.display().to_string(), &decls, true)?)
}

/// A [`Kernel`] with no kernel behind it, for [`check_config`]'s dry run: no rules, no
/// flows, no local listeners; the host's ephemeral range for "any free port".
struct Offline;

impl Kernel for Offline {
    fn insert_rule<F: Family>(
        &mut self,
        _: F::RuleKey,
        _: F::Backend,
    ) -> Result<(), DataplaneError> {
        Ok(())
    }
    fn remove_rule<F: Family>(&mut self, _: &F::RuleKey) -> Result<(), DataplaneError> {
        Ok(())
    }
    fn reset_rule_stats(&mut self, _: u32) -> Result<(), DataplaneError> {
        Ok(())
    }
    fn rule_stats(&self, _: u32) -> Result<RuleStats, DataplaneError> {
        Ok(RuleStats::default())
    }
    fn forget_flows<F: Family>(
        &mut self,
        _: &BTreeSet<(F::Addr, u16, u8)>,
    ) -> Result<usize, DataplaneError> {
        Ok(0)
    }
    fn reason_stats(&self) -> Result<Vec<(Reason, u64)>, DataplaneError> {
        Ok(Vec::new())
    }
    fn attachments(&self) -> Vec<Attachment> {
        Vec::new()
    }
    fn host_addrs(&self) -> BTreeSet<IpAddr> {
        BTreeSet::new()
    }
    fn sync_host_addrs<F: Family>(&mut self, _: &BTreeSet<F::Addr>) -> Result<(), DataplaneError> {
        Ok(())
    }
    fn sync_nat64(&mut self, _: &BTreeSet<Ipv4Addr>) -> Result<Vec<String>, DataplaneError> {
        Ok(Vec::new())
    }
    fn nat64_entries(&self) -> Vec<String> {
        Vec::new()
    }
    fn local_cgroup(&self) -> Option<PathBuf> {
        None
    }
    fn held_locally(&self, _: IpAddr, _: u16, _: Proto) -> bool {
        false
    }
    fn ephemeral_ports(&self) -> PortRange {
        crate::netinfo::ephemeral_ports()
    }
}

/// Writes `cmd`'s completions (bash, zsh, fish) and man page (`NAME.1`, one more page per
/// subcommand: `NAME-SUB.1`) into `dir`; the files written.
pub fn write_docs(cmd: clap::Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    use clap_complete::Shell;
    std::fs::create_dir_all(dir)?;
    let mut cmd = cmd;
    let name = cmd.get_name().to_string();
    let mut written = Vec::new();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        written.push(clap_complete::generate_to(
            shell,
            &mut cmd,
            name.clone(),
            dir,
        )?);
    }
    cmd.build();
    written.extend(man_pages(&cmd, &name, dir)?);
    Ok(written)
}

fn man_pages(cmd: &clap::Command, name: &str, dir: &Path) -> io::Result<Vec<PathBuf>> {
    let path = dir.join(format!("{name}.1"));
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .title(name)
        .render(&mut out)?;
    std::fs::write(&path, out)?;
    let mut written = vec![path];
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        let sub_name = format!("{name}-{}", sub.get_name());
        let sub = sub.clone().bin_name(sub_name.clone());
        written.extend(man_pages(&sub, &sub_name, dir)?);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_sends_to_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("portfwd-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let sock = std::os::unix::net::UnixDatagram::bind(&path).expect("bind");
        // No other test of this process reads NOTIFY_SOCKET.
        std::env::set_var(NOTIFY_SOCKET_ENV, &path);
        let sent = notify("READY=1");
        std::env::remove_var(NOTIFY_SOCKET_ENV);
        assert!(sent.expect("sent"));
        let mut buf = [0u8; 64];
        let n = sock.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
