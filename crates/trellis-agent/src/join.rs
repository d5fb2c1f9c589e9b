//! First contact with the hub, and the way back after a long absence.
//!
//! [`join`]: the agent generates its key pair on the host (the private key
//! never leaves it), sends a CSR with the one-time join token over TLS
//! pinned to the CA fingerprint the token names, and stores the certificate
//! it gets back, with the key and the CA, in its state file (BRIEF §4,
//! "Enrolment").
//!
//! [`renew_expired`]: an agent offline past its certificate's expiry cannot
//! open the mutual-TLS link any more; it asks for a new certificate over
//! plain (server-authenticated) TLS, trusting the stored CA and proving
//! possession of its registered key with a CSR signed by it. No new token is
//! needed.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use trellis_link::identity::{
    AgentKey, CaFingerprint, IdentityError, JoinToken, client_config, pinned_client_config,
};

use crate::https::{self, HubUrl, NetError};
use crate::state::{AgentState, Identity, StateError};
use crate::{STATE_FILE, cert};

/// How long each step of a join or renewal may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// Why joining (or renewing an expired certificate) failed. Every message
/// says what happened and what to do.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("{message}")]
    Refused {
        /// The hub's code: `join-token-unknown`, `join-token-used`,
        /// `join-token-expired`, `csr-invalid`, `revoked`, `unknown-key`, …
        code: String,
        message: String,
    },

    #[error(
        "the hub's certificate is not signed by the CA this token names; is this the right hub? \
         The token names {hub_url}; check that URL (a proxy in between would also cause this), \
         or ask the hub admin for a new token ({detail})"
    )]
    WrongCa { hub_url: String, detail: String },

    #[error("could not reach the hub to {doing}: {error}")]
    Network {
        doing: &'static str,
        error: String,
        code: &'static str,
        hint: Option<&'static str>,
    },

    #[error(
        "the hub answered the {doing} request with HTTP {status} ({detail}); check that {hub_url} \
         is a Trellis hub of a compatible version"
    )]
    UnexpectedResponse {
        doing: &'static str,
        hub_url: String,
        status: u16,
        detail: String,
    },

    #[error(
        "the hub sent a certificate that does not fit this agent ({reason}); nothing was stored. \
         This is a bug or a misconfiguration on the hub; tell its admin"
    )]
    BadCertificate { reason: String },

    #[error("could not {doing}: {source}")]
    Identity {
        doing: &'static str,
        #[source]
        source: IdentityError,
    },

    #[error(transparent)]
    State(#[from] StateError),

    #[error("the agent could not {what}; this is a bug in the agent, please report it")]
    Internal { what: String },
}

impl JoinError {
    /// The stable error code.
    pub fn code(&self) -> &str {
        match self {
            JoinError::Refused { code, .. } => code,
            JoinError::WrongCa { .. } => "hub-ca-mismatch",
            JoinError::Network { code, .. } => code,
            JoinError::UnexpectedResponse { .. } => "hub-unexpected-response",
            JoinError::BadCertificate { .. } => "hub-certificate-invalid",
            JoinError::Identity { source, .. } => source.code(),
            JoinError::State(_) => "agent-state-failed",
            JoinError::Internal { .. } => "agent-internal",
        }
    }

    /// What to try, when the message alone does not say it.
    pub fn hint(&self) -> Option<&str> {
        match self {
            JoinError::Network { hint, .. } => *hint,
            _ => None,
        }
    }

    /// Whether the hub said this outpost is revoked.
    pub fn is_revoked(&self) -> bool {
        matches!(self, JoinError::Refused { code, .. } if code == "revoked")
    }

    fn network(doing: &'static str, e: NetError) -> JoinError {
        JoinError::Network {
            doing,
            code: e.code(),
            hint: e.hint(),
            error: match e.hint() {
                Some(hint) => format!("{e}; {hint}"),
                None => e.to_string(),
            },
        }
    }
}

