//! The store on PostgreSQL, for several hubs sharing one database
//! (`trellis hub --store postgres://…`).
//!
//! The statements are the shared ones ([`crate::sql`]); this file holds
//! PostgreSQL's connections, its dialect and what only a shared database
//! does ([`crate::cluster`]):
//!
//! - **Writes** run one at a time across every hub: each write transaction
//!   first takes a transaction-scoped advisory lock. The store's rules
//!   (capacity checks, numbering, read-merge-write of configs) are written
//!   for serial writers, as SQLite has them; under PostgreSQL's default
//!   isolation two hubs could otherwise interleave a check and an act.
//!   Reads never wait for it: they run in a `REPEATABLE READ` snapshot.
//!   Link bookkeeping of the hubs themselves (claims, instance beats) are
//!   single atomic statements and skip the lock.
//! - **Changes** are announced by triggers (`migrations-postgres/`) with
//!   `NOTIFY`, in the transaction that made them, and received with
//!   `LISTEN` on a connection of each hub's own ([`Backend::changes`]).
//! - **Job locks** are session advisory locks on a dedicated connection:
//!   they go when that connection does, so a dead hub's jobs are taken up
//!   by another; server-side TCP keepalives notice a hub whose host
//!   vanished.
//! - **A connection handed back must answer within [`RELEASE_CHECK`]**, or
//!   it is closed instead of pooled. The pool checks every connection it
//!   gets back with a round trip that has no deadline of its own; one whose
//!   server went silent (a host gone without a reset, a network partition,
//!   a statement abandoned midway in a state the driver cannot resume)
//!   would otherwise hold its pool slot forever, and a hub whose every slot
//!   is held this way stops serving although the database is fine.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{ConnectOptions, Connection, Postgres, Row, Transaction};
use tokio::sync::{mpsc, oneshot, watch};
use trellis_model::Timestamp;

use crate::cluster::{Change, ChangeFeed, Instance, JobLock, LinkClaim, PoolStats};
use crate::sql::conn::sqlx_conn;
use crate::sql::{Backend, Dialect, SqlStore, backend, int, millis, unsigned};
use crate::{Result, StoreError};

sqlx_conn!(PgConnection, PgRow);

/// The advisory lock every write transaction takes (an arbitrary number
/// that is this store's: "trellis" in ASCII, shortened).
pub(crate) const WRITE_LOCK: i64 = 0x7472_656c_6c69;
/// The advisory lock held while the schema is brought up to date, so hubs
/// starting together migrate once.
const MIGRATE_LOCK: i64 = 0x7472_656c_6c6a;
/// The channel the triggers notify on.
const CHANNEL: &str = "trellis";
/// Changes a hub may fall behind on before it is told it missed some.
const FEED_CAPACITY: usize = 65_536;
/// How often a job lock's connection is checked.
const JOB_PING: Duration = Duration::from_secs(5);
/// How long a connection handed back to the pool may take to answer the
/// check that it is usable (see the module docs).
pub const RELEASE_CHECK: Duration = Duration::from_secs(2);

/// How to open the store.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Connections in the pool (the listener and job locks have their own).
    pub max_connections: u32,
    /// How long opening waits for the server before it gives up.
    pub connect_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            max_connections: 10,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// PostgreSQL's connections. See the module docs.
pub struct PgBackend {
    pool: PgPool,
    options: PgConnectOptions,
    /// Where the database is, for messages (never the password).
    target: String,
    waits: Arc<AtomicU64>,
    wait_nanos: Arc<AtomicU64>,
    /// Connections closed because they did not answer [`RELEASE_CHECK`].
    discarded: Arc<AtomicU64>,
}

/// The check of a connection handed back to the pool, with a deadline: an
/// error closes it (without a goodbye, which could wait as long), so its
/// slot goes to a new connection.
async fn check_released(
    conn: &mut PgConnection,
    discarded: &AtomicU64,
) -> std::result::Result<bool, sqlx::Error> {
    match tokio::time::timeout(RELEASE_CHECK, conn.ping()).await {
        Ok(Ok(())) => Ok(true),
        Ok(Err(e)) => Err(e),
        Err(_) => {
            discarded.fetch_add(1, Ordering::Relaxed);
            Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "a database connection handed back did not answer within {RELEASE_CHECK:?}; closed instead of pooled"
                ),
            )))
        }
    }
}

