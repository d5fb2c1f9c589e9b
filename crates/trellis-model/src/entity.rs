//! The records the hub keeps and serves: projects, stages, outposts, builds,
//! configs, releases, users and access keys.
//!
//! They are plain data. The rules that tie them together (a release bumps its
//! stage's desired revision, a build referenced by a release cannot be
//! deleted, …) are enforced by the store, so every backend enforces the same
//! ones and one test suite checks them all.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::access::Role;
use crate::manifest::Arch;

/// Every timestamp Trellis stores or shows is UTC.
pub type Timestamp = DateTime<Utc>;

/// The name of the outpost embedded in the hub. Stages not created as
/// outpost stages run there, through the same code path as remote ones.
pub const LOCAL_OUTPOST: &str = "local";

/// What a stage is for. Mirrors the platform's three stage types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum StageType {
    Dev,
    Qa,
    Prod,
}

impl StageType {
    pub fn as_str(self) -> &'static str {
        match self {
            StageType::Dev => "dev",
            StageType::Qa => "qa",
            StageType::Prod => "prod",
        }
    }
}

impl fmt::Display for StageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StageType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "dev" => Ok(StageType::Dev),
            "qa" => Ok(StageType::Qa),
            "prod" => Ok(StageType::Prod),
            other => Err(format!(
                "unknown stage type {other:?}; use one of dev, qa, prod"
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct User {
    pub name: String,
    pub admin: bool,
    pub created_at: DateTime<Utc>,
}

/// An access key as listed: never carries the secret or its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AccessKeyInfo {
    pub id: String,
    pub user: String,
    pub description: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(example = json!({
    "name": "shop", "display_name": "Web shop", "description": "The web shop",
    "created_at": "2024-05-01T12:00:00Z"})))]
pub struct Project {
    pub name: String,
    /// How people see it named; its name when not given.
    #[serde(default)]
    pub display_name: String,
    pub description: String,
    pub created_at: DateTime<Utc>,
    /// When it was deleted, if it is archived: it and its stages keep
    /// everything (releases, configs, volumes on their outposts) until
    /// restored or purged, when the hub's retention period has passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archived_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Member {
    pub project: String,
    pub user: String,
    pub role: Role,
}

/// A remote environment registered on the hub (the link to its agent is the
/// link layer's business; this is the record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Outpost {
    pub name: String,
    pub display_name: String,
    pub description: String,
    pub labels: BTreeMap<String, String>,
    /// How many stages may be placed on it; `None` means no limit.
    pub max_stages: Option<u32>,
    /// Which key its Outpost URI carries: rotating the URI increments it,
    /// and the key is derived from it, so old URIs stop validating.
    #[serde(default = "first_generation")]
    pub uri_generation: u64,
    /// Set when an administrator revoked the outpost; it then takes no new
    /// stages and its agent is refused.
    #[serde(default)]
    pub revoked_at: Option<DateTime<Utc>>,
    /// The DNS name its ingresses are reachable under (see
    /// [`crate::ingress`]); `localhost` when unset.
    #[serde(default)]
    pub ingress_domain: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl Outpost {
    /// The domain its ingress hosts end in.
    pub fn ingress_domain(&self) -> &str {
        self.ingress_domain
            .as_deref()
            .unwrap_or(crate::ingress::DEFAULT_INGRESS_DOMAIN)
    }
}

