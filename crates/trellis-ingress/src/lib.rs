//! The outpost's HTTP entry point: a reverse proxy in front of the replicas
//! of the stages' components.
//!
//! The Outpost Agent embeds an [`Ingress`], owns its route table and swaps
//! it with [`Ingress::set_routes`] whenever a release changes which
//! replicas are up, and drains the old replicas with [`Ingress::drain`]
//! before stopping them.
//!
//! # Routing
//!
//! A request is routed by its host — the HTTP/1.1 `Host` header or the
//! HTTP/2 `:authority`, without the port, case-insensitive, a trailing dot
//! ignored — and then by the longest [`Route::path`] prefix, matched on
//! segment boundaries like Kubernetes' `Prefix` (`/api` matches `/api` and
//! `/api/x`, not `/apix`). The table is compiled once per swap (a map from
//! host to its routes, longest prefix first, each endpoint resolved to its
//! shared state) and published behind an `Arc`: a request takes a reference
//! to the table it starts with and keeps it, so a swap never disturbs
//! requests in flight and routing allocates nothing.
//!
//! # Balancing and passive health
//!
//! Requests go round-robin over a route's endpoints. A connect that fails
//! (nothing was sent, so it is safe for any method) is retried on the next
//! endpoint, and the failed one is tried only after the others for a few
//! seconds ([`DOWN_FOR`]). If every endpoint of the request's table
//! refused and the table was swapped meanwhile, the request tries the new
//! table's endpoints: a request that raced a release's swap does not fail.
//! A bodiless GET/HEAD/OPTIONS sent on a pooled connection that the
//! backend closed at that very moment (its keep-alive timeout) is sent
//! again on a new connection. Backend connections are HTTP/1.1, kept alive
//! in a small pool per endpoint; a connection goes back to the pool only
//! once its response was read to the end.
//!
//! # Stickiness
//!
//! A `sticky` route keeps a client on one endpoint with the cookie
//! [`STICKY_COOKIE`] (`Path` = the route's prefix, `HttpOnly`,
//! `SameSite=Lax`, `Secure` over HTTPS). Its value is an opaque short hash
//! of the endpoint's address — stable across agent restarts, not a secret.
//! When the cookie's endpoint is gone from the route or down, another is
//! picked and the cookie set again; without a cookie, requests spread.
//!
//! # Streaming and upgrades
//!
//! Request bodies stream to the backend and response bodies stream back
//! frame by frame (server-sent events, chunked downloads); nothing is
//! buffered. An `Upgrade` request (WebSocket, …) is forwarded with its
//! `Upgrade` header; on `101 Switching Protocols` both upgraded connections
//! are spliced until either side closes. Hop-by-hop headers are stripped
//! both ways; `X-Forwarded-For` (appended), `X-Forwarded-Proto` and
//! `X-Forwarded-Host` are set; the original `Host` is kept.
//!
//! # Errors
//!
//! The ingress's own answers are small plain-text pages ending with a
//! stable `code:` line, also sent as the [`ERROR_CODE_HEADER`] header: 400
//! `bad-host` (no or malformed host), 404 `unknown-host` (naming the
//! outpost and the host) and `unknown-path`, 503 `no-replica` (naming the
//! route's owner), 502 `backend-unreachable` (every endpoint refused) and
//! `backend-failed` (the backend broke the connection before answering).
//!
//! # Draining
//!
//! Every request, and every upgraded tunnel, counts as in flight to its
//! endpoint until its response body ends or the client goes away.
//! [`Ingress::in_flight`] reads the count and [`Ingress::drain`] waits for
//! it to reach zero on a set of endpoints, bounded.
//!
//! # TLS and certificate reload
//!
//! [`Ingress::serve`] with [`Certificates`] speaks HTTPS (ALPN `h2` and
//! `http/1.1`, the `ring` provider). The certificate is looked up at every
//! handshake, so [`Certificates::replace_pem`] — or the watcher of
//! [`Certificates::from_files`], which polls the files' modification time
//! and size — applies to the next connection. A replacement that does not
//! parse or whose key does not match the certificate is refused and the
//! previous pair stays.
//!
//! # Layout
//!
//! - `route` — [`Route`], its checks ([`RouteError`]) and the compiled table.
//! - `endpoint` — per-address state: in-flight count, health, sticky value,
//!   connection pool.
//! - `proxy` — one request: lookup, balancing, header rewriting, upgrades.
//! - `body` — the bodies: error pages, passed-through backend bodies.
//! - `pages` — the error pages.
//! - `serve` — the accept loop and shutdown.
//! - `tls` — [`Certificates`] and [`TlsError`].

