//! `trellis exec` and `trellis port-forward` (alias `local-connect`):
//! WebSockets to the hub's `…/components/{c}/exec` and `…/port-forward`
//! endpoints, which carry them as streams over the outpost's link. The
//! messages are the hub's (`trellis_hub::api::streams`): binary messages
//! with a channel byte first, JSON text for resize, eof, exit and errors.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use trellis_hub::error::ErrorBody;

use crate::cli::{ExecArgs, ForwardArgs, GlobalArgs};
use crate::client::{ClientError, seg};

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type Socket = WebSocketStream<Box<dyn Io>>;

/// Where and how to reach the hub.
#[derive(Clone)]
struct Hub {
    url: reqwest::Url,
    key: Option<String>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Hub {
    fn new(global: &GlobalArgs) -> anyhow::Result<Self> {
        let (endpoint, key, ca_cert) = crate::settings::resolve(global)?;
        let url = reqwest::Url::parse(&endpoint)
            .with_context(|| format!("the endpoint {endpoint:?} is not a URL"))?;
        let tls = match url.scheme() {
            "https" => Some(tls_config(ca_cert)?),
            "http" => None,
            other => bail!("the endpoint's scheme {other:?} is neither http nor https"),
        };
        Ok(Hub { url, key, tls })
    }

    /// Opens the WebSocket of `path?query`; a refusal is the hub's error.
    async fn connect(&self, path: &str, query: &str, doing: &str) -> anyhow::Result<Socket> {
        let host = self
            .url
            .host_str()
            .context("the endpoint has no host")?
            .to_owned();
        let port = self.url.port_or_known_default().unwrap_or(443);
        let transport = |source: std::io::Error| ClientError::Stream {
            endpoint: self.url.to_string(),
            doing: doing.to_owned(),
            message: source.to_string(),
        };
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(transport)?;
        let _ = tcp.set_nodelay(true);
        // A port forward's bytes come in bulk: read the socket in large
        // pieces under TLS (rustls asks for 4 KiB at a time).
        let tcp = trellis_link::readahead::ReadAhead::new(tcp);
        let stream: Box<dyn Io> = match &self.tls {
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .context("the endpoint's host is not a valid server name")?;
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(transport)?;
                Box::new(tls)
            }
            None => Box::new(tcp),
        };
        let scheme = if self.tls.is_some() { "wss" } else { "ws" };
        let mut request = format!("{scheme}://{host}:{port}/api/v1{path}?{query}")
            .into_client_request()
            .context("building the WebSocket request")?;
        if let Some(key) = &self.key {
            request.headers_mut().insert(
                "authorization",
                format!("Bearer {key}")
                    .parse()
                    .context("the access key is not valid in a header")?,
            );
        }
        // Each read from TLS yields at most one record (16 KiB); the
        // default read size (128 KiB) would zero-fill eight times that
        // much before every read.
        let config = WebSocketConfig::default().read_buffer_size(16 * 1024);
        match tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await {
            Ok((socket, _)) => Ok(socket),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                let status = response.status().as_u16();
                let body = response.body().as_deref().unwrap_or_default();
                Err(refused(status, body).into())
            }
            Err(e) => Err(ClientError::Stream {
                endpoint: self.url.to_string(),
                doing: doing.to_owned(),
                message: e.to_string(),
            }
            .into()),
        }
    }
}

