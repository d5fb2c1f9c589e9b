//! Uploading artifacts as chunks: the client asks which chunks the hub
//! lacks, then sends only those (BRIEF §5).
//!
//! Chunks travel in their stored form (one zstd frame) and are named by the
//! BLAKE3 digest of their uncompressed content; the hub decompresses and
//! hashes every upload before storing it, so a damaged or forged chunk is
//! refused and nothing is half-written.

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use trellis_cas::{Digest, MAX_CHUNK_BYTES};

use super::types::{ChunkInfoResponse, MissingChunksRequest, MissingChunksResponse};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Json, Path};
use crate::state::AppState;

/// The most digests one `missing` request may ask about.
pub const MAX_DIGESTS_PER_QUERY: usize = 10_000;

/// The largest stored chunk an upload may carry: a chunk that does not
/// compress at all is a little larger than its content.
pub const MAX_STORED_CHUNK_BYTES: usize = (MAX_CHUNK_BYTES as usize) + 64 * 1024;

/// Which of the given chunks the hub does not have. Chunks it has are
/// marked as wanted, which keeps them through garbage collection's grace
/// period while the client finishes its push.
#[utoipa::path(post, path = "/chunks/missing", tag = "builds", request_body = MissingChunksRequest,
    responses((status = 200, body = MissingChunksResponse)))]
pub async fn missing_chunks(
    State(state): State<AppState>,
    _caller: Caller,
    Json(req): Json<MissingChunksRequest>,
) -> ApiResult<Json<MissingChunksResponse>> {
    let digests = parse_digest_query(&req.digests)?;
    let missing = state
        .chunks()
        .missing_of(digests)
        .await
        .map_err(|e| e.to_api("looking up which chunks the hub has"))?
        .into_iter()
        .map(|d| d.as_hex())
        .collect();
    Ok(Json(MissingChunksResponse { missing }))
}

/// Stores one chunk, sent in its stored form (a zstd frame of content that
/// hashes to `digest`).
#[utoipa::path(put, path = "/chunks/{digest}", tag = "builds",
    params(crate::api::params::DigestPath),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = ChunkInfoResponse)))]
pub async fn put_chunk(
    State(state): State<AppState>,
    _caller: Caller,
    Path(digest): Path<String>,
    body: Body,
) -> ApiResult<(StatusCode, Json<ChunkInfoResponse>)> {
    let digest = parse_digest(&digest)?;
    // Read with our own bound (JSON bodies keep axum's 2 MiB default).
    let body = axum::body::to_bytes(body, MAX_STORED_CHUNK_BYTES)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "chunk-upload-failed",
                format!(
                    "chunk {digest} was not stored: the upload broke off or exceeds {MAX_STORED_CHUNK_BYTES} bytes ({e})"
                ),
                "upload with `trellis push build`, which cuts artifacts into chunks of the right size; push again if the connection dropped",
            )
        })?;
    let info = state
        .chunks()
        .put_stored(&digest, body)
        .await
        .map_err(|e| e.to_api(&format!("chunk {digest} was not stored")))?;
    Ok((
        StatusCode::CREATED,
        Json(ChunkInfoResponse {
            digest: info.digest.as_hex(),
            size: info.size,
            stored: info.stored,
        }),
    ))
}

/// The digests of a "which of these do you lack" query: at most
/// [`MAX_DIGESTS_PER_QUERY`], each a valid digest.
pub(crate) fn parse_digest_query(digests: &[String]) -> ApiResult<Vec<Digest>> {
    if digests.len() > MAX_DIGESTS_PER_QUERY {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "too-many-digests",
            format!(
                "{} digests in one query; the hub answers for at most {MAX_DIGESTS_PER_QUERY}",
                digests.len()
            ),
            "ask in batches",
        ));
    }
    digests.iter().map(|d| parse_digest(d)).collect()
}

pub(crate) fn parse_digest(s: &str) -> ApiResult<Digest> {
    s.parse().map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid-digest",
            format!("{s:?} is not a chunk digest: {e}"),
            "a digest is 64 lowercase hexadecimal characters (BLAKE3)",
        )
    })
}