mod body;
mod endpoint;
mod pages;
mod proxy;
mod route;
mod serve;
mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

pub use endpoint::{CONNECT_TIMEOUT, DOWN_FOR};
pub use pages::ERROR_CODE_HEADER;
pub use proxy::STICKY_COOKIE;
pub use route::{Route, RouteError};
pub use serve::SHUTDOWN_GRACE;
pub use tls::{Certificates, Part, RELOAD_POLL, TlsError};

use endpoint::Registry;
use route::Table;

/// The reverse proxy. Cheap to clone: clones share the route table, the
/// endpoints' state and the connection pools, so one `Ingress` can serve
/// several listeners (HTTP and HTTPS) at once.
#[derive(Clone)]
pub struct Ingress {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    /// Named in the 404 page.
    pub(crate) outpost: Box<str>,
    table: RwLock<Arc<Table>>,
    /// The generation of the newest table, read without the lock.
    generation: AtomicU64,
    pub(crate) registry: Registry,
}

impl Inner {
    pub(crate) fn table(&self) -> Arc<Table> {
        // Nothing panics while the lock is held: a poisoned lock still
        // holds a whole table.
        self.table
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

impl Ingress {
    /// An ingress with no route (every request gets a 404 naming `outpost`).
    pub fn new(outpost: impl Into<String>) -> Self {
        Ingress {
            inner: Arc::new(Inner {
                outpost: outpost.into().into_boxed_str(),
                table: RwLock::new(Arc::new(Table::empty())),
                generation: AtomicU64::new(0),
                registry: Registry::new(),
            }),
        }
    }

    /// Replaces every route at once. Requests in flight keep the table
    /// they started with. Refused, changing nothing, when two routes claim
    /// the same host and path, a host is not a lowercase host name, or a
    /// path does not start with '/'.
    pub fn set_routes(&self, routes: Vec<Route>) -> Result<(), RouteError> {
        let mut current = self
            .inner
            .table
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let generation = current.generation + 1;
        let table = Table::build(routes, &self.inner.registry, generation)?;
        *current = Arc::new(table);
        self.inner.generation.store(generation, Ordering::Release);
        drop(current);
        // Addresses no route lists any more are forgotten once their last
        // request ends; this only clears the map of dead entries.
        self.inner.registry.prune();
        Ok(())
    }

    /// The routes being served, as given to `set_routes`.
    pub fn routes(&self) -> Arc<[Route]> {
        self.inner.table().routes.clone()
    }

    /// Serves plain HTTP (`tls` None) or HTTPS on `listener` until
    /// `shutdown` resolves; then stops accepting, lets open requests and
    /// tunnels finish for up to [`SHUTDOWN_GRACE`], cuts the rest and
    /// returns. Fails only when the listener fails for good (not for one
    /// client's error).
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        tls: Option<Certificates>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        serve::serve(self.inner.clone(), listener, tls, shutdown).await
    }

    /// Requests (and upgraded tunnels) currently open to `endpoint`.
    pub fn in_flight(&self, endpoint: SocketAddr) -> usize {
        self.inner
            .registry
            .get(endpoint)
            .map_or(0, |endpoint| endpoint.in_flight())
    }

    /// Waits until no request is open to any of `endpoints`, at most
    /// `bound`; true when they drained.
    pub async fn drain(&self, endpoints: &[SocketAddr], bound: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + bound;
        let drained = &self.inner.registry.clock.drained;
        loop {
            // Registered before looking, so a count reaching zero between
            // the look and the wait is not missed.
            let notified = drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if endpoints.iter().all(|e| self.in_flight(*e) == 0) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return endpoints.iter().all(|e| self.in_flight(*e) == 0);
            }
        }
    }
}

impl std::fmt::Debug for Ingress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingress")
            .field("outpost", &self.inner.outpost)
            .field("routes", &self.inner.table().routes.len())
            .finish_non_exhaustive()
    }
}
