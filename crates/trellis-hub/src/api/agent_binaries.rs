//! Agent binaries per version and architecture (see
//! [`crate::agent_binaries`]): uploaded by administrators, listed and
//! downloaded by anyone who can reach the hub — an outpost being installed
//! holds no credentials yet, and the binary is no secret.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use trellis_model::AgentBinary;

use crate::agent_binaries::{MAX_BINARY_BYTES, Stored, check_path, store_binary};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Json, Path};
use crate::state::AppState;

/// Every agent binary the hub holds, newest version first.
#[utoipa::path(get, path = "/agent-binaries", tag = "agent-binaries",
    responses((status = 200, body = Vec<AgentBinary>)))]
pub async fn list_agent_binaries(
    State(state): State<AppState>,
) -> ApiResult<Json<Vec<AgentBinary>>> {
    Ok(Json(state.store().list_agent_binaries().await?))
}

/// Uploads the agent binary `version` for `arch` (administrators). The
/// body is the executable itself; its ELF header must name `arch`. The
/// same binary again is accepted (200); another binary under a version
/// already held is refused.
#[utoipa::path(put, path = "/agent-binaries/{version}/{arch}", tag = "agent-binaries",
    params(crate::api::params::AgentBinaryPath),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses(
        (status = 201, description = "Stored", body = AgentBinary),
        (status = 200, description = "The hub held this binary already", body = AgentBinary),
    ))]
pub async fn put_agent_binary(
    State(state): State<AppState>,
    caller: Caller,
    Path((version, arch)): Path<(String, String)>,
    body: Body,
) -> ApiResult<(StatusCode, Json<AgentBinary>)> {
    caller.require_admin("upload agent binaries")?;
    check_path(&version, &arch)?;
    let bytes = axum::body::to_bytes(body, MAX_BINARY_BYTES)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "binary-too-large",
                format!(
                    "agent binary {version}/{arch} was not stored: the upload broke off or exceeds {MAX_BINARY_BYTES} bytes ({e})"
                ),
                "upload the trellis-agent executable (a few MB); retry if the connection dropped",
            )
        })?;
    let (binary, stored) = store_binary(&state, &version, &arch, bytes, &caller.user).await?;
    let status = match stored {
        Stored::New => StatusCode::CREATED,
        Stored::Again => StatusCode::OK,
    };
    Ok((status, Json(binary)))
}

/// Downloads agent binary `version` for `arch`, streamed from the chunk
/// store and verified on the way (a damaged chunk ends the download with
/// an error, never with wrong bytes). Headers give its digests.
#[utoipa::path(get, path = "/agent-binaries/{version}/{arch}", tag = "agent-binaries",
    params(crate::api::params::AgentBinaryPath),
    responses(
        (status = 200, description = "The executable", content_type = "application/octet-stream", body = Vec<u8>),
    ))]
pub async fn get_agent_binary(
    State(state): State<AppState>,
    Path((version, arch)): Path<(String, String)>,
) -> ApiResult<Response> {
    check_path(&version, &arch)?;
    let binary = state.store().get_agent_binary(&version, &arch).await?;
    let doing = format!("serving agent binary {version}/{arch}");
    let digest = crate::api::chunks::parse_digest(&binary.manifest)?;
    let index = state
        .chunks()
        .artifact(&digest)
        .await
        .map_err(|e| e.to_api(&doing))?;
    let size = index.size;
    let rx = state.chunks().content(digest, index);
    let mut response = Response::new(Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    for (name, value) in [
        (header::CONTENT_LENGTH.as_str(), size.to_string()),
        ("x-trellis-blake3", binary.blake3.clone()),
        ("x-trellis-sha256", binary.sha256.clone()),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
    Ok(response)
}

/// Deletes agent binary `version` for `arch` (administrators); its chunks
/// are collected later.
#[utoipa::path(delete, path = "/agent-binaries/{version}/{arch}", tag = "agent-binaries",
    params(crate::api::params::AgentBinaryPath),
    responses((status = 204)))]
pub async fn delete_agent_binary(
    State(state): State<AppState>,
    caller: Caller,
    Path((version, arch)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    caller.require_admin("delete agent binaries")?;
    check_path(&version, &arch)?;
    state.store().delete_agent_binary(&version, &arch).await?;
    Ok(StatusCode::NO_CONTENT)
}
