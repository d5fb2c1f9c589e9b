//! Rollouts: creating one over the stages a label selector chooses,
//! reading them, and pausing, resuming or aborting one. The waves
//! themselves are pushed and judged by the driver ([`crate::rollouts`]).

use axum::extract::State;
use axum::http::StatusCode;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use trellis_model::rollout::{
    NewRollout, Rollout, RolloutState, StageRolloutState, WaveOutcome, WavePause, parse_threshold,
    parse_waves, percent_text,
};
use trellis_model::{Selector, Stage};
use trellis_store::{NewRelease, StoreError};
use utoipa::{IntoParams, ToSchema};

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Json, Path, Query};
use crate::rollouts::audit_as;
use crate::state::AppState;

/// The longest wave timeout or pause: 30 days.
pub const MAX_WAIT_SECONDS: u64 = 30 * 24 * 3600;

/// The wave timeout when none is given: 30 minutes.
pub const DEFAULT_WAVE_TIMEOUT: u64 = trellis_model::rollout::DEFAULT_WAVE_TIMEOUT_SECS;

/// `POST /projects/{project}/rollouts`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"build": "main_b3", "selector": "site=munich,line!=3",
    "waves": "1,5%,25%,100%", "success_threshold": "95%", "wave_timeout_seconds": 1800,
    "pause_seconds": 600}))]
pub struct CreateRolloutRequest {
    /// The build to roll out.
    pub build: String,
    /// The config (of each stage, by name) the releases take.
    #[serde(default)]
    pub config: Option<String>,
    /// Which stages: those whose outpost's labels match (`site=munich`,
    /// `line!=3`, `site in (a,b)`, `k`, `!k`; comma is AND).
    pub selector: String,
    /// Each wave's cumulative size, a count or a share of the selected
    /// stages, ending with 100%: `1,5%,25%,100%`.
    pub waves: String,
    /// The share of a wave's online stages that must apply the release for
    /// the next wave to start (default 100%).
    #[serde(default)]
    pub success_threshold: Option<String>,
    /// How long a wave may take (default 1800).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 2592000)]
    pub wave_timeout_seconds: Option<u64>,
    /// How long to wait between waves (default 0).
    #[serde(default)]
    #[schema(maximum = 2592000)]
    pub pause_seconds: Option<u64>,
    /// Start each wave after the first only on `resume`.
    #[serde(default)]
    pub manual: bool,
    /// Only show the waves it would have; record nothing.
    #[serde(default)]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams, ToSchema)]
#[into_params(parameter_in = Query)]
pub struct AbortQuery {
    /// Push to each stage that got the rollout's release the release it
    /// ran before (stages that ran nothing before keep it).
    #[serde(default)]
    pub rollback: bool,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct RolloutPath {
    /// The rollout's number
    #[param(minimum = 1, example = 3)]
    pub id: u64,
}

fn bad(code: &'static str, message: String, hint: &str) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, code, message, hint)
}

/// A request's wave timeout (rollouts, agent updates): the default when
/// not given, refused outside 1 s to 30 days.
pub fn wave_timeout(asked: Option<u64>) -> ApiResult<u64> {
    let timeout = asked.unwrap_or(DEFAULT_WAVE_TIMEOUT);
    if timeout == 0 || timeout > MAX_WAIT_SECONDS {
        return Err(bad(
            "invalid-timeout",
            format!("a wave timeout of {timeout} s is outside 1 s to 30 days"),
            "e.g. 1800 (30 minutes)",
        ));
    }
    Ok(timeout)
}

/// A list's `?selector=`: none when absent or blank (an empty filter box
/// filters nothing).
pub fn list_selector(text: Option<&str>) -> ApiResult<Option<Selector>> {
    match text.map(str::trim) {
        None | Some("") => Ok(None),
        Some(text) => parse_selector(text).map(Some),
    }
}

/// Reads a selector given to the API; 400 `invalid-selector` says where it
/// went wrong.
pub fn parse_selector(text: &str) -> ApiResult<Selector> {
    Selector::parse(text).map_err(|e| {
        bad(
            "invalid-selector",
            e.to_string(),
            "write requirements like site=munich, line!=3, site in (a,b), site notin (a), gpu or !gpu, separated by commas (all must hold)",
        )
    })
}

/// The names of the outposts whose labels match `selector`.
pub async fn outposts_matching(
    state: &AppState,
    selector: &Selector,
) -> ApiResult<std::collections::HashSet<String>> {
    Ok(state
        .store()
        .list_outposts()
        .await?
        .into_iter()
        .filter(|o| selector.matches(&o.labels))
        .map(|o| o.name)
        .collect())
}

/// The project's live stages whose outpost matches `selector`.
pub async fn select_stages(
    state: &AppState,
    project: &str,
    selector: &Selector,
) -> ApiResult<Vec<Stage>> {
    let stages = state.store().list_stages(project).await?;
    let outposts: std::collections::HashMap<String, trellis_model::Outpost> = state
        .store()
        .list_outposts()
        .await?
        .into_iter()
        .map(|o| (o.name.clone(), o))
        .collect();
    Ok(stages
        .into_iter()
        .filter(|s| s.archived_at.is_none())
        .filter(|s| {
            outposts
                .get(&s.outpost)
                .is_some_and(|o| selector.matches(&o.labels))
        })
        .collect())
}

/// The refusal of a selector that chose nothing.
pub fn no_match(project: &str, selector: &Selector) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "no-match",
        format!(
            "no live stage of project {project:?} is on an outpost matching {selector}; nothing was done"
        ),
        "see the outposts' labels with `trellis list outpost` and the project's stages with `trellis list stage -p PROJECT`",
    )
}

