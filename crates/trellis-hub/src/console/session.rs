//! Signing in to the console with an access key, and recognising the
//! signed-in user on later requests.
//!
//! The session cookie is `<key-id>.<expires>.<mac>`: the access key's id,
//! when the session ends (Unix seconds), and a keyed BLAKE3 MAC over both
//! with a key derived from the hub's `link.secret`. The secret part of the
//! access key never leaves the sign-in request. Every request looks the
//! key id up again, so deleting the key ends its sessions at once; a hub
//! restart does not.
//!
//! The cookie is `HttpOnly` and `SameSite=Lax` (and `Secure` over HTTPS).
//! Requests that change something must also come from the console's own
//! pages: [`same_origin`] refuses cross-site form posts.

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::Utc;
use serde::Deserialize;
use trellis_model::AccessKey;

use super::view::is_local_path;
use super::{ConsoleError, Form, Page, render};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;

pub const COOKIE: &str = "trellis_session";
/// How long a console session lasts.
pub const LIFETIME_SECS: i64 = 12 * 3600;

/// The cookie value for a session of `key_id` ending at `expires`.
pub fn sign(key: &[u8; 32], key_id: &str, expires: i64) -> String {
    format!("{key_id}.{expires}.{}", mac(key, key_id, expires).to_hex())
}

/// The key id of a session cookie that is genuine and not expired.
pub fn verify<'a>(key: &[u8; 32], value: &'a str, now: i64) -> Option<&'a str> {
    let mut parts = value.splitn(3, '.');
    let (key_id, expires, tag) = (parts.next()?, parts.next()?, parts.next()?);
    let expires: i64 = expires.parse().ok()?;
    let tag = blake3::Hash::from_hex(tag).ok()?;
    // `blake3::Hash` compares in constant time.
    (tag == mac(key, key_id, expires) && now < expires).then_some(key_id)
}

fn mac(key: &[u8; 32], key_id: &str, expires: i64) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new_keyed(key);
    hasher.update(b"trellis console session v1\0");
    hasher.update(key_id.as_bytes());
    hasher.update(b"\0");
    hasher.update(&expires.to_be_bytes());
    hasher.finalize()
}

fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
}

/// The signed-in user of a console request. Without a valid session the
/// browser is sent to the sign-in page, and back here afterwards.
pub struct Signed(pub Caller);

impl FromRequestParts<AppState> for Signed {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let key = state.link_secret().console_session_key();
        let key_id = cookie_value(&parts.headers, COOKIE)
            .and_then(|value| verify(&key, value, Utc::now().timestamp()));
        let Some(key_id) = key_id else {
            return Err(to_sign_in(parts));
        };
        let store = state.store();
        let stored = store
            .find_access_key(key_id)
            .await
            .map_err(|e| ConsoleError::from(e).into_response())?;
        let Some(stored) = stored else {
            return Err(to_sign_in(parts));
        };
        let user = store
            .get_user(&stored.info.user)
            .await
            .map_err(|e| ConsoleError::from(e).into_response())?;
        Ok(Signed(Caller {
            user: user.name,
            admin: user.admin,
            key_id: stored.info.id,
            forwarded: false,
        }))
    }
}

fn to_sign_in(parts: &Parts) -> Response {
    // A page load goes to the sign-in form and comes back; a script's
    // request (a fragment, a live stream) gets a plain 401 it can show.
    if parts.method == Method::GET && !parts.headers.contains_key(super::FRAGMENT_HEADER) {
        let next = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let target = format!("/login?next={}", urlencode(next));
        return Redirect::to(&target).into_response();
    }
    ConsoleError(ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
        "you are not signed in, or your session ended",
        "reload the page and sign in with your access key",
    ))
    .into_response()
}

