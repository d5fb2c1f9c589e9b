//! Hub persistence behind one trait.
//!
//! The hub talks only to [`Store`]. Backends:
//! - [`sqlite::SqliteStore`]: the default, a bundled SQLite database in WAL
//!   mode in the hub's data directory, with versioned migrations.
//! - [`postgres::PgStore`]: a PostgreSQL database that several hubs share;
//!   it also tells them what changed (`LISTEN`/`NOTIFY`), which hub holds
//!   each outpost's link, and runs single-writer jobs under advisory locks.
//! - [`memory::MemoryStore`]: everything in a mutex, for tests and the
//!   deterministic simulation (which runs several hubs over one).
//!
//! SQLite and PostgreSQL share one implementation of every method
//! ([`sql::SqlStore`]); the few places where their SQL differs are each
//! dialect's ([`sql::Dialect`]). Their schema is one set of portable
//! migrations (`migrations/`), plus PostgreSQL's own (`migrations-postgres/`:
//! notification triggers, the tables of the hubs sharing it).
//!
//! Every backend enforces the same domain rules (numbering, desired
//! revisions, refusal to leave dangling references) and the same test suite,
//! [`testsuite`], runs against each of them.
//!
//! # Layout
//! - `lib.rs`: the trait and its error type.
//! - `sql/`: the shared SQL; `sqlite.rs`, `postgres.rs`: its dialects;
//!   `memory.rs`: the in-memory backend.
//! - `cluster.rs`: what the hubs sharing a store see of each other.
//! - `copy.rs`: copying a hub's whole state between stores (`trellis hub
//!   migrate`).
//! - `one_by_one.rs`: the batched methods in terms of one-at-a-time calls
//!   (what a store with nothing faster answers them with).
//! - `testsuite.rs`: the behaviour every backend must show.

use async_trait::async_trait;
use trellis_model::{
    AccessKeyInfo, AgentBinary, AuditEntry, Backup, Build, ComponentAction, ComponentControl,
    Config, ConfigData, ConfigSnapshot, Member, NewAuditEntry, NewBackup, NewBuild, Outpost,
    OutpostLink, Project, Release, Role, Stage, StageSync, StageType, Timestamp, User,
    link_profile::LinkProfile,
    rollout::{NewRollout, Rollout},
};

pub mod cluster;
pub mod copy;
pub mod memory;
pub mod one_by_one;
pub mod postgres;
pub mod sql;
pub mod sqlite;
pub mod testsuite;

pub use cluster::{Change, ChangeFeed, Instance, JobLock, LinkClaim, PoolStats};

/// What one or more link sessions of an outpost saw, for
/// [`Store::record_link_activity`].
#[derive(Debug, Clone, PartialEq)]
pub struct LinkActivity {
    pub outpost: String,
    pub seen: Timestamp,
    /// What the agent said at hello, and the certificate it linked with.
    pub hello: Option<LinkHello>,
    /// Why the last session ended.
    pub disconnect: Option<String>,
}

/// One write to a stage's sync record, for [`Store::record_sync_batch`]:
/// what [`Store::record_delivered`] or [`Store::record_status`] writes.
#[derive(Debug, Clone, PartialEq)]
pub enum SyncUpdate {
    Delivered {
        project: String,
        stage: String,
        revision: u64,
    },
    Status {
        project: String,
        stage: String,
        applied_revision: u64,
        failed_revision: Option<u64>,
        report: serde_json::Value,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct LinkHello {
    pub agent: serde_json::Value,
    pub cert_serial: String,
    pub cert_not_after: Timestamp,
}

impl LinkActivity {
    /// Folds a later activity of the same outpost into this one.
    pub fn merge(&mut self, later: LinkActivity) {
        self.seen = self.seen.max(later.seen);
        if later.hello.is_some() {
            self.hello = later.hello;
        }
        if later.disconnect.is_some() {
            self.disconnect = later.disconnect;
        }
    }

    fn apply_to(&self, link: &mut OutpostLink) {
        link.last_seen = Some(link.last_seen.map_or(self.seen, |t| t.max(self.seen)));
        if let Some(hello) = &self.hello {
            link.agent = Some(hello.agent.clone());
            link.cert_serial = Some(hello.cert_serial.clone());
            link.cert_not_after = Some(hello.cert_not_after);
        }
        if let Some(reason) = &self.disconnect {
            link.last_disconnect = Some(reason.clone());
        }
    }
}

/// Why a store operation did not happen. The messages are shown to users,
/// so they say what was being done and what to try.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `name` is qualified by what contains the thing (`shop/dev` for a
    /// stage, `shop/dev/db` for a config, `shop/dev#3` for a release), so the
    /// message stands on its own in a log line.
    #[error("{kind} {name:?} does not exist")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} {name:?} already exists")]
    AlreadyExists { kind: &'static str, name: String },
    /// The operation would leave dangling references; `hint` says what to do.
    #[error("{what}; {hint}")]
    InUse { what: String, hint: String },
    #[error("the hub's database failed while {doing}: {source}")]
    Backend {
        doing: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What a change that could lock every administrator out did (see
/// [`Store::delete_access_key_keeping_admin`], [`Store::set_user_admin`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminGuarded<T> {
    Done(T),
    /// Refused: afterwards no administrator would hold an access key.
    LastAdminKey,
}

/// An access key as stored: its public part and the hash of its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAccessKey {
    pub info: AccessKeyInfo,
    /// A PHC-format password hash (argon2id) of the secret. Never the secret.
    pub secret_hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewStage {
    pub project: String,
    pub name: String,
    pub stage_type: StageType,
    pub display_name: String,
    pub outpost: String,
}

/// Changes to a stage; `None` leaves a field as it is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StageUpdate {
    pub display_name: Option<String>,
    /// Suspending or resuming changes what should run, so it bumps the
    /// desired revision when the value actually changes.
    pub suspended: Option<bool>,
    pub stage_type: Option<StageType>,
}

impl StageUpdate {
    /// The change made to `stage` (what every backend writes).
    pub fn apply(&self, stage: &mut Stage) {
        if let Some(display_name) = &self.display_name {
            stage.display_name = display_name.clone();
        }
        if let Some(stage_type) = self.stage_type {
            stage.stage_type = stage_type;
        }
        if let Some(suspended) = self.suspended
            && suspended != stage.suspended
        {
            stage.suspended = suspended;
            stage.desired_revision += 1;
        }
    }
}

/// Changes to a project; `None` leaves a field as it is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProjectUpdate {
    pub display_name: Option<String>,
    pub description: Option<String>,
}

/// Changes to an outpost; `None` leaves a field as it is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OutpostUpdate {
    pub display_name: Option<String>,
    pub description: Option<String>,
    /// `Some(None)` goes back to the default domain. A change alters every
    /// ingress host on the outpost, so it bumps the desired revision of each
    /// stage placed there.
    pub ingress_domain: Option<Option<String>>,
}

/// What [`Store::control_component`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlOutcome {
    /// The stage afterwards, with its (possibly bumped) desired revision.
    pub stage: Stage,
    /// The component's control afterwards.
    pub control: ComponentControl,
    /// Whether what should run changed (and so the desired revision moved).
    pub changed: bool,
}

