//! Runs the shared behaviour suite against every backend, one test per
//! behaviour and backend, so a failure names both (`sqlite::release_push`).
//! Every test gets a fresh store; SQLite ones a database in their own
//! temporary directory, PostgreSQL ones a database of their own on the test
//! kit's shared server (skipped without PostgreSQL, except under `CI`).
//!
//! Also holds what only the SQLite backend has to prove: that its file
//! survives being closed and reopened, that a join token is used once by
//! concurrent tasks on several threads, and that forced deletions leave no
//! link rows behind in the file.

use trellis_store::memory::MemoryStore;
use trellis_store::postgres::{PgOptions, PgStore};
use trellis_store::sqlite::SqliteStore;

macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod memory {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    let store = MemoryStore::new();
                    trellis_store::testsuite::$name(&store).await;
                }
            )*
        }

        mod sqlite {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    let dir = tempfile::tempdir().unwrap();
                    let store = SqliteStore::open(&dir.path().join("hub.db")).await.unwrap();
                    trellis_store::testsuite::$name(&store).await;
                    store.close().await;
                }
            )*
        }

        /// On the test kit's PostgreSQL, a database per test.
        mod postgres {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    let Some(server) = trellis_testkit::postgres::server() else {
                        return;
                    };
                    let db = server.database();
                    let store = PgStore::open(&db.url, &PgOptions::default()).await.unwrap();
                    trellis_store::testsuite::$name(&store).await;
                    store.close().await;
                }
            )*
        }
    };
}

trellis_store::for_each_suite_test!(backend_tests);

/// What a store several hubs share must do, with two handles on one store:
/// the same in-memory store twice, or two pools on one PostgreSQL database
/// (as two hub processes would have).
macro_rules! shared_tests {
    ($($name:ident),* $(,)?) => {
        mod memory_shared {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    let store = MemoryStore::new();
                    trellis_store::testsuite::$name(&store, &store).await;
                }
            )*
        }

        mod postgres_shared {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(server) = trellis_testkit::postgres::server() else {
                        return;
                    };
                    let db = server.database();
                    let a = PgStore::open(&db.url, &PgOptions::default()).await.unwrap();
                    let b = PgStore::open(&db.url, &PgOptions::default()).await.unwrap();
                    trellis_store::testsuite::$name(&a, &b).await;
                    a.close().await;
                    b.close().await;
                }
            )*
        }
    };
}

trellis_store::for_each_shared_suite_test!(shared_tests);

mod sqlite_file {
    use chrono::DateTime;
    use trellis_model::{Outpost, Project, StageType, User};
    use trellis_store::{NewStage, Store};

    use super::*;

    /// Dropped without `close`, as a killed hub would leave it: what was
    /// acknowledged must be there after reopening, and reopening must not
    /// re-run (and so wipe or duplicate) the migrations.
    #[tokio::test]
    async fn data_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        let now = DateTime::from_timestamp_millis(1_700_000_000_000).unwrap();
        let stage = {
            let store = SqliteStore::open(&path).await.unwrap();
            store
                .create_user(&User {
                    name: "alice".into(),
                    admin: true,
                    created_at: now,
                })
                .await
                .unwrap();
            store
                .create_outpost(&Outpost {
                    name: "local".into(),
                    display_name: "Hub".into(),
                    description: String::new(),
                    labels: Default::default(),
                    max_stages: None,
                    uri_generation: 1,
                    revoked_at: None,
                    ingress_domain: None,
                    created_at: now,
                })
                .await
                .unwrap();
            store
                .create_project(
                    &Project {
                        name: "shop".into(),
                        display_name: String::new(),
                        archived_at: None,
                        description: String::new(),
                        created_at: now,
                    },
                    "alice",
                )
                .await
                .unwrap();
            store
                .create_stage(
                    &NewStage {
                        project: "shop".into(),
                        name: "dev".into(),
                        stage_type: StageType::Dev,
                        display_name: "Dev".into(),
                        outpost: "local".into(),
                    },
                    now,
                )
                .await
                .unwrap()
        };

        for _ in 0..2 {
            let store = SqliteStore::open(&path).await.unwrap();
            assert!(store.get_user("alice").await.unwrap().admin);
            assert_eq!(store.list_projects().await.unwrap().len(), 1);
            assert_eq!(store.get_stage("shop", "dev").await.unwrap(), stage);
            store.close().await;
        }

        // The bookkeeping of applied migrations holds each exactly once.
        let pool = sqlx::SqlitePool::connect_with(
            sqlx::sqlite::SqliteConnectOptions::new().filename(&path),
        )
        .await
        .unwrap();
        let applied: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
                .fetch_all(&pool)
                .await
                .unwrap();
        let embedded = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
            .unwrap()
            .count();
        assert_eq!(applied.len(), embedded);
        assert_eq!(applied.first(), Some(&1));
        pool.close().await;
    }

    #[tokio::test]
    async fn opening_fails_clearly_without_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let err = SqliteStore::open(&dir.path().join("missing/hub.db"))
            .await
            .err()
            .expect("opening a database in a missing directory");
        assert!(err.to_string().contains("opening the database"), "{err}");
    }
}

mod sqlite_link {
    use std::path::Path;
    use std::sync::Arc;

