//! The control-socket server: accepts connections, decides what each peer may do from
//! its credentials ([`SocketAccess`]), reads one request per connection, answers it
//! through [`Daemon::handle`], and runs the daemon's once-a-second [`Daemon::refresh`].
//! Nothing a client sends can stop it: each connection is its own task, and every
//! failure becomes an error response or a log line.
//!
//! Bounds, so that no client can starve the others:
//! - size: a request line is at most [`MAX_REQUEST`] bytes; a longer one gets one error
//!   line. A refused peer's request is read (so that it gets its answer) but not kept,
//!   and a read-only peer's is kept up to [`MAX_READ_REQUEST`] bytes only.
//! - time: the whole request must arrive within [`CLIENT_TIMEOUT`] of the connect (a
//!   client that sends nothing, or dribbles bytes, is closed then, with one error line),
//!   and the answer must be taken within [`CLIENT_TIMEOUT`] too.
//! - count: at most [`MAX_CONNECTIONS`] connections of admitted peers are open at once;
//!   the next one closes the oldest (one error line), so idle clients can delay nobody by
//!   more than it takes `MAX_CONNECTIONS` newer clients to arrive. Refused peers (decided
//!   at accept, from their credentials) have a pool of their own, [`MAX_REFUSED`], so
//!   they cannot close an admitted peer's connection. When the daemon is out of file
//!   descriptors, the oldest connection goes too (a refused one first).
//! - the daemon's lock is taken only to answer a request that has fully arrived and been
//!   parsed, never while reading or writing.

use std::{
    collections::BTreeMap,
    future::Future,
    io,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use log::{debug, warn};
use tokio::{
    io::AsyncWriteExt,
    net::{UnixListener, UnixStream},
    sync::oneshot,
};

use super::{
    socket::{Access, Peer, SocketAccess},
    Daemon, Kernel,
};
use crate::protocol::{self, MAX_REQUEST};

/// How long a client may take to send its whole request (from its connect), and to read
/// the answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections open at once; the next one closes the oldest. The daemon needs this many
/// file descriptors besides its own (see [`raise_fd_limit`]).
pub const MAX_CONNECTIONS: usize = 1024;
/// Connections of refused peers open at once (waiting for their request, to answer it
/// with the refusal); the next one closes the oldest.
pub const MAX_REFUSED: usize = 64;
/// Largest request a read-only peer's connection buffers: more than any read request
/// (`{"cmd":"list"}`); a longer one is read to its end and refused, so read-only peers
/// cannot make the daemon hold [`MAX_REQUEST`] bytes per connection.
pub const MAX_READ_REQUEST: usize = 4096;
/// How often the host's addresses are re-read for wildcard rules.
pub const HOST_ADDR_REFRESH: Duration = Duration::from_secs(1);
/// Refused peers are logged at most once per this interval, with a count of the rest.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The daemon shared between connection tasks. The lock is never held across an await.
pub type Shared<K> = Arc<Mutex<Daemon<K>>>;

/// Locks, recovering from poisoning: every operation keeps the table consistent before
/// it can fail, so the state behind a poisoned lock is still good.
fn lock<T>(d: &Mutex<T>) -> MutexGuard<'_, T> {
    d.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Raises the process's soft limit on open files to its hard limit, so that
/// [`MAX_CONNECTIONS`] clients fit beside the daemon's own descriptors (programs, maps,
/// links); returns the new limit.
pub fn raise_fd_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// The open connections of one pool, oldest first; dropping a connection's sender closes
/// it.
struct Connections {
    cap: usize,
    next: u64,
    open: BTreeMap<u64, oneshot::Sender<()>>,
}

impl Connections {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            next: 0,
            open: BTreeMap::new(),
        }
    }

    /// Registers a new connection; closes the oldest ones beyond the cap.
    fn open(&mut self) -> (u64, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let id = self.next;
        self.next += 1;
        self.open.insert(id, tx);
        while self.open.len() > self.cap {
            self.open.pop_first();
        }
        (id, rx)
    }

    /// Closes the oldest connection (when out of file descriptors).
    fn close_oldest(&mut self) -> bool {
        self.open.pop_first().is_some()
    }
}

/// Removes its connection from [`Connections`] when the connection's task ends.
struct Registered(Arc<Mutex<Connections>>, u64);

impl Drop for Registered {
    fn drop(&mut self) {
        lock(&self.0).open.remove(&self.1);
    }
}