/// A stage with what a list of stages shows of it: how far its sync came
/// and the release running on its outpost. Read in one query, and without
/// the agents' full reports, so a project with a thousand stages lists in
/// one round trip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageSummary {
    pub stage: Stage,
    /// As in the stage's [`StageSync`] (0 before anything was delivered).
    pub delivered_revision: u64,
    pub applied_revision: u64,
    /// The `state` of the agent's latest report (`running`, `failed`, …).
    pub report_state: Option<String>,
    /// The release in state `applied`, if any.
    pub applied_release: Option<u64>,
    /// As in the stage's [`StageSync`]: when the hub last recorded what the
    /// agent said about the stage (a delivery or a status report).
    pub sync_updated_at: Option<Timestamp>,
}

/// Which stages [`Store::list_stage_summaries`] lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageFilter {
    All,
    /// Only stages whose agent has not yet applied their desired revision:
    /// what a rollout is still waiting for.
    Pending,
}

/// What an agent needs to run a stage at its desired revision, besides
/// the stage record: read with it by [`Store::outpost_desired`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredParts {
    /// As [`Store::list_component_controls`] lists them.
    pub controls: Vec<ComponentControl>,
    /// The stage's newest release, if it has one.
    pub release: Option<Release>,
    /// That release's build.
    pub build: Option<Build>,
}

/// A stage placed on an outpost, with the parts of its desired state when
/// [`Store::outpost_desired`] was asked for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutpostStage {
    pub stage: Stage,
    pub desired: Option<DesiredParts>,
}

/// A stage by project and name.
pub type StageKey = (String, String);

/// One outpost's question in [`Store::outposts_desired`]: its stages, with
/// the desired state of those above what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredAsk {
    pub outpost: String,
    pub held: std::collections::HashMap<StageKey, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRelease {
    pub project: String,
    pub stage: String,
    pub build: String,
    pub config: Option<ConfigSnapshot>,
    pub created_by: String,
}

impl NewRelease {
    /// The release this becomes: `pending`, numbered `number` at the
    /// stage's desired revision `revision`.
    pub fn pending(&self, number: u64, revision: u64, created_at: Timestamp) -> Release {
        Release {
            project: self.project.clone(),
            stage: self.stage.clone(),
            number,
            build: self.build.clone(),
            config: self.config.clone(),
            revision,
            state: trellis_model::ReleaseState::Pending,
            created_at,
            created_by: self.created_by.clone(),
        }
    }
}

/// What one [`Store::push_releases`] recorded.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PushedReleases {
    /// One per entry pushed, in the order pushed.
    pub releases: Vec<Release>,
    /// The outposts the stages are placed on, each once, sorted: the
    /// sessions that now have something to deliver.
    pub outposts: Vec<String>,
}

impl PushedReleases {
    pub(crate) fn new(releases: Vec<Release>, mut outposts: Vec<String>) -> Self {
        outposts.sort_unstable();
        outposts.dedup();
        PushedReleases { releases, outposts }
    }
}

