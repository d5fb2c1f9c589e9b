//! The connection status of a stage, as the status popup and
//! `trellis status stage` show it: the outpost's link, how far the stage's
//! sync has come, its components, and the errors seen — kept truthful:
//! nothing is reported green that the agent has not confirmed.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::errors::ErrorEntry;
use super::{LinkState, LinkView};
use crate::auth::Caller;
use crate::cluster::Holder;
use crate::error::ApiResult;
use crate::extract::{Json, Path, Query};
use crate::state::AppState;
use axum::extract::State;
use trellis_model::{ReleaseState, Stage};
use trellis_store::StageFilter;

/// Where a stage's sync stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SyncState {
    /// The agent has not acknowledged the stage yet.
    Linking,
    InSync,
    /// The agent is receiving or applying the desired revision.
    Syncing,
    /// The desired revision waits for the link to come up.
    PendingDelivery,
    /// The agent could not apply the desired revision.
    Failed,
    Suspended,
}

impl SyncState {
    /// The word the API uses for it (`in-sync`).
    pub fn as_str(self) -> &'static str {
        match self {
            SyncState::Linking => "linking",
            SyncState::InSync => "in-sync",
            SyncState::Syncing => "syncing",
            SyncState::PendingDelivery => "pending-delivery",
            SyncState::Failed => "failed",
            SyncState::Suspended => "suspended",
        }
    }
}

/// The sync state from the revisions and the link. Pure, so every
/// combination is tested.
pub fn sync_state(
    online: bool,
    desired: u64,
    delivered: u64,
    applied: u64,
    suspended: bool,
    report_failed: bool,
) -> SyncState {
    if desired == 0 {
        return if online {
            SyncState::InSync
        } else {
            SyncState::Linking
        };
    }
    // The agent tried the desired revision and it failed (and was rolled
    // back): never in-sync, whatever the revision numbers say.
    if report_failed && (applied >= desired || delivered >= desired) {
        return SyncState::Failed;
    }
    if applied >= desired {
        return if suspended {
            SyncState::Suspended
        } else {
            SyncState::InSync
        };
    }
    if delivered >= desired {
        return SyncState::Syncing;
    }
    match (online, delivered, applied) {
        (true, _, _) => SyncState::Syncing,
        (false, 0, 0) => SyncState::Linking,
        (false, _, _) => SyncState::PendingDelivery,
    }
}