fn first_generation() -> u64 {
    1
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Stage {
    pub project: String,
    pub name: String,
    #[serde(rename = "type")]
    pub stage_type: StageType,
    pub display_name: String,
    pub suspended: bool,
    /// The outpost the stage runs on ([`LOCAL_OUTPOST`] for the hub's own).
    pub outpost: String,
    /// Bumped by every change of what should run on the stage (a release
    /// push, suspend, resume). Never decreases.
    pub desired_revision: u64,
    /// Number of the newest release pushed to the stage, if any.
    pub latest_release: Option<u64>,
    pub created_at: DateTime<Utc>,
    /// When it was deleted, if it is archived: its outpost runs nothing of
    /// it (volumes are kept), its records stay until restored or purged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archived_at: Option<DateTime<Utc>>,
}

/// What a build holds for one component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Artifact {
    /// A container image, by reference (`docker.image`) or built from a
    /// Dockerfile (`docker.file`; the image is produced by the build step).
    Image {
        reference: String,
        /// The image itself, stored on the hub, when the build carried it
        /// (`trellis push build` does); outposts then need no registry.
        /// Without it, outposts must have or pull `reference`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        archive: Option<ImageArchive>,
        /// One image per architecture, when the manifest lists
        /// `docker.platform`: an outpost runs the one of its own
        /// architecture, and refuses the release when there is none.
        /// `archive` is unset then.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        platforms: Vec<PlatformImage>,
    },
    /// A packed `process:` directory stored on the hub as chunks: `digest`
    /// names its artifact index, `size` is the package's size in bytes.
    Package { digest: String, size: u64 },
}

impl Artifact {
    /// Every image archive the artifact carries (of every architecture).
    pub fn archives(&self) -> impl Iterator<Item = &ImageArchive> {
        let (single, platforms) = match self {
            Artifact::Image {
                archive, platforms, ..
            } => (archive.as_ref(), platforms.as_slice()),
            Artifact::Package { .. } => (None, &[][..]),
        };
        single
            .into_iter()
            .chain(platforms.iter().filter_map(|p| p.archive.as_ref()))
    }
}

/// The image of one architecture in a multi-architecture build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PlatformImage {
    pub arch: Arch,
    /// The reference it was built or pulled as, e.g.
    /// `trellis.local/shop/web:0123456789ab-arm64`.
    pub reference: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<ImageArchive>,
}

/// A container image stored on the hub as chunks of its `docker save`
/// archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ImageArchive {
    /// The digest of the archive's artifact index.
    pub index: String,
    /// The archive's size in bytes.
    pub size: u64,
    /// The engine's id of the image (`sha256:…`), so an outpost that
    /// already has it skips loading it.
    pub image_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BuildComponent {
    pub name: String,
    pub artifact: Artifact,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Build {
    pub project: String,
    /// `<branch>_b<number>`, e.g. `main_b3`.
    pub name: String,
    pub number: u64,
    pub branch: String,
    pub commit: String,
    /// The manifest's file name and text, exactly as it was in the commit.
    pub manifest_file: String,
    pub manifest: String,
    pub components: Vec<BuildComponent>,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
}

/// Fields of a build that the caller supplies; the store assigns the number
/// and the name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NewBuild {
    /// The branch it was built from (1 to 255 characters).
    #[cfg_attr(
        feature = "openapi",
        schema(min_length = 1, max_length = 255, example = "main")
    )]
    pub branch: String,
    /// The full git commit id (SHA-1 or SHA-256, hexadecimal).
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^([0-9a-fA-F]{40}|[0-9a-fA-F]{64})$")
    )]
    pub commit: String,
    pub manifest_file: String,
    pub manifest: String,
    pub components: Vec<BuildComponent>,
}

/// The name a build gets: the branch with characters unsafe in names
/// replaced by `-`, then `_b` and the project's build number.
pub fn build_name(branch: &str, number: u64) -> String {
    let clean: String = branch
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let clean = if clean.is_empty() {
        "detached".into()
    } else {
        clean
    };
    format!("{clean}_b{number}")
}

/// Named, per-stage configuration: environment values and files that
/// manifests reference with `config-ref`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConfigData {
    pub env: BTreeMap<String, String>,
    /// File name → content.
    pub files: BTreeMap<String, String>,
    /// The env keys whose values are secret: never shown unless an owner
    /// asks for them, and, when a config is shown without values, listed
    /// here while their values are left out of `env`.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub secret_env: BTreeSet<String>,
    /// The same for files.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub secret_files: BTreeSet<String>,
}

