//! Reaching the hub: its URL, a TLS connection with our own rustls
//! configuration (CA pinning for the join, the stored CA afterwards), and a
//! minimal HTTP/1.1 JSON POST over it for the two calls that happen outside
//! the link (join and renewal of an expired certificate).
//!
//! Every failure is sorted into what the operator can act on — name
//! resolution, refused, unreachable, TLS — with a stable code and a hint,
//! because these are exactly the errors the agent reports to the hub once it
//! gets through (BRIEF §4, status model).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::rustls::pki_types::ServerName;
use trellis_link::readahead::ReadAhead;

/// The largest HTTP response body read from the hub (a certificate and a CA
/// are a few KiB).
const MAX_BODY_BYTES: usize = 1 << 20;

/// The hub's base URL, `https://host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HubUrl {
    /// As written, for messages.
    pub url: String,
    /// Without brackets for IPv6 literals (that is what SNI and name
    /// resolution take).
    pub host: String,
    pub port: u16,
}

impl HubUrl {
    pub fn parse(url: &str) -> Result<HubUrl, String> {
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| format!("the hub URL {url:?} does not start with https://"))?;
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        if authority.is_empty() || authority.contains('@') {
            return Err(format!(
                "the hub URL {url:?} has no host (or has user info)"
            ));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("the hub URL {url:?} has an unclosed IPv6 address"))?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        let port = match port {
            None => 443,
            Some(p) => p
                .parse()
                .map_err(|_| format!("the port in the hub URL {url:?} is not a number"))?,
        };
        if host.is_empty() {
            return Err(format!("the hub URL {url:?} has no host"));
        }
        Ok(HubUrl {
            url: url.to_owned(),
            host: host.to_owned(),
            port,
        })
    }

    /// `host:port` as it goes into a `Host` header (IPv6 in brackets).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Why the hub could not be reached or did not answer sensibly.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NetError {
    #[error("could not resolve the hub's host name {host:?}: {reason}")]
    Dns { host: String, reason: String },
    #[error("the hub at {addr} refused the connection")]
    Refused { addr: String },
    #[error("could not connect to the hub at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("the hub at {addr} did not answer within {secs} s while {during}")]
    Timeout {
        addr: String,
        secs: u64,
        during: &'static str,
    },
    #[error("the TLS handshake with the hub at {addr} failed: {reason}")]
    Tls {
        addr: String,
        reason: String,
        /// The hub's certificate was refused (not signed by the expected
        /// CA, wrong name, expired) as opposed to a broken connection.
        certificate: bool,
    },
    #[error("the HTTP exchange with the hub at {addr} failed: {reason}")]
    Http { addr: String, reason: String },
    #[error("{0}")]
    Config(String),
}

impl NetError {
    pub fn code(&self) -> &'static str {
        match self {
            NetError::Dns { .. } => "hub-dns-failed",
            NetError::Refused { .. } => "hub-refused",
            NetError::Connect { .. } => "hub-unreachable",
            NetError::Timeout { .. } => "hub-timeout",
            NetError::Tls {
                certificate: true, ..
            } => "hub-certificate-refused",
            NetError::Tls { .. } => "hub-tls-failed",
            NetError::Http { .. } => "hub-http-failed",
            NetError::Config(_) => "agent-config-invalid",
        }
    }

    pub fn hint(&self) -> Option<&'static str> {
        Some(match self {
            NetError::Dns { .. } => {
                "check the host's DNS configuration and that the hub's name is spelled right"
            }
            NetError::Refused { .. } => {
                "check that the hub is running and listening on that port, and that no firewall rejects the connection"
            }
            NetError::Connect { .. } | NetError::Timeout { .. } => {
                "check the network path to the hub (routes, firewalls, proxies)"
            }
            NetError::Tls {
                certificate: true, ..
            } => {
                "check that the URL names the hub this outpost was joined to, and that the host's clock is right"
            }
            NetError::Tls { .. } => {
                "something between the agent and the hub may be interfering with TLS (a proxy?)"
            }
            NetError::Http { .. } => "check that the URL names a Trellis hub",
            NetError::Config(_) => return None,
        })
    }
}

