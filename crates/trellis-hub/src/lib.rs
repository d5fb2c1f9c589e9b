//! The Trellis hub: the HTTP API, access control, the console, and the
//! store and artifact store behind them.
//!
//! The hub is started with [`Hub::open`] (which prepares the data directory,
//! the database, the first administrator key and the local outpost) and run
//! with [`Hub::serve`] on a listener and a shutdown signal the caller
//! passes in, so tests start it on `127.0.0.1:0` and stop it cleanly.
//!
//! # Layout
//! - `server.rs`: [`Hub`], start-up and serving.
//! - `api/`: the `/api/v1` handlers, one module per resource, and the
//!   OpenAPI document.
//! - `agent_binaries.rs`: agent binaries per version and architecture,
//!   checked and cut into the chunk store; `install.rs`: `GET /install`.
//! - `archive.rs`: purging archived projects and stages past retention.
//! - `auth.rs`: access keys and the [`auth::Caller`] extractor.
//! - `backup_schedule.rs`: scheduled backups and their retention.
//! - `backups.rs`: backups of stages' storage — the outpost's side of the
//!   work, and what garbage collection keeps of them.
//! - `chunks/`: the artifact store, on a directory or on S3.
//! - `cluster/`: several hub instances on one store — change feed,
//!   link claims and fencing, liveness, forwarding, shared secrets.
//! - `health.rs`: `GET /api/v1/health`, for balancers and operators.
//! - `error.rs`: the API's error type and JSON error shape.
//! - `link/`: the outpost link — registry, sessions, join/renew, status.
//! - `local.rs`: the local outpost — an embedded agent on an in-memory link.
//! - `metrics.rs`: `/metrics` in the Prometheus text format.
//! - `tls.rs`: the hub's CA and the HTTPS accept loop.
//! - `outposts.rs`: Outpost URIs — deriving their keys, validating them.
//! - `rollouts.rs`: the rollout driver — waves pushed and judged, one
//!   instance at a time, from the record in the store.
//! - `agent_update_waves.rs`: agent updates' waves, sent and judged by the
//!   same driver.
//! - `drain.rs`: reading what a handler left of a request's body.
//! - `console/`: the browser console (server-rendered pages, templates in
//!   `templates/`, assets in `assets/`).
//! - `sealed.rs`: the store around the backend, sealing config data.
//! - `state.rs`: what handlers share.

pub mod agent_binaries;
pub mod agent_update_waves;
pub mod api;
pub mod archive;
pub mod auth;
pub mod backup_schedule;
pub mod backups;
pub mod chunks;
pub mod cluster;
pub mod console;
pub mod drain;
pub mod error;
pub mod extract;
pub mod gc;
pub mod health;
pub mod install;
pub mod link;
pub mod local;
pub mod metrics;
pub mod outposts;
pub mod rollouts;
pub mod sealed;
mod server;
pub mod state;
pub mod tls;

pub use server::{
    ADMIN_KEY_FILE, DATABASE_FILE, Hub, HubOptions, LINK_SECRET_FILE, open_existing_store,
    redact as redact_url, reset_admin_key,
};
pub use tls::CA_CERT_FILE;