    use chrono::DateTime;
    use trellis_model::{Outpost, OutpostLink, Project, StageType, Timestamp, User};
    use trellis_store::{JoinTokenRefusal, NewStage, Store, StoreError};

    use super::*;

    fn at(ms: i64) -> Timestamp {
        DateTime::from_timestamp_millis(1_700_000_000_000 + ms).unwrap()
    }

    /// User alice, outpost `edge`, and project `name` owned by alice,
    /// creating whichever is missing.
    async fn setup(store: &SqliteStore, name: &str) {
        let user = store
            .create_user(&User {
                name: "alice".into(),
                admin: false,
                created_at: at(0),
            })
            .await;
        let outpost = store
            .create_outpost(&Outpost {
                name: "edge".into(),
                display_name: "Edge".into(),
                description: String::new(),
                labels: Default::default(),
                max_stages: None,
                uri_generation: 1,
                revoked_at: None,
                ingress_domain: None,
                created_at: at(0),
            })
            .await;
        for created in [user, outpost] {
            match created {
                Ok(()) | Err(StoreError::AlreadyExists { .. }) => {}
                Err(e) => panic!("setting up: {e}"),
            }
        }
        store
            .create_project(
                &Project {
                    name: name.into(),
                    display_name: String::new(),
                    archived_at: None,
                    description: String::new(),
                    created_at: at(0),
                },
                "alice",
            )
            .await
            .unwrap();
    }

    /// The rows of a table, read straight from the file.
    async fn rows(path: &Path, table: &str) -> i64 {
        let pool = sqlx::SqlitePool::connect_with(
            sqlx::sqlite::SqliteConnectOptions::new().filename(path),
        )
        .await
        .unwrap();
        let n = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        n
    }

    /// Tasks on different threads, each with its own transaction, racing
    /// for one token: exactly one gets the outpost, every time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_consumers_use_a_token_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("hub.db")).await.unwrap());
        setup(&store, "shop").await;
        for round in 0..16 {
            let hash = format!("hash-{round}");
            store
                .create_join_token(&hash, "edge", at(10_000))
                .await
                .unwrap();
            let racers: Vec<_> = (0..2)
                .map(|_| {
                    let store = Arc::clone(&store);
                    let hash = hash.clone();
                    tokio::spawn(async move { store.consume_join_token(&hash, at(5)).await })
                })
                .collect();
            let mut won = 0;
            for racer in racers {
                match racer.await.unwrap().unwrap() {
                    Ok(outpost) => {
                        assert_eq!(outpost, "edge");
                        won += 1;
                    }
                    Err(refusal) => assert_eq!(refusal, JoinTokenRefusal::AlreadyUsed),
                }
            }
            assert_eq!(won, 1, "round {round}");
        }
        store.close().await;
    }

    /// Each forced deletion removes exactly the link rows of what it
    /// deletes, and the file is left without a dangling reference.
    #[tokio::test]
    async fn forced_deletions_leave_no_link_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        let store = SqliteStore::open(&path).await.unwrap();
        setup(&store, "shop").await;
        setup(&store, "lab").await;
        for (project, stage) in [("shop", "dev"), ("shop", "qa"), ("lab", "dev")] {
            store
                .create_stage(
                    &NewStage {
                        project: project.into(),
                        name: stage.into(),
                        stage_type: StageType::Dev,
                        display_name: stage.into(),
                        outpost: "edge".into(),
                    },
                    at(1),
                )
                .await
                .unwrap();
            store
                .record_delivered(project, stage, 1, at(2))
                .await
                .unwrap();
            store
                .record_status(project, stage, 1, None, &serde_json::json!({}), at(3))
                .await
                .unwrap();
        }
        store
            .put_outpost_link(&OutpostLink {
                outpost: "edge".into(),
                agent: Some(serde_json::json!({ "version": "1" })),
                ..OutpostLink::default()
            })
            .await
            .unwrap();
        for hash in ["used", "fresh"] {
            store
                .create_join_token(hash, "edge", at(10_000))
                .await
                .unwrap();
        }
        store
            .consume_join_token("used", at(4))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rows(&path, "stage_syncs").await, 3);

        store.delete_stage("shop", "dev", true).await.unwrap();
        assert_eq!(rows(&path, "stage_syncs").await, 2);
        store.delete_project("shop", true).await.unwrap();
        assert_eq!(rows(&path, "stage_syncs").await, 1);
        assert_eq!(rows(&path, "outpost_links").await, 1);
        assert_eq!(rows(&path, "join_tokens").await, 2);
        store.delete_outpost("edge", true).await.unwrap();
        for table in ["stage_syncs", "outpost_links", "join_tokens", "stages"] {
            assert_eq!(rows(&path, table).await, 0, "{table}");
        }
        store.close().await;

        let pool = sqlx::SqlitePool::connect_with(
            sqlx::sqlite::SqliteConnectOptions::new().filename(&path),
        )
        .await
        .unwrap();
        let dangling = sqlx::query("PRAGMA foreign_key_check")
            .fetch_all(&pool)
            .await
            .unwrap();
        assert!(
            dangling.is_empty(),
            "{} dangling reference(s)",
            dangling.len()
        );
        pool.close().await;
    }
}
