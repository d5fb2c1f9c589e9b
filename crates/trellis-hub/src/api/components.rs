//! A stage's components: starting, stopping and restarting them, listing
//! them (desired and observed), suspending and resuming the whole stage,
//! and reading their logs live from the outpost.
//!
//! Lifecycle requests are desired state like a release: they are stored,
//! bump the stage's desired revision and poke the outpost's session; the
//! request never waits for the outpost. Logs are the one thing read from the
//! outpost on demand — they never leave it otherwise — so they need its
//! link to be up.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use trellis_link::protocol::{ComponentStatus, LogLine, LogQuery};
use trellis_model::ingress::ingress_host;
use trellis_model::manifest::{Component, Manifest, parse_recorded_manifest};
use trellis_model::{
    Build, ComponentAction, ComponentControl, NameKind, Release, Stage, validate_name,
};
use trellis_store::StageUpdate;

use super::types::{
    ComponentActionQuery, ComponentActionResponse, ComponentDesired, ComponentObserved,
    ComponentView, LogsQuery, StageComponents,
};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Json, Path, Query};
use crate::link::LinkState;
use crate::link::logs::{LogEnd, LogEvent, LogStream, OpenLogsError};
use crate::state::AppState;

/// How long a log request waits for the outpost's first answer before the
/// response starts anyway (an agent answers within ~100 ms plus the
/// round trip).
const FIRST_ANSWER_WAIT: Duration = Duration::from_secs(5);

/// The largest `tail` accepted.
pub const MAX_TAIL: usize = 100_000;

/// Response chunks queued for a slow HTTP reader before the stream stops
/// pulling from the link (and the link, in turn, cuts the request off).
const BODY_QUEUE: usize = 8;

// === what the stage runs ===

/// The stage's latest release, its build and the parsed manifest; `None`
/// when nothing was released to the stage yet.
async fn latest_release(
    state: &AppState,
    stage: &Stage,
) -> ApiResult<Option<(Release, Build, Manifest)>> {
    let Some(number) = stage.latest_release else {
        return Ok(None);
    };
    let store = state.store();
    let release = store
        .get_release(&stage.project, &stage.name, number)
        .await?;
    let build = store.get_build(&stage.project, &release.build).await?;
    let manifest = parse_recorded_manifest(&build.manifest).map_err(|e| {
        ApiError::internal(format!(
            "the manifest of build {} (release {number} of stage {}/{}) no longer parses: {e}",
            build.name, stage.project, stage.name
        ))
    })?;
    Ok(Some((release, build, manifest)))
}

fn no_release(stage: &Stage) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "no-release",
        format!(
            "stage {:?} of project {:?} has no release yet, so it runs no components",
            stage.name, stage.project
        ),
        format!(
            "push a release first: `trellis push release -p {} -s {}`",
            stage.project, stage.name
        ),
    )
}

/// The manifest of the stage's latest release, or the error for a stage
/// without one; and a 404 naming the components if `component` is not in
/// it.
pub(crate) async fn release_with_component(
    state: &AppState,
    stage: &Stage,
    component: Option<&str>,
) -> ApiResult<(Release, Build, Manifest)> {
    let (release, build, manifest) = latest_release(state, stage)
        .await?
        .ok_or_else(|| no_release(stage))?;
    if let Some(name) = component
        && manifest.component(name).is_none()
    {
        let names: Vec<&str> = manifest.component_names().collect();
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no-such-component",
            format!(
                "stage {:?} has no component {name:?}: release {} (build {}) has {}",
                stage.name,
                release.number,
                build.name,
                names.join(", ")
            ),
            format!(
                "use one of: {}; `trellis list component -p {} -s {}` shows them with their state",
                names.join(", "),
                stage.project,
                stage.name
            ),
        ));
    }
    Ok((release, build, manifest))
}

// === lifecycle ===

/// Starts, stops or restarts one component of a stage (`action` is
/// `start`, `stop` or `restart`). A stopped component stays stopped across
/// releases until started; a restart replaces its running workloads (and
/// starts it if it was stopped). A change bumps the stage's desired
/// revision; the outpost applies it as soon as it can — the request does
/// not wait for it.
///
/// `stop?kill=true` kills it: its workloads end at once, without the grace
/// period, and it stays stopped. `start?now=true` on a scheduled component
/// also runs it once at once, outside its schedule (a restart of it).
#[utoipa::path(post, path = "/projects/{project}/stages/{stage}/components/{component}/{action}",
    tag = "components",
    params(crate::api::params::ComponentActionPath, ComponentActionQuery),
    responses((status = 200, body = ComponentActionResponse)))]
