//! Request extractors that answer malformed input in the API's error shape
//! (`{"error": {code, message, hint}}`) instead of axum's plain text.
//! Handlers import these in place of axum's `Json`, `Path` and `Query`.

use axum::extract::FromRequest;
use axum::extract::FromRequestParts;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// A JSON body. Every body the API takes is an object: anything else (an
/// array, which serde would otherwise read field by field into a struct, a
/// number, `null`) is refused like any body of the wrong shape.
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        let axum::Json(mut value) =
            axum::Json::<serde_json::Value>::from_request(req, state).await?;
        if !value.is_object() {
            return Err(invalid_body("the body is not a JSON object".into()));
        }
        integral_numbers(&mut value);
        serde_json::from_value(value)
            .map(Json)
            .map_err(|e| invalid_body(e.to_string()))
    }
}

/// Numbers without a fractional part as integers: JSON (and JSON Schema)
/// make no difference between `5` and `5.0`, serde's integer fields do.
fn integral_numbers(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Number(n) if n.is_f64() => {
            if let Some(f) = n.as_f64()
                && f.fract() == 0.0
            {
                // Exactly representable (|f| below 2^63), or left as it is.
                if (-9.223_372_036_854_776e18..9.223_372_036_854_776e18).contains(&f) {
                    *value = serde_json::Value::from(f as i64);
                } else if (0.0..1.844_674_407_370_955_2e19).contains(&f) {
                    *value = serde_json::Value::from(f as u64);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(integral_numbers),
        serde_json::Value::Object(fields) => fields.values_mut().for_each(integral_numbers),
        _ => {}
    }
}

fn invalid_body(why: String) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid-body",
        format!("the request body was not accepted: {why}"),
        "send a JSON body as described in /api/v1/openapi.json",
    )
}

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
        let status = rejection.status();
        // axum's statuses: 400 for text that is not JSON, 422 for JSON of
        // another shape, 415 without the JSON content type, 413 over the
        // body limit.
        let code = match status {
            StatusCode::UNPROCESSABLE_ENTITY => "invalid-body",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported-media-type",
            StatusCode::PAYLOAD_TOO_LARGE => "body-too-large",
            _ => "invalid-json",
        };
        let hint = match status {
            StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                "send the body with `Content-Type: application/json`"
            }
            StatusCode::PAYLOAD_TOO_LARGE => "a JSON body may be at most 2 MiB",
            _ => "send a JSON body as described in /api/v1/openapi.json",
        };
        ApiError::new(
            status,
            code,
            format!(
                "the request body was not accepted: {}",
                rejection.body_text()
            ),
            hint,
        )
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid-path",
            format!("the URL was not understood: {}", rejection.body_text()),
            "check the names and numbers in the URL",
        )
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid-query",
            format!(
                "the query string was not understood: {}",
                rejection.body_text()
            ),
            "see /api/v1/openapi.json for the parameters this endpoint takes",
        )
    }
}
