//! The production transport: TLS with the agent's client certificate
//! (tokio-rustls, trusting only the hub CA), then a WebSocket upgrade to
//! `GET /link/v1` over that stream. Each WebSocket text message is one
//! envelope ([`trellis_link::frame`]).
//!
//! [`HubConnector`] reads the identity from the state on every attempt, so
//! a certificate renewed over the link is used from the next connection on;
//! if the stored certificate has expired it first renews it over HTTPS
//! ([`crate::join::renew_expired`]). The hub's refusals before the upgrade
//! are mapped for [`crate::link::run_link`]: `503` + `Retry-After` → wait,
//! `403 revoked` → stop.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::error::CapacityError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use trellis_link::identity::client_config;
use trellis_link::readahead::ReadAhead;
use trellis_link::{
    Envelope, FrameError, Incoming, LinkIo, LinkIoError, MAX_FRAME_BYTES, WireFrame,
};

use crate::https::{self, HubUrl};
use crate::link::{ConnectError, Connector};
use crate::state::AgentState;
use crate::{blocking, cert, join};

/// The link endpoint on the hub.
pub const LINK_PATH: &str = "/link/v1";

/// How long a close may take before the connection is just dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The WebSocket close reason is limited to 123 bytes by RFC 6455.
const MAX_CLOSE_REASON: usize = 123;

/// A [`LinkIo`] over a WebSocket on any stream (TLS in production).
#[derive(Debug)]
pub struct WsLink<S> {
    ws: WebSocketStream<S>,
}

/// The production link: WebSocket over TLS over TCP.
pub type TlsWsLink = WsLink<TlsStream<ReadAhead<TcpStream>>>;

impl<S> WsLink<S> {
    pub fn new(ws: WebSocketStream<S>) -> Self {
        WsLink { ws }
    }
}

/// The WebSocket limits: no message or frame larger than a link frame may
/// be, so a hostile peer cannot make the agent buffer more.
pub fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(trellis_link::LINK_READ_BUFFER_BYTES)
        // Frames are sent and flushed one by one; nothing to gather.
        .write_buffer_size(0)
        .max_message_size(Some(MAX_FRAME_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES))
}

#[async_trait]
impl<S> LinkIo for WsLink<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    async fn send(&mut self, envelope: &Envelope) -> Result<(), LinkIoError> {
        let message = match trellis_link::encode_wire(envelope)? {
            WireFrame::Text(text) => WsMessage::text(text),
            WireFrame::Binary(bytes) => WsMessage::binary(bytes),
        };
        self.ws
            .send(message)
            .await
            .map_err(|e| LinkIoError::Transport(e.to_string()))
    }

    async fn recv(&mut self) -> Result<Option<Incoming>, LinkIoError> {
        loop {
            let Some(message) = self.ws.next().await else {
                return Ok(None);
            };
            match message {
                Ok(WsMessage::Text(text)) => {
                    return Ok(Some(Incoming::Frame(trellis_link::decode(
                        text.as_bytes(),
                    )?)));
                }
                Ok(WsMessage::Binary(bytes)) => {
                    return Ok(Some(Incoming::Frame(trellis_link::decode_binary_shared(
                        bytes,
                    )?)));
                }
                Ok(WsMessage::Pong(payload)) => return Ok(Some(Incoming::Pong(payload.to_vec()))),
                // tungstenite queues the pong itself and sends it with the
                // next read or write.
                Ok(WsMessage::Ping(_)) | Ok(WsMessage::Frame(_)) => continue,
                Ok(WsMessage::Close(_)) => return Ok(None),
                Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => return Ok(None),
                Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size })) => {
                    return Err(FrameError::TooLarge {
                        len: size,
                        max: max_size,
                    }
                    .into());
                }
                Err(e) => return Err(LinkIoError::Transport(e.to_string())),
            }
        }
    }

    async fn ping(&mut self, payload: Vec<u8>) -> Result<(), LinkIoError> {
        self.ws
            .send(WsMessage::Ping(payload.into()))
            .await
            .map_err(|e| LinkIoError::Transport(e.to_string()))
    }

    async fn close(&mut self, reason: &str) {
        let mut end = reason.len().min(MAX_CLOSE_REASON);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: reason[..end].to_owned().into(),
        };
        // Best effort: the peer may already be gone.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.ws.close(Some(frame))).await;
    }
}

/// Connects to the hub named in the stored identity.
#[derive(Debug)]
pub struct HubConnector {
    state: Arc<AgentState>,
    /// Bounds each step: name resolution, TCP, TLS, WebSocket upgrade.
    timeout: Duration,
    /// The local address the link leaves from; `None`: the system's choice.
    source: Option<std::net::IpAddr>,
}