/// Starts a rollout: the stages of the project whose outpost matches the
/// selector, in waves (ordered by a hash of each stage's name, so the same
/// selection gives the same waves). The first wave is pushed at once; the
/// hub judges each wave and starts the next, or halts. Refused while
/// another active rollout holds one of the stages.
#[utoipa::path(post, path = "/projects/{project}/rollouts", tag = "rollouts",
    params(crate::api::params::ProjectPath), request_body = CreateRolloutRequest,
    responses((status = 201, body = Rollout), (status = 200, description = "the plan of a dry run, recorded nowhere", body = Rollout)))]
pub async fn create_rollout(
    State(state): State<AppState>,
    caller: Caller,
    Path(project): Path<String>,
    Json(req): Json<CreateRolloutRequest>,
) -> ApiResult<(StatusCode, Json<Rollout>)> {
    caller.role_in_live(&state, &project).await?;
    let selector = parse_selector(&req.selector)?;
    let sizes = parse_waves(&req.waves).map_err(|e| {
        bad(
            "invalid-waves",
            e,
            "give each wave's cumulative size, a count or a share, ending with 100%: e.g. 1,5%,25%,100%",
        )
    })?;
    let threshold = match &req.success_threshold {
        Some(text) => {
            parse_threshold(text).map_err(|e| bad("invalid-threshold", e, "e.g. 95% or 99.5%"))?
        }
        None => trellis_model::rollout::ALL,
    };
    let timeout = wave_timeout(req.wave_timeout_seconds)?;
    let pause = match (req.pause_seconds, req.manual) {
        (Some(_), true) => {
            return Err(bad(
                "invalid-pause",
                "a rollout either pauses a fixed time between waves or waits for `resume`, not both".into(),
                "give pause_seconds or manual",
            ));
        }
        (Some(s), false) if s > MAX_WAIT_SECONDS => {
            return Err(bad(
                "invalid-pause",
                format!("a pause of {s} s is longer than 30 days"),
                "e.g. 600 (10 minutes)",
            ));
        }
        (Some(seconds), false) => WavePause::After { seconds },
        (None, true) => WavePause::Manual,
        (None, false) => WavePause::After { seconds: 0 },
    };
    let build = state.store().get_build(&project, &req.build).await?;
    let stages = select_stages(&state, &project, &selector).await?;
    if stages.is_empty() {
        return Err(no_match(&project, &selector));
    }
    if stages.len() > super::stages::MAX_STAGES_PER_PUSH {
        return Err(bad(
            "too-many-stages",
            format!(
                "the selector chooses {} stages; a rollout takes at most {}",
                stages.len(),
                super::stages::MAX_STAGES_PER_PUSH
            ),
            "narrow the selector",
        ));
    }
    if let Some(config) = &req.config {
        let have: std::collections::HashSet<String> = state
            .store()
            .list_configs(&project, None)
            .await?
            .into_iter()
            .filter(|c| &c.name == config)
            .map(|c| c.stage)
            .collect();
        let missing: Vec<&str> = stages
            .iter()
            .filter(|s| !have.contains(&s.name))
            .map(|s| s.name.as_str())
            .collect();
        if !missing.is_empty() {
            let mut listed = missing
                .iter()
                .take(10)
                .copied()
                .collect::<Vec<_>>()
                .join(", ");
            if missing.len() > 10 {
                listed.push_str(&format!(" and {} more", missing.len() - 10));
            }
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "missing-config",
                format!(
                    "{} of the selected stages have no config {config:?}: {listed}",
                    missing.len()
                ),
                "add the config to those stages first (`trellis add config-data`), or roll out without it",
            ));
        }
    }
    let (waves, planned) = NewRollout::plan(
        &project,
        &sizes,
        stages.into_iter().map(|s| (s.name, s.outpost)).collect(),
    );
    let new = NewRollout {
        project: project.clone(),
        build: build.name,
        config: req.config,
        selector: selector.to_string(),
        waves,
        success_threshold: threshold,
        wave_timeout_seconds: timeout,
        pause,
        created_at: Utc::now(),
        created_by: caller.user.clone(),
        stages: planned,
    };
    if req.dry_run {
        return Ok((StatusCode::OK, Json(new.numbered(0))));
    }
    let rollout = state
        .store()
        .create_rollout(&new)
        .await
        .map_err(|e| match e {
            StoreError::InUse { what, hint } => {
                ApiError::new(StatusCode::CONFLICT, "rollout-overlap", what, hint)
            }
            e => e.into(),
        })?;
    // The driver starts the first wave now, not at its next tick.
    state.rollout_counters().wake.notify_one();
    let waves: Vec<String> = rollout.waves.iter().map(|w| w.size.to_string()).collect();
    audit_as(
        &state,
        &rollout,
        &caller.user,
        "rollout-create",
        format!(
            "{} stage(s) matching {} in waves {} (threshold {})",
            rollout.stages.len(),
            rollout.selector,
            waves.join(","),
            percent_text(rollout.success_threshold)
        ),
    )
    .await;
    Ok((StatusCode::CREATED, Json(rollout)))
}

