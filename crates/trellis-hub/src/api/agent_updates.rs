//! Agent updates (administrators): `POST /agent-updates` asks the agents
//! of the outposts a label selector chooses to replace themselves with
//! another version the hub holds; `GET /agent-updates` shows every
//! outpost's agent version and where its latest update stands. The link
//! sends the update to each agent (see `link::agent_update`). A request
//! goes in waves like a rollout (`waves`, `success_threshold`,
//! `wave_timeout_seconds`): the first
//! is sent at once, the rollout driver sends each next one once the wave
//! before passed (see `crate::agent_update_waves`).

use std::collections::HashMap;

use axum::extract::State;
use axum::http::StatusCode;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use trellis_model::agent_update::{AgentUpdate, DEFAULT_DEADLINE_SECS, NewAgentUpdate};
use trellis_store::StoreError;
use utoipa::ToSchema;

use super::rollouts::{outposts_matching, parse_selector};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::Json;
use crate::state::AppState;

/// The shortest and longest time a new agent may be given to link back.
pub const MIN_DEADLINE_SECS: u32 = 10;
pub const MAX_DEADLINE_SECS: u32 = 3600;

/// Which outposts to update, and to what.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAgentUpdatesRequest {
    /// A label selector over outposts (`site=munich,line!=3`). This or
    /// `outposts` is required, so that a whole fleet is never updated by
    /// leaving it out.
    #[serde(default)]
    #[schema(example = "site=munich")]
    pub selector: Option<String>,
    /// The outposts by name, instead of a selector.
    #[serde(default)]
    pub outposts: Option<Vec<String>>,
    /// The agent version to run, one the hub holds (`trellis list
    /// agent-binaries`).
    #[schema(
        pattern = "^[0-9]{1,9}\\.[0-9]{1,9}\\.[0-9]{1,9}([-+][0-9A-Za-z.+-]+)?$",
        max_length = 64,
        example = "0.2.0"
    )]
    pub version: String,
    /// How long each new agent has to link back before the previous one is
    /// restored (10–3600 s; default 120).
    #[serde(default)]
    #[schema(minimum = 10, maximum = 3600)]
    pub deadline_secs: Option<u32>,
    /// Each wave's cumulative size, a count or a share of the outposts to
    /// update, ending with 100% (`1,10%,100%`); default one wave of all.
    /// Outposts are ordered by a hash of their name, so the same choice
    /// gives the same waves.
    #[serde(default)]
    #[schema(example = "1,10%,100%")]
    pub waves: Option<String>,
    /// The share of a wave's online outposts whose agent must update for
    /// the next wave to be sent (default 100%); one failure more halts the
    /// rest, never sent.
    #[serde(default)]
    #[schema(example = "95%")]
    pub success_threshold: Option<String>,
    /// How long a wave may take once sent (default 1800): then its outposts
    /// still under way count as not updated, and the wave passes or halts
    /// on the threshold, so a silent outpost does not hold the rest.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 2592000)]
    pub wave_timeout_seconds: Option<u64>,
}

/// What was asked: an update per outpost not already at the version.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedAgentUpdates {
    pub updates: Vec<AgentUpdate>,
    /// Chosen outposts whose agent already runs the version: nothing to do.
    pub already: Vec<String>,
}

/// An outpost's agent as last seen, and its latest update.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OutpostAgent {
    pub outpost: String,
    /// The version its agent reported when it last linked (`None`: never).
    pub version: Option<String>,
    /// Its architecture, as the agent reported it (`amd64`, `arm64`, …).
    pub arch: Option<String>,
    /// Whether its agent can replace itself (the standalone
    /// `trellis-agent`).
    pub updates_itself: bool,
    pub update: Option<AgentUpdate>,
}

/// How the request chose its outposts.
enum Chosen {
    Selector(trellis_model::Selector),
    Names(Vec<String>),
}

fn bad(status: StatusCode, code: &'static str, message: String, hint: &str) -> ApiError {
    ApiError::new(status, code, message, hint)
}

#[utoipa::path(get, path = "/agent-updates", tag = "outposts",
    responses((status = 200, body = Vec<OutpostAgent>)))]
