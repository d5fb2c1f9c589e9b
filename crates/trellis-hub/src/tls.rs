//! The hub's TLS: its own CA (created at first start), a server certificate
//! issued from it at every start, and the HTTPS accept loop that serves the
//! API, the console and the outpost link on one port.
//!
//! Client certificates are optional at the TLS layer — browsers and the CLI
//! have none — and checked against the hub's CA when presented; the verified
//! identity travels to handlers as a [`ConnectionInfo`] request extension,
//! and the link endpoint insists on it.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::rustls::ServerConfig;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use trellis_link::identity::{HubCa, PeerIdentity, peer_identity, server_config};

/// The hub CA's certificate, in the data directory. Clients that talk to
/// the hub use it as `TRELLIS_CA_CERT`.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The hub CA's private key (mode 0600).
pub const CA_KEY_FILE: &str = "ca.key";

/// The key of the hub's TLS server certificate (mode 0600). Kept across
/// restarts (the certificate is issued anew at every start), so the pin
/// `trellis create outpost` prints for the install command stays valid.
pub const SERVER_KEY_FILE: &str = "server.key";

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Loads the hub's CA from the data directory, creating it on first start.
pub fn load_or_create_ca(data_dir: &Path) -> anyhow::Result<HubCa> {
    trellis_link::identity::install_crypto_provider();
    let cert_path = data_dir.join(CA_CERT_FILE);
    let key_path = data_dir.join(CA_KEY_FILE);
    if cert_path.exists() {
        let cert = std::fs::read_to_string(&cert_path)
            .with_context(|| format!("reading the hub's CA certificate {}", cert_path.display()))?;
        let key = std::fs::read_to_string(&key_path)
            .with_context(|| format!("reading the hub's CA key {}", key_path.display()))?;
        return HubCa::from_pem(&cert, &key).with_context(|| {
            format!(
                "the hub's CA in {} is not usable; restore ca.pem and ca.key from a backup \
                 (a new CA would make every agent refuse this hub)",
                data_dir.display()
            )
        });
    }
    let ca = HubCa::generate("Trellis hub CA").context("creating the hub's CA")?;
    // Key first: a CA certificate without its key would be unusable.
    write_file(&key_path, &ca.key_pem(), 0o600)?;
    write_file(&cert_path, ca.cert_pem(), 0o644)?;
    Ok(ca)
}

/// The TLS configuration of the hub's listener, with a server certificate
/// for `names` and `ips` freshly issued by `ca`.
pub fn server_tls(
    ca: &HubCa,
    names: &[String],
    ips: &[IpAddr],
) -> anyhow::Result<Arc<ServerConfig>> {
    let (cert, key) = ca
        .issue_server_cert(names, ips)
        .context("issuing the hub's TLS certificate")?;
    let mut config = (*server_config(ca, &cert, &key).context("setting up TLS")?).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The hub's TLS key from the data directory, created on first start.
pub fn load_or_create_server_key(data_dir: &Path) -> anyhow::Result<String> {
    trellis_link::identity::install_crypto_provider();
    let path = data_dir.join(SERVER_KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(pem) => {
            HubCa::public_key_pin(&pem).with_context(|| {
                format!(
                    "the hub's TLS key {} is damaged; remove it and the hub makes a new one (install commands printed before then stop working)",
                    path.display()
                )
            })?;
            Ok(pem)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let pem = HubCa::new_server_key().context("creating the hub's TLS key")?;
            write_file(&path, &pem, 0o600)?;
            Ok(pem)
        }
        Err(e) => Err(e).with_context(|| format!("reading the hub's TLS key {}", path.display())),
    }
}

/// As [`server_tls`], for the key `key_pem` the hub keeps (see
/// [`SERVER_KEY_FILE`]).
pub fn server_tls_with_key(
    ca: &HubCa,
    names: &[String],
    ips: &[IpAddr],
    key_pem: &str,
) -> anyhow::Result<Arc<ServerConfig>> {
    let (cert, key) = ca
        .issue_server_cert_with_key(names, ips, key_pem)
        .context("issuing the hub's TLS certificate")?;
    let mut config = (*server_config(ca, &cert, &key).context("setting up TLS")?).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Writes a file atomically (temporary file, fsync, rename) with `mode`:
/// the hub's secrets and its CA are never seen half-written.
pub(crate) fn write_file(path: &Path, content: &str, mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.write_all(content.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// What a handler may know about the connection a request came on.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub remote: SocketAddr,
    /// The verified client certificate's identity, if one was presented.
    pub peer: Option<PeerIdentity>,
}

/// Counts TLS handshakes in flight, and the most ever seen at once.
#[derive(Debug, Default)]
pub struct HandshakeGauge {
    now: AtomicUsize,
    peak: AtomicUsize,
}

impl HandshakeGauge {
    fn enter(&self) {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
    }
    fn leave(&self) {
        self.now.fetch_sub(1, Ordering::SeqCst);
    }
    pub fn in_flight(&self) -> usize {
        self.now.load(Ordering::SeqCst)
    }
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }
}

/// Accepts TLS connections and serves `router` on them until `shutdown`.
/// At most `max_handshakes` TLS handshakes run at once: a reconnect storm
/// queues in the kernel's backlog instead of exhausting the hub.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    config: Arc<ServerConfig>,
    max_handshakes: usize,
    gauge: Arc<HandshakeGauge>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let permits = Arc::new(Semaphore::new(max_handshakes.max(1)));
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (tcp, remote) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Typically EMFILE under a storm: back off briefly rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        let gauge = gauge.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            gauge.enter();
            // Agents' links and uploads bring bytes in bulk; an idle
            // connection holds no read-ahead buffer.
            let tcp = trellis_link::readahead::ReadAhead::new(tcp);
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
            gauge.leave();
            drop(permit);
            let tls = match handshake {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%remote, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%remote, "TLS handshake timed out");
                    return;
                }
            };
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|cert| match peer_identity(cert.as_ref()) {
                    Ok(identity) => Some(identity),
                    Err(e) => {
                        tracing::debug!(%remote, error = %e, "client certificate is not an outpost's");
                        None
                    }
                });
            let info = ConnectionInfo { remote, peer };
            let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(info.clone());
                router.clone().oneshot(request)
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(%remote, error = %e, "connection ended with an error");
                    }
                }
                () = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
                }
            }
        });
    }
    connections.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), connections.wait()).await;
    Ok(())
}
