//! `portfwd-docker-proxy`: dockerd's userland proxy, replaced by a portfwd rule.
//!
//! dockerd (`"userland-proxy": true`, `"userland-proxy-path"` pointing here) starts one
//! proxy per published port and family and expects docker-proxy's contract, which this
//! keeps (moby's `cmd/docker-proxy` and `libnetwork/portmapper`, 20.10 to 28+):
//! - arguments `-proto -host-ip -host-port -container-ip -container-port` (see
//!   [`args`]), plus `-use-listen-fd` from dockerd 28 on, when fd 4 is dockerd's socket
//!   for the host address and port;
//! - readiness on fd 3, a pipe: `0\n` once published, or `1\n<message>` and exit 1
//!   (dockerd shows the message in `docker run`'s error, after "Error starting userland
//!   proxy: ");
//! - it runs until SIGINT (how dockerd stops it) or SIGTERM (its parent-death signal),
//!   then unpublishes and exits 0.
//!
//! Instead of copying bytes it asks the portfwd daemon (`PORTFWD_SOCKET`, or the default
//! socket) to publish the same address, port and protocol to the container, so nothing
//! listens on the host port and the container sees its clients' addresses. Invariant:
//! it removes only the rule it added: the rule carries the owner `docker:<pid>` and the
//! removal names it, so the daemon refuses to remove anything else (a rule someone
//! replaced in between is left alone); `portfwd-ctl list` shows the owner. A rule whose
//! owner proxy is gone (killed outright) does not block the port: the next proxy for it
//! removes that rule and publishes its own. dockerd 28's socket is closed
//! before publishing: portfwd refuses ports a local process holds, and once the rule is
//! in place its bind hook keeps local processes off the port.
//!
//! The rule lives in the daemon, which forgets it when it restarts; the proxy notices
//! the daemon's new socket (checked every second) and publishes the rule again.

mod args;