/// The PostgreSQL store.
pub type PgStore = SqlStore<PgBackend>;

/// Why a `postgres://` URL could not be opened: said for a person starting
/// a hub, naming what to fix.
fn open_error(target: &str, e: sqlx::Error) -> StoreError {
    let hint = match &e {
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some("28P01") | Some("28000") => {
                "check the user name and password in the URL (or PGPASSWORD)"
            }
            Some("3D000") => "create the database first (createdb), or fix its name in the URL",
            _ => "check the URL and the server's log",
        },
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) => {
            "check that PostgreSQL runs there and accepts connections from this host (listen_addresses, pg_hba.conf, a firewall)"
        }
        sqlx::Error::Tls(_) => "check the URL's sslmode and the server's certificate",
        _ => "check the URL",
    };
    StoreError::Backend {
        doing: "connecting to PostgreSQL",
        source: format!("cannot use {target}: {e}; {hint}").into(),
    }
}

impl SqlStore<PgBackend> {
    /// Connects to the database at `url` (`postgres://user:password@host:port/db`,
    /// libpq's parameters as query parameters), brings its schema up to
    /// date and checks it can write.
    pub async fn open(url: &str, options: &PgOptions) -> Result<PgStore> {
        let connect = PgConnectOptions::from_str(url).map_err(|e| StoreError::Backend {
            doing: "reading the PostgreSQL URL",
            source: format!("{e}; the store URL is postgres://USER:PASSWORD@HOST:PORT/DATABASE")
                .into(),
        })?;
        let target = format!(
            "PostgreSQL database {:?} at {}:{} as user {:?}",
            connect.get_database().unwrap_or("(default)"),
            connect.get_host(),
            connect.get_port(),
            connect.get_username()
        );
        let connect = connect
            .application_name("trellis-hub")
            // A hub linking a fleet waits for connections by design (see
            // the SQLite store's note); that is not worth a warning each.
            .log_slow_statements(log::LevelFilter::Debug, Duration::from_secs(5));
        // One connection first, on its own: a pool that cannot connect
        // only says it timed out, this says why (refused, password, …).
        let probe = tokio::time::timeout(
            options.connect_timeout,
            PgConnection::connect_with(&connect),
        )
        .await
        .map_err(|_| {
            let waited = std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {:?}", options.connect_timeout),
            );
            open_error(&target, sqlx::Error::Io(waited))
        })?
        .map_err(|e| open_error(&target, e))?;
        let _ = probe.close().await;
        let discarded = Arc::new(AtomicU64::new(0));
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(2))
            .acquire_timeout(options.connect_timeout)
            .acquire_slow_level(log::LevelFilter::Debug)
            .after_release({
                let discarded = discarded.clone();
                move |conn, _| {
                    let discarded = discarded.clone();
                    Box::pin(async move { check_released(conn, &discarded).await })
                }
            })
            .connect_with(connect.clone())
            .await
            .map_err(|e| open_error(&target, e))?;
        let store = SqlStore::new(PgBackend {
            pool,
            options: connect,
            target,
            waits: Arc::default(),
            wait_nanos: Arc::default(),
            discarded,
        });
        store.backend.migrate().await?;
        Ok(store)
    }

    /// Closes every pooled connection.
    pub async fn close(&self) {
        self.backend.pool.close().await;
    }

    /// Where the database is, for messages.
    pub fn target(&self) -> &str {
        &self.backend.target
    }

    /// The pool, for copying into the database (`trellis hub migrate`) and
    /// for tests.
    pub fn pool(&self) -> &PgPool {
        &self.backend.pool
    }
}

impl PgBackend {
    /// The shared migrations, then PostgreSQL's own, then text columns to
    /// byte order (see `1001_text_in_c.sql`), under one lock so that hubs
    /// starting together do it once.
    async fn migrate(&self) -> Result<()> {
        const DOING: &str = "bringing the database schema up to date";
        let fail = |e: Box<dyn std::error::Error + Send + Sync>| StoreError::Backend {
            doing: DOING,
            source: e,
        };
        let mut conn = self.pool.acquire().await.map_err(backend(DOING))?;
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(MIGRATE_LOCK)
            .execute(&mut *conn)
            .await
            .map_err(backend(DOING))?;
        let result = async {
            let mut shared = sqlx::migrate!("./migrations");
            // Each set ignores the other's versions.
            shared.set_ignore_missing(true);
            shared
                .run(&mut *conn)
                .await
                .map_err(|e| fail(Box::new(e)))?;
            let mut own = sqlx::migrate!("./migrations-postgres");
            own.set_ignore_missing(true);
            own.run(&mut *conn).await.map_err(|e| fail(Box::new(e)))?;
            sqlx::query("SELECT trellis_text_in_c()")
                .execute(&mut *conn)
                .await
                .map_err(backend(DOING))?;
            Ok(())
        }
        .await;
        let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(MIGRATE_LOCK)
            .execute(&mut *conn)
            .await;
        result
    }

