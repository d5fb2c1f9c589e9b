//! The hub's own certificate authority.
//!
//! One self-signed ECDSA P-256 CA per hub (or per cluster of hubs sharing a
//! store) signs the hub's TLS server certificate and every outpost's client
//! certificate. Agents pin its fingerprint when they join, so the hub needs
//! no certificate from a public CA for the link.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use x509_parser::prelude::FromDer;

use super::{
    CaFingerprint, IdentityError, KeyFingerprint, OUTPOST_URI_SAN_PREFIX, from_timestamp,
    to_offset_date_time,
};
use trellis_model::{NameKind, validate_name};

/// How long the CA is valid. Re-keying a CA means re-joining every agent, so
/// it is long.
const CA_VALIDITY_DAYS: i64 = 3650;
/// How long the hub's server certificate is valid; the hub re-issues it from
/// the CA (cheaply, at start-up) well before then.
const SERVER_CERT_VALIDITY_DAYS: i64 = 397;
/// Certificates start being valid a little in the past, so a peer whose
/// clock runs slightly behind does not reject a certificate issued just now.
pub const CLOCK_SKEW_ALLOWANCE_MINUTES: i64 = 5;

/// The hub's CA: its certificate and private key.
pub struct HubCa {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
}

/// A client certificate issued to an outpost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCert {
    pub cert_pem: String,
    /// The certificate's serial number, lowercase hex (for revocation lists
    /// and logs).
    pub serial_hex: String,
    pub not_after: DateTime<Utc>,
    /// Fingerprint of the outpost's public key; the hub records it so the
    /// agent can later renew by proving possession of the same key.
    pub public_key_fingerprint: KeyFingerprint,
}

// The private key must never reach a log line through `{:?}`.
impl fmt::Debug for HubCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubCa")
            .field("fingerprint", &self.fingerprint())
            .field("key", &"<redacted>")
            .finish()
    }
}