fn secs(d: Duration) -> u64 {
    d.as_secs().max(1)
}

/// A TCP connection to `to`, leaving from `source` when given.
pub async fn connect_from(source: Option<IpAddr>, to: SocketAddr) -> std::io::Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect(to).await;
    };
    let socket = if to.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // The source port is chosen at connect, unique for this destination
    // only: a port reserved at bind would be one no other connection of
    // the host could use, whatever its destination.
    nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::IpBindAddressNoPort,
        &true,
    )
    .map_err(std::io::Error::from)?;
    socket.bind(SocketAddr::new(source, 0)).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("could not use the local address {source} as the source: {e}"),
        )
    })?;
    socket.connect(to).await
}

/// Resolves, connects and completes a TLS handshake with `config`, SNI =
/// the hub's host; each step bounded by `timeout`.
pub(crate) async fn connect_tls(
    hub: &HubUrl,
    config: Arc<ClientConfig>,
    timeout: Duration,
) -> Result<TlsStream<ReadAhead<TcpStream>>, NetError> {
    connect_tls_from(hub, None, config, timeout).await
}

/// [`connect_tls`] from a given local address (`None`: the system's
/// choice); the addresses of the hub's name tried are those of its family.
pub(crate) async fn connect_tls_from(
    hub: &HubUrl,
    source: Option<IpAddr>,
    config: Arc<ClientConfig>,
    timeout: Duration,
) -> Result<TlsStream<ReadAhead<TcpStream>>, NetError> {
    let addr = hub.authority();
    let addrs: Vec<_> = match tokio::time::timeout(
        timeout,
        tokio::net::lookup_host((hub.host.as_str(), hub.port)),
    )
    .await
    {
        Err(_) => {
            return Err(NetError::Timeout {
                addr,
                secs: secs(timeout),
                during: "resolving its name",
            });
        }
        Ok(Err(e)) => {
            return Err(NetError::Dns {
                host: hub.host.clone(),
                reason: e.to_string(),
            });
        }
        Ok(Ok(addrs)) => addrs
            .filter(|a| source.is_none_or(|s| s.is_ipv4() == a.is_ipv4()))
            .collect(),
    };
    if addrs.is_empty() {
        return Err(NetError::Dns {
            host: hub.host.clone(),
            reason: "the name has no addresses".into(),
        });
    }

    // Try each address in turn, keeping the most telling error.
    let mut last = None;
    let mut tcp = None;
    for sock in addrs {
        match tokio::time::timeout(timeout, connect_from(source, sock)).await {
            Ok(Ok(stream)) => {
                tcp = Some(stream);
                break;
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                last = Some(NetError::Refused {
                    addr: sock.to_string(),
                });
            }
            Ok(Err(e)) => {
                last = Some(NetError::Connect {
                    addr: sock.to_string(),
                    reason: e.to_string(),
                });
            }
            Err(_) => {
                last = Some(NetError::Timeout {
                    addr: sock.to_string(),
                    secs: secs(timeout),
                    during: "connecting",
                });
            }
        }
    }
    let Some(tcp) = tcp else {
        return Err(last.unwrap_or(NetError::Connect {
            addr,
            reason: "no address could be tried".into(),
        }));
    };
    // Small frames in both directions; waiting to coalesce them only adds
    // latency.
    let _ = tcp.set_nodelay(true);

    let name = ServerName::try_from(hub.host.clone()).map_err(|e| {
        NetError::Config(format!(
            "the hub host {:?} is not a valid TLS server name: {e}",
            hub.host
        ))
    })?;
    // Artifacts and a stream's bytes come in bulk over this connection.
    let tcp = ReadAhead::new(tcp);
    match tokio::time::timeout(timeout, TlsConnector::from(config).connect(name, tcp)).await {
        Err(_) => Err(NetError::Timeout {
            addr,
            secs: secs(timeout),
            during: "the TLS handshake",
        }),
        Ok(Err(e)) => {
            let rustls_error = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<tokio_rustls::rustls::Error>());
            let certificate = matches!(
                rustls_error,
                Some(
                    tokio_rustls::rustls::Error::InvalidCertificate(_)
                        | tokio_rustls::rustls::Error::Other(_)
                )
            );
            Err(NetError::Tls {
                addr,
                reason: e.to_string(),
                certificate,
            })
        }
        Ok(Ok(stream)) => Ok(stream),
    }
}

