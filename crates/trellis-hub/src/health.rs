//! `GET /api/v1/health`: whether this hub instance can do its work — reach
//! its store and its artifact store — for balancers (HAProxy checks it) and
//! operators. No key needed; it says nothing about projects or outposts.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::extract::Json;
use crate::state::AppState;

/// How long each check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// One dependency's state.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Check {
    pub ok: bool,
    /// What failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok`, or `unavailable` when a check failed (HTTP 503).
    pub status: String,
    /// This instance's id (unique per start) and the address the others
    /// reach it at, when several share the store.
    pub instance: String,
    pub instance_address: Option<String>,
    pub version: String,
    pub store: Check,
    pub chunks: Check,
    /// Outposts whose link this instance holds.
    pub links: usize,
}

/// Runs one check in a task of its own and waits for it at most
/// [`CHECK_TIMEOUT`]: a check that is late is reported failed but left to
/// finish, not abandoned midway (a database call cut off mid-statement
/// costs its connection).
async fn check<F, E>(f: F) -> Check
where
    F: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let task = tokio::spawn(async move { f.await.map_err(|e| e.to_string()) });
    match tokio::time::timeout(CHECK_TIMEOUT, task).await {
        Ok(Ok(Ok(()))) => Check {
            ok: true,
            error: None,
        },
        Ok(Ok(Err(e))) => Check {
            ok: false,
            error: Some(e),
        },
        Ok(Err(e)) => Check {
            ok: false,
            error: Some(format!("the check failed: {e}")),
        },
        Err(_) => Check {
            ok: false,
            error: Some(format!("no answer within {} s", CHECK_TIMEOUT.as_secs())),
        },
    }
}

/// The instance's health: 200 when it reaches its store and its artifact
/// store, 503 when it does not (with what failed).
#[utoipa::path(get, path = "/health", tag = "hub",
    responses((status = 200, body = Health), (status = 503, body = Health)))]
pub async fn health(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    let store = {
        let state = state.clone();
        check(async move {
            state
                .store()
                .get_outpost(trellis_model::LOCAL_OUTPOST)
                .await
                .map(|_| ())
        })
        .await
    };
    let chunks = {
        let state = state.clone();
        check(async move { state.chunks().check().await }).await
    };
    let ok = store.ok && chunks.ok;
    let body = Health {
        status: if ok { "ok" } else { "unavailable" }.to_owned(),
        instance: state.cluster().id().to_owned(),
        instance_address: state.cluster().address().map(str::to_owned),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        store,
        chunks,
        links: state.links().connected_count(),
    };
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}
