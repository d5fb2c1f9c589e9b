//! The connection status of an outpost stage: the popup's content, as a
//! page of its own (without a script) and as a live event stream that
//! sends the content again whenever it changes (checked every second).

use std::convert::Infallible;
use std::time::Duration;

use askama::Template;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::session::Signed;
use super::view::{Badge, ago, bytes, last_seen, rtt, sync_badge, when, when_ago};
use super::{ConsoleError, Page, render};
use crate::extract::Path;
use crate::link::status::{StageStatus, compute};
use crate::state::AppState;

/// How often a live status stream looks for changes.
const REFRESH: Duration = Duration::from_secs(1);

pub struct ErrorRow {
    pub source: String,
    pub code: String,
    pub message: String,
    pub hint: String,
    pub first_seen: String,
    pub last_seen: String,
    pub count: u64,
}

pub struct ProgressView {
    pub revision: u64,
    pub step: String,
    pub done: String,
    pub percent: u64,
}

/// Everything the popup shows, ready to print.
pub struct StatusView {
    pub outpost: String,
    pub link: Badge,
    pub link_since: String,
    pub last_seen: String,
    pub rtt: String,
    pub agent_version: String,
    pub last_disconnect: Option<String>,
    pub attention: Option<String>,
    pub certificate_expires: Option<String>,
    pub sync: Badge,
    pub desired_revision: u64,
    pub applied_revision: u64,
    pub desired_release: String,
    pub applied_release: String,
    pub message: Option<String>,
    pub rolled_back_to: Option<String>,
    pub progress: Option<ProgressView>,
    pub errors: Vec<ErrorRow>,
    pub checked: String,
}

fn release(number: Option<u64>) -> String {
    number.map_or_else(|| "none".to_owned(), |n| format!("#{n}"))
}

pub fn status_view(s: StageStatus, now: DateTime<Utc>) -> StatusView {
    let link = s.link;
    let sync = s.sync;
    StatusView {
        outpost: s.outpost,
        link: Badge::of(link.state.as_str()),
        link_since: when_ago(link.since, now),
        last_seen: last_seen(link.last_seen, now),
        rtt: rtt(link.rtt_ms),
        agent_version: link.agent_version.unwrap_or_else(|| "unknown".to_owned()),
        last_disconnect: link.last_disconnect,
        attention: link.attention,
        certificate_expires: link.certificate_expires.map(|t| when_ago(t, now)),
        sync: sync_badge(sync.state.as_str(), link.state.is_connected()),
        desired_revision: sync.desired_revision,
        applied_revision: sync.applied_revision,
        desired_release: release(sync.desired_release),
        applied_release: release(sync.applied_release),
        message: sync.message,
        rolled_back_to: sync.rolled_back_to.map(|n| {
            if n == 0 {
                "nothing (the stage was emptied)".to_owned()
            } else {
                format!("release #{n}")
            }
        }),
        progress: sync.delivery.map(|d| ProgressView {
            revision: d.revision,
            percent: (d.fetched.saturating_mul(100))
                .checked_div(d.total)
                .unwrap_or(100)
                .min(100),
            done: format!("{} of {}", bytes(d.fetched), bytes(d.total)),
            step: d.step,
        }),
        errors: s
            .errors
            .into_iter()
            .map(|e| ErrorRow {
                first_seen: when(e.first_seen),
                last_seen: format!("{} ({})", when(e.last_seen), ago(e.last_seen, now)),
                source: e.source,
                code: e.code,
                message: e.message,
                hint: e.hint,
                count: e.count,
            })
            .collect(),
        checked: now.format("%H:%M:%S UTC").to_string(),
    }
}

#[derive(Template)]
#[template(path = "status_body.html")]
struct StatusFragment {
    status: StatusView,
}

#[derive(Template)]
#[template(path = "status_page.html")]
struct StatusPage {
    page: Page,
    project: String,
    stage: String,
    status: StatusView,
}

async fn fragment(state: &AppState, project: &str, stage: &str) -> Result<String, ConsoleError> {
    let status = compute(state, project, stage).await?;
    let html = render(&StatusFragment {
        status: status_view(status, Utc::now()),
    })?
    .0;
    Ok(html)
}

/// The status as a page of its own; it reloads itself every two seconds,
/// so it stays live without a script.
pub async fn page(
    State(state): State<AppState>,
    Signed(caller): Signed,
    Path((project, stage)): Path<(String, String)>,
) -> Result<Response, ConsoleError> {
    caller.role_in(&state, &project).await?;
    let status = compute(&state, &project, &stage).await?;
    let page = StatusPage {
        page: Page::signed(
            format!("{project} · {stage} · connection"),
            &caller,
            "projects",
        ),
        status: status_view(status, Utc::now()),
        project,
        stage,
    };
    Ok(render(&page)?.into_response())
}

/// Server-sent events: the popup's content whenever it changes. The
/// stream ends when the browser closes it or the hub shuts down.
pub async fn events(
    State(state): State<AppState>,
    Signed(caller): Signed,
    Path((project, stage)): Path<(String, String)>,
) -> Result<Response, ConsoleError> {
    caller.role_in(&state, &project).await?;
    // Fail here, with a status code, if the stage does not exist.
    let first = fragment(&state, &project, &stage).await?;
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(2);
    let shutdown = state.shutdown_token().clone();
    tokio::spawn(async move {
        let mut last = String::new();
        let mut next = Some(first);
        loop {
            let html = match next.take() {
                Some(html) => html,
                None => match fragment(&state, &project, &stage).await {
                    Ok(html) => html,
                    Err(e) => error_fragment(&e),
                },
            };
            if html != last {
                // SSE cannot carry carriage returns; line feeds become
                // several `data:` lines that the browser joins again.
                let event = Event::default().data(html.replace('\r', ""));
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
                last = html;
            }
            tokio::select! {
                () = tokio::time::sleep(REFRESH) => {}
                () = tx.closed() => return,
                () = shutdown.cancelled() => return,
            }
        }
    });
    Ok(Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response())
}

fn error_fragment(e: &ConsoleError) -> String {
    #[derive(Template)]
    #[template(path = "error_fragment.html")]
    struct ErrorFragment<'a> {
        error: &'a crate::error::ApiError,
    }
    ErrorFragment { error: &e.0 }
        .render()
        .unwrap_or_else(|_| "<p class=\"error\">The status could not be read.</p>".to_owned())
}
