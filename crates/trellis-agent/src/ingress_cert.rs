//! The entry point's HTTPS certificate from the hub's CA
//! (`--ingress-hub-cert`).
//!
//! The agent asks the hub (`POST /api/v1/agent/ingress-certificate`, with
//! its client certificate) for a server certificate covering every stage it
//! serves — `*.<stage>.<project>.<ingress domain>`, see
//! [`crate::ingress::IngressRoutes::certificate_names`] — with a key made
//! here that never leaves the host. It asks again when a stage it serves is
//! not covered (a new stage, a changed ingress domain) and, like its own
//! certificate, in the certificate's last third of life. The pair is kept
//! in `<data>/ingress-tls/` so a restarted agent serves at once, with the
//! hub unreachable too. Until the first one arrives the entry point serves
//! a self-signed placeholder: it answers, but no client trusts it.
//!
//! A failure (the hub unreachable, a refusal) keeps the certificate being
//! served, goes into the error log the hub's connection-status view shows,
//! and is tried again with backoff.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use tokio::sync::watch;
use trellis_ingress::Certificates;
use trellis_link::identity::{AgentKey, client_config, self_signed_server_cert};

use crate::AgentError;
use crate::https::{self, HubUrl};
use crate::report::Reporter;
use crate::shutdown::Shutdown;
use crate::state::AgentState;

/// Where the pair is kept, under the data directory.
pub const DIR: &str = "ingress-tls";
const CERT_FILE: &str = "cert.pem";
const KEY_FILE: &str = "key.pem";

/// The stable code of the errors this module reports.
const ERROR_CODE: &str = "ingress-certificate-failed";

/// How long one request to the hub may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// First and longest wait before asking again after a failure.
const RETRY_MIN: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(300);
/// How long the names must stay the same before a certificate is asked
/// for, so the routes of several stages coming up together (an agent
/// start) make one request, not one each.
const SETTLE: Duration = Duration::from_secs(1);

/// A certificate the entry point serves, and what it covers.
#[derive(Debug, Clone)]
struct Held {
    names: BTreeSet<String>,
    renew_at: DateTime<Utc>,
}

/// The entry point's certificates at start: the pair kept from before, or
/// the placeholder. A kept pair that cannot be read is replaced by the next
/// one the hub issues.
pub(crate) fn initial(data_dir: &Path) -> Result<(Certificates, Option<HeldCert>), AgentError> {
    let dir = data_dir.join(DIR);
    match read_kept(&dir) {
        Ok(Some((certificates, held))) => return Ok((certificates, Some(HeldCert(held)))),
        Ok(None) => {}
        Err(why) => tracing::warn!(
            dir = %dir.display(),
            "the entry point's kept certificate cannot be used ({why}); the hub is asked for a new one"
        ),
    }
    let fail = |message: String| AgentError::Ingress { message };
    let (cert, key) = self_signed_server_cert("trellis-entry-point.invalid")
        .map_err(|e| fail(format!("could not make the placeholder certificate: {e}")))?;
    let certificates = Certificates::from_pem(cert.as_bytes(), key.as_bytes())
        .map_err(|e| fail(format!("could not load the placeholder certificate: {e}")))?;
    Ok((certificates, None))
}

/// A certificate found at start (opaque outside this module).
#[derive(Debug, Clone)]
pub(crate) struct HeldCert(Held);

fn read_kept(dir: &Path) -> Result<Option<(Certificates, Held)>, String> {
    let (cert_path, key_path) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
    if !cert_path.exists() {
        return Ok(None);
    }
    let cert = std::fs::read_to_string(&cert_path).map_err(|e| e.to_string())?;
    let key = std::fs::read_to_string(&key_path).map_err(|e| e.to_string())?;
    let certificates =
        Certificates::from_pem(cert.as_bytes(), key.as_bytes()).map_err(|e| e.to_string())?;
    Ok(Some((certificates, held(&cert)?)))
}