/// The hub's persistence. All methods are atomic: either everything they
/// describe happened, or nothing did.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    // --- users and access keys ---
    async fn create_user(&self, user: &User) -> Result<()>;
    async fn get_user(&self, name: &str) -> Result<User>;
    async fn list_users(&self) -> Result<Vec<User>>;
    async fn create_access_key(&self, key: &StoredAccessKey) -> Result<()>;
    /// Looks a key up by its public id; `None` if there is no such key.
    async fn find_access_key(&self, id: &str) -> Result<Option<StoredAccessKey>>;
    async fn list_access_keys(&self, user: Option<&str>) -> Result<Vec<AccessKeyInfo>>;
    async fn delete_access_key(&self, id: &str) -> Result<()>;
    /// Deletes an access key unless it is the last one any administrator
    /// has: then nothing changes and the answer says so, because nobody
    /// could sign in as an administrator again.
    async fn delete_access_key_keeping_admin(&self, id: &str) -> Result<AdminGuarded<()>>;
    /// Makes a user an administrator, or no longer one. Taking it away is
    /// refused (nothing changes) when the user holds a key and no other
    /// administrator does.
    async fn set_user_admin(&self, name: &str, admin: bool) -> Result<AdminGuarded<User>>;

    // --- projects and members ---
    async fn create_project(&self, project: &Project, owner: &str) -> Result<()>;
    async fn get_project(&self, name: &str) -> Result<Project>;
    async fn list_projects(&self) -> Result<Vec<Project>>;
    /// Refuses while the project has stages or builds, unless `force`, in
    /// which case everything in the project goes with it.
    async fn delete_project(&self, name: &str, force: bool) -> Result<()>;
    async fn update_project(&self, name: &str, update: &ProjectUpdate) -> Result<Project>;
    /// Archives the project and each of its stages not archived yet, at
    /// `now`, bumping their desired revisions (their outposts stop running
    /// them); returns the stages it archived. Nothing is deleted. An
    /// archived project changes nothing.
    async fn archive_project(&self, name: &str, now: Timestamp) -> Result<Vec<Stage>>;
    /// Restores an archived project and the stages archived with it (at the
    /// same instant), bumping their desired revisions; returns them. A
    /// project that is not archived changes nothing.
    async fn restore_project(&self, name: &str) -> Result<Vec<Stage>>;
    /// Adds a member or changes their role.
    async fn set_member(&self, project: &str, user: &str, role: Role) -> Result<()>;
    async fn remove_member(&self, project: &str, user: &str) -> Result<()>;
    async fn list_members(&self, project: &str) -> Result<Vec<Member>>;
    /// Records a stream opened into one of the project's stages; the entry
    /// goes with the project.
    async fn record_audit(&self, entry: &NewAuditEntry) -> Result<AuditEntry>;
    /// The project's audit log, newest first, at most `limit` entries.
    async fn list_audit(&self, project: &str, limit: usize) -> Result<Vec<AuditEntry>>;
    // --- backups ---
    /// Records a new backup of the stage, `pending`; fails if the stage
    /// does not exist. The backup goes with its stage.
    async fn create_backup(&self, backup: &NewBackup) -> Result<Backup>;
    /// A backup of the stage, by id (`NotFound` if it is not the stage's).
    async fn get_backup(&self, project: &str, stage: &str, id: u64) -> Result<Backup>;
    /// The stage's backups, newest first.
    async fn list_backups(&self, project: &str, stage: &str) -> Result<Vec<Backup>>;
    /// Replaces a backup's record (found by project, stage and id) with
    /// `backup`; `NotFound` if it was deleted meanwhile.
    async fn save_backup(&self, backup: &Backup) -> Result<()>;
    async fn delete_backup(&self, project: &str, stage: &str, id: u64) -> Result<()>;
    /// The backups of stages placed on the outpost with work open for it: a
    /// backup pending or running, or a restore pending or running. Oldest
    /// first.
    async fn outpost_backup_work(&self, outpost: &str) -> Result<Vec<Backup>>;
    /// The manifest digests of every backup that has one (garbage
    /// collection keeps them and their chunks).
    async fn backup_manifests(&self) -> Result<Vec<String>>;
    /// Sets (or with `None` removes) the stage's backup schedule.
    async fn set_backup_schedule(
        &self,
        project: &str,
        stage: &str,
        schedule: Option<&trellis_model::BackupSchedule>,
    ) -> Result<()>;
    /// The stage's backup schedule, if it has one.
    async fn get_backup_schedule(
        &self,
        project: &str,
        stage: &str,
    ) -> Result<Option<trellis_model::BackupSchedule>>;
    /// Every backup schedule of the hub.
    async fn list_backup_schedules(&self) -> Result<Vec<trellis_model::BackupSchedule>>;

    /// The user's role in the project, `None` if they are not a member
    /// (including when the project does not exist: nobody is a member).
    async fn role_of(&self, project: &str, user: &str) -> Result<Option<Role>>;

    // --- outposts ---
    async fn create_outpost(&self, outpost: &Outpost) -> Result<()>;
    async fn get_outpost(&self, name: &str) -> Result<Outpost>;
    async fn list_outposts(&self) -> Result<Vec<Outpost>>;
    /// Refuses while stages are placed on it, unless `force`, in which case
    /// those stages are deleted too.
    async fn delete_outpost(&self, name: &str, force: bool) -> Result<()>;
    async fn stages_on_outpost(&self, outpost: &str) -> Result<Vec<Stage>>;
    /// What a link session sends an outpost, in one read (one transaction
    /// where the backend has them, so the parts agree with the stage's
    /// revision): the stages on it as [`Store::stages_on_outpost`] lists
    /// them, each with its [`DesiredParts`] when its desired revision is
    /// above the one `held` gives for it (a stage missing there holds 0).
    async fn outpost_desired(
        &self,
        outpost: &str,
        held: &std::collections::HashMap<StageKey, u64>,
    ) -> Result<Vec<OutpostStage>>;
    /// [`Store::outpost_desired`] for several outposts in one read: each
    /// outpost's answer, in the order asked (an outpost's own error, such
    /// as an unknown outpost, is its answer; a failure of the read itself
    /// fails them all). What a hub pushing to thousands of outposts at once
    /// asks instead of one read each ([`one_by_one::outposts_desired`] says
    /// what it means).
    async fn outposts_desired(&self, asks: &[DesiredAsk])
    -> Result<Vec<Result<Vec<OutpostStage>>>>;
    /// Increments the outpost's URI generation, so URIs handed out before
    /// stop validating. Stages already on it are not affected.
    async fn rotate_outpost_uri(&self, name: &str) -> Result<Outpost>;
    /// Changes an outpost's description or ingress domain (see
    /// [`OutpostUpdate`]).
    async fn update_outpost(&self, name: &str, update: &OutpostUpdate) -> Result<Outpost>;
    /// The outpost's link profile (all parts unset when none was given).
    async fn get_link_profile(&self, outpost: &str) -> Result<LinkProfile>;
    /// Replaces the outpost's link profile (checked by the caller); an
    /// all-default profile clears it. Where hubs share the store, the
    /// instance holding the outpost's link hears of it
    /// ([`cluster::Change::Profile`]).
    async fn set_link_profile(&self, outpost: &str, profile: &LinkProfile) -> Result<LinkProfile>;
    /// Every outpost given a profile other than the defaults, by name.
    async fn list_link_profiles(&self) -> Result<Vec<(String, LinkProfile)>>;
    /// Marks the outpost revoked (idempotent: the first time is kept).
    async fn revoke_outpost(&self, name: &str, now: Timestamp) -> Result<Outpost>;

    // --- stages ---
    /// Fails if the project or the outpost does not exist, or the outpost
    /// is full (its `max_stages` reached).
    async fn create_stage(&self, stage: &NewStage, now: Timestamp) -> Result<Stage>;
    async fn get_stage(&self, project: &str, name: &str) -> Result<Stage>;
    async fn list_stages(&self, project: &str) -> Result<Vec<Stage>>;
    /// The project's archived stages, by name: what a push to many stages
    /// checks its stages against without reading every stage (a fleet
    /// project holds thousands).
    async fn list_archived_stages(&self, project: &str) -> Result<Vec<Stage>>;
    /// The project's stages by name (all, or only those still waiting for
    /// their outpost), each with its sync record and applied release.
    async fn list_stage_summaries(
        &self,
        project: &str,
        which: StageFilter,
    ) -> Result<Vec<StageSummary>>;
    /// [`Store::list_stage_summaries`] of the project's stages named in
    /// `names` only (names of no stage are skipped), by name: what the
    /// rollout driver reads of a wave, without the rest of a large
    /// project.
    async fn stage_summaries_named(
        &self,
        project: &str,
        names: &[String],
    ) -> Result<Vec<StageSummary>>;
    async fn update_stage(&self, project: &str, name: &str, update: &StageUpdate) -> Result<Stage>;
    /// Refuses while the stage has releases or configs, unless `force`.
    async fn delete_stage(&self, project: &str, name: &str, force: bool) -> Result<()>;
    /// Archives the stage at `now` and bumps its desired revision: what its
    /// outpost is sent then runs nothing (no release, no build), while its
    /// records stay. An archived stage changes nothing.
    async fn archive_stage(&self, project: &str, name: &str, now: Timestamp) -> Result<Stage>;
    /// Brings an archived stage back, bumping its desired revision so its
    /// outpost runs its release again. Refused (`InUse`) while its project
    /// is archived; a stage that is not archived changes nothing.
    async fn restore_stage(&self, project: &str, name: &str) -> Result<Stage>;

    // --- component controls ---
    /// The controls of the stage's components that were ever started,
    /// stopped or restarted, by component name. Components never touched
    /// have none (they run as their release says).
    async fn list_component_controls(
        &self,
        project: &str,
        stage: &str,
    ) -> Result<Vec<ComponentControl>>;
    /// Applies `action` to one component of the stage. When that changes what
    /// should run, the stage's desired revision is bumped in the same
    /// transaction; a stop of a stopped component (or a start of a running
    /// one) changes nothing. Whether the component is in the stage's release
    /// is the caller's to check: the store does not read manifests.
    async fn control_component(
        &self,
        project: &str,
        stage: &str,
        component: &str,
        action: ComponentAction,
    ) -> Result<ControlOutcome>;

    // --- builds ---
    /// Assigns the next build number of the project and the name
    /// `<branch>_b<number>`.
    async fn create_build(
        &self,
        project: &str,
        build: &NewBuild,
        created_by: &str,
        now: Timestamp,
    ) -> Result<Build>;
    async fn get_build(&self, project: &str, name: &str) -> Result<Build>;
    /// Newest first.
    async fn list_builds(&self, project: &str) -> Result<Vec<Build>>;
    /// Refuses while a release references the build (releases are history
    /// and are never rewritten).
    async fn delete_build(&self, project: &str, name: &str) -> Result<()>;

    // --- configs ---
    /// Creates the config if needed and merges `data` into it (keys given
    /// replace existing ones), incrementing its version.
    async fn add_config_data(
        &self,
        project: &str,
        stage: &str,
        name: &str,
        data: &ConfigData,
        now: Timestamp,
    ) -> Result<Config>;
    /// Removes `keys` from the config — each from its env values or its
    /// files, whichever holds it — incrementing its version. A key the
    /// config holds in neither is `NotFound` (kind `config key`), and
    /// nothing changes.
    async fn remove_config_keys(
        &self,
        project: &str,
        stage: &str,
        name: &str,
        keys: &[String],
        now: Timestamp,
    ) -> Result<Config>;
    async fn get_config(&self, project: &str, stage: &str, name: &str) -> Result<Config>;
    /// All configs of the project, or of one stage.
    async fn list_configs(&self, project: &str, stage: Option<&str>) -> Result<Vec<Config>>;
    async fn delete_config(&self, project: &str, stage: &str, name: &str) -> Result<()>;

    // --- releases ---
    /// Records a release: assigns the stage's next release number, bumps the
    /// stage's desired revision and stores the release with that revision,
    /// all at once. The build must exist in the stage's project.
    async fn push_release(&self, release: &NewRelease, now: Timestamp) -> Result<Release>;
    /// Records a release on each of several stages, all or none: one
    /// [`Store::push_release`] per entry, in order, in one transaction where
    /// the backend has them (the first error leaves every stage as it was).
    /// Also says which outposts hold those stages, so the caller can tell
    /// their sessions without reading the stages again.
    async fn push_releases(
        &self,
        releases: &[NewRelease],
        now: Timestamp,
    ) -> Result<PushedReleases>;
    async fn get_release(&self, project: &str, stage: &str, number: u64) -> Result<Release>;
    /// The stage's full history, newest first.
    async fn list_releases(&self, project: &str, stage: &str) -> Result<Vec<Release>>;

    // --- agent updates ---
    /// Records an update of each outpost's agent, `pending` (`waiting` in a
    /// later wave), numbered in order (a number is never given twice), the
    /// request's batch being the first one's number. Refused with nothing recorded
    /// when an outpost does not exist, or already has an update under way:
    /// the error names the outpost and that update.
    async fn create_agent_updates(
        &self,
        updates: &[trellis_model::agent_update::NewAgentUpdate],
        at: Timestamp,
    ) -> Result<Vec<trellis_model::agent_update::AgentUpdate>>;
    /// The outpost's update still under way, if any.
    async fn open_agent_update(
        &self,
        outpost: &str,
    ) -> Result<Option<trellis_model::agent_update::AgentUpdate>>;
    /// Records what `outpost`'s agent reported of its update `id` (a final
    /// state is kept: see `AgentUpdate::advance`); returns the record as
    /// stored. `NotFound` when the outpost has no such update.
    async fn report_agent_update(
        &self,
        outpost: &str,
        id: u64,
        state: trellis_model::agent_update::AgentUpdateState,
        message: &str,
        at: Timestamp,
    ) -> Result<trellis_model::agent_update::AgentUpdate>;
    /// The newest update of every outpost that has one, by outpost.
    async fn latest_agent_updates(&self) -> Result<Vec<trellis_model::agent_update::AgentUpdate>>;
    /// The requests (by batch: the id of a request's first update) that
    /// still have updates waiting for their wave, oldest first.
    async fn waiting_agent_update_batches(&self) -> Result<Vec<u64>>;
    /// Every update of request `batch`, by id.
    async fn agent_update_batch(
        &self,
        batch: u64,
    ) -> Result<Vec<trellis_model::agent_update::AgentUpdate>>;
    /// Sends wave `wave` of request `batch`: its waiting updates become
    /// pending, those of the outposts in `offline` carried along (see
    /// `AgentUpdate::release`). Returns the updates it changed; none when
    /// the wave was sent already (by another hub instance, say).
    async fn release_agent_update_wave(
        &self,
        batch: u64,
        wave: u32,
        offline: &[String],
        at: Timestamp,
    ) -> Result<Vec<trellis_model::agent_update::AgentUpdate>>;
    /// Halts request `batch`: every update still waiting is `halted` with
    /// `why` and never sent. Returns the updates it changed.
    async fn halt_agent_update_batch(
        &self,
        batch: u64,
        why: &str,
        at: Timestamp,
    ) -> Result<Vec<trellis_model::agent_update::AgentUpdate>>;

    // --- rollouts ---
    /// Records a rollout, `running`, numbered after every rollout before
    /// it (across projects; a number is never given twice). Refused with
    /// nothing recorded when the project does not exist, or when an active
    /// rollout (running, waiting or paused) of the project holds one of its
    /// stages: the error names that rollout and the stages.
    async fn create_rollout(&self, rollout: &NewRollout) -> Result<Rollout>;
    /// The rollout with its stages.
    async fn get_rollout(&self, id: u64) -> Result<Rollout>;
    /// The project's rollouts (every project's with `None`), newest first,
    /// without their stages (`stages` is empty): what a list shows.
    async fn list_rollouts(&self, project: Option<&str>) -> Result<Vec<Rollout>>;
    /// Replaces the rollout's record with `rollout` if nobody saved it
    /// since it was read (its `version` is still the stored one); returns
    /// it as saved, with the next version. A rollout changed meanwhile is
    /// refused (`InUse`) and nothing changes: read it again.
    async fn save_rollout(&self, rollout: &Rollout) -> Result<Rollout>;
    /// Pushes releases to a rollout's stages and records them in the
    /// rollout, in one transaction: `releases` recorded as
    /// [`Store::push_releases`] records them, the rollout's stage of each
    /// marked pushed with it ([`Rollout::record_pushed`]), and the rollout
    /// then saved as [`Store::save_rollout`] saves it (with whatever else
    /// the caller changed, such as the wave's start). A restart finds the
    /// releases and the rollout's record of them together, or neither.
    /// All or none: a rollout changed since it was read (`InUse`), a
    /// release that cannot be recorded, or one to a stage the rollout does
    /// not hold (`NotFound`, kind `rollout stage`) leaves every stage and
    /// the rollout as they were.
    async fn push_rollout_releases(
        &self,
        rollout: &Rollout,
        releases: &[NewRelease],
        now: Timestamp,
    ) -> Result<(Rollout, PushedReleases)>;

    // --- agent binaries ---
    /// Records an agent binary (its bytes are already in the chunk store).
    /// A version and architecture name one binary for good: recording the
    /// same binary again (same BLAKE3) returns the record stored first;
    /// a different one is refused (`AlreadyExists`, named `VERSION/ARCH`)
    /// and nothing changes.
    async fn put_agent_binary(&self, binary: &AgentBinary) -> Result<AgentBinary>;
    /// `NotFound` (kind `agent binary`, named `VERSION/ARCH`) if none.
    async fn get_agent_binary(&self, version: &str, arch: &str) -> Result<AgentBinary>;
    /// Every agent binary, newest version first (semantic version order),
    /// then by architecture.
    async fn list_agent_binaries(&self) -> Result<Vec<AgentBinary>>;
    async fn delete_agent_binary(&self, version: &str, arch: &str) -> Result<()>;

    // --- the outpost link ---
    /// Records a join token (by its hash) that lets one agent enrol as
    /// `outpost` until `expires_at`.
    async fn create_join_token(
        &self,
        token_hash: &str,
        outpost: &str,
        expires_at: Timestamp,
    ) -> Result<()>;
    /// Uses a join token up: returns its outpost, or why it cannot be used.
    /// A token works once; using it twice, late, or unknown is refused.
    async fn consume_join_token(
        &self,
        token_hash: &str,
        now: Timestamp,
    ) -> Result<Result<String, JoinTokenRefusal>>;
    /// The outpost's link record (a default one, with only `outpost` set,
    /// if the agent never joined).
    async fn get_outpost_link(&self, outpost: &str) -> Result<OutpostLink>;
    /// The link record of every outpost whose agent ever linked, by
    /// outpost.
    async fn list_outpost_links(&self) -> Result<Vec<OutpostLink>>;
    /// The outpost and its link record (as [`Store::get_outpost_link`]
    /// returns it) in one read: what deciding whether an agent may link
    /// needs, once per link-up.
    async fn get_outpost_and_link(&self, name: &str) -> Result<(Outpost, OutpostLink)>;
    /// Creates or replaces the outpost's link record.
    async fn put_outpost_link(&self, link: &OutpostLink) -> Result<()>;
    /// Records what link sessions saw, many outposts at once (one
    /// transaction where the backend has them): the last time each was
    /// seen, the agent it said it was at hello, why its last session ended.
    /// Fields an entry leaves `None` keep their value; so do the ones it
    /// does not carry (the registered key). Entries of outposts that no
    /// longer exist are skipped.
    async fn record_link_activity(&self, activity: &[LinkActivity]) -> Result<()>;
    /// Several sync writes at once (in one transaction where the backend
    /// has them, so many links' reports cost one commit). Each update gets
    /// its own result: one whose stage is gone is `NotFound` and the others
    /// are still written; any other error fails the whole batch.
    async fn record_sync_batch(
        &self,
        updates: &[SyncUpdate],
        now: Timestamp,
    ) -> Result<Vec<Result<StageSync>>>;
    /// The stage's sync record (zeros if nothing was delivered yet).
    async fn get_stage_sync(&self, project: &str, stage: &str) -> Result<StageSync>;
    /// The agent acknowledged holding `revision` of the stage's desired
    /// state. Never moves the delivered revision backwards.
    async fn record_delivered(
        &self,
        project: &str,
        stage: &str,
        revision: u64,
        now: Timestamp,
    ) -> Result<StageSync>;
    /// Records a status report of the stage: the applied revision (never
    /// moved backwards; an older one is ignored), the report itself, and the
    /// release states that follow in the same transaction — the release in
    /// place at the applied revision (the newest at or below it: suspend,
    /// resume and component controls take revisions without a release)
    /// becomes `applied`; older `applied` ones `replaced`; older `pending`
    /// ones `superseded` (they never ran); the release of `failed_revision`,
    /// if given, `failed`. When the failed revision is the applied one (the
    /// agent rolled it back), the release that was applied before stays
    /// `applied`.
    async fn record_status(
        &self,
        project: &str,
        stage: &str,
        applied_revision: u64,
        failed_revision: Option<u64>,
        report: &serde_json::Value,
        now: Timestamp,
    ) -> Result<StageSync>;

    // --- several hubs on one store (see `cluster.rs`) ---
    //
    // The defaults are those of a store only one hub opens.

    /// What other hubs change, for a store several hubs share: each call
    /// gives the caller its own feed. `None`: only this hub writes here, so
    /// it knows what it changed.
    fn changes(&self) -> Option<ChangeFeed> {
        None
    }
    /// Whether several hubs may share this store (it has a change feed).
    fn is_shared(&self) -> bool {
        false
    }
    /// Waits for database connections so far, if the backend pools them.
    fn pool_stats(&self) -> Option<PoolStats> {
        None
    }
    /// Records that the instance is alive (creating its record).
    async fn beat_instance(&self, _instance: &Instance) -> Result<()> {
        Ok(())
    }
    /// Every instance that ever beat and was not forgotten.
    async fn instances(&self) -> Result<Vec<Instance>> {
        Ok(Vec::new())
    }
    /// Removes the instance's record and releases the links it held.
    async fn forget_instance(&self, _id: &str) -> Result<()> {
        Ok(())
    }
    /// `instance` now holds the link of each of `outposts`: each claim gets
    /// a new, higher epoch, which every other holder learns through the
    /// change feed ([`Change::Claimed`]). Returns the epochs in order.
    async fn claim_links(
        &self,
        _instance: &str,
        outposts: &[String],
        _now: Timestamp,
    ) -> Result<Vec<u64>> {
        Ok(vec![0; outposts.len()])
    }
    /// The link claimed at `epoch` ended; a newer claim is left alone.
    async fn release_link(
        &self,
        _instance: &str,
        _outpost: &str,
        _epoch: u64,
        _now: Timestamp,
    ) -> Result<()> {
        Ok(())
    }
    /// Every outpost's latest claim (or only those `instance` holds).
    async fn link_claims(&self, _instance: Option<&str>) -> Result<Vec<LinkClaim>> {
        Ok(Vec::new())
    }
    /// The outpost's latest claim, if it was ever claimed.
    async fn link_claim(&self, outpost: &str) -> Result<Option<LinkClaim>> {
        Ok(self
            .link_claims(None)
            .await?
            .into_iter()
            .find(|c| c.outpost == outpost))
    }
    /// The lock of a single-writer job, if no other hub holds it: held until
    /// dropped, or until the hub's connection to the store is lost (then
    /// [`JobLock::lost`] resolves and the job must stop).
    async fn lock_job(&self, _job: &str) -> Result<Option<JobLock>> {
        Ok(Some(JobLock::local()))
    }
    /// A value every hub sharing the store must agree on (its CA, its URI
    /// secret): stores `offer` under `name` unless a value is there already,
    /// and returns the value stored.
    async fn cluster_secret(&self, _name: &str, _offer: &str) -> Result<String> {
        Err(StoreError::Backend {
            doing: "sharing the hub's secrets",
            source: "this store is not shared by several hubs".into(),
        })
    }
}

