//! [`FaultProxy`]: the listener, the accept loop, and the shared state
//! (mode, statistics, cancellation) that connection tasks in
//! [`crate::conn`] read.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Mode;
use crate::conn;

/// Counters since the proxy started. A `Copy` snapshot: fields are read one
/// after another, so under traffic they may be a moment apart.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections accepted from clients, including refused ones.
    pub accepted: u64,
    /// Client connections currently open (accepted and not yet fully
    /// closed). Refused connections never count here.
    pub active: u64,
    /// Bytes delivered client → upstream (counted once written to the
    /// upstream socket, so bytes still queued or held by a fault are not).
    pub bytes_up: u64,
    /// Bytes delivered upstream → client, counted the same way.
    pub bytes_down: u64,
}

/// State shared by the handle, the accept loop and every connection task.
pub(crate) struct Shared {
    pub(crate) upstream: SocketAddr,
    pub(crate) mode: watch::Sender<Mode>,
    /// Cancelled by shutdown or drop; parent of every other token.
    pub(crate) root: CancellationToken,
    /// Parent of the tokens of the connections open now. `drop_connections`
    /// cancels it and puts a fresh child of `root` in its place, so current
    /// connections end and later ones are unaffected.
    pub(crate) current: Mutex<CancellationToken>,
    pub(crate) tracker: TaskTracker,
    pub(crate) accepted: AtomicU64,
    pub(crate) active: AtomicU64,
    pub(crate) bytes_up: AtomicU64,
    pub(crate) bytes_down: AtomicU64,
}

impl Shared {
    /// A token for a new connection: cancelled by its own failure, by
    /// `drop_connections`, or by shutdown.
    fn connection_token(&self) -> CancellationToken {
        // A poisoned lock only means another thread panicked while swapping
        // tokens; the token inside is still a valid token.
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .child_token()
    }
}

/// A TCP proxy that injects faults between its clients and one upstream.
///
/// Every task it starts ends when [`shutdown`](FaultProxy::shutdown) is
/// awaited or the handle is dropped (dropping cancels them but does not wait).
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` listening on `127.0.0.1` on a free port.
    pub async fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), upstream).await
    }

    /// Starts a proxy to `upstream` listening on `listen`, in [`Mode::Pass`].
    /// Must be called within a Tokio runtime.
    pub async fn start_on(listen: SocketAddr, upstream: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let root = CancellationToken::new();
        let shared = Arc::new(Shared {
            upstream,
            mode: watch::Sender::new(Mode::Pass),
            current: Mutex::new(root.child_token()),
            root,
            tracker: TaskTracker::new(),
            accepted: AtomicU64::new(0),
            active: AtomicU64::new(0),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
        });
        shared.tracker.spawn(accept_loop(listener, shared.clone()));
        tracing::debug!(%addr, %upstream, "fault proxy listening");
        Ok(FaultProxy { addr, shared })
    }

    /// The address clients should connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Switches mode; existing connections react at once (see [`Mode`]).
    pub fn set(&self, mode: Mode) {
        tracing::debug!(?mode, "fault proxy mode");
        // send_replace stores the value even when no connection is listening.
        self.shared.mode.send_replace(mode);
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        *self.shared.mode.borrow()
    }

    /// Closes every current connection now with a **reset** (RST, via a zero
    /// `SO_LINGER`) on both the client and the upstream side, as a crashed
    /// peer or a middlebox dropping state would. Data still in the proxy is
    /// lost. The proxy keeps accepting, and the mode is unchanged.
    pub fn drop_connections(&self) {
        let mut current = self
            .shared
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        current.cancel();
        *current = self.shared.root.child_token();
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let s = &self.shared;
        Stats {
            accepted: s.accepted.load(Ordering::Relaxed),
            active: s.active.load(Ordering::Relaxed),
            bytes_up: s.bytes_up.load(Ordering::Relaxed),
            bytes_down: s.bytes_down.load(Ordering::Relaxed),
        }
    }

    /// Stops listening, resets every connection and waits until every task
    /// of this proxy has ended; the listening port is closed on return.
    pub async fn shutdown(self) {
        self.shared.root.cancel();
        self.shared.tracker.close();
        self.shared.tracker.wait().await;
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Without this, dropping the handle would leave the accept loop and
        // every connection running for the rest of the runtime's life.
        self.shared.root.cancel();
        self.shared.tracker.close();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            _ = shared.root.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (client, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Usually out of file descriptors; a short pause keeps the
                // loop from spinning until some close.
                tracing::warn!(error = %e, "fault proxy accept failed");
                tokio::select! {
                    _ = shared.root.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                }
            }
        };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        if *shared.mode.borrow() == Mode::Refuse {
            tracing::debug!(%peer, "refusing connection");
            reset(&client);
            continue;
        }
        let token = shared.connection_token();
        shared
            .tracker
            .spawn(conn::serve(client, peer, shared.clone(), token));
    }
}

/// Arranges for the socket to be closed with RST instead of FIN when its last
/// handle is dropped.
pub(crate) fn reset(stream: &TcpStream) {
    if let Err(e) = stream.set_zero_linger() {
        // The socket is closed either way, just with FIN instead of RST.
        tracing::debug!(error = %e, "could not set SO_LINGER=0");
    }
}