/// Refusals, logged at most once per [`REFUSAL_LOG_INTERVAL`]: the first at once, the
/// rest counted into the next line.
struct RefusalLog {
    last: Option<Instant>,
    untold: u64,
}

impl RefusalLog {
    fn note(&mut self, what: &str) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < REFUSAL_LOG_INTERVAL)
        {
            self.untold += 1;
            return;
        }
        let more = std::mem::take(&mut self.untold);
        if more > 0 {
            warn!("{what} (and {more} more refusals since the last such line)");
        } else {
            warn!("{what}");
        }
        self.last = Some(now);
    }

    /// Says how many refusals went untold, once their interval is over.
    fn flush(&mut self) {
        if self.untold > 0
            && self
                .last
                .is_some_and(|t| t.elapsed() >= REFUSAL_LOG_INTERVAL)
        {
            warn!(
                "refused {} more control requests in the last {} s",
                std::mem::take(&mut self.untold),
                REFUSAL_LOG_INTERVAL.as_secs()
            );
            self.last = Some(Instant::now());
        }
    }
}

/// What every connection task shares.
struct Context<K> {
    daemon: Shared<K>,
    access: SocketAccess,
    refusals: Mutex<RefusalLog>,
}

/// Serves the control socket to the peers `access` admits, and refreshes what the daemon
/// reads from the host, until `shutdown` completes. Returns without touching the
/// daemon's state.
pub async fn serve<K: Kernel + Send + 'static>(
    listener: UnixListener,
    daemon: Shared<K>,
    access: SocketAccess,
    shutdown: impl Future<Output = ()>,
) {
    let ctx = Arc::new(Context {
        daemon,
        access,
        refusals: Mutex::new(RefusalLog {
            last: None,
            untold: 0,
        }),
    });
    let admitted = Arc::new(Mutex::new(Connections::new(MAX_CONNECTIONS)));
    let refused = Arc::new(Mutex::new(Connections::new(MAX_REFUSED)));
    let mut refresh = tokio::time::interval(HOST_ADDR_REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = refresh.tick() => {
                lock(&ctx.daemon).refresh();
                lock(&ctx.refusals).flush();
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let peer = Peer::of(&stream);
                    let access = match &peer {
                        Ok(p) => ctx.access.grant(p),
                        Err(e) => {
                            debug!("cannot read a control peer's credentials: {e}");
                            Access::Refused
                        }
                    };
                    let pool = match access {
                        Access::Refused => &refused,
                        Access::Full | Access::Read => &admitted,
                    };
                    let (id, closed) = lock(pool).open();
                    let registered = Registered(pool.clone(), id);
                    let ctx = ctx.clone();
                    tokio::spawn(async move {
                        serve_connection(stream, peer, access, &ctx, closed).await;
                        drop(registered);
                    });
                }
                Err(e) => {
                    // Out of file descriptors: the oldest connection makes room. Wait a
                    // little in any case instead of spinning.
                    if e.raw_os_error() == Some(libc::EMFILE)
                        && (lock(&refused).close_oldest() || lock(&admitted).close_oldest())
                    {
                        debug!("out of file descriptors: closed the oldest control connection");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    } else {
                        warn!("cannot accept a control connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            },
        }
    }
}

/// Reads one request (bounded in time and size), answers it, closes; gives up, with one
/// error line, when `closed` fires (too many connections).
async fn serve_connection<K: Kernel>(
    mut stream: UnixStream,
    peer: io::Result<Peer>,
    access: Access,
    ctx: &Context<K>,
    closed: oneshot::Receiver<()>,
) {
    let deadline = tokio::time::Instant::now() + CLIENT_TIMEOUT;
    let keep = match access {
        Access::Full => MAX_REQUEST,
        Access::Read => MAX_READ_REQUEST,
        Access::Refused => 0,
    };
    let read = tokio::time::timeout_at(deadline, read_request(&stream, keep));
    let read = tokio::select! {
        r = read => r,
        _ = closed => {
            let msg = match access {
                Access::Refused => ctx.access.refusal(),
                Access::Full | Access::Read => format!(
                    "closed: more than {MAX_CONNECTIONS} clients connected, and this one \
                     waited longest; try again"
                ),
            };
            let _ = stream.try_write(&protocol::encode_err(&msg));
            return;
        }
    };
    let who = || match &peer {
        Ok(p) => p.to_string(),
        Err(_) => "a peer of unknown credentials".to_string(),
    };
    let read_only_refusal = || {
        lock(&ctx.refusals).note(&format!(
            "refused a change from {}, which has read-only access",
            who()
        ));
        protocol::encode_err(&ctx.access.read_only_refusal())
    };
    let reply = match read {
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
        Ok(Ok(line)) if access == Access::Refused => {
            lock(&ctx.refusals).note(&format!(
                "refused a control connection from {}: {}",
                who(),
                ctx.access.refusal()
            ));
            // Connected and closed without a word: nothing to answer.
            (!matches!(line, Line::Empty)).then(|| protocol::encode_err(&ctx.access.refusal()))
        }
        Ok(Ok(Line::Empty)) => None,
        // Only a read-only peer's request is dropped: it is longer than any read.
        Ok(Ok(Line::Dropped)) => Some(read_only_refusal()),
        // Parsed before the lock is taken.
        Ok(Ok(Line::Kept(line))) => Some(match protocol::parse_request(&line) {
            Err(msg) => protocol::encode_err(&msg),
            Ok(req) if access == Access::Read && !req.is_read_only() => read_only_refusal(),
            Ok(req) => lock(&ctx.daemon).handle(req),
        }),
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

/// A request line as read.
enum Line {
    /// The client closed without a byte.
    Empty,
    /// The line, without its `\n`.
    Kept(Vec<u8>),
    /// Longer than the peer may send (though within [`MAX_REQUEST`]): read, not kept.
    Dropped,
}

/// One line, kept if at most `keep` bytes (else read to its end and dropped: a refused
/// peer's, or a read-only peer's that is longer than any read request). A request the
/// client ended by closing its side (no newline) is taken as is; the JSON parser judges
/// it. Nothing is allocated before the first bytes arrive, so an idle connection costs
/// its task only.
async fn read_request(stream: &UnixStream, keep: usize) -> Result<Line, ReadError> {
    let mut line = Vec::new();
    let mut len = 0usize;
    let mut chunk = Vec::new();
    loop {
        stream.readable().await.map_err(ReadError::Io)?;
        if chunk.is_empty() {
            chunk.resize(4096, 0);
        }
        let n = match stream.try_read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(ReadError::Io(e)),
        };
        let (part, end) = match chunk[..n].iter().position(|&b| b == b'\n') {
            Some(i) => (&chunk[..i], true),
            None => (&chunk[..n], n == 0),
        };
        len += part.len();
        if len > MAX_REQUEST {
            return Err(ReadError::TooLarge);
        }
        if len <= keep {
            line.extend_from_slice(part);
        } else if !line.is_empty() {
            line = Vec::new();
        }
        if end {
            return Ok(match len {
                0 => Line::Empty,
                _ if len <= keep => Line::Kept(line),
                _ => Line::Dropped,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::PermissionsExt, path::Path};

    use super::*;
    use crate::daemon::{tests::FakeKernel, SocketAccess, SocketClaim, SocketError};

    #[test]
    fn the_oldest_connection_is_closed_beyond_the_limit() {
        let mut c = Connections::new(MAX_CONNECTIONS);
        let mut rx: Vec<_> = (0..MAX_CONNECTIONS).map(|_| c.open().1).collect();
        assert!(rx.iter_mut().all(|r| r
            .try_recv()
            .is_err_and(|e| e == oneshot::error::TryRecvError::Empty)));
        let (_, mut newest) = c.open();
        assert_eq!(
            rx[0].try_recv(),
            Err(oneshot::error::TryRecvError::Closed),
            "the oldest is told to close"
        );
        assert_eq!(rx[1].try_recv(), Err(oneshot::error::TryRecvError::Empty));
        assert_eq!(newest.try_recv(), Err(oneshot::error::TryRecvError::Empty));
        assert!(c.close_oldest());
        assert_eq!(rx[1].try_recv(), Err(oneshot::error::TryRecvError::Closed));
        assert_eq!(c.open.len(), MAX_CONNECTIONS - 1);
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
        let server = tokio::spawn(serve(
            listener,
            daemon.clone(),
            SocketAccess::default(),
            async {
                let _ = stopped.await;
            },
        ));

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
        assert!(
            r.contains(&format!("request larger than {MAX_REQUEST} bytes")),
            "{r}"
        );
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
