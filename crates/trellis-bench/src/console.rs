//! Server time of the console's pages with a large store: one project with
//! 1,000 stages (spread over 20 outposts and the hub's local one), two
//! releases each, and a status report with components and an error for
//! every stage. Each page is requested through the hub's real router and
//! SQLite store, in process, and timed until its whole body is produced.

use std::time::Instant;

use anyhow::{Context, bail};
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use chrono::Utc;
use serde_json::json;
use tower::ServiceExt;
use trellis_hub::{Hub, HubOptions};
use trellis_model::{
    Artifact, BuildComponent, LOCAL_OUTPOST, NewBuild, Outpost, Project, StageType,
};
use trellis_store::{NewRelease, NewStage};

pub struct Settings {
    pub stages: usize,
    pub outposts: usize,
    pub runs: usize,
}

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::open(HubOptions {
        data_dir: dir.path().to_path_buf(),
        ..Default::default()
    })
    .await?;
    let admin = hub
        .first_admin_key()
        .context("a new hub has an admin key")?
        .to_string();
    let started = Instant::now();
    populate(&hub, &settings).await?;
    eprintln!(
        "store filled with {} stages on {} outposts in {:.1} s",
        settings.stages,
        settings.outposts,
        started.elapsed().as_secs_f64()
    );
    // The project page's one store read, alone, for comparison.
    let mut reads = Vec::new();
    for _ in 0..settings.runs {
        let t = Instant::now();
        hub.state()
            .store()
            .list_stage_summaries("plant", trellis_store::StageFilter::All)
            .await?;
        reads.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    reads.sort_by(f64::total_cmp);
    eprintln!(
        "reading the {} stage summaries from the store: median {:.1} ms",
        settings.stages,
        reads[reads.len() / 2]
    );
    let router = hub.router();
    let cookie = sign_in(&router, &admin).await?;

    let middle = format!("s-{:04}", settings.stages / 2);
    let pages = [
        ("projects list", "/projects".to_owned()),
        ("project (all stages)", "/projects/plant".to_owned()),
        ("stage", format!("/projects/plant/stages/{middle}")),
        (
            "connection status",
            format!("/projects/plant/stages/{middle}/status"),
        ),
        ("outposts list", "/outposts".to_owned()),
        ("outpost", "/outposts/o-05".to_owned()),
    ];
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>10}",
        "page", "median ms", "p95 ms", "max ms", "KiB"
    );
    for (name, path) in pages {
        // One untimed request warms caches (the key check, SQLite pages).
        get(&router, &path, &cookie).await?;
        let mut times = Vec::with_capacity(settings.runs);
        let mut size = 0;
        for _ in 0..settings.runs {
            let t = Instant::now();
            size = get(&router, &path, &cookie).await?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        let pick = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
        println!(
            "{name:<22} {:>10.1} {:>10.1} {:>10.1} {:>10.0}",
            pick(0.5),
            pick(0.95),
            pick(1.0),
            size as f64 / 1024.0
        );
    }
    Ok(())
}

async fn populate(hub: &Hub, settings: &Settings) -> anyhow::Result<()> {
    let store = hub.state().store();
    let now = Utc::now();
    store
        .create_project(
            &Project {
                name: "plant".into(),
                display_name: String::new(),
                archived_at: None,
                description: "1,000 stages".into(),
                created_at: now,
            },
            "admin",
        )
        .await?;
    for i in 0..settings.outposts {
        store
            .create_outpost(&Outpost {
                name: format!("o-{i:02}"),
                display_name: format!("Outpost {i}"),
                description: String::new(),
                labels: [("site".to_owned(), format!("plant-{}", i % 3))].into(),
                max_stages: None,
                uri_generation: 1,
                revoked_at: None,
                ingress_domain: None,
                created_at: now,
            })
            .await?;
    }
    let build = store
        .create_build(
            "plant",
            &NewBuild {
                branch: "main".into(),
                commit: "0123456789abcdef0123456789abcdef01234567".into(),
                manifest_file: "trellis.yaml".into(),
                manifest: "version: v1\ncomponents:\n  - name: web\n    docker:\n      image: nginx:1\n  - name: worker\n    docker:\n      image: busybox:1\n".into(),
                components: ["web", "worker"]
                    .into_iter()
                    .map(|name| BuildComponent {
                        name: name.into(),
                        artifact: Artifact::Image {
                            reference: format!("{name}:1"),
                            archive: None,
                            platforms: Vec::new(),
                        },
                    })
                    .collect(),
            },
            "admin",
            now,
        )
        .await?;
    for i in 0..settings.stages {
        let name = format!("s-{i:04}");
        // Every 21st stage runs on the hub itself.
        let outpost = match i % (settings.outposts + 1) {
            0 => LOCAL_OUTPOST.to_owned(),
            n => format!("o-{:02}", n - 1),
        };
        store
            .create_stage(
                &NewStage {
                    project: "plant".into(),
                    name: name.clone(),
                    stage_type: StageType::Prod,
                    display_name: format!("Line {i}"),
                    outpost,
                },
                now,
            )
            .await?;
        for _ in 0..2 {
            store
                .push_release(
                    &NewRelease {
                        project: "plant".into(),
                        stage: name.clone(),
                        build: build.name.clone(),
                        config: None,
                        created_by: "admin".into(),
                    },
                    now,
                )
                .await?;
        }
        store.record_delivered("plant", &name, 2, now).await?;
        let report = json!({
            "project": "plant", "stage": name, "applied_revision": 2, "state": "running",
            "components": [
                {"name": "web", "state": "running", "restarts": 0, "replicas": 1, "running": 1, "release": 2},
                {"name": "worker", "state": "crash-looping", "restarts": 7, "replicas": 1, "running": 0,
                 "release": 2, "message": "exited with status 1"},
            ],
            "errors": [{"source": "agent", "code": "component-crashed", "message": "worker exited with status 1",
                        "hint": "see its logs", "first_seen": now, "last_seen": now, "count": 7}],
        });
        store
            .record_status("plant", &name, 2, None, &report, now)
            .await?;
    }
    Ok(())
}

async fn sign_in(router: &axum::Router, key: &str) -> anyhow::Result<String> {
    let body = format!("key={}", key.replace(':', "%3A"));
    let response = router
        .clone()
        .oneshot(
            Request::post("/login")
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(body))?,
        )
        .await?;
    let cookie = response
        .headers()
        .get(header::SET_COOKIE)
        .context("signing in set no cookie")?
        .to_str()?;
    Ok(cookie.split(';').next().unwrap_or_default().to_owned())
}

/// Requests a page and reads its whole body; returns its size.
async fn get(router: &axum::Router, path: &str, cookie: &str) -> anyhow::Result<usize> {
    let response = router
        .clone()
        .oneshot(
            Request::get(path)
                .header(header::COOKIE, cookie)
                .body(Body::empty())?,
        )
        .await?;
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), 64 << 20).await?;
    if status != StatusCode::OK {
        bail!(
            "GET {path} answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(body.len())
}
