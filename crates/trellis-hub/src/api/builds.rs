//! Builds and the blobs (packed `process:` directories) they reference.

use std::io::Write;

use crate::extract::{Json, Path};
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::Utc;
use tokio_stream::StreamExt;
use trellis_cas::Digest;
use trellis_model::manifest::{ComponentSource, DockerBuild, parse_manifest};
use trellis_model::{Artifact, Build, NewBuild};

use super::types::BlobInfoResponse;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// Newest first.
#[utoipa::path(get, path = "/projects/{project}/builds", tag = "builds", responses((status = 200, body = Vec<Build>)))]
pub async fn list_builds(
    State(state): State<AppState>,
    caller: Caller,
    Path(project): Path<String>,
) -> ApiResult<Json<Vec<Build>>> {
    caller.role_in(&state, &project).await?;
    Ok(Json(state.store().list_builds(&project).await?))
}

#[utoipa::path(get, path = "/projects/{project}/builds/{build}", tag = "builds", responses((status = 200, body = Build)))]
pub async fn get_build(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, build)): Path<(String, String)>,
) -> ApiResult<Json<Build>> {
    caller.role_in(&state, &project).await?;
    Ok(Json(state.store().get_build(&project, &build).await?))
}

/// Records a build. The manifest must be valid, and every component must
/// come with its artifact: the image reference of a `docker.image`
/// component, the digest of an uploaded package for a `process:` one.
#[utoipa::path(post, path = "/projects/{project}/builds", tag = "builds", request_body = NewBuild,
    responses((status = 201, body = Build)))]
pub async fn create_build(
    State(state): State<AppState>,
    caller: Caller,
    Path(project): Path<String>,
    Json(req): Json<NewBuild>,
) -> ApiResult<(StatusCode, Json<Build>)> {
    caller.role_in(&state, &project).await?;
    check_build(&state, &req)?;
    let build = state
        .store()
        .create_build(&project, &req, &caller.user, Utc::now())
        .await?;
    Ok((StatusCode::CREATED, Json(build)))
}

#[utoipa::path(delete, path = "/projects/{project}/builds/{build}", tag = "builds", responses((status = 204)))]
pub async fn delete_build(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, build)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    caller.role_in(&state, &project).await?;
    state.store().delete_build(&project, &build).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn invalid_build(message: impl Into<String>, hint: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid-build", message, hint)
}

fn check_build(state: &AppState, build: &NewBuild) -> ApiResult<()> {
    let commit_ok = matches!(build.commit.len(), 40 | 64)
        && build.commit.bytes().all(|b| b.is_ascii_hexdigit());
    if !commit_ok {
        return Err(invalid_build(
            format!("{:?} is not a git commit id", build.commit),
            "send the full hexadecimal commit id (`git rev-parse HEAD`)",
        ));
    }
    if build.branch.is_empty() || build.branch.len() > 255 {
        return Err(invalid_build(
            "the branch name is empty or longer than 255 characters",
            "push builds from a checked-out branch",
        ));
    }
    let manifest = parse_manifest(&build.manifest).map_err(|errors| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid-manifest",
            format!("{} is not a valid manifest:\n{errors}", build.manifest_file),
            "fix it and check with `trellis validate manifest PATH` before pushing",
        )
    })?;
    for component in &manifest.components {
        let artifact = build
            .components
            .iter()
            .find(|c| c.name == component.name)
            .map(|c| &c.artifact)
            .ok_or_else(|| {
                invalid_build(
                    format!(
                        "the build has no artifact for component {:?}",
                        component.name
                    ),
                    "push builds with `trellis push build`, which packs every component",
                )
            })?;
        match (&component.source, artifact) {
            (ComponentSource::Docker(docker), Artifact::Image { reference }) => {
                if !matches!(&docker.build, DockerBuild::Image(image) if image == reference) {
                    return Err(invalid_build(
                        format!(
                            "component {:?}: image {reference:?} is not the manifest's image",
                            component.name
                        ),
                        "the build must use the image the manifest names",
                    ));
                }
            }
            (ComponentSource::Process(_), Artifact::Package { digest, size }) => {
                let parsed: Digest = digest.parse().map_err(|e| {
                    invalid_build(format!("component {:?}: {e}", component.name), "")
                })?;
                match state.blobs().size(&parsed) {
                    Ok(Some(stored)) if stored == *size => {}
                    Ok(_) => {
                        return Err(invalid_build(
                            format!(
                                "component {:?}: package {digest} ({size} bytes) has not been uploaded",
                                component.name
                            ),
                            "upload it first (`trellis push build` does this)",
                        ));
                    }
                    Err(e) => return Err(ApiError::internal(e.to_string())),
                }
            }
            _ => {
                return Err(invalid_build(
                    format!(
                        "component {:?}: the artifact's kind does not match the manifest",
                        component.name
                    ),
                    "docker components take an image, process components a package",
                ));
            }
        }
    }
    if let Some(extra) = build
        .components
        .iter()
        .find(|c| manifest.component(&c.name).is_none())
    {
        return Err(invalid_build(
            format!(
                "the build has an artifact for {:?}, which the manifest does not name",
                extra.name
            ),
            "send artifacts only for the manifest's components",
        ));
    }
    Ok(())
}

