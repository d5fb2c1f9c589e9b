//! The ingress's own answers: small plain-text pages that say what
//! happened, who serves the host, and what to try. Each ends with a `code:`
//! line (also sent as the `x-trellis-error` header) that stays the same
//! across versions, for scripts and monitoring.

use std::fmt::Display;

use hyper::body::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

use crate::body::ProxyBody;

/// The header carrying an error page's code.
pub const ERROR_CODE_HEADER: &str = "x-trellis-error";

/// The stable codes of the error pages.
pub(crate) mod code {
    /// 400: no Host, or one that is not a host name.
    pub const BAD_HOST: &str = "bad-host";
    /// 400: a CONNECT request; this is no forward proxy.
    pub const CONNECT: &str = "connect-refused";
    /// 404: no route for the host.
    pub const UNKNOWN_HOST: &str = "unknown-host";
    /// 404: the host is served, but not on this path.
    pub const UNKNOWN_PATH: &str = "unknown-path";
    /// 503: the route has no endpoint.
    pub const NO_REPLICA: &str = "no-replica";
    /// 502: every endpoint refused the connection.
    pub const UNREACHABLE: &str = "backend-unreachable";
    /// 502: the backend closed or broke the connection before answering.
    pub const BACKEND_FAILED: &str = "backend-failed";
}

pub(crate) fn page(
    status: StatusCode,
    code: &'static str,
    message: impl Display,
) -> Response<ProxyBody> {
    let text = format!(
        "{} {}\n{message}\ncode: {code}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    let mut response = Response::new(ProxyBody::Page(Some(Bytes::from(text))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    // The page repeats text from the request (host, path): never let a
    // browser take it for HTML.
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(ERROR_CODE_HEADER, HeaderValue::from_static(code));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    }
    response
}
