//! Identity and TLS, exercised with real rustls handshakes over in-memory
//! pipes: the hub CA issues a server certificate and outpost client
//! certificates, mutual TLS succeeds only with the right CA, and the join's
//! CA pinning accepts the right hub and refuses any other with a clear error.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use trellis_link::identity::*;

const DAY: Duration = Duration::from_secs(86_400);

struct Hub {
    ca: HubCa,
    server: Arc<ServerConfig>,
}

fn hub() -> Hub {
    let ca = HubCa::generate("Trellis hub CA (test)").unwrap();
    let (cert, key) = ca
        .issue_server_cert(
            &["hub.example".to_string(), "localhost".to_string()],
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
        )
        .unwrap();
    let server = server_config(&ca, &cert, &key).unwrap();
    Hub { ca, server }
}

struct Outpost {
    key: AgentKey,
    cert: IssuedCert,
}

fn outpost(ca: &HubCa, name: &str) -> Outpost {
    let key = AgentKey::generate().unwrap();
    let csr = key.csr_pem(name).unwrap();
    let cert = ca
        .issue_client_cert(&csr, name, 30 * DAY, Utc::now())
        .unwrap();
    Outpost { key, cert }
}

/// The outcome of a handshake on each side; the server side yields the
/// client's certificate chain, if any.
struct Handshake {
    server: Result<Option<Vec<CertificateDer<'static>>>, String>,
    client: Result<(), String>,
}

/// Runs a handshake and one request/response over an in-memory pipe, so a
/// rejection on either side (TLS 1.3 checks the client certificate after the
/// client thinks it is done) shows up.
async fn handshake(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> Handshake {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let server_side = async move {
        let mut tls = TlsAcceptor::from(server)
            .accept(a)
            .await
            .map_err(|e| e.to_string())?;
        let peer = tls.get_ref().1.peer_certificates().map(|c| c.to_vec());
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        tls.write_all(b"pong").await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok(peer)
    };
    let client_side = async move {
        let mut tls = TlsConnector::from(client)
            .connect(name, b)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        assert_eq!(&buf, b"pong");
        Ok(())
    };
    let (server, client) = tokio::join!(server_side, client_side);
    Handshake { server, client }
}

fn hub_name() -> ServerName<'static> {
    ServerName::try_from("hub.example").unwrap()
}

fn mtls_client(ca: &HubCa, outpost: &Outpost) -> Arc<ClientConfig> {
    client_config(
        ca.cert_pem(),
        Some((&outpost.cert.cert_pem, &outpost.key.to_pem())),
    )
    .unwrap()
}

#[tokio::test]
async fn mutual_tls_succeeds_and_the_hub_learns_the_outposts_identity() {
    let hub = hub();
    let outpost = outpost(&hub.ca, "factory-7");
    let result = handshake(
        hub.server.clone(),
        mtls_client(&hub.ca, &outpost),
        hub_name(),
    )
    .await;
    result.client.unwrap();
    let chain = result
        .server
        .unwrap()
        .expect("client presented a certificate");
    let peer = peer_identity(&chain[0]).unwrap();
    assert_eq!(peer.outpost, "factory-7");
    assert_eq!(peer.serial_hex, outpost.cert.serial_hex);
    assert_eq!(peer.not_after, outpost.cert.not_after);
    assert_eq!(
        peer.public_key_fingerprint,
        outpost.key.public_key_fingerprint()
    );
    assert_eq!(
        outpost.cert.public_key_fingerprint,
        outpost.key.public_key_fingerprint()
    );
}

#[tokio::test]
async fn the_hub_connects_by_ip_address_too() {
    let hub = hub();
    let outpost = outpost(&hub.ca, "factory-7");
    let result = handshake(
        hub.server.clone(),
        mtls_client(&hub.ca, &outpost),
        ServerName::IpAddress(Ipv4Addr::LOCALHOST.into()),
    )
    .await;
    result.client.unwrap();
    result.server.unwrap();
}

#[tokio::test]
async fn clients_without_a_certificate_are_admitted_for_the_api() {
    let hub = hub();
    let client = client_config(hub.ca.cert_pem(), None).unwrap();
    let result = handshake(hub.server.clone(), client, hub_name()).await;
    result.client.unwrap();
    assert_eq!(result.server.unwrap(), None);
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused() {
    let hub = hub();
    let other_ca = HubCa::generate("someone else").unwrap();
    let impostor = outpost(&other_ca, "factory-7");
    // The impostor trusts the real hub CA (it is public), but its own
    // certificate comes from another CA.
    let client = client_config(
        hub.ca.cert_pem(),
        Some((&impostor.cert.cert_pem, &impostor.key.to_pem())),
    )
    .unwrap();
    let result = handshake(hub.server.clone(), client, hub_name()).await;
    let err = result.server.unwrap_err();
    assert!(
        err.contains("UnknownIssuer") || err.contains("unknown issuer"),
        "{err}"
    );
    assert!(result.client.is_err());
}

#[tokio::test]
async fn an_expired_client_certificate_is_refused() {
    let hub = hub();
    let key = AgentKey::generate().unwrap();
    let long_ago = Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).unwrap();
    let cert = hub
        .ca
        .issue_client_cert(
            &key.csr_pem("factory-7").unwrap(),
            "factory-7",
            DAY,
            long_ago,
        )
        .unwrap();
    let client = client_config(hub.ca.cert_pem(), Some((&cert.cert_pem, &key.to_pem()))).unwrap();
    let result = handshake(hub.server.clone(), client, hub_name()).await;
    let err = result.server.unwrap_err();
    assert!(err.to_lowercase().contains("expired"), "{err}");
}