pub async fn control_component(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, stage, component, action)): Path<(String, String, String, String)>,
    Query(q): Query<ComponentActionQuery>,
) -> ApiResult<Json<ComponentActionResponse>> {
    caller.role_in(&state, &project).await?;
    let action: ComponentAction = action.parse().map_err(|message: String| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid-action",
            message,
            "POST …/components/NAME/start, …/stop or …/restart",
        )
    })?;
    let misplaced = match action {
        ComponentAction::Start if q.kill => Some("kill"),
        ComponentAction::Stop if q.now => Some("now"),
        ComponentAction::Restart if q.kill || q.now => Some(if q.kill { "kill" } else { "now" }),
        _ => None,
    };
    if let Some(flag) = misplaced {
        let (goes_with, cli) = if flag == "kill" {
            ("stop", "trellis stop component NAME --kill")
        } else {
            ("start", "trellis start component NAME --now")
        };
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid-action",
            format!("`{flag}` goes with {goes_with}, not with {action}"),
            format!("POST …/components/NAME/{goes_with}?{flag}=true (`{cli}`)"),
        ));
    }
    let record = super::stages::live_stage(&state, &project, &stage).await?;
    validate_name(NameKind::Component, &component)?;
    let (_, _, manifest) = release_with_component(&state, &record, Some(&component)).await?;
    let scheduled = manifest
        .components
        .iter()
        .any(|c| c.name == component && c.scheduled.is_some());
    let action = match action {
        // A new restart generation is what makes the outpost run a
        // scheduled component once at once.
        ComponentAction::Start if q.now && scheduled => ComponentAction::Restart,
        ComponentAction::Stop if q.kill => ComponentAction::Kill,
        other => other,
    };
    let outcome = state
        .store()
        .control_component(&project, &stage, &component, action)
        .await?;
    if outcome.changed {
        state.links().poke(&outcome.stage.outpost);
    }
    Ok(Json(ComponentActionResponse {
        project,
        stage,
        component,
        action,
        changed: outcome.changed,
        desired_revision: outcome.stage.desired_revision,
        control: ComponentDesired {
            stopped: outcome.control.stopped,
            killed: outcome.control.killed,
            restarts: outcome.control.restarts,
        },
        stage_suspended: outcome.stage.suspended,
    }))
}

async fn set_suspended(
    state: &AppState,
    caller: &Caller,
    project: &str,
    stage: &str,
    suspended: bool,
) -> ApiResult<Json<Stage>> {
    caller.role_in(state, project).await?;
    super::stages::live_stage(state, project, stage).await?;
    if !suspended
        && let Some(backup) = state
            .store()
            .list_backups(project, stage)
            .await?
            .into_iter()
            .find(|b| b.restore.as_ref().is_some_and(|r| r.state.is_open()))
    {
        // Components started now would run on volumes being replaced.
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "restore-in-progress",
            format!(
                "stage {project}/{stage} is being restored from backup {}, so it stays suspended until that ends",
                backup.id
            ),
            format!("wait for the restore: `trellis list backup -p {project} -s {stage}` shows it"),
        ));
    }
    let update = StageUpdate {
        suspended: Some(suspended),
        ..StageUpdate::default()
    };
    let updated = state.store().update_stage(project, stage, &update).await?;
    state.links().poke(&updated.outpost);
    Ok(Json(updated))
}

/// Suspends a stage: every component stops, releases and controls are
/// kept. Bumps the desired revision unless it is suspended already.
#[utoipa::path(post, path = "/projects/{project}/stages/{stage}/suspend", tag = "stages",
    params(crate::api::params::StagePath),
    responses((status = 200, body = Stage)))]
pub async fn suspend_stage(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, stage)): Path<(String, String)>,
) -> ApiResult<Json<Stage>> {
    set_suspended(&state, &caller, &project, &stage, true).await
}

/// Resumes a suspended stage: its components run again as their controls
/// say. Bumps the desired revision unless it is running already.
#[utoipa::path(post, path = "/projects/{project}/stages/{stage}/resume", tag = "stages",
    params(crate::api::params::StagePath),
    responses((status = 200, body = Stage)))]
pub async fn resume_stage(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, stage)): Path<(String, String)>,
) -> ApiResult<Json<Stage>> {
    set_suspended(&state, &caller, &project, &stage, false).await
}

// === listing ===

