//! What only the PostgreSQL store has to prove, on real servers of the test
//! kit: bad URLs are refused at once with what to fix, a hub that lost its
//! listening connection is told it may have missed changes, a job's lock
//! goes with its connection, and nothing acknowledged is lost when the
//! server restarts.

use std::time::Duration;

use chrono::Utc;
use trellis_model::{Outpost, User};
use trellis_store::postgres::{PgOptions, PgStore};
use trellis_store::{Change, Store};

fn quick() -> PgOptions {
    PgOptions {
        connect_timeout: Duration::from_secs(3),
        ..PgOptions::default()
    }
}

async fn refused(url: &str) -> String {
    match PgStore::open(url, &quick()).await {
        Ok(_) => panic!("{url} opened"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn bad_urls_are_refused_naming_what_to_fix() {
    let Some(server) = trellis_testkit::postgres::server() else {
        return;
    };
    let db = server.database();
    let unreachable = trellis_testkit::free_port(None);
    let e = refused(&format!(
        "postgres://trellis:trellis@127.0.0.1:{unreachable}/x"
    ))
    .await;
    assert!(e.contains(&format!("127.0.0.1:{unreachable}")), "{e}");
    assert!(e.contains("check that PostgreSQL runs there"), "{e}");

    let e = refused(&db.url.replace("trellis:trellis@", "trellis:wrong@")).await;
    assert!(e.contains("password authentication failed"), "{e}");
    assert!(e.contains("check the user name and password"), "{e}");
    assert!(!e.contains("wrong"), "the password is never shown: {e}");

    let e = refused(&server.url("no_such_database")).await;
    assert!(e.contains("no_such_database"), "{e}");
    assert!(e.contains("create the database first"), "{e}");

    let e = refused("postgres://trellis@127.0.0.1:notaport/x").await;
    assert!(
        e.contains("postgres://USER:PASSWORD@HOST:PORT/DATABASE"),
        "{e}"
    );
}

fn outpost(name: &str) -> Outpost {
    Outpost {
        name: name.into(),
        display_name: name.into(),
        description: String::new(),
        labels: Default::default(),
        max_stages: None,
        uri_generation: 1,
        revoked_at: None,
        ingress_domain: None,
        created_at: Utc::now(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_loses_nothing_and_listeners_hear_they_missed_changes() {
    let Some(pg) = trellis_testkit::postgres::PrivatePostgres::start() else {
        return;
    };
    let store = PgStore::open(&pg.url(), &PgOptions::default())
        .await
        .unwrap();
    let mut feed = store.changes().unwrap();
    let mut lock = store.lock_job("collect-garbage").await.unwrap().unwrap();
    store
        .create_user(&User {
            name: "alice".into(),
            admin: true,
            created_at: Utc::now(),
        })
        .await
        .unwrap();
    store.create_outpost(&outpost("before")).await.unwrap();

    // A crash of the server: what was acknowledged must be there after it.
    pg.stop(false);
    tokio::time::timeout(Duration::from_secs(20), lock.lost())
        .await
        .expect("the job's lock is known lost once its connection is");
    assert!(store.create_outpost(&outpost("during")).await.is_err());
    pg.resume();

    // The listener comes back by itself and says changes may have been
    // missed meanwhile.
    let missed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match feed.recv().await {
                Some(Change::Missed) => return,
                Some(_) => continue,
                None => panic!("the feed ended"),
            }
        }
    })
    .await;
    assert!(missed.is_ok(), "no Missed after the server came back");
    // The pool reconnects by itself too.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match store.create_outpost(&outpost("after")).await {
            Ok(()) => break,
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the store did not recover: {e}"),
        }
    }
    let names: Vec<String> = store
        .list_outposts()
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.name)
        .collect();
    assert_eq!(names, ["after", "before"]);
    assert!(store.get_user("alice").await.unwrap().admin);
    // And the lock can be taken again.
    assert!(store.lock_job("collect-garbage").await.unwrap().is_some());
    store.close().await;
}