use std::{
    fs::File,
    io::Write,
    os::fd::{FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    process::ExitCode,
};

use nix::sys::{
    signal::{SigSet, Signal},
    stat::{fstat, SFlag},
};
use portfwd::{
    protocol::{
        self, ClientError, ListReply, Owner, Request, RuleReply, DEFAULT_SOCKET, SOCKET_ENV,
    },
    rule::{Declaration, PortRange, Publish},
};

use args::Invocation;

/// The pipe dockerd reads our status from.
const STATUS_FD: RawFd = 3;
/// dockerd 28's socket for the host address and port (with `-use-listen-fd`).
const LISTEN_FD: RawFd = 4;

const NAME: &str = "portfwd-docker-proxy";

fn main() -> ExitCode {
    // Block the stop signals first, so one that comes while publishing waits in the
    // queue and is answered by unpublishing, never by dying with the rule in place.
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGINT);
    stop.add(Signal::SIGTERM);
    if let Err(e) = stop.thread_block() {
        return fail(&format!("cannot block SIGINT and SIGTERM: {e}"));
    }
    let args = match args::parse(std::env::args().skip(1)) {
        Ok(Invocation::Version) => {
            println!("{NAME} {} (portfwd)", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Ok(Invocation::Proxy(p)) => p,
        Err(e) => return fail(&e.to_string()),
    };
    if args.use_listen_fd {
        if let Err(msg) = close_listen_fd() {
            return fail(&msg);
        }
    }
    let socket = std::env::var_os(SOCKET_ENV)
        .filter(|s| !s.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_SOCKET), PathBuf::from);
    let decl = match args.declaration() {
        Ok(d) => d,
        Err(e) => return fail(&e.to_string()),
    };
    let mut published_on = socket_id(&socket);
    let mut published = match publish(&socket, &decl) {
        Ok(reply) => reply,
        Err(e) => return fail(&e.to_string()),
    };
    eprintln!("{NAME}: published {published}");
    report(b"0\n");

    // Wait for dockerd to stop us. Meanwhile, a portfwd daemon that restarted (a new
    // socket file) has lost the rule: publish it again.
    loop {
        match wait_for(&stop, RECHECK_SECS) {
            Wait::Signal(sig) => {
                eprintln!("{NAME}: {sig}, unpublishing {}", published.publish);
                break;
            }
            Wait::Failed(e) => {
                eprintln!("{NAME}: waiting for a signal failed ({e}), unpublishing");
                break;
            }
            Wait::TimedOut => {}
        }
        let now = socket_id(&socket);
        if now.is_none() || now == published_on {
            continue;
        }
        match publish(&socket, &decl) {
            Ok(reply) => {
                eprintln!("{NAME}: the portfwd daemon restarted; published {reply} again");
                published = reply;
                published_on = now;
            }
            // Not answering yet: the next round tries again.
            Err(ClientError::Connect { .. } | ClientError::Io { .. } | ClientError::NoResponse) => {
            }
            Err(e) => {
                eprintln!("{NAME}: the portfwd daemon restarted and refused {decl}: {e}");
                published_on = now;
            }
        }
    }
    if let Err(e) = unpublish(&socket, &published) {
        eprintln!("{NAME}: {e}: left as it is");
    }
    ExitCode::SUCCESS
}

/// How often (seconds) the daemon's socket is checked for a restart (one `stat`).
const RECHECK_SECS: libc::time_t = 1;

/// What identifies one daemon's socket: a restarted daemon makes a new file (another
/// inode, or the same number reused, then with another change time).
fn socket_id(socket: &Path) -> Option<(u64, u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(socket).ok()?;
    Some((m.dev(), m.ino(), m.ctime(), m.ctime_nsec()))
}

enum Wait {
    Signal(Signal),
    TimedOut,
    Failed(nix::errno::Errno),
}

/// Waits up to `secs` seconds for one of the (blocked) signals of `set`.
fn wait_for(set: &SigSet, secs: libc::time_t) -> Wait {
    let ts = libc::timespec {
        tv_sec: secs,
        tv_nsec: 0,
    };
    // SAFETY: `set` is a valid, initialized sigset_t (SigSet's AsRef); a null info
    // pointer is allowed; `ts` lives across the call.
    let sig = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &ts) };
    if sig >= 0 {
        return match Signal::try_from(sig) {
            Ok(s) => Wait::Signal(s),
            Err(e) => Wait::Failed(e),
        };
    }
    match nix::errno::Errno::last() {
        nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR => Wait::TimedOut,
        e => Wait::Failed(e),
    }
}

/// This process's owner name for its rule: `docker:<pid>`.
fn owner() -> Owner {
    // A pid is digits: always a valid name.
    Owner::new(&format!("docker:{}", std::process::id())).expect("docker:<pid> is a valid owner")
}

/// Publishes `decl` (dockerd's mapping) as a runtime rule of ours. If the daemon refuses
/// because a rule of a proxy that is gone holds the port (one killed outright, which
/// could not unpublish), that rule is removed, as its owner, and the add tried again.
fn publish(socket: &Path, decl: &Declaration) -> Result<RuleReply, ClientError> {
    let add = || {
        protocol::call(
            socket,
            &Request::Add {
                publish: decl.spec(),
                backend: decl.backend(),
                owner: Some(owner()),
                reservation_ok: false,
            },
        )
    };
    let refusal = match add() {
        Err(ClientError::Refused(msg)) => ClientError::Refused(msg),
        other => return other,
    };
    let Ok(list) = protocol::call::<ListReply>(socket, &Request::List) else {
        return Err(refusal);
    };
    let stale = stale_rules(&list, decl);
    if stale.is_empty() {
        return Err(refusal);
    }
    for (publish, owner) in stale {
        match protocol::call::<RuleReply>(
            socket,
            &Request::Del {
                publish,
                owner: Some(owner.clone()),
            },
        ) {
            Ok(r) => eprintln!("{NAME}: removed {r} of {owner}, a proxy that is gone"),
            Err(_) => return Err(refusal),
        }
    }
    add()
}