#[tokio::test]
async fn a_client_trusting_only_another_ca_refuses_the_hub() {
    let hub = hub();
    let other_ca = HubCa::generate("someone else").unwrap();
    let client = client_config(other_ca.cert_pem(), None).unwrap();
    let result = handshake(hub.server.clone(), client, hub_name()).await;
    assert!(result.client.is_err());
}

#[tokio::test]
async fn pinned_join_connection_accepts_the_hub_with_the_pinned_ca() {
    let hub = hub();
    let client = pinned_client_config(&hub.ca.fingerprint()).unwrap();
    let result = handshake(hub.server.clone(), client, hub_name()).await;
    result.client.unwrap();
    result.server.unwrap();
}

#[tokio::test]
async fn pinned_join_connection_refuses_another_hub_with_a_clear_error() {
    let hub = hub();
    let other_ca = HubCa::generate("someone else").unwrap();
    let client = pinned_client_config(&other_ca.fingerprint()).unwrap();
    let result = handshake(hub.server.clone(), client, hub_name()).await;
    let err = result.client.unwrap_err();
    assert!(
        err.contains("the hub's certificate is not signed by the CA this agent was joined to"),
        "{err}"
    );
    assert!(err.contains(&other_ca.fingerprint().to_string()), "{err}");
    assert!(err.contains("is this the right hub?"), "{err}");
}

#[tokio::test]
async fn pinned_join_connection_refuses_a_leaf_not_signed_by_the_pinned_ca() {
    // A server that sends the genuine CA certificate in its chain but a leaf
    // from another CA must not pass the pin.
    let hub = hub();
    let other_ca = HubCa::generate("someone else").unwrap();
    let (cert, key) = other_ca
        .issue_server_cert(&["hub.example".to_string()], &[])
        .unwrap();
    let chain = format!("{cert}{}", hub.ca.cert_pem());
    let server = server_config(&other_ca, &chain, &key).unwrap();
    let client = pinned_client_config(&hub.ca.fingerprint()).unwrap();
    let err = handshake(server, client, hub_name())
        .await
        .client
        .unwrap_err();
    assert!(err.contains("is this the right hub?"), "{err}");
}

#[tokio::test]
async fn pinned_join_connection_still_checks_the_server_name() {
    let hub = hub();
    let client = pinned_client_config(&hub.ca.fingerprint()).unwrap();
    let result = handshake(
        hub.server.clone(),
        client,
        ServerName::try_from("other.example").unwrap(),
    )
    .await;
    let err = result.client.unwrap_err();
    assert!(!err.contains("right hub"), "{err}");
}

#[test]
fn a_csr_for_another_name_is_refused() {
    let hub = hub();
    let key = AgentKey::generate().unwrap();
    let csr = key.csr_pem("factory-8").unwrap();
    let err = hub
        .ca
        .issue_client_cert(&csr, "factory-7", DAY, Utc::now())
        .unwrap_err();
    assert_eq!(err.code(), "csr-name-mismatch");
    assert!(err.to_string().contains("\"factory-8\""), "{err}");
    assert!(err.to_string().contains("\"factory-7\""), "{err}");
}

#[test]
fn a_tampered_or_garbled_csr_is_refused() {
    let hub = hub();
    let key = AgentKey::generate().unwrap();
    let csr = key.csr_pem("factory-7").unwrap();
    let mut der = rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(csr.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec();
    // Flip a bit in the last byte: part of the signature.
    let last = der.len() - 1;
    der[last] ^= 1;
    let tampered = pem("CERTIFICATE REQUEST", &der);
    for bad in [tampered.as_str(), "", "not a csr", &csr[..csr.len() / 2]] {
        let err = hub
            .ca
            .issue_client_cert(bad, "factory-7", DAY, Utc::now())
            .unwrap_err();
        assert_eq!(err.code(), "csr-invalid", "{err}");
    }
    let err = hub
        .ca
        .issue_client_cert(&csr, "Factory 7", DAY, Utc::now())
        .unwrap_err();
    assert_eq!(err.code(), "invalid-name");
}

#[test]
fn a_certificate_issued_in_the_past_reports_an_expiry_in_the_past() {
    let hub = hub();
    let key = AgentKey::generate().unwrap();
    let long_ago = Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).unwrap();
    let cert = hub
        .ca
        .issue_client_cert(
            &key.csr_pem("factory-7").unwrap(),
            "factory-7",
            DAY,
            long_ago,
        )
        .unwrap();
    assert_eq!(cert.not_after, long_ago + chrono::Duration::days(1));
    assert!(cert.not_after < Utc::now());
    let der = CertificateDer::from_pem_slice(cert.cert_pem.as_bytes()).unwrap();
    assert_eq!(peer_identity(&der).unwrap().not_after, cert.not_after);
}

