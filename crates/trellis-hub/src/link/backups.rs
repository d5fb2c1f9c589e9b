//! The outpost agent's backup endpoints (`/api/v1/agent/backups/…`,
//! mutual TLS): thin HTTP around [`crate::backups`], which also serves the
//! local outpost directly. See that module for the flow.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use trellis_model::Backup;

use super::endpoint::authorize_agent;
use crate::api::chunks::{MAX_STORED_CHUNK_BYTES, parse_digest, parse_digest_query};
use crate::api::types::{ChunkInfoResponse, MissingChunksResponse};
use crate::backups::{AgentMissing, AgentReport, BackupRef, MAX_MANIFEST_BYTES};
use crate::error::{ApiError, ApiResult};
use crate::extract::{Json, Path};
use crate::state::AppState;
use crate::tls::ConnectionInfo;

type Connection = Option<axum::Extension<ConnectionInfo>>;

fn backup_ref(project: String, stage: String, id: u64) -> BackupRef {
    BackupRef { project, stage, id }
}

async fn body_bytes(body: Body, limit: usize, what: &str) -> ApiResult<Bytes> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "upload-failed",
            format!(
                "the {what} was not received: the upload broke off or exceeds {limit} bytes ({e})"
            ),
            "the agent sends it again on its next try",
        )
    })
}

fn octets(bytes: Bytes) -> Response {
    let mut response = Response::new(Body::from(bytes));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    response
}

/// How a backup or restore job goes, as the agent sees it.
#[utoipa::path(post, path = "/agent/backups/{project}/{stage}/{id}/report", tag = "outposts",
    params(crate::api::params::BackupPath), request_body = AgentReport,
    responses((status = 200, body = Backup)))]
pub async fn backup_report(
    State(state): State<AppState>,
    connection: Connection,
    Path((project, stage, id)): Path<(String, String, u64)>,
    Json(report): Json<AgentReport>,
) -> ApiResult<Json<Backup>> {
    let peer = authorize_agent(&state, connection).await?;
    let r = backup_ref(project, stage, id);
    Ok(Json(
        crate::backups::report(&state, &peer.outpost, &r, &report).await?,
    ))
}

/// Which of these chunks of a backup in progress the hub lacks.
#[utoipa::path(post, path = "/agent/backups/{project}/{stage}/{id}/missing", tag = "outposts",
    params(crate::api::params::BackupPath), request_body = AgentMissing,
    responses((status = 200, body = MissingChunksResponse)))]
pub async fn backup_missing(
    State(state): State<AppState>,
    connection: Connection,
    Path((project, stage, id)): Path<(String, String, u64)>,
    Json(req): Json<AgentMissing>,
) -> ApiResult<Json<MissingChunksResponse>> {
    let peer = authorize_agent(&state, connection).await?;
    let digests = parse_digest_query(&req.digests)?;
    let r = backup_ref(project, stage, id);
    let missing = crate::backups::missing(&state, &peer.outpost, &r, digests).await?;
    Ok(Json(MissingChunksResponse {
        missing: missing.iter().map(|d| d.as_hex()).collect(),
    }))
}

/// Stores one chunk of a backup in progress (its stored form: a zstd frame
/// of content that hashes to `digest`), or sends one of a completed backup
/// for a restore.
#[utoipa::path(put, path = "/agent/backups/{project}/{stage}/{id}/chunks/{digest}", tag = "outposts",
    params(crate::api::params::BackupChunkPath),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = ChunkInfoResponse)))]
pub async fn put_backup_chunk(
    State(state): State<AppState>,
    connection: Connection,
    Path((project, stage, id, digest)): Path<(String, String, u64, String)>,
    body: Body,
) -> ApiResult<(StatusCode, Json<ChunkInfoResponse>)> {
    let peer = authorize_agent(&state, connection).await?;
    let digest = parse_digest(&digest)?;
    let body = body_bytes(body, MAX_STORED_CHUNK_BYTES, "chunk").await?;
    let r = backup_ref(project, stage, id);
    let info = crate::backups::put_chunk(&state, &peer.outpost, &r, &digest, body).await?;
    Ok((
        StatusCode::CREATED,
        Json(ChunkInfoResponse {
            digest: info.digest.as_hex(),
            size: info.size,
            stored: info.stored,
        }),
    ))
}

/// One chunk (stored form) of a completed backup, for a restore: only
/// chunks its manifest lists.
#[utoipa::path(get, path = "/agent/backups/{project}/{stage}/{id}/chunks/{digest}", tag = "outposts",
    params(crate::api::params::BackupChunkPath),
    responses((status = 200, description = "The stored chunk", content_type = "application/octet-stream", body = Vec<u8>)))]
pub async fn get_backup_chunk(
    State(state): State<AppState>,
    connection: Connection,
    Path((project, stage, id, digest)): Path<(String, String, u64, String)>,
) -> Response {
    let result = async {
        let peer = authorize_agent(&state, connection).await?;
        let digest = parse_digest(&digest)?;
        let r = backup_ref(project, stage, id);
        crate::backups::chunk(&state, &peer.outpost, &r, &digest).await
    }
    .await;
    match result {
        Ok(bytes) => octets(bytes),
        Err(e) => e.into_response(),
    }
}

/// Completes a backup with its manifest (JSON): refused while a chunk it
/// lists is not on the hub.
#[utoipa::path(put, path = "/agent/backups/{project}/{stage}/{id}/manifest", tag = "outposts",
    params(crate::api::params::BackupPath),
    request_body(content = Vec<u8>, content_type = "application/json"),
    responses((status = 200, body = Backup)))]
pub async fn put_backup_manifest(
    State(state): State<AppState>,
    connection: Connection,
    Path((project, stage, id)): Path<(String, String, u64)>,
    body: Body,
) -> ApiResult<Json<Backup>> {
    let peer = authorize_agent(&state, connection).await?;
    let body = body_bytes(body, MAX_MANIFEST_BYTES, "manifest").await?;
    let r = backup_ref(project, stage, id);
    Ok(Json(
        crate::backups::complete(&state, &peer.outpost, &r, &body).await?,
    ))
}

/// The manifest (JSON) of a completed backup, for a restore.
#[utoipa::path(get, path = "/agent/backups/{project}/{stage}/{id}/manifest", tag = "outposts",
    params(crate::api::params::BackupPath),
    responses((status = 200, description = "The manifest", content_type = "application/octet-stream", body = Vec<u8>)))]
pub async fn get_backup_manifest(
    State(state): State<AppState>,
    connection: Connection,
    Path((project, stage, id)): Path<(String, String, u64)>,
) -> Response {
    let result = async {
        let peer = authorize_agent(&state, connection).await?;
        let r = backup_ref(project, stage, id);
        crate::backups::manifest(&state, &peer.outpost, &r).await
    }
    .await;
    match result {
        Ok(bytes) => octets(bytes),
        Err(e) => e.into_response(),
    }
}
