//! The HTTPS certificate: parsed and checked (the key must belong to the
//! certificate) before it replaces the one being served, so a bad renewal
//! never takes the ingress down — the previous pair stays and a warning says
//! why.
//!
//! Every handshake asks the shared slot for the current pair, so a
//! replacement applies to the next connection without restarting `serve`.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::time::{Duration, SystemTime};

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::{self, PemObject};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;

/// How often `Certificates::from_files` looks at the files' modification
/// time and size.
pub const RELOAD_POLL: Duration = Duration::from_secs(2);

/// A certificate chain and its private key for HTTPS, swappable at run time.
/// Clones share the pair: a replacement is seen by every `serve` using any
/// clone.
#[derive(Clone)]
pub struct Certificates {
    slot: Arc<Slot>,
}

struct Slot {
    current: RwLock<Arc<CertifiedKey>>,
}

/// What is wrong with a certificate or key; the pair served before (if any)
/// is kept.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "could not read the {what} file {}: {source}; check the path and that this process \
         may read the file",
        path.display()
    )]
    Unreadable {
        what: Part,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{origin} is not PEM: it has no \"-----BEGIN …-----\" line; the {what} must be PEM \
         text (a DER file converts with `openssl {} -inform der -in FILE -out FILE.pem`)",
        if matches!(what, Part::Certificate) { "x509" } else { "pkey" }
    )]
    NotPem { what: Part, origin: String },
    #[error("{origin} is not readable PEM: {detail}; check that the file was written completely")]
    BadPem {
        what: Part,
        origin: String,
        detail: String,
    },
    #[error("no certificate found in {origin} (no \"BEGIN CERTIFICATE\" block){hint}")]
    NoCertificate { origin: String, hint: &'static str },
    #[error(
        "no private key found in {origin} (no \"BEGIN PRIVATE KEY\", \"BEGIN RSA PRIVATE KEY\" \
         or \"BEGIN EC PRIVATE KEY\" block){hint}"
    )]
    NoPrivateKey { origin: String, hint: &'static str },
    #[error(
        "the private key in {origin} cannot be used: {reason}; RSA (2048 bits or more), ECDSA \
         P-256/P-384 and Ed25519 keys are supported"
    )]
    UnsupportedKey { origin: String, reason: String },
    #[error(
        "the first certificate in {origin} cannot be read: {reason}; it must be the server's \
         own certificate, followed by its intermediates"
    )]
    InvalidCertificate { origin: String, reason: String },
    #[error(
        "the private key in {key} does not belong to the certificate in {cert}; use the key the \
         certificate was issued for (a renewal writes both files — check that neither is left \
         over from an earlier one)"
    )]
    KeyMismatch { cert: String, key: String },
    #[error(
        "watching certificate files needs a running tokio runtime; call \
         Certificates::from_files from within one (e.g. inside #[tokio::main])"
    )]
    NoRuntime,
}

/// Which half of the pair an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Certificate,
    Key,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Part::Certificate => "certificate",
            Part::Key => "private key",
        })
    }
}

impl Certificates {
    /// A pair from PEM text: the server's certificate first, then its
    /// intermediates; the key as PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
    pub fn from_pem(cert_chain_pem: &[u8], key_pem: &[u8]) -> Result<Self, TlsError> {
        let pair = parse(
            cert_chain_pem,
            key_pem,
            "the certificate PEM given",
            "the key PEM given",
        )?;
        Ok(Self::with(pair))
    }

    /// Reads the files now, then re-reads them whenever their modification
    /// time or size changes (looked at every `RELOAD_POLL`). A change that
    /// does not parse, or whose key does not match, keeps the previous pair
    /// and logs a warning saying why; a renewal that writes the two files one
    /// after the other is picked up once both are written. The watcher runs
    /// on the current tokio runtime and ends when the last clone is dropped.
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| TlsError::NoRuntime)?;
        let seen = stamps(cert, key);
        let pair = read_files(cert, key)?;
        let certificates = Self::with(pair);
        runtime.spawn(watch(
            Arc::downgrade(&certificates.slot),
            cert.to_owned(),
            key.to_owned(),
            seen,
        ));
        Ok(certificates)
    }

    /// Replaces the pair; connections already open keep theirs. On error
    /// the current pair stays.
    pub fn replace_pem(&self, cert_chain_pem: &[u8], key_pem: &[u8]) -> Result<(), TlsError> {
        let pair = parse(
            cert_chain_pem,
            key_pem,
            "the certificate PEM given",
            "the key PEM given",
        )?;
        self.slot.set(pair);
        Ok(())
    }

    /// The certificate chain being served now, server certificate first
    /// (DER).
    pub fn chain(&self) -> Vec<Vec<u8>> {
        self.slot
            .get()
            .cert
            .iter()
            .map(|c| c.as_ref().to_vec())
            .collect()
    }

    fn with(pair: CertifiedKey) -> Self {
        Certificates {
            slot: Arc::new(Slot {
                current: RwLock::new(Arc::new(pair)),
            }),
        }
    }

    /// The rustls configuration `serve` uses: ring only, ALPN h2 and
    /// http/1.1, certificates from this slot at every handshake.
    pub(crate) fn server_config(&self) -> io::Result<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|err| io::Error::other(format!("setting up TLS: {err}")))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(self.slot.clone())));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

