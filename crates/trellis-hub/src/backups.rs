//! Backups of a stage's storage, as the hub sees them: the outpost's side
//! of the work (`/api/v1/agent/backups/…`, mutual TLS; the local outpost
//! calls the same functions directly) and what the garbage collection
//! keeps.
//!
//! A backup is asked for through the API (`api::backups`), recorded
//! `pending`, and sent to the stage's outpost over its link as a
//! `backup-job` (by the link session's sync, so an outpost that is offline
//! gets it when it links again). The agent cuts the stage's volumes into
//! chunks, asks which the hub lacks ([`missing`]), uploads those
//! ([`put_chunk`], each verified against its digest before it is stored),
//! then sends the manifest ([`complete`]): the hub checks that every chunk
//! the manifest lists is stored, stores the manifest as a chunk of its own
//! and only then records the backup `completed`. A restore is the same
//! job the other way: the agent reads the manifest ([`manifest`]) and the
//! chunks it lists ([`chunk`]) and reports how it went ([`report`]).
//!
//! Every call names its backup by project, stage and id, and is refused
//! (`backup-not-found`) unless the stage is placed on the caller's
//! outpost, so an agent reaches only its own stages' backups, and chunks
//! only through a backup that lists them.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use bytes::Bytes;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use trellis_cas::{BackupManifest, Digest};
use trellis_model::{Backup, BackupState};
use utoipa::ToSchema;

use crate::chunks::ChunkError;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// The largest manifest accepted (a 1 GiB volume's is about 1 MiB).
pub const MAX_MANIFEST_BYTES: usize = 64 * 1024 * 1024;

/// What the hub keeps in memory about backups in progress.
#[derive(Default)]
pub struct BackupTracker {
    /// Stored bytes uploaded per backup id, not yet added to its record
    /// (added with the next report, and when it completes).
    uploads: Mutex<HashMap<u64, u64>>,
    /// The chunks each completed backup's manifest lists, by manifest
    /// digest (a manifest never changes), for [`chunk`].
    listed: Mutex<HashMap<Digest, Arc<HashSet<Digest>>>>,
}

impl std::fmt::Debug for BackupTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupTracker").finish_non_exhaustive()
    }
}

impl BackupTracker {
    fn add_upload(&self, id: u64, bytes: u64) {
        *self
            .uploads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id)
            .or_default() += bytes;
    }

    fn take_uploads(&self, id: u64) -> u64 {
        self.uploads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
            .unwrap_or(0)
    }
}

/// Which backup a call is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupRef {
    pub project: String,
    pub stage: String,
    pub id: u64,
}

/// What the agent says of a job: `running` (with the bytes read so far),
/// `failed` (with why), or for a restore `completed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AgentReport {
    /// `backup` or `restore`.
    pub op: String,
    /// `running`, `failed` or `completed` (a restore; a backup completes
    /// with its manifest).
    pub state: BackupState,
    #[serde(default)]
    pub message: String,
    /// Bytes of volume content read so far (a backup).
    #[serde(default)]
    pub size: u64,
}

/// `POST …/missing`: which of these chunks the hub lacks.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AgentMissing {
    pub digests: Vec<String>,
}

fn backup_not_found(r: &BackupRef, outpost: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "backup-not-found",
        format!(
            "stage {}/{} on outpost {outpost:?} has no backup {}",
            r.project, r.stage, r.id
        ),
        "the backup was deleted, or its stage is not on this outpost; the hub sends the jobs it wants done over the link",
    )
}

/// The backup, if its stage is on `outpost`.
async fn owned(state: &AppState, outpost: &str, r: &BackupRef) -> ApiResult<Backup> {
    let stage = match state.store().get_stage(&r.project, &r.stage).await {
        Ok(stage) => stage,
        Err(trellis_store::StoreError::NotFound { .. }) => {
            return Err(backup_not_found(r, outpost));
        }
        Err(e) => return Err(e.into()),
    };
    if stage.outpost != outpost {
        return Err(backup_not_found(r, outpost));
    }
    match state.store().get_backup(&r.project, &r.stage, r.id).await {
        Ok(b) => Ok(b),
        Err(trellis_store::StoreError::NotFound { .. }) => Err(backup_not_found(r, outpost)),
        Err(e) => Err(e.into()),
    }
}

fn not_open(r: &BackupRef, what: &str, now: BackupState) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "backup-not-open",
        format!(
            "backup {} of stage {}/{}: its {what} is {now}, not pending or running",
            r.id, r.project, r.stage
        ),
        "nothing to do: the job ended (or was never asked for)",
    )
}

