//! The store's SQL, written once for every SQL backend.
//!
//! [`SqlStore`] implements [`Store`] over a [`Backend`]: SQLite
//! ([`crate::sqlite`]) or PostgreSQL ([`crate::postgres`]). Every
//! statement here is text both databases accept (`$n` parameters,
//! `ON CONFLICT … DO UPDATE`, `RETURNING`, `UPDATE … FROM`, standard
//! types, integers for time, JSON as text); where the dialects differ —
//! a JSON array as rows, a JSON field, the larger of two values — the
//! statement asks its backend for the fragment ([`Dialect`]), so each
//! difference is written in one place per dialect.
//!
//! What a backend brings besides the fragments: its transactions
//! ([`Backend::write`] must give one writer at a time — SQLite's single
//! writer connection, PostgreSQL's transaction-scoped advisory lock — since
//! the check-then-act rules below are written for serial writes;
//! [`Backend::read`] a consistent snapshot).
//!
//! # Layout
//! - `conn.rs`: statements, connections and rows as the code here sees
//!   them, implemented by each backend without sqlx's generic bounds.
//! - `sync_batch.rs`: the sync writes (what agents acknowledge), a lone
//!   one or a group commit's batch, as a few set-based statements.
//! - `rollout_waves.rs`: a rollout's rows as stored, and which of its
//!   waves a save must write.

pub mod conn;

use std::collections::{HashMap, HashSet};
use std::ops::DerefMut;
use std::str::FromStr;

use async_trait::async_trait;
use chrono::DateTime;
use serde::Serialize;
use serde::de::DeserializeOwned;
use trellis_model::{
    AccessKeyInfo, AgentBinary, AuditEntry, Backup, Build, ComponentAction, ComponentControl,
    Config, ConfigData, Member, NewAuditEntry, NewBackup, NewBuild, Outpost, OutpostLink, Project,
    Release, ReleaseState, Role, Stage, StageSync, Timestamp, User,
    agent_update::{AgentUpdate, AgentUpdateState, NewAgentUpdate},
    build_name,
    link_profile::LinkProfile,
    rollout::{NewRollout, Rollout, RolloutStage},
};

use crate::{
    AdminGuarded, ChangeFeed, ControlOutcome, DesiredAsk, DesiredParts, Instance, JobLock,
    JoinTokenRefusal, LinkActivity, LinkClaim, NewRelease, NewStage, OutpostStage, OutpostUpdate,
    PoolStats, ProjectUpdate, PushedReleases, Result, StageFilter, StageKey, StageSummary,
    StageUpdate, Store, StoreError, StoredAccessKey, SyncUpdate, wording,
};
use conn::{Conn, FromCol, SqlRow, q};

/// How a dialect writes what the databases spell differently.
#[derive(Debug, Clone, Copy)]
pub struct Dialect {
    /// The larger of two values: `MAX(a, b)` in SQLite, `GREATEST(a, b)`.
    pub greatest: &'static str,
    /// Rows `value` of the text elements of a JSON array given as parameter
    /// `{}`: a `FROM` item.
    pub json_strings: &'static str,
    /// Rows `value` of the elements (JSON objects) of a JSON array given as
    /// parameter `{}`: a `FROM` item; read their fields with `json_field`.
    pub json_rows: &'static str,
    /// Text field `{field}` of JSON text column `{col}`; `{}` is replaced by
    /// the column, `{f}` by the field name.
    pub json_field: &'static str,
}

impl Dialect {
    fn json_strings(&self, param: &str) -> String {
        self.json_strings.replace("{}", param)
    }

    fn json_rows(&self, param: &str) -> String {
        self.json_rows.replace("{}", param)
    }

    fn json_field(&self, col: &str, field: &str) -> String {
        self.json_field.replace("{}", col).replace("{f}", field)
    }
}

/// A database the shared SQL runs on. See the module docs.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    type Conn: Conn + ?Sized;
    /// An open transaction; dropping it rolls back.
    type Tx: DerefMut<Target = Self::Conn> + Send;
    /// A pooled connection, for single statements outside a transaction.
    type Pooled: DerefMut<Target = Self::Conn> + Send;

    const DIALECT: Dialect;

    /// A write transaction; writers are serialized (see the module docs).
    async fn write(&self) -> Result<Self::Tx, sqlx::Error>;
    /// A read transaction that sees one consistent state.
    async fn read(&self) -> Result<Self::Tx, sqlx::Error>;
    /// A connection for one read statement.
    async fn reader(&self) -> Result<Self::Pooled, sqlx::Error>;
    async fn commit(tx: Self::Tx) -> Result<(), sqlx::Error>;

    /// Waits for connections, for `/metrics`.
    fn pool_stats(&self) -> Option<PoolStats> {
        None
    }

    // --- several hubs on one store: what only a shared database does ---
    //
    // The defaults are those of a store only one hub opens: nothing else
    // changes it, no other hub holds a link, and every job is this hub's.

    fn changes(&self) -> Option<ChangeFeed> {
        None
    }
    fn is_shared(&self) -> bool {
        false
    }
    async fn beat_instance(&self, _instance: &Instance) -> Result<()> {
        Ok(())
    }
    async fn instances(&self) -> Result<Vec<Instance>> {
        Ok(Vec::new())
    }
    async fn forget_instance(&self, _id: &str) -> Result<()> {
        Ok(())
    }
    async fn claim_links(
        &self,
        _instance: &str,
        outposts: &[String],
        _now: Timestamp,
    ) -> Result<Vec<u64>> {
        Ok(vec![0; outposts.len()])
    }
    async fn release_link(
        &self,
        _instance: &str,
        _outpost: &str,
        _epoch: u64,
        _now: Timestamp,
    ) -> Result<()> {
        Ok(())
    }
    async fn link_claims(&self, _instance: Option<&str>) -> Result<Vec<LinkClaim>> {
        Ok(Vec::new())
    }
    async fn link_claim(&self, _outpost: &str) -> Result<Option<LinkClaim>> {
        Ok(None)
    }
    async fn lock_job(&self, _job: &str) -> Result<Option<JobLock>> {
        Ok(Some(JobLock::local()))
    }
    async fn cluster_secret(&self, _name: &str, _offer: &str) -> Result<String> {
        Err(StoreError::Backend {
            doing: "sharing the hub's secrets",
            source: "this store is not shared by several hubs".into(),
        })
    }
}

/// The store over backend `B`. Open it through the backend's own
/// constructor ([`crate::sqlite::SqliteStore::open`],
/// [`crate::postgres::PgStore::open`]).
pub struct SqlStore<B: Backend> {
    pub(crate) backend: B,
    /// The stages of the active rollouts this store saved, so that a save
    /// writes only the waves that changed ([`rollout_waves`]).
    waves_seen: rollout_waves::WavesSeen,
}

impl<B: Backend> SqlStore<B> {
    pub(crate) fn new(backend: B) -> SqlStore<B> {
        SqlStore {
            backend,
            waves_seen: rollout_waves::WavesSeen::default(),
        }
    }

    async fn write(&self) -> Result<B::Tx> {
        self.backend
            .write()
            .await
            .map_err(backend("starting a transaction"))
    }

    /// A read transaction, for reads of several statements that must agree
    /// with each other.
    async fn read(&self) -> Result<B::Tx> {
        self.backend
            .read()
            .await
            .map_err(backend("starting a read"))
    }

    async fn reader(&self) -> Result<B::Pooled> {
        self.backend
            .reader()
            .await
            .map_err(backend("taking a database connection"))
    }

    async fn commit(&self, tx: B::Tx, doing: &'static str) -> Result<()> {
        B::commit(tx).await.map_err(backend(doing))
    }

    /// One sync write: a batch of one, so that a lone write and the group
    /// commit's batches run the same statements.
    async fn record_one_sync(
        &self,
        update: SyncUpdate,
        now: Timestamp,
        doing: &'static str,
    ) -> Result<StageSync> {
        let mut tx = self.write().await?;
        let answer = sync_batch::sync_batch_in(&mut *tx, &B::DIALECT, &[update], now)
            .await?
            .pop()
            .ok_or_else(|| corrupt("a sync write got no answer".into()))?;
        let sync = answer?;
        self.commit(tx, doing).await?;
        Ok(sync)
    }

    /// The project's stages (`which`; only those in `names` if given),
    /// each with its sync record and applied release, by name.
    async fn stage_summaries(
        &self,
        project: &str,
        which: StageFilter,
        names: Option<&[String]>,
    ) -> Result<Vec<StageSummary>> {
        let named = match names {
            Some(_) => format!(
                "AND s.name IN (SELECT value FROM {})",
                B::DIALECT.json_strings("$3")
            ),
            None => String::new(),
        };
        // The applied release is looked up in the partial index
        // `releases_applied` (migration 0016), which holds a stage's one
        // applied release: the state is written into the statement, since
        // neither SQLite nor PostgreSQL matches a bound parameter to an
        // index's condition. Scanning every release of the stage instead
        // made a summary's cost grow with the stage's history.
        let sql = format!(
            "SELECT s.project, s.name, s.stage_type, s.display_name, s.suspended, s.outpost, \
             s.desired_revision, s.latest_release, s.created_at, s.archived_at, \
             y.delivered_revision, y.applied_revision, y.updated_at AS sync_updated_at, \
             {} AS report_state, \
             (SELECT MAX(r.number) FROM releases r \
              WHERE r.project = s.project AND r.stage = s.name AND r.state = '{}') AS applied_release \
             FROM stages s LEFT JOIN stage_syncs y ON y.project = s.project AND y.stage = s.name \
             WHERE s.project = $1 \
             AND (NOT $2 OR s.desired_revision > COALESCE(y.applied_revision, 0)) {named} \
             ORDER BY s.name",
            B::DIALECT.json_field("y.report", "state"),
            ReleaseState::Applied.as_str(),
        );
        let mut query = q(&sql).bind(project).bind(which == StageFilter::Pending);
        if let Some(names) = names {
            query = query.bind(json(&names)?);
        }
        // One statement, which sees one state of the database by itself:
        // no transaction begun and ended around it, and the project looked
        // up only when no stage is found. (On the benchmark's hub, the
        // transaction's extra trips put the rollout driver's read of a
        // 100-stage wave at 5–13 ms, against 5–8 ms in most runs for the
        // statement alone; BENCHMARKS.md, rollout.)
        let mut conn = self.reader().await?;
        let rows = query
            .fetch_all(&mut *conn)
            .await
            .map_err(backend("listing stages with their sync records"))?;
        if rows.is_empty() {
            require_project(&mut *conn, project).await?;
        }
        all(&rows, summary_from)
    }

    /// Applies `change` to every update of request `batch` and saves those
    /// it changed (it says whether it did), in one transaction; returns
    /// them.
    async fn change_agent_update_batch(
        &self,
        batch: u64,
        doing: &'static str,
        mut change: impl FnMut(&mut AgentUpdate) -> bool + Send,
    ) -> Result<Vec<AgentUpdate>> {
        let mut tx = self.write().await?;
        let mut changed = Vec::new();
        for mut record in agent_update_batch_in(&mut *tx, batch, doing).await? {
            if change(&mut record) {
                save_agent_update(&mut *tx, &record, doing).await?;
                changed.push(record);
            }
        }
        self.commit(tx, doing).await?;
        Ok(changed)
    }
}

pub(crate) fn backend(doing: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| StoreError::Backend {
        doing,
        source: Box::new(e),
    }
}

/// For inserts: a unique violation means the record is already there.
fn insert_error(
    doing: &'static str,
    kind: &'static str,
    name: String,
) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            StoreError::AlreadyExists { kind, name }
        }
        _ => StoreError::Backend {
            doing,
            source: Box::new(e),
        },
    }
}

fn not_found(kind: &'static str, name: String) -> StoreError {
    StoreError::NotFound { kind, name }
}

// --- encoding ---

pub(crate) fn int(n: u64) -> Result<i64> {
    i64::try_from(n).map_err(|e| StoreError::Backend {
        doing: "storing a number",
        source: Box::new(e),
    })
}

pub(crate) fn millis(t: Timestamp) -> i64 {
    t.timestamp_millis()
}

fn json<T: Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| StoreError::Backend {
        doing: "encoding a record",
        source: Box::new(e),
    })
}

// --- decoding ---
//
// A failure here means the database holds something this code never wrote
// (corruption or a foreign edit), so it is a backend error, not a rule.

const READING: &str = "reading a stored record";

pub(crate) fn corrupt(what: String) -> StoreError {
    StoreError::Backend {
        doing: READING,
        source: what.into(),
    }
}

pub(crate) fn col<T: FromCol, R: SqlRow + ?Sized>(row: &R, name: &str) -> Result<T> {
    T::from_col(row, name).map_err(backend(READING))
}

pub(crate) fn unsigned(n: i64) -> Result<u64> {
    u64::try_from(n).map_err(|_| corrupt(format!("negative count {n}")))
}

fn count<R: SqlRow>(row: &R, name: &str) -> Result<u64> {
    unsigned(col(row, name)?)
}

pub(crate) fn time<R: SqlRow>(row: &R, name: &str) -> Result<Timestamp> {
    let ms: i64 = col(row, name)?;
    DateTime::from_timestamp_millis(ms)
        .ok_or_else(|| corrupt(format!("timestamp {ms} in column {name} is out of range")))
}

fn parsed<T: FromStr<Err = String>, R: SqlRow>(row: &R, name: &str) -> Result<T> {
    let text: String = col(row, name)?;
    text.parse().map_err(corrupt)
}

fn from_json<T: DeserializeOwned, R: SqlRow>(row: &R, name: &str) -> Result<T> {
    let text: String = col(row, name)?;
    decode_json(&text)
}

/// A nullable JSON column.
fn opt_from_json<T: DeserializeOwned, R: SqlRow>(row: &R, name: &str) -> Result<Option<T>> {
    let text: Option<String> = col(row, name)?;
    text.as_deref().map(decode_json).transpose()
}

fn decode_json<T: DeserializeOwned>(text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| StoreError::Backend {
        doing: READING,
        source: Box::new(e),
    })
}

// Column lists, shared by the SELECTs and INSERTs of each table so that the
// row decoders below always see the columns they expect.
macro_rules! backup_columns {
    () => {
        "id, project, stage, display_name, state, message, created_ms, created_by, finished_ms, \
         size_bytes, uploaded_bytes, manifest, volumes, restore"
    };
}
macro_rules! user_columns {
    () => {
        "name, admin, created_at"
    };
}
macro_rules! key_columns {
    () => {
        "id, user_name, description, secret_hash, created_at"
    };
}
macro_rules! project_columns {
    () => {
        "name, description, created_at, display_name, archived_at"
    };
}
macro_rules! outpost_columns {
    () => {
        "name, display_name, description, labels, max_stages, uri_generation, revoked_at, \
         created_at, ingress_domain"
    };
}
macro_rules! stage_columns {
    () => {
        "project, name, stage_type, display_name, suspended, outpost, desired_revision, \
         latest_release, created_at, archived_at"
    };
}
macro_rules! build_columns {
    () => {
        "project, name, number, branch, commit_id, manifest_file, manifest, components, \
         created_at, created_by"
    };
}
macro_rules! config_columns {
    () => {
        "project, stage, name, version, env, files, updated_at"
    };
}
macro_rules! release_columns {
    () => {
        "project, stage, number, build, config, revision, state, created_at, created_by"
    };
}
macro_rules! link_columns {
    () => {
        "outpost, key_fingerprint, cert_serial, cert_not_after, agent, last_seen, \
         last_disconnect"
    };
}
macro_rules! sync_columns {
    () => {
        "project, stage, delivered_revision, applied_revision, report, updated_at"
    };
}

// After `sync_columns!`, which it uses.
mod rollout_waves;
mod sync_batch;

fn user_from<R: SqlRow>(row: &R) -> Result<User> {
    Ok(User {
        name: col(row, "name")?,
        admin: col(row, "admin")?,
        created_at: time(row, "created_at")?,
    })
}

fn key_from<R: SqlRow>(row: &R) -> Result<StoredAccessKey> {
    Ok(StoredAccessKey {
        info: AccessKeyInfo {
            id: col(row, "id")?,
            user: col(row, "user_name")?,
            description: col(row, "description")?,
            created_at: time(row, "created_at")?,
        },
        secret_hash: col(row, "secret_hash")?,
    })
}

