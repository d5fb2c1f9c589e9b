//! Outpost URIs: deriving their keys, and validating a URI a user pasted.
//!
//! A URI's key is never stored. It is derived from the hub's link secret
//! (`<data>/link.secret`, created at first start, readable only by the hub)
//! and the outpost's URI generation, so a copy of the database alone does not
//! reveal any URI, and rotating a URI (generation + 1) invalidates every copy
//! handed out before.

use std::path::Path;

use anyhow::Context;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use trellis_model::Outpost;
use trellis_model::outpost_uri::{LinkKey, OutpostUri};
use trellis_store::StoreError;
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// The secret URI keys are derived from.
pub struct LinkSecret([u8; 32]);

impl LinkSecret {
    /// Reads `path`, or creates it (mode 0600) with 256 random bits.
    pub fn load_or_create(path: &Path) -> anyhow::Result<LinkSecret> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let bytes = hex::decode(text.trim())
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b).ok());
                bytes.map(LinkSecret).with_context(|| {
                    format!(
                        "{} is damaged (expected 64 hexadecimal characters); restore it from a backup. \
                         Deleting it invalidates every Outpost URI handed out",
                        path.display()
                    )
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let secret: [u8; 32] = rand::random();
                crate::tls::write_file(path, &hex::encode(secret), 0o600)?;
                Ok(LinkSecret(secret))
            }
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// The key console sessions are signed with. Derived, so that it needs
    /// no file of its own and sessions survive hub restarts; changing
    /// `link.secret` ends them.
    pub fn console_session_key(&self) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new_keyed(&self.0);
        hasher.update(b"trellis console session key v1\0");
        *hasher.finalize().as_bytes()
    }

    /// The key hub instances sharing a store sign requests they forward to
    /// each other with (see [`crate::cluster::forward`]).
    pub fn forward_key(&self) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new_keyed(&self.0);
        hasher.update(b"trellis forwarded request key v1\0");
        *hasher.finalize().as_bytes()
    }

    /// The key of the outpost's URI at a generation.
    pub fn uri_key(&self, outpost: &str, generation: u64) -> LinkKey {
        let mut hasher = blake3::Hasher::new_keyed(&self.0);
        hasher.update(b"trellis outpost-uri key v1\0");
        hasher.update(outpost.as_bytes());
        hasher.update(b"\0");
        hasher.update(&generation.to_be_bytes());
        LinkKey::from_bytes(*hasher.finalize().as_bytes())
    }
}

/// The outpost's current URI.
pub fn uri_of(state: &AppState, outpost: &Outpost) -> ApiResult<OutpostUri> {
    let (host, port) = state.public_address();
    OutpostUri::new(
        &host,
        port,
        &outpost.name,
        state
            .link_secret()
            .uri_key(&outpost.name, outpost.uri_generation),
    )
    .map_err(|e| {
        ApiError::internal(format!(
            "the hub's public address cannot form an Outpost URI: {e}"
        ))
    })
}

/// What validating an Outpost URI tells a user about the outpost.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OutpostDescription {
    pub name: String,
    pub display_name: String,
    pub description: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub link: LinkStatus,
    /// What the agent reported when it last connected; `None` before its
    /// first connection.
    pub agent: Option<AgentFacts>,
    /// Stages on the outpost, across all projects.
    pub stage_count: u32,
    /// The outpost's limit; `None` means no limit.
    pub max_stages: Option<u32>,
    /// The DNS name its stages' ingresses are reachable under
    /// (`<host>.<stage>.<project>.<domain>`).
    pub ingress_domain: String,
    /// Those of its stages that are in projects the caller belongs to
    /// (`project/stage`); others' stages are not disclosed.
    pub your_stages: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LinkStatus {
    /// `awaiting-agent`, `online`, `degraded`, `offline` or `revoked`.
    pub state: String,
    pub since: DateTime<Utc>,
    pub last_seen: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AgentFacts {
    pub version: String,
    pub os: String,
    pub arch: String,
    pub runtimes: Vec<RuntimeFact>,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub disk_free_bytes: u64,
    /// The devices the outpost offers its stages' components, by the names
    /// manifests ask for them with (`devices: [{name: camera}]`).
    #[serde(default)]
    pub devices: Vec<DeviceFact>,
}

/// A device an outpost offers, as users may see it: which projects it is
/// granted to is the administrator's business, so only whether it is
/// restricted (and, validating for a project, whether that one may use it).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeviceFact {
    pub name: String,
    /// `device` (a device node of the outpost's host) or `gpu`.
    pub kind: String,
    /// The device node on the host, for `device`; components find it in
    /// `TRELLIS_DEVICE_<NAME>`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    /// `rw`, `r`, `rwm`: the access components get.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub access: String,
    /// The GPUs, as CDI device names (`nvidia.com/gpu=all`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<String>,
    /// One replica on the whole outpost may hold it at a time.
    pub exclusive: bool,
    /// Granted to some projects only.
    pub restricted: bool,
    /// Whether the project the URI was validated for may use it; absent
    /// when validated without a project.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granted: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RuntimeFact {
    pub name: String,
    pub version: String,
}

fn refuse(status: StatusCode, code: &'static str, message: String, hint: &str) -> ApiError {
    ApiError::new(status, code, message, hint)
}