/// The largest blob the hub accepts in one upload.
pub const MAX_BLOB_BYTES: u64 = 8 << 30;

/// Whether the hub already has a blob (so clients upload only what it lacks).
#[utoipa::path(head, path = "/blobs/{digest}", tag = "builds", responses((status = 200), (status = 404)))]
pub async fn head_blob(
    State(state): State<AppState>,
    _caller: Caller,
    Path(digest): Path<String>,
) -> ApiResult<StatusCode> {
    let digest = parse_digest(&digest)?;
    match state.blobs().size(&digest) {
        Ok(Some(_)) => Ok(StatusCode::OK),
        Ok(None) => Ok(StatusCode::NOT_FOUND),
        Err(e) => Err(ApiError::internal(e.to_string())),
    }
}

/// Uploads a blob. The body is hashed while it is written to a temporary
/// file; only if it hashes to `digest` does it become visible.
#[utoipa::path(put, path = "/blobs/{digest}", tag = "builds", request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = BlobInfoResponse)))]
pub async fn put_blob(
    State(state): State<AppState>,
    _caller: Caller,
    Path(digest): Path<String>,
    body: Body,
) -> ApiResult<(StatusCode, Json<BlobInfoResponse>)> {
    let expected = parse_digest(&digest)?;
    let writer = state
        .blobs()
        .writer()
        .map_err(|e| ApiError::internal(e.to_string()))?;
    // File writes block, so they happen on a blocking thread fed by a
    // bounded channel; the channel's bound keeps memory flat for big blobs.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(8);
    let write_task = tokio::task::spawn_blocking(move || {
        let mut writer = writer;
        while let Some(chunk) = rx.blocking_recv() {
            writer.write_all(&chunk)?;
        }
        Ok::<_, std::io::Error>(writer)
    });
    let mut stream = body.into_data_stream();
    let mut received: u64 = 0;
    let mut failure = None;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => {
                received += chunk.len() as u64;
                if received > MAX_BLOB_BYTES {
                    failure = Some(ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "too-large",
                        format!("the upload exceeds the hub's limit of {MAX_BLOB_BYTES} bytes"),
                        "split the component's directory, or leave large data out of the package",
                    ));
                    break;
                }
                if tx.send(chunk).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                failure = Some(ApiError::bad_request(
                    format!("the upload was interrupted: {e}"),
                    "push again; blobs already on the hub are not sent twice",
                ));
                break;
            }
        }
    }
    drop(tx);
    let writer = write_task
        .await
        .map_err(|e| ApiError::internal(format!("the blob writer failed: {e}")))?
        .map_err(|e| ApiError::internal(format!("writing the blob failed: {e}")))?;
    if let Some(failure) = failure {
        // Dropping the unfinished writer removes its temporary file.
        drop(writer);
        return Err(failure);
    }
    let info = tokio::task::spawn_blocking(move || writer.finish(Some(&expected)))
        .await
        .map_err(|e| ApiError::internal(format!("the blob writer failed: {e}")))?
        .map_err(|e| {
            ApiError::bad_request(
                format!("the upload was not stored: {e}"),
                "the bytes sent do not hash to the digest in the URL; push again",
            )
        })?;
    Ok((
        StatusCode::CREATED,
        Json(BlobInfoResponse {
            digest: info.digest.to_string(),
            size: info.size,
        }),
    ))
}

fn parse_digest(s: &str) -> ApiResult<Digest> {
    s.parse().map_err(|e| {
        ApiError::bad_request(
            format!("{s:?} is not a blob digest: {e}"),
            "a digest is 64 lowercase hexadecimal characters (BLAKE3)",
        )
    })
}