/// The rules in `list` that take a port of `decl` and belong to a `docker:<pid>` whose
/// process is no portfwd-docker-proxy any more.
fn stale_rules(list: &ListReply, decl: &Declaration) -> Vec<(Publish, Owner)> {
    let Some(ports) = decl.spec().ports else {
        return Vec::new();
    };
    let Ok(ours) = Publish::new(decl.host(), ports, decl.proto()) else {
        return Vec::new();
    };
    list.rules
        .iter()
        .filter_map(|r| {
            let owner = r.owner.as_ref()?;
            let pid: u32 = owner.as_str().strip_prefix("docker:")?.parse().ok()?;
            let ports = PortRange::new(r.host_port, r.host_port_end.max(r.host_port)).ok()?;
            let publish = Publish::new(r.host_ip, ports, r.proto).ok()?;
            (publish.conflict(&ours).is_some() && !is_proxy(pid)).then(|| (publish, owner.clone()))
        })
        .collect()
}

/// Whether process `pid` runs this program (the same command name as this process:
/// however the binary is named, every proxy dockerd starts has the same).
fn is_proxy(pid: u32) -> bool {
    let comm = |who: &str| std::fs::read_to_string(format!("/proc/{who}/comm")).ok();
    match (comm(&pid.to_string()), comm("self")) {
        (Some(theirs), Some(ours)) => theirs == ours,
        // Gone; or we cannot tell, and then the rule stays.
        (None, Some(_)) => false,
        (_, None) => true,
    }
}

/// Removes `ours`; the daemon refuses (and changes nothing) if the rule published there
/// now is not ours.
fn unpublish(socket: &Path, ours: &RuleReply) -> Result<(), ClientError> {
    let gone: RuleReply = protocol::call(
        socket,
        &Request::Del {
            publish: ours.publish,
            owner: Some(owner()),
        },
    )?;
    eprintln!("{NAME}: unpublished {gone}");
    Ok(())
}

/// Closes dockerd's socket on fd 4 (checking that it is one): nothing is to listen on
/// the published port.
fn close_listen_fd() -> Result<(), String> {
    let st = fstat(LISTEN_FD).map_err(|e| format!("-use-listen-fd: fd {LISTEN_FD}: {e}"))?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
        return Err(format!("-use-listen-fd: fd {LISTEN_FD} is not a socket"));
    }
    // SAFETY: fd 4 is open (fstat succeeded) and nothing else in this process owns it:
    // dockerd handed it over for us alone; dropping the OwnedFd closes it once.
    drop(unsafe { OwnedFd::from_raw_fd(LISTEN_FD) });
    Ok(())
}

/// Reports failure the way dockerd reads it (`1\n<message>`, one line), and on stderr.
fn fail(msg: &str) -> ExitCode {
    let line = protocol::one_line(&format!("{NAME}: {msg}"));
    eprintln!("{line}");
    let mut status = b"1\n".to_vec();
    status.extend_from_slice(line.as_bytes());
    report(&status);
    ExitCode::FAILURE
}

/// Writes `status` to dockerd's pipe on fd 3 and closes it; without such a pipe (run by
/// hand) there is nobody to tell.
fn report(status: &[u8]) {
    let is_pipe = fstat(STATUS_FD)
        .is_ok_and(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFIFO);
    if !is_pipe {
        return;
    }
    // SAFETY: fd 3 is open (fstat succeeded) and is dockerd's status pipe, which nothing
    // else in this process owns; the File closes it once, when dropped here.
    let mut pipe = unsafe { File::from_raw_fd(STATUS_FD) };
    // dockerd may have given up waiting (its pipe is closed): it then stops us anyway.
    let _ = pipe.write_all(status);
}
