//! `rollout`: a rollout over the fleet's stages in waves, the hub judging
//! each wave (its success threshold) before it starts the next, timed per
//! wave against a plain fan-out push of the same stages in the same run.
//!
//! The fleet and the stages are the `fanout` scenario's (project `fanout`,
//! stage `s<i>` on outpost `edge-<i>`). A wave's time is the hub's own
//! record: from the wave's start (`started_at`, when the driver began
//! pushing it) to its verdict (`finished_at`, when the driver saw the
//! threshold met). The plain fan-out of a wave pushes the release to the
//! same stages the way `fanout` does (requests of ≤ 1,000 stages, one after
//! the other) and takes the time from its first push until the last of
//! them was seen applied.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::fleet::{self, HubChild, WorkerMode, Workers};
use crate::report::Report;
use crate::scale::{Common, FANOUT_PROJECT, place_stages, push_and_watch_stages};

pub struct RolloutSettings {
    pub stages: usize,
    /// Cumulative wave sizes, as `trellis create rollout --waves` takes them.
    pub waves: String,
    pub threshold: String,
    /// Rounds of (plain fan-outs, rollout), alternating which goes first.
    pub rounds: usize,
}

/// A selector every outpost of the fleet matches (they carry no labels).
const EVERY_OUTPOST: &str = "!bench-excluded";

/// Time per wave against a plain fan-out of the same stages: issue 21
/// holds the rollout to at most this factor.
const GOAL_RATIO: f64 = 1.2;

pub async fn rollout(common: Common, s: RolloutSettings) -> anyhow::Result<()> {
    let n = s.stages;
    let (hub, _) = fleet::prepare(&common.trellis, &common.dirs, n, &common.hub_args).await?;
    place_stages(&hub, n).await?;
    let hub = Arc::new(hub);
    let build = newest_build(&hub).await?;

    // The plan the hub would follow: each wave's stages (stable for the
    // same selection, so the plain pushes below name the same stages).
    let plan = hub
        .api(
            reqwest::Method::POST,
            &format!("/projects/{FANOUT_PROJECT}/rollouts"),
            Some(rollout_request(&build, &s, true)),
        )
        .await?;
    let waves = plan["waves"].as_array().context("the plan's waves")?.len();
    let mut members: Vec<Vec<String>> = vec![Vec::new(); waves];
    for stage in plan["stages"].as_array().context("the plan's stages")? {
        let wave = stage["wave"].as_u64().context("a stage's wave")? as usize;
        let name = stage["stage"].as_str().context("a stage's name")?;
        members
            .get_mut(wave)
            .context("a stage in a wave the plan lacks")?
            .push(name.to_owned());
    }
    if members.iter().map(Vec::len).sum::<usize>() != n {
        bail!(
            "the rollout would cover {} stages, not {n}: the hub holds other stages in project {FANOUT_PROJECT:?}",
            members.iter().map(Vec::len).sum::<usize>()
        );
    }

    eprintln!("linking {n} outposts");
    let workers = Workers::start(&common.dirs, n, WorkerMode::Agents)?;
    fleet::wait_connected(&hub, n, Duration::from_secs(1800)).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;

    // Per wave: seconds of each round's plain fan-out and rollout wave.
    let mut plain: Vec<Vec<f64>> = vec![Vec::new(); waves];
    let mut rolled: Vec<Vec<f64>> = vec![Vec::new(); waves];
    // Per wave, per round, where the time went: start → releases
    // recorded → first and last stage applied (→ the rollout's verdict).
    let mut plain_split: Vec<Split> = vec![Split::default(); waves];
    let mut rolled_split: Vec<Split> = vec![Split::default(); waves];
    let mut totals = Vec::new();
    let mut gaps = Vec::new();
    for round in 0..s.rounds.max(1) {
        let rollout_first = round % 2 == 1;
        if rollout_first {
            let run = run_rollout(&hub, &build, &s, &members).await?;
            record_rollout(&run, &mut rolled, &mut totals, &mut gaps);
            record_split(&run, &mut rolled_split);
        }
        for (w, names) in members.iter().enumerate() {
            eprintln!(
                "round {}: plain fan-out of wave {}'s {} stages",
                round + 1,
                w + 1,
                names.len()
            );
            let run =
                push_and_watch_stages(hub.clone(), names.clone(), crate::scale::PUSH_CHUNK).await?;
            if run.applied_at.len() != names.len() {
                bail!(
                    "the plain fan-out of wave {}: {} of {} stages applied",
                    w + 1,
                    run.applied_at.len(),
                    names.len()
                );
            }
            let last = run.applied_at.values().copied().fold(0.0, f64::max);
            let first = run.applied_at.values().copied().fold(f64::MAX, f64::min);
            plain[w].push(last);
            plain_split[w].spans.push((first, last));
            plain_split[w].recorded.push(run.first_recorded);
        }
        if !rollout_first {
            let run = run_rollout(&hub, &build, &s, &members).await?;
            record_rollout(&run, &mut rolled, &mut totals, &mut gaps);
            record_split(&run, &mut rolled_split);
        }
    }
    workers.stop();

    let mut report = Report::new(
        "rollout",
        json!({"stages": n, "waves": s.waves, "threshold": s.threshold,
               "rounds": s.rounds, "hub_args": common.hub_args}),
    );
    for w in 0..waves {
        let size = members[w].len();
        let p = crate::setup::median(plain[w].clone());
        let r = crate::setup::median(rolled[w].clone());
        report.add(
            format!(
                "wave {} ({size} stages): plain fan-out, first push → last applied",
                w + 1
            ),
            p,
            "s",
        );
        report.add(
            format!("wave {}: rollout, wave start → wave passed", w + 1),
            r,
            "s",
        );
        report.at_most(
            format!("wave {}: rollout ÷ plain fan-out", w + 1),
            r / p.max(1e-6),
            "×",
            GOAL_RATIO,
        );
        let median = |v: Vec<f64>| crate::setup::median(v);
        let first = |split: &Split| median(split.spans.iter().map(|s| s.0).collect());
        let (plain_w, rolled_w) = (&plain_split[w], &rolled_split[w]);
        for (what, secs) in [
            (
                "releases recorded, plain fan-out",
                median(plain_w.recorded.clone()),
            ),
            (
                "releases recorded, rollout wave",
                median(rolled_w.recorded.clone()),
            ),
            ("first stage applied, plain fan-out", first(plain_w)),
            ("first stage applied, rollout wave", first(rolled_w)),
            (
                "last stage applied, rollout",
                median(rolled_w.spans.iter().map(|s| s.1).collect()),
            ),
            (
                "rollout, last stage applied → verdict",
                median(rolled_w.judged.clone()),
            ),
        ] {
            report.add(format!("wave {}: {what}", w + 1), secs, "s");
        }
    }
    report.add(
        "rollout: created → completed",
        crate::setup::median(totals),
        "s",
    );
    if !gaps.is_empty() {
        report.add(
            "rollout: a wave passed → the next wave started, median",
            crate::setup::median(gaps),
            "s",
        );
    }
    report.note(format!(
        "median of {} round(s); a wave's time is the hub's record (started_at → finished_at); \
         a plain fan-out's is first push → the hub's record of the last stage's report \
         (its `updated_at`): both read from the hub's clock",
        s.rounds.max(1)
    ));
    report.finish(common.json.as_deref())?;
    Ok(())
}

