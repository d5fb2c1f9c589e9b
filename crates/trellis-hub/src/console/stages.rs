//! Creating a stage (with the Outpost URI checkbox, field and Validate
//! button), and the stage page: components, releases, actions, logs.

use askama::Template;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::Utc;
use serde::Deserialize;
use trellis_model::{LOCAL_OUTPOST, ReleaseState, StageType};

use super::session::Signed;
use super::status::{StatusView, status_view};
use super::view::{Badge, ago, bytes, sync_badge, when};
use super::{ConsoleError, Form, Page, render, wants_fragment};
use crate::api::types::{CreateStageRequest, LogsQuery, PushReleaseRequest, UpdateStageRequest};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::{Json, Path, Query};
use crate::outposts::{AgentFacts, OutpostDescription};
use crate::state::AppState;

/// The create-stage form as submitted.
#[derive(Debug, Clone, Deserialize)]
pub struct StageForm {
    #[serde(default)]
    name: String,
    #[serde(default = "default_type", rename = "type")]
    stage_type: String,
    #[serde(default)]
    display_name: String,
    /// The "THIS STAGE IS AN OUTPOST" checkbox (`on` when ticked).
    #[serde(default)]
    outpost: Option<String>,
    #[serde(default)]
    outpost_uri: String,
}

fn default_type() -> String {
    "dev".to_owned()
}

impl Default for StageForm {
    fn default() -> Self {
        StageForm {
            name: String::new(),
            stage_type: default_type(),
            display_name: String::new(),
            outpost: None,
            outpost_uri: String::new(),
        }
    }
}

impl StageForm {
    fn on_outpost(&self) -> bool {
        self.outpost.is_some()
    }
}

/// What validating an Outpost URI showed: the outpost's description.
pub struct ValidationView {
    pub name: String,
    pub display_name: String,
    pub description: String,
    pub labels: String,
    pub link: Badge,
    pub link_since: String,
    pub last_seen: String,
    pub agent: Option<AgentView>,
    pub stages: String,
    pub your_stages: String,
}

pub struct AgentView {
    pub version: String,
    pub platform: String,
    pub runtimes: String,
    /// The devices offered, e.g. `camera (/dev/video0, rw, exclusive), gpu
    /// (nvidia.com/gpu=all)`; `none`.
    pub devices: String,
    pub cpus: u32,
    pub memory: String,
    pub disk_free: String,
}

