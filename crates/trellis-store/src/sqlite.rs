//! The hub's default store: one SQLite database file in the data directory.
//!
//! Durability comes first: the database runs in WAL mode with
//! `synchronous=FULL`, so a call that returned has its transaction fsynced
//! and survives SIGKILL or power loss. The schema is versioned by the
//! migrations in `migrations/`, embedded at compile time and applied on
//! open.
//!
//! Two pools share the file. All writes go through a pool of exactly one
//! connection: SQLite admits one writer at a time anyway, and a transaction
//! that reads before it writes (every check-then-act operation here) could
//! otherwise fail with `SQLITE_BUSY` when upgrading its read lock, which no
//! busy timeout can wait out. Reads use a separate pool, marked
//! `query_only`, and see the last committed state without waiting for the
//! writer (WAL readers never block).
//!
//! The SQL sticks to what PostgreSQL accepts too (`$n` parameters,
//! `ON CONFLICT … DO UPDATE`, standard types) so the planned PostgreSQL
//! backend can share it.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::DateTime;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};
use trellis_model::{
    AccessKeyInfo, AuditEntry, NewAuditEntry, Build, ComponentAction, ComponentControl, Config, ConfigData, Member, NewBuild,
    Outpost, OutpostLink, Project, Release, ReleaseState, Role, Stage, StageSync, Timestamp, User,
    build_name,
};

use crate::{
    ControlOutcome, DesiredParts, JoinTokenRefusal, LinkActivity, NewRelease, NewStage,
    OutpostStage, OutpostUpdate, PushedReleases, Result, StageFilter, StageKey, StageSummary,
    StageUpdate, Store, StoreError, StoredAccessKey, SyncUpdate, wording,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Long enough to ride out a WAL checkpoint or a slow disk, short enough
/// that a wedged database surfaces as an error instead of a hung request.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Concurrent readers; the hub's read load is small and each connection
/// costs a thread.
const READERS: u32 = 4;

/// Rows a connection's worker thread hands over before it waits for the
/// reading task to take them. sqlx's default (50) makes a 10,000-row read
/// wait 200 times for the task to be polled again, which on a busy hub
/// means 200 trips to the back of the runtime's queue while the
/// connection stays taken.
const ROW_BUFFER: usize = 4096;

/// The SQLite store. Cloning is not offered: open it once and share it
/// behind an `Arc<dyn Store>`.
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
}

impl SqliteStore {
    /// Opens the database at `path`, creating the file if it is missing, and
    /// brings its schema up to date. The directory must exist.
    pub async fn open(path: &Path) -> Result<SqliteStore> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .foreign_keys(true)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .row_buffer_size(ROW_BUFFER);
        let writer = pool_options()
            .max_connections(1)
            .connect_with(
                options
                    .clone()
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal),
            )
            .await
            .map_err(backend("opening the database"))?;
        MIGRATOR
            .run(&writer)
            .await
            .map_err(|e| StoreError::Backend {
                doing: "bringing the database schema up to date",
                source: Box::new(e),
            })?;
        // Opened only after the writer has switched the file to WAL (a
        // persistent setting), so readers never race it for that.
        let reader = pool_options()
            .max_connections(READERS)
            .connect_with(options.pragma("query_only", "ON"))
            .await
            .map_err(backend("opening the database for reading"))?;
        Ok(SqliteStore { writer, reader })
    }

    /// Closes every connection, waiting for those in use. Not needed for
    /// durability (every call already committed), but it lets SQLite
    /// checkpoint the WAL into the database file and remove it.
    pub async fn close(&self) {
        // The last connection to close does the checkpoint; let it be the
        // writer.
        self.reader.close().await;
        self.writer.close().await;
    }

    async fn write(&self) -> Result<Transaction<'static, Sqlite>> {
        self.writer
            .begin()
            .await
            .map_err(backend("starting a transaction"))
    }

    /// A read transaction, for reads of several statements that must agree
    /// with each other.
    async fn read(&self) -> Result<Transaction<'static, Sqlite>> {
        self.reader
            .begin()
            .await
            .map_err(backend("starting a read"))
    }
}

fn pool_options() -> SqlitePoolOptions {
    // A call waiting seconds for a connection is what a link storm looks
    // like (the hub admits links at a bounded rate and their reads queue);
    // at sqlx's default `warn` every such wait is a log line, 100 MB of
    // them in one 15,000-outpost storm. Failures still surface as errors.
    SqlitePoolOptions::new().acquire_slow_level(log::LevelFilter::Debug)
}

async fn commit(tx: Transaction<'static, Sqlite>, doing: &'static str) -> Result<()> {
    tx.commit().await.map_err(backend(doing))
}

fn backend(doing: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
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

fn int(n: u64) -> Result<i64> {
    i64::try_from(n).map_err(|e| StoreError::Backend {
        doing: "storing a number",
        source: Box::new(e),
    })
}

fn millis(t: Timestamp) -> i64 {
    t.timestamp_millis()
}

fn json<T: Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| StoreError::Backend {
        doing: "encoding a record",
        source: Box::new(e),
    })
}

fn audit_entry(id: u64, entry: &NewAuditEntry) -> AuditEntry {
    AuditEntry {
        id,
        time: entry.time,
        user: entry.user.clone(),
        project: entry.project.clone(),
        stage: entry.stage.clone(),
        component: entry.component.clone(),
        outpost: entry.outpost.clone(),
        action: entry.action.clone(),
        detail: entry.detail.clone(),
        result: entry.result.clone(),
    }
}

// --- decoding ---
//
// A failure here means the database holds something this code never wrote
// (corruption or a foreign edit), so it is a backend error, not a rule.

const READING: &str = "reading a stored record";

fn corrupt(what: String) -> StoreError {
    StoreError::Backend {
        doing: READING,
        source: what.into(),
    }
}

fn col<'r, T>(row: &'r SqliteRow, name: &str) -> Result<T>
where
    T: sqlx::Decode<'r, Sqlite> + sqlx::Type<Sqlite>,
{
    row.try_get(name).map_err(backend(READING))
}

fn unsigned(n: i64) -> Result<u64> {
    u64::try_from(n).map_err(|_| corrupt(format!("negative count {n}")))
}

fn count(row: &SqliteRow, name: &str) -> Result<u64> {
    unsigned(col(row, name)?)
}