/// The project's rollouts, newest first, without their stages.
#[utoipa::path(get, path = "/projects/{project}/rollouts", tag = "rollouts",
    params(crate::api::params::ProjectPath), responses((status = 200, body = Vec<Rollout>)))]
pub async fn list_rollouts(
    State(state): State<AppState>,
    caller: Caller,
    Path(project): Path<String>,
) -> ApiResult<Json<Vec<Rollout>>> {
    caller.role_in(&state, &project).await?;
    Ok(Json(state.store().list_rollouts(Some(&project)).await?))
}

/// A rollout the caller may see (its project's members and administrators).
async fn visible(state: &AppState, caller: &Caller, id: u64) -> ApiResult<Rollout> {
    let rollout = state.store().get_rollout(id).await?;
    match caller.role_in(state, &rollout.project).await {
        Ok(_) => Ok(rollout),
        // Not telling outsiders which numbers exist.
        Err(_) => Err(ApiError::not_found("rollout", &id.to_string())),
    }
}

/// A rollout with its waves and every stage's state.
#[utoipa::path(get, path = "/rollouts/{id}", tag = "rollouts",
    params(RolloutPath), responses((status = 200, body = Rollout)))]
pub async fn get_rollout(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<u64>,
) -> ApiResult<Json<Rollout>> {
    Ok(Json(visible(&state, &caller, id).await?))
}

/// Reads the rollout, applies `change`, saves; again if the driver saved
/// it meanwhile.
async fn change(
    state: &AppState,
    caller: &Caller,
    id: u64,
    change: impl Fn(&mut Rollout) -> ApiResult<()>,
) -> ApiResult<Rollout> {
    for _ in 0..5 {
        let mut rollout = visible(state, caller, id).await?;
        change(&mut rollout)?;
        rollout.updated_at = Utc::now();
        match state.store().save_rollout(&rollout).await {
            Ok(saved) => return Ok(saved),
            Err(StoreError::InUse { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::new(
        StatusCode::CONFLICT,
        "rollout-busy",
        format!("rollout {id} kept changing while this change was made"),
        "try again",
    ))
}

fn not_now(r: &Rollout, doing: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "rollout-state",
        format!("rollout {} is {}: it cannot be {doing}", r.id, r.state),
        "see where it stands with `trellis status rollout ID`",
    )
}

/// Pauses a running or waiting rollout: no wave starts or is judged until
/// it is resumed (releases already pushed still arrive).
#[utoipa::path(post, path = "/rollouts/{id}/pause", tag = "rollouts",
    params(RolloutPath), responses((status = 200, body = Rollout)))]
pub async fn pause_rollout(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<u64>,
) -> ApiResult<Json<Rollout>> {
    transition(
        &state,
        &caller,
        id,
        &[RolloutState::Running, RolloutState::Waiting],
        RolloutState::Paused,
        ("paused", "rollout-pause"),
    )
    .await
    .map(Json)
}

/// Resumes a paused rollout, or starts the next wave of one waiting
/// between waves (a manual one, or skipping the rest of the pause).
#[utoipa::path(post, path = "/rollouts/{id}/resume", tag = "rollouts",
    params(RolloutPath), responses((status = 200, body = Rollout)))]
