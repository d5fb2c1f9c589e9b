//! Runs the shared behaviour suite against every backend, one test per
//! behaviour and backend, so a failure names both (`sqlite::release_push`).
//! Every test gets a fresh store; SQLite ones a database in their own
//! temporary directory.
//!
//! Also holds what only the SQLite backend has to prove: that its file
//! survives being closed and reopened.

use trellis_store::memory::MemoryStore;
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
    };
}

trellis_store::for_each_suite_test!(backend_tests);

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
                    created_at: now,
                })
                .await
                .unwrap();
            store
                .create_project(
                    &Project {
                        name: "shop".into(),
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