fn project_from<R: SqlRow>(row: &R) -> Result<Project> {
    Ok(Project {
        name: col(row, "name")?,
        display_name: col(row, "display_name")?,
        description: col(row, "description")?,
        created_at: time(row, "created_at")?,
        archived_at: opt_time(row, "archived_at")?,
    })
}

fn outpost_from<R: SqlRow>(row: &R) -> Result<Outpost> {
    let max_stages: Option<i64> = col(row, "max_stages")?;
    Ok(Outpost {
        name: col(row, "name")?,
        display_name: col(row, "display_name")?,
        description: col(row, "description")?,
        labels: from_json(row, "labels")?,
        max_stages: max_stages
            .map(|n| u32::try_from(n).map_err(|_| corrupt(format!("stage limit {n}"))))
            .transpose()?,
        uri_generation: u64_col(row, "uri_generation")?,
        revoked_at: opt_time(row, "revoked_at")?,
        ingress_domain: col(row, "ingress_domain")?,
        created_at: time(row, "created_at")?,
    })
}

macro_rules! agent_binary_columns {
    () => {
        "version, arch, size, blake3, sha256, manifest, uploaded_at, uploaded_by"
    };
}

fn agent_binary_from<R: SqlRow>(row: &R) -> Result<AgentBinary> {
    Ok(AgentBinary {
        version: col(row, "version")?,
        arch: col(row, "arch")?,
        size: u64_col(row, "size")?,
        blake3: col(row, "blake3")?,
        sha256: col(row, "sha256")?,
        manifest: col(row, "manifest")?,
        uploaded_at: time(row, "uploaded_at")?,
        uploaded_by: col(row, "uploaded_by")?,
    })
}

fn u64_col<R: SqlRow>(row: &R, name: &str) -> Result<u64> {
    let n: i64 = col(row, name)?;
    u64::try_from(n).map_err(|_| corrupt(format!("{name} {n}")))
}

fn opt_time<R: SqlRow>(row: &R, name: &str) -> Result<Option<Timestamp>> {
    let ms: Option<i64> = col(row, name)?;
    ms.map(|ms| DateTime::from_timestamp_millis(ms).ok_or_else(|| corrupt(format!("{name} {ms}"))))
        .transpose()
}

fn schedule_from<R: SqlRow>(row: &R) -> Result<trellis_model::BackupSchedule> {
    let keep = count(row, "keep")?;
    Ok(trellis_model::BackupSchedule {
        project: col(row, "project")?,
        stage: col(row, "stage")?,
        schedule: col(row, "schedule")?,
        keep: u32::try_from(keep).map_err(|_| corrupt(format!("keep {keep}")))?,
        last_run: time(row, "last_ms")?,
    })
}

/// A backup id as the database holds it; one beyond what it can hold is
/// no backup's.
fn backup_id(project: &str, stage: &str, id: u64) -> Result<i64> {
    i64::try_from(id).map_err(|_| not_found("backup", wording::backup(project, stage, id)))
}

/// The rollout of a `rollouts` row with the stages the row still holds
/// (those of a rollout recorded before `rollout_waves`; see
/// [`with_wave_stages`]).
fn rollout_from<R: SqlRow>(row: &R) -> Result<Rollout> {
    let mut rollout: Rollout = from_json(row, "record")?;
    rollout.stages = from_json::<Vec<RolloutStage>, _>(row, "stages")?;
    Ok(rollout)
}

/// `rollout` (as [`rollout_from`] read it) with its waves' stages after
/// its own.
async fn with_wave_stages<C: Conn + ?Sized>(
    c: &mut C,
    mut rollout: Rollout,
    doing: &'static str,
) -> Result<Rollout> {
    let waves = q("SELECT stages FROM rollout_waves WHERE rollout = $1 ORDER BY wave")
        .bind(int(rollout.id)?)
        .fetch_all(&mut *c)
        .await
        .map_err(backend(doing))?;
    for wave in &waves {
        rollout
            .stages
            .extend(from_json::<Vec<RolloutStage>, _>(wave, "stages")?);
    }
    Ok(rollout)
}

/// Saves `saved` over the version it was read at (see
/// [`Store::save_rollout`]), writing only the waves that differ from
/// `seen` (what this store saved at that version, if it knows); the
/// record as saved, and its stages as now stored, to keep once committed.
async fn rollout_saved_in<C: Conn + ?Sized>(
    c: &mut C,
    mut saved: Rollout,
    seen: Option<rollout_waves::SeenWaves>,
    doing: &'static str,
) -> Result<(Rollout, rollout_waves::SeenWaves)> {
    let read_at = saved.version;
    saved.version += 1;
    let (parts, stored) = rollout_waves::to_write(&mut saved, seen)?;
    // The row's own stages (of a rollout recorded before `rollout_waves`)
    // move to its waves.
    let done = q(
        "UPDATE rollouts SET state = $3, version = $4, record = $5, stages = '[]' \
         WHERE id = $1 AND project = $2 AND version = $6",
    )
    .bind(int(saved.id)?)
    .bind(&saved.project)
    .bind(saved.state.as_str())
    .bind(int(saved.version)?)
    .bind(&parts.head)
    .bind(int(read_at)?)
    .execute(&mut *c)
    .await
    .map_err(backend(doing))?;
    if done == 0 {
        let exists = q("SELECT 1 AS one FROM rollouts WHERE id = $1 AND project = $2")
            .bind(int(saved.id)?)
            .bind(&saved.project)
            .fetch_optional(&mut *c)
            .await
            .map_err(backend(doing))?
            .is_some();
        return Err(if exists {
            wording::rollout_changed(saved.id)
        } else {
            not_found("rollout", wording::rollout(saved.id))
        });
    }
    write_rollout_waves(c, saved.id, &parts.waves, doing).await?;
    Ok((saved, stored))
}

/// Writes the rollout's waves (each wave is one row: a save leaves the
/// others untouched; a row equal to the stored one is not rewritten).
async fn write_rollout_waves<C: Conn + ?Sized>(
    c: &mut C,
    id: u64,
    waves: &[(i64, String)],
    doing: &'static str,
) -> Result<()> {
    for (wave, stages) in waves {
        q(
            "INSERT INTO rollout_waves (rollout, wave, stages) VALUES ($1, $2, $3) \
           ON CONFLICT (rollout, wave) DO UPDATE SET stages = excluded.stages \
           WHERE rollout_waves.stages <> excluded.stages",
        )
        .bind(int(id)?)
        .bind(*wave)
        .bind(stages)
        .execute(&mut *c)
        .await
        .map_err(backend(doing))?;
    }
    Ok(())
}

fn backup_from<R: SqlRow>(row: &R) -> Result<Backup> {
    Ok(Backup {
        id: count(row, "id")?,
        project: col(row, "project")?,
        stage: col(row, "stage")?,
        display_name: col(row, "display_name")?,
        state: parsed(row, "state")?,
        message: col(row, "message")?,
        created_at: time(row, "created_ms")?,
        created_by: col(row, "created_by")?,
        finished_at: opt_time(row, "finished_ms")?,
        size: count(row, "size_bytes")?,
        uploaded: count(row, "uploaded_bytes")?,
        manifest: col(row, "manifest")?,
        volumes: from_json(row, "volumes")?,
        restore: opt_from_json(row, "restore")?,
    })
}

fn stage_from<R: SqlRow>(row: &R) -> Result<Stage> {
    let latest_release: Option<i64> = col(row, "latest_release")?;
    Ok(Stage {
        project: col(row, "project")?,
        name: col(row, "name")?,
        stage_type: parsed(row, "stage_type")?,
        display_name: col(row, "display_name")?,
        suspended: col(row, "suspended")?,
        outpost: col(row, "outpost")?,
        desired_revision: count(row, "desired_revision")?,
        latest_release: latest_release.map(unsigned).transpose()?,
        created_at: time(row, "created_at")?,
        archived_at: opt_time(row, "archived_at")?,
    })
}

fn build_from<R: SqlRow>(row: &R) -> Result<Build> {
    Ok(Build {
        project: col(row, "project")?,
        name: col(row, "name")?,
        number: count(row, "number")?,
        branch: col(row, "branch")?,
        commit: col(row, "commit_id")?,
        manifest_file: col(row, "manifest_file")?,
        manifest: col(row, "manifest")?,
        components: from_json(row, "components")?,
        created_at: time(row, "created_at")?,
        created_by: col(row, "created_by")?,
    })
}

fn config_from<R: SqlRow>(row: &R) -> Result<Config> {
    Ok(Config {
        project: col(row, "project")?,
        stage: col(row, "stage")?,
        name: col(row, "name")?,
        version: count(row, "version")?,
        data: ConfigData {
            env: from_json(row, "env")?,
            files: from_json(row, "files")?,
            ..ConfigData::default()
        },
        updated_at: time(row, "updated_at")?,
    })
}

fn release_from<R: SqlRow>(row: &R) -> Result<Release> {
    Ok(Release {
        project: col(row, "project")?,
        stage: col(row, "stage")?,
        number: count(row, "number")?,
        build: col(row, "build")?,
        config: opt_from_json(row, "config")?,
        revision: count(row, "revision")?,
        state: parsed(row, "state")?,
        created_at: time(row, "created_at")?,
        created_by: col(row, "created_by")?,
    })
}

fn link_from<R: SqlRow>(row: &R) -> Result<OutpostLink> {
    Ok(OutpostLink {
        outpost: col(row, "outpost")?,
        key_fingerprint: col(row, "key_fingerprint")?,
        cert_serial: col(row, "cert_serial")?,
        cert_not_after: opt_time(row, "cert_not_after")?,
        agent: opt_from_json(row, "agent")?,
        last_seen: opt_time(row, "last_seen")?,
        last_disconnect: col(row, "last_disconnect")?,
    })
}

fn control_from<R: SqlRow>(row: &R) -> Result<ComponentControl> {
    Ok(ComponentControl {
        component: col(row, "component")?,
        stopped: col(row, "stopped")?,
        killed: col(row, "killed")?,
        restarts: count(row, "restarts")?,
    })
}

fn sync_from<R: SqlRow>(row: &R) -> Result<StageSync> {
    Ok(StageSync {
        project: col(row, "project")?,
        stage: col(row, "stage")?,
        delivered_revision: count(row, "delivered_revision")?,
        applied_revision: count(row, "applied_revision")?,
        report: opt_from_json(row, "report")?,
        updated_at: opt_time(row, "updated_at")?,
    })
}

/// A row of [`SqliteStore::list_stage_summaries`]: a stage's columns, its
/// sync record's (NULL without one) and its applied release.
fn summary_from<R: SqlRow>(row: &R) -> Result<StageSummary> {
    let delivered: Option<i64> = col(row, "delivered_revision")?;
    let applied: Option<i64> = col(row, "applied_revision")?;
    let release: Option<i64> = col(row, "applied_release")?;
    Ok(StageSummary {
        stage: stage_from(row)?,
        delivered_revision: delivered.map(unsigned).transpose()?.unwrap_or(0),
        applied_revision: applied.map(unsigned).transpose()?.unwrap_or(0),
        report_state: col(row, "report_state")?,
        applied_release: release.map(unsigned).transpose()?,
        sync_updated_at: opt_time(row, "sync_updated_at")?,
    })
}

/// The sync record of a stage that has none stored yet.
fn no_sync(project: &str, stage: &str) -> StageSync {
    StageSync {
        project: project.to_owned(),
        stage: stage.to_owned(),
        ..StageSync::default()
    }
}

fn all<T, R: SqlRow>(rows: &[R], decode: fn(&R) -> Result<T>) -> Result<Vec<T>> {
    rows.iter().map(decode).collect()
}

// --- lookups shared by reads and writes ---
//
// They take a connection so that a write transaction sees its own snapshot;
// reads pass a read transaction or a pooled connection.

async fn exists<C: Conn + ?Sized>(
    c: &mut C,
    sql: &'static str,
    binds: &[&str],
    doing: &'static str,
) -> Result<bool> {
    let mut query = q(sql);
    for b in binds {
        query = query.bind(*b);
    }
    Ok(query
        .fetch_optional(c)
        .await
        .map_err(backend(doing))?
        .is_some())
}

async fn require_user<C: Conn + ?Sized>(c: &mut C, name: &str) -> Result<()> {
    if exists(
        c,
        "SELECT 1 FROM users WHERE name = $1",
        &[name],
        "looking up a user",
    )
    .await?
    {
        Ok(())
    } else {
        Err(not_found("user", name.to_owned()))
    }
}

async fn require_project<C: Conn + ?Sized>(c: &mut C, name: &str) -> Result<()> {
    if exists(
        c,
        "SELECT 1 FROM projects WHERE name = $1",
        &[name],
        "looking up a project",
    )
    .await?
    {
        Ok(())
    } else {
        Err(not_found("project", name.to_owned()))
    }
}

async fn require_outpost<C: Conn + ?Sized>(c: &mut C, name: &str) -> Result<()> {
    if exists(
        c,
        "SELECT 1 FROM outposts WHERE name = $1",
        &[name],
        "looking up an outpost",
    )
    .await?
    {
        Ok(())
    } else {
        Err(not_found("outpost", name.to_owned()))
    }
}

async fn fetch_sync<C: Conn + ?Sized>(
    c: &mut C,
    project: &str,
    stage: &str,
) -> Result<Option<StageSync>> {
    q(concat!(
        "SELECT ",
        sync_columns!(),
        " FROM stage_syncs WHERE project = $1 AND stage = $2"
    ))
    .bind(project)
    .bind(stage)
    .fetch_optional(c)
    .await
    .map_err(backend("looking up a stage's sync record"))?
    .as_ref()
    .map(sync_from)
    .transpose()
}

async fn fetch_stage<C: Conn + ?Sized>(
    c: &mut C,
    project: &str,
    name: &str,
) -> Result<Option<Stage>> {
    q(concat!(
        "SELECT ",
        stage_columns!(),
        " FROM stages WHERE project = $1 AND name = $2"
    ))
    .bind(project)
    .bind(name)
    .fetch_optional(c)
    .await
    .map_err(backend("looking up a stage"))?
    .as_ref()
    .map(stage_from)
    .transpose()
}

/// The config `name` of a stage, if it exists.
async fn fetch_config<C: Conn + ?Sized>(
    c: &mut C,
    project: &str,
    stage: &str,
    name: &str,
) -> Result<Option<Config>> {
    q(concat!(
        "SELECT ",
        config_columns!(),
        " FROM configs WHERE project = $1 AND stage = $2 AND name = $3"
    ))
    .bind(project)
    .bind(stage)
    .bind(name)
    .fetch_optional(c)
    .await
    .map_err(backend("looking up a config"))?
    .as_ref()
    .map(config_from)
    .transpose()
}

/// The stage, or the right NotFound: for the project if that is what is
/// missing, else for the stage.
async fn fetch_project<C: Conn + ?Sized>(c: &mut C, name: &str) -> Result<Project> {
    q(concat!(
        "SELECT ",
        project_columns!(),
        " FROM projects WHERE name = $1"
    ))
    .bind(name)
    .fetch_optional(c)
    .await
    .map_err(backend("looking up a project"))?
    .as_ref()
    .map(project_from)
    .transpose()?
    .ok_or_else(|| not_found("project", name.to_owned()))
}

async fn require_stage<C: Conn + ?Sized>(c: &mut C, project: &str, name: &str) -> Result<Stage> {
    match fetch_stage(c, project, name).await? {
        Some(stage) => Ok(stage),
        None => {
            require_project(c, project).await?;
            Err(not_found("stage", wording::stage(project, name)))
        }
    }
}

const RECORDING_RELEASE: &str = "recording a release";