/// The sync state of a stage from its record, its delivered and applied
/// revisions, the state its agent last reported and whether its outpost is
/// connected.
pub fn stage_sync_state(
    stage: &Stage,
    delivered: u64,
    applied: u64,
    report_state: Option<&str>,
    online: bool,
) -> SyncState {
    sync_state(
        online,
        stage.desired_revision,
        delivered,
        applied,
        stage.suspended,
        report_state == Some("failed"),
    )
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SyncView {
    pub state: SyncState,
    pub desired_revision: u64,
    pub delivered_revision: u64,
    pub applied_revision: u64,
    /// The stage's newest release (what should run).
    pub desired_release: Option<u64>,
    /// The release running on the outpost, as the agent reported.
    pub applied_release: Option<u64>,
    /// The agent's own words about the stage, if any.
    pub message: Option<String>,
    /// When the desired release failed to come up: the release the agent
    /// restored instead (0: none, the stage runs nothing).
    pub rolled_back_to: Option<u64>,
    /// While the agent fetches the artifacts of a newer revision: how far
    /// it has come.
    pub delivery: Option<DeliveryView>,
    pub updated_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// How far the delivery of a revision to the outpost has come.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeliveryView {
    pub revision: u64,
    /// Content bytes present on the outpost, of `total`.
    pub fetched: u64,
    pub total: u64,
    /// What the agent is doing, e.g. `fetching artifacts`, or why it waits.
    pub step: String,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StageStatus {
    pub project: String,
    pub stage: String,
    pub outpost: String,
    pub link: LinkView,
    pub sync: SyncView,
    /// Per component, as the agent last reported.
    #[schema(value_type = Vec<Object>)]
    pub components: Vec<Value>,
    /// Link errors and the stage's errors, newest first.
    pub errors: Vec<ErrorEntry>,
}

/// The link view of an outpost: live if a session existed since the hub
/// started, else reconstructed from what the store remembers. Where hubs
/// share the store, an outpost this instance does not hold is shown as the
/// store's link claims say: online on the instance holding it while that
/// instance beats, offline once it stops (a dead instance's links are
/// never shown online from a stale record).
pub async fn link_view(state: &AppState, outpost: &str) -> ApiResult<LinkView> {
    let link = state.store().get_outpost_link(outpost).await?;
    let cluster = state.cluster();
    let local = state.links().view(outpost);
    if let Some(mut view) = local.clone()
        && (view.state.is_connected() || !cluster.is_shared())
    {
        view.certificate_expires = link.cert_not_after;
        if cluster.is_shared() {
            view.instance = Some(cluster.id().to_owned());
            view.instance_address = cluster.address().map(str::to_owned);
        }
        return Ok(view);
    }
    let record = state.store().get_outpost(outpost).await?;
    let agent_version = link
        .agent
        .as_ref()
        .and_then(|a| a.get("version"))
        .and_then(|v| v.as_str())
        .map(str::to_owned);
    if cluster.is_shared() && record.revoked_at.is_none() {
        let errors = local.as_ref().map(|v| v.errors.clone()).unwrap_or_default();
        match cluster.holder(state.store(), outpost).await? {
            Holder::Other { instance, claim } => {
                return Ok(LinkView {
                    state: LinkState::Online,
                    since: claim.since,
                    last_seen: Some(instance.beat_at.max(link.last_seen.unwrap_or(claim.since))),
                    rtt_ms: None,
                    agent_version,
                    last_disconnect: link.last_disconnect,
                    attention: None,
                    instance: Some(instance.id),
                    instance_address: Some(instance.address),
                    certificate_expires: link.cert_not_after,
                    errors,
                });
            }
            Holder::Dead { instance, claim } => {
                let (since, who) = match &instance {
                    Some(i) => (i.beat_at, format!("{} ({})", i.id, i.address)),
                    None => (claim.since, claim.instance.clone()),
                };
                return Ok(LinkView {
                    state: LinkState::Offline,
                    since,
                    last_seen: Some(since),
                    rtt_ms: None,
                    agent_version,
                    last_disconnect: Some(format!(
                        "the hub instance {who} that held the link stopped answering"
                    )),
                    attention: None,
                    instance: Some(claim.instance),
                    instance_address: instance.map(|i| i.address),
                    certificate_expires: link.cert_not_after,
                    errors,
                });
            }
            Holder::Me(_) | Holder::Released(_) | Holder::Nobody => {}
        }
    }
    if let Some(mut view) = local {
        view.certificate_expires = link.cert_not_after;
        return Ok(view);
    }
    let (state, since) = match (record.revoked_at, link.last_seen) {
        (Some(at), _) => (LinkState::Revoked, at),
        (None, Some(seen)) => (LinkState::Offline, seen),
        (None, None) => (LinkState::AwaitingAgent, record.created_at),
    };
    Ok(LinkView {
        state,
        since,
        last_seen: link.last_seen,
        rtt_ms: None,
        agent_version,
        last_disconnect: link.last_disconnect,
        attention: None,
        instance: None,
        instance_address: None,
        certificate_expires: link.cert_not_after,
        errors: Vec::new(),
    })
}

/// The connection status of a stage: link, sync, components, errors.
#[utoipa::path(get, path = "/projects/{project}/stages/{stage}/outpost-status", tag = "stages",
    params(crate::api::params::StagePath),
    responses((status = 200, body = StageStatus)))]
pub async fn stage_status(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, stage)): Path<(String, String)>,
) -> ApiResult<Json<StageStatus>> {
    caller.role_in(&state, &project).await?;
    Ok(Json(compute(&state, &project, &stage).await?))
}

pub async fn compute(state: &AppState, project: &str, stage_name: &str) -> ApiResult<StageStatus> {
    let store = state.store();
    let stage = store.get_stage(project, stage_name).await?;
    let sync = store.get_stage_sync(project, stage_name).await?;
    let link = link_view(state, &stage.outpost).await?;
    let state_now = stage_sync_state(
        &stage,
        sync.delivered_revision,
        sync.applied_revision,
        sync.report
            .as_ref()
            .and_then(|r| r.get("state"))
            .and_then(Value::as_str),
        link.state.is_connected(),
    );
    let report = sync.report.clone().unwrap_or(Value::Null);
    let applied_release = store
        .list_releases(project, stage_name)
        .await?
        .into_iter()
        .find(|r| r.state == ReleaseState::Applied)
        .map(|r| r.number);
    let mut errors = link.errors.clone();
    if let Some(list) = report.get("errors").and_then(Value::as_array) {
        errors.extend(
            list.iter()
                .filter_map(|e| serde_json::from_value::<ErrorEntry>(e.clone()).ok()),
        );
    }
    errors.sort_by_key(|e| std::cmp::Reverse(e.last_seen));
    // Only while the revision it is about has not been reported applied.
    let delivery = state
        .links()
        .delivery(project, stage_name)
        .filter(|d| state_now == SyncState::Syncing && d.revision > sync.applied_revision);
    Ok(StageStatus {
        project: project.to_owned(),
        stage: stage_name.to_owned(),
        outpost: stage.outpost.clone(),
        sync: SyncView {
            state: state_now,
            desired_revision: stage.desired_revision,
            delivered_revision: sync.delivered_revision,
            applied_revision: sync.applied_revision,
            desired_release: stage.latest_release,
            applied_release,
            message: report
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_owned),
            rolled_back_to: report.get("rolled_back_to").and_then(Value::as_u64),
            delivery,
            updated_at: sync.updated_at,
        },
        components: report
            .get("components")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
        errors,
        link,
    })
}

#[cfg(test)]
mod tests {
    use super::SyncState::*;
    use super::*;