/// The names a PEM certificate covers and when to renew it.
fn held(cert_pem: &str) -> Result<Held, String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| format!("it is not a PEM certificate ({e})"))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| format!("it could not be parsed ({e})"))?;
    let names = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(name) => {
                    Some(name.to_ascii_lowercase())
                }
                _ => None,
            })
            .collect(),
        _ => BTreeSet::new(),
    };
    let (not_before, not_after) = crate::cert::validity(cert_pem)?;
    Ok(Held {
        names,
        renew_at: crate::cert::renew_at(not_before, not_after),
    })
}

/// Keeps the entry point's certificate issued and current until `shutdown`.
pub(crate) struct Keeper {
    pub state: Arc<AgentState>,
    pub reporter: Arc<Reporter>,
    pub certificates: Certificates,
    pub dir: PathBuf,
}

impl Keeper {
    pub(crate) async fn run(
        self,
        kept: Option<HeldCert>,
        mut names: watch::Receiver<BTreeSet<String>>,
        mut shutdown: Shutdown,
    ) {
        let mut current = kept.map(|k| k.0);
        let mut retry = RETRY_MIN;
        let mut failed = false;
        loop {
            let wanted = names.borrow_and_update().clone();
            let now = Utc::now();
            let wait = match &current {
                _ if wanted.is_empty() => None,
                _ if failed => Some(retry),
                Some(held) if wanted.is_subset(&held.names) => {
                    Some((held.renew_at - now).to_std().unwrap_or(Duration::ZERO))
                }
                _ => Some(SETTLE),
            };
            tokio::select! {
                _ = shutdown.wait() => return,
                changed = names.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
                _ = sleep(wait) => {}
            }
            match self.issue(&wanted).await {
                Ok(held) => {
                    tracing::info!(names = held.names.len(), renew_at = %held.renew_at, "the entry point serves a certificate from the hub's CA");
                    current = Some(held);
                    failed = false;
                    retry = RETRY_MIN;
                }
                Err(e) => {
                    tracing::warn!(error = %e.message, retry_in = ?retry, "the entry point's certificate could not be issued; it keeps the one it serves");
                    self.reporter
                        .record_error(ERROR_CODE, &e.message, e.hint.as_deref());
                    // Into the outbox now, so a link that is up carries it
                    // to the connection status at once (a link that is
                    // down sends the outbox when it is back).
                    if let Err(e) = self.reporter.flush_errors().await {
                        tracing::warn!(error = %e, "could not queue the entry point's certificate error");
                    }
                    if failed {
                        retry = (retry * 2).min(RETRY_MAX);
                    }
                    failed = true;
                }
            }
        }
    }

    /// Asks the hub for a certificate covering `names`, keeps it and serves
    /// it.
    async fn issue(&self, names: &BTreeSet<String>) -> Result<Held, IssueError> {
        let identity = crate::blocking(&self.state, |s| s.identity())
            .await
            .map_err(|e| IssueError::new(format!("the agent's state cannot be read: {e}")))?
            .ok_or_else(|| {
                IssueError::new("this outpost has not joined a hub, so no hub can issue the entry point's certificate")
                    .hint("join it with `trellis agent join`, or serve HTTPS with --ingress-cert and --ingress-key")
            })?;
        let hub = HubUrl::parse(&identity.hub_url).map_err(IssueError::new)?;
        let config = client_config(
            &identity.ca_cert_pem,
            Some((&identity.cert_pem, &identity.key_pem)),
        )
        .map_err(|e| {
            IssueError::new(format!(
                "the TLS connection to the hub cannot be set up: {e}"
            ))
        })?;
        let key = AgentKey::generate()
            .map_err(|e| IssueError::new(format!("no key could be made: {e}")))?;
        let csr = key
            .csr_pem(&identity.outpost)
            .map_err(|e| IssueError::new(format!("no certificate request could be made: {e}")))?;
        let body = serde_json::json!({ "csr_pem": csr, "names": names });
        let response = https::post_json(
            &hub,
            config,
            "/api/v1/agent/ingress-certificate",
            &body,
            REQUEST_TIMEOUT,
        )
        .await
        .map_err(|e| {
            IssueError::new(format!(
                "asking the hub {} for the entry point's certificate failed: {e}",
                hub.url
            ))
            .hint_opt(e.hint())
        })?;
        if response.status != 200 {
            let refusal = response.api_error();
            return Err(match refusal {
                Some(e) => IssueError::new(format!(
                    "the hub refused the entry point's certificate ({}): {}",
                    e.code, e.message
                ))
                .hint_opt(e.hint.as_deref()),
                None => IssueError::new(format!(
                    "the hub answered HTTP {} to the request for the entry point's certificate",
                    response.status
                ))
                .hint("a hub older than this agent cannot issue it; upgrade the hub, or use --ingress-cert"),
            });
        }
        #[derive(Deserialize)]
        struct Issued {
            cert_pem: String,
        }
        let issued: Issued = serde_json::from_slice(&response.body)
            .map_err(|e| IssueError::new(format!("the hub's answer is not a certificate ({e})")))?;
        let held = held(&issued.cert_pem)
            .map_err(|why| IssueError::new(format!("the hub's certificate is unusable: {why}")))?;
        if !names.is_subset(&held.names) {
            return Err(IssueError::new(format!(
                "the hub's certificate covers {:?}, not all of {names:?}",
                held.names
            )));
        }
        let key_pem = key.to_pem();
        self.certificates
            .replace_pem(issued.cert_pem.as_bytes(), key_pem.as_bytes())
            .map_err(|e| IssueError::new(format!("the hub's certificate cannot be served: {e}")))?;
        // Served already; keeping it is for the next start.
        let dir = self.dir.clone();
        let cert_pem = issued.cert_pem;
        let kept = tokio::task::spawn_blocking(move || keep(&dir, &cert_pem, &key_pem)).await;
        match kept {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "the entry point's certificate could not be kept; a restarted agent asks the hub again")
            }
            Err(e) => tracing::warn!(error = %e, "keeping the entry point's certificate failed"),
        }
        Ok(held)
    }
}

