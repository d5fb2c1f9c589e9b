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
//! The statements themselves are the shared ones ([`crate::sql`]); this
//! file holds SQLite's connections and its dialect.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{Sqlite, Transaction};

use crate::sql::conn::sqlx_conn;
use crate::sql::{Backend, Dialect, SqlStore};
use crate::{Result, StoreError};

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

sqlx_conn!(SqliteConnection, SqliteRow);

/// SQLite's connections: one writer, a few readers.
pub struct SqliteBackend {
    writer: SqlitePool,
    reader: SqlitePool,
}

/// The SQLite store. Cloning is not offered: open it once and share it
/// behind an `Arc<dyn Store>`.
pub type SqliteStore = SqlStore<SqliteBackend>;

impl SqlStore<SqliteBackend> {
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
            .map_err(crate::sql::backend("opening the database"))?;
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
            .map_err(crate::sql::backend("opening the database for reading"))?;
        Ok(SqlStore::new(SqliteBackend { writer, reader }))
    }

    /// Closes every connection, waiting for those in use. Not needed for
    /// durability (every call already committed), but it lets SQLite
    /// checkpoint the WAL into the database file and remove it.
    pub async fn close(&self) {
        // The last connection to close does the checkpoint; let it be the
        // writer.
        self.backend.reader.close().await;
        self.backend.writer.close().await;
    }

    /// The pool that reads, for copying the database (`trellis hub
    /// migrate`) and for tests.
    pub fn read_pool(&self) -> &SqlitePool {
        &self.backend.reader
    }
}

fn pool_options() -> SqlitePoolOptions {
    // A call waiting seconds for a connection is what a link storm looks
    // like (the hub admits links at a bounded rate and their reads queue);
    // at sqlx's default `warn` every such wait is a log line, 100 MB of
    // them in one 15,000-outpost storm. Failures still surface as errors.
    SqlitePoolOptions::new().acquire_slow_level(log::LevelFilter::Debug)
}

#[async_trait]
impl Backend for SqliteBackend {
    type Conn = SqliteConnection;
    type Tx = Transaction<'static, Sqlite>;
    type Pooled = PoolConnection<Sqlite>;

    const DIALECT: Dialect = Dialect {
        greatest: "MAX",
        json_strings: "json_each({})",
        json_rows: "json_each({})",
        json_field: "json_extract({}, '$.{f}')",
        // A failed statement leaves SQLite's transaction usable.
    };

    async fn write(&self) -> Result<Self::Tx, sqlx::Error> {
        self.writer.begin().await
    }

    async fn read(&self) -> Result<Self::Tx, sqlx::Error> {
        self.reader.begin().await
    }

    async fn reader(&self) -> Result<Self::Pooled, sqlx::Error> {
        self.reader.acquire().await
    }

    async fn commit(tx: Self::Tx) -> Result<(), sqlx::Error> {
        tx.commit().await
    }
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
        for pool in [&store.backend.writer, &store.backend.reader] {
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

    /// A rollout over three new stages of project `shop`, in two waves.
    async fn three_stage_rollout(store: &SqliteStore) -> trellis_model::rollout::Rollout {
        use crate::Store;
        crate::testsuite::seed_stages(store, "shop", 3).await;
        store
            .create_rollout(&crate::testsuite::new_rollout(
                "shop",
                &["s0", "s1", "s2"],
                1,
            ))
            .await
            .unwrap()
    }

    /// A rollout recorded before `rollout_waves` (its stages in its own
    /// row) reads whole, and its next save moves its stages to its waves.
    #[tokio::test]
    async fn rollouts_recorded_before_waves_had_rows_read_whole_and_move() {
        use crate::Store;
        use trellis_model::rollout::StageRolloutState;
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("hub.db")).await.unwrap();
        let created = three_stage_rollout(&store).await;
        let writer = &store.backend.writer;
        let waves = |sql: &'static str| sqlx::query_scalar::<_, i64>(sql).fetch_one(writer);
        assert_eq!(
            waves("SELECT COUNT(*) FROM rollout_waves").await.unwrap(),
            2
        );
        // As a hub before the table left it.
        sqlx::query("UPDATE rollouts SET stages = $1")
            .bind(serde_json::to_string(&created.stages).unwrap())
            .execute(writer)
            .await
            .unwrap();
        sqlx::query("DELETE FROM rollout_waves")
            .execute(writer)
            .await
            .unwrap();
        // Opened by the hub of this version.
        store.close().await;
        let store = SqliteStore::open(&dir.path().join("hub.db")).await.unwrap();
        let writer = &store.backend.writer;
        let waves = |sql: &'static str| sqlx::query_scalar::<_, i64>(sql).fetch_one(writer);
        assert_eq!(store.get_rollout(created.id).await.unwrap(), created);

        let mut changed = created.clone();
        changed.stages[1].state = StageRolloutState::Pushed;
        let saved = store.save_rollout(&changed).await.unwrap();
        assert_eq!(store.get_rollout(created.id).await.unwrap(), saved);
        let own: String = sqlx::query_scalar("SELECT stages FROM rollouts")
            .fetch_one(writer)
            .await
            .unwrap();
        assert_eq!(own, "[]");
        assert_eq!(
            waves("SELECT COUNT(*) FROM rollout_waves").await.unwrap(),
            2
        );
        store.close().await;
    }

    /// A store writes only the waves that changed since the version it
    /// saved itself; after a save by another store on the same database
    /// (another hub instance), it writes every wave again.
    #[tokio::test]
    async fn a_store_trusts_only_what_it_saw_at_the_version_it_saves_over() {
        use crate::Store;
        use trellis_model::rollout::StageRolloutState;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        let one = SqliteStore::open(&path).await.unwrap();
        let created = three_stage_rollout(&one).await;
        let mut mine = created.clone();
        let first = mine.stages.iter().position(|s| s.wave == 0).unwrap();
        mine.stages[first].state = StageRolloutState::Pushed;
        let mine = one.save_rollout(&mine).await.unwrap();

        let other = SqliteStore::open(&path).await.unwrap();
        let mut theirs = other.get_rollout(created.id).await.unwrap();
        assert_eq!(theirs, mine);
        theirs.stages[first].state = StageRolloutState::Applied;
        let theirs = other.save_rollout(&theirs).await.unwrap();

        // Back to what `one` saved last: only a store that trusted what it
        // saw at another version would take the wave for unchanged.
        let mut again = one.get_rollout(created.id).await.unwrap();
        assert_eq!(again, theirs, "the other store's save is read");
        again.stages[first].state = StageRolloutState::Pushed;
        let again = one.save_rollout(&again).await.unwrap();
        assert_eq!(other.get_rollout(created.id).await.unwrap(), again);
        assert_eq!(again.stages[first].state, StageRolloutState::Pushed);
        other.close().await;
        one.close().await;
    }

    #[tokio::test]
    async fn readers_cannot_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("hub.db")).await.unwrap();
        let write = sqlx::query("DELETE FROM users")
            .execute(&store.backend.reader)
            .await;
        assert!(write.is_err());
        store.close().await;
    }
}
