//! Trellis domain types and the rules that govern them.
//!
//! This crate is the vocabulary every other Trellis crate speaks: names and
//! their validation, the manifest schema, stages and their types, builds,
//! configs, releases, revisions and access roles. It performs no I/O, so the
//! rules here can be tested exhaustively and reused by the hub, the agent and
//! the command line alike.
//!
//! # Layout
//! - [`name`]: validation of the DNS-label names used for projects, stages,
//!   components, outposts, configs and users.
//! - [`manifest`]: the v1 manifest (`trellis.yaml`, `pergola.yaml|yml|json`),
//!   parsed with positions so every error names a field path and a line.
//! - [`entity`]: the records the hub stores and serves (projects, stages,
//!   outposts, builds, configs, releases, users, access keys).
//! - [`access`]: roles and the access-key format.
//! - [`agent_update`]: an outpost's agent replaced by another version.
//! - [`selector`]: label selectors (`site=munich,line!=3`) over outposts.
//! - [`rollout`]: rollouts in waves — their records, how stages fall into
//!   waves, and how a wave is judged (pure, so tested without a hub).
//! - [`agent_binary`]: the agent binaries the hub holds per version and
//!   architecture, and how an ELF header names its machine.
//! - [`link_profile`]: an outpost's link profile for metered networks —
//!   heartbeat, delivery bandwidth cap, delivery windows — and their parsers.
//! - [`display`]: byte counts and instants as people read them (CLI and
//!   console alike).

pub mod access;
pub mod agent_binary;
pub mod agent_update;
pub mod display;
pub mod entity;
pub mod ingress;
pub mod link_profile;
pub mod manifest;
pub mod name;
pub mod outpost_uri;
pub mod rollout;
pub mod selector;

pub use access::{AccessKey, AccessKeyParseError, Role};
pub use agent_binary::AgentBinary;
pub use entity::*;
pub use name::{NameError, NameKind, validate_name};
pub use selector::{Selector, SelectorError};