/// A response of the hub: status and (bounded) body.
#[derive(Debug)]
pub(crate) struct Response {
    pub status: u16,
    pub body: Bytes,
}

impl Response {
    /// The `{"error": {"code", "message", "hint"}}` body of a refusal.
    pub fn api_error(&self) -> Option<ApiError> {
        api_error(&self.body)
    }
}

/// The hub's error body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiError {
    pub code: String,
    pub message: String,
    pub hint: Option<String>,
}

/// Reads a hub error body; `None` for anything else.
pub(crate) fn api_error(body: &[u8]) -> Option<ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let error = value.get("error")?;
    let text = |key: &str| error.get(key).and_then(|v| v.as_str()).map(str::to_owned);
    Some(ApiError {
        code: text("code")?,
        message: text("message").unwrap_or_default(),
        hint: text("hint"),
    })
}

/// `POST path` with a JSON body over a fresh TLS connection.
pub(crate) async fn post_json(
    hub: &HubUrl,
    config: Arc<ClientConfig>,
    path: &str,
    body: &serde_json::Value,
    timeout: Duration,
) -> Result<Response, NetError> {
    let tls = connect_tls(hub, config, timeout).await?;
    let addr = hub.authority();
    let http = |reason: String| NetError::Http {
        addr: addr.clone(),
        reason,
    };
    let exchange = async {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| http(e.to_string()))?;
        // The connection future does the I/O; it ends with the exchange.
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let body = serde_json::to_vec(body).map_err(|e| http(e.to_string()))?;
        let request = hyper::Request::post(path)
            .header(hyper::header::HOST, hub.authority())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::ACCEPT, "application/json")
            .header(
                hyper::header::USER_AGENT,
                format!("trellis-agent/{}", crate::update::version()),
            )
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| http(e.to_string()))?;
        let result = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| http(e.to_string()))?;
            let status = response.status().as_u16();
            let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
                .collect()
                .await
                .map_err(|e| http(format!("reading the response body: {e}")))?
                .to_bytes();
            Ok(Response { status, body })
        }
        .await;
        driver.abort();
        result
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| NetError::Timeout {
            addr: hub.authority(),
            secs: secs(timeout),
            during: "waiting for its answer",
        })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hub_urls() {
        let u = HubUrl::parse("https://hub.example:7443").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("hub.example", 7443));
        let u = HubUrl::parse("https://hub.example/").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("hub.example", 443));
        let u = HubUrl::parse("https://[::1]:9").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.authority()),
            ("::1", 9, "[::1]:9".into())
        );
        for bad in [
            "http://h:1",
            "https://",
            "https://:1",
            "https://h:x",
            "https://u@h",
            "https://[::1",
        ] {
            assert!(HubUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reads_hub_error_bodies() {
        let e = api_error(br#"{"error":{"code":"revoked","message":"m","hint":"h"}}"#).unwrap();
        assert_eq!(e.code, "revoked");
        assert_eq!(e.hint.as_deref(), Some("h"));
        assert!(api_error(b"<html>").is_none());
        assert!(api_error(br#"{"error":{}}"#).is_none());
    }
}
