//! Agent builds for testing self-update (`tests/agent_update.rs` in the
//! `trellis` package), never shipped:
//!
//! - `trellis-agent-next`: the real agent, reporting [`next_version`] —
//!   the second build an update goes to.
//! - `trellis-agent-broken`: answers `--version` with [`broken_version`]
//!   like an agent, then exits 1 whatever it is asked to run — an update
//!   that must be rolled back by the watchdog.

/// The version `trellis-agent-next` reports.
pub fn next_version() -> String {
    format!("{}-next", trellis_agent::AGENT_VERSION)
}

/// The version `trellis-agent-broken` claims.
pub fn broken_version() -> String {
    format!("{}-broken", trellis_agent::AGENT_VERSION)
}
