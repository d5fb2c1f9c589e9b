//! A rollout's page: its waves, every stage's state, why it halted; and
//! pausing, resuming or aborting it.

use askama::Template;
use axum::extract::State;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use trellis_model::rollout::{Rollout, StageRolloutState, WavePause, percent_text};

use super::session::Signed;
use super::view::{Badge, when};
use super::{ConsoleError, Form, Page, render};
use crate::extract::{Path, Query};
use crate::state::AppState;

pub struct WaveRow {
    pub number: usize,
    pub size: String,
    pub stages: u32,
    pub outcome: Badge,
    pub started: String,
    pub applied: usize,
    pub failed: usize,
    pub pending: usize,
    pub offline: usize,
}

pub struct StageRow {
    pub stage: String,
    pub outpost: String,
    pub wave: u32,
    pub state: Badge,
    pub carried: bool,
    pub release: String,
    pub note: String,
}

/// A project's rollouts, as its page lists them.
pub struct RolloutRow {
    pub id: u64,
    pub build: String,
    pub selector: String,
    pub state: Badge,
    pub created: String,
}

impl RolloutRow {
    pub fn of(r: &Rollout) -> RolloutRow {
        RolloutRow {
            id: r.id,
            build: r.build.clone(),
            selector: r.selector.clone(),
            state: state_badge(r),
            created: when(r.created_at),
        }
    }
}

fn state_badge(r: &Rollout) -> Badge {
    let word = r.state.as_str();
    Badge {
        text: word.to_owned(),
        tone: match word {
            "completed" => "good",
            "halted" => "bad",
            "running" | "waiting" | "paused" => "warn",
            _ => "idle",
        },
    }
}

fn stage_word(s: StageRolloutState) -> &'static str {
    match s {
        StageRolloutState::Waiting => "not reached",
        StageRolloutState::Pushed => "pending",
        StageRolloutState::Applied => "applied",
        StageRolloutState::Failed => "failed",
        StageRolloutState::RolledBack => "rolled back",
    }
}

#[derive(Template)]
#[template(path = "rollout.html")]
struct RolloutPage {
    page: Page,
    r: Rollout,
    state: Badge,
    threshold: String,
    pause: String,
    waves: Vec<WaveRow>,
    stages: Vec<StageRow>,
    can_pause: bool,
    can_resume: bool,
    can_abort: bool,
}

pub async fn show(
    State(state): State<AppState>,
    Signed(caller): Signed,
    Path(id): Path<u64>,
) -> Result<Response, ConsoleError> {
    let crate::extract::Json(r) =
        crate::api::rollouts::get_rollout(State(state), caller.clone(), Path(id)).await?;
    let waves = r
        .waves
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let stages: Vec<_> = r.wave_stages(i).collect();
            let count = |st| stages.iter().filter(|s| s.state == st).count();
            WaveRow {
                number: i + 1,
                size: w.size.to_string(),
                stages: w.stages,
                outcome: Badge::of(match (w.outcome, w.started_at) {
                    (Some(trellis_model::rollout::WaveOutcome::Passed), _) => "passed",
                    (Some(trellis_model::rollout::WaveOutcome::Halted), _) => "halted",
                    (Some(trellis_model::rollout::WaveOutcome::Aborted), _) => "aborted",
                    (None, Some(_)) => "running",
                    (None, None) => "not started",
                }),
                started: w.started_at.map(when).unwrap_or_default(),
                applied: count(StageRolloutState::Applied),
                failed: count(StageRolloutState::Failed),
                pending: count(StageRolloutState::Pushed),
                offline: stages.iter().filter(|s| s.carried).count(),
            }
        })
        .collect();
    let stages = r
        .stages
        .iter()
        .map(|s| StageRow {
            stage: s.stage.clone(),
            outpost: s.outpost.clone(),
            wave: s.wave + 1,
            state: Badge::of(stage_word(s.state)),
            carried: s.carried,
            release: s.release.map(|n| format!("#{n}")).unwrap_or_default(),
            note: s.message.clone().unwrap_or_default(),
        })
        .collect();
    let page = RolloutPage {
        page: Page::signed(format!("rollout {}", r.id), &caller, "projects"),
        state: state_badge(&r),
        threshold: percent_text(r.success_threshold),
        pause: match r.pause {
            WavePause::Manual => "manual: each next wave waits for Resume".into(),
            WavePause::After { seconds } => format!("{seconds} s between waves"),
        },
        can_pause: matches!(
            r.state,
            trellis_model::rollout::RolloutState::Running
                | trellis_model::rollout::RolloutState::Waiting
        ),
        can_resume: matches!(
            r.state,
            trellis_model::rollout::RolloutState::Paused
                | trellis_model::rollout::RolloutState::Waiting
        ),
        can_abort: r.state.is_active() || r.state == trellis_model::rollout::RolloutState::Halted,
        waves,
        stages,
        r,
    };
    Ok(render(&page)?.into_response())
}

#[derive(Debug, Default, Deserialize)]
pub struct AbortForm {
    #[serde(default)]
    rollback: Option<String>,
}

/// `POST /rollouts/{id}/{pause|resume|abort}` from the page's buttons.
pub async fn act(
    State(state): State<AppState>,
    Signed(caller): Signed,
    Path((id, action)): Path<(u64, String)>,
    Form(form): Form<AbortForm>,
) -> Result<Response, ConsoleError> {
    use crate::api::rollouts as api;
    let state2 = State(state);
    match action.as_str() {
        "pause" => {
            api::pause_rollout(state2, caller, Path(id)).await?;
        }
        "resume" => {
            api::resume_rollout(state2, caller, Path(id)).await?;
        }
        "abort" => {
            let q = api::AbortQuery {
                rollback: form.rollback.is_some(),
            };
            api::abort_rollout(state2, caller, Path(id), Query(q)).await?;
        }
        _ => {
            return Err(crate::error::ApiError::not_found("page", &action).into());
        }
    }
    Ok(Redirect::to(&format!("/rollouts/{id}")).into_response())
}