pub async fn list_agent_updates(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Vec<OutpostAgent>>> {
    caller.require_admin("see outposts' agent versions")?;
    Ok(Json(outpost_agents(&state).await?))
}

/// Every outpost's agent and latest update, by outpost name.
pub async fn outpost_agents(state: &AppState) -> ApiResult<Vec<OutpostAgent>> {
    let links: HashMap<String, serde_json::Value> = state
        .store()
        .list_outpost_links()
        .await?
        .into_iter()
        .filter_map(|l| l.agent.map(|a| (l.outpost, a)))
        .collect();
    let mut updates: HashMap<String, AgentUpdate> = state
        .store()
        .latest_agent_updates()
        .await?
        .into_iter()
        .map(|u| (u.outpost.clone(), u))
        .collect();
    let mut outposts = state.store().list_outposts().await?;
    outposts.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(outposts
        .into_iter()
        .map(|o| {
            let agent = links.get(&o.name);
            let text = |key: &str| {
                agent
                    .and_then(|a| a[key].as_str())
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
            };
            OutpostAgent {
                version: text("version"),
                arch: text("arch"),
                updates_itself: agent
                    .and_then(|a| a["features"].as_array())
                    .is_some_and(|f| {
                        f.iter()
                            .any(|f| f == trellis_link::protocol::FEATURE_AGENT_UPDATE)
                    }),
                update: updates.remove(&o.name),
                outpost: o.name,
            }
        })
        .collect())
}

#[utoipa::path(post, path = "/agent-updates", tag = "outposts",
    request_body = CreateAgentUpdatesRequest,
    responses((status = 201, body = CreatedAgentUpdates)))]