/// Records `release` in the open write transaction `c` (see
/// [`Store::push_release`]); returns it with the outpost its stage is
/// placed on.
async fn release_in<C: Conn + ?Sized>(
    c: &mut C,
    release: &NewRelease,
    now: Timestamp,
) -> Result<(Release, String)> {
    const DOING: &str = RECORDING_RELEASE;
    // Takes the stage's next release number and desired revision in the
    // same statement that finds it.
    let taken = q(
        "UPDATE stages SET desired_revision = desired_revision + 1, \
         latest_release = COALESCE(latest_release, 0) + 1 \
         WHERE project = $1 AND name = $2 \
         RETURNING desired_revision, latest_release, outpost",
    )
    .bind(&release.project)
    .bind(&release.stage)
    .fetch_optional(&mut *c)
    .await
    .map_err(backend(DOING))?;
    let Some(taken) = taken else {
        require_project(&mut *c, &release.project).await?;
        return Err(not_found(
            "stage",
            wording::stage(&release.project, &release.stage),
        ));
    };
    let revision = unsigned(col(&taken, "desired_revision")?)?;
    let number = unsigned(col(&taken, "latest_release")?)?;
    let outpost: String = col(&taken, "outpost")?;
    // A missing build fails the call; the caller drops the transaction,
    // and the stage's numbers with it.
    require_build(&mut *c, &release.project, &release.build).await?;
    let created = release.pending(number, revision, truncated(now));
    q(concat!(
        "INSERT INTO releases (",
        release_columns!(),
        ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
    ))
    .bind(&created.project)
    .bind(&created.stage)
    .bind(int(number)?)
    .bind(&created.build)
    .bind(created.config.as_ref().map(json).transpose()?)
    .bind(int(revision)?)
    .bind(created.state.as_str())
    .bind(millis(now))
    .bind(&created.created_by)
    .execute(&mut *c)
    .await
    .map_err(backend(DOING))?;
    Ok((created, outpost))
}

async fn require_build<C: Conn + ?Sized>(c: &mut C, project: &str, build: &str) -> Result<()> {
    if exists(
        c,
        "SELECT 1 FROM builds WHERE project = $1 AND name = $2",
        &[project, build],
        RECORDING_RELEASE,
    )
    .await?
    {
        Ok(())
    } else {
        Err(not_found("build", wording::build(project, build)))
    }
}

/// The stages placed on `outpost`, by project and name, read on `c`; the
/// outpost must exist.
async fn stages_on_outpost_in<C: Conn + ?Sized>(c: &mut C, outpost: &str) -> Result<Vec<Stage>> {
    const DOING: &str = "listing the stages on an outpost";
    let rows = q(concat!(
        "SELECT ",
        stage_columns!(),
        " FROM stages WHERE outpost = $1 ORDER BY project, name"
    ))
    .bind(outpost)
    .fetch_all(&mut *c)
    .await
    .map_err(backend(DOING))?;
    // Stages placed on it say the outpost exists; only an empty list needs
    // asking.
    if rows.is_empty()
        && !exists(
            c,
            "SELECT 1 FROM outposts WHERE name = $1",
            &[outpost],
            DOING,
        )
        .await?
    {
        return Err(not_found("outpost", outpost.to_owned()));
    }
    all(&rows, stage_from)
}

/// The stages of a push that releases one build (same project, config and
/// author) to distinct stages — a fleet rollout — or `None`.
/// Records `releases` (see [`Store::push_releases`]): one set of
/// statements when they are one build and config to distinct stages of a
/// project, as a fan-out is; one release at a time otherwise.
async fn releases_in<C: Conn + ?Sized>(
    c: &mut C,
    dialect: &Dialect,
    releases: &[NewRelease],
    now: Timestamp,
) -> Result<PushedReleases> {
    if let Some(stages) = one_build_to_stages(releases) {
        return releases_to_stages_in(c, dialect, &releases[0], &stages, now).await;
    }
    let mut created = Vec::with_capacity(releases.len());
    let mut outposts = Vec::with_capacity(releases.len());
    for release in releases {
        let (release, outpost) = release_in(c, release, now).await?;
        created.push(release);
        outposts.push(outpost);
    }
    Ok(PushedReleases::new(created, outposts))
}

fn one_build_to_stages(releases: &[NewRelease]) -> Option<Vec<&str>> {
    let first = releases.first()?;
    let mut seen = HashSet::with_capacity(releases.len());
    releases
        .iter()
        .all(|r| {
            r.project == first.project
                && r.build == first.build
                && r.config == first.config
                && r.created_by == first.created_by
                && seen.insert(r.stage.as_str())
        })
        .then(|| releases.iter().map(|r| r.stage.as_str()).collect())
}

/// Releases `release`'s build to every one of `stages` (distinct) in the
/// open write transaction `c`, in three statements whatever their number:
/// each stage's next release number and desired revision are taken in one
/// update, the releases written in one insert. Returns them in the order
/// of `stages`. The statements name the stages as a JSON array, which each
/// dialect turns into rows its own way.
async fn releases_to_stages_in<C: Conn + ?Sized>(
    c: &mut C,
    dialect: &Dialect,
    release: &NewRelease,
    stages: &[&str],
    now: Timestamp,
) -> Result<PushedReleases> {
    const DOING: &str = RECORDING_RELEASE;
    let names = json(&stages)?;
    let stage_rows = dialect.json_strings("$2");
    let update = format!(
        "UPDATE stages SET desired_revision = desired_revision + 1, \
         latest_release = COALESCE(latest_release, 0) + 1 \
         WHERE project = $1 AND name IN (SELECT value FROM {stage_rows}) \
         RETURNING name, desired_revision, latest_release, outpost"
    );
    let taken = q(&update)
        .bind(&release.project)
        .bind(&names)
        .fetch_all(&mut *c)
        .await
        .map_err(backend(DOING))?;
    let mut numbers = HashMap::with_capacity(taken.len());
    let mut outposts = Vec::with_capacity(taken.len());
    for row in &taken {
        let name: String = col(row, "name")?;
        let revision = unsigned(col(row, "desired_revision")?)?;
        let number = unsigned(col(row, "latest_release")?)?;
        numbers.insert(name, (number, revision));
        outposts.push(col(row, "outpost")?);
    }
    if let Some(missing) = stages.iter().find(|s| !numbers.contains_key(**s)) {
        require_project(&mut *c, &release.project).await?;
        return Err(not_found(
            "stage",
            wording::stage(&release.project, missing),
        ));
    }
    require_build(&mut *c, &release.project, &release.build).await?;
    let config = release.config.as_ref().map(json).transpose()?;
    let insert = format!(
        concat!(
            "INSERT INTO releases (",
            release_columns!(),
            ") SELECT project, name, latest_release, $3, $4, desired_revision, $5, $6, $7 \
             FROM stages WHERE project = $1 AND name IN (SELECT value FROM {})"
        ),
        stage_rows
    );
    q(&insert)
        .bind(&release.project)
        .bind(&names)
        .bind(&release.build)
        .bind(&config)
        .bind(ReleaseState::Pending.as_str())
        .bind(millis(now))
        .bind(&release.created_by)
        .execute(&mut *c)
        .await
        .map_err(backend(DOING))?;
    let created = stages
        .iter()
        .map(|stage| {
            let (number, revision) = numbers[*stage];
            Release {
                stage: (*stage).to_owned(),
                ..release.pending(number, revision, truncated(now))
            }
        })
        .collect();
    Ok(PushedReleases::new(created, outposts))
}

/// A stage's controls, newest release and its build, read on `c` (in the
/// caller's transaction).
/// [`Store::outposts_desired`] in one read and five statements whatever
/// the number of outposts (one read of four statements per outpost the
/// other way, each a round trip to the database's thread): the stages on
/// the outposts, which of the outposts exist, then the controls, releases
/// and builds of the stages above what their outpost holds.
async fn outposts_desired_in<C: Conn + ?Sized>(
    c: &mut C,
    dialect: &Dialect,
    asks: &[DesiredAsk],
) -> Result<Vec<Result<Vec<OutpostStage>>>> {
    const DOING: &str = "reading the desired state of several outposts";
    let outposts = json(&asks.iter().map(|a| a.outpost.as_str()).collect::<Vec<_>>())?;
    let on_outposts = format!(
        "outpost IN (SELECT value FROM {})",
        dialect.json_strings("$1")
    );
    let rows = q(&format!(
        "SELECT {} FROM stages WHERE {on_outposts} ORDER BY outpost, project, name",
        stage_columns!()
    ))
    .bind(&outposts)
    .fetch_all(&mut *c)
    .await
    .map_err(backend(DOING))?;
    let mut stages: HashMap<String, Vec<Stage>> = HashMap::new();
    for row in &rows {
        let stage = stage_from(row)?;
        stages.entry(stage.outpost.clone()).or_default().push(stage);
    }
    // Stages placed on an outpost say it exists; only the others are asked.
    let known: HashSet<String> = if asks.iter().any(|a| !stages.contains_key(&a.outpost)) {
        q(&format!(
            "SELECT name FROM outposts WHERE name IN (SELECT value FROM {})",
            dialect.json_strings("$1")
        ))
        .bind(&outposts)
        .fetch_all(&mut *c)
        .await
        .map_err(backend(DOING))?
        .iter()
        .map(|row| col::<String, _>(row, "name"))
        .collect::<Result<_>>()?
    } else {
        HashSet::new()
    };
    // The stages whose parts are wanted, as `project/stage` (names cannot
    // hold a slash).
    let wanted: Vec<String> = asks
        .iter()
        .flat_map(|ask| {
            stages
                .get(&ask.outpost)
                .into_iter()
                .flatten()
                .filter(|s| {
                    let key = (s.project.clone(), s.name.clone());
                    s.desired_revision > ask.held.get(&key).copied().unwrap_or(0)
                })
                .map(|s| format!("{}/{}", s.project, s.name))
        })
        .collect();
    let mut controls: HashMap<StageKey, Vec<ComponentControl>> = HashMap::new();
    let mut releases: HashMap<StageKey, Release> = HashMap::new();
    let mut builds: HashMap<StageKey, Build> = HashMap::new();
    if !wanted.is_empty() {
        let wanted = json(&wanted)?;
        let chosen = format!(
            "SELECT project, name FROM stages WHERE {on_outposts} \
             AND project || '/' || name IN (SELECT value FROM {})",
            dialect.json_strings("$2")
        );
        // Archived stages run nothing: no release is sent for them.
        let running = format!(
            "SELECT project, name, latest_release FROM stages WHERE {on_outposts} \
             AND archived_at IS NULL AND project || '/' || name IN (SELECT value FROM {})",
            dialect.json_strings("$2")
        );
        for row in &both_bound(&mut *c, &outposts, &wanted, &format!(
            "SELECT project, stage, component, stopped, killed, restarts FROM component_controls \
             WHERE (project, stage) IN ({chosen}) ORDER BY project, stage, component"
        ))
        .await?
        {
            controls
                .entry((col(row, "project")?, col(row, "stage")?))
                .or_default()
                .push(control_from(row)?);
        }
        for row in &both_bound(
            &mut *c,
            &outposts,
            &wanted,
            &format!(
                "SELECT {} FROM releases WHERE (project, stage, number) IN ({running})",
                release_columns!()
            ),
        )
        .await?
        {
            let release = release_from(row)?;
            releases.insert((release.project.clone(), release.stage.clone()), release);
        }
        for row in &both_bound(
            &mut *c,
            &outposts,
            &wanted,
            &format!(
                "SELECT {} FROM builds WHERE (project, name) IN \
             (SELECT project, build FROM releases WHERE (project, stage, number) IN ({running}))",
                build_columns!()
            ),
        )
        .await?
        {
            let build = build_from(row)?;
            builds.insert((build.project.clone(), build.name.clone()), build);
        }
    }
    Ok(asks
        .iter()
        .map(|ask| {
            let Some(on_it) = stages.get(&ask.outpost) else {
                return if known.contains(&ask.outpost) {
                    Ok(Vec::new())
                } else {
                    Err(not_found("outpost", ask.outpost.clone()))
                };
            };
            on_it
                .iter()
                .map(|stage| {
                    let key = (stage.project.clone(), stage.name.clone());
                    let desired =
                        if stage.desired_revision > ask.held.get(&key).copied().unwrap_or(0) {
                            Some(parts_of(stage, &key, &controls, &releases, &builds)?)
                        } else {
                            None
                        };
                    Ok(OutpostStage {
                        stage: stage.clone(),
                        desired,
                    })
                })
                .collect()
        })
        .collect())
}

/// The rows of `sql` with the outposts ($1) and the wanted stages ($2) of
/// [`outposts_desired_in`] bound.
async fn both_bound<C: Conn + ?Sized>(
    c: &mut C,
    outposts: &str,
    wanted: &str,
    sql: &str,
) -> Result<Vec<C::Row>> {
    q(sql)
        .bind(outposts)
        .bind(wanted)
        .fetch_all(c)
        .await
        .map_err(backend("reading the desired state of several outposts"))
}

/// A wanted stage's parts from what [`outposts_desired_in`] read, with the
/// errors [`desired_parts_in`] gives for a release or build that is gone.
fn parts_of(
    stage: &Stage,
    key: &StageKey,
    controls: &HashMap<StageKey, Vec<ComponentControl>>,
    releases: &HashMap<StageKey, Release>,
    builds: &HashMap<StageKey, Build>,
) -> Result<DesiredParts> {
    let controls = controls.get(key).cloned().unwrap_or_default();
    let Some(number) = stage.latest_release.filter(|_| stage.archived_at.is_none()) else {
        return Ok(DesiredParts {
            controls,
            release: None,
            build: None,
        });
    };
    let release = releases
        .get(key)
        .filter(|r| r.number == number)
        .cloned()
        .ok_or_else(|| {
            not_found(
                "release",
                wording::release(&stage.project, &stage.name, number),
            )
        })?;
    let build = builds
        .get(&(stage.project.clone(), release.build.clone()))
        .cloned()
        .ok_or_else(|| not_found("build", wording::build(&stage.project, &release.build)))?;
    Ok(DesiredParts {
        controls,
        release: Some(release),
        build: Some(build),
    })
}

async fn desired_parts_in<C: Conn + ?Sized>(c: &mut C, stage: &Stage) -> Result<DesiredParts> {
    const DOING: &str = "reading a stage's desired state";
    let controls = q(
        "SELECT component, stopped, killed, restarts FROM component_controls \
         WHERE project = $1 AND stage = $2 ORDER BY component",
    )
    .bind(&stage.project)
    .bind(&stage.name)
    .fetch_all(&mut *c)
    .await
    .map_err(backend(DOING))?;
    let controls = all(&controls, control_from)?;
    // An archived stage runs nothing on its outpost (its volumes stay).
    let Some(number) = stage.latest_release.filter(|_| stage.archived_at.is_none()) else {
        return Ok(DesiredParts {
            controls,
            release: None,
            build: None,
        });
    };
    let release = q(concat!(
        "SELECT ",
        release_columns!(),
        " FROM releases WHERE project = $1 AND stage = $2 AND number = $3"
    ))
    .bind(&stage.project)
    .bind(&stage.name)
    .bind(int(number)?)
    .fetch_optional(&mut *c)
    .await
    .map_err(backend(DOING))?
    .as_ref()
    .map(release_from)
    .transpose()?
    .ok_or_else(|| {
        not_found(
            "release",
            wording::release(&stage.project, &stage.name, number),
        )
    })?;
    let build = q(concat!(
        "SELECT ",
        build_columns!(),
        " FROM builds WHERE project = $1 AND name = $2"
    ))
    .bind(&stage.project)
    .bind(&release.build)
    .fetch_optional(&mut *c)
    .await
    .map_err(backend(DOING))?
    .as_ref()
    .map(build_from)
    .transpose()?
    .ok_or_else(|| not_found("build", wording::build(&stage.project, &release.build)))?;
    Ok(DesiredParts {
        controls,
        release: Some(release),
        build: Some(build),
    })
}

