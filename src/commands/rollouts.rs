//! `trellis create|status|list|pause|resume|abort rollout`, and the
//! project-wide `status stage -p P [-l SELECTOR]`.

use std::time::Duration;

use trellis_hub::api::rollouts::CreateRolloutRequest;
use trellis_hub::link::status::StageSyncSummary;
use trellis_model::rollout::{Rollout, StageRolloutState, WavePause, percent_text};

use crate::cli::OutputFormat;
use crate::client::{HubClient, seg};
use crate::output::{self, time};

/// The options of `create rollout`.
pub struct CreateOptions {
    pub project: String,
    pub build: String,
    pub config: Option<String>,
    pub selector: String,
    pub waves: String,
    pub success_threshold: String,
    pub wave_timeout: Duration,
    pub pause: Option<Duration>,
    pub manual: bool,
    pub dry_run: bool,
}

pub async fn create(
    client: &HubClient,
    o: CreateOptions,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let request = CreateRolloutRequest {
        build: o.build,
        config: o.config,
        selector: o.selector,
        waves: o.waves,
        success_threshold: Some(o.success_threshold),
        wave_timeout_seconds: Some(o.wave_timeout.as_secs()),
        pause_seconds: o.pause.map(|p| p.as_secs()),
        manual: o.manual,
        dry_run: o.dry_run,
    };
    let r: Rollout = client
        .post(
            &format!("/projects/{}/rollouts", seg(&o.project)),
            &request,
            if o.dry_run {
                "planning the rollout"
            } else {
                "creating the rollout"
            },
        )
        .await?;
    if output::machine(format, &r)? {
        return Ok(());
    }
    if o.dry_run {
        println!(
            "rollout of build {} to {} stage(s) matching {} would go in these waves (nothing created):",
            r.build,
            r.stages.len(),
            r.selector
        );
    } else {
        println!(
            "created rollout {} of build {} to {} stage(s) matching {}; wave 1 starts now",
            r.id,
            r.build,
            r.stages.len(),
            r.selector
        );
    }
    for (i, w) in r.waves.iter().enumerate() {
        let names: Vec<&str> = r.wave_stages(i).map(|s| s.stage.as_str()).collect();
        println!(
            "  wave {} ({}): {}",
            i + 1,
            w.size,
            if names.is_empty() {
                "(no stage)".to_owned()
            } else {
                names.join(", ")
            }
        );
    }
    if !o.dry_run {
        println!("follow it with `trellis status rollout {}`", r.id);
    }
    Ok(())
}

fn stage_state(s: &trellis_model::rollout::RolloutStage) -> String {
    let word = match s.state {
        StageRolloutState::Waiting => "waiting",
        StageRolloutState::Pushed => "pushed",
        StageRolloutState::Applied => "applied",
        StageRolloutState::Failed => "failed",
        StageRolloutState::RolledBack => "rolled-back",
    };
    if s.carried {
        format!("{word} (offline, carried along)")
    } else {
        word.to_owned()
    }
}