#[test]
fn serials_are_random_positive_128_bit_numbers() {
    let hub = hub();
    let a = outpost(&hub.ca, "a");
    let b = outpost(&hub.ca, "a");
    assert_ne!(a.cert.serial_hex, b.cert.serial_hex);
    assert_eq!(a.cert.serial_hex.len(), 32);
    assert!(u8::from_str_radix(&a.cert.serial_hex[..2], 16).unwrap() < 0x80);
}

#[test]
fn peer_identity_refuses_certificates_that_name_no_outpost() {
    let hub = hub();
    let (server_cert, _) = hub
        .ca
        .issue_server_cert(&["hub.example".to_string()], &[])
        .unwrap();
    let der = CertificateDer::from_pem_slice(server_cert.as_bytes()).unwrap();
    let err = peer_identity(&der).unwrap_err();
    assert_eq!(err.code(), "not-an-outpost-certificate");
    assert_eq!(
        peer_identity(b"garbage").unwrap_err().code(),
        "not-an-outpost-certificate"
    );
}

#[test]
fn the_ca_survives_a_save_and_load() {
    let hub = hub();
    let loaded = HubCa::from_pem(hub.ca.cert_pem(), &hub.ca.key_pem()).unwrap();
    assert_eq!(loaded.fingerprint(), hub.ca.fingerprint());
    assert_eq!(loaded.cert_pem(), hub.ca.cert_pem());
    // A certificate issued by the loaded CA verifies against the original.
    let outpost = outpost(&loaded, "factory-7");
    let der = CertificateDer::from_pem_slice(outpost.cert.cert_pem.as_bytes()).unwrap();
    assert_eq!(peer_identity(&der).unwrap().outpost, "factory-7");
    let fp: CaFingerprint = hub.ca.fingerprint().to_string().parse().unwrap();
    assert_eq!(fp, hub.ca.fingerprint());
}

#[tokio::test]
async fn certificates_from_a_reloaded_ca_pass_mutual_tls() {
    let hub = hub();
    let loaded = HubCa::from_pem(hub.ca.cert_pem(), &hub.ca.key_pem()).unwrap();
    let outpost = outpost(&loaded, "factory-7");
    let result = handshake(
        hub.server.clone(),
        mtls_client(&hub.ca, &outpost),
        hub_name(),
    )
    .await;
    result.client.unwrap();
    assert!(result.server.unwrap().is_some());
}

#[test]
fn loading_a_ca_checks_key_and_kind() {
    let hub = hub();
    let other = HubCa::generate("other").unwrap();
    let err = HubCa::from_pem(hub.ca.cert_pem(), &other.key_pem()).unwrap_err();
    assert_eq!(err.code(), "ca-key-mismatch");
    let (server_cert, server_key) = hub
        .ca
        .issue_server_cert(&["hub.example".to_string()], &[])
        .unwrap();
    let err = HubCa::from_pem(&server_cert, &server_key).unwrap_err();
    assert_eq!(err.code(), "not-a-ca");
    let err = HubCa::from_pem("nope", &hub.ca.key_pem()).unwrap_err();
    assert_eq!(err.code(), "pem-invalid");
    assert!(err.to_string().contains("-----BEGIN"), "{err}");
}

#[test]
fn agent_keys_survive_a_save_and_load_and_never_print_the_secret() {
    let key = AgentKey::generate().unwrap();
    let pem = key.to_pem();
    let loaded = AgentKey::from_pem(&pem).unwrap();
    assert_eq!(
        loaded.public_key_fingerprint(),
        key.public_key_fingerprint()
    );
    let debug = format!("{key:?}");
    assert!(debug.contains("<redacted>"));
    assert!(!debug.contains("PRIVATE"));
    let ca = HubCa::generate("x").unwrap();
    assert!(!format!("{ca:?}").contains("PRIVATE"));
    assert_eq!(
        AgentKey::from_pem("nope").unwrap_err().code(),
        "pem-invalid"
    );
}

