//! Endpoints: one backend address and what we know about it — requests
//! open to it, whether it refused a connection lately (passive health), its
//! sticky-cookie value, and its pool of idle keep-alive connections.
//!
//! The state lives as long as some route or request holds it, and is shared
//! by every route that lists the address; `set_routes` finds the existing
//! state through the registry, so in-flight counts, health and idle
//! connections survive a table swap. When the last route dropping an
//! address has no request left on it, its idle connections close.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::body::RequestBody;

/// How long a connect may take. Replicas are on this host or its network,
/// so a healthy one answers in milliseconds; a blackholed one must not hold
/// a request for long before the next endpoint is tried.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long an endpoint that refused a connection is tried only after the
/// others: long enough that a stopped replica costs each request at most
/// one refused connect per period, short enough that a restarted one gets
/// traffic again soon.
pub const DOWN_FOR: Duration = Duration::from_secs(3);

/// Idle connections kept per endpoint; more are closed when returned. A
/// connection is idle between two requests, so the pool must hold as many as
/// there are concurrent clients or every burst opens (and later closes) the
/// difference: 32 churned a third of the connections under 64 clients. An
/// idle connection costs a socket and a few KiB, and closes after
/// `IDLE_TIMEOUT`.
const MAX_IDLE: usize = 256;

/// An idle connection unused for this long is closed (the sweep in `serve`
/// and every checkout look).
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// One backend address and its shared state.
pub(crate) struct Endpoint {
    pub(crate) addr: SocketAddr,
    /// The sticky cookie's value for this endpoint.
    pub(crate) cookie: Box<str>,
    in_flight: AtomicUsize,
    /// Milliseconds on the registry's clock until which the endpoint counts
    /// as down; 0 when it is up.
    down_until: AtomicU64,
    idle: Mutex<Vec<Idle>>,
    clock: Arc<Clock>,
}

struct Idle {
    sender: SendRequest<RequestBody>,
    since: Instant,
}

/// Shared by all endpoints of one `Ingress`: the time base of `down_until`
/// and the signal `drain` waits on.
pub(crate) struct Clock {
    epoch: Instant,
    pub(crate) drained: Notify,
}

impl Clock {
    fn now_ms(&self) -> u64 {
        // +1 keeps 0 free to mean "up".
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
    }
}

/// Finds the endpoint state for an address, creating it on first use.
pub(crate) struct Registry {
    endpoints: Mutex<HashMap<SocketAddr, Weak<Endpoint>>>,
    pub(crate) clock: Arc<Clock>,
}

impl Registry {
    pub(crate) fn new() -> Self {
        Registry {
            endpoints: Mutex::new(HashMap::new()),
            clock: Arc::new(Clock {
                epoch: Instant::now(),
                drained: Notify::new(),
            }),
        }
    }

    pub(crate) fn endpoint(&self, addr: SocketAddr) -> Arc<Endpoint> {
        // A panic never happens while the lock is held, so a poisoned lock
        // still holds a consistent map.
        let mut endpoints = self
            .endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(existing) = endpoints.get(&addr).and_then(Weak::upgrade) {
            return existing;
        }
        let created = Arc::new(Endpoint {
            addr,
            cookie: cookie_value(addr),
            in_flight: AtomicUsize::new(0),
            down_until: AtomicU64::new(0),
            idle: Mutex::new(Vec::new()),
            clock: self.clock.clone(),
        });
        endpoints.insert(addr, Arc::downgrade(&created));
        created
    }

    /// The endpoint's state if any route or request still holds it.
    pub(crate) fn get(&self, addr: SocketAddr) -> Option<Arc<Endpoint>> {
        let endpoints = self
            .endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        endpoints.get(&addr).and_then(Weak::upgrade)
    }

    /// Forgets addresses nothing holds any more (after a table swap).
    pub(crate) fn prune(&self) {
        let mut endpoints = self
            .endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        endpoints.retain(|_, weak| weak.strong_count() > 0);
    }

    /// Closes idle connections past `IDLE_TIMEOUT` on every endpoint.
    pub(crate) fn sweep_idle(&self) {
        let live: Vec<Arc<Endpoint>> = {
            let endpoints = self
                .endpoints
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            endpoints.values().filter_map(Weak::upgrade).collect()
        };
        for endpoint in live {
            endpoint.expire_idle(Instant::now());
        }
    }
}

/// An opaque short value naming an endpoint in the sticky cookie. It is
/// derived from the address alone, so it stays the same when the agent
/// restarts and clients keep their replica; it is not a secret.
fn cookie_value(addr: SocketAddr) -> Box<str> {
    let mut hasher = blake3::Hasher::new_derive_key("trellis-ingress sticky endpoint v1");
    hasher.update(addr.to_string().as_bytes());
    let hex = hasher.finalize().to_hex();
    hex[..16].into()
}

impl Endpoint {
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Counts a request (or tunnel) as open to this endpoint until the guard
    /// drops.
    pub(crate) fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    pub(crate) fn is_down(&self) -> bool {
        let until = self.down_until.load(Ordering::Relaxed);
        until != 0 && self.clock.now_ms() < until
    }

    /// Marks the endpoint down for `DOWN_FOR`; true when it was up before
    /// (so only the first failure is logged loudly).
    pub(crate) fn mark_down(&self) -> bool {
        let until = self.clock.now_ms() + DOWN_FOR.as_millis() as u64;
        let before = self.down_until.swap(until, Ordering::Relaxed);
        before == 0 || before < self.clock.now_ms()
    }

    fn mark_up(&self) {
        if self.down_until.load(Ordering::Relaxed) != 0 {
            self.down_until.store(0, Ordering::Relaxed);
        }
    }

    /// An idle connection that is still open, most recently used first.
    pub(crate) fn take_idle(&self) -> Option<SendRequest<RequestBody>> {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        expire(&mut idle, now);
        while let Some(candidate) = idle.pop() {
            if !candidate.sender.is_closed() {
                return Some(candidate.sender);
            }
        }
        None
    }

    /// Returns a connection whose last response was read to the end.
    pub(crate) fn put_idle(&self, sender: SendRequest<RequestBody>) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        expire(&mut idle, now);
        if idle.len() >= MAX_IDLE {
            // Dropping the oldest closes it; the newest are the likeliest to
            // still be open on the backend's side.
            idle.remove(0);
        }
        idle.push(Idle { sender, since: now });
    }

    fn expire_idle(&self, now: Instant) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        expire(&mut idle, now);
    }

    /// Opens a new HTTP/1.1 connection (with upgrades, for WebSocket).
    pub(crate) async fn connect(&self) -> io::Result<SendRequest<RequestBody>> {
        let stream =
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.addr)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(err)) => return Err(err),
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
                    ));
                }
            };
        // Requests and small responses must not wait for Nagle.
        stream.set_nodelay(true)?;
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(err) = connection.with_upgrades().await {
                tracing::debug!(%addr, "backend connection ended: {err}");
            }
        });
        self.mark_up();
        Ok(sender)
    }
}

/// Oldest first: `push` appends, so expired entries are at the front.
fn expire(idle: &mut Vec<Idle>, now: Instant) {
    let keep_from = idle
        .iter()
        .position(|i| now.duration_since(i.since) < IDLE_TIMEOUT)
        .unwrap_or(idle.len());
    idle.drain(..keep_from);
}

/// A request or tunnel open to an endpoint; dropping it ends the count.
pub(crate) struct InFlight(Arc<Endpoint>);

impl InFlight {
    pub(crate) fn endpoint(&self) -> &Arc<Endpoint> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.clock.drained.notify_waiters();
        }
    }
}