impl ConfigData {
    /// The data with the values of secret keys left out (their keys stay
    /// listed in `secret_env`/`secret_files`).
    pub fn without_secret_values(&self) -> ConfigData {
        ConfigData {
            env: self
                .env
                .iter()
                .filter(|(k, _)| !self.secret_env.contains(*k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            files: self
                .files
                .iter()
                .filter(|(k, _)| !self.secret_files.contains(*k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            secret_env: self.secret_env.clone(),
            secret_files: self.secret_files.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Config {
    pub project: String,
    pub stage: String,
    pub name: String,
    /// Incremented by every change, so a release can say which version of
    /// the config it took.
    pub version: u64,
    pub data: ConfigData,
    pub updated_at: DateTime<Utc>,
}

/// The config a release took, frozen at push time: releases are immutable,
/// so later config edits never change what an existing release runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConfigSnapshot {
    pub name: String,
    pub version: u64,
    pub data: ConfigData,
}

/// Where a release stands in its stage's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum ReleaseState {
    /// Pushed; the stage's outpost has not reported it applied yet.
    Pending,
    /// Running on the stage.
    Applied,
    /// A newer release was pushed before this one was applied; it never ran.
    Superseded,
    /// It ran, then a newer release replaced it.
    Replaced,
    /// The outpost tried to apply it and could not.
    Failed,
}

impl ReleaseState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseState::Pending => "pending",
            ReleaseState::Applied => "applied",
            ReleaseState::Superseded => "superseded",
            ReleaseState::Replaced => "replaced",
            ReleaseState::Failed => "failed",
        }
    }
}

impl FromStr for ReleaseState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "pending" => ReleaseState::Pending,
            "applied" => ReleaseState::Applied,
            "superseded" => ReleaseState::Superseded,
            "replaced" => ReleaseState::Replaced,
            "failed" => ReleaseState::Failed,
            other => return Err(format!("unknown release state {other:?}")),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Release {
    pub project: String,
    pub stage: String,
    /// 1, 2, 3, … per stage.
    pub number: u64,
    pub build: String,
    pub config: Option<ConfigSnapshot>,
    /// The stage's desired revision this release created.
    pub revision: u64,
    pub state: ReleaseState,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_names_are_safe_for_any_branch() {
        assert_eq!(build_name("main", 3), "main_b3");
        assert_eq!(build_name("feature/x y", 1), "feature-x-y_b1");
        assert_eq!(build_name("", 2), "detached_b2");
    }

    #[test]
    fn stage_types_round_trip() {
        for t in [StageType::Dev, StageType::Qa, StageType::Prod] {
            assert_eq!(t.as_str().parse::<StageType>().unwrap(), t);
        }
        assert!(
            "staging"
                .parse::<StageType>()
                .unwrap_err()
                .contains("dev, qa, prod")
        );
    }
}

/// What the hub keeps of an outpost's agent and link, so that it survives a
/// hub restart: the agent's registered key and certificate, what the agent
/// said about its host at its last hello, and when it was last seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OutpostLink {
    pub outpost: String,
    /// `sha256:<hex>` of the agent's public key, registered at join; renewal
    /// after an expired certificate is allowed only for this key.
    pub key_fingerprint: Option<String>,
    pub cert_serial: Option<String>,
    pub cert_not_after: Option<DateTime<Utc>>,
    /// The agent's hello (version, OS, architecture, runtimes, capacity).
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub agent: Option<serde_json::Value>,
    pub last_seen: Option<DateTime<Utc>>,
    /// Why the last connection ended, in words.
    pub last_disconnect: Option<String>,
}

/// How far a stage's outpost has come with the stage's desired state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StageSync {
    pub project: String,
    pub stage: String,
    /// The newest desired revision the agent acknowledged holding (0: none).
    pub delivered_revision: u64,
    /// The revision running on the outpost (0: none).
    pub applied_revision: u64,
    /// The agent's latest status report for the stage, as it sent it.
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub report: Option<serde_json::Value>,
    pub updated_at: Option<DateTime<Utc>>,
}

/// What a user asks of one component of a stage (`trellis start|stop|restart
/// component`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum ComponentAction {
    /// Run it again after a stop.
    Start,
    /// Stop it (it stays stopped across releases until started).
    Stop,
    /// Replace its running workloads with fresh ones; a stopped component
    /// is started. A scheduled component also runs once at once, outside
    /// its schedule (what `trellis start component --now` asks for).
    Restart,
    /// Stop it at once, without the grace period a stop gives
    /// (`trellis stop component --kill`, `POST …/stop?kill=true`): the
    /// control stays `killed` until the component is started, so an agent
    /// that hears of it late still kills rather than stops.
    Kill,
}