#[test]
fn install_crypto_provider_is_idempotent() {
    install_crypto_provider();
    install_crypto_provider();
    assert!(rustls::crypto::CryptoProvider::get_default().is_some());
}

#[test]
fn join_token_carries_the_ca_fingerprint() {
    let hub = hub();
    let token = JoinToken {
        hub_url: "https://hub.example:7443".into(),
        outpost: "factory-7".into(),
        secret: [1; 32],
        ca_fingerprint: hub.ca.fingerprint(),
    };
    let text = token.to_string();
    assert!(!text.contains(char::is_whitespace));
    let parsed: JoinToken = text.parse().unwrap();
    assert_eq!(parsed.ca_fingerprint, hub.ca.fingerprint());
    assert_eq!(parsed, token);
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let body: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        body.join("\n")
    )
}

/// A server configuration presenting an entry point certificate the hub's
/// CA issued for `names`.
fn ingress_server(ca: &HubCa, names: &[&str]) -> (Arc<ServerConfig>, IssuedCert) {
    let key = AgentKey::generate().unwrap();
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let issued = ca
        .issue_ingress_cert(
            &key.csr_pem("plant7").unwrap(),
            "plant7",
            &names,
            DAY,
            Utc::now(),
        )
        .unwrap();
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap(),
                rustls_pki_types::PrivateKeyDer::from_pem_slice(key.to_pem().as_bytes()).unwrap(),
            )
            .unwrap();
    (Arc::new(config), issued)
}

#[tokio::test]
async fn an_entry_point_certificate_from_the_hub_ca_is_trusted_for_its_names_only() {
    let hub = hub();
    let (server, issued) = ingress_server(&hub.ca, &["*.prod.shop.plant7.example.net"]);
    let client = client_config(hub.ca.cert_pem(), None).unwrap();
    let name = |n: &str| ServerName::try_from(n.to_owned()).unwrap();

    let ok = handshake(
        server.clone(),
        client.clone(),
        name("front.prod.shop.plant7.example.net"),
    )
    .await;
    assert!(ok.client.is_ok(), "{:?}", ok.client);

    // Another stage's name, and a name two labels below the wildcard, are
    // not covered.
    for other in [
        "front.dev.shop.plant7.example.net",
        "a.front.prod.shop.plant7.example.net",
    ] {
        let refused = handshake(server.clone(), client.clone(), name(other)).await;
        let err = refused.client.unwrap_err();
        assert!(err.contains("not valid for name"), "{other}: {err}");
    }

    // It is a server certificate only: no outpost identity in it.
    let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
    assert!(peer_identity(der.as_ref()).is_err());
}

#[test]
fn an_entry_point_certificate_needs_a_name_and_a_sound_csr() {
    let hub = hub();
    let key = AgentKey::generate().unwrap();
    let csr = key.csr_pem("plant7").unwrap();
    let err = hub
        .ca
        .issue_ingress_cert(&csr, "plant7", &[], DAY, Utc::now())
        .unwrap_err();
    assert!(err.to_string().contains("no host name"), "{err}");
    let err = hub
        .ca
        .issue_ingress_cert("garbage", "plant7", &["a.b".into()], DAY, Utc::now())
        .unwrap_err();
    assert_eq!(err.code(), "csr-invalid");
}

/// The cipher suite a client and the hub settle on.
async fn negotiated_suite(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
) -> rustls::CipherSuite {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let server_side = async move {
        let mut tls = TlsAcceptor::from(server).accept(a).await.unwrap();
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.unwrap();
        tls.write_all(b"pong").await.unwrap();
        tls.flush().await.unwrap();
        tls.get_ref().1.negotiated_cipher_suite().unwrap().suite()
    };
    // The client waits for the answer: the server writes after the
    // handshake (session tickets), and a client gone by then breaks it.
    let client_side = async move {
        let mut tls = TlsConnector::from(client)
            .connect(hub_name(), b)
            .await
            .unwrap();
        tls.write_all(b"ping").await.unwrap();
        tls.flush().await.unwrap();
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.unwrap();
        tls.get_ref().1.negotiated_cipher_suite().unwrap().suite()
    };
    let (server, client) = tokio::join!(server_side, client_side);
    assert_eq!(server, client);
    server
}

#[tokio::test]
async fn the_link_and_the_cli_settle_on_aes_128_gcm_and_other_clients_keep_their_choice() {
    let hub = hub();
    let outpost = outpost(&hub.ca, "factory-7");
    assert_eq!(
        negotiated_suite(hub.server.clone(), mtls_client(&hub.ca, &outpost)).await,
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
    );
    // A client with rustls's default order (AES-256-GCM first) gets it:
    // the hub follows the client's preference.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(hub.ca.cert_der().clone()).unwrap();
    let default_order =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    assert_eq!(
        negotiated_suite(hub.server.clone(), Arc::new(default_order)).await,
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
    );
}
