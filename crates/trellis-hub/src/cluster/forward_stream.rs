//! Streams (exec, port forwarding, console terminals) asked of an instance
//! that does not hold the outpost's link: the WebSocket is relayed to the
//! instance that does, like a log request ([`super::forward`]).
//!
//! The instance the client reached opens its own WebSocket to the holder
//! first, signed for the user with [`super::forward::sign`]; only when the
//! holder accepted it (its own checks, limits and audit entry passed) is
//! the client's request upgraded, so a refusal reaches the client as the
//! holder's error response, status and body unchanged. Then messages are
//! copied both ways until either side closes.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::ws::{Message as AxMessage, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as TMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use trellis_store::Instance;

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

type Upstream = WebSocketStream<TlsStream<TcpStream>>;

/// Relays the WebSocket `GET /api/v1<path>` (`path` with its query, as the
/// API's router sees it) to `to` for `user`; see the module docs.
pub async fn websocket(
    state: &AppState,
    to: &Instance,
    user: &str,
    path: &str,
    upgrade: WebSocketUpgrade,
) -> ApiResult<Response> {
    let upstream = match connect(state, to, user, path).await {
        Ok(upstream) => upstream,
        Err(Refusal::Answer(response)) => return Ok(response),
        Err(Refusal::Unreachable(e)) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "hub-instance-unreachable",
                format!(
                    "the hub instance {} ({}) that holds this outpost's link did not answer: {e}",
                    to.id, to.address
                ),
                "retry in a moment: if that instance is gone, its outposts link to another one within a heartbeat or two",
            ));
        }
    };
    state
        .cluster()
        .forwarded
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(upgrade.on_upgrade(move |socket| relay(socket, upstream)))
}

enum Refusal {
    /// The holder answered without upgrading: its answer, for the client.
    Answer(Response),
    Unreachable(String),
}

fn tls(state: &AppState) -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    if let Some(config) = CONFIG.get() {
        return Ok(config.clone());
    }
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(state.ca().cert_pem().as_bytes())
    {
        let cert = cert.map_err(|e| format!("the hub's CA certificate cannot be read: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("the hub's CA certificate cannot be used: {e}"))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        trellis_link::identity::crypto_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(CONFIG.get_or_init(|| Arc::new(config)).clone())
}

async fn connect(
    state: &AppState,
    to: &Instance,
    user: &str,
    path: &str,
) -> Result<Upstream, Refusal> {
    let unreachable = |e: String| Refusal::Unreachable(e);
    let config = tls(state).map_err(unreachable)?;
    let (host, _) = to
        .address
        .rsplit_once(':')
        .ok_or_else(|| unreachable(format!("its address {:?} has no port", to.address)))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let name = rustls::pki_types::ServerName::try_from(host)
        .map_err(|e| unreachable(format!("its address is not a server name: {e}")))?;
    let tcp = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        TcpStream::connect(to.address.as_str()),
    )
    .await
    .map_err(|_| unreachable("connecting timed out".into()))?
    .map_err(|e| unreachable(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let mut request = format!("wss://{}/api/v1{path}", to.address)
        .into_client_request()
        .map_err(|e| unreachable(e.to_string()))?;
    let signed = super::forward::sign(state, "GET", path, user);
    request.headers_mut().insert(
        super::forward::HEADER,
        HeaderValue::from_str(&signed).map_err(|e| unreachable(e.to_string()))?,
    );
    match tokio_tungstenite::client_async(request, stream).await {
        Ok((socket, _)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Http(answer)) => {
            let status =
                StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let body = answer.body().clone().unwrap_or_default();
            let mut response = Response::new(Body::from(body));
            *response.status_mut() = status;
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            Err(Refusal::Answer(response))
        }
        Err(e) => Err(unreachable(e.to_string())),
    }
}

/// Copies messages both ways until either side ends.
async fn relay(client: WebSocket, upstream: Upstream) {
    let (mut to_client, mut from_client) = client.split();
    let (mut to_holder, mut from_holder) = upstream.split();
    let up = async {
        while let Some(Ok(message)) = from_client.next().await {
            let message = match message {
                AxMessage::Text(text) => TMessage::text(text.as_str()),
                AxMessage::Binary(bytes) => TMessage::binary(bytes),
                AxMessage::Close(_) => break,
                // Each hop answers its own pings.
                AxMessage::Ping(_) | AxMessage::Pong(_) => continue,
            };
            if to_holder.send(message).await.is_err() {
                break;
            }
        }
        let _ = to_holder.send(TMessage::Close(None)).await;
    };
    let down = async {
        while let Some(Ok(message)) = from_holder.next().await {
            let message = match message {
                TMessage::Text(text) => AxMessage::text(text.as_str()),
                TMessage::Binary(bytes) => AxMessage::binary(bytes),
                TMessage::Close(_) => break,
                TMessage::Ping(_) | TMessage::Pong(_) | TMessage::Frame(_) => continue,
            };
            if to_client.send(message).await.is_err() {
                break;
            }
        }
        let _ = to_client.send(AxMessage::Close(None)).await;
    };
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}