/// Writes the pair, each file whole (written beside and renamed), the key
/// readable by the agent only.
fn keep(dir: &Path, cert_pem: &str, key_pem: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir)?;
    let write = |name: &str, text: &str, mode: u32| -> std::io::Result<()> {
        let tmp = dir.join(format!("{name}.tmp"));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, dir.join(name))
    };
    write(KEY_FILE, key_pem, 0o600)?;
    write(CERT_FILE, cert_pem, 0o644)
}

async fn sleep(wait: Option<Duration>) {
    match wait {
        Some(wait) => tokio::time::sleep(wait).await,
        None => std::future::pending().await,
    }
}

/// Why a certificate was not issued, for the log and the error report.
#[derive(Debug)]
struct IssueError {
    message: String,
    hint: Option<String>,
}

impl IssueError {
    fn new(message: impl Into<String>) -> Self {
        IssueError {
            message: message.into(),
            hint: None,
        }
    }

    fn hint(mut self, hint: &str) -> Self {
        self.hint = Some(hint.to_owned());
        self
    }

    fn hint_opt(mut self, hint: Option<&str>) -> Self {
        self.hint = hint.map(str::to_owned);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_pair_is_read_back_with_its_names() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_kept(dir.path()).unwrap().is_none());
        let ca = trellis_link::identity::HubCa::generate("test CA").unwrap();
        let key = AgentKey::generate().unwrap();
        let issued = ca
            .issue_ingress_cert(
                &key.csr_pem("plant7").unwrap(),
                "plant7",
                &["*.prod.shop.localhost".into()],
                Duration::from_secs(3 * 3600),
                Utc::now(),
            )
            .unwrap();
        keep(dir.path(), &issued.cert_pem, &key.to_pem()).unwrap();
        let (_, held) = read_kept(dir.path()).unwrap().unwrap();
        assert_eq!(
            held.names.iter().collect::<Vec<_>>(),
            ["*.prod.shop.localhost"]
        );
        // Renewal is due with a third of the three hours left.
        let left = held.renew_at - Utc::now();
        assert!(
            left > chrono::Duration::minutes(115) && left <= chrono::Duration::minutes(120),
            "{left}"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        // A key that is not the certificate's is refused, not served.
        let other = AgentKey::generate().unwrap();
        keep(dir.path(), &issued.cert_pem, &other.to_pem()).unwrap();
        assert!(read_kept(dir.path()).is_err());
    }
}
