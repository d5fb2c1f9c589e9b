//! The entry point's certificate (`POST /api/v1/agent/ingress-certificate`):
//! an agent serving its stages' ingresses over HTTPS with
//! `--ingress-hub-cert` asks the hub's CA for a server certificate for the
//! names it serves, so that clients trusting the hub's CA (as the CLI and
//! agents already do) trust the outpost's ingresses too.
//!
//! The agent says which names it wants, one wildcard per stage with
//! ingresses (`*.<stage>.<project>.<ingress domain>`, since a host is
//! `<prefix>.<stage>.<project>.<ingress domain>`); the hub signs only names
//! of stages placed on that outpost under its current ingress domain, so an
//! outpost can never obtain a certificate for another outpost's (or the
//! hub's) names. Like the agent's own certificate, it is valid for the
//! link's certificate validity and the agent renews it in its last third of
//! life, or as soon as a stage it serves is not covered.

use std::collections::BTreeSet;

use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use trellis_model::ingress::check_ingress_host;
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult};
use crate::extract::Json;
use crate::state::AppState;
use crate::tls::ConnectionInfo;

use super::endpoint::authorize_agent;

/// At most this many names in one certificate: one per stage, and an
/// outpost with more stages than this that all have ingresses is far
/// beyond what one entry point is for.
pub const MAX_NAMES: usize = 1000;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct IngressCertificateRequest {
    /// A CSR made with the key the entry point will serve with (only its
    /// public key and signature are used).
    pub csr_pem: String,
    /// The names to certify: `*.<stage>.<project>.<ingress domain>` of
    /// stages on this outpost.
    pub names: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct IngressCertificate {
    pub outpost: String,
    /// The server certificate (PEM), issued by the hub's CA.
    pub cert_pem: String,
    /// The hub's CA certificate (PEM): what clients must trust.
    pub ca_pem: String,
    pub names: Vec<String>,
    pub not_after: DateTime<Utc>,
}

/// Issues the HTTPS certificate of the calling outpost's entry point.
/// Needs the outpost's client certificate.
#[utoipa::path(post, path = "/agent/ingress-certificate", tag = "outposts",
    request_body = IngressCertificateRequest,
    responses((status = 200, body = IngressCertificate)))]
pub async fn ingress_certificate(
    State(state): State<AppState>,
    connection: Option<axum::Extension<ConnectionInfo>>,
    Json(req): Json<IngressCertificateRequest>,
) -> ApiResult<axum::Json<IngressCertificate>> {
    let peer = authorize_agent(&state, connection).await?;
    let outpost = state.store().get_outpost(&peer.outpost).await?;
    let stages = state.store().stages_on_outpost(&peer.outpost).await?;
    let domain = outpost.ingress_domain();
    let served: BTreeSet<String> = stages
        .iter()
        .map(|s| format!("*.{}.{}.{domain}", s.name, s.project))
        .collect();
    let names = check_names(&req.names, &served, &peer.outpost, domain)?;
    let validity = state.links().settings().cert_validity;
    let issued = state
        .ca()
        .issue_ingress_cert(&req.csr_pem, &peer.outpost, &names, validity, Utc::now())
        .map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                e.code(),
                e.to_string(),
                "the agent makes the CSR itself; update the agent if this persists",
            )
        })?;
    tracing::info!(outpost = %peer.outpost, names = names.len(), not_after = %issued.not_after, "issued the entry point's certificate");
    Ok(axum::Json(IngressCertificate {
        outpost: peer.outpost,
        cert_pem: issued.cert_pem,
        ca_pem: state.ca().cert_pem().to_owned(),
        names,
        not_after: issued.not_after,
    }))
}

/// The requested names, sorted and without repeats, if every one is a
/// stage's of this outpost.
fn check_names(
    requested: &[String],
    served: &BTreeSet<String>,
    outpost: &str,
    domain: &str,
) -> Result<Vec<String>, ApiError> {
    let refused = |message: String| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "ingress-names-refused",
            message,
            "the agent asks for the names of the stages it serves; if a stage was just moved or \
             the outpost's ingress domain changed, the agent asks again once it has the new state",
        )
    };
    let names: BTreeSet<String> = requested.iter().map(|n| n.to_ascii_lowercase()).collect();
    if names.is_empty() {
        return Err(refused("no names were asked for".into()));
    }
    if names.len() > MAX_NAMES {
        return Err(refused(format!(
            "{} names were asked for; one certificate holds at most {MAX_NAMES}",
            names.len()
        )));
    }
    for name in &names {
        let bare = name.strip_prefix("*.").unwrap_or(name);
        if let Err(why) = check_ingress_host(&format!("x.{bare}")) {
            return Err(refused(why));
        }
        if !served.contains(name) {
            return Err(refused(format!(
                "{name:?} is not the name of a stage on outpost {outpost:?}: its ingresses are \
                 *.<stage>.<project>.{domain} for the stages placed on it"
            )));
        }
    }
    Ok(names.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served() -> BTreeSet<String> {
        ["*.prod.shop.plant7.net", "*.dev.shop.plant7.net"]
            .map(str::to_owned)
            .into()
    }

    #[test]
    fn names_of_the_outposts_stages_are_signed_sorted_and_once() {
        let names = check_names(
            &[
                "*.prod.shop.plant7.net".into(),
                "*.DEV.shop.plant7.net".into(),
                "*.prod.shop.plant7.net".into(),
            ],
            &served(),
            "plant7",
            "plant7.net",
        )
        .unwrap();
        assert_eq!(names, ["*.dev.shop.plant7.net", "*.prod.shop.plant7.net"]);
    }

    #[test]
    fn other_names_are_refused_naming_the_name() {
        for bad in [
            "*.qa.shop.plant7.net",
            "hub.example.net",
            "*.plant7.net",
            "front.prod.shop.plant7.net",
        ] {
            let err = check_names(&[bad.into()], &served(), "plant7", "plant7.net").unwrap_err();
            assert_eq!(err.code, "ingress-names-refused");
            assert!(err.message.contains(bad), "{bad}: {}", err.message);
        }
        let err = check_names(&[], &served(), "plant7", "plant7.net").unwrap_err();
        assert!(err.message.contains("no names"), "{}", err.message);
    }
}