pub async fn resume_rollout(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<u64>,
) -> ApiResult<Json<Rollout>> {
    transition(
        &state,
        &caller,
        id,
        &[RolloutState::Paused, RolloutState::Waiting],
        RolloutState::Running,
        ("resumed", "rollout-resume"),
    )
    .await
    .map(|r| {
        // The driver starts the next wave now, not at its next tick.
        state.rollout_counters().wake.notify_one();
        Json(r)
    })
}

/// Moves a rollout from one of `from` to `to` (refused in any other
/// state, saying what it is) and audits it as `(done, action)`.
async fn transition(
    state: &AppState,
    caller: &Caller,
    id: u64,
    from: &[RolloutState],
    to: RolloutState,
    (done, action): (&'static str, &'static str),
) -> ApiResult<Rollout> {
    let rollout = change(state, caller, id, |r| {
        if !from.contains(&r.state) {
            return Err(not_now(r, done));
        }
        r.state = to;
        r.next_wave_at = None;
        Ok(())
    })
    .await?;
    audit_as(state, &rollout, &caller.user, action, done.into()).await;
    Ok(rollout)
}

/// Aborts a rollout (also a halted one): no further wave starts. With
/// `rollback`, each stage that got the release is pushed the release it
/// ran before.
#[utoipa::path(post, path = "/rollouts/{id}/abort", tag = "rollouts",
    params(RolloutPath, AbortQuery), responses((status = 200, body = Rollout)))]
pub async fn abort_rollout(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<u64>,
    Query(q): Query<AbortQuery>,
) -> ApiResult<Json<Rollout>> {
    let now = Utc::now();
    let aborted = change(&state, &caller, id, |r| {
        if !(r.state.is_active() || r.state == RolloutState::Halted) {
            return Err(not_now(r, "aborted"));
        }
        if let Some(w) = r.current_wave() {
            r.waves[w].outcome = Some(WaveOutcome::Aborted);
            r.waves[w].finished_at = Some(now);
        }
        r.state = RolloutState::Aborted;
        r.next_wave_at = None;
        r.finished_at = Some(now);
        Ok(())
    })
    .await?;
    let rollout = if q.rollback {
        roll_back(&state, aborted).await?
    } else {
        aborted
    };
    let detail = if q.rollback {
        let back = rollout
            .stages
            .iter()
            .filter(|s| s.state == StageRolloutState::RolledBack)
            .count();
        format!("aborted; {back} stage(s) rolled back")
    } else {
        "aborted".into()
    };
    audit_as(&state, &rollout, &caller.user, "rollout-abort", detail).await;
    Ok(Json(rollout))
}

/// Pushes to each stage that got the rollout's release the release it ran
/// before, as a new release with that release's build and config.
async fn roll_back(state: &AppState, mut r: Rollout) -> ApiResult<Rollout> {
    let mut new = Vec::new();
    let mut targets = Vec::new();
    for (i, s) in r.stages.iter_mut().enumerate() {
        if s.release.is_none() || s.state == StageRolloutState::RolledBack {
            continue;
        }
        let Some(previous) = s.previous_release else {
            s.message = Some("it ran nothing before the rollout; it keeps the release".into());
            continue;
        };
        let old = match state
            .store()
            .get_release(&r.project, &s.stage, previous)
            .await
        {
            Ok(old) => old,
            Err(StoreError::NotFound { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        new.push(NewRelease {
            project: r.project.clone(),
            stage: s.stage.clone(),
            build: old.build,
            config: old.config,
            created_by: r.created_by.clone(),
        });
        targets.push((i, previous));
    }
    if new.is_empty() {
        return Ok(r);
    }
    let pushed = state.store().push_releases(&new, Utc::now()).await?;
    for ((i, previous), release) in targets.into_iter().zip(&pushed.releases) {
        let s = &mut r.stages[i];
        s.state = StageRolloutState::RolledBack;
        s.message = Some(format!(
            "rolled back to release {previous}'s build as release {}",
            release.number
        ));
    }
    for outpost in &pushed.outposts {
        state.links().poke(outpost);
    }
    for _ in 0..5 {
        match state.store().save_rollout(&r).await {
            Ok(saved) => return Ok(saved),
            Err(StoreError::InUse { .. }) => {
                // Only this request changes an aborted rollout; re-read and
                // carry the stages over.
                let fresh = state.store().get_rollout(r.id).await?;
                r = Rollout {
                    stages: r.stages,
                    ..fresh
                };
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(r)
}
