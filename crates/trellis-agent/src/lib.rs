//! The Trellis Outpost Agent: runs stages on a remote host and keeps them
//! running while its link to the hub is down (BRIEF §4–5).
//!
//! # Layout
//! - [`state`]: the agent's durable local state — identity, desired and
//!   applied revisions per stage, and the outbox of status reports — in one
//!   crash-safe file.

pub mod state;

pub use state::{
    AgentState, DEFAULT_OUTBOX_CAPACITY, Identity, OutboxStats, SCHEMA_VERSION, StageKey,
    StageRecord, StateError, StateOptions, StoreOutcome,
};
