//! Request and response bodies of the HTTP API that are not domain records.
//! The command line deserialises the same types, so the two cannot drift.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use trellis_model::{ConfigData, NewBuild, Role, StageType};
use utoipa::ToSchema;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WhoAmI {
    pub user: String,
    pub admin: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"name": "alice", "admin": false}))]
pub struct CreateUserRequest {
    #[schema(pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")]
    pub name: String,
    #[serde(default)]
    pub admin: bool,
}

/// `PATCH /users/{user}`: what to change; absent fields stay.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
pub struct UpdateUserRequest {
    /// Make the user an administrator, or no longer one.
    #[serde(default)]
    pub admin: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateKeyRequest {
    #[serde(default)]
    pub description: String,
}

/// A newly created access key. The only time its secret is ever shown.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedKey {
    pub user: String,
    pub key_id: String,
    /// `<key-id>:<secret>`.
    pub key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"name": "shop", "description": "The web shop"}))]
pub struct CreateProjectRequest {
    #[schema(pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")]
    pub name: String,
    /// How people see it named; its name when absent.
    #[serde(default)]
    pub display_name: Option<String>,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SetMemberRequest {
    pub role: Role,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"name": "prod", "type": "prod", "display_name": "Production"}))]
pub struct CreateStageRequest {
    #[schema(pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")]
    pub name: String,
    #[serde(rename = "type")]
    pub stage_type: StageType,
    #[serde(default)]
    pub display_name: Option<String>,
    /// Place the stage on the outpost this URI names (validated again);
    /// without it the stage runs on the hub's local outpost.
    #[serde(default)]
    #[schema(
        pattern = "^(trellis|outpost)://((([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\\.){0,3}[a-z]([a-z0-9-]{0,61}[a-z0-9])?)|((25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(\\.(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])){3})):([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])/[a-z]([a-z0-9-]{0,61}[a-z0-9])?\\?key=[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]$"
    )]
    pub outpost_uri: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
pub struct UpdateStageRequest {
    #[serde(default)]
    pub display_name: Option<String>,
    #[serde(default)]
    pub suspended: Option<bool>,
    /// dev, qa or prod
    #[serde(default, rename = "type")]
    pub stage_type: Option<StageType>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
#[schema(example = json!({"name": "factory-7", "description": "Line 3, hall B", "labels": {"site": "plant-3"}, "max_stages": 4}))]
pub struct CreateOutpostRequest {
    #[schema(pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")]
    pub name: String,
    #[serde(default)]
    pub display_name: Option<String>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    #[schema(value_type = Option<i64>, minimum = 0, maximum = 4294967295u64)]
    pub max_stages: Option<u32>,
    /// The DNS name its ingresses are reachable under; `localhost` when
    /// absent (or `""`).
    #[serde(default)]
    #[schema(
        max_length = 61,
        pattern = "^([a-z0-9]([a-z0-9-]*[a-z0-9])?(\\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*)?$"
    )]
    pub ingress_domain: Option<String>,
    /// Validity of the first join token in seconds (at most 7 days); 24
    /// hours when absent.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 604800)]
    pub token_ttl_secs: Option<u64>,
}

/// `PATCH /outposts/{outpost}`: what to change; absent fields stay.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
pub struct UpdateOutpostRequest {
    #[serde(default)]
    pub display_name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    /// A new ingress domain; `""` goes back to the default (`localhost`).
    /// Every stage on the outpost is sent its new hosts.
    #[serde(default)]
    #[schema(
        max_length = 61,
        pattern = "^([a-z0-9]([a-z0-9-]*[a-z0-9])?(\\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*)?$"
    )]
    pub ingress_domain: Option<String>,
}