/// Checks a pasted URI and, for the stage's project if given, whether the
/// caller may place a stage there. Returns the outpost and its description,
/// or exactly one error with a stable code.
pub async fn validate(
    state: &AppState,
    caller: &Caller,
    uri_text: &str,
    project: Option<&str>,
) -> ApiResult<(Outpost, OutpostDescription)> {
    let uri: OutpostUri = uri_text.parse().map_err(|e: trellis_model::outpost_uri::OutpostUriError| {
        refuse(StatusCode::BAD_REQUEST, "malformed-uri", e.to_string(), "copy the whole URI your administrator gave you, from `trellis://` to the end of the key")
    })?;
    let (host, port) = state.public_address();
    let own = OutpostUri::new(&host, port, &uri.outpost, uri.key.clone())
        .map(|u| u.authority())
        .unwrap_or_default();
    // A well-formed URI that names no outpost of this hub: 422, its
    // content does not hold (404 would say the request's own resource,
    // the project, is missing).
    if uri.authority() != own {
        return Err(refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            "other-hub",
            format!(
                "this Outpost URI belongs to the hub at {}, not to this hub ({own})",
                uri.authority()
            ),
            "use the URI with the hub it names, or ask your administrator for this hub's URI of the outpost",
        ));
    }
    let outpost = match state.store().get_outpost(&uri.outpost).await {
        Ok(o) => o,
        Err(StoreError::NotFound { .. }) => {
            return Err(refuse(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown-outpost",
                format!("this hub has no outpost named {:?}", uri.outpost),
                "check the URI with your administrator; the outpost may have been deleted",
            ));
        }
        Err(e) => return Err(e.into()),
    };
    if uri.key
        != state
            .link_secret()
            .uri_key(&outpost.name, outpost.uri_generation)
    {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            "wrong-key",
            format!(
                "the URI's key is not the current key of outpost {:?}",
                outpost.name
            ),
            "the URI may have been rotated; ask your administrator for the current one (`trellis get outpost-uri NAME`)",
        ));
    }
    if let Some(at) = outpost.revoked_at {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            "revoked",
            format!(
                "outpost {:?} was revoked on {}",
                outpost.name,
                at.format("%Y-%m-%d %H:%M UTC")
            ),
            "choose another outpost, or ask your administrator why it was revoked",
        ));
    }
    if let Some(project) = project {
        // Not a member: the same answer whether or not the project exists.
        if caller.role_in(state, project).await.is_err() {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "not-allowed",
                format!(
                    "you may not place stages of project {project:?}: it does not exist or you are not a member of it"
                ),
                "ask the project's owner to add you, or check the project's name",
            ));
        }
    }
    let stages = state.store().stages_on_outpost(&outpost.name).await?;
    let stage_count = u32::try_from(stages.len()).unwrap_or(u32::MAX);
    if outpost.max_stages.is_some_and(|max| stage_count >= max) {
        return Err(refuse(
            StatusCode::CONFLICT,
            "outpost-full",
            format!(
                "outpost {:?} is full: it holds {stage_count} of {} stages",
                outpost.name,
                outpost.max_stages.unwrap_or_default()
            ),
            "ask your administrator to raise its limit, or choose another outpost",
        ));
    }
    let mut your_stages = Vec::new();
    for stage in &stages {
        if caller.role_in(state, &stage.project).await.is_ok() {
            your_stages.push(format!("{}/{}", stage.project, stage.name));
        }
    }
    let view = crate::link::status::link_view(state, &outpost.name).await?;
    let agent = state
        .store()
        .get_outpost_link(&outpost.name)
        .await?
        .agent
        .as_ref()
        .and_then(|hello| agent_facts_for(hello, project));
    let description = OutpostDescription {
        name: outpost.name.clone(),
        display_name: outpost.display_name.clone(),
        description: outpost.description.clone(),
        labels: outpost.labels.clone(),
        link: LinkStatus {
            state: view.state.as_str().to_owned(),
            since: view.since,
            last_seen: view.last_seen,
        },
        agent,
        stage_count,
        max_stages: outpost.max_stages,
        ingress_domain: outpost.ingress_domain().to_owned(),
        your_stages,
    };
    Ok((outpost, description))
}

/// The agent's hello, as the hub stored it, in the description's terms.
pub(crate) fn agent_facts(hello: &serde_json::Value) -> Option<AgentFacts> {
    agent_facts_for(hello, None)
}

/// [`agent_facts`], saying of each device whether `project` may use it.
fn agent_facts_for(hello: &serde_json::Value, project: Option<&str>) -> Option<AgentFacts> {
    let text = |key: &str| {
        hello
            .get(key)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let capacity = hello.get("capacity")?;
    let number = |key: &str| {
        capacity
            .get(key)
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0)
    };
    let runtimes = hello
        .get("runtimes")
        .and_then(|r| r.as_array())
        .map(|list| {
            list.iter()
                .map(|r| RuntimeFact {
                    name: r
                        .get("name")
                        .and_then(|v| v.as_str())
                        .unwrap_or_default()
                        .to_owned(),
                    version: r
                        .get("version")
                        .and_then(|v| v.as_str())
                        .unwrap_or_default()
                        .to_owned(),
                })
                .collect()
        })
        .unwrap_or_default();
    let devices = hello
        .get("devices")
        .cloned()
        .and_then(|d| serde_json::from_value::<Vec<trellis_link::protocol::DeviceOffer>>(d).ok())
        .unwrap_or_default()
        .into_iter()
        .map(|d| DeviceFact {
            granted: project.map(|p| d.projects.is_empty() || d.projects.iter().any(|q| q == p)),
            restricted: !d.projects.is_empty(),
            name: d.name,
            kind: d.kind,
            path: d.path,
            access: d.access,
            gpus: d.cdi,
            exclusive: d.exclusive,
        })
        .collect();
    Some(AgentFacts {
        devices,
        version: text("version"),
        os: text("os"),
        arch: text("arch"),
        runtimes,
        cpus: u32::try_from(number("cpus")).unwrap_or(u32::MAX),
        memory_bytes: number("memory_bytes"),
        disk_free_bytes: number("disk_free_bytes"),
    })
}