impl fmt::Debug for Certificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificates")
            .field("chain_len", &self.slot.get().cert.len())
            .finish_non_exhaustive()
    }
}

impl Slot {
    fn get(&self) -> Arc<CertifiedKey> {
        // Nothing panics while the lock is held: a poisoned lock still holds
        // a whole pair.
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, pair: CertifiedKey) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(pair);
    }
}

struct Resolver(Arc<Slot>);

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Resolver")
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.get())
    }
}

// === parsing ===

fn parse(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_origin: &str,
    key_origin: &str,
) -> Result<CertifiedKey, TlsError> {
    let chain = parse_chain(cert_pem, cert_origin)?;
    let key = parse_key(key_pem, key_origin)?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|err| {
        TlsError::UnsupportedKey {
            origin: key_origin.to_owned(),
            reason: err.to_string(),
        }
    })?;
    let pair = CertifiedKey::new(chain, signing_key);
    match pair.keys_match() {
        // `Unknown`: the key cannot tell its public half; rustls accepts
        // that too, and the handshake would fail visibly.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(pair)
        }
        Err(rustls::Error::InconsistentKeys(_)) => Err(TlsError::KeyMismatch {
            cert: cert_origin.to_owned(),
            key: key_origin.to_owned(),
        }),
        Err(err) => Err(TlsError::InvalidCertificate {
            origin: cert_origin.to_owned(),
            reason: err.to_string(),
        }),
    }
}

fn parse_chain(pem_text: &[u8], origin: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    if !contains(pem_text, b"-----BEGIN ") {
        return Err(TlsError::NotPem {
            what: Part::Certificate,
            origin: origin.to_owned(),
        });
    }
    let chain = CertificateDer::pem_slice_iter(pem_text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| bad_pem(Part::Certificate, origin, err))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            origin: origin.to_owned(),
            hint: if contains(pem_text, b"PRIVATE KEY-----") {
                "; it holds a private key — are the certificate and key swapped?"
            } else {
                ""
            },
        });
    }
    Ok(chain)
}

fn parse_key(pem_text: &[u8], origin: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    if !contains(pem_text, b"-----BEGIN ") {
        return Err(TlsError::NotPem {
            what: Part::Key,
            origin: origin.to_owned(),
        });
    }
    match PrivateKeyDer::from_pem_slice(pem_text) {
        Ok(key) => Ok(key),
        Err(pem::Error::NoItemsFound) => Err(TlsError::NoPrivateKey {
            origin: origin.to_owned(),
            hint: if contains(pem_text, b"BEGIN CERTIFICATE") {
                "; it holds a certificate — are the certificate and key swapped?"
            } else {
                ""
            },
        }),
        Err(err) => Err(bad_pem(Part::Key, origin, err)),
    }
}

fn bad_pem(what: Part, origin: &str, err: pem::Error) -> TlsError {
    TlsError::BadPem {
        what,
        origin: origin.to_owned(),
        detail: err.to_string(),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

// === files ===

fn read_files(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let read = |what, path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Unreadable {
            what,
            path: path.to_owned(),
            source,
        })
    };
    let cert_pem = read(Part::Certificate, cert)?;
    let key_pem = read(Part::Key, key)?;
    parse(
        &cert_pem,
        &key_pem,
        &format!("the certificate file {}", cert.display()),
        &format!("the key file {}", key.display()),
    )
}

/// What tells us a file changed: modification time and size (`None` while
/// it cannot be looked at, e.g. in the middle of a rename).
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn stamps(cert: &Path, key: &Path) -> (Stamp, Stamp) {
    (stamp(cert), stamp(key))
}

async fn watch(slot: Weak<Slot>, cert: PathBuf, key: PathBuf, mut seen: (Stamp, Stamp)) {
    let mut ticks = tokio::time::interval(RELOAD_POLL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        if slot.strong_count() == 0 {
            return;
        }
        // Two small stat calls every couple of seconds: not worth a
        // blocking-pool thread.
        let now = stamps(&cert, &key);
        if now == seen {
            continue;
        }
        seen = now;
        let result = read_files(&cert, &key);
        let Some(slot) = slot.upgrade() else { return };
        match result {
            Ok(pair) => {
                slot.set(pair);
                tracing::info!(cert = %cert.display(), "serving the renewed certificate");
            }
            Err(err) => {
                tracing::warn!(
                    "{err}; keeping the certificate served so far (it is read again when the files change)"
                );
            }
        }
    }
}