fn urlencode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Refuses a request that changes something unless it comes from a page of
/// this hub: browsers send `Origin` (and `Sec-Fetch-Site`) with form posts
/// and scripts' requests, so a form on another site cannot act as the
/// signed-in user.
pub async fn same_origin(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if request.method() == Method::GET || request.method() == Method::HEAD {
        return next.run(request).await;
    }
    let headers = request.headers();
    let site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    let cross_site = matches!(site, Some(s) if s != "same-origin" && s != "none");
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    let foreign_origin = match (origin, host) {
        (Some(origin), Some(host)) => {
            let origin_host = origin
                .strip_prefix("https://")
                .or_else(|| origin.strip_prefix("http://"));
            origin_host != Some(host)
        }
        (Some(_), None) => true,
        (None, _) => false,
    };
    if cross_site || foreign_origin {
        return ConsoleError(ApiError::new(
            StatusCode::FORBIDDEN,
            "cross-site-request",
            "this request came from a page that is not this hub's console, so it was refused",
            "open the console at this hub's own address and try again from there",
        ))
        .into_response();
    }
    next.run(request).await
}

#[derive(askama::Template)]
#[template(path = "login.html")]
struct LoginPage {
    page: Page,
    next: String,
    error: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
pub struct NextQuery {
    #[serde(default)]
    next: Option<String>,
}

fn safe_next(next: Option<String>) -> String {
    next.filter(|n| is_local_path(n))
        .unwrap_or_else(|| "/projects".to_owned())
}

pub async fn login_form(
    axum::extract::Query(q): axum::extract::Query<NextQuery>,
) -> Result<Response, ConsoleError> {
    let page = LoginPage {
        page: Page::anonymous("Sign in"),
        next: safe_next(q.next),
        error: None,
    };
    Ok(render(&page)?.into_response())
}

#[derive(Debug, Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    key: String,
    #[serde(default)]
    next: Option<String>,
}

pub async fn login(
    State(state): State<AppState>,
    parts: Parts,
    Form(form): Form<LoginForm>,
) -> Result<Response, ConsoleError> {
    let next = safe_next(form.next);
    let refused = |message: String| -> Result<Response, ConsoleError> {
        let page = LoginPage {
            page: Page::anonymous("Sign in"),
            next: next.clone(),
            error: Some(message),
        };
        Ok((StatusCode::UNAUTHORIZED, render(&page)?).into_response())
    };
    let key: AccessKey = match form.key.trim().parse() {
        Ok(key) => key,
        Err(e) => return refused(format!("{e}")),
    };
    if let Err(e) = state.keys().verify(state.store(), &key).await {
        return refused(e.message);
    }
    let expires = Utc::now().timestamp() + LIFETIME_SECS;
    let value = sign(&state.link_secret().console_session_key(), &key.id, expires);
    let secure = if over_https(&parts) { "; Secure" } else { "" };
    let cookie = format!(
        "{COOKIE}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={LIFETIME_SECS}{secure}"
    );
    Ok(([(header::SET_COOKIE, cookie)], Redirect::to(&next)).into_response())
}

pub async fn logout(parts: Parts) -> Response {
    let secure = if over_https(&parts) { "; Secure" } else { "" };
    let cookie = format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0{secure}");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/login")).into_response()
}

/// Requests that came through the hub's TLS listener carry its connection
/// information.
fn over_https(parts: &Parts) -> bool {
    parts
        .extensions
        .get::<crate::tls::ConnectionInfo>()
        .is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [7; 32];

    #[test]
    fn a_signed_session_verifies_until_it_expires() {
        let value = sign(&KEY, "tk_0011223344556677", 1_000);
        assert_eq!(verify(&KEY, &value, 999), Some("tk_0011223344556677"));
        assert_eq!(verify(&KEY, &value, 1_000), None);
    }

    #[test]
    fn altered_or_foreign_sessions_are_refused() {
        let value = sign(&KEY, "tk_0011223344556677", 1_000);
        let longer = value.replace(".1000.", ".9000.");
        assert_eq!(verify(&KEY, &longer, 10), None);
        let other_key = value.replace("tk_0011223344556677", "tk_7766554433221100");
        assert_eq!(verify(&KEY, &other_key, 10), None);
        assert_eq!(verify(&[8; 32], &value, 10), None);
        for garbage in ["", "x", "a.b", "a.1.zz", "a.1.", ".."] {
            assert_eq!(verify(&KEY, garbage, 10), None, "{garbage:?}");
        }
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            "a=1; trellis_session=v.1.x; b=2".parse().unwrap(),
        );
        assert_eq!(cookie_value(&headers, COOKIE), Some("v.1.x"));
        assert_eq!(cookie_value(&headers, "c"), None);
    }
}
