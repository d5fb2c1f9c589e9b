//! The transport seam of the link: both halves' session logic talks to a
//! [`LinkIo`], not to a socket. In production it is a WebSocket over mutual
//! TLS; in the deterministic simulation it is a simulated connection. That
//! keeps the sync logic — the part with the invariants — identical in both.

use async_trait::async_trait;

use crate::frame::FrameError;
use crate::protocol::Envelope;

/// What arrives on a link.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Frame(Envelope),
    /// The answer to a [`LinkIo::ping`], with its payload.
    Pong(Vec<u8>),
    /// The peer's heartbeat, already answered by the transport. Surfaced
    /// where the receiver wants to know the peer is alive (the hub, which
    /// then need not ping an agent it hears); transports may also answer
    /// pings silently.
    Ping,
}

/// Why a link operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkIoError {
    /// The peer sent something that is not a valid frame; the link is to be
    /// dropped (after telling the peer, if possible).
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The connection failed or was closed abruptly.
    #[error("the connection failed: {0}")]
    Transport(String),
}

impl LinkIoError {
    pub fn code(&self) -> &'static str {
        match self {
            LinkIoError::Frame(e) => e.code(),
            LinkIoError::Transport(_) => "link-transport-failed",
        }
    }
}

/// One end of an established link. Every method is cancel-safe in the
/// sense that matters for `select!`: dropping a pending `recv` loses no
/// frame.
#[async_trait]
pub trait LinkIo: Send {
    async fn send(&mut self, envelope: &Envelope) -> Result<(), LinkIoError>;
    /// The next frame or pong; `Ok(None)` once the peer closed the link.
    async fn recv(&mut self) -> Result<Option<Incoming>, LinkIoError>;
    /// A liveness probe the peer answers with [`Incoming::Pong`].
    async fn ping(&mut self, payload: Vec<u8>) -> Result<(), LinkIoError>;
    /// Closes the link, telling the peer why (best effort).
    async fn close(&mut self, reason: &str);
}
