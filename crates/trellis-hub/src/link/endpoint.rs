//! The link's HTTP endpoints: the WebSocket an agent keeps open
//! (`/link/v1`), enrolment with a join token (`/api/v1/agent/join`),
//! and certificate renewal after expiry (`/api/v1/agent/renew`).
//! Artifacts are served by [`super::artifacts`].

use std::time::Duration;

use async_trait::async_trait;
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use trellis_link::identity::{IssuedCert, PeerIdentity};
use trellis_link::{
    Incoming, LinkIo, LinkIoError, MAX_FRAME_BYTES, WireFrame, decode, decode_binary_shared,
    encode_wire,
};
use trellis_store::{JoinTokenRefusal, StoreError};
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
        let message = match encode_wire(envelope)? {
            WireFrame::Text(text) => WsMessage::Text(text.into()),
            WireFrame::Binary(bytes) => WsMessage::Binary(bytes.into()),
        };
        self.0
            .send(message)
            .await
            .map_err(|e| LinkIoError::Transport(e.to_string()))
    }

    async fn recv(&mut self) -> Result<Option<Incoming>, LinkIoError> {
        let Some(message) = self.0.recv().await else {
            return Ok(None);
        };
        Ok(
            match message.map_err(|e| LinkIoError::Transport(e.to_string()))? {
                WsMessage::Text(text) => Some(Incoming::Frame(decode(text.as_bytes())?)),
                WsMessage::Binary(bytes) => Some(Incoming::Frame(decode_binary_shared(bytes)?)),
                WsMessage::Pong(payload) => Some(Incoming::Pong(payload.to_vec())),
                // Answered by the WebSocket layer itself; the session only
                // learns the agent is alive.
                WsMessage::Ping(_) => Some(Incoming::Ping),
                WsMessage::Close(_) => None,
            },
        )
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
    // The certificate alone (checked against the hub's CA in the TLS
    // handshake) names the outpost; admission comes before any database
    // read, so the links a storm refuses cost the hub no reads.
    let peer = match presented_peer(connection) {
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
    if let Err(wait) = state.links().admit(&peer.outpost) {
        // Whole seconds, rounded up so the agent does not come back before
        // its slot (and at least one).
        let secs = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
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
    if let Err(e) = check_registered(&state, &peer).await {
        return e.into_response();
    }
    upgrade
        .read_buffer_size(trellis_link::LINK_READ_BUFFER_BYTES)
        // Frames are sent and flushed one by one; nothing to gather.
        .write_buffer_size(0)
        .max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .on_upgrade(move |socket| super::session::run(Box::new(AxumLink(socket)), peer, state))
}

/// The outpost agent behind a request: a client certificate of this hub's
/// CA (verified during the TLS handshake), for an outpost that exists, is
/// not revoked, and whose registered key it carries.
pub(crate) async fn authorize_agent(
    state: &AppState,
    connection: Option<axum::Extension<ConnectionInfo>>,
) -> Result<PeerIdentity, ApiError> {
    let peer = presented_peer(connection)?;
    check_registered(state, &peer).await?;
    Ok(peer)
}

/// The outpost identity of the client certificate the connection presented.
fn presented_peer(
    connection: Option<axum::Extension<ConnectionInfo>>,
) -> Result<PeerIdentity, ApiError> {
    connection.and_then(|c| c.0.peer).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "client-certificate-required",
            "this endpoint is for outpost agents, which connect with their client certificate",
            "enrol the agent with `trellis agent join HUB --token TOKEN`",
        )
    })
}

/// The peer's outpost exists, is not revoked, and linked with the key
/// registered for it.
async fn check_registered(state: &AppState, peer: &PeerIdentity) -> Result<(), ApiError> {
    let (outpost, link) = match state.store().get_outpost_and_link(&peer.outpost).await {
        Ok(found) => found,
        Err(StoreError::NotFound { .. }) => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "unknown-outpost",
                format!("this hub has no outpost {:?} any more", peer.outpost),
                "ask the administrator to register it again and re-join the agent",
            ));
        }
        // The database failed or is overloaded: that says nothing about
        // the outpost, so it must not be told it is unknown.
        Err(e) => return Err(e.into()),
    };
    if outpost.revoked_at.is_some() {
        return Err(revoked(&outpost.name));
    }
    let registered = link.key_fingerprint;
    if registered.as_deref() != Some(peer.public_key_fingerprint.to_string().as_str()) {
        return Err(unknown_key(&outpost.name));
    }
    Ok(())
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
                StatusCode::UNPROCESSABLE_ENTITY,
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
    let (record, mut link) = match state.store().get_outpost_and_link(outpost).await {
        Ok(found) => found,
        Err(StoreError::NotFound { .. }) => return Err(unknown_key(outpost)),
        Err(e) => return Err(e.into()),
    };
    if record.revoked_at.is_some() {
        return Err(revoked(outpost));
    }
    let issued = issue(state, outpost, csr_pem)?;
    if link.key_fingerprint.as_deref() != Some(issued.public_key_fingerprint.to_string().as_str()) {
        return Err(unknown_key(outpost));
    }
    link.cert_serial = Some(issued.serial_hex.clone());
    link.cert_not_after = Some(issued.not_after);
    state.store().put_outpost_link(&link).await?;
    Ok(issued)
}