/// The project's newest build: what the plain pushes release too.
async fn newest_build(hub: &HubChild) -> anyhow::Result<String> {
    let builds = hub
        .api(
            reqwest::Method::GET,
            &format!("/projects/{FANOUT_PROJECT}/builds"),
            None,
        )
        .await?;
    Ok(builds
        .as_array()
        .and_then(|b| b.first())
        .and_then(|b| b["name"].as_str())
        .context("project fanout has a build")?
        .to_owned())
}

fn rollout_request(build: &str, s: &RolloutSettings, dry_run: bool) -> Value {
    json!({
        "build": build,
        "selector": EVERY_OUTPOST,
        "waves": s.waves,
        "success_threshold": s.threshold,
        "wave_timeout_seconds": 600,
        "pause_seconds": 0,
        "dry_run": dry_run,
    })
}

/// What one rollout took, from the hub's record.
struct RolloutRun {
    /// Each wave's start → verdict, in seconds.
    waves: Vec<f64>,
    /// Each wave's start → its first and its last stage applied (the hub's
    /// record of the report), in seconds.
    spans: Vec<(f64, f64)>,
    /// Each wave's start → its releases recorded (their `created_at`).
    recorded: Vec<f64>,
    /// Created → completed, seen by polling.
    total: f64,
    /// Each wave's verdict → the next wave's start.
    gaps: Vec<f64>,
}

fn record_rollout(
    run: &RolloutRun,
    rolled: &mut [Vec<f64>],
    totals: &mut Vec<f64>,
    gaps: &mut Vec<f64>,
) {
    for (w, secs) in run.waves.iter().enumerate() {
        rolled[w].push(*secs);
    }
    totals.push(run.total);
    gaps.extend(&run.gaps);
}