/// The components of the stage's latest release: what should be (stopped
/// on request, restarts asked for) and what the outpost last reported. A
/// component the outpost has not reported is `unknown`; `current` says
/// whether the report covers the desired revision, `observed_at` when it
/// came.
#[utoipa::path(get, path = "/projects/{project}/stages/{stage}/components", tag = "components",
    params(crate::api::params::StagePath),
    responses((status = 200, body = StageComponents)))]
pub async fn list_components(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, stage)): Path<(String, String)>,
) -> ApiResult<Json<StageComponents>> {
    caller.role_in(&state, &project).await?;
    let store = state.store();
    let record = store.get_stage(&project, &stage).await?;
    let latest = latest_release(&state, &record).await?;
    let controls = store.list_component_controls(&project, &stage).await?;
    let sync = store.get_stage_sync(&project, &stage).await?;
    let link = crate::link::status::link_view(&state, &record.outpost)
        .await?
        .state;

    let reported: Vec<ComponentStatus> = sync
        .report
        .as_ref()
        .and_then(|r| r.get("components"))
        .and_then(|c| serde_json::from_value(c.clone()).ok())
        .unwrap_or_default();
    let reported_revision = sync
        .report
        .as_ref()
        .and_then(|r| r.get("applied_revision"))
        .and_then(Value::as_u64)
        .unwrap_or(sync.applied_revision);
    let report_text = |key: &str| {
        sync.report
            .as_ref()
            .and_then(|r| r.get(key))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let domain = store
        .get_outpost(&record.outpost)
        .await?
        .ingress_domain()
        .to_owned();
    let names = IngressNames {
        project: &project,
        stage: &stage,
        domain: &domain,
    };
    let components = component_views(
        latest.as_ref().map(|(_, _, m)| m),
        &controls,
        &reported,
        &names,
    );
    Ok(Json(StageComponents {
        project,
        stage,
        outpost: record.outpost.clone(),
        link,
        suspended: record.suspended,
        release: latest.as_ref().map(|(r, _, _)| r.number),
        build: latest.as_ref().map(|(_, b, _)| b.name.clone()),
        desired_revision: record.desired_revision,
        reported_revision,
        observed_at: sync.report.as_ref().and(sync.updated_at),
        current: sync.report.is_some() && reported_revision >= record.desired_revision,
        reported_state: report_text("state"),
        reported_message: report_text("message"),
        rolled_back_to: sync
            .report
            .as_ref()
            .and_then(|r| r.get("rolled_back_to"))
            .and_then(Value::as_u64),
        components,
    }))
}

/// What a stage's ingress hosts are made of.
pub struct IngressNames<'a> {
    pub project: &'a str,
    pub stage: &'a str,
    /// The outpost's ingress domain.
    pub domain: &'a str,
}

impl IngressNames<'_> {
    /// `host.stage.project.domain/path` of each of `component`'s ingresses.
    pub fn of(&self, component: &Component) -> Vec<String> {
        component
            .ingresses
            .iter()
            .map(|i| {
                let host = ingress_host(&i.host, self.stage, self.project, self.domain);
                format!("{host}{}", i.path.as_deref().unwrap_or("/"))
            })
            .collect()
    }
}

/// The manifest's components in manifest order, then any the outpost
/// reports that the manifest does not have. Pure, for tests.
pub fn component_views(
    manifest: Option<&Manifest>,
    controls: &[ComponentControl],
    reported: &[ComponentStatus],
    names: &IngressNames<'_>,
) -> Vec<ComponentView> {
    let desired = |name: &str| {
        controls
            .iter()
            .find(|c| c.component == name)
            .map(|c| ComponentDesired {
                stopped: c.stopped,
                killed: c.killed,
                restarts: c.restarts,
            })
            .unwrap_or_default()
    };
    let observed = |name: &str| {
        reported
            .iter()
            .find(|c| c.name == name)
            .map(|c| ComponentObserved {
                state: if c.state.is_empty() {
                    "unknown".into()
                } else {
                    c.state.clone()
                },
                replicas: c.replicas,
                running: c.running,
                restarts: c.restarts,
                exit_code: c.exit_code,
                since: c.since,
                release: c.release,
                message: c.message.clone(),
                last_run: c.last_run,
                next_run: c.next_run,
                urls: c.urls.clone(),
                devices: c.devices.clone(),
            })
            .unwrap_or_else(|| ComponentObserved {
                state: "unknown".into(),
                ..ComponentObserved::default()
            })
    };
    let mut views: Vec<ComponentView> = manifest
        .map(|m| m.components.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|c| ComponentView {
            name: c.name.clone(),
            in_release: true,
            scheduled: c.is_scheduled(),
            hosts: names.of(c),
            devices: c.device_names().map(str::to_owned).collect(),
            desired: desired(&c.name),
            observed: observed(&c.name),
        })
        .collect();
    for c in reported {
        if !views.iter().any(|v| v.name == c.name) {
            views.push(ComponentView {
                name: c.name.clone(),
                in_release: false,
                scheduled: c.next_run.is_some() || c.last_run.is_some(),
                hosts: Vec::new(),
                devices: Vec::new(),
                desired: desired(&c.name),
                observed: observed(&c.name),
            });
        }
    }
    views
}