/// `trellis hub migrate`'s copy: a SQLite hub's every record arrives in
/// PostgreSQL as it was, and the copy refuses a database that holds a hub.
#[tokio::test]
async fn a_sqlite_hub_copies_into_postgres_whole() {
    use trellis_model::{ComponentAction, ConfigData, NewBuild, Project, Role, StageType};
    use trellis_store::sqlite::SqliteStore;
    use trellis_store::{
        LinkActivity, LinkHello, NewRelease, NewStage, StoredAccessKey, SyncUpdate,
    };

    let Some(server) = trellis_testkit::postgres::server() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteStore::open(&dir.path().join("hub.db")).await.unwrap();
    let now = Utc::now();
    let s: &dyn Store = &sqlite;
    s.create_user(&User {
        name: "admin".into(),
        admin: true,
        created_at: now,
    })
    .await
    .unwrap();
    s.create_user(&User {
        name: "bob".into(),
        admin: false,
        created_at: now,
    })
    .await
    .unwrap();
    s.create_access_key(&StoredAccessKey {
        info: trellis_model::AccessKeyInfo {
            id: "tk_1".into(),
            user: "bob".into(),
            description: "laptop".into(),
            created_at: now,
        },
        secret_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
    })
    .await
    .unwrap();
    s.create_project(
        &Project {
            name: "shop".into(),
            display_name: "The shop".into(),
            description: "the shop".into(),
            created_at: now,
            archived_at: None,
        },
        "admin",
    )
    .await
    .unwrap();
    s.set_member("shop", "bob", Role::Member).await.unwrap();
    s.create_outpost(&outpost("local")).await.unwrap();
    s.create_outpost(&outpost("edge")).await.unwrap();
    s.create_join_token("hash-1", "edge", now + chrono::Duration::hours(1))
        .await
        .unwrap();
    let mut link = s.get_outpost_link("edge").await.unwrap();
    link.key_fingerprint = Some("sha256:abc".into());
    s.put_outpost_link(&link).await.unwrap();
    s.record_link_activity(&[LinkActivity {
        outpost: "edge".into(),
        seen: now,
        hello: Some(LinkHello {
            agent: serde_json::json!({"version": "1"}),
            cert_serial: "5e".into(),
            cert_not_after: now,
        }),
        disconnect: None,
    }])
    .await
    .unwrap();
    for (name, outpost) in [("dev", "local"), ("line", "edge")] {
        s.create_stage(
            &NewStage {
                project: "shop".into(),
                name: name.into(),
                stage_type: StageType::Dev,
                display_name: name.into(),
                outpost: outpost.into(),
            },
            now,
        )
        .await
        .unwrap();
    }
    let build = s
        .create_build(
            "shop",
            &NewBuild {
                branch: "main".into(),
                commit: "0".repeat(40),
                manifest_file: "trellis.yaml".into(),
                manifest: "version: v1\ncomponents: []\n".into(),
                components: vec![],
            },
            "admin",
            now,
        )
        .await
        .unwrap();
    s.add_config_data(
        "shop",
        "line",
        "app",
        &ConfigData {
            env: [("A".to_owned(), "1".to_owned())].into(),
            files: Default::default(),
            ..Default::default()
        },
        now,
    )
    .await
    .unwrap();
    for _ in 0..3 {
        s.push_release(
            &NewRelease {
                project: "shop".into(),
                stage: "line".into(),
                build: build.name.clone(),
                config: None,
                created_by: "admin".into(),
            },
            now,
        )
        .await
        .unwrap();
    }
    s.control_component("shop", "line", "web", ComponentAction::Stop)
        .await
        .unwrap();
    s.record_sync_batch(
        &[
            SyncUpdate::Delivered {
                project: "shop".into(),
                stage: "line".into(),
                revision: 4,
            },
            SyncUpdate::Status {
                project: "shop".into(),
                stage: "line".into(),
                applied_revision: 2,
                failed_revision: None,
                report: serde_json::json!({"state": "running"}),
            },
        ],
        now,
    )
    .await
    .unwrap();

    let db = server.database();
    let pg = PgStore::open(&db.url, &PgOptions::default()).await.unwrap();
    let report = trellis_store::copy::sqlite_to_postgres(&sqlite, &pg)
        .await
        .unwrap();
    assert_eq!(report.rows("users"), 2);
    assert_eq!(report.rows("releases"), 3);
    assert_eq!(report.rows("stages"), 2);
    assert_eq!(report.rows("join_tokens"), 1);
    assert_eq!(report.rows("component_controls"), 1);

    let p: &dyn Store = &pg;
    assert_eq!(p.list_users().await.unwrap(), s.list_users().await.unwrap());
    assert_eq!(
        p.find_access_key("tk_1").await.unwrap(),
        s.find_access_key("tk_1").await.unwrap()
    );
    assert_eq!(
        p.list_members("shop").await.unwrap(),
        s.list_members("shop").await.unwrap()
    );
    assert_eq!(
        p.list_outposts().await.unwrap(),
        s.list_outposts().await.unwrap()
    );
    assert_eq!(
        p.get_outpost_link("edge").await.unwrap(),
        s.get_outpost_link("edge").await.unwrap()
    );
    assert_eq!(
        p.list_stages("shop").await.unwrap(),
        s.list_stages("shop").await.unwrap()
    );
    assert_eq!(
        p.list_builds("shop").await.unwrap(),
        s.list_builds("shop").await.unwrap()
    );
    assert_eq!(
        p.list_configs("shop", None).await.unwrap(),
        s.list_configs("shop", None).await.unwrap()
    );
    assert_eq!(
        p.list_releases("shop", "line").await.unwrap(),
        s.list_releases("shop", "line").await.unwrap()
    );
    assert_eq!(
        p.get_stage_sync("shop", "line").await.unwrap(),
        s.get_stage_sync("shop", "line").await.unwrap()
    );
    assert_eq!(
        p.list_component_controls("shop", "line").await.unwrap(),
        s.list_component_controls("shop", "line").await.unwrap()
    );
    // Numbering goes on where it was.
    let next = p
        .push_release(
            &NewRelease {
                project: "shop".into(),
                stage: "line".into(),
                build: build.name.clone(),
                config: None,
                created_by: "admin".into(),
            },
            now,
        )
        .await
        .unwrap();
    assert_eq!((next.number, next.revision), (4, 5));
    assert_eq!(
        p.consume_join_token("hash-1", now).await.unwrap(),
        Ok("edge".to_owned())
    );

    // A second copy into the same database is refused: it holds a hub now.
    let again = trellis_store::copy::sqlite_to_postgres(&sqlite, &pg)
        .await
        .unwrap_err();
    assert!(again.to_string().contains("already holds a hub"), "{again}");
    pg.close().await;
    sqlite.close().await;
}

