//! Outposts as records (administrators). The link to an outpost's agent is
//! the link layer's business.

use crate::extract::{Json, Path, Query};
use axum::extract::State;
use axum::http::StatusCode;
use chrono::Utc;
use trellis_model::{LOCAL_OUTPOST, NameKind, Outpost, validate_name};

use super::types::{CreateOutpostRequest, DeleteQuery};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

#[utoipa::path(get, path = "/outposts", tag = "outposts", responses((status = 200, body = Vec<Outpost>)))]
pub async fn list_outposts(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Vec<Outpost>>> {
    caller.require_admin("list outposts")?;
    Ok(Json(state.store().list_outposts().await?))
}

#[utoipa::path(post, path = "/outposts", tag = "outposts", request_body = CreateOutpostRequest,
    responses((status = 201, body = Outpost)))]
pub async fn create_outpost(
    State(state): State<AppState>,
    caller: Caller,
    Json(req): Json<CreateOutpostRequest>,
) -> ApiResult<(StatusCode, Json<Outpost>)> {
    caller.require_admin("create outposts")?;
    validate_name(NameKind::Outpost, &req.name)?;
    for (key, value) in &req.labels {
        if !is_label_part(key) || value.len() > 253 || value.chars().any(char::is_control) {
            return Err(ApiError::bad_request(
                format!("label {key:?}={value:?} is not valid"),
                "label keys use letters, digits, '-', '_', '.', '/' (at most 63 characters); values are plain text",
            ));
        }
    }
    let outpost = Outpost {
        display_name: req.display_name.unwrap_or_else(|| req.name.clone()),
        name: req.name,
        description: req.description,
        labels: req.labels,
        max_stages: req.max_stages,
        uri_generation: 1,
        revoked_at: None,
        created_at: Utc::now(),
    };
    state.store().create_outpost(&outpost).await?;
    Ok((StatusCode::CREATED, Json(outpost)))
}

#[utoipa::path(get, path = "/outposts/{outpost}", tag = "outposts", responses((status = 200, body = Outpost)))]
pub async fn get_outpost(
    State(state): State<AppState>,
    caller: Caller,
    Path(outpost): Path<String>,
) -> ApiResult<Json<Outpost>> {
    caller.require_admin("inspect outposts")?;
    Ok(Json(state.store().get_outpost(&outpost).await?))
}

#[utoipa::path(delete, path = "/outposts/{outpost}", tag = "outposts",
    params(("force" = Option<bool>, Query, description = "also delete the stages placed on it")),
    responses((status = 204)))]
pub async fn delete_outpost(
    State(state): State<AppState>,
    caller: Caller,
    Path(outpost): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> ApiResult<StatusCode> {
    caller.require_admin("delete outposts")?;
    if outpost == LOCAL_OUTPOST {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "in-use",
            "the local outpost is part of the hub and cannot be deleted",
            "delete the stages on it instead",
        ));
    }
    state.store().delete_outpost(&outpost, q.force).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn is_label_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}
