//! rustls configurations for both ends of the link.
//!
//! - [`server_config`]: the hub's HTTPS listener. It asks for a client
//!   certificate signed by the hub CA but also admits clients without one,
//!   because the same port serves the API and console to browsers; the link
//!   endpoint then insists on a certificate ([`super::peer_identity`]).
//! - [`client_config`]: an agent (or the CLI) trusting only the hub CA,
//!   optionally presenting a client certificate.
//! - [`pinned_client_config`]: first contact during join, when the agent
//!   knows only the CA's fingerprint from the join token. The hub sends its
//!   CA certificate in the chain; the verifier accepts the chain only if it
//!   contains a certificate with that fingerprint and the leaf verifies
//!   against it.

use std::sync::{Arc, Once};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use super::{CaFingerprint, HubCa, IdentityError};

/// Installs rustls's `ring` provider as the process default, once. Call it
/// at start-up before any rustls user that relies on the default provider
/// (e.g. reqwest); the configs in this module do not need it. If another
/// provider was installed first, that one stays and this is a no-op.
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if crypto_provider().install_default().is_err() {
            tracing::debug!("a rustls crypto provider was already installed; keeping it");
        }
    });
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(crypto_provider())
}

/// rustls's `ring` provider with its cipher suites in the order Trellis
/// prefers: AES-128-GCM first, then AES-256-GCM, then ChaCha20-Poly1305 (in
/// TLS 1.3 and 1.2 alike; the same suites as rustls's default, only the
/// order differs). AES-128-GCM is one of TLS 1.3's mandatory suites and
/// needs 10 AES rounds per block where AES-256 needs 14: every byte of a
/// forwarded stream is encrypted and decrypted twice on its way (the link,
/// then the client's connection), so the suite is most of what a stream
/// costs. Peers that prefer another suite still get it (rustls servers
/// follow the client's order).
pub fn crypto_provider() -> CryptoProvider {
    use rustls::crypto::ring::cipher_suite as suite;
    let mut provider = rustls::crypto::ring::default_provider();
    let rank = |s: &rustls::SupportedCipherSuite| {
        let id = s.suite();
        [
            suite::TLS13_AES_128_GCM_SHA256.suite(),
            suite::TLS13_AES_256_GCM_SHA384.suite(),
            suite::TLS13_CHACHA20_POLY1305_SHA256.suite(),
            suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256.suite(),
            suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256.suite(),
            suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384.suite(),
            suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384.suite(),
        ]
        .iter()
        .position(|p| *p == id)
        .unwrap_or(usize::MAX)
    };
    // Stable: suites not named above keep their relative order, last.
    provider.cipher_suites.sort_by_key(rank);
    provider
}

fn certs_from_pem(
    what: &'static str,
    pem: &str,
) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::pem(what, e))?;
    if certs.is_empty() {
        return Err(IdentityError::pem(what, "it contains no certificate"));
    }
    Ok(certs)
}

fn key_from_pem(what: &'static str, pem: &str) -> Result<PrivateKeyDer<'static>, IdentityError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| IdentityError::pem(what, e))
}

/// The hub's TLS configuration: `server_cert_pem` (issued by `ca`, see
/// [`HubCa::issue_server_cert`]) is sent followed by the CA certificate, so
/// joining agents can pin it; client certificates are verified against `ca`
/// but optional.
///
/// No ALPN protocols are set; clone the config to add them.
pub fn server_config(
    ca: &HubCa,
    server_cert_pem: &str,
    server_key_pem: &str,
) -> Result<Arc<ServerConfig>, IdentityError> {
    let provider = provider();
    let mut roots = RootCertStore::empty();
    roots
        .add(ca.cert_der().clone())
        .map_err(IdentityError::tls)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(IdentityError::tls)?;

    let mut chain = certs_from_pem("hub TLS certificate", server_cert_pem)?;
    if !chain.iter().any(|c| c == ca.cert_der()) {
        chain.push(ca.cert_der().clone());
    }
    let key = key_from_pem("hub TLS private key", server_key_pem)?;

    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(IdentityError::tls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(IdentityError::tls)?;
    Ok(Arc::new(config))
}

/// A client configuration trusting only the CA(s) in `ca_cert_pem`,
/// presenting `client` = `(cert_pem, key_pem)` if given.
pub fn client_config(
    ca_cert_pem: &str,
    client: Option<(&str, &str)>,
) -> Result<Arc<ClientConfig>, IdentityError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem("hub CA certificate", ca_cert_pem)? {
        roots.add(cert).map_err(IdentityError::tls)?;
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(IdentityError::tls)?
        .with_root_certificates(roots);
    let config = match client {
        Some((cert_pem, key_pem)) => builder
            .with_client_auth_cert(
                certs_from_pem("outpost certificate", cert_pem)?,
                key_from_pem("outpost private key", key_pem)?,
            )
            .map_err(IdentityError::tls)?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// A client configuration for the join: trusts a server only if its chain
/// contains the CA with `fingerprint` and the leaf is signed by it (and is
/// otherwise valid: name, dates, usage).
pub fn pinned_client_config(
    fingerprint: &CaFingerprint,
) -> Result<Arc<ClientConfig>, IdentityError> {
    let provider = provider();
    let verifier = PinnedCaVerifier {
        fingerprint: *fingerprint,
        provider: provider.clone(),
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(IdentityError::tls)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct PinnedCaVerifier {
    fingerprint: CaFingerprint,
    provider: Arc<CryptoProvider>,
}

/// The error an agent shows when the pinned CA is not the server's.
#[derive(Debug)]
struct NotPinnedCa {
    expected: CaFingerprint,
    detail: String,
}

impl std::fmt::Display for NotPinnedCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the hub's certificate is not signed by the CA this agent was joined to \
             (expected {}; {}); is this the right hub? Check the URL, or ask the hub admin \
             for a new join token",
            self.expected, self.detail
        )
    }
}

impl std::error::Error for NotPinnedCa {}

impl PinnedCaVerifier {
    fn mismatch(&self, detail: impl Into<String>) -> rustls::Error {
        rustls::Error::Other(rustls::OtherError(Arc::new(NotPinnedCa {
            expected: self.fingerprint,
            detail: detail.into(),
        })))
    }
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates
            .iter()
            .find(|c| CaFingerprint::of(c) == self.fingerprint)
        else {
            return Err(self.mismatch("the hub did not present that CA"));
        };
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| self.mismatch(format!("the pinned CA certificate is unusable: {e}")))?;
        let others: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .filter(|c| *c != ca)
            .map(|c| c.clone().into_owned())
            .collect();
        let webpki =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        webpki
            .verify_server_cert(end_entity, &others, server_name, ocsp_response, now)
            .map_err(|e| match e {
                rustls::Error::InvalidCertificate(
                    CertificateError::UnknownIssuer | CertificateError::BadSignature,
                ) => self.mismatch("the hub's certificate is signed by another CA"),
                other => other,
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