impl ComponentAction {
    pub fn as_str(self) -> &'static str {
        match self {
            ComponentAction::Start => "start",
            ComponentAction::Stop => "stop",
            ComponentAction::Restart => "restart",
            ComponentAction::Kill => "kill",
        }
    }

    /// The control after this action, and whether what should run changed
    /// (only then does the stage get a new desired revision).
    pub fn apply(self, control: &ComponentControl) -> (ComponentControl, bool) {
        let mut next = control.clone();
        match self {
            ComponentAction::Start => {
                next.stopped = false;
                next.killed = false;
            }
            // A stop after a kill keeps it killed: it is stopped already.
            ComponentAction::Stop => next.stopped = true,
            ComponentAction::Restart => {
                next.stopped = false;
                next.killed = false;
                next.restarts += 1;
            }
            ComponentAction::Kill => {
                next.stopped = true;
                next.killed = true;
            }
        }
        let changed = next.stopped != control.stopped
            || next.killed != control.killed
            || next.restarts != control.restarts;
        (next, changed)
    }
}

impl fmt::Display for ComponentAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ComponentAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "start" => Ok(ComponentAction::Start),
            "stop" => Ok(ComponentAction::Stop),
            "restart" => Ok(ComponentAction::Restart),
            other => Err(format!(
                "unknown component action {other:?}; use one of start, stop, restart"
            )),
        }
    }
}

/// The standing requests on one component of a stage. Part of the stage's
/// desired state (`controls`), so they survive releases and reach the
/// outpost like everything else that should run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ComponentControl {
    pub component: String,
    /// Stopped on request; a stopped component does not run until started.
    pub stopped: bool,
    /// Stopped by a kill (`stop --kill`): its workloads are ended at once,
    /// without the grace period. Only with `stopped`; a start clears it.
    #[serde(default)]
    pub killed: bool,
    /// How many restarts were requested; each one bumps it, and a change
    /// makes the outpost restart the component.
    pub restarts: u64,
}

#[cfg(test)]
mod control_tests {
    use super::*;

    #[test]
    fn actions_change_controls_only_when_needed() {
        let idle = ComponentControl {
            component: "web".into(),
            ..Default::default()
        };
        let (started, changed) = ComponentAction::Start.apply(&idle);
        assert!(!changed);
        assert_eq!(started, idle);
        let (stopped, changed) = ComponentAction::Stop.apply(&idle);
        assert!(changed && stopped.stopped);
        assert!(!ComponentAction::Stop.apply(&stopped).1, "stop twice");
        let (restarted, changed) = ComponentAction::Restart.apply(&stopped);
        assert!(changed && !restarted.stopped && restarted.restarts == 1);
        let (again, changed) = ComponentAction::Restart.apply(&restarted);
        assert!(changed && again.restarts == 2, "every restart counts");
        let (killed, changed) = ComponentAction::Kill.apply(&again);
        assert!(changed && killed.stopped && killed.killed);
        assert!(!ComponentAction::Kill.apply(&killed).1, "kill twice");
        let (still, changed) = ComponentAction::Stop.apply(&killed);
        assert!(
            !changed && still.killed,
            "a stop after a kill changes nothing"
        );
        let (escalated, changed) = ComponentAction::Kill.apply(&stopped);
        assert!(
            changed && escalated.killed,
            "a kill after a stop escalates it"
        );
        let (started, _) = ComponentAction::Start.apply(&killed);
        assert!(!started.stopped && !started.killed);
        for a in [
            ComponentAction::Start,
            ComponentAction::Stop,
            ComponentAction::Restart,
        ] {
            assert_eq!(a.as_str().parse::<ComponentAction>().unwrap(), a);
        }
        assert!(
            "kill"
                .parse::<ComponentAction>()
                .unwrap_err()
                .contains("start, stop, restart")
        );
    }
}