pub async fn status(client: &HubClient, id: u64, format: OutputFormat) -> anyhow::Result<()> {
    let r: Rollout = client
        .get(&format!("/rollouts/{id}"), "getting the rollout")
        .await?;
    if output::machine(format, &r)? {
        return Ok(());
    }
    let pause = match r.pause {
        WavePause::Manual => "manual (resume starts each next wave)".to_owned(),
        WavePause::After { seconds } => format!("{seconds} s between waves"),
    };
    let mut fields = vec![
        ("rollout", format!("{} of project {}", r.id, r.project)),
        ("build", r.build.clone()),
        ("selector", r.selector.clone()),
        ("state", r.state.to_string()),
        (
            "threshold",
            format!(
                "{} of each wave's online stages, within {} s",
                percent_text(r.success_threshold),
                r.wave_timeout_seconds
            ),
        ),
        ("pause", pause),
        (
            "created",
            format!("{} by {}", time(&r.created_at), r.created_by),
        ),
    ];
    if let Some(config) = &r.config {
        fields.push(("config", config.clone()));
    }
    if let Some(at) = &r.next_wave_at {
        fields.push(("next wave", time(at)));
    }
    if let Some(reason) = &r.halt_reason {
        fields.push(("halted", reason.clone()));
    }
    output::one(format, &r, &fields)?;
    println!();
    for (i, w) in r.waves.iter().enumerate() {
        let stages: Vec<_> = r.wave_stages(i).collect();
        let count = |st: StageRolloutState| stages.iter().filter(|s| s.state == st).count();
        let carried = stages.iter().filter(|s| s.carried).count();
        let how = match (w.outcome, w.started_at) {
            (Some(o), _) => format!("{o:?}").to_lowercase(),
            (None, Some(_)) => "running".into(),
            (None, None) => "not started".into(),
        };
        println!(
            "wave {} ({}, {} stage(s)): {how} — {} applied, {} failed, {} pending, {} offline",
            i + 1,
            w.size,
            w.stages,
            count(StageRolloutState::Applied),
            count(StageRolloutState::Failed),
            count(StageRolloutState::Pushed),
            carried
        );
    }
    println!();
    output::list(
        OutputFormat::Table,
        &r.stages,
        &["stage", "outpost", "wave", "state", "release", "note"],
        |s| {
            vec![
                s.stage.clone(),
                s.outpost.clone(),
                (s.wave + 1).to_string(),
                stage_state(s),
                s.release.map(|n| n.to_string()).unwrap_or_default(),
                s.message.clone().unwrap_or_default(),
            ]
        },
    )
}

pub async fn list(client: &HubClient, project: &str, format: OutputFormat) -> anyhow::Result<()> {
    let items: Vec<Rollout> = client
        .get(
            &format!("/projects/{}/rollouts", seg(project)),
            "listing rollouts",
        )
        .await?;
    output::list(
        format,
        &items,
        &["id", "build", "selector", "state", "waves", "created"],
        |r| {
            let done = r.waves.iter().filter(|w| w.outcome.is_some()).count();
            vec![
                r.id.to_string(),
                r.build.clone(),
                r.selector.clone(),
                r.state.to_string(),
                format!("{done} of {} done", r.waves.len()),
                time(&r.created_at),
            ]
        },
    )
}

/// `pause`, `resume` or `abort [--rollback]` of rollout `id`.
pub async fn act(
    client: &HubClient,
    id: u64,
    action: &str,
    rollback: bool,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let query = if rollback { "?rollback=true" } else { "" };
    let r: Rollout = client
        .post(
            &format!("/rollouts/{id}/{action}{query}"),
            &serde_json::json!({}),
            "changing the rollout",
        )
        .await?;
    if output::machine(format, &r)? {
        return Ok(());
    }
    println!("rollout {} is {} now", r.id, r.state);
    if rollback {
        let back = r
            .stages
            .iter()
            .filter(|s| s.state == StageRolloutState::RolledBack)
            .count();
        println!("{back} stage(s) pushed the release they ran before");
    }
    Ok(())
}

/// How far every stage of the project (or those the selector chooses) has
/// synced.
pub async fn project_status(
    client: &HubClient,
    project: &str,
    selector: Option<&str>,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let query = selector
        .map(|s| format!("?selector={}", seg(s)))
        .unwrap_or_default();
    let items: Vec<StageSyncSummary> = client
        .get(
            &format!("/projects/{}/outpost-status{query}", seg(project)),
            "getting the stages' status",
        )
        .await?;
    output::list(
        format,
        &items,
        &["stage", "outpost", "link", "sync", "release", "applied"],
        |s| {
            vec![
                s.stage.clone(),
                s.outpost.clone(),
                if s.connected { "online" } else { "offline" }.into(),
                s.sync.as_str().into(),
                s.latest_release.map(|n| n.to_string()).unwrap_or_default(),
                s.applied_release.map(|n| n.to_string()).unwrap_or_default(),
            ]
        },
    )
}