    /// Runs `acquire`, counting it as a wait when no connection was idle.
    async fn timed<T>(
        &self,
        acquire: impl std::future::Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, sqlx::Error> {
        if self.pool.num_idle() > 0 {
            return acquire.await;
        }
        let started = Instant::now();
        let result = acquire.await;
        self.waits.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.wait_nanos.fetch_add(nanos, Ordering::Relaxed);
        result
    }

    /// A dedicated connection (not from the pool) whose server notices
    /// within about half a minute when this host goes away.
    async fn dedicated(&self) -> Result<PgConnection, sqlx::Error> {
        let mut conn = PgConnection::connect_with(&self.options).await?;
        for setting in [
            "SET tcp_keepalives_idle = 10",
            "SET tcp_keepalives_interval = 5",
            "SET tcp_keepalives_count = 3",
        ] {
            sqlx::query(setting).execute(&mut conn).await?;
        }
        Ok(conn)
    }
}

fn instance_from(row: &PgRow) -> Result<Instance> {
    let read = |e| backend("reading a hub instance")(e);
    Ok(Instance {
        id: row.try_get("id").map_err(read)?,
        address: row.try_get("address").map_err(read)?,
        version: row.try_get("version").map_err(read)?,
        started_at: crate::sql::time(row, "started_at")?,
        beat_at: crate::sql::time(row, "beat_at")?,
    })
}

fn claim_from(row: &PgRow) -> Result<LinkClaim> {
    let read = |e| backend("reading a link claim")(e);
    let released: Option<i64> = row.try_get("released_at").map_err(read)?;
    Ok(LinkClaim {
        outpost: row.try_get("outpost").map_err(read)?,
        instance: row.try_get("instance").map_err(read)?,
        epoch: unsigned(row.try_get("epoch").map_err(read)?)?,
        since: crate::sql::time(row, "since")?,
        released_at: released
            .map(|ms| {
                chrono::DateTime::from_timestamp_millis(ms)
                    .ok_or_else(|| crate::sql::corrupt(format!("released_at {ms}")))
            })
            .transpose()?,
    })
}

#[async_trait]
impl Backend for PgBackend {
    type Conn = PgConnection;
    type Tx = Transaction<'static, Postgres>;
    type Pooled = PoolConnection<Postgres>;

    const DIALECT: Dialect = Dialect {
        greatest: "GREATEST",
        json_strings: "json_array_elements_text(CAST({} AS json))",
        json_rows: "json_array_elements(CAST({} AS json))",
        json_field: "(CAST({} AS json) ->> '{f}')",
        // A failed statement aborts PostgreSQL's transaction.
    };

