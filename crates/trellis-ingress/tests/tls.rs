//! HTTPS: certificates from PEM (h2 and HTTP/1.1 by ALPN), reloading from
//! files, replacing at run time, and the errors for bad input.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::*;
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use trellis_ingress::{Certificates, Part, TlsError};

const HOST: &str = "secure.example.test";

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
}

fn ca() -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "trellis-ingress test CA");
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).unwrap();
    Ca {
        der: cert.der().clone(),
        issuer: Issuer::new(params, key),
    }
}

struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

fn leaf(ca: &Ca) -> Leaf {
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec![HOST.to_owned()]).unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    Leaf {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        der: cert.der().to_vec(),
    }
}

fn client(ca: &Ca, alpn: &[&[u8]]) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots.add(ca.der.clone()).unwrap();
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

async fn connect(addr: SocketAddr, connector: &TlsConnector) -> TlsStream<TcpStream> {
    let stream = TcpStream::connect(addr).await.unwrap();
    connector
        .connect(ServerName::try_from(HOST).unwrap(), stream)
        .await
        .expect("the client trusts the served certificate")
}

/// The certificate the ingress serves now.
async fn served(addr: SocketAddr, ca: &Ca) -> Vec<u8> {
    let tls = connect(addr, &client(ca, &[b"http/1.1"])).await;
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test]
async fn https_serves_h2_and_http1_by_alpn() {
    let ca = ca();
    let leaf = leaf(&ca);
    let backend = echo("secure").await;
    let certificates =
        Certificates::from_pem(leaf.cert_pem.as_bytes(), leaf.key_pem.as_bytes()).unwrap();
    assert_eq!(certificates.chain(), vec![leaf.der.clone()]);
    let proxy = proxy_with(Some(certificates)).await;
    proxy.routes(vec![route(HOST, "/", &[backend.addr])]);

    // HTTP/2, chosen by ALPN.
    let tls = connect(proxy.addr, &client(&ca, &[b"h2", b"http/1.1"])).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = Request::get(format!("https://{HOST}/over-h2"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let reply = collect(sender.send_request(request).await.unwrap()).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.backend(), "secure");
    assert_eq!(reply.seen("x-forwarded-proto").as_deref(), Some("https"));
    assert_eq!(reply.seen("host").as_deref(), Some(HOST));

    // HTTP/1.1, chosen by ALPN.
    let tls = connect(proxy.addr, &client(&ca, &[b"http/1.1"])).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(connection);
    let reply = collect(
        sender
            .send_request(get_request(HOST, "/over-h1"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body.lines().nth(1), Some("GET /over-h1"));
    assert_eq!(reply.seen("x-forwarded-proto").as_deref(), Some("https"));

    // A sticky cookie over HTTPS is Secure.
    proxy.routes(vec![trellis_ingress::Route {
        sticky: true,
        ..route(HOST, "/", &[backend.addr])
    }]);
    let reply = collect(sender.send_request(get_request(HOST, "/")).await.unwrap()).await;
    assert!(
        reply.header("set-cookie").unwrap().ends_with("; Secure"),
        "{reply:?}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn replace_pem_applies_to_new_connections_and_refuses_bad_pairs() {
    let ca = ca();
    let (first, second) = (leaf(&ca), leaf(&ca));
    let certificates =
        Certificates::from_pem(first.cert_pem.as_bytes(), first.key_pem.as_bytes()).unwrap();
    let proxy = proxy_with(Some(certificates.clone())).await;
    assert_eq!(served(proxy.addr, &ca).await, first.der);

    let err = certificates
        .replace_pem(second.cert_pem.as_bytes(), first.key_pem.as_bytes())
        .unwrap_err();
    assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err:?}");
    assert_eq!(
        served(proxy.addr, &ca).await,
        first.der,
        "a refused pair changes nothing"
    );

    certificates
        .replace_pem(second.cert_pem.as_bytes(), second.key_pem.as_bytes())
        .unwrap();
    assert_eq!(served(proxy.addr, &ca).await, second.der);
    proxy.shutdown().await;
}

#[tokio::test]
async fn from_files_reloads_when_the_files_change() {
    let ca = ca();
    let (first, second) = (leaf(&ca), leaf(&ca));
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, &first.cert_pem).unwrap();
    std::fs::write(&key, &first.key_pem).unwrap();
    let certificates = Certificates::from_files(&cert, &key).unwrap();
    let proxy = proxy_with(Some(certificates)).await;
    assert_eq!(served(proxy.addr, &ca).await, first.der);

    // A renewal writes the key, then the certificate: in between the pair
    // does not match and the old one stays.
    std::fs::write(&key, &second.key_pem).unwrap();
    std::fs::write(&cert, &second.cert_pem).unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let now = served(proxy.addr, &ca).await;
        if now == second.der {
            break;
        }
        assert_eq!(
            now, first.der,
            "only the old or the new certificate is ever served"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was not picked up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn bad_certificates_and_keys_are_named() {
    let ca = ca();
    let (one, other) = (leaf(&ca), leaf(&ca));

    let err =
        Certificates::from_pem(b"this is not a certificate", one.key_pem.as_bytes()).unwrap_err();
    assert!(
        matches!(
            err,
            TlsError::NotPem {
                what: Part::Certificate,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("is not PEM"), "{err}");

    let err =
        Certificates::from_pem(one.cert_pem.as_bytes(), &[0x30, 0x82, 0x01, 0x02]).unwrap_err();
    assert!(
        matches!(
            err,
            TlsError::NotPem {
                what: Part::Key,
                ..
            }
        ),
        "{err:?}"
    );

    let err = Certificates::from_pem(one.key_pem.as_bytes(), one.key_pem.as_bytes()).unwrap_err();
    assert!(matches!(err, TlsError::NoCertificate { .. }), "{err:?}");
    assert!(err.to_string().contains("swapped"), "{err}");

    let err = Certificates::from_pem(one.cert_pem.as_bytes(), one.cert_pem.as_bytes()).unwrap_err();
    assert!(matches!(err, TlsError::NoPrivateKey { .. }), "{err:?}");
    assert!(err.to_string().contains("no private key found"), "{err}");

    let err =
        Certificates::from_pem(one.cert_pem.as_bytes(), other.key_pem.as_bytes()).unwrap_err();
    assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("does not belong to the certificate"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, b"\x00\x01binary").unwrap();
    std::fs::write(&key, &one.key_pem).unwrap();
    let err = Certificates::from_files(&cert, &key).unwrap_err();
    assert!(
        matches!(
            err,
            TlsError::NotPem {
                what: Part::Certificate,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().contains(&cert.display().to_string()),
        "names the file: {err}"
    );

    let missing = dir.path().join("missing.key");
    std::fs::write(&cert, &one.cert_pem).unwrap();
    let err = Certificates::from_files(&cert, &missing).unwrap_err();
    assert!(
        matches!(&err, TlsError::Unreadable { what: Part::Key, path, .. } if *path == missing),
        "{err:?}"
    );
    assert!(err.to_string().contains("missing.key"), "{err}");

    std::fs::write(&key, &other.key_pem).unwrap();
    let err = Certificates::from_files(&cert, &key).unwrap_err();
    assert!(
        matches!(&err, TlsError::KeyMismatch { cert: c, key: k } if c.contains("tls.crt") && k.contains("tls.key")),
        "{err:?}"
    );
}

#[test]
fn from_files_outside_a_runtime_says_so() {
    let err =
        Certificates::from_files("/nonexistent/c".as_ref(), "/nonexistent/k".as_ref()).unwrap_err();
    assert!(matches!(err, TlsError::NoRuntime), "{err:?}");
}
