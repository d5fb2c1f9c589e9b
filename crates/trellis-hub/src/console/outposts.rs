//! Outposts, for administrators: the list with link state, labels and
//! stage count; registering an outpost and its join command; an outpost's
//! page with its Outpost URI (copy, rotate), a new join command, revoke.

use std::collections::{BTreeMap, HashMap};

use askama::Template;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use chrono::Utc;
use serde::Deserialize;
use trellis_model::LOCAL_OUTPOST;
use trellis_model::agent_update::AgentUpdate;

use super::session::Signed;
use super::stages::AgentView;
use super::view::{Badge, last_seen, rtt, when, when_ago};
use super::{ConsoleError, Form, Page, render};
use crate::api::agent_updates::{OutpostAgent, outpost_agents};
use crate::api::types::{
    CreateOutpostRequest, JoinTokenRequest, JoinTokenResponse, LinkProfileRequest, LinkProfileView,
};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::{Json, Path};
use crate::link::status::link_view;
use crate::state::AppState;

struct OutpostRow {
    name: String,
    display_name: String,
    link: Badge,
    last_seen: String,
    labels: String,
    stages: String,
    local: bool,
    /// The hub instance holding the link, where several share the store.
    instance: String,
    /// The version its agent reported when it last linked.
    agent: String,
    /// Its latest agent update: `0.2.0 fetching`, `0.2.0 failed: <why>`.
    update: Option<Badge>,
}

/// An agent update as a badge: the summary in the tone of its state.
fn update_badge(update: &AgentUpdate) -> Badge {
    Badge {
        text: update.summary(),
        tone: super::view::tone(update.state.as_str()),
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct OutpostForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    display_name: String,
    #[serde(default)]
    description: String,
    /// `key=value` pairs, separated by commas or lines.
    #[serde(default)]
    labels: String,
    #[serde(default)]
    max_stages: String,
    #[serde(default)]
    ingress_domain: String,
}

#[derive(Template)]
#[template(path = "outposts.html")]
struct OutpostsPage {
    page: Page,
    /// Several hub instances share the store: the list says which holds
    /// each link.
    clustered: bool,
    outposts: Vec<OutpostRow>,
    form: OutpostForm,
    error: Option<ApiError>,
}

fn labels_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn outposts_page(
    state: &AppState,
    caller: &Caller,
    form: OutpostForm,
    error: Option<ApiError>,
) -> Result<OutpostsPage, ConsoleError> {
    caller.require_admin("manage outposts")?;
    let now = Utc::now();
    let mut agents: HashMap<String, OutpostAgent> = outpost_agents(state)
        .await?
        .into_iter()
        .map(|a| (a.outpost.clone(), a))
        .collect();
    let mut rows = Vec::new();
    for outpost in state.store().list_outposts().await? {
        let agent = agents.remove(&outpost.name);
        let link = link_view(state, &outpost.name).await?;
        let stages = state.store().stages_on_outpost(&outpost.name).await?.len();
        rows.push(OutpostRow {
            link: Badge::of(link.state.as_str()),
            last_seen: last_seen(link.last_seen, now),
            labels: labels_text(&outpost.labels),
            stages: match outpost.max_stages {
                Some(max) => format!("{stages} of {max}"),
                None => stages.to_string(),
            },
            local: outpost.name == LOCAL_OUTPOST,
            instance: match (&link.instance_address, &link.instance) {
                (Some(address), Some(id)) => format!("{address} ({id})"),
                (None, Some(id)) => id.clone(),
                _ => String::new(),
            },
            agent: agent
                .as_ref()
                .and_then(|a| a.version.clone())
                .unwrap_or_else(|| "-".into()),
            update: agent.and_then(|a| a.update).as_ref().map(update_badge),
            display_name: outpost.display_name,
            name: outpost.name,
        });
    }
    Ok(OutpostsPage {
        page: Page::signed("Outposts", caller, "outposts"),
        clustered: state.cluster().is_shared(),
        outposts: rows,
        form,
        error,
    })
}

pub async fn list(
    State(state): State<AppState>,
    Signed(caller): Signed,
) -> Result<Response, ConsoleError> {
    let page = outposts_page(&state, &caller, OutpostForm::default(), None).await?;
    Ok(render(&page)?.into_response())
}

/// `site=plant-3, line=2` (or one pair per line) as labels.
fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, ApiError> {
    let mut labels = BTreeMap::new();
    for pair in text
        .split([',', '\n'])
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').ok_or_else(|| {
            ApiError::bad_request(
                format!("label {pair:?} is not of the form key=value"),
                "write labels as key=value, separated by commas, e.g. site=plant-3, line=2",
            )
        })?;
        labels.insert(key.trim().to_owned(), value.trim().to_owned());
    }
    Ok(labels)
}