/// How every backend names things in errors and words its refusals, so that
/// users see the same messages whichever backend the hub runs on (the test
/// suite compares them).
pub(crate) mod wording {
    use crate::StoreError;

    pub fn stage(project: &str, stage: &str) -> String {
        format!("{project}/{stage}")
    }

    pub fn build(project: &str, build: &str) -> String {
        format!("{project}/{build}")
    }

    pub fn backup(project: &str, stage: &str, id: u64) -> String {
        format!("{id} of stage {project}/{stage}")
    }

    pub fn member(project: &str, user: &str) -> String {
        format!("{project}/{user}")
    }

    pub fn config(project: &str, stage: &str, config: &str) -> String {
        format!("{project}/{stage}/{config}")
    }

    pub fn config_key(project: &str, stage: &str, config: &str, key: &str) -> String {
        format!("{project}/{stage}/{config}:{key}")
    }

    /// Removes `keys` from `data` (env or files); the first key it holds
    /// in neither is the error.
    pub fn remove_keys(
        data: &mut trellis_model::ConfigData,
        keys: &[String],
        project: &str,
        stage: &str,
        config: &str,
    ) -> Result<(), StoreError> {
        for key in keys {
            let in_env = data.env.remove(key).is_some();
            let in_files = data.files.remove(key).is_some();
            if !in_env && !in_files {
                return Err(StoreError::NotFound {
                    kind: "config key",
                    name: config_key(project, stage, config, key),
                });
            }
        }
        Ok(())
    }