/// One stream opened into a stage (an exec, a forwarded connection, a
/// console terminal): who, when, into what, and how it went. Kept per
/// project; owners read it (`trellis list audit`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditEntry {
    /// Grows with every entry of the hub.
    pub id: u64,
    pub time: DateTime<Utc>,
    /// The user who opened it.
    pub user: String,
    pub project: String,
    pub stage: String,
    pub component: String,
    /// The outpost it went to.
    pub outpost: String,
    /// `exec`, `port-forward` or `terminal`.
    pub action: String,
    /// The command (its words joined by spaces) or the port.
    pub detail: String,
    /// `opened`, or the code it was refused with.
    pub result: String,
}

/// An [`AuditEntry`] to record (the store numbers it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAuditEntry {
    pub time: Timestamp,
    pub user: String,
    pub project: String,
    pub stage: String,
    pub component: String,
    pub outpost: String,
    pub action: String,
    pub detail: String,
    pub result: String,
}

/// Where a backup, or a restore of one, stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum BackupState {
    /// Asked for; waits for the outpost (its link, or its turn).
    Pending,
    /// The outpost is at it.
    Running,
    /// Done: for a backup, every chunk of its manifest is on the hub.
    Completed,
    /// Ended without success; the message says why.
    Failed,
}

impl BackupState {
    pub fn as_str(self) -> &'static str {
        match self {
            BackupState::Pending => "pending",
            BackupState::Running => "running",
            BackupState::Completed => "completed",
            BackupState::Failed => "failed",
        }
    }

    /// Whether the work is still to be done or under way.
    pub fn is_open(self) -> bool {
        matches!(self, BackupState::Pending | BackupState::Running)
    }
}

impl fmt::Display for BackupState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BackupState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pending" => Ok(BackupState::Pending),
            "running" => Ok(BackupState::Running),
            "completed" => Ok(BackupState::Completed),
            "failed" => Ok(BackupState::Failed),
            other => Err(format!(
                "unknown backup state {other:?}; one of pending, running, completed, failed"
            )),
        }
    }
}

/// The last restore asked of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RestoreStatus {
    pub state: BackupState,
    /// Why it waits or failed; empty otherwise.
    pub message: String,
    pub requested_at: DateTime<Utc>,
    /// Who asked for it.
    pub requested_by: String,
    pub finished_at: Option<DateTime<Utc>>,
}

/// A backup of a stage's storage: the content of its volumes (process
/// components' storage directories, container volumes) at one time, kept
/// on the hub as chunks named by digest plus a manifest listing them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Backup {
    /// Grows with every backup of the hub.
    pub id: u64,
    pub project: String,
    pub stage: String,
    pub display_name: String,
    pub state: BackupState,
    /// What it waits for, or why it failed; empty otherwise.
    pub message: String,
    pub created_at: DateTime<Utc>,
    /// Who asked for it.
    pub created_by: String,
    pub finished_at: Option<DateTime<Utc>>,
    /// Bytes of volume content it covers.
    pub size: u64,
    /// Bytes the outpost sent the hub for it (stored, compressed form):
    /// only chunks the hub lacked travel.
    pub uploaded: u64,
    /// Digest of the manifest (the chunk listing files and their chunks),
    /// once completed.
    pub manifest: Option<String>,
    /// The volumes it covers, `component/storage`.
    pub volumes: Vec<String>,
    /// The last restore asked of it, if any.
    pub restore: Option<RestoreStatus>,
}

/// A [`Backup`] to record (the store numbers it; it starts pending).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewBackup {
    pub project: String,
    pub stage: String,
    pub display_name: String,
    pub message: String,
    pub created_at: Timestamp,
    pub created_by: String,
}

/// A stage's backup schedule: the hub backs the stage up at each time of
/// `schedule` (cron, UTC) and keeps the newest `keep` completed scheduled
/// backups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BackupSchedule {
    pub project: String,
    pub stage: String,
    /// Five fields (minute hour day month weekday), or six with seconds
    /// first.
    pub schedule: String,
    pub keep: u32,
    /// When the hub last made a scheduled backup (or the schedule was set).
    pub last_run: DateTime<Utc>,
}