fn create_request(form: &OutpostForm) -> Result<CreateOutpostRequest, ApiError> {
    let max_stages = match form.max_stages.trim() {
        "" => None,
        text => Some(text.parse::<u32>().map_err(|_| {
            ApiError::bad_request(
                format!("the stage limit {text:?} is not a whole number"),
                "leave it empty for no limit, or give a number like 10",
            )
        })?),
    };
    Ok(CreateOutpostRequest {
        name: form.name.trim().to_owned(),
        display_name: Some(form.display_name.trim().to_owned()).filter(|d| !d.is_empty()),
        description: form.description.trim().to_owned(),
        labels: parse_labels(&form.labels)?,
        max_stages,
        ingress_domain: Some(form.ingress_domain.trim().to_owned()).filter(|d| !d.is_empty()),
        token_ttl_secs: None,
    })
}

pub async fn create(
    State(state): State<AppState>,
    Signed(caller): Signed,
    Form(form): Form<OutpostForm>,
) -> Result<Response, ConsoleError> {
    let created = match create_request(&form) {
        Ok(request) => {
            crate::api::outposts::create_outpost(
                State(state.clone()),
                caller.clone(),
                Json(request),
            )
            .await
        }
        Err(e) => Err(e),
    };
    match created {
        Ok((_, Json(created))) => {
            let extras = OutpostExtras {
                join: Some(created.join),
                ..OutpostExtras::default()
            };
            let page = outpost_page(&state, &caller, &created.outpost.name, extras).await?;
            Ok((StatusCode::CREATED, render(&page)?).into_response())
        }
        Err(e) => {
            let status = e.status;
            let page = outposts_page(&state, &caller, form, Some(e)).await?;
            Ok((status, render(&page)?).into_response())
        }
    }
}

struct JoinView {
    command: String,
    expires: String,
}

struct UpdateView {
    badge: Badge,
    from_version: String,
    asked: String,
    changed: String,
}

/// The link-profile form: each field as typed; an empty one stays as it is.
#[derive(Debug, Default, Deserialize)]
pub struct LinkProfileForm {
    #[serde(default)]
    heartbeat: String,
    #[serde(default)]
    bandwidth: String,
    #[serde(default)]
    windows: String,
    #[serde(default)]
    timezone: String,
}

impl LinkProfileForm {
    /// What the API is asked: the fields given, each as typed.
    fn request(&self) -> LinkProfileRequest {
        let given = |text: &str| Some(text.trim().to_owned()).filter(|t| !t.is_empty());
        LinkProfileRequest {
            heartbeat: given(&self.heartbeat),
            bandwidth: given(&self.bandwidth),
            windows: given(&self.windows),
            timezone: given(&self.timezone),
        }
    }
}

#[derive(Template)]
#[template(path = "outpost.html")]
struct OutpostPage {
    page: Page,
    name: String,
    display_name: String,
    description: String,
    labels: String,
    local: bool,
    revoked: Option<String>,
    link: Badge,
    link_since: String,
    last_seen: String,
    rtt: String,
    last_disconnect: Option<String>,
    agent: Option<AgentView>,
    /// Its latest agent update, and what the agent last said of it.
    update: Option<UpdateView>,
    /// Heartbeat, delivery cap and windows, and whether delivery is open
    /// (not for the hub's built-in outpost: it has no link).
    profile: Option<LinkProfileView>,
    /// What the link-profile form last sent, when it was refused.
    profile_form: LinkProfileForm,
    profile_error: Option<ApiError>,
    uri: Option<String>,
    stages: Vec<(String, String)>,
    limit: String,
    /// `<host>.<stage>.<project>.<domain>`.
    ingresses: String,
    join: Option<JoinView>,
}

/// What the outpost page shows beyond the outpost itself: a join command
/// just made, or a link-profile change that was refused.
#[derive(Default)]
struct OutpostExtras {
    join: Option<JoinTokenResponse>,
    profile_form: LinkProfileForm,
    profile_error: Option<ApiError>,
}