fn time(row: &SqliteRow, name: &str) -> Result<Timestamp> {
    let ms: i64 = col(row, name)?;
    DateTime::from_timestamp_millis(ms)
        .ok_or_else(|| corrupt(format!("timestamp {ms} in column {name} is out of range")))
}

fn parsed<T: FromStr<Err = String>>(row: &SqliteRow, name: &str) -> Result<T> {
    let text: String = col(row, name)?;
    text.parse().map_err(corrupt)
}

fn from_json<T: DeserializeOwned>(row: &SqliteRow, name: &str) -> Result<T> {
    let text: String = col(row, name)?;
    decode_json(&text)
}

/// A nullable JSON column.
fn opt_from_json<T: DeserializeOwned>(row: &SqliteRow, name: &str) -> Result<Option<T>> {
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
        "name, description, created_at"
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
         latest_release, created_at"
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

fn user_from(row: &SqliteRow) -> Result<User> {
    Ok(User {
        name: col(row, "name")?,
        admin: col(row, "admin")?,
        created_at: time(row, "created_at")?,
    })
}

fn key_from(row: &SqliteRow) -> Result<StoredAccessKey> {
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

fn project_from(row: &SqliteRow) -> Result<Project> {
    Ok(Project {
        name: col(row, "name")?,
        description: col(row, "description")?,
        created_at: time(row, "created_at")?,
    })
}

fn outpost_from(row: &SqliteRow) -> Result<Outpost> {
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

fn u64_col(row: &SqliteRow, name: &str) -> Result<u64> {
    let n: i64 = col(row, name)?;
    u64::try_from(n).map_err(|_| corrupt(format!("{name} {n}")))
}

fn opt_time(row: &SqliteRow, name: &str) -> Result<Option<Timestamp>> {
    let ms: Option<i64> = col(row, name)?;
    ms.map(|ms| DateTime::from_timestamp_millis(ms).ok_or_else(|| corrupt(format!("{name} {ms}"))))
        .transpose()
}

fn stage_from(row: &SqliteRow) -> Result<Stage> {
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
    })
}

fn build_from(row: &SqliteRow) -> Result<Build> {
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

fn config_from(row: &SqliteRow) -> Result<Config> {
    Ok(Config {
        project: col(row, "project")?,
        stage: col(row, "stage")?,
        name: col(row, "name")?,
        version: count(row, "version")?,
        data: ConfigData {
            env: from_json(row, "env")?,
            files: from_json(row, "files")?,
        },
        updated_at: time(row, "updated_at")?,
    })
}

fn release_from(row: &SqliteRow) -> Result<Release> {
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

fn link_from(row: &SqliteRow) -> Result<OutpostLink> {
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

fn control_from(row: &SqliteRow) -> Result<ComponentControl> {
    Ok(ComponentControl {
        component: col(row, "component")?,
        stopped: col(row, "stopped")?,
        restarts: count(row, "restarts")?,
    })
}

fn sync_from(row: &SqliteRow) -> Result<StageSync> {
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
fn summary_from(row: &SqliteRow) -> Result<StageSummary> {
    let delivered: Option<i64> = col(row, "delivered_revision")?;
    let applied: Option<i64> = col(row, "applied_revision")?;
    let release: Option<i64> = col(row, "applied_release")?;
    Ok(StageSummary {
        stage: stage_from(row)?,
        delivered_revision: delivered.map(unsigned).transpose()?.unwrap_or(0),
        applied_revision: applied.map(unsigned).transpose()?.unwrap_or(0),
        report_state: col(row, "report_state")?,
        applied_release: release.map(unsigned).transpose()?,
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

fn all<T>(rows: &[SqliteRow], decode: fn(&SqliteRow) -> Result<T>) -> Result<Vec<T>> {
    rows.iter().map(decode).collect()
}

// --- lookups shared by reads and writes ---
//
// They take a connection so that a write transaction sees its own snapshot;
// reads pass a read transaction or a pooled connection.

async fn exists(
    c: &mut SqliteConnection,
    sql: &'static str,
    binds: &[&str],
    doing: &'static str,
) -> Result<bool> {
    let mut query = sqlx::query(sql);
    for b in binds {
        query = query.bind(*b);
    }
    Ok(query
        .fetch_optional(c)
        .await
        .map_err(backend(doing))?
        .is_some())
}

async fn require_user(c: &mut SqliteConnection, name: &str) -> Result<()> {
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

async fn require_project(c: &mut SqliteConnection, name: &str) -> Result<()> {
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

async fn require_outpost(c: &mut SqliteConnection, name: &str) -> Result<()> {
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

async fn fetch_sync(
    c: &mut SqliteConnection,
    project: &str,
    stage: &str,
) -> Result<Option<StageSync>> {
    sqlx::query(concat!(
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

async fn fetch_stage(c: &mut SqliteConnection, project: &str, name: &str) -> Result<Option<Stage>> {
    sqlx::query(concat!(
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

/// The stage, or the right NotFound: for the project if that is what is
/// missing, else for the stage.
async fn require_stage(c: &mut SqliteConnection, project: &str, name: &str) -> Result<Stage> {
    match fetch_stage(c, project, name).await? {
        Some(stage) => Ok(stage),
        None => {
            require_project(c, project).await?;
            Err(not_found("stage", wording::stage(project, name)))
        }
    }
}

const RECORDING_RELEASE: &str = "recording a release";

/// Records one release in the open write transaction `c` (see
/// [`Store::push_release`]).
/// Records `release` in the open write transaction `c`; returns it with
/// the outpost its stage is placed on.
async fn release_in(
    c: &mut SqliteConnection,
    release: &NewRelease,
    now: Timestamp,
) -> Result<(Release, String)> {
    const DOING: &str = RECORDING_RELEASE;
    // Takes the stage's next release number and desired revision in the
    // same statement that finds it.
    let taken = sqlx::query(
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
    sqlx::query(concat!(
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

async fn require_build(c: &mut SqliteConnection, project: &str, build: &str) -> Result<()> {
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
async fn stages_on_outpost_in(c: &mut SqliteConnection, outpost: &str) -> Result<Vec<Stage>> {
    const DOING: &str = "listing the stages on an outpost";
    let rows = sqlx::query(concat!(
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
/// of `stages`. The statements name the stages through `json_each`, which
/// is SQLite's; a PostgreSQL backend would use `unnest`.
async fn releases_to_stages_in(
    c: &mut SqliteConnection,
    release: &NewRelease,
    stages: &[&str],
    now: Timestamp,
) -> Result<PushedReleases> {
    const DOING: &str = RECORDING_RELEASE;
    let names = json(&stages)?;
    let taken = sqlx::query(
        "UPDATE stages SET desired_revision = desired_revision + 1, \
         latest_release = COALESCE(latest_release, 0) + 1 \
         WHERE project = $1 AND name IN (SELECT value FROM json_each($2)) \
         RETURNING name, desired_revision, latest_release, outpost",
    )
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
    sqlx::query(concat!(
        "INSERT INTO releases (",
        release_columns!(),
        ") SELECT project, name, latest_release, $3, $4, desired_revision, $5, $6, $7 \
         FROM stages WHERE project = $1 AND name IN (SELECT value FROM json_each($2))"
    ))
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
async fn desired_parts_in(c: &mut SqliteConnection, stage: &Stage) -> Result<DesiredParts> {
    const DOING: &str = "reading a stage's desired state";
    let controls = sqlx::query(
        "SELECT component, stopped, restarts FROM component_controls \
         WHERE project = $1 AND stage = $2 ORDER BY component",
    )
    .bind(&stage.project)
    .bind(&stage.name)
    .fetch_all(&mut *c)
    .await
    .map_err(backend(DOING))?;
    let controls = all(&controls, control_from)?;
    let Some(number) = stage.latest_release else {
        return Ok(DesiredParts {
            controls,
            release: None,
            build: None,
        });
    };
    let release = sqlx::query(concat!(
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
    let build = sqlx::query(concat!(
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

#[async_trait]
impl Store for SqliteStore {
    async fn create_user(&self, user: &User) -> Result<()> {
        const DOING: &str = "creating a user";
        sqlx::query(concat!(
            "INSERT INTO users (",
            user_columns!(),
            ") VALUES ($1, $2, $3)"
        ))
        .bind(&user.name)
        .bind(user.admin)
        .bind(millis(user.created_at))
        .execute(&self.writer)
        .await
        .map_err(insert_error(DOING, "user", user.name.clone()))?;
        Ok(())
    }

    async fn get_user(&self, name: &str) -> Result<User> {
        sqlx::query(concat!(
            "SELECT ",
            user_columns!(),
            " FROM users WHERE name = $1"
        ))
        .bind(name)
        .fetch_optional(&self.reader)
        .await
        .map_err(backend("looking up a user"))?
        .as_ref()
        .map(user_from)
        .transpose()?
        .ok_or_else(|| not_found("user", name.to_owned()))
    }

    async fn list_users(&self) -> Result<Vec<User>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            user_columns!(),
            " FROM users ORDER BY name"
        ))
        .fetch_all(&self.reader)
        .await
        .map_err(backend("listing users"))?;
        all(&rows, user_from)
    }

    async fn create_access_key(&self, key: &StoredAccessKey) -> Result<()> {
        const DOING: &str = "creating an access key";
        let mut tx = self.write().await?;
        require_user(&mut tx, &key.info.user).await?;
        sqlx::query(concat!(
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
        commit(tx, DOING).await
    }

    async fn find_access_key(&self, id: &str) -> Result<Option<StoredAccessKey>> {
        sqlx::query(concat!(
            "SELECT ",
            key_columns!(),
            " FROM access_keys WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.reader)
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
                require_user(&mut tx, user).await?;
                sqlx::query(concat!(
                    "SELECT ",
                    key_columns!(),
                    " FROM access_keys WHERE user_name = $1 ORDER BY id"
                ))
                .bind(user)
                .fetch_all(&mut *tx)
                .await
                .map_err(backend(DOING))?
            }
            None => sqlx::query(concat!(
                "SELECT ",
                key_columns!(),
                " FROM access_keys ORDER BY id"
            ))
            .fetch_all(&self.reader)
            .await
            .map_err(backend(DOING))?,
        };
        Ok(all(&rows, key_from)?.into_iter().map(|k| k.info).collect())
    }

    async fn delete_access_key(&self, id: &str) -> Result<()> {
        let deleted = sqlx::query("DELETE FROM access_keys WHERE id = $1")
            .bind(id)
            .execute(&self.writer)
            .await
            .map_err(backend("deleting an access key"))?;
        if deleted.rows_affected() == 0 {
            return Err(not_found("access key", id.to_owned()));
        }
        Ok(())
    }

    async fn create_project(&self, project: &Project, owner: &str) -> Result<()> {
        const DOING: &str = "creating a project";
        let mut tx = self.write().await?;
        require_user(&mut tx, owner).await?;
        sqlx::query(concat!(
            "INSERT INTO projects (",
            project_columns!(),
            ", last_build) VALUES ($1, $2, $3, 0)"
        ))
        .bind(&project.name)
        .bind(&project.description)
        .bind(millis(project.created_at))
        .execute(&mut *tx)
        .await
        .map_err(insert_error(DOING, "project", project.name.clone()))?;
        sqlx::query("INSERT INTO members (project, user_name, role) VALUES ($1, $2, $3)")
            .bind(&project.name)
            .bind(owner)
            .bind(Role::Owner.as_str())
            .execute(&mut *tx)
            .await
            .map_err(backend(DOING))?;
        commit(tx, DOING).await
    }

    async fn get_project(&self, name: &str) -> Result<Project> {
        sqlx::query(concat!(
            "SELECT ",
            project_columns!(),
            " FROM projects WHERE name = $1"
        ))
        .bind(name)
        .fetch_optional(&self.reader)
        .await
        .map_err(backend("looking up a project"))?
        .as_ref()
        .map(project_from)
        .transpose()?
        .ok_or_else(|| not_found("project", name.to_owned()))
    }

    async fn list_projects(&self) -> Result<Vec<Project>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            project_columns!(),
            " FROM projects ORDER BY name"
        ))
        .fetch_all(&self.reader)
        .await
        .map_err(backend("listing projects"))?;
        all(&rows, project_from)
    }

    async fn delete_project(&self, name: &str, force: bool) -> Result<()> {
        const DOING: &str = "deleting a project";
        let mut tx = self.write().await?;
        require_project(&mut tx, name).await?;
        let row = sqlx::query(
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
            "DELETE FROM projects WHERE name = $1",
        ] {
            sqlx::query(sql)
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(backend(DOING))?;
        }
        commit(tx, DOING).await
    }

    async fn set_member(&self, project: &str, user: &str, role: Role) -> Result<()> {
        const DOING: &str = "setting a member's role";
        let mut tx = self.write().await?;
        require_project(&mut tx, project).await?;
        require_user(&mut tx, user).await?;
        sqlx::query(
            "INSERT INTO members (project, user_name, role) VALUES ($1, $2, $3) \
             ON CONFLICT (project, user_name) DO UPDATE SET role = excluded.role",
        )
        .bind(project)
        .bind(user)
        .bind(role.as_str())
        .execute(&mut *tx)
        .await
        .map_err(backend(DOING))?;
        commit(tx, DOING).await
    }

    async fn remove_member(&self, project: &str, user: &str) -> Result<()> {
        const DOING: &str = "removing a member";
        let mut tx = self.write().await?;
        require_project(&mut tx, project).await?;
        let deleted = sqlx::query("DELETE FROM members WHERE project = $1 AND user_name = $2")
            .bind(project)
            .bind(user)
            .execute(&mut *tx)
            .await
            .map_err(backend(DOING))?;
        if deleted.rows_affected() == 0 {
            return Err(not_found("member", wording::member(project, user)));
        }
        commit(tx, DOING).await
    }

    async fn list_members(&self, project: &str) -> Result<Vec<Member>> {
        let mut tx = self.read().await?;
        require_project(&mut tx, project).await?;
        let rows = sqlx::query(
            "SELECT project, user_name, role FROM members WHERE project = $1 ORDER BY user_name",
        )
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
        require_project(&mut tx, &entry.project).await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO audit_log (time_ms, user_name, project, stage, component, outpost, \
             action, detail, result) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
        )
        .bind(millis(entry.time))
        .bind(&entry.user)
        .bind(&entry.project)
        .bind(&entry.stage)
        .bind(&entry.component)
        .bind(&entry.outpost)
        .bind(&entry.action)
        .bind(&entry.detail)
        .bind(&entry.result)
        .fetch_one(&mut *tx)
        .await
        .map_err(backend(DOING))?;
        commit(tx, DOING).await?;
        Ok(audit_entry(u64::try_from(id).unwrap_or(0), entry))
    }

    async fn list_audit(&self, project: &str, limit: usize) -> Result<Vec<AuditEntry>> {
        let mut tx = self.read().await?;
        require_project(&mut tx, project).await?;
        let rows = sqlx::query(
            "SELECT id, time_ms, user_name, project, stage, component, outpost, action, detail, \
             result FROM audit_log WHERE project = $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(project)
        .bind(int(limit as u64)?)
        .fetch_all(&mut *tx)
        .await
        .map_err(backend("listing the audit log"))?;
        rows.iter()
            .map(|row| {
                Ok(AuditEntry {
                    id: u64_col(row, "id")?,
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

    async fn role_of(&self, project: &str, user: &str) -> Result<Option<Role>> {
        sqlx::query("SELECT role FROM members WHERE project = $1 AND user_name = $2")
            .bind(project)
            .bind(user)
            .fetch_optional(&self.reader)
            .await
            .map_err(backend("looking up a member's role"))?
            .map(|row| parsed(&row, "role"))
            .transpose()
    }

    async fn create_outpost(&self, outpost: &Outpost) -> Result<()> {
        const DOING: &str = "creating an outpost";
        sqlx::query(concat!(
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
        .execute(&self.writer)
        .await
        .map_err(insert_error(DOING, "outpost", outpost.name.clone()))?;
        Ok(())
    }

    async fn get_outpost(&self, name: &str) -> Result<Outpost> {
        sqlx::query(concat!(
            "SELECT ",
            outpost_columns!(),
            " FROM outposts WHERE name = $1"
        ))
        .bind(name)
        .fetch_optional(&self.reader)
        .await
        .map_err(backend("looking up an outpost"))?
        .as_ref()
        .map(outpost_from)
        .transpose()?
        .ok_or_else(|| not_found("outpost", name.to_owned()))
    }

    async fn list_outposts(&self) -> Result<Vec<Outpost>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            outpost_columns!(),
            " FROM outposts ORDER BY name"
        ))
        .fetch_all(&self.reader)
        .await
        .map_err(backend("listing outposts"))?;
        all(&rows, outpost_from)
    }

    async fn delete_outpost(&self, name: &str, force: bool) -> Result<()> {
        const DOING: &str = "deleting an outpost";
        let mut tx = self.write().await?;
        if !exists(
            &mut tx,
            "SELECT 1 FROM outposts WHERE name = $1",
            &[name],
            DOING,
        )
        .await?
        {
            return Err(not_found("outpost", name.to_owned()));
        }
        let on_it = sqlx::query(
            "SELECT project, name FROM stages WHERE outpost = $1 ORDER BY project, name",
        )
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
            "DELETE FROM stages WHERE outpost = $1",
            "DELETE FROM outpost_links WHERE outpost = $1",
            "DELETE FROM join_tokens WHERE outpost = $1",
            "DELETE FROM outposts WHERE name = $1",
        ] {
            sqlx::query(sql)
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(backend(DOING))?;
        }
        commit(tx, DOING).await
    }

    async fn stages_on_outpost(&self, outpost: &str) -> Result<Vec<Stage>> {
        let mut tx = self.read().await?;
        stages_on_outpost_in(&mut tx, outpost).await
    }

    async fn outpost_desired(
        &self,
        outpost: &str,
        held: &HashMap<StageKey, u64>,
    ) -> Result<Vec<OutpostStage>> {
        let mut tx = self.read().await?;
        let stages = stages_on_outpost_in(&mut tx, outpost).await?;
        let mut listed = Vec::with_capacity(stages.len());
        for stage in stages {
            let key = (stage.project.clone(), stage.name.clone());
            let wanted = stage.desired_revision > held.get(&key).copied().unwrap_or(0);
            let desired = if wanted {
                Some(desired_parts_in(&mut tx, &stage).await?)
            } else {
                None
            };
            listed.push(OutpostStage { stage, desired });
        }
        Ok(listed)
    }

    async fn rotate_outpost_uri(&self, name: &str) -> Result<Outpost> {
        const DOING: &str = "rotating an Outpost URI";
        let mut tx = self.write().await?;
        let changed =
            sqlx::query("UPDATE outposts SET uri_generation = uri_generation + 1 WHERE name = $1")
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(backend(DOING))?
                .rows_affected();
        if changed == 0 {
            return Err(not_found("outpost", name.to_owned()));
        }
        commit(tx, DOING).await?;
        self.get_outpost(name).await
    }

    async fn update_outpost(&self, name: &str, update: &OutpostUpdate) -> Result<Outpost> {
        const DOING: &str = "updating an outpost";
        let mut tx = self.write().await?;
        let before: Option<Option<String>> =
            sqlx::query_scalar("SELECT ingress_domain FROM outposts WHERE name = $1")
                .bind(name)
                .fetch_optional(&mut *tx)
                .await
                .map_err(backend(DOING))?;
        let Some(before) = before else {
            return Err(not_found("outpost", name.to_owned()));
        };
        let domain = update.ingress_domain.clone().unwrap_or(before.clone());
        sqlx::query(
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
            sqlx::query(
                "UPDATE stages SET desired_revision = desired_revision + 1 WHERE outpost = $1",
            )
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(backend(DOING))?;
        }
        commit(tx, DOING).await?;
        self.get_outpost(name).await
    }

    async fn revoke_outpost(&self, name: &str, now: Timestamp) -> Result<Outpost> {
        const DOING: &str = "revoking an outpost";
        let mut tx = self.write().await?;
        let changed = sqlx::query(
            "UPDATE outposts SET revoked_at = COALESCE(revoked_at, $2) WHERE name = $1",
        )
        .bind(name)
        .bind(millis(now))
        .execute(&mut *tx)
        .await
        .map_err(backend(DOING))?
        .rows_affected();
        if changed == 0 {
            return Err(not_found("outpost", name.to_owned()));
        }
        commit(tx, DOING).await?;
        self.get_outpost(name).await
    }

    async fn create_stage(&self, stage: &NewStage, now: Timestamp) -> Result<Stage> {
        const DOING: &str = "creating a stage";
        let mut tx = self.write().await?;
        require_project(&mut tx, &stage.project).await?;
        if fetch_stage(&mut tx, &stage.project, &stage.name)
            .await?
            .is_some()
        {
            return Err(StoreError::AlreadyExists {
                kind: "stage",
                name: wording::stage(&stage.project, &stage.name),
            });
        }
        let outpost = sqlx::query("SELECT max_stages FROM outposts WHERE name = $1")
            .bind(&stage.outpost)
            .fetch_optional(&mut *tx)
            .await
            .map_err(backend(DOING))?
            .ok_or_else(|| not_found("outpost", stage.outpost.clone()))?;
        let max_stages: Option<i64> = col(&outpost, "max_stages")?;
        // Counted inside the write transaction, so two concurrent creations
        // cannot both take the last place.
        if let Some(max) = max_stages {
            let row = sqlx::query("SELECT COUNT(*) AS held FROM stages WHERE outpost = $1")
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
        };
        sqlx::query(concat!(
            "INSERT INTO stages (",
            stage_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
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
        commit(tx, DOING).await?;
        Ok(created)
    }

    async fn get_stage(&self, project: &str, name: &str) -> Result<Stage> {
        let mut tx = self.read().await?;
        require_stage(&mut tx, project, name).await
    }

    async fn list_stages(&self, project: &str) -> Result<Vec<Stage>> {
        let mut tx = self.read().await?;
        require_project(&mut tx, project).await?;
        let rows = sqlx::query(concat!(
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

    async fn list_stage_summaries(
        &self,
        project: &str,
        which: StageFilter,
    ) -> Result<Vec<StageSummary>> {
        let mut tx = self.read().await?;
        require_project(&mut tx, project).await?;
        let rows = sqlx::query(
            "SELECT s.project, s.name, s.stage_type, s.display_name, s.suspended, s.outpost, \
             s.desired_revision, s.latest_release, s.created_at, \
             y.delivered_revision, y.applied_revision, \
             json_extract(y.report, '$.state') AS report_state, \
             (SELECT MAX(r.number) FROM releases r \
              WHERE r.project = s.project AND r.stage = s.name AND r.state = $2) AS applied_release \
             FROM stages s LEFT JOIN stage_syncs y ON y.project = s.project AND y.stage = s.name \
             WHERE s.project = $1 \
             AND (NOT $3 OR s.desired_revision > COALESCE(y.applied_revision, 0)) \
             ORDER BY s.name",
        )
        .bind(project)
        .bind(ReleaseState::Applied.as_str())
        .bind(which == StageFilter::Pending)
        .fetch_all(&mut *tx)
        .await
        .map_err(backend("listing stages with their sync records"))?;
        all(&rows, summary_from)
    }

    async fn update_stage(&self, project: &str, name: &str, update: &StageUpdate) -> Result<Stage> {
        const DOING: &str = "updating a stage";
        let mut tx = self.write().await?;
        let mut stage = require_stage(&mut tx, project, name).await?;
        if let Some(display_name) = &update.display_name {
            stage.display_name = display_name.clone();
        }
        if let Some(suspended) = update.suspended
            && suspended != stage.suspended
        {
            stage.suspended = suspended;
            stage.desired_revision += 1;
        }
        sqlx::query(
            "UPDATE stages SET display_name = $1, suspended = $2, desired_revision = $3 \
             WHERE project = $4 AND name = $5",
        )
        .bind(&stage.display_name)
        .bind(stage.suspended)
        .bind(int(stage.desired_revision)?)
        .bind(project)
        .bind(name)
        .execute(&mut *tx)
        .await
        .map_err(backend(DOING))?;
        commit(tx, DOING).await?;
        Ok(stage)
    }

    async fn delete_stage(&self, project: &str, name: &str, force: bool) -> Result<()> {
        const DOING: &str = "deleting a stage";
        let mut tx = self.write().await?;
        require_stage(&mut tx, project, name).await?;
        let row = sqlx::query(
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
            "DELETE FROM stages WHERE project = $1 AND name = $2",
        ] {
            sqlx::query(sql)
                .bind(project)
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(backend(DOING))?;
        }
        commit(tx, DOING).await
    }

    async fn list_component_controls(
        &self,
        project: &str,
        stage: &str,
    ) -> Result<Vec<ComponentControl>> {
        let mut tx = self.read().await?;
        require_stage(&mut tx, project, stage).await?;
        let rows = sqlx::query(
            "SELECT component, stopped, restarts FROM component_controls \
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
        let mut record = require_stage(&mut tx, project, stage).await?;
        let current = sqlx::query(
            "SELECT component, stopped, restarts FROM component_controls \
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
            sqlx::query(
                "INSERT INTO component_controls (project, stage, component, stopped, restarts) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (project, stage, component) DO UPDATE SET \
                 stopped = excluded.stopped, restarts = excluded.restarts",
            )
            .bind(project)
            .bind(stage)
            .bind(component)
            .bind(control.stopped)
            .bind(int(control.restarts)?)
            .execute(&mut *tx)
            .await
            .map_err(backend(DOING))?;
            record.desired_revision += 1;
            sqlx::query("UPDATE stages SET desired_revision = $1 WHERE project = $2 AND name = $3")
                .bind(int(record.desired_revision)?)
                .bind(project)
                .bind(stage)
                .execute(&mut *tx)
                .await
                .map_err(backend(DOING))?;
            commit(tx, DOING).await?;
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
        let last = sqlx::query("SELECT last_build FROM projects WHERE name = $1")
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
        sqlx::query("UPDATE projects SET last_build = $1 WHERE name = $2")
            .bind(int(number)?)
            .bind(project)
            .execute(&mut *tx)
            .await
            .map_err(backend(DOING))?;
        sqlx::query(concat!(
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
        commit(tx, DOING).await?;
        Ok(created)
    }

    async fn get_build(&self, project: &str, name: &str) -> Result<Build> {
        let mut tx = self.read().await?;
        let row = sqlx::query(concat!(
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
                require_project(&mut tx, project).await?;
                Err(not_found("build", wording::build(project, name)))
            }
        }
    }

    async fn list_builds(&self, project: &str) -> Result<Vec<Build>> {
        let mut tx = self.read().await?;
        require_project(&mut tx, project).await?;
        let rows = sqlx::query(concat!(
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
        require_project(&mut tx, project).await?;
        if !exists(
            &mut tx,
            "SELECT 1 FROM builds WHERE project = $1 AND name = $2",
            &[project, name],
            DOING,
        )
        .await?
        {
            return Err(not_found("build", wording::build(project, name)));
        }
        let users = sqlx::query(
            "SELECT stage, COUNT(*) AS releases FROM releases \
             WHERE project = $1 AND build = $2 GROUP BY stage ORDER BY stage",
        )
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
                stages.push(col::<String>(row, "stage")?);
            }
            return Err(wording::build_in_use(project, name, releases, &stages));
        }
        sqlx::query("DELETE FROM builds WHERE project = $1 AND name = $2")
            .bind(project)
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(backend(DOING))?;
        commit(tx, DOING).await
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
        require_stage(&mut tx, project, stage).await?;
        let existing = sqlx::query(concat!(
            "SELECT ",
            config_columns!(),
            " FROM configs WHERE project = $1 AND stage = $2 AND name = $3"
        ))
        .bind(project)
        .bind(stage)
        .bind(name)
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend(DOING))?
        .as_ref()
        .map(config_from)
        .transpose()?;
        let (version, merged) = match existing {
            Some(existing) => {
                let mut merged = existing.data;
                merged.env.extend(data.env.clone());
                merged.files.extend(data.files.clone());
                (existing.version + 1, merged)
            }
            None => (1, data.clone()),
        };
        sqlx::query(concat!(
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
        commit(tx, DOING).await?;
        Ok(Config {
            project: project.to_owned(),
            stage: stage.to_owned(),
            name: name.to_owned(),
            version,
            data: merged,
            updated_at: truncated(now),
        })
    }

    async fn get_config(&self, project: &str, stage: &str, name: &str) -> Result<Config> {
        let mut tx = self.read().await?;
        let row = sqlx::query(concat!(
            "SELECT ",
            config_columns!(),
            " FROM configs WHERE project = $1 AND stage = $2 AND name = $3"
        ))
        .bind(project)
        .bind(stage)
        .bind(name)
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend("looking up a config"))?;
        match row {
            Some(row) => config_from(&row),
            None => {
                require_stage(&mut tx, project, stage).await?;
                Err(not_found("config", wording::config(project, stage, name)))
            }
        }
    }

    async fn list_configs(&self, project: &str, stage: Option<&str>) -> Result<Vec<Config>> {
        const DOING: &str = "listing configs";
        let mut tx = self.read().await?;
        let rows = match stage {
            Some(stage) => {
                require_stage(&mut tx, project, stage).await?;
                sqlx::query(concat!(
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
                require_project(&mut tx, project).await?;
                sqlx::query(concat!(
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
        require_stage(&mut tx, project, stage).await?;
        let deleted =
            sqlx::query("DELETE FROM configs WHERE project = $1 AND stage = $2 AND name = $3")
                .bind(project)
                .bind(stage)
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(backend(DOING))?;
        if deleted.rows_affected() == 0 {
            return Err(not_found("config", wording::config(project, stage, name)));
        }
        commit(tx, DOING).await
    }

    async fn push_release(&self, release: &NewRelease, now: Timestamp) -> Result<Release> {
        let mut tx = self.write().await?;
        let (created, _outpost) = release_in(&mut tx, release, now).await?;
        commit(tx, RECORDING_RELEASE).await?;
        Ok(created)
    }

    async fn push_releases(
        &self,
        releases: &[NewRelease],
        now: Timestamp,
    ) -> Result<PushedReleases> {
        let mut tx = self.write().await?;
        // An error drops the transaction: none of the releases is kept.
        let created = match one_build_to_stages(releases) {
            Some(stages) => releases_to_stages_in(&mut tx, &releases[0], &stages, now).await?,
            None => {
                let mut created = Vec::with_capacity(releases.len());
                let mut outposts = Vec::with_capacity(releases.len());
                for release in releases {
                    let (release, outpost) = release_in(&mut tx, release, now).await?;
                    created.push(release);
                    outposts.push(outpost);
                }
                PushedReleases::new(created, outposts)
            }
        };
        commit(tx, RECORDING_RELEASE).await?;
        Ok(created)
    }

    async fn get_release(&self, project: &str, stage: &str, number: u64) -> Result<Release> {
        let mut tx = self.read().await?;
        let row = sqlx::query(concat!(
            "SELECT ",
            release_columns!(),
            " FROM releases WHERE project = $1 AND stage = $2 AND number = $3"
        ))
        .bind(project)
        .bind(stage)
        .bind(int(number)?)
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend("looking up a release"))?;
        match row {
            Some(row) => release_from(&row),
            None => {
                require_stage(&mut tx, project, stage).await?;
                Err(not_found(
                    "release",
                    wording::release(project, stage, number),
                ))
            }
        }
    }

    async fn list_releases(&self, project: &str, stage: &str) -> Result<Vec<Release>> {
        let mut tx = self.read().await?;
        require_stage(&mut tx, project, stage).await?;
        let rows = sqlx::query(concat!(
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
        require_outpost(&mut tx, outpost).await?;
        sqlx::query(
            "INSERT INTO join_tokens (token_hash, outpost, expires_at, used_at) \
             VALUES ($1, $2, $3, NULL)",
        )
        .bind(token_hash)
        .bind(outpost)
        .bind(millis(expires_at))
        .execute(&mut *tx)
        .await
        .map_err(insert_error(DOING, "join token", token_hash.to_owned()))?;
        commit(tx, DOING).await
    }

    async fn consume_join_token(
        &self,
        token_hash: &str,
        now: Timestamp,
    ) -> Result<Result<String, JoinTokenRefusal>> {
        const DOING: &str = "using a join token";
        let now = millis(now);
        let mut tx = self.write().await?;
        let Some(row) = sqlx::query(
            "SELECT outpost, expires_at, used_at FROM join_tokens WHERE token_hash = $1",
        )
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
        let used = sqlx::query(
            "UPDATE join_tokens SET used_at = $1 WHERE token_hash = $2 AND used_at IS NULL",
        )
        .bind(now)
        .bind(token_hash)
        .execute(&mut *tx)
        .await
        .map_err(backend(DOING))?
        .rows_affected();
        if used == 0 {
            return Ok(Err(JoinTokenRefusal::AlreadyUsed));
        }
        let outpost: String = col(&row, "outpost")?;
        commit(tx, DOING).await?;
        Ok(Ok(outpost))
    }

    async fn get_outpost_link(&self, outpost: &str) -> Result<OutpostLink> {
        let mut tx = self.read().await?;
        let row = sqlx::query(concat!(
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
                require_outpost(&mut tx, outpost).await?;
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
        let row = sqlx::query(concat!(
            "SELECT ",
            outpost_columns!(),
            ", ",
            link_columns!(),
            " FROM outposts LEFT JOIN outpost_links ON outpost_links.outpost = outposts.name \
             WHERE outposts.name = $1"
        ))
        .bind(name)
        .fetch_optional(&self.reader)
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
        require_outpost(&mut tx, &link.outpost).await?;
        sqlx::query(concat!(
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
        commit(tx, DOING).await
    }

    async fn record_link_activity(&self, activity: &[LinkActivity]) -> Result<()> {
        const DOING: &str = "recording what outpost links saw";
        if activity.is_empty() {
            return Ok(());
        }
        // One transaction (one fsync) for the whole batch: a fleet linking
        // after a hub restart brings hundreds of these a second.
        let mut tx = self.write().await?;
        for a in activity {
            let agent = a.hello.as_ref().map(|h| json(&h.agent)).transpose()?;
            sqlx::query(
                "INSERT INTO outpost_links (outpost) SELECT $1 \
                 WHERE EXISTS (SELECT 1 FROM outposts WHERE name = $1) \
                 ON CONFLICT (outpost) DO NOTHING",
            )
            .bind(&a.outpost)
            .execute(&mut *tx)
            .await
            .map_err(backend(DOING))?;
            sqlx::query(
                "UPDATE outpost_links SET \
                 last_seen = MAX(COALESCE(last_seen, 0), $2), \
                 agent = COALESCE($3, agent), \
                 cert_serial = COALESCE($4, cert_serial), \
                 cert_not_after = COALESCE($5, cert_not_after), \
                 last_disconnect = COALESCE($6, last_disconnect) \
                 WHERE outpost = $1",
            )
            .bind(&a.outpost)
            .bind(millis(a.seen))
            .bind(agent)
            .bind(a.hello.as_ref().map(|h| h.cert_serial.clone()))
            .bind(a.hello.as_ref().map(|h| millis(h.cert_not_after)))
            .bind(&a.disconnect)
            .execute(&mut *tx)
            .await
            .map_err(backend(DOING))?;
        }
        commit(tx, DOING).await
    }

    async fn get_stage_sync(&self, project: &str, stage: &str) -> Result<StageSync> {
        let mut tx = self.read().await?;
        match fetch_sync(&mut tx, project, stage).await? {
            Some(sync) => Ok(sync),
            None => {
                require_stage(&mut tx, project, stage).await?;
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
        let mut tx = self.write().await?;
        let sync = delivered_in(&mut tx, project, stage, revision, now).await?;
        commit(tx, "recording a delivery").await?;
        Ok(sync)
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
        let mut tx = self.write().await?;
        let sync = status_in(
            &mut tx,
            project,
            stage,
            applied_revision,
            failed_revision,
            report,
            now,
        )
        .await?;
        commit(tx, "recording a stage's status").await?;
        Ok(sync)
    }

    async fn record_sync_batch(
        &self,
        updates: &[SyncUpdate],
        now: Timestamp,
    ) -> Result<Vec<Result<StageSync>>> {
        let mut tx = self.write().await?;
        let mut results = Vec::with_capacity(updates.len());
        for update in updates {
            let result = match update {
                SyncUpdate::Delivered {
                    project,
                    stage,
                    revision,
                } => delivered_in(&mut tx, project, stage, *revision, now).await,
                SyncUpdate::Status {
                    project,
                    stage,
                    applied_revision,
                    failed_revision,
                    report,
                } => {
                    status_in(
                        &mut tx,
                        project,
                        stage,
                        *applied_revision,
                        *failed_revision,
                        report,
                        now,
                    )
                    .await
                }
            };
            match result {
                // The update's stage is gone: it wrote nothing, and the
                // others still count.
                Err(e @ StoreError::NotFound { .. }) => results.push(Err(e)),
                // The database failed: nothing of the batch is kept.
                Err(e) => return Err(e),
                Ok(sync) => results.push(Ok(sync)),
            }
        }
        commit(tx, "recording stages' sync").await?;
        Ok(results)
    }
}

/// [`Store::record_delivered`] in the open write transaction `c`.
async fn delivered_in(
    c: &mut SqliteConnection,
    project: &str,
    stage: &str,
    revision: u64,
    now: Timestamp,
) -> Result<StageSync> {
    const DOING: &str = "recording a delivery";
    let revision = int(revision)?;
    // One statement: the maximum is taken in it, so it holds whatever else
    // writes the row concurrently, and a stage that is gone fails its
    // foreign key.
    let row = sqlx::query(concat!(
        "INSERT INTO stage_syncs (",
        sync_columns!(),
        ") VALUES ($1, $2, $3, 0, NULL, $4) \
         ON CONFLICT (project, stage) DO UPDATE SET \
         delivered_revision = CASE \
             WHEN excluded.delivered_revision > stage_syncs.delivered_revision \
             THEN excluded.delivered_revision ELSE stage_syncs.delivered_revision END, \
         updated_at = excluded.updated_at \
         RETURNING ",
        sync_columns!()
    ))
    .bind(project)
    .bind(stage)
    .bind(revision)
    .bind(millis(now))
    .fetch_one(&mut *c)
    .await;
    match row {
        Ok(row) => sync_from(&row),
        Err(e) => Err(sync_write_error(c, project, stage, e, DOING).await),
    }
}

/// A sync write that failed: `NotFound` when it failed because the stage
/// (or its project) is gone, else the database's error.
async fn sync_write_error(
    c: &mut SqliteConnection,
    project: &str,
    stage: &str,
    error: sqlx::Error,
    doing: &'static str,
) -> StoreError {
    let gone = matches!(&error, sqlx::Error::Database(db) if db.is_foreign_key_violation());
    if gone && let Err(not_found) = require_stage(c, project, stage).await {
        return not_found;
    }
    backend(doing)(error)
}

/// [`Store::record_status`] in the open write transaction `c`: two
/// statements, one for the sync record and one for the release states.
async fn status_in(
    c: &mut SqliteConnection,
    project: &str,
    stage: &str,
    applied_revision: u64,
    failed_revision: Option<u64>,
    report: &serde_json::Value,
    now: Timestamp,
) -> Result<StageSync> {
    const DOING: &str = "recording a stage's status";
    let applied = int(applied_revision)?;
    let failed = failed_revision.map(int).transpose()?;
    let report_text = json(report)?;
    // A report older than the one already recorded (arriving late) changes
    // nothing: the update's condition leaves the row, and no row comes back.
    let written = sqlx::query(concat!(
        "INSERT INTO stage_syncs (",
        sync_columns!(),
        ") VALUES ($1, $2, 0, $3, $4, $5) \
         ON CONFLICT (project, stage) DO UPDATE SET \
         applied_revision = excluded.applied_revision, report = excluded.report, \
         updated_at = excluded.updated_at \
         WHERE excluded.applied_revision >= stage_syncs.applied_revision \
         RETURNING ",
        sync_columns!()
    ))
    .bind(project)
    .bind(stage)
    .bind(applied)
    .bind(&report_text)
    .bind(millis(now))
    .fetch_optional(&mut *c)
    .await;
    let sync = match written {
        Ok(Some(row)) => sync_from(&row)?,
        Ok(None) => {
            return fetch_sync(&mut *c, project, stage).await?.ok_or_else(|| {
                corrupt(format!(
                    "no sync record for {} though a write met one",
                    wording::stage(project, stage)
                ))
            });
        }
        Err(e) => return Err(sync_write_error(c, project, stage, e, DOING).await),
    };

    // The release the stage runs at the applied revision (`running`) is the
    // newest one at or below it: revisions that carry no release (suspend,
    // resume, component start/stop/restart) keep it running; nothing
    // running (revision 0) moves no release. It becomes `applied`, older
    // `applied` ones `replaced`, older `pending` ones `superseded` (they
    // never ran) — unless the applied revision itself failed ($5): the
    // agent restored what ran before, which therefore stays applied and
    // nothing is replaced. The failed revision's release ($4) is `failed`
    // whatever else holds.
    let applied_failed = applied > 0 && failed == Some(applied);
    sqlx::query(
        "UPDATE releases SET state = CASE \
             WHEN revision = $4 THEN $6 \
             WHEN revision = r.running THEN $7 \
             WHEN state = $7 THEN $8 \
             ELSE $9 END \
         FROM (SELECT MAX(revision) AS running FROM releases \
               WHERE project = $1 AND stage = $2 AND revision <= $3) AS r \
         WHERE releases.project = $1 AND releases.stage = $2 AND ( \
             revision = $4 \
             OR (NOT $5 AND revision = r.running) \
             OR (NOT $5 AND revision < r.running AND state = $7) \
             OR (revision < r.running AND state = $10))",
    )
    .bind(project)
    .bind(stage)
    .bind(applied)
    .bind(failed)
    .bind(applied_failed)
    .bind(ReleaseState::Failed.as_str())
    .bind(ReleaseState::Applied.as_str())
    .bind(ReleaseState::Replaced.as_str())
    .bind(ReleaseState::Superseded.as_str())
    .bind(ReleaseState::Pending.as_str())
    .execute(&mut *c)
    .await
    .map_err(backend(DOING))?;
    Ok(sync)
}

/// What a timestamp reads back as: the database keeps milliseconds.
fn truncated(t: Timestamp) -> Timestamp {
    DateTime::from_timestamp_millis(millis(t)).unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The durability promise rests on these settings; check the database
    /// really runs with them rather than trusting the options builder.
    #[tokio::test]
    async fn runs_with_wal_full_sync_and_foreign_keys() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("hub.db")).await.unwrap();
        for pool in [&store.writer, &store.reader] {
            let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
                .fetch_one(pool)
                .await
                .unwrap();
            assert_eq!(mode, "wal");
            let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
                .fetch_one(pool)
                .await
                .unwrap();
            assert_eq!(sync, 2, "synchronous=FULL");
            let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
                .fetch_one(pool)
                .await
                .unwrap();
            assert_eq!(fk, 1);
        }
        store.close().await;
    }

    #[tokio::test]
    async fn readers_cannot_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("hub.db")).await.unwrap();
        let write = sqlx::query("DELETE FROM users")
            .execute(&store.reader)
            .await;
        assert!(write.is_err());
        store.close().await;
    }
}