/// A batch of link activity as one JSON array for
/// [`Store::record_link_activity`]'s statements: one object per outpost,
/// its entries merged in order as applying them one by one would (the
/// latest time seen; of the other fields, the last one given), since one
/// statement updates each row once.
fn merged_activity(activity: &[LinkActivity]) -> Result<String> {
    let mut order: Vec<&str> = Vec::new();
    let mut merged: HashMap<&str, serde_json::Map<String, serde_json::Value>> = HashMap::new();
    for a in activity {
        let row = merged.entry(a.outpost.as_str()).or_insert_with(|| {
            order.push(&a.outpost);
            serde_json::Map::new()
        });
        let seen = millis(a.seen);
        let earlier = row.get("seen").and_then(serde_json::Value::as_i64);
        row.insert("seen".into(), earlier.map_or(seen, |e| e.max(seen)).into());
        if let Some(hello) = &a.hello {
            row.insert("agent".into(), json(&hello.agent)?.into());
            row.insert("cert_serial".into(), hello.cert_serial.clone().into());
            row.insert("cert_not_after".into(), millis(hello.cert_not_after).into());
        }
        if let Some(disconnect) = &a.disconnect {
            row.insert("disconnect".into(), disconnect.clone().into());
        }
    }
    let rows: Vec<serde_json::Value> = order
        .into_iter()
        .map(|outpost| {
            let mut row = merged.remove(outpost).unwrap_or_default();
            row.insert("outpost".into(), outpost.into());
            serde_json::Value::Object(row)
        })
        .collect();
    json(&rows)
}

#[async_trait]
impl<B: Backend> Store for SqlStore<B> {
    async fn create_user(&self, user: &User) -> Result<()> {
        const DOING: &str = "creating a user";
        let mut tx = self.write().await?;
        q(concat!(
            "INSERT INTO users (",
            user_columns!(),
            ") VALUES ($1, $2, $3)"
        ))
        .bind(&user.name)
        .bind(user.admin)
        .bind(millis(user.created_at))
        .execute(&mut *tx)
        .await
        .map_err(insert_error(DOING, "user", user.name.clone()))?;
        self.commit(tx, DOING).await
    }

    async fn get_user(&self, name: &str) -> Result<User> {
        q(concat!(
            "SELECT ",
            user_columns!(),
            " FROM users WHERE name = $1"
        ))
        .bind(name)
        .fetch_optional(&mut *self.reader().await?)
        .await
        .map_err(backend("looking up a user"))?
        .as_ref()
        .map(user_from)
        .transpose()?
        .ok_or_else(|| not_found("user", name.to_owned()))
    }

    async fn list_users(&self) -> Result<Vec<User>> {
        let rows = q(concat!(
            "SELECT ",
            user_columns!(),
            " FROM users ORDER BY name"
        ))
        .fetch_all(&mut *self.reader().await?)
        .await
        .map_err(backend("listing users"))?;
        all(&rows, user_from)
    }

    async fn create_access_key(&self, key: &StoredAccessKey) -> Result<()> {
        const DOING: &str = "creating an access key";
        let mut tx = self.write().await?;
        require_user(&mut *tx, &key.info.user).await?;
        q(concat!(
            "INSERT INTO access_keys (",
            key_columns!(),
            ") VALUES ($1, $2, $3, $4, $5)"
        ))
        .bind(&key.info.id)
        .bind(&key.info.user)
        .bind(&key.info.description)
        .bind(&key.secret_hash)
        .bind(millis(key.info.created_at))
        .execute(&mut *tx)
        .await
        .map_err(insert_error(DOING, "access key", key.info.id.clone()))?;
        self.commit(tx, DOING).await
    }