/// What the hub answers to a join or renewal.
#[derive(Debug, Deserialize)]
struct Issued {
    outpost: String,
    cert_pem: String,
    ca_pem: String,
    #[allow(dead_code)] // read from the certificate itself; kept for logs
    not_after: Option<DateTime<Utc>>,
}

/// Joins the hub named by `token`; stores and returns the identity in
/// `<data_dir>/agent.redb`. Replaces an earlier identity (re-joining after a
/// revocation), but only once the hub has issued the new one.
pub async fn join(token: &JoinToken, data_dir: &Path) -> Result<Identity, JoinError> {
    let hub = HubUrl::parse(&token.hub_url).map_err(|e| JoinError::Network {
        doing: "join",
        error: e,
        code: "hub-url-invalid",
        hint: None,
    })?;

    // Open the state first: if another agent runs on this data directory,
    // say so before spending the one-time token.
    let dir = data_dir.to_path_buf();
    let state = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&dir).map_err(|source| StateError::Io {
            path: dir.clone(),
            action: "create the data directory of",
            source,
        })?;
        AgentState::open(&dir.join(STATE_FILE))
    })
    .await
    .map_err(|e| JoinError::Internal {
        what: format!("open its state file ({e})"),
    })??;

    let key = AgentKey::generate().map_err(|source| JoinError::Identity {
        doing: "generate the outpost's key",
        source,
    })?;
    let csr_pem = key
        .csr_pem(&token.outpost)
        .map_err(|source| JoinError::Identity {
            doing: "make the certificate request",
            source,
        })?;
    let config =
        pinned_client_config(&token.ca_fingerprint).map_err(|source| JoinError::Identity {
            doing: "prepare the TLS connection",
            source,
        })?;
    let body = serde_json::json!({
        "outpost": token.outpost,
        "token_secret": hex_lower(&token.secret),
        "csr_pem": csr_pem,
    });
    let response =
        match https::post_json(&hub, config, "/api/v1/agent/join", &body, HTTP_TIMEOUT).await {
            Ok(response) => response,
            Err(NetError::Tls {
                certificate: true,
                reason,
                ..
            }) => {
                return Err(JoinError::WrongCa {
                    hub_url: token.hub_url.clone(),
                    detail: reason,
                });
            }
            Err(e) => return Err(JoinError::network("join", e)),
        };
    let issued = read_issued(&response, "join", &token.hub_url, &token.outpost)?;

    if CaFingerprint::of(&first_cert_der(&issued.ca_pem)?) != token.ca_fingerprint {
        return Err(JoinError::BadCertificate {
            reason: "the CA certificate it sent is not the one the token names".into(),
        });
    }
    let identity = Identity {
        outpost: token.outpost.clone(),
        hub_url: token.hub_url.clone(),
        ca_cert_pem: issued.ca_pem,
        cert_pem: issued.cert_pem,
        key_pem: key.to_pem(),
    };
    let not_after = cert::check_own(&identity, &identity.cert_pem)
        .map_err(|reason| JoinError::BadCertificate { reason })?;

    let state = Arc::new(state);
    let stored = identity.clone();
    let previous = tokio::task::spawn_blocking(move || {
        let previous = state.identity()?;
        state.set_identity(&stored)?;
        Ok::<_, StateError>(previous)
    })
    .await
    .map_err(|e| JoinError::Internal {
        what: format!("save the identity ({e})"),
    })??;
    if let Some(previous) = previous {
        tracing::info!(
            previous_outpost = %previous.outpost,
            previous_hub = %previous.hub_url,
            "replaced the outpost's earlier identity"
        );
    }
    tracing::info!(outpost = %identity.outpost, hub = %identity.hub_url, %not_after, "joined the hub");
    Ok(identity)
}