async fn outpost_page(
    state: &AppState,
    caller: &Caller,
    name: &str,
    extras: OutpostExtras,
) -> Result<OutpostPage, ConsoleError> {
    caller.require_admin("manage outposts")?;
    let store = state.store();
    let OutpostExtras {
        join,
        profile_form,
        profile_error,
    } = extras;
    let outpost = store.get_outpost(name).await?;
    let link = link_view(state, name).await?;
    let stored = store.get_outpost_link(name).await?;
    let local = name == LOCAL_OUTPOST;
    let uri = if local || outpost.revoked_at.is_some() {
        None
    } else {
        Some(crate::outposts::uri_of(state, &outpost)?.to_string())
    };
    let now = Utc::now();
    let update = store
        .latest_agent_updates()
        .await?
        .into_iter()
        .find(|u| u.outpost == name)
        .map(|u| UpdateView {
            badge: update_badge(&u),
            from_version: if u.from_version.is_empty() {
                "-".into()
            } else {
                u.from_version.clone()
            },
            asked: format!("{} by {}", when_ago(u.created_at, now), u.created_by),
            changed: when_ago(u.updated_at, now),
        });
    let profile = if local {
        None
    } else {
        let Json(profile) = crate::api::outposts::get_link_profile(
            State(state.clone()),
            caller.clone(),
            Path(name.to_owned()),
        )
        .await?;
        Some(profile)
    };
    Ok(OutpostPage {
        page: Page::signed(format!("Outpost {name}"), caller, "outposts"),
        update,
        profile,
        profile_form,
        profile_error,
        name: outpost.name.clone(),
        display_name: outpost.display_name.clone(),
        description: outpost.description.clone(),
        labels: labels_text(&outpost.labels),
        local,
        revoked: outpost.revoked_at.map(when),
        link: Badge::of(link.state.as_str()),
        link_since: when_ago(link.since, now),
        last_seen: last_seen(link.last_seen, now),
        rtt: rtt(link.rtt_ms),
        last_disconnect: link.last_disconnect,
        agent: stored
            .agent
            .as_ref()
            .and_then(crate::outposts::agent_facts)
            .map(AgentView::of),
        uri,
        stages: store
            .stages_on_outpost(name)
            .await?
            .into_iter()
            .map(|s| (s.project, s.name))
            .collect(),
        ingresses: format!("<host>.<stage>.<project>.{}", outpost.ingress_domain()),
        limit: outpost
            .max_stages
            .map_or_else(|| "no limit".to_owned(), |m| m.to_string()),
        join: join.map(|j| JoinView {
            command: j.command,
            expires: when_ago(j.expires_at, now),
        }),
    })
}

pub async fn show(
    State(state): State<AppState>,
    Signed(caller): Signed,
    Path(name): Path<String>,
) -> Result<Response, ConsoleError> {
    let page = outpost_page(&state, &caller, &name, OutpostExtras::default()).await?;
    Ok(render(&page)?.into_response())
}

pub async fn rotate(
    State(state): State<AppState>,
    Signed(caller): Signed,
    Path(name): Path<String>,
) -> Result<Response, ConsoleError> {
    crate::api::outposts::rotate_outpost_uri(State(state), caller, Path(name.clone())).await?;
    Ok(Redirect::to(&format!("/outposts/{name}#uri")).into_response())
}

pub async fn revoke(
    State(state): State<AppState>,
    Signed(caller): Signed,
    Path(name): Path<String>,
) -> Result<Response, ConsoleError> {
    crate::api::outposts::revoke_outpost(State(state), caller, Path(name.clone())).await?;
    Ok(Redirect::to(&format!("/outposts/{name}")).into_response())
}

pub async fn join_token(
    State(state): State<AppState>,
    Signed(caller): Signed,
    Path(name): Path<String>,
) -> Result<Response, ConsoleError> {
    let (_, Json(join)) = crate::api::outposts::create_join_token(
        State(state.clone()),
        caller.clone(),
        Path(name.clone()),
        Json(JoinTokenRequest::default()),
    )
    .await?;
    let extras = OutpostExtras {
        join: Some(join),
        ..OutpostExtras::default()
    };
    let page = outpost_page(&state, &caller, &name, extras).await?;
    Ok((StatusCode::CREATED, render(&page)?).into_response())
}

/// Changes the outpost's link profile; a refused change shows the page
/// again with the error and what was typed, nothing changed.
pub async fn link_profile(
    State(state): State<AppState>,
    Signed(caller): Signed,
    Path(name): Path<String>,
    Form(form): Form<LinkProfileForm>,
) -> Result<Response, ConsoleError> {
    let changed = crate::api::outposts::update_link_profile(
        State(state.clone()),
        caller.clone(),
        Path(name.clone()),
        Json(form.request()),
    )
    .await;
    match changed {
        Ok(_) => Ok(Redirect::to(&format!("/outposts/{name}#link-profile")).into_response()),
        Err(e) if e.status == StatusCode::BAD_REQUEST => {
            let status = e.status;
            let extras = OutpostExtras {
                profile_form: form,
                profile_error: Some(e),
                ..OutpostExtras::default()
            };
            let page = outpost_page(&state, &caller, &name, extras).await?;
            Ok((status, render(&page)?).into_response())
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_labels;

    #[test]
    fn labels_are_read_from_commas_or_lines() {
        let labels = parse_labels("site=plant-3, line = 2\nzone=b").unwrap();
        assert_eq!(labels.len(), 3);
        assert_eq!(labels["line"], "2");
        assert!(parse_labels("").unwrap().is_empty());
        let e = parse_labels("site").unwrap_err();
        assert!(e.message.contains("\"site\""), "{}", e.message);
    }
}
