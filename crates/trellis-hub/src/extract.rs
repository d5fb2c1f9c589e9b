//! Request extractors that answer malformed input in the API's error shape
//! (`{"error": {code, message, hint}}`) instead of axum's plain text.
//! Handlers import these in place of axum's `Json`, `Path` and `Query`.

use axum::extract::FromRequest;
use axum::extract::FromRequestParts;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::error::ApiError;

#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Json<T>(pub T);

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let mut err = ApiError::bad_request(
            format!(
                "the request body was not accepted: {}",
                rejection.body_text()
            ),
            "send a JSON body as described in /api/v1/openapi.json",
        );
        err.status = rejection.status();
        err
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::bad_request(
            format!("the URL was not understood: {}", rejection.body_text()),
            "check the names and numbers in the URL",
        )
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::bad_request(
            format!(
                "the query string was not understood: {}",
                rejection.body_text()
            ),
            "see /api/v1/openapi.json for the parameters this endpoint takes",
        )
    }
}