    pub fn rollout(id: u64) -> String {
        id.to_string()
    }

    /// Refuses releases for a rollout to a stage it does not hold.
    pub fn not_in_rollout(
        rollout: &trellis_model::rollout::Rollout,
        releases: &[crate::NewRelease],
    ) -> Result<(), StoreError> {
        let stranger = releases
            .iter()
            .find(|r| r.project != rollout.project)
            .map(|r| format!("{}/{}", r.project, r.stage))
            .or_else(|| {
                rollout
                    .stranger(releases.iter().map(|r| r.stage.as_str()))
                    .map(|stage| format!("{}/{stage}", rollout.project))
            });
        match stranger {
            Some(stage) => Err(StoreError::NotFound {
                kind: "rollout stage",
                name: format!("{stage} in rollout {}", rollout.id),
            }),
            None => Ok(()),
        }
    }

    pub fn rollout_changed(id: u64) -> StoreError {
        StoreError::InUse {
            what: format!("rollout {id} changed while this change was made"),
            hint: "read it again and retry".into(),
        }
    }

    /// Refuses `new` if one of `active` (the project's active rollouts)
    /// holds one of its stages.
    /// `t` to the millisecond, as every backend keeps instants.
    pub fn millis(t: trellis_model::Timestamp) -> trellis_model::Timestamp {
        chrono::DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t)
    }

    pub fn agent_update(id: u64) -> String {
        format!("agent update {id}")
    }

    /// Refuses a new update of an outpost whose update `open` is under way.
    pub fn agent_update_open(open: &trellis_model::agent_update::AgentUpdate) -> StoreError {
        StoreError::InUse {
            what: format!(
                "outpost {:?} is already being updated to agent {} ({}, {})",
                open.outpost,
                open.version,
                agent_update(open.id),
                open.state
            ),
            hint: "wait until that update is applied or failed (`trellis list outposts` shows it), then ask again".into(),
        }
    }

    pub fn rollout_overlap(
        new: &trellis_model::rollout::NewRollout,
        active: &[trellis_model::rollout::Rollout],
    ) -> Result<(), StoreError> {
        let wanted: std::collections::HashSet<&str> =
            new.stages.iter().map(|s| s.stage.as_str()).collect();
        for other in active.iter().filter(|r| r.state.is_active()) {
            let shared: Vec<&str> = other
                .stages
                .iter()
                .map(|s| s.stage.as_str())
                .filter(|s| wanted.contains(s))
                .collect();
            if shared.is_empty() {
                continue;
            }
            let mut listed = shared
                .iter()
                .take(10)
                .copied()
                .collect::<Vec<_>>()
                .join(", ");
            if shared.len() > 10 {
                listed.push_str(&format!(" and {} more", shared.len() - 10));
            }
            return Err(StoreError::InUse {
                what: format!(
                    "rollout {} ({}, build {}) is still rolling out to {} of these stages: {listed}",
                    other.id,
                    other.state,
                    other.build,
                    shared.len()
                ),
                hint: format!(
                    "wait until it completes, or stop it first (`trellis abort rollout {}`), or choose other stages with the selector",
                    other.id
                ),
            });
        }
        Ok(())
    }

    pub fn agent_binary(version: &str, arch: &str) -> String {
        format!("{version}/{arch}")
    }

    /// Newest version first, then by architecture.
    pub fn sort_agent_binaries(binaries: &mut [trellis_model::AgentBinary]) {
        binaries.sort_by(|a, b| {
            trellis_model::agent_binary::compare_versions(&b.version, &a.version)
                .then_with(|| a.arch.cmp(&b.arch))
        });
    }

    /// What recording `new` over `stored` (same version and architecture)
    /// gives: the stored record when it is the same binary.
    pub fn agent_binary_again(
        stored: trellis_model::AgentBinary,
        new: &trellis_model::AgentBinary,
    ) -> Result<trellis_model::AgentBinary, StoreError> {
        if stored.blake3 == new.blake3 {
            Ok(stored)
        } else {
            Err(StoreError::AlreadyExists {
                kind: "agent binary",
                name: agent_binary(&new.version, &new.arch),
            })
        }
    }

    pub fn release(project: &str, stage: &str, number: u64) -> String {
        format!("{project}/{stage}#{number}")
    }

    pub fn project_archived(project: &str) -> StoreError {
        StoreError::InUse {
            what: format!("project {project:?} is archived"),
            hint: format!("restore the project first (`trellis restore project {project}`)"),
        }
    }

    pub fn outpost_full(outpost: &str, held: u64, max: u32) -> StoreError {
        StoreError::InUse {
            what: format!("outpost {outpost:?} is full: it holds {held} of {max} stages"),
            hint: "ask an administrator to raise its limit or choose another outpost".into(),
        }
    }

    pub fn project_in_use(project: &str, stages: u64, builds: u64) -> StoreError {
        StoreError::InUse {
            what: format!("project {project:?} still has {stages} stage(s) and {builds} build(s)"),
            hint: "delete its stages and builds first, or force the deletion".into(),
        }
    }

    pub fn stage_in_use(project: &str, name: &str, releases: u64, configs: u64) -> StoreError {
        StoreError::InUse {
            what: format!(
                "stage {:?} still has {releases} release(s) and {configs} config(s)",
                stage(project, name)
            ),
            hint:
                "delete its configs first, or force the deletion to remove its release history too"
                    .into(),
        }
    }

    /// `stages` are the qualified names of the stages on the outpost.
    pub fn outpost_in_use(outpost: &str, stages: &[String]) -> StoreError {
        StoreError::InUse {
            what: format!(
                "outpost {outpost:?} still holds {} stage(s): {}",
                stages.len(),
                stages.join(", ")
            ),
            hint: "delete those stages first, or force the deletion to delete them too".into(),
        }
    }

    /// `stages` are the (unqualified) names of the stages whose releases
    /// use the build.
    pub fn build_in_use(project: &str, name: &str, releases: u64, stages: &[String]) -> StoreError {
        StoreError::InUse {
            what: format!(
                "build {:?} is used by {releases} release(s) on stage(s) {}",
                build(project, name),
                stages.join(", ")
            ),
            hint: "releases are history and keep their build; delete those stages first if the build must go"
                .into(),
        }
    }
}

/// Why a join token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinTokenRefusal {
    Unknown,
    Expired,
    AlreadyUsed,
}