impl HubConnector {
    pub fn new(state: Arc<AgentState>) -> Self {
        HubConnector {
            state,
            timeout: Duration::from_secs(15),
            source: None,
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Links from this local address (one of the host's own).
    pub fn with_source(mut self, source: Option<std::net::IpAddr>) -> Self {
        self.source = source;
        self
    }
}

#[async_trait]
impl Connector for HubConnector {
    async fn connect(&self) -> Result<Box<dyn LinkIo>, ConnectError> {
        let state_error = |e: crate::AgentError| ConnectError::new(e.code(), e.to_string());
        let Some(mut identity) = blocking(&self.state, |s| s.identity())
            .await
            .map_err(state_error)?
        else {
            return Err(ConnectError::new(
                "not-joined",
                "this outpost has no identity (it never joined, or its state was reset); \
                 `trellis agent join` with a token from the administrator is needed",
            ));
        };

        // The link refuses an expired certificate; renew it first by
        // proving possession of the key.
        let expired = match cert::validity(&identity.cert_pem) {
            Ok((_, not_after)) => not_after <= Utc::now(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read this agent's certificate; trying to renew it");
                true
            }
        };
        if expired {
            tracing::info!("this agent's certificate has expired; renewing it over HTTPS");
            let renewed = join::renew_expired(&identity).await.map_err(|e| {
                let hint = e.hint().map(str::to_owned);
                ConnectError {
                    code: e.code().to_owned(),
                    message: format!("the certificate has expired and renewing it failed: {e}"),
                    hint,
                    retry_after: None,
                    revoked: e.is_revoked(),
                }
            })?;
            let stored = renewed.clone();
            blocking(&self.state, move |s| s.set_identity(&stored))
                .await
                .map_err(state_error)?;
            identity = renewed;
        }

        let hub = HubUrl::parse(&identity.hub_url)
            .map_err(|e| ConnectError::new("hub-url-invalid", e))?;
        let config = client_config(
            &identity.ca_cert_pem,
            Some((&identity.cert_pem, &identity.key_pem)),
        )
        .map_err(|e| {
            ConnectError::new(e.code(), format!("the stored identity is unusable: {e}"))
                .with_hint("`trellis agent join` with a new token may be needed")
        })?;
        let tls = https::connect_tls_from(&hub, self.source, config, self.timeout)
            .await
            .map_err(|e| {
                let error = ConnectError::new(e.code(), e.to_string());
                match e.hint() {
                    Some(hint) => error.with_hint(hint),
                    None => error,
                }
            })?;

        let url = format!("wss://{}{LINK_PATH}", hub.authority());
        let handshake = tokio_tungstenite::client_async_with_config(
            url.as_str(),
            tls,
            Some(websocket_config()),
        );
        match tokio::time::timeout(self.timeout, handshake).await {
            Err(_) => Err(ConnectError::new(
                "hub-timeout",
                format!(
                    "the hub at {} did not answer the link upgrade within {} s",
                    hub.authority(),
                    self.timeout.as_secs()
                ),
            )),
            Ok(Ok((ws, _response))) => Ok(Box::new(WsLink::new(ws))),
            Ok(Err(WsError::Http(response))) => Err(refusal(
                &hub,
                response.status().as_u16(),
                response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()),
                response.body().as_deref().unwrap_or_default(),
            )),
            Ok(Err(e)) => Err(ConnectError::new(
                "hub-upgrade-failed",
                format!(
                    "the link upgrade with the hub at {} failed: {e}",
                    hub.authority()
                ),
            )
            .with_hint("check that the URL names a Trellis hub and that no proxy strips WebSocket upgrades")),
        }
    }
}

/// The hub answered the upgrade with an HTTP status instead of `101`.
fn refusal(hub: &HubUrl, status: u16, retry_after: Option<&str>, body: &[u8]) -> ConnectError {
    let api = https::api_error(body);
    match (status, api) {
        (503, _) => {
            // Admission limit: come back later. Without a readable header,
            // a short wait still spreads the storm.
            let secs = retry_after
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(5)
                .min(3600);
            ConnectError {
                retry_after: Some(Duration::from_secs(secs)),
                ..ConnectError::new(
                    "hub-busy",
                    format!(
                        "the hub at {} is admitting no more links right now (HTTP 503); \
                         retrying in {secs} s",
                        hub.authority()
                    ),
                )
            }
        }
        (403, Some(api)) if api.code == "revoked" => ConnectError {
            revoked: true,
            ..ConnectError::new("revoked", api.message)
        },
        (_, Some(api)) => ConnectError {
            hint: api.hint,
            ..ConnectError::new(
                api.code,
                format!(
                    "the hub at {} refused the link (HTTP {status}): {}",
                    hub.authority(),
                    api.message
                ),
            )
        },
        (_, None) => ConnectError::new(
            "hub-http-status",
            format!(
                "the hub at {} answered the link upgrade with HTTP {status}",
                hub.authority()
            ),
        )
        .with_hint("check that the URL names a Trellis hub and that no proxy is in between"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> HubUrl {
        HubUrl::parse("https://hub.example:7443").unwrap()
    }

    #[test]
    fn maps_refusals() {
        let busy = refusal(&hub(), 503, Some("17"), b"");
        assert_eq!(busy.retry_after, Some(Duration::from_secs(17)));
        assert!(!busy.revoked);
        let busy = refusal(&hub(), 503, None, b"");
        assert_eq!(busy.retry_after, Some(Duration::from_secs(5)));

        let revoked = refusal(
            &hub(),
            403,
            None,
            br#"{"error":{"code":"revoked","message":"outpost factory-7 was revoked"}}"#,
        );
        assert!(revoked.revoked);
        assert_eq!(revoked.code, "revoked");

        let other = refusal(&hub(), 404, None, b"not found");
        assert_eq!(other.code, "hub-http-status");
        assert!(!other.revoked && other.retry_after.is_none());
    }
}