    async fn find_access_key(&self, id: &str) -> Result<Option<StoredAccessKey>> {
        q(concat!(
            "SELECT ",
            key_columns!(),
            " FROM access_keys WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&mut *self.reader().await?)
        .await
        .map_err(backend("looking up an access key"))?
        .as_ref()
        .map(key_from)
        .transpose()
    }

    async fn list_access_keys(&self, user: Option<&str>) -> Result<Vec<AccessKeyInfo>> {
        const DOING: &str = "listing access keys";
        let rows = match user {
            Some(user) => {
                let mut tx = self.read().await?;
                require_user(&mut *tx, user).await?;
                q(concat!(
                    "SELECT ",
                    key_columns!(),
                    " FROM access_keys WHERE user_name = $1 ORDER BY id"
                ))
                .bind(user)
                .fetch_all(&mut *tx)
                .await
                .map_err(backend(DOING))?
            }
            None => q(concat!(
                "SELECT ",
                key_columns!(),
                " FROM access_keys ORDER BY id"
            ))
            .fetch_all(&mut *self.reader().await?)
            .await
            .map_err(backend(DOING))?,
        };
        Ok(all(&rows, key_from)?.into_iter().map(|k| k.info).collect())
    }

    async fn delete_access_key(&self, id: &str) -> Result<()> {
        const DOING: &str = "deleting an access key";
        let mut tx = self.write().await?;
        let deleted = q("DELETE FROM access_keys WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(backend(DOING))?;
        if deleted == 0 {
            return Err(not_found("access key", id.to_owned()));
        }
        self.commit(tx, DOING).await
    }

    async fn delete_access_key_keeping_admin(&self, id: &str) -> Result<AdminGuarded<()>> {
        const DOING: &str = "deleting an access key";
        let mut tx = self.write().await?;
        let owner = q(
            "SELECT u.admin AS admin FROM access_keys k JOIN users u ON u.name = k.user_name \
             WHERE k.id = $1",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend(DOING))?
        .ok_or_else(|| not_found("access key", id.to_owned()))?;
        let owner_is_admin: bool = col(&owner, "admin")?;
        if owner_is_admin {
            let others = q(
                "SELECT COUNT(*) AS n FROM access_keys k JOIN users u ON u.name = k.user_name \
                 WHERE u.admin AND k.id <> $1",
            )
            .bind(id)
            .fetch_one(&mut *tx)
            .await
            .map_err(backend(DOING))?;
            if count(&others, "n")? == 0 {
                return Ok(AdminGuarded::LastAdminKey);
            }
        }
        q("DELETE FROM access_keys WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(backend(DOING))?;
        self.commit(tx, DOING).await?;
        Ok(AdminGuarded::Done(()))
    }

    async fn set_user_admin(&self, name: &str, admin: bool) -> Result<AdminGuarded<User>> {
        const DOING: &str = "changing a user's administrator role";
        let mut tx = self.write().await?;
        let user = q(concat!(
            "SELECT ",
            user_columns!(),
            " FROM users WHERE name = $1"
        ))
        .bind(name)
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend(DOING))?
        .as_ref()
        .map(user_from)
        .transpose()?
        .ok_or_else(|| not_found("user", name.to_owned()))?;
        if user.admin && !admin {
            let row = q(
                "SELECT (SELECT COUNT(*) FROM access_keys WHERE user_name = $1) AS own, \
                        (SELECT COUNT(*) FROM access_keys k JOIN users u ON u.name = k.user_name \
                         WHERE u.admin AND u.name <> $1) AS others",
            )
            .bind(name)
            .fetch_one(&mut *tx)
            .await
            .map_err(backend(DOING))?;
            if count(&row, "own")? > 0 && count(&row, "others")? == 0 {
                return Ok(AdminGuarded::LastAdminKey);
            }
        }
        q("UPDATE users SET admin = $2 WHERE name = $1")
            .bind(name)
            .bind(admin)
            .execute(&mut *tx)
            .await
            .map_err(backend(DOING))?;
        self.commit(tx, DOING).await?;
        Ok(AdminGuarded::Done(User { admin, ..user }))
    }

    async fn create_project(&self, project: &Project, owner: &str) -> Result<()> {
        const DOING: &str = "creating a project";
        let mut tx = self.write().await?;
        require_user(&mut *tx, owner).await?;
        q(concat!(
            "INSERT INTO projects (",
            project_columns!(),
            ", last_build) VALUES ($1, $2, $3, $4, NULL, 0)"
        ))
        .bind(&project.name)
        .bind(&project.description)
        .bind(millis(project.created_at))
        .bind(&project.display_name)
        .execute(&mut *tx)
        .await
        .map_err(insert_error(DOING, "project", project.name.clone()))?;
        q("INSERT INTO members (project, user_name, role) VALUES ($1, $2, $3)")
            .bind(&project.name)
            .bind(owner)
            .bind(Role::Owner.as_str())
            .execute(&mut *tx)
            .await
            .map_err(backend(DOING))?;
        self.commit(tx, DOING).await
    }

    async fn get_project(&self, name: &str) -> Result<Project> {
        q(concat!(
            "SELECT ",
            project_columns!(),
            " FROM projects WHERE name = $1"
        ))
        .bind(name)
        .fetch_optional(&mut *self.reader().await?)
        .await
        .map_err(backend("looking up a project"))?
        .as_ref()
        .map(project_from)
        .transpose()?
        .ok_or_else(|| not_found("project", name.to_owned()))
    }

    async fn list_projects(&self) -> Result<Vec<Project>> {
        let rows = q(concat!(
            "SELECT ",
            project_columns!(),
            " FROM projects ORDER BY name"
        ))
        .fetch_all(&mut *self.reader().await?)
        .await
        .map_err(backend("listing projects"))?;
        all(&rows, project_from)
    }

    async fn delete_project(&self, name: &str, force: bool) -> Result<()> {
        const DOING: &str = "deleting a project";
        let mut tx = self.write().await?;
        require_project(&mut *tx, name).await?;
        let row = q(
            "SELECT (SELECT COUNT(*) FROM stages WHERE project = $1) AS stages, \
                    (SELECT COUNT(*) FROM builds WHERE project = $1) AS builds",
        )
        .bind(name)
        .fetch_one(&mut *tx)
        .await
        .map_err(backend(DOING))?;
        let (stages, builds) = (count(&row, "stages")?, count(&row, "builds")?);
        if !force && (stages > 0 || builds > 0) {
            return Err(wording::project_in_use(name, stages, builds));
        }
        // Dependants first, so no foreign key is ever left dangling.
        for sql in [
            "DELETE FROM releases WHERE project = $1",
            "DELETE FROM configs WHERE project = $1",
            "DELETE FROM stage_syncs WHERE project = $1",
            "DELETE FROM component_controls WHERE project = $1",
            "DELETE FROM stages WHERE project = $1",
            "DELETE FROM builds WHERE project = $1",
            "DELETE FROM members WHERE project = $1",
            "DELETE FROM audit_log WHERE project = $1",
            "DELETE FROM backups WHERE project = $1",
            "DELETE FROM backup_schedules WHERE project = $1",
            "DELETE FROM rollout_waves WHERE rollout IN (SELECT id FROM rollouts WHERE project = $1)",
            "DELETE FROM rollouts WHERE project = $1",
            "DELETE FROM projects WHERE name = $1",
        ] {
            q(sql)
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(backend(DOING))?;
        }
        self.commit(tx, DOING).await
    }

    async fn update_project(&self, name: &str, update: &ProjectUpdate) -> Result<Project> {
        const DOING: &str = "updating a project";
        let mut tx = self.write().await?;
        let mut project = fetch_project(&mut *tx, name).await?;
        if let Some(display_name) = &update.display_name {
            project.display_name = display_name.clone();
        }
        if let Some(description) = &update.description {
            project.description = description.clone();
        }
        q("UPDATE projects SET display_name = $2, description = $3 WHERE name = $1")
            .bind(name)
            .bind(&project.display_name)
            .bind(&project.description)
            .execute(&mut *tx)
            .await
            .map_err(backend(DOING))?;
        self.commit(tx, DOING).await?;
        Ok(project)
    }

    async fn archive_project(&self, name: &str, now: Timestamp) -> Result<Vec<Stage>> {
        const DOING: &str = "archiving a project";
        let mut tx = self.write().await?;
        let project = fetch_project(&mut *tx, name).await?;
        if project.archived_at.is_some() {
            return Ok(Vec::new());
        }
        q("UPDATE projects SET archived_at = $2 WHERE name = $1")
            .bind(name)
            .bind(millis(now))
            .execute(&mut *tx)
            .await
            .map_err(backend(DOING))?;
        let rows = q(concat!(
            "UPDATE stages SET archived_at = $2, desired_revision = desired_revision + 1 \
             WHERE project = $1 AND archived_at IS NULL RETURNING ",
            stage_columns!()
        ))
        .bind(name)
        .bind(millis(now))
        .fetch_all(&mut *tx)
        .await
        .map_err(backend(DOING))?;
        let mut stages = all(&rows, stage_from)?;
        stages.sort_by(|a, b| a.name.cmp(&b.name));
        self.commit(tx, DOING).await?;
        Ok(stages)
    }

    async fn restore_project(&self, name: &str) -> Result<Vec<Stage>> {
        const DOING: &str = "restoring a project";
        let mut tx = self.write().await?;
        let project = fetch_project(&mut *tx, name).await?;
        let Some(archived_at) = project.archived_at else {
            return Ok(Vec::new());
        };
        q("UPDATE projects SET archived_at = NULL WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(backend(DOING))?;
        let rows = q(concat!(
            "UPDATE stages SET archived_at = NULL, desired_revision = desired_revision + 1 \
             WHERE project = $1 AND archived_at = $2 RETURNING ",
            stage_columns!()
        ))
        .bind(name)
        .bind(millis(archived_at))
        .fetch_all(&mut *tx)
        .await
        .map_err(backend(DOING))?;
        let mut stages = all(&rows, stage_from)?;
        stages.sort_by(|a, b| a.name.cmp(&b.name));
        self.commit(tx, DOING).await?;
        Ok(stages)
    }

    async fn set_member(&self, project: &str, user: &str, role: Role) -> Result<()> {
        const DOING: &str = "setting a member's role";
        let mut tx = self.write().await?;
        require_project(&mut *tx, project).await?;
        require_user(&mut *tx, user).await?;
        q(
            "INSERT INTO members (project, user_name, role) VALUES ($1, $2, $3) \
             ON CONFLICT (project, user_name) DO UPDATE SET role = excluded.role",
        )
        .bind(project)
        .bind(user)
        .bind(role.as_str())
        .execute(&mut *tx)
        .await
        .map_err(backend(DOING))?;
        self.commit(tx, DOING).await
    }

    async fn remove_member(&self, project: &str, user: &str) -> Result<()> {
        const DOING: &str = "removing a member";
        let mut tx = self.write().await?;
        require_project(&mut *tx, project).await?;
        let deleted = q("DELETE FROM members WHERE project = $1 AND user_name = $2")
            .bind(project)
            .bind(user)
            .execute(&mut *tx)
            .await
            .map_err(backend(DOING))?;
        if deleted == 0 {
            return Err(not_found("member", wording::member(project, user)));
        }
        self.commit(tx, DOING).await
    }

    async fn list_members(&self, project: &str) -> Result<Vec<Member>> {
        let mut tx = self.read().await?;
        require_project(&mut *tx, project).await?;
        let rows =
            q("SELECT project, user_name, role FROM members WHERE project = $1 ORDER BY user_name")
                .bind(project)
                .fetch_all(&mut *tx)
                .await
                .map_err(backend("listing members"))?;
        rows.iter()
            .map(|row| {
                Ok(Member {
                    project: col(row, "project")?,
                    user: col(row, "user_name")?,
                    role: parsed(row, "role")?,
                })
            })
            .collect()
    }

    async fn record_audit(&self, entry: &NewAuditEntry) -> Result<AuditEntry> {
        const DOING: &str = "recording an audit entry";
        let mut tx = self.write().await?;
        require_project(&mut *tx, &entry.project).await?;
        // Writers are serial (see the module docs), so the next number is
        // the largest plus one on every backend.
        let row = q("SELECT COALESCE(MAX(id), 0) AS last FROM audit_log")
            .fetch_one(&mut *tx)
            .await
            .map_err(backend(DOING))?;
        let id = count(&row, "last")? + 1;
        q(
            "INSERT INTO audit_log (id, time_ms, user_name, project, stage, component, outpost, \
           action, detail, result) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(int(id)?)
        .bind(millis(entry.time))
        .bind(&entry.user)
        .bind(&entry.project)
        .bind(&entry.stage)
        .bind(&entry.component)
        .bind(&entry.outpost)
        .bind(&entry.action)
        .bind(&entry.detail)
        .bind(&entry.result)
        .execute(&mut *tx)
        .await
        .map_err(backend(DOING))?;
        self.commit(tx, DOING).await?;
        Ok(AuditEntry {
            id,
            time: truncated(entry.time),
            user: entry.user.clone(),
            project: entry.project.clone(),
            stage: entry.stage.clone(),
            component: entry.component.clone(),
            outpost: entry.outpost.clone(),
            action: entry.action.clone(),
            detail: entry.detail.clone(),
            result: entry.result.clone(),
        })
    }

    async fn list_audit(&self, project: &str, limit: usize) -> Result<Vec<AuditEntry>> {
        let mut tx = self.read().await?;
        require_project(&mut *tx, project).await?;
        let rows = q(
            "SELECT id, time_ms, user_name, project, stage, component, outpost, action, detail, \
             result FROM audit_log WHERE project = $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(project)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await
        .map_err(backend("listing the audit log"))?;
        rows.iter()
            .map(|row| {
                Ok(AuditEntry {
                    id: count(row, "id")?,
                    time: time(row, "time_ms")?,
                    user: col(row, "user_name")?,
                    project: col(row, "project")?,
                    stage: col(row, "stage")?,
                    component: col(row, "component")?,
                    outpost: col(row, "outpost")?,
                    action: col(row, "action")?,
                    detail: col(row, "detail")?,
                    result: col(row, "result")?,
                })
            })
            .collect()
    }

    async fn create_backup(&self, backup: &NewBackup) -> Result<Backup> {
        const DOING: &str = "recording a backup";
        let mut tx = self.write().await?;
        require_stage(&mut *tx, &backup.project, &backup.stage).await?;
        // Writers are serial (see the module docs): the next number is one
        // above both the largest in use and the last handed out (that
        // backup may be deleted; its number is not given again).
        let id = next_id_in(&mut *tx, IdCounter::Backups, DOING).await?;
        let record = Backup {
            id,
            project: backup.project.clone(),
            stage: backup.stage.clone(),
            display_name: backup.display_name.clone(),
            state: trellis_model::BackupState::Pending,
            message: backup.message.clone(),
            created_at: truncated(backup.created_at),
            created_by: backup.created_by.clone(),
            finished_at: None,
            size: 0,
            uploaded: 0,
            manifest: None,
            volumes: Vec::new(),
            restore: None,
        };
        q(concat!(
            "INSERT INTO backups (",
            backup_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
        ))
        .bind(int(id)?)
        .bind(&record.project)
        .bind(&record.stage)
        .bind(&record.display_name)
        .bind(record.state.as_str())
        .bind(&record.message)
        .bind(millis(record.created_at))
        .bind(&record.created_by)
        .bind(None::<i64>)
        .bind(0_i64)
        .bind(0_i64)
        .bind(None::<String>)
        .bind(json(&record.volumes)?)
        .bind(None::<String>)
        .execute(&mut *tx)
        .await
        .map_err(backend(DOING))?;
        self.commit(tx, DOING).await?;
        Ok(record)
    }

    async fn get_backup(&self, project: &str, stage: &str, id: u64) -> Result<Backup> {
        let mut tx = self.read().await?;
        require_stage(&mut *tx, project, stage).await?;
        q(concat!(
            "SELECT ",
            backup_columns!(),
            " FROM backups WHERE project = $1 AND stage = $2 AND id = $3"
        ))
        .bind(project)
        .bind(stage)
        .bind(backup_id(project, stage, id)?)
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend("looking up a backup"))?
        .as_ref()
        .map(backup_from)
        .transpose()?
        .ok_or_else(|| not_found("backup", wording::backup(project, stage, id)))
    }

    async fn list_backups(&self, project: &str, stage: &str) -> Result<Vec<Backup>> {
        let mut tx = self.read().await?;
        require_stage(&mut *tx, project, stage).await?;
        q(concat!(
            "SELECT ",
            backup_columns!(),
            " FROM backups WHERE project = $1 AND stage = $2 ORDER BY id DESC"
        ))
        .bind(project)
        .bind(stage)
        .fetch_all(&mut *tx)
        .await
        .map_err(backend("listing backups"))?
        .iter()
        .map(backup_from)
        .collect()
    }

    async fn save_backup(&self, b: &Backup) -> Result<()> {
        const DOING: &str = "updating a backup";
        let mut tx = self.write().await?;
        let restore = b.restore.as_ref().map(json).transpose()?;
        let done = q(
            "UPDATE backups SET display_name = $4, state = $5, message = $6, finished_ms = $7, \
             size_bytes = $8, uploaded_bytes = $9, manifest = $10, volumes = $11, restore = $12 \
             WHERE project = $1 AND stage = $2 AND id = $3",
        )
        .bind(&b.project)
        .bind(&b.stage)
        .bind(backup_id(&b.project, &b.stage, b.id)?)
        .bind(&b.display_name)
        .bind(b.state.as_str())
        .bind(&b.message)
        .bind(b.finished_at.map(millis))
        .bind(int(b.size)?)
        .bind(int(b.uploaded)?)
        .bind(b.manifest.clone())
        .bind(json(&b.volumes)?)
        .bind(restore)
        .execute(&mut *tx)
        .await
        .map_err(backend(DOING))?;
        if done == 0 {
            return Err(not_found(
                "backup",
                wording::backup(&b.project, &b.stage, b.id),
            ));
        }
        self.commit(tx, DOING).await
    }

    async fn create_agent_updates(
        &self,
        updates: &[NewAgentUpdate],
        at: Timestamp,
    ) -> Result<Vec<AgentUpdate>> {
        const DOING: &str = "recording agent updates";
        let at = wording::millis(at);
        let mut tx = self.write().await?;
        let mut made = Vec::with_capacity(updates.len());
        let mut batch = None;
        for new in updates {
            if !exists(
                &mut *tx,
                "SELECT 1 FROM outposts WHERE name = $1",
                &[new.outpost.as_str()],
                DOING,
            )
            .await?
            {
                return Err(not_found("outpost", new.outpost.clone()));
            }
            if let Some(open) = open_agent_update_in(&mut *tx, &new.outpost, DOING).await? {
                return Err(wording::agent_update_open(&open));
            }
            let id = next_id_in(&mut *tx, IdCounter::AgentUpdates, DOING).await?;
            let record = new.record(id, *batch.get_or_insert(id), at);
            q("INSERT INTO agent_updates (id, batch, outpost, state, record) VALUES ($1, $2, $3, $4, $5)")
                .bind(int(id)?)
                .bind(int(record.batch)?)
                .bind(&record.outpost)
                .bind(record.state.as_str())
                .bind(json(&record)?)
                .execute(&mut *tx)
                .await
                .map_err(backend(DOING))?;
            made.push(record);
        }
        self.commit(tx, DOING).await?;
        Ok(made)
    }

    async fn open_agent_update(&self, outpost: &str) -> Result<Option<AgentUpdate>> {
        let mut tx = self.read().await?;
        open_agent_update_in(&mut *tx, outpost, "looking up an outpost's agent update").await
    }

    async fn report_agent_update(
        &self,
        outpost: &str,
        id: u64,
        state: AgentUpdateState,
        message: &str,
        at: Timestamp,
    ) -> Result<AgentUpdate> {
        const DOING: &str = "recording how an agent update goes";
        let missing = || not_found("agent update", wording::agent_update(id));
        let Ok(key) = i64::try_from(id) else {
            return Err(missing());
        };
        let mut tx = self.write().await?;
        let mut record: AgentUpdate =
            q("SELECT record FROM agent_updates WHERE id = $1 AND outpost = $2")
                .bind(key)
                .bind(outpost)
                .fetch_optional(&mut *tx)
                .await
                .map_err(backend(DOING))?
                .as_ref()
                .map(|row| from_json(row, "record"))
                .transpose()?
                .ok_or_else(missing)?;
        if record.advance(state, message, wording::millis(at)) {
            save_agent_update(&mut *tx, &record, DOING).await?;
            self.commit(tx, DOING).await?;
        }
        Ok(record)
    }

    async fn waiting_agent_update_batches(&self) -> Result<Vec<u64>> {
        const DOING: &str = "looking for agent updates waiting for their wave";
        let rows =
            q("SELECT DISTINCT batch FROM agent_updates WHERE state = 'waiting' ORDER BY batch")
                .fetch_all(&mut *self.reader().await?)
                .await
                .map_err(backend(DOING))?;
        rows.iter().map(|row| count(row, "batch")).collect()
    }

    async fn agent_update_batch(&self, batch: u64) -> Result<Vec<AgentUpdate>> {
        let mut tx = self.read().await?;
        agent_update_batch_in(&mut *tx, batch, "reading a request's agent updates").await
    }

    async fn release_agent_update_wave(
        &self,
        batch: u64,
        wave: u32,
        offline: &[String],
        at: Timestamp,
    ) -> Result<Vec<AgentUpdate>> {
        let at = wording::millis(at);
        self.change_agent_update_batch(batch, "sending a wave of agent updates", |u| {
            u.wave == wave && u.release(offline.contains(&u.outpost), at)
        })
        .await
    }

    async fn halt_agent_update_batch(
        &self,
        batch: u64,
        why: &str,
        at: Timestamp,
    ) -> Result<Vec<AgentUpdate>> {
        let at = wording::millis(at);
        self.change_agent_update_batch(batch, "halting a request's agent updates", |u| {
            u.halt(why, at)
        })
        .await
    }

    async fn latest_agent_updates(&self) -> Result<Vec<AgentUpdate>> {
        const DOING: &str = "listing agent updates";
        let rows = q("SELECT u.record FROM agent_updates u WHERE u.id = \
                      (SELECT MAX(l.id) FROM agent_updates l WHERE l.outpost = u.outpost) \
                      ORDER BY u.outpost")
        .fetch_all(&mut *self.reader().await?)
        .await
        .map_err(backend(DOING))?;
        rows.iter().map(|row| from_json(row, "record")).collect()
    }

    async fn create_rollout(&self, rollout: &NewRollout) -> Result<Rollout> {
        const DOING: &str = "recording a rollout";
        let mut tx = self.write().await?;
        require_project(&mut *tx, &rollout.project).await?;
        // Writers are serial (see the module docs): no other rollout can
        // take these stages between this check and the insert.
        let rows = q("SELECT record, stages FROM rollouts WHERE project = $1 AND state IN ('running', 'waiting', 'paused')")
            .bind(&rollout.project)
            .fetch_all(&mut *tx)
            .await
            .map_err(backend(DOING))?;
        let mut active = Vec::with_capacity(rows.len());
        for rollout in all(&rows, rollout_from)? {
            active.push(with_wave_stages(&mut *tx, rollout, DOING).await?);
        }
        wording::rollout_overlap(rollout, &active)?;
        let id = next_id_in(&mut *tx, IdCounter::Rollouts, DOING).await?;
        let mut record = rollout.numbered(id);
        let (parts, stored) = rollout_waves::to_write(&mut record, None)?;
        q("INSERT INTO rollouts (id, project, state, version, record, stages) VALUES ($1, $2, $3, $4, $5, '[]')")
            .bind(int(id)?)
            .bind(&record.project)
            .bind(record.state.as_str())
            .bind(int(record.version)?)
            .bind(&parts.head)
            .execute(&mut *tx)
            .await
            .map_err(backend(DOING))?;
        write_rollout_waves(&mut *tx, id, &parts.waves, DOING).await?;
        self.commit(tx, DOING).await?;
        self.waves_seen.keep(&record, stored);
        Ok(record)
    }

    async fn get_rollout(&self, id: u64) -> Result<Rollout> {
        const DOING: &str = "looking up a rollout";
        let Ok(key) = i64::try_from(id) else {
            return Err(not_found("rollout", wording::rollout(id)));
        };
        // One snapshot: the record and its waves as one save left them.
        let mut tx = self.read().await?;
        let row = q("SELECT record, stages FROM rollouts WHERE id = $1")
            .bind(key)
            .fetch_optional(&mut *tx)
            .await
            .map_err(backend(DOING))?
            .ok_or_else(|| not_found("rollout", wording::rollout(id)))?;
        let rollout = rollout_from(&row)?;
        with_wave_stages(&mut *tx, rollout, DOING).await
    }

    async fn list_rollouts(&self, project: Option<&str>) -> Result<Vec<Rollout>> {
        const DOING: &str = "listing rollouts";
        let mut tx = self.read().await?;
        let rows = match project {
            Some(name) => {
                require_project(&mut *tx, name).await?;
                q("SELECT record FROM rollouts WHERE project = $1 ORDER BY id DESC")
                    .bind(name)
                    .fetch_all(&mut *tx)
                    .await
            }
            None => {
                q("SELECT record FROM rollouts ORDER BY id DESC")
                    .fetch_all(&mut *tx)
                    .await
            }
        }
        .map_err(backend(DOING))?;
        rows.iter().map(|row| from_json(row, "record")).collect()
    }

    async fn put_agent_binary(&self, binary: &AgentBinary) -> Result<AgentBinary> {
        const DOING: &str = "recording an agent binary";
        let mut tx = self.write().await?;
        // Writers are serial (see the module docs): nobody records this
        // version and architecture between the look and the insert.
        let stored = q(concat!(
            "SELECT ",
            agent_binary_columns!(),
            " FROM agent_binaries WHERE version = $1 AND arch = $2"
        ))
        .bind(&binary.version)
        .bind(&binary.arch)
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend(DOING))?;
        if let Some(row) = stored {
            return wording::agent_binary_again(agent_binary_from(&row)?, binary);
        }
        q(concat!(
            "INSERT INTO agent_binaries (",
            agent_binary_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        ))
        .bind(&binary.version)
        .bind(&binary.arch)
        .bind(int(binary.size)?)
        .bind(&binary.blake3)
        .bind(&binary.sha256)
        .bind(&binary.manifest)
        .bind(millis(binary.uploaded_at))
        .bind(&binary.uploaded_by)
        .execute(&mut *tx)
        .await
        .map_err(insert_error(
            DOING,
            "agent binary",
            wording::agent_binary(&binary.version, &binary.arch),
        ))?;
        self.commit(tx, DOING).await?;
        Ok(binary.clone())
    }

    async fn get_agent_binary(&self, version: &str, arch: &str) -> Result<AgentBinary> {
        q(concat!(
            "SELECT ",
            agent_binary_columns!(),
            " FROM agent_binaries WHERE version = $1 AND arch = $2"
        ))
        .bind(version)
        .bind(arch)
        .fetch_optional(&mut *self.reader().await?)
        .await
        .map_err(backend("looking up an agent binary"))?
        .as_ref()
        .map(agent_binary_from)
        .transpose()?
        .ok_or_else(|| not_found("agent binary", wording::agent_binary(version, arch)))
    }

    async fn list_agent_binaries(&self) -> Result<Vec<AgentBinary>> {
        let rows = q(concat!(
            "SELECT ",
            agent_binary_columns!(),
            " FROM agent_binaries"
        ))
        .fetch_all(&mut *self.reader().await?)
        .await
        .map_err(backend("listing agent binaries"))?;
        let mut listed = all(&rows, agent_binary_from)?;
        wording::sort_agent_binaries(&mut listed);
        Ok(listed)
    }

    async fn delete_agent_binary(&self, version: &str, arch: &str) -> Result<()> {
        const DOING: &str = "deleting an agent binary";
        let mut tx = self.write().await?;
        let done = q("DELETE FROM agent_binaries WHERE version = $1 AND arch = $2")
            .bind(version)
            .bind(arch)
            .execute(&mut *tx)
            .await
            .map_err(backend(DOING))?;
        if done == 0 {
            return Err(not_found(
                "agent binary",
                wording::agent_binary(version, arch),
            ));
        }
        self.commit(tx, DOING).await
    }

    async fn save_rollout(&self, rollout: &Rollout) -> Result<Rollout> {
        const DOING: &str = "updating a rollout";
        let mut tx = self.write().await?;
        let seen = self.waves_seen.take(rollout.id, rollout.version);
        let (saved, stored) = rollout_saved_in(&mut *tx, rollout.clone(), seen, DOING).await?;
        self.commit(tx, DOING).await?;
        self.waves_seen.keep(&saved, stored);
        Ok(saved)
    }

    async fn push_rollout_releases(
        &self,
        rollout: &Rollout,
        releases: &[NewRelease],
        now: Timestamp,
    ) -> Result<(Rollout, PushedReleases)> {
        const DOING: &str = "recording a rollout's releases";
        wording::not_in_rollout(rollout, releases)?;
        let mut tx = self.write().await?;
        let pushed = releases_in(&mut *tx, &B::DIALECT, releases, now).await?;
        let mut recorded = rollout.clone();
        recorded.record_pushed(&pushed.releases);
        let seen = self.waves_seen.take(rollout.id, rollout.version);
        let (saved, stored) = rollout_saved_in(&mut *tx, recorded, seen, DOING).await?;
        self.commit(tx, DOING).await?;
        self.waves_seen.keep(&saved, stored);
        Ok((saved, pushed))
    }

    async fn delete_backup(&self, project: &str, stage: &str, id: u64) -> Result<()> {
        const DOING: &str = "deleting a backup";
        let mut tx = self.write().await?;
        require_stage(&mut *tx, project, stage).await?;
        let done = q("DELETE FROM backups WHERE project = $1 AND stage = $2 AND id = $3")
            .bind(project)
            .bind(stage)
            .bind(backup_id(project, stage, id)?)
            .execute(&mut *tx)
            .await
            .map_err(backend(DOING))?;
        if done == 0 {
            return Err(not_found("backup", wording::backup(project, stage, id)));
        }
        self.commit(tx, DOING).await
    }

    async fn outpost_backup_work(&self, outpost: &str) -> Result<Vec<Backup>> {
        let rows = q(concat!(
            "SELECT ",
            backup_columns!(),
            " FROM backups b WHERE EXISTS (SELECT 1 FROM stages s WHERE s.outpost = $1 \
             AND s.project = b.project AND s.name = b.stage) \
             AND (b.state IN ('pending', 'running') OR b.restore IS NOT NULL) ORDER BY b.id"
        ))
        .bind(outpost)
        .fetch_all(&mut *self.reader().await?)
        .await
        .map_err(backend("looking up an outpost's backups"))?;
        let mut work = Vec::new();
        for row in &rows {
            let b = backup_from(row)?;
            let restoring = b.restore.as_ref().is_some_and(|r| r.state.is_open());
            if b.state.is_open() || restoring {
                work.push(b);
            }
        }
        Ok(work)
    }

    async fn backup_manifests(&self) -> Result<Vec<String>> {
        let rows = q("SELECT manifest FROM backups WHERE manifest IS NOT NULL")
            .fetch_all(&mut *self.reader().await?)
            .await
            .map_err(backend("listing backup manifests"))?;
        rows.iter().map(|row| col(row, "manifest")).collect()
    }

    async fn set_backup_schedule(
        &self,
        project: &str,
        stage: &str,
        schedule: Option<&trellis_model::BackupSchedule>,
    ) -> Result<()> {
        const DOING: &str = "setting a backup schedule";
        let mut tx = self.write().await?;
        require_stage(&mut *tx, project, stage).await?;
        q("DELETE FROM backup_schedules WHERE project = $1 AND stage = $2")
            .bind(project)
            .bind(stage)
            .execute(&mut *tx)
            .await
            .map_err(backend(DOING))?;
        if let Some(s) = schedule {
            q(
                "INSERT INTO backup_schedules (project, stage, schedule, keep, last_ms) \
               VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(project)
            .bind(stage)
            .bind(&s.schedule)
            .bind(i64::from(s.keep))
            .bind(millis(s.last_run))
            .execute(&mut *tx)
            .await
            .map_err(backend(DOING))?;
        }
        self.commit(tx, DOING).await
    }

    async fn get_backup_schedule(
        &self,
        project: &str,
        stage: &str,
    ) -> Result<Option<trellis_model::BackupSchedule>> {
        let mut tx = self.read().await?;
        require_stage(&mut *tx, project, stage).await?;
        q(
            "SELECT project, stage, schedule, keep, last_ms FROM backup_schedules \
           WHERE project = $1 AND stage = $2",
        )
        .bind(project)
        .bind(stage)
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend("reading a backup schedule"))?
        .as_ref()
        .map(schedule_from)
        .transpose()
    }

    async fn list_backup_schedules(&self) -> Result<Vec<trellis_model::BackupSchedule>> {
        q(
            "SELECT project, stage, schedule, keep, last_ms FROM backup_schedules \
           ORDER BY project, stage",
        )
        .fetch_all(&mut *self.reader().await?)
        .await
        .map_err(backend("listing backup schedules"))?
        .iter()
        .map(schedule_from)
        .collect()
    }

    async fn role_of(&self, project: &str, user: &str) -> Result<Option<Role>> {
        q("SELECT role FROM members WHERE project = $1 AND user_name = $2")
            .bind(project)
            .bind(user)
            .fetch_optional(&mut *self.reader().await?)
            .await
            .map_err(backend("looking up a member's role"))?
            .map(|row| parsed(&row, "role"))
            .transpose()
    }

    async fn create_outpost(&self, outpost: &Outpost) -> Result<()> {
        const DOING: &str = "creating an outpost";
        let mut tx = self.write().await?;
        q(concat!(
            "INSERT INTO outposts (",
            outpost_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
        ))
        .bind(&outpost.name)
        .bind(&outpost.display_name)
        .bind(&outpost.description)
        .bind(json(&outpost.labels)?)
        .bind(outpost.max_stages.map(i64::from))
        .bind(i64::try_from(outpost.uri_generation).unwrap_or(i64::MAX))
        .bind(outpost.revoked_at.map(millis))
        .bind(millis(outpost.created_at))
        .bind(&outpost.ingress_domain)
        .execute(&mut *tx)
        .await
        .map_err(insert_error(DOING, "outpost", outpost.name.clone()))?;
        self.commit(tx, DOING).await
    }

    async fn get_outpost(&self, name: &str) -> Result<Outpost> {
        q(concat!(
            "SELECT ",
            outpost_columns!(),
            " FROM outposts WHERE name = $1"
        ))
        .bind(name)
        .fetch_optional(&mut *self.reader().await?)
        .await
        .map_err(backend("looking up an outpost"))?
        .as_ref()
        .map(outpost_from)
        .transpose()?
        .ok_or_else(|| not_found("outpost", name.to_owned()))
    }

    async fn list_outposts(&self) -> Result<Vec<Outpost>> {
        let rows = q(concat!(
            "SELECT ",
            outpost_columns!(),
            " FROM outposts ORDER BY name"
        ))
        .fetch_all(&mut *self.reader().await?)
        .await
        .map_err(backend("listing outposts"))?;
        all(&rows, outpost_from)
    }

    async fn delete_outpost(&self, name: &str, force: bool) -> Result<()> {
        const DOING: &str = "deleting an outpost";
        let mut tx = self.write().await?;
        if !exists(
            &mut *tx,
            "SELECT 1 FROM outposts WHERE name = $1",
            &[name],
            DOING,
        )
        .await?
        {
            return Err(not_found("outpost", name.to_owned()));
        }
        let on_it = q("SELECT project, name FROM stages WHERE outpost = $1 ORDER BY project, name")
            .bind(name)
            .fetch_all(&mut *tx)
            .await
            .map_err(backend(DOING))?;
        if !force && !on_it.is_empty() {
            let stages = on_it
                .iter()
                .map(|row| {
                    let project: String = col(row, "project")?;
                    let stage: String = col(row, "name")?;
                    Ok(wording::stage(&project, &stage))
                })
                .collect::<Result<Vec<_>>>()?;
            return Err(wording::outpost_in_use(name, &stages));
        }
        for sql in [
            "DELETE FROM releases WHERE EXISTS (SELECT 1 FROM stages s \
             WHERE s.outpost = $1 AND s.project = releases.project AND s.name = releases.stage)",
            "DELETE FROM configs WHERE EXISTS (SELECT 1 FROM stages s \
             WHERE s.outpost = $1 AND s.project = configs.project AND s.name = configs.stage)",
            "DELETE FROM stage_syncs WHERE EXISTS (SELECT 1 FROM stages s \
             WHERE s.outpost = $1 AND s.project = stage_syncs.project \
             AND s.name = stage_syncs.stage)",
            "DELETE FROM component_controls WHERE EXISTS (SELECT 1 FROM stages s \
             WHERE s.outpost = $1 AND s.project = component_controls.project \
             AND s.name = component_controls.stage)",
            "DELETE FROM backups WHERE EXISTS (SELECT 1 FROM stages s \
             WHERE s.outpost = $1 AND s.project = backups.project AND s.name = backups.stage)",
            "DELETE FROM backup_schedules WHERE EXISTS (SELECT 1 FROM stages s \
             WHERE s.outpost = $1 AND s.project = backup_schedules.project \
             AND s.name = backup_schedules.stage)",
            "DELETE FROM stages WHERE outpost = $1",
            "DELETE FROM agent_updates WHERE outpost = $1",
            "DELETE FROM outpost_links WHERE outpost = $1",
            "DELETE FROM join_tokens WHERE outpost = $1",
            "DELETE FROM outposts WHERE name = $1",
        ] {
            q(sql)
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(backend(DOING))?;
        }
        self.commit(tx, DOING).await
    }

    async fn stages_on_outpost(&self, outpost: &str) -> Result<Vec<Stage>> {
        let mut tx = self.read().await?;
        stages_on_outpost_in(&mut *tx, outpost).await
    }

    async fn outpost_desired(
        &self,
        outpost: &str,
        held: &HashMap<StageKey, u64>,
    ) -> Result<Vec<OutpostStage>> {
        let mut tx = self.read().await?;
        let stages = stages_on_outpost_in(&mut *tx, outpost).await?;
        let mut listed = Vec::with_capacity(stages.len());
        for stage in stages {
            let key = (stage.project.clone(), stage.name.clone());
            let wanted = stage.desired_revision > held.get(&key).copied().unwrap_or(0);
            let desired = if wanted {
                Some(desired_parts_in(&mut *tx, &stage).await?)
            } else {
                None
            };
            listed.push(OutpostStage { stage, desired });
        }
        Ok(listed)
    }

    async fn outposts_desired(
        &self,
        asks: &[DesiredAsk],
    ) -> Result<Vec<Result<Vec<OutpostStage>>>> {
        if asks.len() <= 1 {
            let mut answers = Vec::with_capacity(asks.len());
            for ask in asks {
                answers.push(self.outpost_desired(&ask.outpost, &ask.held).await);
            }
            return Ok(answers);
        }
        let mut tx = self.read().await?;
        outposts_desired_in(&mut *tx, &B::DIALECT, asks).await
    }

    async fn rotate_outpost_uri(&self, name: &str) -> Result<Outpost> {
        const DOING: &str = "rotating an Outpost URI";
        let mut tx = self.write().await?;
        let changed = q("UPDATE outposts SET uri_generation = uri_generation + 1 WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(backend(DOING))?;
        if changed == 0 {
            return Err(not_found("outpost", name.to_owned()));
        }
        self.commit(tx, DOING).await?;
        self.get_outpost(name).await
    }

    async fn update_outpost(&self, name: &str, update: &OutpostUpdate) -> Result<Outpost> {
        const DOING: &str = "updating an outpost";
        let mut tx = self.write().await?;
        let row = q("SELECT ingress_domain FROM outposts WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await
            .map_err(backend(DOING))?;
        let Some(row) = row else {
            return Err(not_found("outpost", name.to_owned()));
        };
        let before: Option<String> = col(&row, "ingress_domain")?;
        let domain = update.ingress_domain.clone().unwrap_or(before.clone());
        q(
            "UPDATE outposts SET display_name = COALESCE($2, display_name), \
             description = COALESCE($3, description), ingress_domain = $4 WHERE name = $1",
        )
        .bind(name)
        .bind(&update.display_name)
        .bind(&update.description)
        .bind(&domain)
        .execute(&mut *tx)
        .await
        .map_err(backend(DOING))?;
        if domain != before {
            q("UPDATE stages SET desired_revision = desired_revision + 1 WHERE outpost = $1")
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(backend(DOING))?;
        }
        self.commit(tx, DOING).await?;
        self.get_outpost(name).await
    }

    async fn get_link_profile(&self, outpost: &str) -> Result<LinkProfile> {
        const DOING: &str = "reading an outpost's link profile";
        let row = q("SELECT link_profile FROM outposts WHERE name = $1")
            .bind(outpost)
            .fetch_optional(&mut *self.reader().await?)
            .await
            .map_err(backend(DOING))?
            .ok_or_else(|| not_found("outpost", outpost.to_owned()))?;
        Ok(opt_from_json(&row, "link_profile")?.unwrap_or_default())
    }

    async fn set_link_profile(&self, outpost: &str, profile: &LinkProfile) -> Result<LinkProfile> {
        const DOING: &str = "changing an outpost's link profile";
        // All defaults is stored as NULL, as before any profile was set.
        let text = if profile.is_default() {
            None
        } else {
            Some(json(profile)?)
        };
        let mut tx = self.write().await?;
        let changed = q("UPDATE outposts SET link_profile = $2 WHERE name = $1")
            .bind(outpost)
            .bind(&text)
            .execute(&mut *tx)
            .await
            .map_err(backend(DOING))?;
        if changed == 0 {
            return Err(not_found("outpost", outpost.to_owned()));
        }
        self.commit(tx, DOING).await?;
        Ok(profile.clone())
    }

    async fn list_link_profiles(&self) -> Result<Vec<(String, LinkProfile)>> {
        const DOING: &str = "reading the outposts' link profiles";
        let rows = q("SELECT name, link_profile FROM outposts \
                      WHERE link_profile IS NOT NULL ORDER BY name")
        .fetch_all(&mut *self.reader().await?)
        .await
        .map_err(backend(DOING))?;
        rows.iter()
            .map(|row| Ok((col(row, "name")?, from_json(row, "link_profile")?)))
            .collect()
    }

    async fn revoke_outpost(&self, name: &str, now: Timestamp) -> Result<Outpost> {
        const DOING: &str = "revoking an outpost";
        let mut tx = self.write().await?;
        let changed =
            q("UPDATE outposts SET revoked_at = COALESCE(revoked_at, $2) WHERE name = $1")
                .bind(name)
                .bind(millis(now))
                .execute(&mut *tx)
                .await
                .map_err(backend(DOING))?;
        if changed == 0 {
            return Err(not_found("outpost", name.to_owned()));
        }
        self.commit(tx, DOING).await?;
        self.get_outpost(name).await
    }

    async fn create_stage(&self, stage: &NewStage, now: Timestamp) -> Result<Stage> {
        const DOING: &str = "creating a stage";
        let mut tx = self.write().await?;
        require_project(&mut *tx, &stage.project).await?;
        if fetch_stage(&mut *tx, &stage.project, &stage.name)
            .await?
            .is_some()
        {
            return Err(StoreError::AlreadyExists {
                kind: "stage",
                name: wording::stage(&stage.project, &stage.name),
            });
        }
        let outpost = q("SELECT max_stages FROM outposts WHERE name = $1")
            .bind(&stage.outpost)
            .fetch_optional(&mut *tx)
            .await
            .map_err(backend(DOING))?
            .ok_or_else(|| not_found("outpost", stage.outpost.clone()))?;
        let max_stages: Option<i64> = col(&outpost, "max_stages")?;
        // Counted inside the write transaction, so two concurrent creations
        // cannot both take the last place.
        if let Some(max) = max_stages {
            let row = q("SELECT COUNT(*) AS held FROM stages WHERE outpost = $1")
                .bind(&stage.outpost)
                .fetch_one(&mut *tx)
                .await
                .map_err(backend(DOING))?;
            let held = count(&row, "held")?;
            let max = u32::try_from(max).map_err(|_| corrupt(format!("stage limit {max}")))?;
            if held >= u64::from(max) {
                return Err(wording::outpost_full(&stage.outpost, held, max));
            }
        }
        let created = Stage {
            project: stage.project.clone(),
            name: stage.name.clone(),
            stage_type: stage.stage_type,
            display_name: stage.display_name.clone(),
            suspended: false,
            outpost: stage.outpost.clone(),
            desired_revision: 0,
            latest_release: None,
            created_at: truncated(now),
            archived_at: None,
        };
        q(concat!(
            "INSERT INTO stages (",
            stage_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, NULL)"
        ))
        .bind(&created.project)
        .bind(&created.name)
        .bind(created.stage_type.as_str())
        .bind(&created.display_name)
        .bind(created.suspended)
        .bind(&created.outpost)
        .bind(int(created.desired_revision)?)
        .bind(None::<i64>)
        .bind(millis(now))
        .execute(&mut *tx)
        .await
        .map_err(insert_error(
            DOING,
            "stage",
            wording::stage(&stage.project, &stage.name),
        ))?;
        self.commit(tx, DOING).await?;
        Ok(created)
    }

    async fn get_stage(&self, project: &str, name: &str) -> Result<Stage> {
        let mut tx = self.read().await?;
        require_stage(&mut *tx, project, name).await
    }

    async fn list_stages(&self, project: &str) -> Result<Vec<Stage>> {
        let mut tx = self.read().await?;
        require_project(&mut *tx, project).await?;
        let rows = q(concat!(
            "SELECT ",
            stage_columns!(),
            " FROM stages WHERE project = $1 ORDER BY name"
        ))
        .bind(project)
        .fetch_all(&mut *tx)
        .await
        .map_err(backend("listing stages"))?;
        all(&rows, stage_from)
    }

    async fn list_archived_stages(&self, project: &str) -> Result<Vec<Stage>> {
        let mut tx = self.read().await?;
        require_project(&mut *tx, project).await?;
        let rows = q(concat!(
            "SELECT ",
            stage_columns!(),
            " FROM stages WHERE project = $1 AND archived_at IS NOT NULL ORDER BY name"
        ))
        .bind(project)
        .fetch_all(&mut *tx)
        .await
        .map_err(backend("listing archived stages"))?;
        all(&rows, stage_from)
    }

    async fn list_stage_summaries(
        &self,
        project: &str,
        which: StageFilter,
    ) -> Result<Vec<StageSummary>> {
        self.stage_summaries(project, which, None).await
    }

    async fn stage_summaries_named(
        &self,
        project: &str,
        names: &[String],
    ) -> Result<Vec<StageSummary>> {
        self.stage_summaries(project, StageFilter::All, Some(names))
            .await
    }

    async fn update_stage(&self, project: &str, name: &str, update: &StageUpdate) -> Result<Stage> {
        const DOING: &str = "updating a stage";
        let mut tx = self.write().await?;
        let mut stage = require_stage(&mut *tx, project, name).await?;
        update.apply(&mut stage);
        q(
            "UPDATE stages SET display_name = $1, suspended = $2, desired_revision = $3, \
             stage_type = $6 WHERE project = $4 AND name = $5",
        )
        .bind(&stage.display_name)
        .bind(stage.suspended)
        .bind(int(stage.desired_revision)?)
        .bind(project)
        .bind(name)
        .bind(stage.stage_type.as_str())
        .execute(&mut *tx)
        .await
        .map_err(backend(DOING))?;
        self.commit(tx, DOING).await?;
        Ok(stage)
    }

    async fn archive_stage(&self, project: &str, name: &str, now: Timestamp) -> Result<Stage> {
        const DOING: &str = "archiving a stage";
        let mut tx = self.write().await?;
        let mut stage = require_stage(&mut *tx, project, name).await?;
        if stage.archived_at.is_some() {
            return Ok(stage);
        }
        stage.archived_at = Some(truncated(now));
        stage.desired_revision += 1;
        q(
            "UPDATE stages SET archived_at = $3, desired_revision = desired_revision + 1 \
             WHERE project = $1 AND name = $2",
        )
        .bind(project)
        .bind(name)
        .bind(millis(now))
        .execute(&mut *tx)
        .await
        .map_err(backend(DOING))?;
        self.commit(tx, DOING).await?;
        Ok(stage)
    }

    async fn restore_stage(&self, project: &str, name: &str) -> Result<Stage> {
        const DOING: &str = "restoring a stage";
        let mut tx = self.write().await?;
        let mut stage = require_stage(&mut *tx, project, name).await?;
        if stage.archived_at.is_none() {
            return Ok(stage);
        }
        if fetch_project(&mut *tx, project)
            .await?
            .archived_at
            .is_some()
        {
            return Err(wording::project_archived(project));
        }
        stage.archived_at = None;
        stage.desired_revision += 1;
        q(
            "UPDATE stages SET archived_at = NULL, desired_revision = desired_revision + 1 \
             WHERE project = $1 AND name = $2",
        )
        .bind(project)
        .bind(name)
        .execute(&mut *tx)
        .await
        .map_err(backend(DOING))?;
        self.commit(tx, DOING).await?;
        Ok(stage)
    }

    async fn delete_stage(&self, project: &str, name: &str, force: bool) -> Result<()> {
        const DOING: &str = "deleting a stage";
        let mut tx = self.write().await?;
        require_stage(&mut *tx, project, name).await?;
        let row = q(
            "SELECT (SELECT COUNT(*) FROM releases WHERE project = $1 AND stage = $2) AS releases, \
                    (SELECT COUNT(*) FROM configs WHERE project = $1 AND stage = $2) AS configs",
        )
        .bind(project)
        .bind(name)
        .fetch_one(&mut *tx)
        .await
        .map_err(backend(DOING))?;
        let (releases, configs) = (count(&row, "releases")?, count(&row, "configs")?);
        if !force && (releases > 0 || configs > 0) {
            return Err(wording::stage_in_use(project, name, releases, configs));
        }
        for sql in [
            "DELETE FROM releases WHERE project = $1 AND stage = $2",
            "DELETE FROM configs WHERE project = $1 AND stage = $2",
            "DELETE FROM stage_syncs WHERE project = $1 AND stage = $2",
            "DELETE FROM component_controls WHERE project = $1 AND stage = $2",
            "DELETE FROM backups WHERE project = $1 AND stage = $2",
            "DELETE FROM backup_schedules WHERE project = $1 AND stage = $2",
            "DELETE FROM stages WHERE project = $1 AND name = $2",
        ] {
            q(sql)
                .bind(project)
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(backend(DOING))?;
        }
        self.commit(tx, DOING).await
    }

    async fn list_component_controls(
        &self,
        project: &str,
        stage: &str,
    ) -> Result<Vec<ComponentControl>> {
        let mut tx = self.read().await?;
        require_stage(&mut *tx, project, stage).await?;
        let rows = q(
            "SELECT component, stopped, killed, restarts FROM component_controls \
             WHERE project = $1 AND stage = $2 ORDER BY component",
        )
        .bind(project)
        .bind(stage)
        .fetch_all(&mut *tx)
        .await
        .map_err(backend("listing component controls"))?;
        all(&rows, control_from)
    }

    async fn control_component(
        &self,
        project: &str,
        stage: &str,
        component: &str,
        action: ComponentAction,
    ) -> Result<ControlOutcome> {
        const DOING: &str = "changing a component's control";
        let mut tx = self.write().await?;
        let mut record = require_stage(&mut *tx, project, stage).await?;
        let current = q(
            "SELECT component, stopped, killed, restarts FROM component_controls \
             WHERE project = $1 AND stage = $2 AND component = $3",
        )
        .bind(project)
        .bind(stage)
        .bind(component)
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend(DOING))?
        .as_ref()
        .map(control_from)
        .transpose()?
        .unwrap_or_else(|| ComponentControl {
            component: component.to_owned(),
            ..ComponentControl::default()
        });
        let (control, changed) = action.apply(&current);
        if changed {
            q("INSERT INTO component_controls \
                 (project, stage, component, stopped, killed, restarts) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (project, stage, component) DO UPDATE SET \
                 stopped = excluded.stopped, killed = excluded.killed, \
                 restarts = excluded.restarts")
            .bind(project)
            .bind(stage)
            .bind(component)
            .bind(control.stopped)
            .bind(control.killed)
            .bind(int(control.restarts)?)
            .execute(&mut *tx)
            .await
            .map_err(backend(DOING))?;
            record.desired_revision += 1;
            q("UPDATE stages SET desired_revision = $1 WHERE project = $2 AND name = $3")
                .bind(int(record.desired_revision)?)
                .bind(project)
                .bind(stage)
                .execute(&mut *tx)
                .await
                .map_err(backend(DOING))?;
            self.commit(tx, DOING).await?;
        }
        Ok(ControlOutcome {
            stage: record,
            control,
            changed,
        })
    }

    async fn create_build(
        &self,
        project: &str,
        build: &NewBuild,
        created_by: &str,
        now: Timestamp,
    ) -> Result<Build> {
        const DOING: &str = "recording a build";
        let mut tx = self.write().await?;
        let last = q("SELECT last_build FROM projects WHERE name = $1")
            .bind(project)
            .fetch_optional(&mut *tx)
            .await
            .map_err(backend(DOING))?
            .ok_or_else(|| not_found("project", project.to_owned()))?;
        let number = count(&last, "last_build")? + 1;
        let created = Build {
            project: project.to_owned(),
            name: build_name(&build.branch, number),
            number,
            branch: build.branch.clone(),
            commit: build.commit.clone(),
            manifest_file: build.manifest_file.clone(),
            manifest: build.manifest.clone(),
            components: build.components.clone(),
            created_at: truncated(now),
            created_by: created_by.to_owned(),
        };
        q("UPDATE projects SET last_build = $1 WHERE name = $2")
            .bind(int(number)?)
            .bind(project)
            .execute(&mut *tx)
            .await
            .map_err(backend(DOING))?;
        q(concat!(
            "INSERT INTO builds (",
            build_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        ))
        .bind(&created.project)
        .bind(&created.name)
        .bind(int(number)?)
        .bind(&created.branch)
        .bind(&created.commit)
        .bind(&created.manifest_file)
        .bind(&created.manifest)
        .bind(json(&created.components)?)
        .bind(millis(now))
        .bind(&created.created_by)
        .execute(&mut *tx)
        .await
        .map_err(insert_error(
            DOING,
            "build",
            wording::build(project, &created.name),
        ))?;
        self.commit(tx, DOING).await?;
        Ok(created)
    }

    async fn get_build(&self, project: &str, name: &str) -> Result<Build> {
        let mut tx = self.read().await?;
        let row = q(concat!(
            "SELECT ",
            build_columns!(),
            " FROM builds WHERE project = $1 AND name = $2"
        ))
        .bind(project)
        .bind(name)
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend("looking up a build"))?;
        match row {
            Some(row) => build_from(&row),
            None => {
                require_project(&mut *tx, project).await?;
                Err(not_found("build", wording::build(project, name)))
            }
        }
    }

    async fn list_builds(&self, project: &str) -> Result<Vec<Build>> {
        let mut tx = self.read().await?;
        require_project(&mut *tx, project).await?;
        let rows = q(concat!(
            "SELECT ",
            build_columns!(),
            " FROM builds WHERE project = $1 ORDER BY number DESC"
        ))
        .bind(project)
        .fetch_all(&mut *tx)
        .await
        .map_err(backend("listing builds"))?;
        all(&rows, build_from)
    }

    async fn delete_build(&self, project: &str, name: &str) -> Result<()> {
        const DOING: &str = "deleting a build";
        let mut tx = self.write().await?;
        require_project(&mut *tx, project).await?;
        if !exists(
            &mut *tx,
            "SELECT 1 FROM builds WHERE project = $1 AND name = $2",
            &[project, name],
            DOING,
        )
        .await?
        {
            return Err(not_found("build", wording::build(project, name)));
        }
        let users = q("SELECT stage, COUNT(*) AS releases FROM releases \
             WHERE project = $1 AND build = $2 GROUP BY stage ORDER BY stage")
        .bind(project)
        .bind(name)
        .fetch_all(&mut *tx)
        .await
        .map_err(backend(DOING))?;
        if !users.is_empty() {
            let mut releases = 0;
            let mut stages = Vec::with_capacity(users.len());
            for row in &users {
                releases += count(row, "releases")?;
                stages.push(col::<String, _>(row, "stage")?);
            }
            return Err(wording::build_in_use(project, name, releases, &stages));
        }
        q("DELETE FROM builds WHERE project = $1 AND name = $2")
            .bind(project)
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(backend(DOING))?;
        self.commit(tx, DOING).await
    }

    async fn add_config_data(
        &self,
        project: &str,
        stage: &str,
        name: &str,
        data: &ConfigData,
        now: Timestamp,
    ) -> Result<Config> {
        const DOING: &str = "updating a config";
        let mut tx = self.write().await?;
        require_stage(&mut *tx, project, stage).await?;
        let existing = fetch_config(&mut *tx, project, stage, name).await?;
        let (version, merged) = match existing {
            Some(existing) => {
                let mut merged = existing.data;
                merged.env.extend(data.env.clone());
                merged.files.extend(data.files.clone());
                (existing.version + 1, merged)
            }
            None => (1, data.clone()),
        };
        q(concat!(
            "INSERT INTO configs (",
            config_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (project, stage, name) DO UPDATE SET \
             version = excluded.version, env = excluded.env, files = excluded.files, \
             updated_at = excluded.updated_at"
        ))
        .bind(project)
        .bind(stage)
        .bind(name)
        .bind(int(version)?)
        .bind(json(&merged.env)?)
        .bind(json(&merged.files)?)
        .bind(millis(now))
        .execute(&mut *tx)
        .await
        .map_err(backend(DOING))?;
        self.commit(tx, DOING).await?;
        Ok(Config {
            project: project.to_owned(),
            stage: stage.to_owned(),
            name: name.to_owned(),
            version,
            data: merged,
            updated_at: truncated(now),
        })
    }

    async fn remove_config_keys(
        &self,
        project: &str,
        stage: &str,
        name: &str,
        keys: &[String],
        now: Timestamp,
    ) -> Result<Config> {
        const DOING: &str = "removing keys from a config";
        let mut tx = self.write().await?;
        let existing = fetch_config(&mut *tx, project, stage, name).await?;
        let Some(mut config) = existing else {
            require_stage(&mut *tx, project, stage).await?;
            return Err(not_found("config", wording::config(project, stage, name)));
        };
        wording::remove_keys(&mut config.data, keys, project, stage, name)?;
        config.version += 1;
        config.updated_at = truncated(now);
        q(
            "UPDATE configs SET version = $4, env = $5, files = $6, updated_at = $7 \
             WHERE project = $1 AND stage = $2 AND name = $3",
        )
        .bind(project)
        .bind(stage)
        .bind(name)
        .bind(int(config.version)?)
        .bind(json(&config.data.env)?)
        .bind(json(&config.data.files)?)
        .bind(millis(now))
        .execute(&mut *tx)
        .await
        .map_err(backend(DOING))?;
        self.commit(tx, DOING).await?;
        Ok(config)
    }

    async fn get_config(&self, project: &str, stage: &str, name: &str) -> Result<Config> {
        let mut tx = self.read().await?;
        match fetch_config(&mut *tx, project, stage, name).await? {
            Some(config) => Ok(config),
            None => {
                require_stage(&mut *tx, project, stage).await?;
                Err(not_found("config", wording::config(project, stage, name)))
            }
        }
    }

    async fn list_configs(&self, project: &str, stage: Option<&str>) -> Result<Vec<Config>> {
        const DOING: &str = "listing configs";
        let mut tx = self.read().await?;
        let rows = match stage {
            Some(stage) => {
                require_stage(&mut *tx, project, stage).await?;
                q(concat!(
                    "SELECT ",
                    config_columns!(),
                    " FROM configs WHERE project = $1 AND stage = $2 ORDER BY name"
                ))
                .bind(project)
                .bind(stage)
                .fetch_all(&mut *tx)
                .await
                .map_err(backend(DOING))?
            }
            None => {
                require_project(&mut *tx, project).await?;
                q(concat!(
                    "SELECT ",
                    config_columns!(),
                    " FROM configs WHERE project = $1 ORDER BY stage, name"
                ))
                .bind(project)
                .fetch_all(&mut *tx)
                .await
                .map_err(backend(DOING))?
            }
        };
        all(&rows, config_from)
    }

    async fn delete_config(&self, project: &str, stage: &str, name: &str) -> Result<()> {
        const DOING: &str = "deleting a config";
        let mut tx = self.write().await?;
        require_stage(&mut *tx, project, stage).await?;
        let deleted = q("DELETE FROM configs WHERE project = $1 AND stage = $2 AND name = $3")
            .bind(project)
            .bind(stage)
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(backend(DOING))?;
        if deleted == 0 {
            return Err(not_found("config", wording::config(project, stage, name)));
        }
        self.commit(tx, DOING).await
    }

    async fn push_release(&self, release: &NewRelease, now: Timestamp) -> Result<Release> {
        let mut tx = self.write().await?;
        let (created, _outpost) = release_in(&mut *tx, release, now).await?;
        self.commit(tx, RECORDING_RELEASE).await?;
        Ok(created)
    }

    async fn push_releases(
        &self,
        releases: &[NewRelease],
        now: Timestamp,
    ) -> Result<PushedReleases> {
        let mut tx = self.write().await?;
        // An error drops the transaction: none of the releases is kept.
        let created = releases_in(&mut *tx, &B::DIALECT, releases, now).await?;
        self.commit(tx, RECORDING_RELEASE).await?;
        Ok(created)
    }

    async fn get_release(&self, project: &str, stage: &str, number: u64) -> Result<Release> {
        let mut tx = self.read().await?;
        let row = q(concat!(
            "SELECT ",
            release_columns!(),
            " FROM releases WHERE project = $1 AND stage = $2 AND number = $3"
        ))
        .bind(project)
        .bind(stage)
        // Numbers beyond what the database holds name no release.
        .bind(i64::try_from(number).unwrap_or(-1))
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend("looking up a release"))?;
        match row {
            Some(row) => release_from(&row),
            None => {
                require_stage(&mut *tx, project, stage).await?;
                Err(not_found(
                    "release",
                    wording::release(project, stage, number),
                ))
            }
        }
    }

    async fn list_releases(&self, project: &str, stage: &str) -> Result<Vec<Release>> {
        let mut tx = self.read().await?;
        require_stage(&mut *tx, project, stage).await?;
        let rows = q(concat!(
            "SELECT ",
            release_columns!(),
            " FROM releases WHERE project = $1 AND stage = $2 ORDER BY number DESC"
        ))
        .bind(project)
        .bind(stage)
        .fetch_all(&mut *tx)
        .await
        .map_err(backend("listing releases"))?;
        all(&rows, release_from)
    }

    async fn create_join_token(
        &self,
        token_hash: &str,
        outpost: &str,
        expires_at: Timestamp,
    ) -> Result<()> {
        const DOING: &str = "creating a join token";
        let mut tx = self.write().await?;
        require_outpost(&mut *tx, outpost).await?;
        q(
            "INSERT INTO join_tokens (token_hash, outpost, expires_at, used_at) \
             VALUES ($1, $2, $3, NULL)",
        )
        .bind(token_hash)
        .bind(outpost)
        .bind(millis(expires_at))
        .execute(&mut *tx)
        .await
        .map_err(insert_error(DOING, "join token", token_hash.to_owned()))?;
        self.commit(tx, DOING).await
    }

    async fn consume_join_token(
        &self,
        token_hash: &str,
        now: Timestamp,
    ) -> Result<Result<String, JoinTokenRefusal>> {
        const DOING: &str = "using a join token";
        let now = millis(now);
        let mut tx = self.write().await?;
        let Some(row) =
            q("SELECT outpost, expires_at, used_at FROM join_tokens WHERE token_hash = $1")
                .bind(token_hash)
                .fetch_optional(&mut *tx)
                .await
                .map_err(backend(DOING))?
        else {
            return Ok(Err(JoinTokenRefusal::Unknown));
        };
        let used_at: Option<i64> = col(&row, "used_at")?;
        let expires_at: i64 = col(&row, "expires_at")?;
        if used_at.is_some() {
            return Ok(Err(JoinTokenRefusal::AlreadyUsed));
        }
        if now >= expires_at {
            return Ok(Err(JoinTokenRefusal::Expired));
        }
        // Conditional, so that a token is used once even where writers are
        // not serialized as they are here (PostgreSQL re-checks the
        // condition against a concurrent update).
        let used =
            q("UPDATE join_tokens SET used_at = $1 WHERE token_hash = $2 AND used_at IS NULL")
                .bind(now)
                .bind(token_hash)
                .execute(&mut *tx)
                .await
                .map_err(backend(DOING))?;
        if used == 0 {
            return Ok(Err(JoinTokenRefusal::AlreadyUsed));
        }
        let outpost: String = col(&row, "outpost")?;
        self.commit(tx, DOING).await?;
        Ok(Ok(outpost))
    }

    async fn list_outpost_links(&self) -> Result<Vec<OutpostLink>> {
        let rows = q(concat!(
            "SELECT ",
            link_columns!(),
            " FROM outpost_links ORDER BY outpost"
        ))
        .fetch_all(&mut *self.reader().await?)
        .await
        .map_err(backend("listing outposts' links"))?;
        all(&rows, link_from)
    }

    async fn get_outpost_link(&self, outpost: &str) -> Result<OutpostLink> {
        let mut tx = self.read().await?;
        let row = q(concat!(
            "SELECT ",
            link_columns!(),
            " FROM outpost_links WHERE outpost = $1"
        ))
        .bind(outpost)
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend("looking up an outpost's link"))?;
        match row {
            Some(row) => link_from(&row),
            None => {
                require_outpost(&mut *tx, outpost).await?;
                Ok(OutpostLink {
                    outpost: outpost.to_owned(),
                    ..OutpostLink::default()
                })
            }
        }
    }

    async fn get_outpost_and_link(&self, name: &str) -> Result<(Outpost, OutpostLink)> {
        // One statement, so no transaction: the two tables share no column
        // name, and the link's are NULL before the agent joined.
        let row = q(concat!(
            "SELECT ",
            outpost_columns!(),
            ", ",
            link_columns!(),
            " FROM outposts LEFT JOIN outpost_links ON outpost_links.outpost = outposts.name \
             WHERE outposts.name = $1"
        ))
        .bind(name)
        .fetch_optional(&mut *self.reader().await?)
        .await
        .map_err(backend("looking up an outpost and its link"))?
        .ok_or_else(|| not_found("outpost", name.to_owned()))?;
        let joined: Option<String> = col(&row, "outpost")?;
        let link = match joined {
            Some(_) => link_from(&row)?,
            None => OutpostLink {
                outpost: name.to_owned(),
                ..OutpostLink::default()
            },
        };
        Ok((outpost_from(&row)?, link))
    }

    async fn put_outpost_link(&self, link: &OutpostLink) -> Result<()> {
        const DOING: &str = "recording an outpost's link";
        let agent = link.agent.as_ref().map(json).transpose()?;
        let mut tx = self.write().await?;
        require_outpost(&mut *tx, &link.outpost).await?;
        q(concat!(
            "INSERT INTO outpost_links (",
            link_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (outpost) DO UPDATE SET \
             key_fingerprint = excluded.key_fingerprint, cert_serial = excluded.cert_serial, \
             cert_not_after = excluded.cert_not_after, agent = excluded.agent, \
             last_seen = excluded.last_seen, last_disconnect = excluded.last_disconnect"
        ))
        .bind(&link.outpost)
        .bind(&link.key_fingerprint)
        .bind(&link.cert_serial)
        .bind(link.cert_not_after.map(millis))
        .bind(agent)
        .bind(link.last_seen.map(millis))
        .bind(&link.last_disconnect)
        .execute(&mut *tx)
        .await
        .map_err(backend(DOING))?;
        self.commit(tx, DOING).await
    }

    async fn record_link_activity(&self, activity: &[LinkActivity]) -> Result<()> {
        const DOING: &str = "recording what outpost links saw";
        if activity.is_empty() {
            return Ok(());
        }
        // One transaction (one fsync) and two statements for the whole
        // batch, whatever its size: a fleet linking after a hub restart
        // brings hundreds of these a second, and on PostgreSQL each
        // statement is a round trip made while holding the write lock.
        let rows = merged_activity(activity)?;
        let d = &B::DIALECT;
        let field = |f: &str| d.json_field("value", f);
        let insert = format!(
            "INSERT INTO outpost_links (outpost) SELECT {o} FROM {rows} \
             WHERE EXISTS (SELECT 1 FROM outposts WHERE name = {o}) \
             ON CONFLICT (outpost) DO NOTHING",
            o = field("outpost"),
            rows = d.json_rows("$1"),
        );
        let update = format!(
            "UPDATE outpost_links SET \
             last_seen = {greatest}(COALESCE(outpost_links.last_seen, 0), a.seen), \
             agent = COALESCE(a.agent, outpost_links.agent), \
             cert_serial = COALESCE(a.cert_serial, outpost_links.cert_serial), \
             cert_not_after = COALESCE(a.cert_not_after, outpost_links.cert_not_after), \
             last_disconnect = COALESCE(a.disconnect, outpost_links.last_disconnect) \
             FROM (SELECT {o} AS outpost, CAST({seen} AS BIGINT) AS seen, {agent} AS agent, \
             {serial} AS cert_serial, CAST({not_after} AS BIGINT) AS cert_not_after, \
             {disconnect} AS disconnect FROM {rows}) AS a \
             WHERE outpost_links.outpost = a.outpost",
            greatest = d.greatest,
            o = field("outpost"),
            seen = field("seen"),
            agent = field("agent"),
            serial = field("cert_serial"),
            not_after = field("cert_not_after"),
            disconnect = field("disconnect"),
            rows = d.json_rows("$1"),
        );
        let mut tx = self.write().await?;
        for statement in [&insert, &update] {
            q(statement)
                .bind(&rows)
                .execute(&mut *tx)
                .await
                .map_err(backend(DOING))?;
        }
        self.commit(tx, DOING).await
    }

    async fn get_stage_sync(&self, project: &str, stage: &str) -> Result<StageSync> {
        let mut tx = self.read().await?;
        match fetch_sync(&mut *tx, project, stage).await? {
            Some(sync) => Ok(sync),
            None => {
                require_stage(&mut *tx, project, stage).await?;
                Ok(no_sync(project, stage))
            }
        }
    }

    async fn record_delivered(
        &self,
        project: &str,
        stage: &str,
        revision: u64,
        now: Timestamp,
    ) -> Result<StageSync> {
        let update = SyncUpdate::Delivered {
            project: project.to_owned(),
            stage: stage.to_owned(),
            revision,
        };
        self.record_one_sync(update, now, "recording a delivery")
            .await
    }

    async fn record_status(
        &self,
        project: &str,
        stage: &str,
        applied_revision: u64,
        failed_revision: Option<u64>,
        report: &serde_json::Value,
        now: Timestamp,
    ) -> Result<StageSync> {
        let update = SyncUpdate::Status {
            project: project.to_owned(),
            stage: stage.to_owned(),
            applied_revision,
            failed_revision,
            report: report.clone(),
        };
        self.record_one_sync(update, now, "recording a stage's status")
            .await
    }

    async fn record_sync_batch(
        &self,
        updates: &[SyncUpdate],
        now: Timestamp,
    ) -> Result<Vec<Result<StageSync>>> {
        let mut tx = self.write().await?;
        let answers = sync_batch::sync_batch_in(&mut *tx, &B::DIALECT, updates, now).await?;
        self.commit(tx, "recording stages' sync").await?;
        Ok(answers)
    }

    fn changes(&self) -> Option<ChangeFeed> {
        self.backend.changes()
    }

    fn is_shared(&self) -> bool {
        self.backend.is_shared()
    }

    fn pool_stats(&self) -> Option<PoolStats> {
        self.backend.pool_stats()
    }

    async fn beat_instance(&self, instance: &Instance) -> Result<()> {
        self.backend.beat_instance(instance).await
    }

    async fn instances(&self) -> Result<Vec<Instance>> {
        self.backend.instances().await
    }

    async fn forget_instance(&self, id: &str) -> Result<()> {
        self.backend.forget_instance(id).await
    }

    async fn claim_links(
        &self,
        instance: &str,
        outposts: &[String],
        now: Timestamp,
    ) -> Result<Vec<u64>> {
        self.backend.claim_links(instance, outposts, now).await
    }

    async fn release_link(
        &self,
        instance: &str,
        outpost: &str,
        epoch: u64,
        now: Timestamp,
    ) -> Result<()> {
        self.backend
            .release_link(instance, outpost, epoch, now)
            .await
    }

    async fn link_claims(&self, instance: Option<&str>) -> Result<Vec<LinkClaim>> {
        self.backend.link_claims(instance).await
    }

    async fn link_claim(&self, outpost: &str) -> Result<Option<LinkClaim>> {
        self.backend.link_claim(outpost).await
    }

    async fn lock_job(&self, job: &str) -> Result<Option<JobLock>> {
        self.backend.lock_job(job).await
    }

    async fn cluster_secret(&self, name: &str, offer: &str) -> Result<String> {
        self.backend.cluster_secret(name, offer).await
    }
}

/// What a timestamp reads back as: the database keeps milliseconds.
fn truncated(t: Timestamp) -> Timestamp {
    DateTime::from_timestamp_millis(millis(t)).unwrap_or(t)
}

/// The records numbered by the hub rather than by the database: backups
/// and rollouts. Their numbers are never given twice, even after the
/// newest record was deleted.
#[derive(Clone, Copy)]
enum IdCounter {
    Backups,
    Rollouts,
    AgentUpdates,
}

/// The next number of `counter`'s records: one above both the largest in
/// use and the last handed out, which it records. Writers are serial (see
/// the module docs), so no two get the same.
/// Every update of request `batch`, by id.
async fn agent_update_batch_in<C: Conn + ?Sized>(
    c: &mut C,
    batch: u64,
    doing: &'static str,
) -> Result<Vec<AgentUpdate>> {
    let rows = q("SELECT record FROM agent_updates WHERE batch = $1 ORDER BY id")
        .bind(int(batch)?)
        .fetch_all(&mut *c)
        .await
        .map_err(backend(doing))?;
    rows.iter().map(|row| from_json(row, "record")).collect()
}

/// Writes back an update whose state changed.
async fn save_agent_update<C: Conn + ?Sized>(
    c: &mut C,
    record: &AgentUpdate,
    doing: &'static str,
) -> Result<()> {
    q("UPDATE agent_updates SET state = $2, record = $3 WHERE id = $1")
        .bind(int(record.id)?)
        .bind(record.state.as_str())
        .bind(json(record)?)
        .execute(&mut *c)
        .await
        .map_err(backend(doing))?;
    Ok(())
}

/// The outpost's agent update still under way, if any.
async fn open_agent_update_in<C: Conn + ?Sized>(
    c: &mut C,
    outpost: &str,
    doing: &'static str,
) -> Result<Option<AgentUpdate>> {
    q("SELECT record FROM agent_updates WHERE outpost = $1 \
       AND state IN ('waiting', 'pending', 'fetching', 'restarting') ORDER BY id DESC")
    .bind(outpost)
    .fetch_optional(&mut *c)
    .await
    .map_err(backend(doing))?
    .as_ref()
    .map(|row| from_json(row, "record"))
    .transpose()
}

async fn next_id_in<C: Conn + ?Sized>(
    c: &mut C,
    counter: IdCounter,
    doing: &'static str,
) -> Result<u64> {
    let (largest, name) = match counter {
        IdCounter::Backups => (
            "SELECT COALESCE(MAX(id), 0) AS last FROM backups",
            "backups",
        ),
        IdCounter::Rollouts => (
            "SELECT COALESCE(MAX(id), 0) AS last FROM rollouts",
            "rollouts",
        ),
        IdCounter::AgentUpdates => (
            "SELECT COALESCE(MAX(id), 0) AS last FROM agent_updates",
            "agent_updates",
        ),
    };
    let row = q(largest)
        .fetch_one(&mut *c)
        .await
        .map_err(backend(doing))?;
    let handed = q("SELECT last FROM id_counters WHERE name = $1")
        .bind(name)
        .fetch_optional(&mut *c)
        .await
        .map_err(backend(doing))?
        .map(|row| count(&row, "last"))
        .transpose()?
        .unwrap_or(0);
    let id = count(&row, "last")?.max(handed) + 1;
    q("INSERT INTO id_counters (name, last) VALUES ($1, $2) \
       ON CONFLICT (name) DO UPDATE SET last = excluded.last")
    .bind(name)
    .bind(int(id)?)
    .execute(&mut *c)
    .await
    .map_err(backend(doing))?;
    Ok(id)
}
