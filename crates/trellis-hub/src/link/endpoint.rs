//! The link's HTTP endpoints: the WebSocket an agent keeps open
//! (`/link/v1`), enrolment with a join token (`/api/v1/agent/join`),
//! certificate renewal after expiry (`/api/v1/agent/renew`), and the
//! packages of process components (`/api/v1/agent/packages/{digest}`).

use std::time::Duration;

use async_trait::async_trait;
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use trellis_link::identity::{IssuedCert, PeerIdentity};
use trellis_link::{Incoming, LinkIo, LinkIoError, MAX_FRAME_BYTES, decode, encode};
use trellis_store::JoinTokenRefusal;
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult};
use crate::extract::Json;
use crate::state::AppState;
use crate::tls::ConnectionInfo;

// === impl AxumLink ===

/// A [`LinkIo`] over the hub's end of an upgraded WebSocket.
struct AxumLink(WebSocket);

#[async_trait]
impl LinkIo for AxumLink {
    async fn send(&mut self, envelope: &trellis_link::Envelope) -> Result<(), LinkIoError> {
        let bytes = encode(envelope)?;
        let text = String::from_utf8(bytes).map_err(|e| LinkIoError::Transport(e.to_string()))?;
        self.0
            .send(WsMessage::Text(text.into()))
            .await
            .map_err(|e| LinkIoError::Transport(e.to_string()))
    }

    async fn recv(&mut self) -> Result<Option<Incoming>, LinkIoError> {
        loop {
            let Some(message) = self.0.recv().await else {
                return Ok(None);
            };
            match message.map_err(|e| LinkIoError::Transport(e.to_string()))? {
                WsMessage::Text(text) => {
                    return Ok(Some(Incoming::Frame(decode(text.as_bytes())?)));
                }
                WsMessage::Binary(bytes) => return Ok(Some(Incoming::Frame(decode(&bytes)?))),
                WsMessage::Pong(payload) => return Ok(Some(Incoming::Pong(payload.to_vec()))),
                // Pings are answered by the WebSocket layer itself.
                WsMessage::Ping(_) => continue,
                WsMessage::Close(_) => return Ok(None),
            }
        }
    }

    async fn ping(&mut self, payload: Vec<u8>) -> Result<(), LinkIoError> {
        self.0
            .send(WsMessage::Ping(payload.into()))
            .await
            .map_err(|e| LinkIoError::Transport(e.to_string()))
    }

    async fn close(&mut self, reason: &str) {
        let frame = CloseFrame {
            code: axum::extract::ws::close_code::NORMAL,
            reason: reason.chars().take(120).collect::<String>().into(),
        };
        let _ = self.0.send(WsMessage::Close(Some(frame))).await;
    }
}

// === the link endpoint ===

/// `GET /link/v1`: an agent's WebSocket. Needs the outpost's client
/// certificate; refused for revoked outposts and keys that are not the
/// registered one; told when to retry while the hub is admitting too many
/// links at once.
pub async fn link(
    State(state): State<AppState>,
    connection: Option<axum::Extension<ConnectionInfo>>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let peer = match authorize_agent(&state, connection).await {
        Ok(peer) => peer,
        Err(e) => return e.into_response(),
    };
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(rejection) => {
            return ApiError::bad_request(
                format!(
                    "this endpoint takes a WebSocket upgrade: {}",
                    rejection.body_text()
                ),
                "it is for outpost agents; `trellis agent run` connects to it",
            )
            .into_response();
        }
    };
    if let Err(wait) = state.links().admit() {
        // Whole seconds, at least one, so agents spread their retries.
        let secs = wait.as_secs().max(1);
        let mut response = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            format!("the hub is admitting many links at once; retry in {secs} s"),
            "the agent retries by itself",
        )
        .into_response();
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return response;
    }
    upgrade
        .max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .on_upgrade(move |socket| super::session::run(Box::new(AxumLink(socket)), peer, state))
}