// === logs ===

/// `since` as an instant: RFC 3339, or a duration back from `now` made of
/// `<number><unit>` parts with units `s`, `m`, `h`, `d` (`10m`, `1h30m`).
pub fn parse_since(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let text = text.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    let bad = || {
        format!(
            "{text:?} is neither a time (RFC 3339, e.g. 2024-05-01T12:00:00Z) nor a duration \
             (e.g. 30s, 10m, 2h, 1d, 1h30m)"
        )
    };
    if text.is_empty() {
        return Err(bad());
    }
    let mut seconds: i64 = 0;
    let mut digits = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit: i64 = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(bad()),
        };
        let n: i64 = digits.parse().map_err(|_| bad())?;
        digits.clear();
        seconds = n
            .checked_mul(unit)
            .and_then(|s| seconds.checked_add(s))
            .ok_or_else(bad)?;
    }
    if !digits.is_empty() {
        return Err(bad());
    }
    chrono::Duration::try_seconds(seconds)
        .and_then(|d| now.checked_sub_signed(d))
        .ok_or_else(bad)
}

fn invalid_query(code: &'static str, message: String, hint: &str) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, code, message, hint)
}

/// The log lines of a stage's components, read live from its outpost.
///
/// The response is `application/x-ndjson`: one JSON object per line, each
/// a log line `{"time", "component", "replica", "stream": "stdout"|"stderr",
/// "line"}`, oldest first. With `follow` it stays open and new lines arrive
/// as they are written (within a second), until the client disconnects.
/// If the stream breaks after it started, its last line is an error object
/// `{"error": {"code", "message", "hint"}}` (codes `outpost-logs-failed`,
/// `logs-reader-too-slow`, `outpost-offline`). Errors before the first line
/// are ordinary error responses.
#[utoipa::path(get, path = "/projects/{project}/stages/{stage}/logs", tag = "components",
    params(crate::api::params::StagePath, LogsQuery),
    responses(
        (status = 200, description = "one JSON log line per line (see above)", content_type = "application/x-ndjson", body = String)))]
pub async fn stage_logs(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, stage)): Path<(String, String)>,
    Query(q): Query<LogsQuery>,
) -> ApiResult<Response> {
    caller.role_in(&state, &project).await?;
    let record = state.store().get_stage(&project, &stage).await?;
    let since = q
        .since
        .as_deref()
        .map(|s| parse_since(s, Utc::now()))
        .transpose()
        .map_err(|m| {
            invalid_query(
                "invalid-since",
                m,
                "give since as a time like 2024-05-01T12:00:00Z or a duration like 10m",
            )
        })?;
    if let Some(tail) = q.tail
        && tail > MAX_TAIL
    {
        return Err(invalid_query(
            "invalid-tail",
            format!("tail {tail} is more than the {MAX_TAIL} lines a request may ask for"),
            "ask for fewer lines, or narrow them down with since",
        ));
    }
    if let Some(component) = &q.component {
        validate_name(NameKind::Component, component)?;
    }
    release_with_component(&state, &record, q.component.as_deref()).await?;

    let query = LogQuery {
        component: q.component.clone(),
        since,
        tail: q.tail,
        follow: q.follow,
    };
    let mut stream = match state
        .links()
        .open_logs(&record.outpost, &project, &stage, query)
    {
        Ok(stream) => stream,
        Err(OpenLogsError::Offline) => {
            // Where hubs share the store, the link may be on another
            // instance: the request goes there (once).
            if state.cluster().is_shared()
                && !caller.forwarded
                && let crate::cluster::Holder::Other { instance, .. } = state
                    .cluster()
                    .holder(state.store(), &record.outpost)
                    .await?
            {
                let path = logs_path(&project, &stage, &q);
                return crate::cluster::forward::get(&state, &instance, &caller.user, &path).await;
            }
            return Err(offline(&state, &record).await);
        }
        Err(OpenLogsError::Busy) => {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "outpost-busy",
                format!(
                    "outpost {:?} is streaming as many logs as it may at once",
                    record.outpost
                ),
                "retry in a moment, or stop a `trellis logs --follow` that is still running",
            ));
        }
    };

    // Wait for the outpost's first answer, so that a request it refuses at
    // once gets a proper error status instead of an error line.
    let first = match tokio::time::timeout(FIRST_ANSWER_WAIT, stream.next()).await {
        Ok(Some(LogEvent::Lines(lines))) => lines,
        Ok(Some(LogEvent::End(LogEnd::Done)) | None) => Vec::new(),
        Ok(Some(LogEvent::End(end))) => {
            return Err(match end_error(&record, &end) {
                Some(e) if end == LogEnd::LinkClosed => offline_with(e, &state, &record).await,
                Some(e) => e,
                None => ApiError::internal("the log stream ended unexpectedly"),
            });
        }
        Err(_) => Vec::new(),
    };
    tracing::debug!(id = stream.id(), project, stage, "streaming logs");

    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(BODY_QUEUE);
    tokio::spawn(pump(stream, first, tx, record));
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response())
}