pub async fn create_agent_updates(
    State(state): State<AppState>,
    caller: Caller,
    Json(req): Json<CreateAgentUpdatesRequest>,
) -> ApiResult<(StatusCode, Json<CreatedAgentUpdates>)> {
    caller.require_admin("update outposts' agents")?;
    // An empty selector or list is the same as none given.
    let selector = req
        .selector
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let names = req.outposts.as_ref().filter(|n| !n.is_empty());
    let chosen_by = match (selector, names) {
        (Some(text), None) => Chosen::Selector(parse_selector(text)?),
        (None, Some(names)) => Chosen::Names(names.clone()),
        _ => {
            return Err(bad(
                StatusCode::BAD_REQUEST,
                "invalid-selector",
                "say which outposts to update: a label selector or their names, one of the two"
                    .into(),
                "e.g. {\"selector\": \"site=munich\", \"version\": \"0.2.0\"}",
            ));
        }
    };
    trellis_model::agent_binary::check_version(&req.version).map_err(|e| {
        bad(
            StatusCode::BAD_REQUEST,
            "invalid-version",
            e.to_string(),
            "see the versions the hub holds with `trellis list agent-binaries`",
        )
    })?;
    let sizes = match req.waves.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
        Some(text) => trellis_model::rollout::parse_waves(text).map_err(|e| {
            bad(
                StatusCode::BAD_REQUEST,
                "invalid-waves",
                e,
                "give each wave's cumulative size, a count or a share, ending with 100%: e.g. 1,10%,100%",
            )
        })?,
        None => vec![trellis_model::rollout::WaveSize::Percent(
            trellis_model::rollout::ALL,
        )],
    };
    let threshold_bp = match req
        .success_threshold
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        Some(text) => trellis_model::rollout::parse_threshold(text).map_err(|e| {
            bad(
                StatusCode::BAD_REQUEST,
                "invalid-threshold",
                e,
                "e.g. 95% or 99.5%",
            )
        })?,
        None => trellis_model::rollout::ALL,
    };
    let wave_timeout_seconds = super::rollouts::wave_timeout(req.wave_timeout_seconds)?;
    let deadline_secs = req.deadline_secs.unwrap_or(DEFAULT_DEADLINE_SECS);
    if !(MIN_DEADLINE_SECS..=MAX_DEADLINE_SECS).contains(&deadline_secs) {
        return Err(bad(
            StatusCode::BAD_REQUEST,
            "invalid-deadline",
            format!(
                "a deadline of {deadline_secs} s is outside {MIN_DEADLINE_SECS}–{MAX_DEADLINE_SECS} s"
            ),
            "give the new agent time to start and link, e.g. 120",
        ));
    }
    let archs: Vec<String> = state
        .store()
        .list_agent_binaries()
        .await?
        .into_iter()
        .filter(|b| b.version == req.version)
        .map(|b| b.arch)
        .collect();
    if archs.is_empty() {
        return Err(bad(
            StatusCode::NOT_FOUND,
            "unknown-agent-version",
            format!("the hub holds no agent {}; nothing was done", req.version),
            "see the versions it holds with `trellis list agent-binaries`, or upload one with `trellis upload agent-binary FILE --version V`",
        ));
    }
    let chosen: std::collections::HashSet<String> = match &chosen_by {
        Chosen::Selector(selector) => {
            let chosen = outposts_matching(&state, selector).await?;
            if chosen.is_empty() {
                return Err(bad(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "no-match",
                    format!("no outpost matches {selector}; nothing was done"),
                    "see the outposts' labels with `trellis list outpost`",
                ));
            }
            chosen
        }
        Chosen::Names(names) => {
            for name in names {
                state.store().get_outpost(name).await?;
            }
            names.iter().cloned().collect()
        }
    };
    let mut refused = Vec::new();
    let mut new = Vec::new();
    let mut already = Vec::new();
    for agent in outpost_agents(&state).await? {
        if !chosen.contains(&agent.outpost) {
            continue;
        }
        let Some(arch) = &agent.arch else {
            refused.push(format!(
                "{} never linked, so its architecture is unknown",
                agent.outpost
            ));
            continue;
        };
        if agent.version.as_deref() == Some(req.version.as_str()) {
            already.push(agent.outpost);
            continue;
        }
        if !archs
            .iter()
            .any(|a| a == trellis_model::agent_binary::arch_from_oci(arch))
        {
            refused.push(format!(
                "{} runs on {arch}, and agent {} is held only for {}",
                agent.outpost,
                req.version,
                archs.join(", ")
            ));
            continue;
        }
        if !agent.updates_itself {
            refused.push(format!(
                "{}'s agent cannot update itself (it is older than this hub, or runs inside the `trellis` binary)",
                agent.outpost
            ));
            continue;
        }
        new.push(NewAgentUpdate {
            outpost: agent.outpost,
            version: req.version.clone(),
            from_version: agent.version.unwrap_or_default(),
            deadline_secs,
            created_by: caller.user.clone(),
            wave: 0,
            carried: false,
            threshold_bp,
            wave_timeout_seconds,
        });
    }
    if !refused.is_empty() {
        let count = refused.len();
        refused.truncate(10);
        return Err(bad(
            StatusCode::CONFLICT,
            "agent-update-refused",
            format!(
                "{count} of the chosen outposts cannot take agent {}: {}; nothing was done",
                req.version,
                refused.join("; ")
            ),
            "narrow the selector, upload the agent for the missing architectures, or install the standalone trellis-agent there",
        ));
    }
    // Waves over the outposts in their fixed order; the first is sent now,
    // those of its outposts offline now carried along.
    let order =
        trellis_model::agent_update::outpost_order(new.iter().map(|u| u.outpost.clone()).collect());
    let ends = trellis_model::rollout::wave_ends(&sizes, order.len());
    let place: HashMap<&str, usize> = order
        .iter()
        .enumerate()
        .map(|(i, o)| (o.as_str(), i))
        .collect();
    // Recorded (and numbered) in wave order.
    new.sort_by_key(|u| place.get(u.outpost.as_str()).copied());
    let online = crate::rollouts::Online::read(&state).await?;
    for (i, u) in new.iter_mut().enumerate() {
        let wave = ends.iter().position(|&end| i < end).unwrap_or(0);
        u.wave = u32::try_from(wave).unwrap_or(u32::MAX);
        u.carried = u.wave == 0 && !online.has(&u.outpost);
    }
    let updates = state
        .store()
        .create_agent_updates(&new, Utc::now())
        .await
        .map_err(|e| match e {
            StoreError::InUse { what, hint } => {
                ApiError::new(StatusCode::CONFLICT, "agent-update-under-way", what, hint)
            }
            e => e.into(),
        })?;
    for u in updates.iter().filter(|u| u.wave == 0) {
        state.links().poke(&u.outpost);
    }
    if updates.iter().any(|u| u.wave > 0) {
        state.rollout_counters().wake.notify_one();
    }
    Ok((
        StatusCode::CREATED,
        Json(CreatedAgentUpdates { updates, already }),
    ))
}
