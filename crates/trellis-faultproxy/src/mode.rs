//! The fault modes a [`FaultProxy`](crate::FaultProxy) can be in, and what
//! each one means for existing and new connections.

use std::time::Duration;

/// What the proxy does to traffic. Set with
/// [`FaultProxy::set`](crate::FaultProxy::set); a change reaches existing
/// connections as well as new ones at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward everything unchanged.
    Pass,
    /// Like a service that is down: new connections are accepted and reset
    /// at once (RST, the closest a listening socket gets to "connection
    /// refused"), and existing connections are reset too, since a service
    /// that went down takes its connections with it. No upstream connection
    /// is made for refused clients.
    Refuse,
    /// Like a dead link (cable cut, partition, dropped NAT entry): nothing is
    /// forwarded in either direction and nobody is told — no FIN, no RST,
    /// not even when a peer closes its end.
    ///
    /// Bytes are **left unread**, not read and discarded: the sender's data
    /// then piles up in socket buffers and its writes eventually block, as
    /// with a real dead link whose peer stops acknowledging; reading and
    /// discarding would instead tell the sender "delivered" and lose data,
    /// which TCP never does. When the mode goes back to a forwarding one,
    /// whatever waited in buffers (and the chunk, if any, that was already in
    /// the proxy) is **delivered late**, in order — what TCP's retransmission
    /// gives when a partition heals before the connection times out.
    ///
    /// A client that connects while blackholed is accepted but the upstream
    /// is not dialled until the mode forwards again, because a dead link
    /// does not carry the SYN either.
    Blackhole,
    /// Every chunk is delivered this long after the proxy read it, in order,
    /// in both directions. This is added latency, not a throughput cap:
    /// chunks are pipelined (up to a fixed number in flight per direction;
    /// beyond that the proxy stops reading, so the sender feels
    /// backpressure).
    Delay(Duration),
    /// Each direction of each connection is paced to at most this many bytes
    /// per second. `0` forwards nothing, like [`Mode::Blackhole`].
    Throttle {
        /// Bytes per second, per direction, per connection.
        bytes_per_sec: u64,
    },
}

impl Mode {
    /// Whether bytes may move in this mode. `Refuse` does not forward
    /// either, but it closes connections rather than holding them.
    pub(crate) fn forwards(self) -> bool {
        match self {
            Mode::Pass | Mode::Delay(_) => true,
            Mode::Throttle { bytes_per_sec } => bytes_per_sec > 0,
            Mode::Refuse | Mode::Blackhole => false,
        }
    }
}

impl std::fmt::Display for Mode {
    /// The control-protocol spelling (see [`crate::control`]), so what the
    /// binary prints can be fed back to it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mode::Pass => f.write_str("pass"),
            Mode::Refuse => f.write_str("drop"),
            Mode::Blackhole => f.write_str("blackhole"),
            Mode::Delay(d) => write!(f, "delay {}", d.as_millis()),
            Mode::Throttle { bytes_per_sec } => write!(f, "throttle {bytes_per_sec}"),
        }
    }
}