/// `POST /projects/{p}/builds`: the build as recorded by `trellis push build`.
pub type CreateBuildRequest = NewBuild;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"env": {"LOG_LEVEL": "info", "db.user": "shop"}, "files": {"settings.json": "{\"theme\": \"dark\"}"}}))]
pub struct AddConfigDataRequest {
    #[serde(flatten)]
    pub data: ConfigData,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
#[schema(example = json!({"build": "main_b1", "config": "app"}))]
pub struct PushReleaseRequest {
    /// Build name; the project's newest build when absent.
    #[serde(default)]
    pub build: Option<String>,
    /// Config of the stage to take (frozen into the release).
    #[serde(default)]
    #[schema(pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")]
    pub config: Option<String>,
}

/// `POST /projects/{project}/releases`: one build to several stages.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
#[schema(example = json!({"stages": ["line-1", "line-2"], "build": "main_b1"}))]
pub struct PushReleasesRequest {
    /// The stages of the project to release to, each named once.
    /// Empty (or absent) when `selector` chooses them.
    #[schema(max_items = 100000)]
    #[serde(default)]
    pub stages: Vec<String>,
    /// Build name; the project's newest build when absent.
    #[serde(default)]
    pub build: Option<String>,
    /// Instead of `stages`: every live stage of the project whose outpost's
    /// labels match this label selector.
    #[serde(default)]
    pub selector: Option<String>,
}

/// `POST /chunks/missing`: the digests of the chunks a client is about to
/// upload (hex, at most 10,000).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MissingChunksRequest {
    #[schema(max_items = 10000)]
    pub digests: Vec<String>,
}

/// The digests of the request the hub does not have, in request order.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MissingChunksResponse {
    pub missing: Vec<String>,
}

/// A stored chunk: its digest, content size and stored (compressed) size.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChunkInfoResponse {
    pub digest: String,
    pub size: u64,
    pub stored: u64,
}

/// How a project, stage or outpost is deleted.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// Delete what depends on it too. For a project or a stage: delete it
    /// for good at once, as `purge` does.
    #[serde(default)]
    pub force: bool,
    /// A project or stage: delete it for good at once, with its releases,
    /// configs (and a project's stages and builds), instead of archiving
    /// it.
    #[serde(default)]
    pub purge: bool,
}

/// Which projects or stages a list shows.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ArchivedQuery {
    /// The archived ones (deleted, kept until restored or purged) instead
    /// of the live ones.
    #[serde(default)]
    pub archived: bool,
}

/// Which stages `GET /projects/{project}/stages` lists.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StageListQuery {
    /// The archived ones (deleted, kept until restored or purged) instead
    /// of the live ones.
    #[serde(default)]
    pub archived: bool,
    /// Only stages whose outpost's labels match this label selector
    /// (`site=munich,line!=3`, `site in (a,b)`, `k`, `!k`).
    #[serde(default)]
    pub selector: Option<String>,
}

/// `PATCH /projects/{project}`: what to change; absent fields stay.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
pub struct UpdateProjectRequest {
    #[serde(default)]
    pub display_name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
}

/// Whether a config's secret values are shown.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ConfigValuesQuery {
    /// Show the values of secret keys too (owners only).
    #[serde(default)]
    pub with_values: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
pub struct KeysQuery {
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"uri": "trellis://hub.example:7440/factory-7?key=2uJmaXHu0YyhGh2vJ2oQ0t5CM2oXcrRJxDm2VAyDl0A", "project": "shop"}))]
pub struct ValidateOutpostUriRequest {
    #[schema(
        pattern = "^(trellis|outpost)://((([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\\.){0,3}[a-z]([a-z0-9-]{0,61}[a-z0-9])?)|((25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(\\.(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])){3})):([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])/[a-z]([a-z0-9-]{0,61}[a-z0-9])?\\?key=[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]$"
    )]
    pub uri: String,
    /// The project the stage would belong to, to check the caller may
    /// place its stages there.
    #[serde(default)]
    #[schema(pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")]
    pub project: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OutpostUriResponse {
    pub outpost: String,
    pub uri: String,
}