    async fn write(&self) -> Result<Self::Tx, sqlx::Error> {
        let mut tx = self.timed(self.pool.begin()).await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(WRITE_LOCK)
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    async fn read(&self) -> Result<Self::Tx, sqlx::Error> {
        self.timed(
            self.pool
                .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"),
        )
        .await
    }

    async fn reader(&self) -> Result<Self::Pooled, sqlx::Error> {
        self.timed(self.pool.acquire()).await
    }

    async fn commit(tx: Self::Tx) -> Result<(), sqlx::Error> {
        tx.commit().await
    }

    fn pool_stats(&self) -> Option<PoolStats> {
        Some(PoolStats {
            waits: self.waits.load(Ordering::Relaxed),
            wait_seconds: self.wait_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            size: self.pool.size(),
            idle: u32::try_from(self.pool.num_idle()).unwrap_or(u32::MAX),
            discarded: self.discarded.load(Ordering::Relaxed),
        })
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn changes(&self) -> Option<ChangeFeed> {
        let (tx, rx) = mpsc::channel(FEED_CAPACITY);
        let options = self.options.clone();
        tokio::spawn(listen(options, tx));
        Some(ChangeFeed(rx))
    }

    async fn beat_instance(&self, instance: &Instance) -> Result<()> {
        sqlx::query(
            "INSERT INTO hub_instances (id, address, version, started_at, beat_at) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (id) DO UPDATE SET address = excluded.address, \
             version = excluded.version, beat_at = excluded.beat_at",
        )
        .bind(&instance.id)
        .bind(&instance.address)
        .bind(&instance.version)
        .bind(millis(instance.started_at))
        .bind(millis(instance.beat_at))
        .execute(&self.pool)
        .await
        .map_err(backend("recording that this hub instance is alive"))?;
        Ok(())
    }

    async fn instances(&self) -> Result<Vec<Instance>> {
        let rows = sqlx::query(
            "SELECT id, address, version, started_at, beat_at FROM hub_instances ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(backend("listing hub instances"))?;
        rows.iter().map(instance_from).collect()
    }

    async fn forget_instance(&self, id: &str) -> Result<()> {
        const DOING: &str = "forgetting a hub instance";
        let mut tx = self.pool.begin().await.map_err(backend(DOING))?;
        sqlx::query(
            "UPDATE link_claims SET released_at = COALESCE(released_at, \
             (SELECT beat_at FROM hub_instances WHERE id = $1)) WHERE instance = $1",
        )
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(backend(DOING))?;
        sqlx::query("DELETE FROM hub_instances WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(backend(DOING))?;
        tx.commit().await.map_err(backend(DOING))
    }

    async fn claim_links(
        &self,
        instance: &str,
        outposts: &[String],
        now: Timestamp,
    ) -> Result<Vec<u64>> {
        const DOING: &str = "recording which hub instance holds outpost links";
        // One statement for the batch; a name twice would make it update
        // one row twice, which PostgreSQL refuses.
        let mut names: Vec<&str> = outposts.iter().map(String::as_str).collect();
        names.sort_unstable();
        names.dedup();
        let rows = sqlx::query(
            "INSERT INTO link_claims (outpost, instance, epoch, since, released_at) \
             SELECT o, $2, 1, $3, NULL FROM unnest($1::text[]) AS o \
             WHERE EXISTS (SELECT 1 FROM outposts WHERE name = o) \
             ON CONFLICT (outpost) DO UPDATE SET instance = excluded.instance, \
             epoch = link_claims.epoch + 1, since = excluded.since, released_at = NULL \
             RETURNING outpost, epoch",
        )
        .bind(&names)
        .bind(instance)
        .bind(millis(now))
        .fetch_all(&self.pool)
        .await
        .map_err(backend(DOING))?;
        let mut epochs = std::collections::HashMap::with_capacity(rows.len());
        for row in &rows {
            let outpost: String = row.try_get("outpost").map_err(backend(DOING))?;
            let epoch: i64 = row.try_get("epoch").map_err(backend(DOING))?;
            epochs.insert(outpost, unsigned(epoch)?);
        }
        // An outpost deleted meanwhile has no claim: epoch 0, which no
        // notification carries.
        Ok(outposts
            .iter()
            .map(|o| epochs.get(o).copied().unwrap_or(0))
            .collect())
    }

    async fn release_link(
        &self,
        instance: &str,
        outpost: &str,
        epoch: u64,
        now: Timestamp,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE link_claims SET released_at = $4 \
             WHERE outpost = $1 AND instance = $2 AND epoch = $3 AND released_at IS NULL",
        )
        .bind(outpost)
        .bind(instance)
        .bind(int(epoch)?)
        .bind(millis(now))
        .execute(&self.pool)
        .await
        .map_err(backend("recording that an outpost link ended"))?;
        Ok(())
    }

    async fn link_claims(&self, instance: Option<&str>) -> Result<Vec<LinkClaim>> {
        let rows = sqlx::query(
            "SELECT outpost, instance, epoch, since, released_at FROM link_claims \
             WHERE $1::text IS NULL OR instance = $1 ORDER BY outpost",
        )
        .bind(instance)
        .fetch_all(&self.pool)
        .await
        .map_err(backend("listing which hub instances hold outpost links"))?;
        rows.iter().map(claim_from).collect()
    }

    async fn link_claim(&self, outpost: &str) -> Result<Option<LinkClaim>> {
        sqlx::query(
            "SELECT outpost, instance, epoch, since, released_at FROM link_claims \
             WHERE outpost = $1",
        )
        .bind(outpost)
        .fetch_optional(&self.pool)
        .await
        .map_err(backend(
            "looking up which hub instance holds an outpost link",
        ))?
        .as_ref()
        .map(claim_from)
        .transpose()
    }

    async fn lock_job(&self, job: &str) -> Result<Option<JobLock>> {
        const DOING: &str = "taking a job's lock";
        let mut conn = self.dedicated().await.map_err(backend(DOING))?;
        let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
            .bind(job)
            .fetch_one(&mut conn)
            .await
            .map_err(backend(DOING))?;
        if !taken {
            let _ = conn.close().await;
            return Ok(None);
        }
        let (held_tx, held) = watch::channel(true);
        let (release, released) = oneshot::channel::<()>();
        tokio::spawn(hold_job_lock(conn, job.to_owned(), held_tx, released));
        Ok(Some(JobLock::new(held, Box::new(release))))
    }

    async fn cluster_secret(&self, name: &str, offer: &str) -> Result<String> {
        const DOING: &str = "sharing the hub's secrets";
        sqlx::query("INSERT INTO hub_secrets (name, value) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(name)
            .bind(offer)
            .execute(&self.pool)
            .await
            .map_err(backend(DOING))?;
        sqlx::query_scalar("SELECT value FROM hub_secrets WHERE name = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await
            .map_err(backend(DOING))
    }
}

/// Holds a job's lock on `conn` until the guard is dropped (then unlocks)
/// or the connection fails (then says so through `held`).
async fn hold_job_lock(
    mut conn: PgConnection,
    job: String,
    held: watch::Sender<bool>,
    mut released: oneshot::Receiver<()>,
) {
    let mut ping = tokio::time::interval(JOB_PING);
    ping.tick().await;
    loop {
        tokio::select! {
            _ = &mut released => {
                let _ = sqlx::query("SELECT pg_advisory_unlock(hashtext($1))")
                    .bind(&job)
                    .execute(&mut conn)
                    .await;
                let _ = conn.close().await;
                return;
            }
            _ = ping.tick() => {
                if let Err(e) = sqlx::query("SELECT 1").execute(&mut conn).await {
                    tracing::warn!(%job, error = %e, "lost the database connection that held a job's lock; the job stops until this hub takes the lock again");
                    let _ = held.send(false);
                    return;
                }
            }
        }
    }
}

/// Receives the triggers' notifications for one subscriber until it goes
/// away. A lost connection is made again, and the subscriber told it may
/// have missed changes meanwhile.
async fn listen(options: PgConnectOptions, feed: mpsc::Sender<Change>) {
    let mut missed = false;
    let mut backoff = Duration::from_millis(100);
    loop {
        if feed.is_closed() {
            return;
        }
        let pool = match PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await
        {
            Ok(pool) => pool,
            Err(e) => {
                tracing::debug!(error = %e, "cannot connect to listen for changes; retrying");
                missed = true;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(mut listener) => match listener.listen(CHANNEL).await {
                Ok(()) => listener,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot listen for changes; retrying");
                    missed = true;
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            },
            Err(e) => {
                tracing::debug!(error = %e, "cannot listen for changes; retrying");
                missed = true;
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        // Do not reconnect behind our back: a new connection is how this
        // loop learns that notifications were lost.
        listener.eager_reconnect(false);
        backoff = Duration::from_millis(100);
        if missed {
            tracing::info!("listening for changes again; re-checking every link");
        }
        loop {
            if missed {
                match feed.try_send(Change::Missed) {
                    Ok(()) => missed = false,
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                    Err(mpsc::error::TrySendError::Full(_)) => {}
                }
            }
            let notification = tokio::select! {
                () = feed.closed() => return,
                n = listener.try_recv() => n,
            };
            match notification {
                Ok(Some(n)) => {
                    let Some(change) = Change::parse(n.payload()) else {
                        continue;
                    };
                    match feed.try_send(change) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Closed(_)) => return,
                        // The subscriber fell far behind: it re-checks
                        // everything instead.
                        Err(mpsc::error::TrySendError::Full(_)) => missed = true,
                    }
                }
                Ok(None) | Err(_) => {
                    tracing::warn!("lost the connection that listens for changes; reconnecting");
                    missed = true;
                    break;
                }
            }
        }
    }
}
