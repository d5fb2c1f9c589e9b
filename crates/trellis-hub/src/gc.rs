//! Garbage collection of the hub's artifact store (BRIEF §5).
//!
//! A chunk is kept while any build references it: the builds' artifact
//! indexes, and every chunk those indexes list. A build cannot be deleted
//! while a release uses it, so a release in flight (being delivered to an
//! outpost) always keeps its chunks. Everything else is freed once it has
//! not been stored or asked about for the **grace period**: a push in
//! progress uploads chunks before it records its build, and a chunk the
//! hub already had is marked as wanted when a client asks about it
//! (`POST /chunks/missing`), so neither is freed under a push that is
//! still running.
//!
//! Agent binaries count like builds: each recorded binary's index and
//! chunks are kept until the binary is deleted.
//!
//! Backups count like builds: each completed backup's manifest and every
//! chunk it lists are kept until the backup is deleted. A backup in
//! progress uploads chunks before its manifest exists; like a push, it is
//! protected by the grace period (and by asking which chunks the hub
//! lacks, which marks those it has as wanted).
//!
//! The hub collects once an hour in the background (one instance at a
//! time where several share the store: [`run`]); administrators can run a
//! collection at once with `POST /api/v1/admin/collect-garbage`.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use axum::extract::State;
use serde::{Deserialize, Serialize};
use trellis_cas::Digest;
use trellis_model::Artifact;
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::Json;
use crate::state::AppState;

/// How long an unreferenced chunk is kept by default.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);
/// How often the hub collects by itself.
pub const INTERVAL: Duration = Duration::from_secs(3600);

/// What a collection did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CollectReport {
    /// Chunks kept because a build or a backup references them.
    pub referenced: u64,
    /// Unreferenced chunks kept because they are younger than the grace
    /// period.
    pub recent: u64,
    /// Chunks freed, and their stored bytes.
    pub freed: u64,
    pub freed_bytes: u64,
}

/// The indexes of every artifact some build holds, and of every agent
/// binary.
async fn referenced_indexes(state: &AppState) -> ApiResult<HashSet<Digest>> {
    let mut indexes = HashSet::new();
    for binary in state.store().list_agent_binaries().await? {
        if let Ok(digest) = binary.manifest.parse() {
            indexes.insert(digest);
        }
    }
    for project in state.store().list_projects().await? {
        for build in state.store().list_builds(&project.name).await? {
            for component in &build.components {
                let package = match &component.artifact {
                    Artifact::Package { digest, .. } => Some(digest.as_str()),
                    Artifact::Image { .. } => None,
                };
                let images = component.artifact.archives().map(|a| a.index.as_str());
                for index in package.into_iter().chain(images) {
                    if let Ok(digest) = index.parse() {
                        indexes.insert(digest);
                    }
                }
            }
        }
    }
    Ok(indexes)
}

/// Frees every chunk no build references that is older than `grace`.
pub async fn collect(state: &AppState, grace: Duration) -> ApiResult<CollectReport> {
    let indexes = referenced_indexes(state).await?;
    let store = state.chunks();
    let mut live: HashSet<Digest> = HashSet::new();
    for index in indexes {
        live.insert(index);
        match store.artifact(&index).await {
            Ok(artifact) => live.extend(artifact.chunks.iter().map(|c| c.digest)),
            Err(crate::chunks::ChunkError::NotFound { .. }) => {}
            // The index is damaged or unreadable: its chunks cannot be told
            // apart from garbage, so nothing is collected this time.
            Err(e) => {
                return Err(ApiError::internal(format!(
                    "artifact index {index} cannot be read ({e}); nothing was collected"
                )));
            }
        }
    }
    for manifest in state.store().backup_manifests().await? {
        let Ok(digest) = manifest.parse::<Digest>() else {
            continue;
        };
        live.insert(digest);
        match crate::backups::read_manifest(state, &digest).await {
            Ok(manifest) => live.extend(manifest.chunks()),
            Err(crate::chunks::ChunkError::NotFound { .. }) => {}
            Err(e) => {
                return Err(ApiError::internal(format!(
                    "backup manifest {digest} cannot be read ({e}); nothing was collected"
                )));
            }
        }
    }
    let now = SystemTime::now();
    let mut report = CollectReport::default();
    let chunks = store
        .list()
        .await
        .map_err(|e| e.to_api("listing the artifact store; nothing was collected"))?;
    for chunk in chunks {
        if live.contains(&chunk.digest) {
            report.referenced += 1;
        } else if now.duration_since(chunk.modified).unwrap_or_default() < grace {
            report.recent += 1;
        } else if store.remove(&chunk.digest).await.unwrap_or(false) {
            report.freed += 1;
            report.freed_bytes += chunk.stored;
        }
    }
    Ok(report)
}

/// `POST /admin/collect-garbage`: how long unreferenced chunks are kept.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct CollectRequest {
    /// Seconds; default one day.
    #[serde(default)]
    #[schema(value_type = Option<i64>, minimum = 0, maximum = 4294967295u64)]
    pub grace_secs: Option<u32>,
}

/// Frees the chunks no build references that are older than the grace
/// period (default one day). Administrators only.
#[utoipa::path(post, path = "/admin/collect-garbage", tag = "hub", request_body = CollectRequest,
    responses((status = 200, body = CollectReport)))]
pub async fn collect_garbage(
    State(state): State<AppState>,
    caller: Caller,
    Json(req): Json<CollectRequest>,
) -> ApiResult<Json<CollectReport>> {
    caller.require_admin("collect the artifact store's garbage")?;
    let grace = req
        .grace_secs
        .map(|s| Duration::from_secs(s.into()))
        .unwrap_or(DEFAULT_GRACE);
    Ok(Json(collect(&state, grace).await?))
}

/// Collects every [`INTERVAL`] until `cancel`. The hub runs it under the
/// job lock `collect-garbage`: of several hubs sharing a store and its
/// artifacts, one collects at a time, and another takes over when it dies.
pub async fn run(state: AppState, cancel: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        match collect(&state, DEFAULT_GRACE).await {
            Ok(report) => tracing::info!(
                freed = report.freed,
                bytes = report.freed_bytes,
                referenced = report.referenced,
                "collected the artifact store"
            ),
            Err(e) => {
                tracing::warn!(error = %e.message, "could not collect the artifact store")
            }
        }
    }
}