/// The outpost agent behind a request: a client certificate of this hub's
/// CA (verified during the TLS handshake), for an outpost that exists, is
/// not revoked, and whose registered key it carries.
async fn authorize_agent(
    state: &AppState,
    connection: Option<axum::Extension<ConnectionInfo>>,
) -> Result<PeerIdentity, ApiError> {
    let Some(peer) = connection.and_then(|c| c.0.peer) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "client-certificate-required",
            "this endpoint is for outpost agents, which connect with their client certificate",
            "enrol the agent with `trellis agent join HUB --token TOKEN`",
        ));
    };
    let outpost = match state.store().get_outpost(&peer.outpost).await {
        Ok(o) => o,
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "unknown-outpost",
                format!("this hub has no outpost {:?} any more", peer.outpost),
                "ask the administrator to register it again and re-join the agent",
            ));
        }
    };
    if outpost.revoked_at.is_some() {
        return Err(revoked(&outpost.name));
    }
    let registered = state
        .store()
        .get_outpost_link(&outpost.name)
        .await
        .ok()
        .and_then(|l| l.key_fingerprint);
    if registered.as_deref() != Some(peer.public_key_fingerprint.to_string().as_str()) {
        return Err(unknown_key(&outpost.name));
    }
    Ok(peer)
}

fn revoked(outpost: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "revoked",
        format!("outpost {outpost:?} was revoked by an administrator"),
        "ask the administrator; to use this host again it needs a new outpost and `trellis agent join`",
    )
}

fn unknown_key(outpost: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "unknown-key",
        format!("this agent's key is not the one registered for outpost {outpost:?}"),
        "another agent joined as this outpost since; join this host again with a new token",
    )
}

// === enrolment ===

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JoinRequest {
    pub outpost: String,
    /// The join token's secret, 64 hexadecimal characters.
    pub token_secret: String,
    pub csr_pem: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RenewRequest {
    pub outpost: String,
    /// A CSR made with the agent's registered key.
    pub csr_pem: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct IssuedCertificate {
    pub outpost: String,
    pub cert_pem: String,
    pub ca_pem: String,
    pub not_after: DateTime<Utc>,
}

/// The hash under which a join token's secret is stored.
pub fn token_hash(secret: &[u8; 32]) -> String {
    blake3::hash(secret).to_hex().to_string()
}

/// Enrols an agent: the join token (once, before it expires) buys a client
/// certificate for the agent's own key.
#[utoipa::path(post, path = "/agent/join", tag = "outposts", request_body = JoinRequest,
    responses((status = 200, body = IssuedCertificate)))]
pub async fn join(
    State(state): State<AppState>,
    Json(req): Json<JoinRequest>,
) -> ApiResult<axum::Json<IssuedCertificate>> {
    let refused = |code: &'static str, message: &str, hint: &str| {
        ApiError::new(StatusCode::UNAUTHORIZED, code, message, hint)
    };
    let secret = hex::decode(req.token_secret.trim())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| {
            refused(
                "join-token-unknown",
                "the join token is not one this hub issued",
                "copy the whole token printed by `trellis create outpost`",
            )
        })?;
    let outpost = match state
        .store()
        .consume_join_token(&token_hash(&secret), Utc::now())
        .await?
    {
        Ok(outpost) => outpost,
        Err(JoinTokenRefusal::Unknown) => {
            return Err(refused(
                "join-token-unknown",
                "the join token is not one this hub issued",
                "check you are joining the right hub; ask the administrator for a token (`trellis create join-token OUTPOST`)",
            ));
        }
        Err(JoinTokenRefusal::AlreadyUsed) => {
            return Err(refused(
                "join-token-used",
                "the join token was used already; a token enrols one agent once",
                "ask the administrator for a new token (`trellis create join-token OUTPOST`)",
            ));
        }
        Err(JoinTokenRefusal::Expired) => {
            return Err(refused(
                "join-token-expired",
                "the join token has expired",
                "ask the administrator for a new token (`trellis create join-token OUTPOST`)",
            ));
        }
    };
    if outpost != req.outpost {
        return Err(refused(
            "join-token-unknown",
            "the join token is not one this hub issued for that outpost",
            "use the token exactly as printed",
        ));
    }
    let record = state.store().get_outpost(&outpost).await?;
    if record.revoked_at.is_some() {
        return Err(revoked(&outpost));
    }
    let issued = issue(&state, &outpost, &req.csr_pem)?;
    let mut link = state.store().get_outpost_link(&outpost).await?;
    link.key_fingerprint = Some(issued.public_key_fingerprint.to_string());
    link.cert_serial = Some(issued.serial_hex.clone());
    link.cert_not_after = Some(issued.not_after);
    state.store().put_outpost_link(&link).await?;
    tracing::info!(%outpost, "agent joined");
    Ok(axum::Json(certificate_response(&state, &outpost, issued)))
}

