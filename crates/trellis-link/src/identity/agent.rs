//! The agent's own key pair and its certificate signing request.
//!
//! The key is generated on the outpost and never leaves it; the hub only
//! ever sees the CSR (public key + proof of possession) and records the
//! public key's fingerprint.

use std::fmt;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PublicKeyData, SanType};

use super::{IdentityError, KeyFingerprint, OUTPOST_URI_SAN_PREFIX};
use trellis_model::{NameKind, validate_name};

/// An outpost agent's private key (ECDSA P-256).
pub struct AgentKey {
    key: KeyPair,
}

// The private key must never reach a log line through `{:?}`.
impl fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentKey")
            .field("public_key", &self.public_key_fingerprint())
            .field("private_key", &"<redacted>")
            .finish()
    }
}

impl AgentKey {
    pub fn generate() -> Result<AgentKey, IdentityError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| IdentityError::crypto("generate the agent's key", e))?;
        Ok(AgentKey { key })
    }

    /// Loads a key saved with [`AgentKey::to_pem`].
    pub fn from_pem(pem: &str) -> Result<AgentKey, IdentityError> {
        let key = KeyPair::from_pem(pem).map_err(|e| IdentityError::pem("agent private key", e))?;
        Ok(AgentKey { key })
    }

    /// The private key as PKCS#8 PEM, for the agent's state directory (and
    /// for rustls, which reads the same format).
    pub fn to_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// SHA-256 of the public key's SubjectPublicKeyInfo DER.
    pub fn public_key_fingerprint(&self) -> KeyFingerprint {
        KeyFingerprint::of(&self.key.subject_public_key_info())
    }

    /// A CSR asking for a client certificate as `outpost_name`: subject CN
    /// and a `trellis-outpost:<name>` URI SAN, signed with this key.
    pub fn csr_pem(&self, outpost_name: &str) -> Result<String, IdentityError> {
        validate_name(NameKind::Outpost, outpost_name)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, outpost_name);
        params.distinguished_name = dn;
        let san =
            rcgen::string::Ia5String::try_from(format!("{OUTPOST_URI_SAN_PREFIX}{outpost_name}"))
                .map_err(|e| IdentityError::crypto("build the certificate request", e))?;
        params.subject_alt_names = vec![SanType::URI(san)];
        let csr = params
            .serialize_request(&self.key)
            .map_err(|e| IdentityError::crypto("sign the certificate request", e))?;
        csr.pem()
            .map_err(|e| IdentityError::crypto("encode the certificate request", e))
    }
}
