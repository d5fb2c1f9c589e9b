//! Reading an outpost's identity from the client certificate it presented.
//!
//! This only parses: the chain was already verified against the hub CA by
//! rustls (see [`super::server_config`]) before the certificate reaches here.
//! Never call it on a certificate that did not pass that verification.

use chrono::{DateTime, Utc};
use x509_parser::extensions::GeneralName;

use super::{IdentityError, KeyFingerprint, OUTPOST_URI_SAN_PREFIX, from_timestamp};
use trellis_model::{NameKind, validate_name};

/// Who is on the other end of a mutually authenticated link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub outpost: String,
    pub serial_hex: String,
    pub not_after: DateTime<Utc>,
    pub public_key_fingerprint: KeyFingerprint,
}

/// Parses a verified client certificate (DER) issued by
/// [`super::HubCa::issue_client_cert`].
pub fn peer_identity(cert_der: &[u8]) -> Result<PeerIdentity, IdentityError> {
    let not_outpost = |reason: String| IdentityError::NotAnOutpostCertificate { reason };
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| not_outpost(format!("it could not be parsed ({e})")))?;

    let sans = cert
        .subject_alternative_name()
        .map_err(|e| not_outpost(format!("its subject alternative names are malformed ({e})")))?;
    let mut names = sans
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => uri.strip_prefix(OUTPOST_URI_SAN_PREFIX),
            _ => None,
        });
    let outpost = names.next().ok_or_else(|| {
        not_outpost(format!(
            "it has no `{OUTPOST_URI_SAN_PREFIX}<name>` subject alternative name"
        ))
    })?;
    if names.next().is_some() {
        return Err(not_outpost("it names more than one outpost".into()));
    }
    validate_name(NameKind::Outpost, outpost)?;

    // The hub writes the name in both places; disagreement means someone
    // else made this certificate.
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok());
    if cn != Some(outpost) {
        return Err(not_outpost(format!(
            "its common name {cn:?} does not match its outpost name {outpost:?}"
        )));
    }

    Ok(PeerIdentity {
        outpost: outpost.to_owned(),
        serial_hex: hex::encode(cert.raw_serial()),
        not_after: from_timestamp(cert.validity().not_after.timestamp())?,
        public_key_fingerprint: KeyFingerprint::of(cert.public_key().raw),
    })
}