/// Per wave, each round's split of a rollout wave's time.
#[derive(Default, Clone)]
struct Split {
    /// Start → releases recorded.
    recorded: Vec<f64>,
    /// Start → (first, last) stage applied.
    spans: Vec<(f64, f64)>,
    /// Last stage applied → verdict.
    judged: Vec<f64>,
}

fn record_split(run: &RolloutRun, split: &mut [Split]) {
    for (w, ((span, secs), recorded)) in run
        .spans
        .iter()
        .zip(&run.waves)
        .zip(&run.recorded)
        .enumerate()
    {
        split[w].recorded.push(*recorded);
        split[w].spans.push(*span);
        split[w].judged.push(secs - span.1);
    }
}

/// Creates a rollout of `build` over every stage and waits until it
/// completed (at most 10 min); fails if it halted.
async fn run_rollout(
    hub: &HubChild,
    build: &str,
    s: &RolloutSettings,
    members: &[Vec<String>],
) -> anyhow::Result<RolloutRun> {
    eprintln!("rollout in waves {}", s.waves);
    let started = Instant::now();
    let created = hub
        .api(
            reqwest::Method::POST,
            &format!("/projects/{FANOUT_PROJECT}/rollouts"),
            Some(rollout_request(build, s, false)),
        )
        .await?;
    let id = created["id"].as_u64().context("the rollout's id")?;
    // The project's list carries each rollout without its stages: a poll
    // that costs the hub little.
    let record = loop {
        if started.elapsed() > Duration::from_secs(600) {
            bail!("rollout {id} did not complete within 10 min");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let list = hub
            .api(
                reqwest::Method::GET,
                &format!("/projects/{FANOUT_PROJECT}/rollouts"),
                None,
            )
            .await?;
        let Some(record) = list
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["id"].as_u64() == Some(id))
        else {
            bail!("rollout {id} is not in its project's list");
        };
        match record["state"].as_str() {
            Some("completed") => break record.clone(),
            Some("running" | "waiting") => {}
            other => bail!(
                "rollout {id} ended {other:?}: {}",
                record["halt_reason"].as_str().unwrap_or("no reason given")
            ),
        }
    };
    let total = started.elapsed().as_secs_f64();
    let time = |v: &Value| -> anyhow::Result<DateTime<Utc>> {
        Ok(v.as_str()
            .context("a wave's time")?
            .parse::<DateTime<Utc>>()?)
    };
    // When the hub heard each stage apply (nothing has been pushed to
    // them since).
    let mut heard = std::collections::HashMap::new();
    for row in &crate::scale::fanout_status(hub).await? {
        if let (Some(stage), Ok(at)) = (row["stage"].as_str(), time(&row["updated_at"])) {
            heard.insert(stage.to_owned(), at);
        }
    }
    let mut waves = Vec::new();
    let mut spans = Vec::new();
    let mut recorded = Vec::new();
    let mut gaps = Vec::new();
    let mut last_end: Option<DateTime<Utc>> = None;
    for (w, wave) in record["waves"]
        .as_array()
        .context("the rollout's waves")?
        .iter()
        .enumerate()
    {
        let start = time(&wave["started_at"])?;
        let end = time(&wave["finished_at"])?;
        waves.push(seconds(end - start));
        let applied: Vec<f64> = members
            .get(w)
            .into_iter()
            .flatten()
            .filter_map(|stage| heard.get(stage))
            .map(|at| seconds(*at - start))
            .collect();
        spans.push((
            applied.iter().copied().fold(f64::MAX, f64::min),
            applied.iter().copied().fold(0.0, f64::max),
        ));
        // One stage's newest release is the wave's (nothing was pushed to
        // it since); they were all recorded at once.
        let first = members
            .get(w)
            .and_then(|m| m.first())
            .context("a wave without stages")?;
        let releases = hub
            .api(
                reqwest::Method::GET,
                &format!("/projects/{FANOUT_PROJECT}/stages/{first}/releases"),
                None,
            )
            .await?;
        recorded.push(seconds(time(&releases[0]["created_at"])? - start));
        if let Some(prev) = last_end {
            gaps.push(seconds(start - prev));
        }
        last_end = Some(end);
    }
    Ok(RolloutRun {
        waves,
        spans,
        recorded,
        total,
        gaps,
    })
}

fn seconds(d: chrono::Duration) -> f64 {
    d.num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6
}