impl HubCa {
    /// Generates a new self-signed CA (ECDSA P-256, valid for 10 years).
    pub fn generate(common_name: &str) -> Result<HubCa, IdentityError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| IdentityError::crypto("generate the hub CA key", e))?;
        let now = Utc::now();
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = to_offset_date_time(now - chrono::Duration::hours(1))?;
        params.not_after = to_offset_date_time(now + chrono::Duration::days(CA_VALIDITY_DAYS))?;
        params.serial_number = Some(random_serial().0);
        let cert = params
            .self_signed(&key)
            .map_err(|e| IdentityError::crypto("self-sign the hub CA certificate", e))?;
        Ok(HubCa {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA saved with [`HubCa::cert_pem`] and [`HubCa::key_pem`],
    /// checking that the key belongs to the certificate and that the
    /// certificate is a CA.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<HubCa, IdentityError> {
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| IdentityError::pem("hub CA certificate", e))?;
        let key =
            KeyPair::from_pem(key_pem).map_err(|e| IdentityError::pem("hub CA private key", e))?;
        let (_, x509) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| IdentityError::pem("hub CA certificate", e))?;
        if !x509.is_ca() {
            return Err(IdentityError::NotACa {
                reason: "its basic constraints do not allow it to sign certificates".into(),
            });
        }
        if x509.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(IdentityError::CaKeyMismatch);
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| IdentityError::crypto("load the hub CA", e))?;
        Ok(HubCa {
            issuer,
            cert_pem: pem_of(&cert_der),
            cert_der,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA's private key (PKCS#8 PEM). Store it with the care due to a
    /// key that can mint any outpost's identity.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// SHA-256 of the CA certificate's DER; what agents pin.
    pub fn fingerprint(&self) -> CaFingerprint {
        CaFingerprint::of(&self.cert_der)
    }

    /// Issues the hub's TLS server certificate for the given names and
    /// addresses. Returns `(cert_pem, key_pem)`; the key is fresh.
    pub fn issue_server_cert(
        &self,
        dns_names: &[String],
        ip_addrs: &[IpAddr],
    ) -> Result<(String, String), IdentityError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| IdentityError::crypto("generate the hub's TLS key", e))?;
        self.issue_server_cert_for(dns_names, ip_addrs, key)
    }

    /// As [`HubCa::issue_server_cert`], for the key `key_pem` (PKCS#8 PEM)
    /// the hub keeps across restarts, so a client that pins the server's
    /// public key (`curl --pinnedpubkey`) still reaches it after one.
    pub fn issue_server_cert_with_key(
        &self,
        dns_names: &[String],
        ip_addrs: &[IpAddr],
        key_pem: &str,
    ) -> Result<(String, String), IdentityError> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| IdentityError::crypto("read the hub's TLS key", e))?;
        self.issue_server_cert_for(dns_names, ip_addrs, key)
    }

    fn issue_server_cert_for(
        &self,
        dns_names: &[String],
        ip_addrs: &[IpAddr],
        key: KeyPair,
    ) -> Result<(String, String), IdentityError> {
        if dns_names.is_empty() && ip_addrs.is_empty() {
            return Err(IdentityError::crypto(
                "issue the hub's TLS certificate",
                "no DNS name or IP address was given; pass the names agents and browsers use to reach the hub",
            ));
        }
        let now = Utc::now();
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(
            dns_names
                .first()
                .map(String::as_str)
                .unwrap_or("trellis-hub"),
        );
        for name in dns_names {
            let ia5 = rcgen::string::Ia5String::try_from(name.as_str()).map_err(|e| {
                IdentityError::crypto(
                    "issue the hub's TLS certificate",
                    format!("{name:?} is not a valid DNS name: {e}"),
                )
            })?;
            params.subject_alt_names.push(SanType::DnsName(ia5));
        }
        params
            .subject_alt_names
            .extend(ip_addrs.iter().map(|ip| SanType::IpAddress(*ip)));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before =
            to_offset_date_time(now - chrono::Duration::minutes(CLOCK_SKEW_ALLOWANCE_MINUTES))?;
        params.not_after =
            to_offset_date_time(now + chrono::Duration::days(SERVER_CERT_VALIDITY_DAYS))?;
        params.serial_number = Some(random_serial().0);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| IdentityError::crypto("issue the hub's TLS certificate", e))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A new key for the hub's TLS server certificate (PKCS#8 PEM).
    pub fn new_server_key() -> Result<String, IdentityError> {
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map(|k| k.serialize_pem())
            .map_err(|e| IdentityError::crypto("generate the hub's TLS key", e))
    }

    /// What `curl --pinnedpubkey` takes for the key `key_pem`:
    /// `sha256//` and the base64 of the SHA-256 of its SubjectPublicKeyInfo.
    pub fn public_key_pin(key_pem: &str) -> Result<String, IdentityError> {
        use base64::Engine;
        use rcgen::PublicKeyData;
        use sha2::Digest;
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| IdentityError::crypto("read the hub's TLS key", e))?;
        let spki = key.subject_public_key_info();
        Ok(format!(
            "sha256//{}",
            base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(&spki))
        ))
    }

    /// Issues an outpost's client certificate from the agent's CSR.
    ///
    /// The CSR's signature must verify (proving the agent holds the private
    /// key) and its subject common name must be `outpost_name`. Nothing else
    /// from the CSR is trusted: the certificate carries the name as subject
    /// CN and as the URI SAN `trellis-outpost:<name>`, is for client
    /// authentication only, and is valid from `now` (less a small clock-skew
    /// allowance) for `validity`.
    pub fn issue_client_cert(
        &self,
        csr_pem: &str,
        outpost_name: &str,
        validity: Duration,
        now: DateTime<Utc>,
    ) -> Result<IssuedCert, IdentityError> {
        validate_name(NameKind::Outpost, outpost_name)?;
        let csr = read_csr(csr_pem)?;
        if csr.common_name != outpost_name {
            return Err(IdentityError::CsrNameMismatch {
                requested: csr.common_name,
                expected: outpost_name.to_owned(),
            });
        }
        let public_key_fingerprint = csr.public_key_fingerprint;
        let csr = csr.params;

        let validity = chrono::Duration::from_std(validity).map_err(|e| {
            IdentityError::crypto("issue the outpost certificate", format!("validity: {e}"))
        })?;
        let not_after = now + validity;
        let (mut params, serial_hex) =
            leaf_params(ExtendedKeyUsagePurpose::ClientAuth, now, not_after)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, outpost_name);
        dn.push(DnType::OrganizationName, "Trellis outpost");
        params.distinguished_name = dn;
        let san =
            rcgen::string::Ia5String::try_from(format!("{OUTPOST_URI_SAN_PREFIX}{outpost_name}"))
                .map_err(|e| IdentityError::crypto("issue the outpost certificate", e))?;
        params.subject_alt_names = vec![SanType::URI(san)];
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| IdentityError::crypto("issue the outpost certificate", e))?;
        // Report the validity as written into the certificate (whole seconds).
        let not_after = from_timestamp(not_after.timestamp())?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            serial_hex,
            not_after,
            public_key_fingerprint,
        })
    }

    /// Issues the HTTPS server certificate of an outpost's entry point from
    /// a CSR, for `dns_names` (which the caller has checked belong to the
    /// outpost: this only signs). As with [`HubCa::issue_client_cert`],
    /// the CSR's signature must verify and nothing but its public key is
    /// used; the certificate is for server authentication only, so it can
    /// never serve as an outpost's identity on the link.
    pub fn issue_ingress_cert(
        &self,
        csr_pem: &str,
        outpost_name: &str,
        dns_names: &[String],
        validity: Duration,
        now: DateTime<Utc>,
    ) -> Result<IssuedCert, IdentityError> {
        const DOING: &str = "issue the entry point's certificate";
        if dns_names.is_empty() {
            return Err(IdentityError::crypto(DOING, "no host name was asked for"));
        }
        let csr = read_csr(csr_pem)?;
        let validity = chrono::Duration::from_std(validity)
            .map_err(|e| IdentityError::crypto(DOING, format!("validity: {e}")))?;
        let not_after = now + validity;
        let (mut params, serial_hex) =
            leaf_params(ExtendedKeyUsagePurpose::ServerAuth, now, not_after)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, dns_names[0].as_str());
        dn.push(
            DnType::OrganizationName,
            format!("Trellis outpost {outpost_name} entry point"),
        );
        params.distinguished_name = dn;
        for name in dns_names {
            let ia5 = rcgen::string::Ia5String::try_from(name.as_str()).map_err(|e| {
                IdentityError::crypto(DOING, format!("{name:?} is not a valid DNS name: {e}"))
            })?;
            params.subject_alt_names.push(SanType::DnsName(ia5));
        }
        let cert = params
            .signed_by(&csr.params.public_key, &self.issuer)
            .map_err(|e| IdentityError::crypto(DOING, e))?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            serial_hex,
            not_after: from_timestamp(not_after.timestamp())?,
            public_key_fingerprint: csr.public_key_fingerprint,
        })
    }
}