/// Saves `backup`, mapping a deletion meanwhile to `backup-not-found`.
async fn save(state: &AppState, outpost: &str, r: &BackupRef, backup: &Backup) -> ApiResult<()> {
    match state.store().save_backup(backup).await {
        Ok(()) => Ok(()),
        Err(trellis_store::StoreError::NotFound { .. }) => Err(backup_not_found(r, outpost)),
        Err(e) => Err(e.into()),
    }
}

/// Records how a job goes (see [`AgentReport`]).
pub async fn report(
    state: &AppState,
    outpost: &str,
    r: &BackupRef,
    report: &AgentReport,
) -> ApiResult<Backup> {
    let mut backup = owned(state, outpost, r).await?;
    let now = Utc::now();
    match report.op.as_str() {
        "backup" => {
            if !backup.state.is_open() {
                return Err(not_open(r, "backup", backup.state));
            }
            backup.uploaded += state.backups().take_uploads(r.id);
            match report.state {
                BackupState::Running => {
                    backup.state = BackupState::Running;
                    backup.message = report.message.clone();
                    backup.size = report.size;
                }
                BackupState::Failed => {
                    backup.state = BackupState::Failed;
                    backup.message = report.message.clone();
                    backup.size = report.size;
                    backup.finished_at = Some(now);
                }
                other => {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid-report",
                        format!("a backup is not reported {other}: it completes with its manifest"),
                        "PUT …/manifest to complete a backup",
                    ));
                }
            }
        }
        "restore" => {
            let now_state = backup
                .restore
                .as_ref()
                .map_or(BackupState::Completed, |x| x.state);
            let restore = backup
                .restore
                .as_mut()
                .filter(|x| x.state.is_open())
                .ok_or_else(|| not_open(r, "restore", now_state))?;
            restore.state = report.state;
            restore.message = report.message.clone();
            if !report.state.is_open() {
                restore.finished_at = Some(now);
            }
        }
        other => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid-report",
                format!("unknown operation {other:?}"),
                "op is `backup` or `restore`",
            ));
        }
    }
    save(state, outpost, r, &backup).await?;
    Ok(backup)
}

/// Of `digests`, those the hub lacks (the others are marked as wanted, so
/// garbage collection keeps them while the backup runs).
pub async fn missing(
    state: &AppState,
    outpost: &str,
    r: &BackupRef,
    digests: Vec<Digest>,
) -> ApiResult<Vec<Digest>> {
    let backup = owned(state, outpost, r).await?;
    if !backup.state.is_open() {
        return Err(not_open(r, "backup", backup.state));
    }
    state
        .chunks()
        .missing_of(digests)
        .await
        .map_err(|e| e.to_api("looking up which chunks the hub has"))
}

/// Stores one chunk of a backup in progress, once it verifies.
pub async fn put_chunk(
    state: &AppState,
    outpost: &str,
    r: &BackupRef,
    digest: &Digest,
    stored: Bytes,
) -> ApiResult<trellis_cas::ChunkInfo> {
    let backup = owned(state, outpost, r).await?;
    if !backup.state.is_open() {
        return Err(not_open(r, "backup", backup.state));
    }
    let info = state
        .chunks()
        .put_stored(digest, stored)
        .await
        .map_err(|e| e.to_api(&format!("chunk {digest} of backup {} was not stored", r.id)))?;
    state.backups().add_upload(r.id, info.stored);
    Ok(info)
}

/// Completes a backup with its manifest (JSON): refused unless every
/// chunk it lists is stored.
pub async fn complete(
    state: &AppState,
    outpost: &str,
    r: &BackupRef,
    manifest: &[u8],
) -> ApiResult<Backup> {
    let mut backup = owned(state, outpost, r).await?;
    if !backup.state.is_open() {
        return Err(not_open(r, "backup", backup.state));
    }
    let parsed = BackupManifest::parse(manifest).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-manifest",
            format!("backup {}: {e}", r.id),
            "this is a fault in the agent; look at its log",
        )
    })?;
    let listed = parsed.chunks();
    let lacking = state
        .chunks()
        .missing_of(listed)
        .await
        .map_err(|e| e.to_api("checking a backup's chunks"))?;
    if let Some(first) = lacking.first() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "chunks-missing",
            format!(
                "backup {}: {} chunks its manifest lists are not on the hub (the first: {first})",
                r.id,
                lacking.len()
            ),
            "upload them (ask POST …/missing again), then send the manifest",
        ));
    }
    let stored = trellis_cas::compress(&parsed.to_bytes())
        .map_err(|e| ApiError::internal(format!("compressing a backup manifest: {e}")))?;
    let digest = Digest::of(&parsed.to_bytes());
    state
        .chunks()
        .put_stored(&digest, Bytes::from(stored))
        .await
        .map_err(|e| e.to_api(&format!("backup {}'s manifest was not stored", r.id)))?;
    backup.uploaded += state.backups().take_uploads(r.id);
    backup.state = BackupState::Completed;
    backup.message = String::new();
    backup.finished_at = Some(Utc::now());
    backup.size = parsed.size();
    backup.manifest = Some(digest.as_hex());
    backup.volumes = parsed.volumes.iter().map(|v| v.name.clone()).collect();
    save(state, outpost, r, &backup).await?;
    tracing::info!(project = %r.project, stage = %r.stage, id = r.id, size = backup.size, uploaded = backup.uploaded, "backup completed");
    Ok(backup)
}

