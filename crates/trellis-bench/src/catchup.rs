//! `catchup`: how soon an outpost that was offline while a release was
//! pushed is in sync once its link is back. The link runs through a fault
//! proxy; each run cuts it (connections reset, new ones refused), pushes a
//! release, restores it, and measures from the hub's link-up (the `since`
//! of the link going `online`) to the stage reported `in-sync` at the
//! pushed revision.
//!
//! The agent is the real agent code over mutual TLS and WebSocket with the
//! record-only runtime: what is measured is the link's catch-up (hello,
//! desired state, persist, acknowledge, apply, report), not a workload's
//! start-up or health window, and nothing needs downloading.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use serde_json::json;
use trellis_faultproxy::{FaultProxy, Mode};

use crate::report::{Report, percentile};
use crate::setup::{self, BenchHub};

pub struct Settings {
    pub runs: usize,
    pub json: Option<std::path::PathBuf>,
}

const STATUS: &str = "/projects/bench/stages/line/outpost-status";

pub async fn run(s: Settings) -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let hub = BenchHub::start(&work.path().join("hub")).await?;
    let proxy = FaultProxy::start(hub.addr).await?;
    let dir = work.path().join("agent");
    let agent = hub.joined_agent("edge", &dir).await?;
    setup::route_agent(&agent, proxy.addr())?;
    drop(agent);
    hub.stage_on_outpost("edge").await?;
    hub.api(
        reqwest::Method::POST,
        "/projects/bench/builds",
        Some(crate::scale::image_build()),
    )
    .await?;

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let agent = {
        let dir = dir.clone();
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let mut options = trellis_agent::AgentOptions {
                runtime: Some(Arc::new(trellis_agent::RecordOnly::new(&dir))),
                ..Default::default()
            };
            // Come back quickly once the link is restored: the measurement
            // starts at link-up, so the backoff only costs wall time.
            options.link.backoff = trellis_agent::BackoffConfig {
                base: Duration::from_millis(50),
                cap: Duration::from_millis(500),
                reset_after: Duration::from_secs(30),
            };
            trellis_agent::run(&dir, options, async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await
        })
    };

    let mut times = Vec::with_capacity(s.runs);
    for run in 0..s.runs {
        // Online first, so the cut is a real disconnection.
        wait_for(&hub, |st| st["link"]["state"] == "online").await?;
        proxy.set(Mode::Refuse);
        proxy.drop_connections();
        wait_for(&hub, |st| st["link"]["state"] != "online").await?;
        let release = hub
            .api(
                reqwest::Method::POST,
                "/projects/bench/stages/line/releases",
                Some(json!({})),
            )
            .await?;
        let revision = release["revision"]
            .as_u64()
            .context("the release has a revision")?;
        // Offline for a moment longer than the agent's first retry.
        tokio::time::sleep(Duration::from_millis(200)).await;
        proxy.set(Mode::Pass);
        let synced = wait_for(&hub, |st| {
            st["sync"]["state"] == "in-sync"
                && st["sync"]["applied_revision"].as_u64().unwrap_or(0) >= revision
        })
        .await?;
        let seen = Utc::now();
        let up: DateTime<Utc> = serde_json::from_value(synced["link"]["since"].clone())
            .context("the link view has a since")?;
        let secs = (seen - up).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6;
        if run == 0 {
            eprintln!("first catch-up: {secs:.3} s");
        }
        times.push(secs);
    }
    let _ = stop.send(true);
    agent.await??;

    let mut report = Report::new("catchup", json!({"runs": s.runs}));
    report.add("runs", times.len() as f64, "");
    report.add("link-up → in-sync, p50", percentile(&times, 50.0), "s");
    report.at_most("link-up → in-sync, p99", percentile(&times, 99.0), "s", 1.0);
    report.add("link-up → in-sync, max", percentile(&times, 100.0), "s");
    report.note(
        "link-up is the hub's record of the link going online (after TLS, WebSocket and hello); \
         in-sync is seen by polling the stage's outpost-status every 5 ms, so times include up to \
         one poll",
    );
    report.finish(s.json.as_deref())?;
    Ok(())
}

/// Polls the stage's status every 5 ms until `done` holds (30 s at most).
async fn wait_for(
    hub: &BenchHub,
    done: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<serde_json::Value> {
    let started = Instant::now();
    loop {
        let status = hub.api(reqwest::Method::GET, STATUS, None).await?;
        if done(&status) {
            return Ok(status);
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the stage's status did not reach the expected state within 30 s: {status}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