/// Asks the hub for a new certificate for the stored key, over TLS trusting
/// the stored CA, and returns the identity with it (not stored: the caller
/// does that).
pub async fn renew_expired(identity: &Identity) -> Result<Identity, JoinError> {
    let hub = HubUrl::parse(&identity.hub_url).map_err(|e| JoinError::Network {
        doing: "renew the certificate",
        error: e,
        code: "hub-url-invalid",
        hint: None,
    })?;
    let key = AgentKey::from_pem(&identity.key_pem).map_err(|source| JoinError::Identity {
        doing: "read the outpost's stored key",
        source,
    })?;
    let csr_pem = key
        .csr_pem(&identity.outpost)
        .map_err(|source| JoinError::Identity {
            doing: "make the certificate request",
            source,
        })?;
    let config =
        client_config(&identity.ca_cert_pem, None).map_err(|source| JoinError::Identity {
            doing: "read the stored hub CA",
            source,
        })?;
    let body = serde_json::json!({ "outpost": identity.outpost, "csr_pem": csr_pem });
    let response = https::post_json(&hub, config, "/api/v1/agent/renew", &body, HTTP_TIMEOUT)
        .await
        .map_err(|e| JoinError::network("renew the certificate", e))?;
    let issued = read_issued(&response, "renewal", &identity.hub_url, &identity.outpost)?;
    let renewed = Identity {
        cert_pem: issued.cert_pem,
        // The CA may have been re-issued; the hub sends the current one.
        ca_cert_pem: issued.ca_pem,
        ..identity.clone()
    };
    cert::check_own(&renewed, &renewed.cert_pem)
        .map_err(|reason| JoinError::BadCertificate { reason })?;
    Ok(renewed)
}

/// Turns the hub's answer into the issued certificate or a refusal people
/// can act on.
fn read_issued(
    response: &https::Response,
    doing: &'static str,
    hub_url: &str,
    outpost: &str,
) -> Result<Issued, JoinError> {
    if response.status == 200 {
        let issued: Issued =
            serde_json::from_slice(&response.body).map_err(|e| JoinError::UnexpectedResponse {
                doing,
                hub_url: hub_url.to_owned(),
                status: 200,
                detail: format!("its body is not a certificate answer: {e}"),
            })?;
        if issued.outpost != outpost {
            return Err(JoinError::BadCertificate {
                reason: format!(
                    "the answer is for outpost {:?}, not {outpost:?}",
                    issued.outpost
                ),
            });
        }
        return Ok(issued);
    }
    let Some(error) = response.api_error() else {
        let preview =
            String::from_utf8_lossy(&response.body[..response.body.len().min(200)]).into_owned();
        return Err(JoinError::UnexpectedResponse {
            doing,
            hub_url: hub_url.to_owned(),
            status: response.status,
            detail: if preview.is_empty() {
                "no body".into()
            } else {
                format!("body starts {preview:?}")
            },
        });
    };
    let what_to_do = match error.code.as_str() {
        "join-token-unknown" => {
            "the hub does not know this join token; check that it was copied whole and that it \
             is for this hub, or ask the hub admin for a new one"
                .to_owned()
        }
        "join-token-used" => "this join token was already used (tokens work once); ask the hub \
                              admin for a new one"
            .to_owned(),
        "join-token-expired" => {
            "this join token has expired; ask the hub admin for a new one".to_owned()
        }
        "csr-invalid" => "the hub refused the agent's certificate request; check that the agent \
                          and the hub are compatible versions"
            .to_owned(),
        "revoked" => format!(
            "outpost {outpost} was revoked; ask the administrator — `trellis agent join` with a \
             new token is needed"
        ),
        "unknown-key" => format!(
            "the hub does not recognise this agent's key for outpost {outpost} (it was joined \
             again elsewhere, or the hub's data was reset); `trellis agent join` with a new \
             token from the administrator is needed"
        ),
        _ => error.hint.clone().unwrap_or_default(),
    };
    let mut message = format!("the hub refused the {doing}: {}", error.message);
    if !what_to_do.is_empty() {
        message.push_str("; ");
        message.push_str(&what_to_do);
    }
    Err(JoinError::Refused {
        code: error.code,
        message,
    })
}

fn first_cert_der(pem: &str) -> Result<Vec<u8>, JoinError> {
    x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map(|(_, pem)| pem.contents)
        .map_err(|e| JoinError::BadCertificate {
            reason: format!("the CA certificate it sent is not PEM ({e})"),
        })
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