/// The path and query of a logs request, as the API's router sees it.
fn logs_path(project: &str, stage: &str, q: &LogsQuery) -> String {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    if let Some(component) = &q.component {
        query.append_pair("component", component);
    }
    if let Some(since) = &q.since {
        query.append_pair("since", since);
    }
    if let Some(tail) = q.tail {
        query.append_pair("tail", &tail.to_string());
    }
    if q.follow {
        query.append_pair("follow", "true");
    }
    let query = query.finish();
    let path = format!("/projects/{project}/stages/{stage}/logs");
    if query.is_empty() {
        path
    } else {
        format!("{path}?{query}")
    }
}

/// Moves batches from the link into the response body until the stream
/// ends or the client goes away (then dropping `stream` cancels the request
/// on the outpost).
async fn pump(
    mut stream: LogStream,
    first: Vec<LogLine>,
    tx: mpsc::Sender<Result<Bytes, Infallible>>,
    stage: Stage,
) {
    if !first.is_empty() && tx.send(Ok(ndjson(&first))).await.is_err() {
        return;
    }
    loop {
        let event = tokio::select! {
            () = tx.closed() => return,
            event = stream.next() => event,
        };
        let chunk = match event {
            None => return,
            Some(LogEvent::Lines(lines)) if lines.is_empty() => continue,
            Some(LogEvent::Lines(lines)) => ndjson(&lines),
            Some(LogEvent::End(end)) => match end_error(&stage, &end) {
                None => return,
                Some(e) => {
                    let mut line = serde_json::to_vec(&json!({"error": {
                        "code": e.code, "message": e.message, "hint": e.hint}}))
                    .unwrap_or_default();
                    line.push(b'\n');
                    let _ = tx.send(Ok(Bytes::from(line))).await;
                    return;
                }
            },
        };
        // Waits while the client is slow; the link meanwhile queues a
        // bounded number of batches, then cuts the request off.
        if tx.send(Ok(chunk)).await.is_err() {
            return;
        }
    }
}

fn ndjson(lines: &[LogLine]) -> Bytes {
    let mut out = Vec::with_capacity(lines.len() * 128);
    for line in lines {
        if serde_json::to_writer(&mut out, line).is_ok() {
            out.push(b'\n');
        }
    }
    Bytes::from(out)
}

/// The error a stream's end means, if it is one.
fn end_error(stage: &Stage, end: &LogEnd) -> Option<ApiError> {
    match end {
        LogEnd::Done => None,
        LogEnd::Failed(message) => Some(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "outpost-logs-failed",
            format!(
                "the outpost {:?} could not read the logs of stage {:?}: {message}",
                stage.outpost, stage.name
            ),
            format!(
                "check the stage with `trellis status stage {} -p {}`",
                stage.name, stage.project
            ),
        )),
        LogEnd::TooSlow => Some(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "logs-reader-too-slow",
            "the log lines came faster than this client read them, so the stream was stopped \
             rather than hold up the outpost's link",
            "read the response faster, or ask for fewer lines with since or tail",
        )),
        // A state of the outpost, not a fault of the hub: 409, as for an
        // outpost that was offline from the start.
        LogEnd::LinkClosed => Some(ApiError::new(
            StatusCode::CONFLICT,
            "outpost-offline",
            format!(
                "the link to outpost {:?} closed while its logs were being read",
                stage.outpost
            ),
            "retry once the outpost is online again (`trellis status stage` shows its link)",
        )),
    }
}