    #[test]
    fn sync_states_follow_the_revisions_and_the_link() {
        // (online, desired, delivered, applied, suspended, failed) -> state
        let cases = [
            ((false, 0, 0, 0, false, false), Linking),
            ((true, 0, 0, 0, false, false), InSync),
            ((false, 3, 0, 0, false, false), Linking),
            ((false, 3, 1, 1, false, false), PendingDelivery),
            ((true, 3, 1, 1, false, false), Syncing),
            ((true, 3, 3, 1, false, false), Syncing),
            ((false, 3, 3, 1, false, false), Syncing),
            ((true, 3, 3, 3, false, false), InSync),
            ((false, 3, 3, 3, false, false), InSync),
            ((true, 4, 4, 4, true, false), Suspended),
            ((true, 3, 3, 2, false, true), Failed),
            // The desired revision itself was tried, failed and rolled back.
            ((true, 3, 3, 3, false, true), Failed),
            ((false, 3, 3, 3, false, true), Failed),
            // A failure of an older revision does not hide a newer delivery in flight.
            ((true, 4, 3, 2, false, true), Syncing),
        ];
        for state in [Linking, InSync, Syncing, PendingDelivery, Failed, Suspended] {
            assert_eq!(
                serde_json::to_value(state).unwrap(),
                serde_json::Value::String(state.as_str().into())
            );
        }
        for ((online, desired, delivered, applied, suspended, failed), want) in cases {
            assert_eq!(
                sync_state(online, desired, delivered, applied, suspended, failed),
                want,
                "online={online} desired={desired} delivered={delivered} applied={applied} suspended={suspended} failed={failed}"
            );
        }
    }
}

/// One stage in a project's status overview.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StageSyncSummary {
    pub stage: String,
    pub outpost: String,
    /// Whether the outpost has a live link right now.
    pub connected: bool,
    /// As in [`SyncView::state`]: `in-sync` only for what the agent
    /// confirmed (for an outpost that is not connected, the last state it
    /// confirmed).
    pub sync: SyncState,
    pub desired_revision: u64,
    pub delivered_revision: u64,
    pub applied_revision: u64,
    pub latest_release: Option<u64>,
    pub applied_release: Option<u64>,
    /// When the hub last recorded what the outpost said about the stage (a
    /// delivery acknowledged or a status report), as in the stage's own
    /// `outpost-status`; absent before the first. A watcher can read when
    /// each stage applied from one call after a rollout instead of polling.
    pub updated_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// The query of `GET /projects/{project}/outpost-status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ProjectStatusQuery {
    /// Only the stages whose outpost has not yet applied their desired
    /// revision: what a rollout is still waiting for. A stage leaves this
    /// list once its agent reports the revision applied.
    #[serde(default)]
    pub pending: bool,
    /// Only stages whose outpost's labels match this label selector.
    #[serde(default)]
    pub selector: Option<String>,
}

/// How far every stage of a project has synced, in one call: what a
/// dashboard (or a fleet-wide rollout watcher) polls instead of asking
/// stage by stage. Components and errors are in each stage's
/// `outpost-status`. With `?pending=true`, only the stages a rollout is
/// still waiting for, so a watcher's poll shrinks as the rollout lands.
#[utoipa::path(get, path = "/projects/{project}/outpost-status", tag = "stages",
    params(crate::api::params::ProjectPath, ProjectStatusQuery),
    responses((status = 200, body = Vec<StageSyncSummary>)))]
pub async fn project_status(
    State(state): State<AppState>,
    caller: Caller,
    Path(project): Path<String>,
    Query(q): Query<ProjectStatusQuery>,
) -> ApiResult<Json<Vec<StageSyncSummary>>> {
    let selector = crate::api::rollouts::list_selector(q.selector.as_deref())?;
    caller.role_in(&state, &project).await?;
    let chosen = match &selector {
        Some(selector) => Some(crate::api::rollouts::outposts_matching(&state, selector).await?),
        None => None,
    };
    let which = if q.pending {
        StageFilter::Pending
    } else {
        StageFilter::All
    };
    let summaries = state.store().list_stage_summaries(&project, which).await?;
    let links = state.links();
    Ok(Json(
        summaries
            .into_iter()
            .filter(|s| chosen.as_ref().is_none_or(|c| c.contains(&s.stage.outpost)))
            .map(|s| {
                let connected = links.is_connected(&s.stage.outpost);
                StageSyncSummary {
                    sync: stage_sync_state(
                        &s.stage,
                        s.delivered_revision,
                        s.applied_revision,
                        s.report_state.as_deref(),
                        connected,
                    ),
                    connected,
                    desired_revision: s.stage.desired_revision,
                    delivered_revision: s.delivered_revision,
                    applied_revision: s.applied_revision,
                    latest_release: s.stage.latest_release,
                    applied_release: s.applied_release,
                    updated_at: s.sync_updated_at,
                    stage: s.stage.name,
                    outpost: s.stage.outpost,
                }
            })
            .collect(),
    ))
}
