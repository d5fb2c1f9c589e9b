//! Who is on each end of the link, and how each end proves it.
//!
//! The hub runs its own small CA ([`HubCa`]). An agent joins with a one-time
//! [`JoinToken`] that carries the hub's URL and the fingerprint of that CA: it
//! generates its key pair locally ([`AgentKey`]; the private key never leaves
//! the host), contacts the hub over TLS pinned to the CA fingerprint
//! ([`pinned_client_config`]), sends a CSR and receives a client certificate
//! ([`HubCa::issue_client_cert`]). From then on the link is mutual TLS
//! ([`server_config`], [`client_config`]) and the hub learns the outpost's
//! name from the presented certificate ([`peer_identity`]).
//!
//! All TLS here uses rustls with the `ring` provider, passed explicitly to
//! every config, so these configs work whether or not a process-wide default
//! provider is installed; [`install_crypto_provider`] is for other rustls
//! users in the same process (e.g. an HTTP client).
//!
//! # Layout
//! - `fingerprint`: [`CaFingerprint`], [`KeyFingerprint`] (`sha256:<hex>`).
//! - `ca`: [`HubCa`] and certificate issuing.
//! - `agent`: [`AgentKey`] and its CSR.
//! - `peer`: [`peer_identity`] of a presented client certificate.
//! - `tls`: rustls configurations, including CA pinning.
//! - `join_token`: [`JoinToken`].

mod agent;
mod ca;
mod fingerprint;
mod join_token;
mod peer;
mod tls;

pub use agent::AgentKey;
pub use ca::{CLOCK_SKEW_ALLOWANCE_MINUTES, HubCa, IssuedCert, self_signed_server_cert};
pub use fingerprint::{CaFingerprint, FingerprintError, KeyFingerprint};
pub use join_token::{JOIN_TOKEN_PREFIX, JoinToken, JoinTokenError};
pub use peer::{PeerIdentity, peer_identity};
pub use tls::{
    client_config, crypto_provider, install_crypto_provider, pinned_client_config, server_config,
};

/// The prefix of the URI subject alternative name that carries an outpost's
/// name in its client certificate: `trellis-outpost:<name>`.
pub const OUTPOST_URI_SAN_PREFIX: &str = "trellis-outpost:";

/// What went wrong while creating, issuing, loading or checking keys and
/// certificates.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("could not {action}: {reason}")]
    Crypto {
        action: &'static str,
        reason: String,
    },

    #[error(
        "the {what} is not valid PEM ({reason}); check that the whole file was copied, \
         including the -----BEGIN and -----END lines"
    )]
    Pem { what: &'static str, reason: String },

    #[error(
        "the hub CA's private key does not belong to its certificate; restore both files \
         from the same backup"
    )]
    CaKeyMismatch,

    #[error("the hub CA certificate is not a CA certificate: {reason}")]
    NotACa { reason: String },

    #[error(
        "the certificate signing request is not valid: {reason}; let the agent generate a \
         new one (`trellis agent join …` does)"
    )]
    CsrInvalid { reason: String },

    #[error(
        "the certificate signing request asks for outpost {requested:?}, but the \
         certificate is being issued for outpost {expected:?}; the agent must request a \
         certificate under the outpost name it was joined as"
    )]
    CsrNameMismatch { requested: String, expected: String },

    #[error("{0}")]
    InvalidName(#[from] trellis_model::NameError),

    #[error(
        "the presented certificate is not a Trellis outpost certificate: {reason}; the agent \
         should be joined again with `trellis agent join`"
    )]
    NotAnOutpostCertificate { reason: String },

    #[error("could not build the TLS configuration: {reason}")]
    Tls { reason: String },
}

impl IdentityError {
    /// The stable error code, for logs, the API and the status model.
    pub fn code(&self) -> &'static str {
        match self {
            IdentityError::Crypto { .. } => "crypto-failed",
            IdentityError::Pem { .. } => "pem-invalid",
            IdentityError::CaKeyMismatch => "ca-key-mismatch",
            IdentityError::NotACa { .. } => "not-a-ca",
            IdentityError::CsrInvalid { .. } => "csr-invalid",
            IdentityError::CsrNameMismatch { .. } => "csr-name-mismatch",
            IdentityError::InvalidName(_) => "invalid-name",
            IdentityError::NotAnOutpostCertificate { .. } => "not-an-outpost-certificate",
            IdentityError::Tls { .. } => "tls-config-failed",
        }
    }

    fn crypto(action: &'static str, err: impl std::fmt::Display) -> Self {
        IdentityError::Crypto {
            action,
            reason: err.to_string(),
        }
    }

    fn pem(what: &'static str, err: impl std::fmt::Display) -> Self {
        IdentityError::Pem {
            what,
            reason: err.to_string(),
        }
    }

    fn tls(err: impl std::fmt::Display) -> Self {
        IdentityError::Tls {
            reason: err.to_string(),
        }
    }
}

/// SHA-256 of some bytes.
fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

/// chrono → `time`, for rcgen's validity fields.
fn to_offset_date_time(
    t: chrono::DateTime<chrono::Utc>,
) -> Result<time::OffsetDateTime, IdentityError> {
    time::OffsetDateTime::from_unix_timestamp(t.timestamp())
        .map_err(|e| IdentityError::crypto("set the certificate's validity", e))
}

/// Seconds since the epoch (from x509) → chrono.
fn from_timestamp(secs: i64) -> Result<chrono::DateTime<chrono::Utc>, IdentityError> {
    chrono::DateTime::from_timestamp(secs, 0).ok_or_else(|| {
        IdentityError::crypto(
            "read the certificate's validity",
            format!("{secs} is out of range"),
        )
    })
}