/// 409 for a stage whose outpost has no live link: what the stage is in,
/// not a fault of the hub.
pub(crate) async fn offline(state: &AppState, stage: &Stage) -> ApiError {
    let base = ApiError::new(
        StatusCode::CONFLICT,
        "outpost-offline",
        format!(
            "outpost {:?}, where stage {:?} runs, is not connected to the hub",
            stage.outpost, stage.name
        ),
        String::new(),
    );
    offline_with(base, state, stage).await
}

async fn offline_with(mut err: ApiError, state: &AppState, stage: &Stage) -> ApiError {
    let view = crate::link::status::link_view(state, &stage.outpost)
        .await
        .ok();
    let seen = view
        .as_ref()
        .and_then(|v| v.last_seen)
        .map(|t| format!(" (last seen {})", t.format("%Y-%m-%d %H:%M:%S UTC")))
        .unwrap_or_default();
    let revoked = view.as_ref().is_some_and(|v| v.state == LinkState::Revoked);
    err.hint = if revoked {
        format!(
            "outpost {:?} was revoked; ask an administrator about it",
            stage.outpost
        )
    } else {
        format!(
            "logs are read live from the outpost{seen}; its components keep running while it \
             is offline, and logs can be read once its agent is connected again \
             (`trellis status stage {} -p {}` shows the link)",
            stage.name, stage.project
        )
    };
    err
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_times_and_durations() {
        let now = DateTime::parse_from_rfc3339("2024-05-01T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let ago = |s: &str| (now - parse_since(s, now).unwrap()).num_seconds();
        assert_eq!(ago("30s"), 30);
        assert_eq!(ago("10m"), 600);
        assert_eq!(ago("2h"), 7200);
        assert_eq!(ago("1d"), 86_400);
        assert_eq!(ago("1h30m"), 5400);
        assert_eq!(ago(" 0s "), 0);
        assert_eq!(
            parse_since("2024-05-01T11:00:00+01:00", now).unwrap(),
            now - chrono::Duration::hours(2)
        );
        for bad in [
            "",
            "10",
            "m",
            "10x",
            "ten minutes",
            "-5m",
            "10m5",
            "99999999999999999999s",
        ] {
            let err = parse_since(bad, now).unwrap_err();
            assert!(
                err.contains("RFC 3339") && err.contains("10m"),
                "{bad}: {err}"
            );
        }
    }

    const NAMES: IngressNames<'static> = IngressNames {
        project: "kasse",
        stage: "dev",
        domain: "plant7.example.net",
    };

    #[test]
    fn components_unreported_are_unknown_and_extras_are_listed() {
        let manifest = parse_recorded_manifest(
            "version: v1\ncomponents:\n  - name: web\n    docker:\n      image: web:1\n    ports: [80]\n    ingresses: [{host: shop}, {host: shop, path: /api}]\n  - name: nightly\n    docker:\n      image: job:1\n    scheduled: \"0 3 * * *\"\n",
        )
        .unwrap();
        let controls = vec![ComponentControl {
            component: "web".into(),
            stopped: true,
            restarts: 2,
            killed: false,
        }];
        let reported = vec![
            ComponentStatus {
                name: "web".into(),
                state: "stopped".into(),
                replicas: 1,
                ..Default::default()
            },
            ComponentStatus {
                name: "old".into(),
                state: "running".into(),
                ..Default::default()
            },
        ];
        let views = component_views(Some(&manifest), &controls, &reported, &NAMES);
        let names: Vec<&str> = views.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["web", "nightly", "old"]);
        assert_eq!(
            views[0].desired,
            ComponentDesired {
                stopped: true,
                killed: false,
                restarts: 2
            }
        );
        assert_eq!(views[0].observed.state, "stopped");
        assert_eq!(views[1].observed.state, "unknown");
        assert!(views[1].scheduled && views[1].in_release);
        assert!(!views[2].in_release);
        assert_eq!(
            views[0].hosts,
            [
                "shop.dev.kasse.plant7.example.net/",
                "shop.dev.kasse.plant7.example.net/api"
            ]
        );
        assert!(views[1].hosts.is_empty());
        assert!(component_views(None, &[], &[], &NAMES).is_empty());
    }
}
