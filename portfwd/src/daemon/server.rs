//! The control-socket server: accepts connections (at most [`MAX_CONNECTIONS`] at once),
//! reads one request per connection within [`CLIENT_TIMEOUT`] and [`MAX_REQUEST`] bytes,
//! answers it through [`Daemon::handle_line`], and runs the daemon's once-a-second
//! [`Daemon::refresh`]. Nothing a client sends can stop it: each connection is its own
//! task, and every failure becomes an error response or a log line.

use std::{
    future::Future,
    io,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use log::{debug, warn};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::Semaphore,
};

use super::{Daemon, Kernel};
use crate::protocol::{self, MAX_REQUEST};

/// How long a client may take to send its request (and to read the answer).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are refused with an error response.
pub const MAX_CONNECTIONS: usize = 64;
/// How often the host's addresses are re-read for wildcard rules.
pub const HOST_ADDR_REFRESH: Duration = Duration::from_secs(1);

/// The daemon shared between connection tasks. The lock is never held across an await.
pub type Shared<K> = Arc<Mutex<Daemon<K>>>;

/// Locks, recovering from poisoning: every operation keeps the table consistent before
/// it can fail, so the state behind a poisoned lock is still good.
fn lock<K>(d: &Mutex<Daemon<K>>) -> MutexGuard<'_, Daemon<K>> {
    d.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Serves the control socket and refreshes what the daemon reads from the host until `shutdown`
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
                lock(&daemon).refresh();
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

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::PermissionsExt, path::Path};

    use super::*;
    use crate::daemon::{tests::FakeKernel, SocketClaim, SocketError};

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