/// Renews an expired certificate: the CSR must be signed with the key the
/// agent registered when it joined, which proves it is the same agent.
#[utoipa::path(post, path = "/agent/renew", tag = "outposts", request_body = RenewRequest,
    responses((status = 200, body = IssuedCertificate)))]
pub async fn renew(
    State(state): State<AppState>,
    Json(req): Json<RenewRequest>,
) -> ApiResult<axum::Json<IssuedCertificate>> {
    let issued = issue_for_registered_key(&state, &req.outpost, &req.csr_pem).await?;
    Ok(axum::Json(certificate_response(
        &state,
        &req.outpost,
        issued,
    )))
}

fn certificate_response(state: &AppState, outpost: &str, issued: IssuedCert) -> IssuedCertificate {
    IssuedCertificate {
        outpost: outpost.to_owned(),
        cert_pem: issued.cert_pem,
        ca_pem: state.ca().cert_pem().to_owned(),
        not_after: issued.not_after,
    }
}

fn issue(state: &AppState, outpost: &str, csr_pem: &str) -> ApiResult<IssuedCert> {
    let validity: Duration = state.links().settings().cert_validity;
    state
        .ca()
        .issue_client_cert(csr_pem, outpost, validity, Utc::now())
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "csr-invalid",
                e.to_string(),
                "the agent makes the CSR itself; update the agent if this persists",
            )
        })
}

/// Issues a certificate for a CSR whose key is the outpost's registered
/// one (renewal, over the link or after expiry).
pub async fn issue_for_registered_key(
    state: &AppState,
    outpost: &str,
    csr_pem: &str,
) -> ApiResult<IssuedCert> {
    let record = state
        .store()
        .get_outpost(outpost)
        .await
        .map_err(|_| unknown_key(outpost))?;
    if record.revoked_at.is_some() {
        return Err(revoked(outpost));
    }
    let mut link = state.store().get_outpost_link(outpost).await?;
    let issued = issue(state, outpost, csr_pem)?;
    if link.key_fingerprint.as_deref() != Some(issued.public_key_fingerprint.to_string().as_str()) {
        return Err(unknown_key(outpost));
    }
    link.cert_serial = Some(issued.serial_hex.clone());
    link.cert_not_after = Some(issued.not_after);
    state.store().put_outpost_link(&link).await?;
    Ok(issued)
}

// === packages ===

