//! Reading the agent's own certificate: when it expires, when to renew it,
//! and whether a certificate from the hub really belongs to this agent.

use chrono::{DateTime, Duration, Utc};
use trellis_link::identity::{AgentKey, peer_identity};

use crate::state::Identity;

/// The validity period of a PEM certificate.
pub(crate) fn validity(cert_pem: &str) -> Result<(DateTime<Utc>, DateTime<Utc>), String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| format!("it is not a PEM certificate ({e})"))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| format!("it could not be parsed ({e})"))?;
    let to_chrono = |t: x509_parser::time::ASN1Time| {
        DateTime::from_timestamp(t.timestamp(), 0)
            .ok_or_else(|| format!("its validity date {t} is out of range"))
    };
    Ok((
        to_chrono(cert.validity().not_before)?,
        to_chrono(cert.validity().not_after)?,
    ))
}

/// When to ask for a new certificate: with a third of its lifetime left
/// (BRIEF §4: "renewed over the link well before expiry").
pub(crate) fn renew_at(not_before: DateTime<Utc>, not_after: DateTime<Utc>) -> DateTime<Utc> {
    // The hub back-dates `not_before` by a clock-skew allowance; the
    // lifetime counts from issuance, or a short-lived certificate would look
    // due at once and be renewed in a loop.
    let issued = (not_before
        + Duration::minutes(trellis_link::identity::CLOCK_SKEW_ALLOWANCE_MINUTES))
    .min(not_after);
    let lifetime = (not_after - issued).max(Duration::zero());
    not_after - lifetime / 3
}

/// Checks that `cert_pem` (sent by the hub) certifies this agent: same
/// outpost, same public key as the key it holds. Returns the certificate's
/// expiry.
pub(crate) fn check_own(identity: &Identity, cert_pem: &str) -> Result<DateTime<Utc>, String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| format!("it is not a PEM certificate ({e})"))?;
    let peer = peer_identity(&pem.contents).map_err(|e| e.to_string())?;
    if peer.outpost != identity.outpost {
        return Err(format!(
            "it is for outpost {:?}, but this agent is outpost {:?}",
            peer.outpost, identity.outpost
        ));
    }
    let key = AgentKey::from_pem(&identity.key_pem).map_err(|e| e.to_string())?;
    if peer.public_key_fingerprint != key.public_key_fingerprint() {
        return Err("it certifies a different key than the one this agent holds".into());
    }
    Ok(peer.not_after)
}

#[cfg(test)]
mod renewal_tests {
    use super::*;

    #[test]
    fn renewal_is_due_with_a_third_of_the_issued_lifetime_left() {
        let issued = DateTime::from_timestamp(1_000_000, 0).unwrap();
        let back_dated =
            issued - Duration::minutes(trellis_link::identity::CLOCK_SKEW_ALLOWANCE_MINUTES);
        // A 6-second certificate is due 4 s after issuance, not at once.
        let not_after = issued + Duration::seconds(6);
        assert_eq!(
            renew_at(back_dated, not_after),
            issued + Duration::seconds(4)
        );
        // A 30-day certificate is due after 20 days.
        let not_after = issued + Duration::days(30);
        assert_eq!(renew_at(back_dated, not_after), issued + Duration::days(20));
    }
}