fn tls_config(ca_cert: Option<PathBuf>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_cert {
        Some(path) => {
            let pem = std::fs::read_to_string(&path)
                .with_context(|| format!("reading the hub's CA certificate {}", path.display()))?;
            use rustls::pki_types::pem::PemObject;
            for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let cert = cert.with_context(|| {
                    format!(
                        "{} is not a PEM certificate (TRELLIS_CA_CERT)",
                        path.display()
                    )
                })?;
                roots
                    .add(cert)
                    .with_context(|| format!("{} holds an unusable certificate", path.display()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    // The suites in the order the hub's own clients prefer (AES-128-GCM
    // first; see `trellis_link::identity::crypto_provider`).
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        trellis_link::identity::crypto_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("setting up TLS")?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The hub's refusal of an upgrade, classified like other requests.
fn refused(status: u16, body: &[u8]) -> ClientError {
    let error = serde_json::from_slice::<ErrorBody>(body)
        .ok()
        .map(|b| b.error);
    let (code, message, hint) = match error {
        Some(e) => (e.code, e.message, e.hint),
        None => (
            "http-status".to_owned(),
            format!("the hub answered HTTP {status}"),
            "check the endpoint".to_owned(),
        ),
    };
    match status {
        502..=504 => ClientError::Unavailable {
            code,
            message,
            hint,
        },
        400..=499 => ClientError::Refused {
            status: reqwest::StatusCode::from_u16(status)
                .unwrap_or(reqwest::StatusCode::BAD_REQUEST),
            code,
            message,
            hint,
        },
        _ => ClientError::Server {
            doing: "opening a stream".into(),
            message,
            hint,
        },
    }
}

/// What the hub says in text.
#[derive(Debug, serde::Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
enum HubText {
    Eof,
    Exit {
        code: Option<i32>,
    },
    Error {
        error: trellis_hub::error::ErrorDetail,
    },
}

// === exec ===

/// Runs the command; returns its exit code.
pub async fn exec(global: &GlobalArgs, args: ExecArgs) -> anyhow::Result<i32> {
    let hub = Hub::new(global)?;
    let tty = args.tty;
    let size = if tty { terminal::size() } else { None };
    let mut query = form_urlencoded::Serializer::new(String::new());
    for word in &args.command {
        query.append_pair("command", word);
    }
    if tty {
        query.append_pair("tty", "true");
    }
    if let Some(r) = args.replica {
        query.append_pair("replica", &r.to_string());
    }
    if let Some((cols, rows)) = size {
        query.append_pair("cols", &cols.to_string());
        query.append_pair("rows", &rows.to_string());
    }
    let path = format!(
        "/projects/{}/stages/{}/components/{}/exec",
        seg(&args.project),
        seg(&args.stage),
        seg(&args.component)
    );
    let socket = hub
        .connect(&path, &query.finish(), "starting the command")
        .await?;
    let (mut tx, mut rx) = socket.split();

    // Raw mode for as long as the command runs (restored on drop).
    let raw = if tty {
        terminal::RawMode::enter()
    } else {
        None
    };

    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<WsMessage>(8);
    if args.stdin {
        let out_tx = out_tx.clone();
        tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = out_tx.send(WsMessage::text(r#"{"type":"eof"}"#)).await;
                        return;
                    }
                    Ok(n) => {
                        let mut message = Vec::with_capacity(n + 1);
                        message.push(0);
                        message.extend_from_slice(&buf[..n]);
                        if out_tx.send(WsMessage::binary(message)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    } else {
        let _ = out_tx.send(WsMessage::text(r#"{"type":"eof"}"#)).await;
    }
    if tty {
        let out_tx = out_tx.clone();
        tokio::spawn(async move {
            let Ok(mut winch) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
            else {
                return;
            };
            while winch.recv().await.is_some() {
                if let Some((cols, rows)) = terminal::size() {
                    let text = format!(r#"{{"type":"resize","cols":{cols},"rows":{rows}}}"#);
                    if out_tx.send(WsMessage::text(text)).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
    drop(out_tx);
    tokio::spawn(async move {
        while let Some(message) = out_rx.recv().await {
            if tx.send(message).await.is_err() {
                return;
            }
        }
    });

    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    let outcome: anyhow::Result<i32> = loop {
        match rx.next().await {
            Some(Ok(WsMessage::Binary(bytes))) if !bytes.is_empty() => {
                let (channel, data) = (bytes[0], &bytes[1..]);
                let written = if channel == 2 {
                    stderr.write_all(data).and_then(|()| stderr.flush())
                } else {
                    stdout.write_all(data).and_then(|()| stdout.flush())
                };
                if written.is_err() {
                    break Ok(1);
                }
            }
            Some(Ok(WsMessage::Text(text))) => match serde_json::from_str::<HubText>(&text) {
                Ok(HubText::Exit { code }) => break Ok(code.unwrap_or(1)),
                Ok(HubText::Error { error }) => {
                    break Err(ClientError::Unavailable {
                        code: error.code,
                        message: error.message,
                        hint: error.hint,
                    }
                    .into());
                }
                Ok(HubText::Eof) | Err(_) => {}
            },
            Some(Ok(WsMessage::Close(_))) | None => {
                break Err(ClientError::Unavailable {
                    code: "stream-closed".into(),
                    message: "the hub closed the stream before the command's exit code came".into(),
                    hint: "`trellis status stage` shows the outpost's link".into(),
                }
                .into());
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                break Err(ClientError::Unavailable {
                    code: "stream-broken".into(),
                    message: format!("the connection to the hub broke: {e}"),
                    hint: "retry".into(),
                }
                .into());
            }
        }
    };
    drop(raw);
    outcome
}

// === port-forward ===

/// `[[ADDR:]LOCAL:]REMOTE` → the local address and the remote port.
pub fn parse_forward(spec: &str) -> anyhow::Result<(SocketAddr, u16)> {
    let bad = || {
        anyhow::anyhow!(
            "{spec:?} is not [[ADDR:]LOCAL:]REMOTE (e.g. 8080, 9000:80, 0.0.0.0:9000:80); \
             ports are 1-65535, LOCAL may be 0 for any free port"
        )
    };
    let (rest, remote) = match spec.rsplit_once(':') {
        Some((rest, remote)) => (Some(rest), remote),
        None => (None, spec),
    };
    let remote: u16 = remote.parse().map_err(|_| bad())?;
    if remote == 0 {
        return Err(bad());
    }
    let (addr, local) = match rest {
        None => ("127.0.0.1".to_owned(), remote),
        Some(rest) => match rest.rsplit_once(':') {
            None => ("127.0.0.1".to_owned(), rest.parse().map_err(|_| bad())?),
            Some((addr, local)) => (
                addr.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned(),
                local.parse().map_err(|_| bad())?,
            ),
        },
    };
    let ip: std::net::IpAddr = if addr == "localhost" {
        std::net::Ipv4Addr::LOCALHOST.into()
    } else {
        addr.parse().map_err(|_| bad())?
    };
    Ok((SocketAddr::new(ip, local), remote))
}

pub async fn port_forward(global: &GlobalArgs, args: ForwardArgs) -> anyhow::Result<()> {
    let hub = Hub::new(global)?;
    let (local, remote) = parse_forward(&args.ports)?;
    let listener = tokio::net::TcpListener::bind(local)
        .await
        .with_context(|| format!("listening on {local}"))?;
    let bound = listener.local_addr()?;
    let path = format!(
        "/projects/{}/stages/{}/components/{}/port-forward",
        seg(&args.project),
        seg(&args.stage),
        seg(&args.component)
    );
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.append_pair("port", &remote.to_string());
    if let Some(r) = args.replica {
        query.append_pair("replica", &r.to_string());
    }
    let query = query.finish();
    println!(
        "forwarding {bound} to port {remote} of component {} (stage {} of {}); Ctrl-C stops",
        args.component, args.stage, args.project
    );
    loop {
        let (client, peer) = listener.accept().await.context("accepting a connection")?;
        let hub = hub.clone();
        let path = path.clone();
        let query = query.clone();
        tokio::spawn(async move {
            match hub.connect(&path, &query, "forwarding a connection").await {
                Ok(socket) => forward(client, socket).await,
                Err(e) => {
                    eprintln!("error: a connection from {peer} could not be forwarded: {e:#}");
                }
            }
        });
    }
}

/// Moves bytes between a local connection and its stream until both ways
/// are done.
async fn forward(client: TcpStream, socket: Socket) {
    let _ = client.set_nodelay(true);
    let (mut local_rx, mut local_tx) = client.into_split();
    let (mut tx, mut rx) = socket.split();
    let up = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match local_rx.read(&mut buf[1..]).await {
                Ok(0) | Err(_) => {
                    let _ = tx.send(WsMessage::text(r#"{"type":"eof"}"#)).await;
                    return tx;
                }
                Ok(n) => {
                    buf[0] = 0;
                    if tx
                        .send(WsMessage::binary(buf[..n + 1].to_vec()))
                        .await
                        .is_err()
                    {
                        return tx;
                    }
                }
            }
        }
    };
    let down = async move {
        while let Some(Ok(message)) = rx.next().await {
            match message {
                WsMessage::Binary(bytes) => {
                    let written = match bytes.get(1..) {
                        Some(data) if !data.is_empty() => local_tx.write_all(data).await,
                        _ => Ok(()),
                    };
                    if written.is_err() {
                        return;
                    }
                }
                WsMessage::Text(text) => match serde_json::from_str::<HubText>(&text) {
                    Ok(HubText::Eof) => {
                        let _ = local_tx.shutdown().await;
                    }
                    Ok(HubText::Error { error }) => {
                        eprintln!("error: a forwarded connection broke: {}", error.message);
                        return;
                    }
                    _ => {}
                },
                WsMessage::Close(_) => return,
                _ => {}
            }
        }
    };
    let (mut tx, ()) = tokio::join!(up, down);
    let _ = tx.send(WsMessage::Close(None)).await;
}

/// The terminal of `trellis exec -t`.
mod terminal {
    use rustix::termios::{self, OptionalActions, Termios};

    /// The terminal's size, when stdout is one.
    pub fn size() -> Option<(u16, u16)> {
        let size = termios::tcgetwinsize(std::io::stdout()).ok()?;
        (size.ws_col > 0 && size.ws_row > 0).then_some((size.ws_col, size.ws_row))
    }

    /// Raw mode of stdin while alive: keys go to the command as typed
    /// (Ctrl-C included), and the command's terminal echoes.
    pub struct RawMode {
        saved: Termios,
    }

    impl RawMode {
        pub fn enter() -> Option<RawMode> {
            let stdin = std::io::stdin();
            let saved = termios::tcgetattr(&stdin).ok()?;
            let mut raw = saved.clone();
            raw.make_raw();
            termios::tcsetattr(&stdin, OptionalActions::Now, &raw).ok()?;
            Some(RawMode { saved })
        }
    }

    impl Drop for RawMode {
        fn drop(&mut self) {
            let _ = termios::tcsetattr(std::io::stdin(), OptionalActions::Now, &self.saved);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_specs() {
        let ok = |s: &str| parse_forward(s).unwrap();
        assert_eq!(ok("8080"), ("127.0.0.1:8080".parse().unwrap(), 8080));
        assert_eq!(ok("9000:80"), ("127.0.0.1:9000".parse().unwrap(), 80));
        assert_eq!(ok("0:80"), ("127.0.0.1:0".parse().unwrap(), 80));
        assert_eq!(ok("0.0.0.0:9000:80"), ("0.0.0.0:9000".parse().unwrap(), 80));
        assert_eq!(ok("[::1]:9000:80"), ("[::1]:9000".parse().unwrap(), 80));
        assert_eq!(
            ok("localhost:9000:80"),
            ("127.0.0.1:9000".parse().unwrap(), 80)
        );
        for bad in [
            "",
            "0",
            "x",
            "80:",
            ":80",
            "99999",
            "1.2.3:80:80",
            "a:b:c",
            "9000:0",
        ] {
            assert!(parse_forward(bad).is_err(), "{bad}");
        }
    }
}
