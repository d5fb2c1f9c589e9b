//! Requests that need a live link, sent to the hub instance holding it.
//!
//! A client may reach any instance (through a balancer); the agent's link
//! is on one. Reading logs needs that link, so the instance the client
//! reached sends the request on to the holder (found in the store's link
//! claims, see [`super::Cluster::holder`]) and streams its answer back.
//!
//! The holder must know who asked without a second sign-in: the request
//! carries `x-trellis-forwarded: <from-instance> <user> <unix seconds>
//! <mac>`, where the MAC is a keyed BLAKE3 of the method, path and query,
//! user, time and sender under a key derived from the link secret every
//! instance shares. The holder accepts it for 60 seconds and treats the
//! request as the user's (its own access checks run again), and never
//! forwards it further. Instances reach each other over HTTPS with the
//! hub's own CA as the only trust root.

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use futures_util::StreamExt;
use trellis_store::Instance;

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// The header a forwarded request carries.
pub const HEADER: &str = "x-trellis-forwarded";

/// How old a forwarded request may be, and how far ahead the sender's
/// clock.
const FRESH_FOR: i64 = 60;

fn mac(key: &[u8; 32], method: &str, path: &str, user: &str, at: i64, from: &str) -> String {
    let mut hasher = blake3::Hasher::new_keyed(key);
    for part in [method, path, user, &at.to_string(), from] {
        hasher.update(part.as_bytes());
        hasher.update(b"\0");
    }
    hasher.finalize().to_hex().to_string()
}

/// The header value for forwarding `method path` on behalf of `user`.
pub fn sign(state: &AppState, method: &str, path: &str, user: &str) -> String {
    let at = chrono::Utc::now().timestamp();
    let from = state.cluster().id();
    let tag = mac(
        &state.link_secret().forward_key(),
        method,
        path,
        user,
        at,
        from,
    );
    format!("{from} {user} {at} {tag}")
}

/// The user a forwarded request acts for, if its header verifies.
pub fn verify(state: &AppState, method: &str, path: &str, value: &str) -> ApiResult<String> {
    let refused = |why: &str| {
        ApiError::unauthenticated(format!(
            "the forwarded request was refused: {why}; the hub instances must share their link secret"
        ))
    };
    let parts: Vec<&str> = value.split(' ').collect();
    let [from, user, at, tag] = parts[..] else {
        return Err(refused("its header is malformed"));
    };
    let at: i64 = at
        .parse()
        .map_err(|_| refused("its time is not a number"))?;
    let age = chrono::Utc::now().timestamp() - at;
    if !(-FRESH_FOR..=FRESH_FOR).contains(&age) {
        return Err(refused("it is too old (or the instances' clocks disagree)"));
    }
    let want = mac(
        &state.link_secret().forward_key(),
        method,
        path,
        user,
        at,
        from,
    );
    // Compared as BLAKE3 hashes, in constant time.
    let ok = blake3::Hash::from_hex(tag)
        .ok()
        .zip(blake3::Hash::from_hex(&want).ok())
        .is_some_and(|(a, b)| a == b);
    if !ok {
        return Err(refused("its signature does not verify"));
    }
    Ok(user.to_owned())
}

/// The client instances reach each other with: the hub's CA only.
fn client(state: &AppState) -> ApiResult<reqwest::Client> {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    if let Some(client) = CLIENT.get() {
        return Ok(client.clone());
    }
    let ca = reqwest::Certificate::from_pem(state.ca().cert_pem().as_bytes())
        .map_err(|e| ApiError::internal(format!("the hub's CA cannot be used: {e}")))?;
    let client = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .connect_timeout(Duration::from_secs(5))
        .no_proxy()
        .build()
        .map_err(|e| ApiError::internal(format!("setting up forwarding failed: {e}")))?;
    Ok(CLIENT.get_or_init(|| client).clone())
}

/// Sends `GET /api/v1<path>` (`path` with its query, as the API's router
/// sees it, which is what is signed) to `to` for `user` and streams its
/// answer back.
pub async fn get(state: &AppState, to: &Instance, user: &str, path: &str) -> ApiResult<Response> {
    let unreachable = |e: String| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "hub-instance-unreachable",
            format!(
                "the hub instance {} ({}) that holds this outpost's link did not answer: {e}",
                to.id, to.address
            ),
            "retry in a moment: if that instance is gone, its outposts link to another one within a heartbeat or two",
        )
    };
    let signed = sign(state, "GET", path, user);
    let response = client(state)?
        .get(format!("https://{}/api/v1{path}", to.address))
        .header(HEADER, signed)
        .send()
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    state
        .cluster()
        .forwarded
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let status = response.status();
    let mut headers = Vec::new();
    for name in [header::CONTENT_TYPE, header::CACHE_CONTROL] {
        if let Some(v) = response.headers().get(name.as_str())
            && let Ok(v) = HeaderValue::from_bytes(v.as_bytes())
        {
            headers.push((name, v));
        }
    }
    let body = Body::from_stream(
        response
            .bytes_stream()
            .map(|chunk| chunk.map_err(std::io::Error::other)),
    );
    let mut out = Response::new(body);
    *out.status_mut() = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    for (name, value) in headers {
        out.headers_mut().insert(name, value);
    }
    Ok(out)
}