/// A join token for an outpost's agent, and the command to run on its host.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JoinTokenResponse {
    pub outpost: String,
    /// `tjt1.…`: carries the hub's address and CA fingerprint, and a
    /// one-time secret.
    pub token: String,
    pub expires_at: chrono::DateTime<chrono::Utc>,
    /// What to run on the outpost's host when the agent is on it already.
    pub command: String,
    /// What to run on the outpost's host to install the agent from the hub
    /// (binary, systemd unit) and join: `curl … HUB/install | sh -s --
    /// --token …`, its download pinned to the hub's TLS key.
    pub install_command: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedOutpost {
    pub outpost: trellis_model::Outpost,
    pub join: JoinTokenResponse,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
pub struct JoinTokenRequest {
    /// Validity in seconds (at most 7 days); 24 hours when absent.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 604800)]
    pub ttl_secs: Option<u64>,
}

/// How `POST …/components/{component}/{start|stop|restart}` acts.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ComponentActionQuery {
    /// With `start` only (`trellis start component --now`): a scheduled
    /// component also runs once at once, outside its schedule; a
    /// permanently running one is simply started.
    #[serde(default)]
    pub now: bool,
    /// With `stop` only (`trellis stop component --kill`): its workloads
    /// end at once, without the grace period (SIGKILL; the container
    /// engine's kill). It stays killed until started.
    #[serde(default)]
    pub kill: bool,
}

/// What `POST …/components/{component}/{start|stop|restart}` did.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ComponentActionResponse {
    pub project: String,
    pub stage: String,
    pub component: String,
    pub action: trellis_model::ComponentAction,
    /// Whether what should run changed; stopping a stopped component (or
    /// starting a running one) changes nothing and bumps no revision.
    pub changed: bool,
    /// The stage's desired revision afterwards; the outpost applies it as
    /// soon as its link is up.
    pub desired_revision: u64,
    /// The component's standing control afterwards.
    pub control: ComponentDesired,
    /// The stage is suspended: nothing runs until it is resumed, whatever
    /// its components' controls say.
    pub stage_suspended: bool,
}

/// What should be true of a component, as asked with start/stop/restart.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ComponentDesired {
    /// Stopped on request.
    pub stopped: bool,
    /// Stopped by a kill (without the grace period).
    #[serde(default)]
    pub killed: bool,
    /// Restarts requested so far.
    pub restarts: u64,
}

/// What the outpost last reported about a component.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ComponentObserved {
    /// `unknown` when the outpost has not reported the component; else its
    /// words, e.g. `running`, `starting`, `stopped`, `crash-looping`,
    /// `failed`, `waiting`, `succeeded`.
    pub state: String,
    /// Replicas asked for and running.
    pub replicas: u32,
    pub running: u32,
    /// Restarts the outpost counted (crashes and requested restarts).
    pub restarts: u32,
    pub exit_code: Option<i32>,
    /// Since when it is in `state`.
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// The release its workloads were made for.
    pub release: Option<u64>,
    /// Why it is failed or crash-looping.
    pub message: Option<String>,
    /// Scheduled components: when the last run ended and the next begins.
    pub last_run: Option<chrono::DateTime<chrono::Utc>>,
    pub next_run: Option<chrono::DateTime<chrono::Utc>>,
    /// Where the outpost's entry point serves its ingresses
    /// (`http://shop.dev.kasse.localhost:8080/`); empty when the outpost
    /// runs no entry point.
    #[serde(default)]
    pub urls: Vec<String>,
    /// The outpost's devices it holds (by the names offered).
    #[serde(default)]
    pub devices: Vec<String>,
}

/// One component of a stage: what should be, and what the outpost saw.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ComponentView {
    pub name: String,
    /// In the stage's latest release. The outpost may still report a
    /// component that is not (one it runs from an earlier release).
    pub in_release: bool,
    /// Runs on a schedule (cron or `@release`) rather than permanently.
    pub scheduled: bool,
    /// The host names and paths its ingresses have on the stage's outpost
    /// (`shop.dev.kasse.plant7.example.net/api`), whether or not the
    /// outpost serves them yet.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// The outpost's devices its manifest asks for (`devices:`); which it
    /// holds is `observed.devices`.
    #[serde(default)]
    pub devices: Vec<String>,
    pub desired: ComponentDesired,
    pub observed: ComponentObserved,
}

