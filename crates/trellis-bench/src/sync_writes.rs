//! The hub's group commit of what agents acknowledge, measured at the
//! store: `record_sync_batch` with a batch of deliveries, one of status
//! reports, and one mixing both (a delivery and a report per stage, as
//! links send them), each as large as the hub's batches get (1,000). On
//! SQLite, and on PostgreSQL where the test kit can start one.
//!
//! Each batch holds the store's one writer for its whole time; every push
//! request waits behind it. So this is what a fleet's acknowledgements cost
//! a push to the same fleet.

use std::time::Instant;

use anyhow::Context;
use chrono::Utc;
use serde_json::json;
use trellis_model::{Artifact, BuildComponent, NewBuild};
use trellis_store::{NewRelease, Store, SyncUpdate};

use crate::setup::median;

pub struct Settings {
    pub stages: usize,
    pub runs: usize,
    /// Also on PostgreSQL (started by the test kit) when it can run here.
    pub postgres: bool,
}

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let sqlite = trellis_store::sqlite::SqliteStore::open(&dir.path().join("hub.db")).await?;
    measure("SQLite", &sqlite, &settings).await?;
    sqlite.close().await;
    if !settings.postgres {
        return Ok(());
    }
    let Some(server) = trellis_testkit::postgres::server() else {
        eprintln!("PostgreSQL cannot run here: measured on SQLite only");
        return Ok(());
    };
    let db = server.database();
    let pg = trellis_store::postgres::PgStore::open(&db.url, &Default::default()).await?;
    measure("PostgreSQL", &pg, &settings).await?;
    pg.close().await;
    Ok(())
}

async fn measure(backend: &str, store: &dyn Store, settings: &Settings) -> anyhow::Result<()> {
    let n = settings.stages;
    trellis_store::testsuite::seed_stages(store, "plant", n).await;
    let build = store
        .create_build("plant", &build(), "bench", Utc::now())
        .await
        .context("creating the build")?;
    let stage = |i: usize| format!("s{i}");
    let report = json!({
        "components": [{ "name": "web", "state": "running", "pid": 4242, "restarts": 0 }]
    });
    let (mut delivered, mut reported, mut mixed) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..settings.runs as u64 {
        // Two releases per stage and run: revisions 2r+1 and 2r+2. The
        // first is delivered and reported alone, the second both at once.
        for _ in 0..2 {
            let releases: Vec<_> = (0..n)
                .map(|i| NewRelease {
                    project: "plant".into(),
                    stage: stage(i),
                    build: build.name.clone(),
                    config: None,
                    created_by: "bench".into(),
                })
                .collect();
            store.push_releases(&releases, Utc::now()).await?;
        }
        let first = 2 * run + 1;
        let deliveries: Vec<_> = (0..n)
            .map(|i| SyncUpdate::Delivered {
                project: "plant".into(),
                stage: stage(i),
                revision: first,
            })
            .collect();
        delivered.push(timed(store, &deliveries).await?);
        let reports: Vec<_> = (0..n)
            .map(|i| SyncUpdate::Status {
                project: "plant".into(),
                stage: stage(i),
                applied_revision: first,
                failed_revision: None,
                report: report.clone(),
            })
            .collect();
        reported.push(timed(store, &reports).await?);
        let both: Vec<_> = (0..n / 2)
            .flat_map(|i| {
                [
                    SyncUpdate::Delivered {
                        project: "plant".into(),
                        stage: stage(i),
                        revision: first + 1,
                    },
                    SyncUpdate::Status {
                        project: "plant".into(),
                        stage: stage(i),
                        applied_revision: first + 1,
                        failed_revision: None,
                        report: report.clone(),
                    },
                ]
            })
            .collect();
        mixed.push(timed(store, &both).await?);
    }
    println!(
        "{backend}: a batch of {n} deliveries {:.1} ms, of {n} status reports {:.1} ms, \
         of {n} mixed (a delivery and a report each for {} stages) {:.1} ms \
         (medians of {} runs)",
        median(delivered),
        median(reported),
        n / 2,
        median(mixed),
        settings.runs,
    );
    Ok(())
}

/// Milliseconds to write `updates` as one batch; every one must be kept.
async fn timed(store: &dyn Store, updates: &[SyncUpdate]) -> anyhow::Result<f64> {
    let started = Instant::now();
    let answers = store.record_sync_batch(updates, Utc::now()).await?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    for answer in answers {
        answer.context("a batched sync write was refused")?;
    }
    Ok(ms)
}

fn build() -> NewBuild {
    NewBuild {
        branch: "main".into(),
        commit: "0123456789abcdef0123456789abcdef01234567".into(),
        manifest_file: "trellis.yaml".into(),
        manifest: "version: 1\ncomponents: {}\n".into(),
        components: vec![BuildComponent {
            name: "web".into(),
            artifact: Artifact::Image {
                reference: "registry.example/web:1".into(),
                archive: None,
                platforms: Vec::new(),
            },
        }],
    }
}
