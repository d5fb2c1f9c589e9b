//! The link between the hub and its Outpost Agents.
//!
//! Only this crate knows the wire format; domain types are converted at the
//! edge, so the protocol can stay compatible while the model changes.
//!
//! An agent dials out to the hub and keeps one long-lived WebSocket over
//! mutual TLS. Each WebSocket text message is one [`protocol::Envelope`]
//! (JSON), checked and converted by [`frame`]. The certificates on both ends
//! come from the hub's own CA, managed by [`identity`].
//!
//! # Layout
//! - [`protocol`]: the versioned envelope and every message either side sends.
//! - [`frame`]: bytes ⇄ envelope, with size and version checks and errors
//!   meant for people.
//! - [`io`]: the transport seam ([`io::LinkIo`]) both halves' sessions use.
//! - [`mem`]: an in-memory link, for the hub's local outpost and simulation.
//! - [`readahead`]: the socket under a TLS connection, read in large
//!   pieces while data flows.
//! - [`stream`]: streams multiplexed on a link (exec, port forwarding):
//!   windows, credit and the table each side's session keeps.
//! - [`identity`]: the hub CA, agent keys and CSRs, client certificates,
//!   the join token, CA fingerprint pinning and rustls configurations.
//!
//! # Compatibility rules
//! - The envelope's `v` changes only for incompatible changes; a receiver
//!   reports an unknown `v` as such (not as garbage) so operators can tell
//!   "upgrade the agent" from "corrupt frame".
//! - Within a version, messages may gain optional fields; receivers ignore
//!   fields they do not know. A new message type needs both ends to know it
//!   (an unknown type is an error), so add one only behind a version bump or
//!   after the peer has announced it understands it.

pub mod frame;
pub mod identity;
pub mod io;
pub mod mem;
pub mod protocol;
pub mod readahead;
pub mod stream;

pub use frame::{
    FrameError, LINK_READ_BUFFER_BYTES, MAX_FRAME_BYTES, WireFrame, decode, decode_binary,
    decode_binary_shared, encode, encode_wire,
};
pub use io::{Incoming, LinkIo, LinkIoError};
pub use protocol::{Envelope, Message, PROTOCOL_VERSION};