/// `GET …/components`: the components of a stage's latest release, desired
/// and observed. Observed states are as of `observed_at`; unless `current`,
/// the outpost has not yet reported the desired revision and they may lag
/// behind what was asked.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StageComponents {
    pub project: String,
    pub stage: String,
    pub outpost: String,
    /// The outpost's link right now.
    pub link: crate::link::LinkState,
    pub suspended: bool,
    /// The stage's latest release (what should run); none yet when absent.
    pub release: Option<u64>,
    pub build: Option<String>,
    pub desired_revision: u64,
    /// The revision the outpost had applied when it last reported (0: it
    /// never reported).
    pub reported_revision: u64,
    /// When the hub received that report.
    pub observed_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The report covers the desired revision.
    pub current: bool,
    /// The stage's state in that report, e.g. `running`, `failed`.
    pub reported_state: Option<String>,
    /// The outpost's words about the stage in that report.
    pub reported_message: Option<String>,
    /// The desired release did not come up and the outpost restored this
    /// one instead (0: none, the stage runs nothing).
    pub rolled_back_to: Option<u64>,
    pub components: Vec<ComponentView>,
}

/// The query of `GET …/logs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// One component of the stage; every component when absent.
    #[serde(default)]
    #[param(pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")]
    pub component: Option<String>,
    /// Only lines written since then: RFC 3339 (`2024-05-01T12:00:00Z`) or a
    /// duration back from now (`30s`, `10m`, `2h`, `1d`, `1h30m`).
    #[serde(default)]
    #[param(
        pattern = "^(([0-9]{1,6}[smhd]){1,4}|[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])[Tt]([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]{1,9})?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9]))$",
        example = "10m"
    )]
    pub since: Option<String>,
    /// At most this many of the newest lines (before following), up to
    /// 100000.
    #[serde(default)]
    #[param(maximum = 100000)]
    pub tail: Option<usize>,
    /// Keep the response open and send new lines as they are written.
    #[serde(default)]
    pub follow: bool,
}

/// `PATCH /outposts/{outpost}/link-profile`: what to change of the
/// outpost's link profile; absent fields stay. Each is text as an
/// administrator writes it, checked by the hub.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
#[schema(example = json!({"heartbeat": "300s", "bandwidth": "1MiB/s",
    "windows": "mon-fri 22:00-06:00,sat,sun", "timezone": "Europe/Berlin"}))]
pub struct LinkProfileRequest {
    /// Seconds between heartbeats, 5 s to 1 h (`300`, `300s`, `5m`);
    /// `default` goes back to the hub's.
    #[serde(default)]
    pub heartbeat: Option<String>,
    /// The cap on the outpost's artifact deliveries (`1MiB/s`, `512KiB/s`,
    /// `2MB/s`, at least 1KiB/s); `none` lifts it.
    #[serde(default)]
    pub bandwidth: Option<String>,
    /// When large artifacts may move, in the outpost's time zone
    /// (`mon-fri 22:00-06:00,sat,sun`); `always` lifts the restriction.
    #[serde(default)]
    pub windows: Option<String>,
    /// The IANA time zone of the windows (`Europe/Berlin`); `UTC` by
    /// default.
    #[serde(default)]
    pub timezone: Option<String>,
}

/// An outpost's link profile as it applies, with what it means now.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LinkProfileView {
    pub outpost: String,
    /// The heartbeat the outpost's link keeps, in seconds.
    pub heartbeat_secs: u32,
    /// Whether that is the hub's default (no heartbeat set for the outpost).
    pub heartbeat_default: bool,
    /// The delivery cap in bytes per second; absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_bytes_per_sec: Option<u64>,
    /// The cap as written back (`1MiB/s`), or `none`.
    pub bandwidth: String,
    /// The windows in canonical form, or `always`.
    pub windows: String,
    pub timezone: String,
    /// `open` or `closed`: whether artifacts may move now.
    pub delivery: String,
    /// When closed: when the next window opens, and in words in the
    /// outpost's zone (`22:00 Europe/Berlin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opens_at: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opens: Option<String>,
}