/// Callers give up on store calls: a link whose agent went away drops its
/// session mid-statement, a health check stops waiting, an HTTP client
/// disconnects. However many calls are abandoned, and wherever in the
/// wire protocol they are cut, every pooled connection comes back, and
/// the store answers afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_abandoned_midway_give_every_connection_back() {
    let Some(server) = trellis_testkit::postgres::server() else {
        return;
    };
    let db = server.database();
    let store = PgStore::open(
        &db.url,
        &PgOptions {
            max_connections: 4,
            connect_timeout: Duration::from_secs(3),
        },
    )
    .await
    .unwrap();
    store.create_outpost(&outpost("edge")).await.unwrap();
    // Enough rows that a listing's answer spans several reads.
    for i in 0..300 {
        let mut o = outpost(&format!("many-{i}"));
        o.description = "x".repeat(200);
        store.create_outpost(&o).await.unwrap();
    }
    let store = std::sync::Arc::new(store);
    // Give up after 0 to ~1.5 ms: before acquiring, while a statement is
    // written, while its answer is read, between statements.
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..4_000u64 {
        let store = store.clone();
        calls.spawn(async move {
            let patience = Duration::from_micros((i * 7_919) % 3_000);
            let _ = tokio::time::timeout(patience, async {
                if i % 3 == 0 {
                    let mut o = outpost(&format!("o{i}"));
                    o.description = "abandoned".into();
                    let _ = store.create_outpost(&o).await;
                } else {
                    let _ = store.list_outposts().await;
                }
            })
            .await;
        });
        if calls.len() >= 32 {
            calls.join_next().await;
        }
    }
    while calls.join_next().await.is_some() {}

    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let stats = store.pool_stats().expect("PostgreSQL reports its pool");
        if stats.idle == stats.size {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "connections never came back: {} in the pool, {} idle",
            stats.size,
            stats.idle
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And the pool serves more callers than it has connections.
    let mut after = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let store = store.clone();
        after.spawn(async move { store.get_outpost("edge").await.map(|o| o.name) });
    }
    while let Some(answer) = after.join_next().await {
        assert_eq!(answer.unwrap().unwrap(), "edge");
    }
}

/// A connection whose server goes silent while a hub has it checked out —
/// the database's host gone without a reset, a partition — is closed when
/// handed back instead of holding its pool slot forever; once the network
/// heals the store answers with the slots it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_gone_silent_gives_its_slot_back() {
    use trellis_faultproxy::{FaultProxy, Mode};
    use trellis_store::postgres::RELEASE_CHECK;

    let Some(server) = trellis_testkit::postgres::server() else {
        return;
    };
    let db = server.database();
    let direct = format!("127.0.0.1:{}", server.port());
    let proxy = FaultProxy::start(direct.parse().unwrap()).await.unwrap();
    let url = db.url.replace(&direct, &proxy.addr().to_string());
    let store = PgStore::open(&url, &quick()).await.unwrap();
    store.create_outpost(&outpost("edge")).await.unwrap();
    // Connections the pool is still taking back are checked too: let
    // them settle, so only the one held below meets the silence.
    while store.pool_stats().is_some_and(|s| s.idle < s.size) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let held = store.pool().acquire().await.unwrap();
    proxy.set(Mode::Blackhole);
    drop(held);
    let deadline = tokio::time::Instant::now() + RELEASE_CHECK + Duration::from_secs(5);
    loop {
        let stats = store.pool_stats().unwrap();
        if stats.discarded == 1 && stats.size == stats.idle {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the silent connection still holds its slot: {} in the pool, {} idle, {} discarded",
            stats.size,
            stats.idle,
            stats.discarded
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    proxy.set(Mode::Pass);
    assert_eq!(store.get_outpost("edge").await.unwrap().name, "edge");
    proxy.shutdown().await;
}