impl AgentView {
    pub fn of(a: AgentFacts) -> AgentView {
        AgentView {
            platform: format!("{}/{}", a.os, a.arch),
            runtimes: if a.runtimes.is_empty() {
                "none".to_owned()
            } else {
                a.runtimes
                    .iter()
                    .map(|r| format!("{} {}", r.name, r.version))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
            devices: devices_text(&a.devices),
            cpus: a.cpus,
            memory: bytes(a.memory_bytes),
            disk_free: bytes(a.disk_free_bytes),
            version: a.version,
        }
    }
}

/// The offered devices in a line.
fn devices_text(devices: &[crate::outposts::DeviceFact]) -> String {
    if devices.is_empty() {
        return "none".to_owned();
    }
    devices
        .iter()
        .map(|d| {
            let mut facts: Vec<String> = Vec::new();
            if !d.path.is_empty() {
                facts.push(d.path.clone());
            }
            if !d.access.is_empty() {
                facts.push(d.access.clone());
            }
            facts.extend(d.gpus.iter().cloned());
            if d.exclusive {
                facts.push("exclusive".into());
            }
            match d.granted {
                Some(false) => facts.push("not granted to this project".into()),
                _ if d.restricted => facts.push("some projects only".into()),
                _ => {}
            }
            format!("{} ({})", d.name, facts.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl ValidationView {
    fn of(d: OutpostDescription) -> ValidationView {
        let now = Utc::now();
        ValidationView {
            labels: if d.labels.is_empty() {
                "none".to_owned()
            } else {
                d.labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
            link: Badge::of(&d.link.state),
            link_since: format!("{} ({})", when(d.link.since), ago(d.link.since, now)),
            last_seen: d
                .link
                .last_seen
                .map_or_else(|| "never".to_owned(), |t| ago(t, now)),
            agent: d.agent.map(AgentView::of),
            stages: match d.max_stages {
                Some(max) => format!("{} of at most {max}", d.stage_count),
                None => format!("{} (no limit)", d.stage_count),
            },
            your_stages: if d.your_stages.is_empty() {
                "none".to_owned()
            } else {
                d.your_stages.join(", ")
            },
            name: d.name,
            display_name: d.display_name,
            description: d.description,
        }
    }
}

#[derive(Template)]
#[template(path = "stage_new.html")]
struct NewStagePage {
    page: Page,
    project: String,
    form: StageForm,
    validation: Option<ValidationView>,
    validation_error: Option<ApiError>,
    error: Option<ApiError>,
    /// The URI the shown description belongs to; Create is enabled only
    /// while the field holds it.
    validated_uri: String,
}

impl NewStagePage {
    fn create_enabled(&self) -> bool {
        !self.form.on_outpost()
            || (self.validation.is_some() && self.validated_uri == self.form.outpost_uri.trim())
    }

    fn is_type(&self, t: &str) -> bool {
        self.form.stage_type == t
    }
}

/// The validation result alone, for the script behind the Validate button.
#[derive(Template)]
#[template(path = "validation.html")]
struct ValidationFragment {
    validation: Option<ValidationView>,
    validation_error: Option<ApiError>,
}

pub async fn new_form(
    State(state): State<AppState>,
    Signed(caller): Signed,
    Path(project): Path<String>,
) -> Result<Response, ConsoleError> {
    caller.role_in(&state, &project).await?;
    let page = NewStagePage {
        page: Page::signed(format!("{project} · new stage"), &caller, "projects"),
        project,
        form: StageForm::default(),
        validation: None,
        validation_error: None,
        error: None,
        validated_uri: String::new(),
    };
    Ok(render(&page)?.into_response())
}

async fn validate_uri(
    state: &AppState,
    caller: &Caller,
    project: &str,
    uri: &str,
) -> Result<ValidationView, ApiError> {
    if uri.trim().is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed-uri",
            "the Outpost URI field is empty",
            "paste the Outpost URI your administrator gave you (it starts with trellis://)",
        ));
    }
    let (_, description) =
        crate::outposts::validate(state, caller, uri.trim(), Some(project)).await?;
    Ok(ValidationView::of(description))
}

/// The Validate button: the outpost's description, or the error and its
/// hint. Scripts get the fragment; without a script the form comes back.
pub async fn validate(
    State(state): State<AppState>,
    Signed(caller): Signed,
    Path(project): Path<String>,
    headers: HeaderMap,
    Form(form): Form<StageForm>,
) -> Result<Response, ConsoleError> {
    caller.role_in(&state, &project).await?;
    let result = validate_uri(&state, &caller, &project, &form.outpost_uri).await;
    let status = match &result {
        Ok(_) => StatusCode::OK,
        Err(e) => e.status,
    };
    let (validation, validation_error) = match result {
        Ok(v) => (Some(v), None),
        Err(e) => (None, Some(e)),
    };
    if wants_fragment(&headers) {
        let fragment = ValidationFragment {
            validation,
            validation_error,
        };
        return Ok((status, render(&fragment)?).into_response());
    }
    let validated_uri = if validation.is_some() {
        form.outpost_uri.trim().to_owned()
    } else {
        String::new()
    };
    let page = NewStagePage {
        page: Page::signed(format!("{project} · new stage"), &caller, "projects"),
        project,
        form: StageForm {
            outpost: Some("on".into()),
            ..form
        },
        validation,
        validation_error,
        error: None,
        validated_uri,
    };
    Ok((status, render(&page)?).into_response())
}

/// Codes of the errors validation answers; shown under the URI field.
const VALIDATION_CODES: [&str; 7] = [
    "malformed-uri",
    "other-hub",
    "unknown-outpost",
    "wrong-key",
    "revoked",
    "not-allowed",
    "outpost-full",
];

pub async fn create(
    State(state): State<AppState>,
    Signed(caller): Signed,
    Path(project): Path<String>,
    Form(form): Form<StageForm>,
) -> Result<Response, ConsoleError> {
    caller.role_in(&state, &project).await?;
    let result = match form.stage_type.parse::<StageType>() {
        Err(e) => Err(ApiError::bad_request(e, "choose dev, qa or prod")),
        Ok(_) if form.on_outpost() && form.outpost_uri.trim().is_empty() => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed-uri",
            "\"This stage is an outpost\" is ticked but the Outpost URI field is empty",
            "paste the Outpost URI your administrator gave you and press Validate, or untick the box",
        )),
        Ok(stage_type) => {
            let request = CreateStageRequest {
                name: form.name.trim().to_owned(),
                stage_type,
                display_name: Some(form.display_name.trim().to_owned()).filter(|d| !d.is_empty()),
                outpost_uri: form
                    .on_outpost()
                    .then(|| form.outpost_uri.trim().to_owned()),
            };
            crate::api::stages::create_stage(
                State(state.clone()),
                caller.clone(),
                Path(project.clone()),
                Json(request),
            )
            .await
            .map(|(_, Json(stage))| stage)
        }
    };
    match result {
        Ok(stage) => Ok(Redirect::to(&format!(
            "/projects/{}/stages/{}",
            stage.project, stage.name
        ))
        .into_response()),
        Err(e) => {
            let status = e.status;
            let on_uri = VALIDATION_CODES.contains(&e.code);
            let error = e;
            let page = NewStagePage {
                page: Page::signed(format!("{project} · new stage"), &caller, "projects"),
                project,
                form,
                validation: None,
                validation_error: on_uri.then(|| error.clone()),
                error: (!on_uri).then_some(error),
                validated_uri: String::new(),
            };
            Ok((status, render(&page)?).into_response())
        }
    }
}

struct ComponentRow {
    name: String,
    state: Badge,
    replicas: String,
    restarts: u32,
    note: String,
    stopped: bool,
    in_release: bool,
    /// The URLs the outpost's entry point serves it at (links), or, while
    /// it reports none, its ingress hosts (text).
    urls: Vec<String>,
    hosts: Vec<String>,
    /// The outpost's devices it holds, or, while the outpost reports none,
    /// those its manifest asks for (`devices_held` says which).
    devices: Vec<String>,
    devices_held: bool,
}

struct ReleaseRow {
    number: u64,
    build: String,
    config: String,
    state: Badge,
    /// Superseded releases never ran: a newer one was pushed first.
    superseded: bool,
    created: String,
    by: String,
}

#[derive(Template)]
#[template(path = "stage.html")]
struct StagePage {
    page: Page,
    project: String,
    name: String,
    display_name: String,
    stage_type: String,
    suspended: bool,
    /// `None` for stages on the hub's local outpost.
    outpost: Option<String>,
    base: String,
    sync: Badge,
    running: String,
    release: Option<u64>,
    build: Option<String>,
    components: Vec<ComponentRow>,
    components_note: String,
    releases: Vec<ReleaseRow>,
    builds: Vec<String>,
    configs: Vec<String>,
    status: Option<StatusView>,
}

pub async fn show(
    State(state): State<AppState>,
    Signed(caller): Signed,
    Path((project, stage)): Path<(String, String)>,
) -> Result<Response, ConsoleError> {
    caller.role_in(&state, &project).await?;
    let store = state.store();
    let record = store.get_stage(&project, &stage).await?;
    let Json(view) = crate::api::components::list_components(
        State(state.clone()),
        caller.clone(),
        Path((project.clone(), stage.clone())),
    )
    .await?;
    let status = crate::link::status::compute(&state, &project, &stage).await?;
    let mut releases = store.list_releases(&project, &stage).await?;
    releases.sort_by_key(|r| std::cmp::Reverse(r.number));
    let mut builds = store.list_builds(&project).await?;
    builds.sort_by_key(|b| std::cmp::Reverse(b.created_at));
    let configs = store.list_configs(&project, Some(&stage)).await?;
    let now = Utc::now();

    let components_note = match view.observed_at {
        None => "The outpost has not reported this stage yet.".to_owned(),
        Some(at) if view.current => format!("As the outpost reported {}.", ago(at, now)),
        Some(at) => format!(
            "As the outpost reported {} for revision {}; it has not reported revision {} yet.",
            ago(at, now),
            view.reported_revision,
            view.desired_revision
        ),
    };
    let on_outpost = record.outpost != LOCAL_OUTPOST;
    let page = StagePage {
        page: Page::signed(format!("{project} · {stage}"), &caller, "projects"),
        base: format!("/projects/{project}/stages/{stage}"),
        name: record.name.clone(),
        display_name: record.display_name.clone(),
        stage_type: record.stage_type.to_string(),
        suspended: record.suspended,
        outpost: on_outpost.then(|| record.outpost.clone()),
        sync: sync_badge(status.sync.state.as_str(), status.link.state.is_connected()),
        running: super::projects::release_text(
            status.sync.applied_release,
            status.sync.desired_release,
        ),
        release: view.release,
        build: view.build.clone(),
        components: view
            .components
            .into_iter()
            .map(|c| ComponentRow {
                state: Badge::of(if c.desired.stopped && c.observed.state == "unknown" {
                    "stopped"
                } else {
                    &c.observed.state
                }),
                replicas: format!("{}/{}", c.observed.running, c.observed.replicas),
                restarts: c.observed.restarts,
                note: c
                    .observed
                    .message
                    .clone()
                    .or_else(|| c.desired.stopped.then(|| "stopped on request".to_owned()))
                    .or_else(|| c.scheduled.then(|| "runs on a schedule".to_owned()))
                    .unwrap_or_default(),
                stopped: c.desired.stopped,
                in_release: c.in_release,
                hosts: if c.observed.urls.is_empty() {
                    c.hosts
                } else {
                    Vec::new()
                },
                devices_held: !c.observed.devices.is_empty(),
                devices: if c.observed.devices.is_empty() {
                    c.devices
                } else {
                    c.observed.devices.clone()
                },
                urls: c.observed.urls,
                name: c.name,
            })
            .collect(),
        components_note,
        releases: releases
            .into_iter()
            .map(|r| ReleaseRow {
                number: r.number,
                config: r
                    .config
                    .as_ref()
                    .map_or_else(|| "—".to_owned(), |c| format!("{} v{}", c.name, c.version)),
                state: Badge::of(r.state.as_str()),
                superseded: r.state == ReleaseState::Superseded,
                created: when(r.created_at),
                by: r.created_by,
                build: r.build,
            })
            .collect(),
        builds: builds.into_iter().map(|b| b.name).collect(),
        configs: configs.into_iter().map(|c| c.name).collect(),
        status: on_outpost.then(|| status_view(status, now)),
        project,
    };
    Ok(render(&page)?.into_response())
}

fn back_to(project: &str, stage: &str, anchor: &str) -> Response {
    Redirect::to(&format!("/projects/{project}/stages/{stage}#{anchor}")).into_response()
}

#[derive(Debug, Deserialize)]
pub struct PushForm {
    #[serde(default)]
    build: String,
    #[serde(default)]
    config: String,
}

pub async fn push_release(
    State(state): State<AppState>,
    Signed(caller): Signed,
    Path((project, stage)): Path<(String, String)>,
    Form(form): Form<PushForm>,
) -> Result<Response, ConsoleError> {
    let request = PushReleaseRequest {
        build: Some(form.build).filter(|b| !b.is_empty()),
        config: Some(form.config).filter(|c| !c.is_empty()),
    };
    crate::api::stages::push_release(
        State(state),
        caller,
        Path((project.clone(), stage.clone())),
        Json(request),
    )
    .await?;
    Ok(back_to(&project, &stage, "releases"))
}

pub async fn control_component(
    State(state): State<AppState>,
    Signed(caller): Signed,
    Path((project, stage, component, action)): Path<(String, String, String, String)>,
) -> Result<Response, ConsoleError> {
    crate::api::components::control_component(
        State(state),
        caller,
        Path((project.clone(), stage.clone(), component, action)),
    )
    .await?;
    Ok(back_to(&project, &stage, "components"))
}

async fn set_suspended(
    state: AppState,
    caller: Caller,
    project: String,
    stage: String,
    suspended: bool,
) -> Result<Response, ConsoleError> {
    crate::api::stages::update_stage(
        State(state),
        caller,
        Path((project.clone(), stage.clone())),
        Json(UpdateStageRequest {
            suspended: Some(suspended),
            ..UpdateStageRequest::default()
        }),
    )
    .await?;
    Ok(back_to(&project, &stage, "top"))
}

pub async fn suspend(
    State(state): State<AppState>,
    Signed(caller): Signed,
    Path((project, stage)): Path<(String, String)>,
) -> Result<Response, ConsoleError> {
    set_suspended(state, caller, project, stage, true).await
}

pub async fn resume(
    State(state): State<AppState>,
    Signed(caller): Signed,
    Path((project, stage)): Path<(String, String)>,
) -> Result<Response, ConsoleError> {
    set_suspended(state, caller, project, stage, false).await
}

/// The stage's logs, exactly as the API streams them (JSON lines); the
/// page's script shows them and follows them.
pub async fn logs(
    State(state): State<AppState>,
    Signed(caller): Signed,
    path: Path<(String, String)>,
    query: Query<LogsQuery>,
) -> Response {
    match crate::api::components::stage_logs(State(state), caller, path, query).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}
