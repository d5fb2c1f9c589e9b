//! A TCP fault-injection proxy for Trellis tests, chaos campaigns and
//! benchmarks.
//!
//! Put a [`FaultProxy`] between an Outpost Agent and the hub (point the agent
//! at [`FaultProxy::addr`]) and switch its [`Mode`] while the test runs to
//! see how both ends cope with a service that is down, a dead link, latency,
//! a slow link, or connections being reset. Faults are injected in user
//! space, so no `tc netem` or privileges are needed, and the proxy works at
//! the TCP level, so it is indifferent to the TLS running through it.
//!
//! ```no_run
//! # async fn demo(hub: std::net::SocketAddr) -> std::io::Result<()> {
//! use std::time::Duration;
//! use trellis_faultproxy::{FaultProxy, Mode};
//!
//! let proxy = FaultProxy::start(hub).await?;
//! // ... start the agent against proxy.addr() ...
//! proxy.set(Mode::Blackhole); // the link dies silently
//! proxy.set(Mode::Pass); // and heals; held data is delivered late
//! proxy.set(Mode::Delay(Duration::from_millis(200)));
//! proxy.drop_connections(); // reset everything, keep accepting
//! proxy.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`mode`](Mode): the fault modes and their exact semantics.
//! - `proxy`: [`FaultProxy`], the accept loop and [`Stats`].
//! - `conn`: one connection — a task per direction, bounded queues, and how
//!   each mode is applied to each chunk.
//! - [`control`]: the line protocol of the `trellis-faultproxy` binary, for
//!   driving a proxy from another process.
//!
//! # Guarantees
//! - A mode change reaches existing connections at once, not only new ones.
//! - Memory is bounded: each direction of a connection holds at most a fixed
//!   number of chunks; beyond that the proxy stops reading (backpressure).
//! - I/O errors never panic: they are traced and the connection is closed.
//! - Every task ends on [`FaultProxy::shutdown`] or when the handle is
//!   dropped.

mod conn;
pub mod control;
mod mode;
mod proxy;

pub use mode::Mode;
pub use proxy::{FaultProxy, Stats};
