//! The one error type every API handler returns, and its JSON shape.
//!
//! Every error a client sees has a stable `code` (for programs), a `message`
//! (what happened, in words) and a `hint` (what to try). The HTTP status
//! follows from the code.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use trellis_store::StoreError;

/// The body of every error response: `{"error": {...}}`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable, e.g. `not-found`, `unauthenticated`.
    pub code: String,
    pub message: String,
    pub hint: String,
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub hint: String,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            hint: hint.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid-request", message, hint)
    }

    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            message,
            "send an access key as `Authorization: Bearer <key-id>:<secret>`; with the CLI set \
             TRELLIS_KEY or run `trellis login`. Ask an administrator for a key if you have none",
        )
    }

    pub fn forbidden(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message, hint)
    }

    pub fn not_found(kind: &str, name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("{kind} {name:?} does not exist"),
            format!("check the name; `trellis list {kind}` shows what exists"),
        )
    }

    /// A project the caller may not see looks exactly like one that does not
    /// exist, so that membership of other projects is not disclosed.
    pub fn project_not_found(name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("project {name:?} does not exist or you are not a member of it"),
            "check the name with `trellis list project`, or ask the project's owner to add you",
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            message,
            "this is a fault in the hub; retry, and if it persists look at the hub's log",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
                hint: self.hint,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound { kind, name } => ApiError::not_found(kind, &name),
            StoreError::AlreadyExists { kind, name } => ApiError::new(
                StatusCode::CONFLICT,
                "already-exists",
                format!("{kind} {name:?} already exists"),
                format!("choose another name, or use the existing {kind}"),
            ),
            StoreError::InUse { what, hint } => {
                ApiError::new(StatusCode::CONFLICT, "in-use", what, hint)
            }
            err @ StoreError::Backend { .. } => {
                tracing::error!(error = %err, "store failure");
                ApiError::internal(err.to_string())
            }
        }
    }
}

impl From<trellis_model::NameError> for ApiError {
    fn from(err: trellis_model::NameError) -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid-name",
            err.to_string(),
            "names are DNS labels, e.g. `web`, `factory-7`",
        )
    }
}

/// The refusal of a change to something archived (deleted, kept until its
/// retention ends): `restore` names what to restore.
pub fn archived(
    kind: &str,
    name: &str,
    project: &str,
    at: chrono::DateTime<chrono::Utc>,
) -> ApiError {
    let restore = if kind == "project" {
        format!("trellis restore project {project}")
    } else {
        format!("trellis restore stage {name} -p {project}")
    };
    ApiError::new(
        StatusCode::CONFLICT,
        "archived",
        format!(
            "{kind} {name:?} was deleted on {} and is archived; it takes no changes",
            at.format("%Y-%m-%d %H:%M UTC")
        ),
        format!("restore it first (`{restore}`), or create another"),
    )
}

pub type ApiResult<T> = Result<T, ApiError>;