/// Whether a build released to a stage on `outpost` has the package
/// `digest` (releases are history, so a rollback target counts too).
async fn outpost_uses_package(state: &AppState, outpost: &str, digest: &str) -> ApiResult<bool> {
    for stage in state.store().stages_on_outpost(outpost).await? {
        let mut seen = std::collections::HashSet::new();
        for release in state
            .store()
            .list_releases(&stage.project, &stage.name)
            .await?
        {
            if !seen.insert(release.build.clone()) {
                continue;
            }
            let Ok(build) = state
                .store()
                .get_build(&stage.project, &release.build)
                .await
            else {
                continue;
            };
            if build.components.iter().any(|c| {
                matches!(&c.artifact, trellis_model::Artifact::Package { digest: d, .. } if d == digest)
            }) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// A single byte range (`bytes=A-B`, `bytes=A-`, `bytes=-N`) of a blob of
/// `len` bytes, as inclusive bounds. `Ok(None)`: serve the whole blob (no
/// range, or one this endpoint does not do, such as several ranges).
/// `Err(())`: the range lies outside the blob.
fn byte_range(header: Option<&HeaderValue>, len: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = header
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("bytes="))
    else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((start, end)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (start, end) = (start.trim(), end.trim());
    let range = if start.is_empty() {
        let Ok(suffix) = end.parse::<u64>() else {
            return Ok(None);
        };
        if suffix == 0 || len == 0 {
            return Err(());
        }
        (len.saturating_sub(suffix), len - 1)
    } else {
        let Ok(start) = start.parse::<u64>() else {
            return Ok(None);
        };
        let end = match end {
            "" => len.saturating_sub(1),
            e => match e.parse::<u64>() {
                Ok(e) => e.min(len.saturating_sub(1)),
                Err(_) => return Ok(None),
            },
        };
        if start >= len || end < start {
            return Err(());
        }
        (start, end)
    };
    Ok(Some(range))
}

/// A process component's package, for the outpost agents that run it:
/// needs the agent's client certificate, and the package must belong to a
/// build released to a stage on that outpost. Supports one `Range`, so an
/// interrupted download resumes.
#[utoipa::path(get, path = "/agent/packages/{digest}", tag = "outposts",
    params(
        ("digest" = String, Path, description = "BLAKE3 digest of the package, 64 lowercase hexadecimal characters"),
        ("Range" = Option<String>, Header, description = "One byte range, e.g. `bytes=1000-`"),
    ),
    responses(
        (status = 200, description = "The package", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 206, description = "The requested range of the package", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 401, description = "No client certificate", body = crate::error::ErrorBody),
        (status = 403, description = "The outpost is revoked or the key is not its registered one", body = crate::error::ErrorBody),
        (status = 404, description = "No such package for this outpost", body = crate::error::ErrorBody),
        (status = 416, description = "The range lies outside the package", body = crate::error::ErrorBody),
    ))]
pub async fn package(
    State(state): State<AppState>,
    connection: Option<axum::Extension<ConnectionInfo>>,
    crate::extract::Path(digest): crate::extract::Path<String>,
    headers: axum::http::HeaderMap,
) -> Response {
    match serve_package(&state, connection, &digest, &headers).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn serve_package(
    state: &AppState,
    connection: Option<axum::Extension<ConnectionInfo>>,
    digest: &str,
    headers: &axum::http::HeaderMap,
) -> ApiResult<Response> {
    let peer = authorize_agent(state, connection).await?;
    let parsed: trellis_cas::Digest = digest.parse().map_err(|e| {
        ApiError::bad_request(
            format!("{digest:?} is not a package digest: {e}"),
            "a digest is 64 lowercase hexadecimal characters (BLAKE3)",
        )
    })?;
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "package-not-found",
            format!(
                "this hub has no package {digest} for outpost {:?}",
                peer.outpost
            ),
            "the package belongs to a build released to a stage on this outpost; push the build again if it was deleted",
        )
    };
    if !outpost_uses_package(state, &peer.outpost, digest).await? {
        return Err(not_found());
    }
    let path = state.blobs().path(&parsed);
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_found()),
        Err(e) => {
            return Err(ApiError::internal(format!(
                "cannot open package {digest}: {e}"
            )));
        }
    };
    let len = file
        .metadata()
        .await
        .map_err(|e| ApiError::internal(format!("cannot read package {digest}: {e}")))?
        .len();
    let range = match byte_range(headers.get(header::RANGE), len) {
        Ok(range) => range,
        Err(()) => {
            let mut response = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range-not-satisfiable",
                format!("package {digest} has {len} bytes; the requested range lies outside"),
                "ask for a range within the package, or for all of it",
            )
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                response.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(response);
        }
    };
    let (status, start, count) = match range {
        Some((start, end)) => (StatusCode::PARTIAL_CONTENT, start, end - start + 1),
        None => (StatusCode::OK, 0, len),
    };
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    if start > 0 {
        file.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(|e| ApiError::internal(format!("cannot read package {digest}: {e}")))?;
    }
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file.take(count)));
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&count.to_string()) {
        h.insert(header::CONTENT_LENGTH, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"{digest}\"")) {
        h.insert(header::ETAG, v);
    }
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{len}", start + count - 1))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(v: &str, len: u64) -> Result<Option<(u64, u64)>, ()> {
        byte_range(Some(&HeaderValue::from_str(v).unwrap()), len)
    }

    #[test]
    fn reads_byte_ranges() {
        assert_eq!(byte_range(None, 10), Ok(None));
        assert_eq!(range("bytes=0-", 10), Ok(Some((0, 9))));
        assert_eq!(range("bytes=4-", 10), Ok(Some((4, 9))));
        assert_eq!(range("bytes=2-5", 10), Ok(Some((2, 5))));
        assert_eq!(range("bytes=2-50", 10), Ok(Some((2, 9))));
        assert_eq!(range("bytes=-3", 10), Ok(Some((7, 9))));
        assert_eq!(range("bytes=-30", 10), Ok(Some((0, 9))));
        assert_eq!(range("bytes=10-", 10), Err(()));
        assert_eq!(range("bytes=5-2", 10), Err(()));
        assert_eq!(range("bytes=0-1,3-4", 10), Ok(None));
        assert_eq!(range("items=0-1", 10), Ok(None));
        assert_eq!(range("bytes=x-", 10), Ok(None));
    }
}