fn manifest_digest(backup: &Backup, r: &BackupRef) -> ApiResult<Digest> {
    backup
        .manifest
        .as_deref()
        .and_then(|m| m.parse().ok())
        .filter(|_| backup.state == BackupState::Completed)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "backup-not-completed",
                format!(
                    "backup {} of stage {}/{} is {}, so it has nothing to restore",
                    r.id, r.project, r.stage, backup.state
                ),
                "restore a completed backup (`trellis list backup` shows them)",
            )
        })
}

/// Reads and parses a stored backup manifest.
pub async fn read_manifest(
    state: &AppState,
    digest: &Digest,
) -> Result<BackupManifest, ChunkError> {
    let bytes = state.chunks().read(digest).await?;
    BackupManifest::parse(&bytes).map_err(|e| ChunkError::Damaged {
        store: state.chunks().describe(),
        digest: *digest,
        reason: e.to_string(),
    })
}

/// The manifest (JSON) of a completed backup, for a restore.
pub async fn manifest(state: &AppState, outpost: &str, r: &BackupRef) -> ApiResult<Bytes> {
    let backup = owned(state, outpost, r).await?;
    let digest = manifest_digest(&backup, r)?;
    let manifest = read_manifest(state, &digest)
        .await
        .map_err(|e| restore_chunk_error(e, r))?;
    Ok(Bytes::from(manifest.to_bytes()))
}

fn restore_chunk_error(e: ChunkError, r: &BackupRef) -> ApiError {
    match e {
        ChunkError::NotFound { .. } | ChunkError::Damaged { .. } => ApiError::new(
            StatusCode::CONFLICT,
            "backup-damaged",
            format!(
                "backup {} of stage {}/{} cannot be read: {e}",
                r.id, r.project, r.stage
            ),
            "the hub's copy is lost or damaged; restore another backup",
        ),
        other => other.to_api(&format!("reading backup {}", r.id)),
    }
}

/// A chunk (stored form) of a completed backup, for a restore. Only
/// chunks its manifest lists. Not verified here: the agent verifies every
/// chunk before it uses it.
pub async fn chunk(
    state: &AppState,
    outpost: &str,
    r: &BackupRef,
    digest: &Digest,
) -> ApiResult<Bytes> {
    let backup = owned(state, outpost, r).await?;
    let manifest_digest = manifest_digest(&backup, r)?;
    let cached = state
        .backups()
        .listed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&manifest_digest)
        .cloned();
    let listed = match cached {
        Some(listed) => listed,
        None => {
            let manifest = read_manifest(state, &manifest_digest)
                .await
                .map_err(|e| restore_chunk_error(e, r))?;
            let listed: Arc<HashSet<Digest>> = Arc::new(manifest.chunks().into_iter().collect());
            let mut cache = state
                .backups()
                .listed
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            // A few restores' worth; a manifest is read again if pushed out.
            if cache.len() >= 64 {
                cache.clear();
            }
            cache.insert(manifest_digest, listed.clone());
            listed
        }
    };
    if !listed.contains(digest) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "backup-not-found",
            format!("backup {} lists no chunk {digest}", r.id),
            "ask only for the chunks of the backup's manifest",
        ));
    }
    match state.chunks().backend().get(digest).await {
        Ok(Some(bytes)) => Ok(bytes),
        Ok(None) => Err(restore_chunk_error(
            ChunkError::NotFound {
                store: state.chunks().describe(),
                digest: *digest,
            },
            r,
        )),
        Err(e) => Err(e.to_api(&format!("reading chunk {digest} of backup {}", r.id))),
    }
}