/// The parameters every certificate issued from a CSR shares: a leaf for
/// `usage` only, signed with digital signatures, valid from `now` (less the
/// clock-skew allowance) to `not_after`, with a fresh random serial
/// (returned as hex too).
fn leaf_params(
    usage: ExtendedKeyUsagePurpose,
    now: DateTime<Utc>,
    not_after: DateTime<Utc>,
) -> Result<(CertificateParams, String), IdentityError> {
    let mut params = CertificateParams::default();
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    params.not_before =
        to_offset_date_time(now - chrono::Duration::minutes(CLOCK_SKEW_ALLOWANCE_MINUTES))?;
    params.not_after = to_offset_date_time(not_after)?;
    let (serial, serial_hex) = random_serial();
    params.serial_number = Some(serial);
    Ok((params, serial_hex))
}

/// A self-signed server certificate for `name` with a fresh key, as
/// `(cert_pem, key_pem)`: what a TLS listener serves before its real
/// certificate has arrived. No client trusts it, which is the point: the
/// listener is up, and says so only to clients told to skip verification.
pub fn self_signed_server_cert(name: &str) -> Result<(String, String), IdentityError> {
    let certified = rcgen::generate_simple_self_signed(vec![name.to_owned()])
        .map_err(|e| IdentityError::crypto("make a self-signed certificate", e))?;
    Ok((certified.cert.pem(), certified.signing_key.serialize_pem()))
}

/// A certificate request whose self-signature verified.
struct Csr {
    params: CertificateSigningRequestParams,
    /// The subject's common name ("" when it has none).
    common_name: String,
    public_key_fingerprint: KeyFingerprint,
}

fn read_csr(csr_pem: &str) -> Result<Csr, IdentityError> {
    let invalid = |reason: String| IdentityError::CsrInvalid { reason };
    let csr_der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|e| invalid(format!("it is not a PEM certificate request ({e})")))?;
    // rcgen verifies the CSR's self-signature here.
    let params =
        CertificateSigningRequestParams::from_der(&csr_der).map_err(|e| invalid(e.to_string()))?;
    let (_, parsed) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&csr_der)
            .map_err(|e| invalid(e.to_string()))?;
    let info = &parsed.certification_request_info;
    let common_name = info
        .subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or("")
        .to_owned();
    Ok(Csr {
        public_key_fingerprint: KeyFingerprint::of(info.subject_pki.raw),
        common_name,
        params,
    })
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "Trellis");
    dn
}

/// A random positive 128-bit serial number, and its hex.
///
/// The top bit is cleared (DER integers are signed; a set top bit would make
/// the serial negative) and the next one set (so the encoding is always 16
/// bytes with no leading zero and the hex is stable): 126 random bits, well
/// above the 64 that CA/Browser Forum rules ask for.
fn random_serial() -> (SerialNumber, String) {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    (SerialNumber::from_slice(&bytes), hex::encode(bytes))
}

fn pem_of(der: &CertificateDer<'_>) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}
