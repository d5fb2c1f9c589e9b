//! Reaching into a stage's components: `…/components/{c}/exec` (a command,
//! `trellis exec`) and `…/components/{c}/port-forward` (a TCP connection,
//! `trellis port-forward`), each a WebSocket carried as a stream over the
//! outpost's link (see [`crate::link::streams`]), and the project's audit
//! log of them.
//!
//! Every open is authorised before anything reaches the outpost: the caller
//! must be a member of the project (a non-member gets the 404 of a missing
//! project), the component must be in the stage's latest release (and a
//! forwarded port one it lists), and the per-outpost and per-user limits
//! must have room. Then the agent is asked; only once it has started the
//! command or made the connection does the request upgrade, so every
//! refusal is an ordinary error response. Every open that passed the
//! authorisation is recorded in the audit log with its outcome.
//!
//! # The socket
//!
//! Binary messages carry bytes: the first byte is the channel (`0`: to the
//! command's stdin or the connection, `1`: its stdout or the connection's
//! bytes, `2`: its stderr), the rest the bytes. Text messages are JSON:
//! from the client `{"type":"resize","cols":N,"rows":N}` and
//! `{"type":"eof"}` (no more input); from the hub `{"type":"eof"}` (no more
//! output), `{"type":"exit","code":N}` (the command exited; `code` is null
//! when unknown) and `{"type":"error","error":{code,message,hint}}`, each
//! of the last two followed by the close. Closing the socket ends the
//! stream: a command still running is killed, a connection closed.

use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::http::{StatusCode, Uri};
use axum::response::Response;
use chrono::Utc;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use trellis_link::Message;
use trellis_link::protocol::{StreamChannel, StreamError, StreamTarget};
use trellis_link::stream::{Inbound, StreamHandle};
use trellis_model::{AuditEntry, NameKind, NewAuditEntry, validate_name};

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Json, Path, Query};
use crate::link::streams::{LimitError, OpenStreamError, StreamPermit};
use crate::state::AppState;

/// The longest command accepted, all words together.
const MAX_COMMAND_BYTES: usize = 16 * 1024;

/// The most entries `GET …/audit` returns.
pub const MAX_AUDIT_ENTRIES: usize = 1000;

type Upgrade = Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>;

// === exec ===

/// Runs a command in a component of the stage — in a container of it (the
/// engine's exec), or for a process component in its directory with its
/// env and user — over a WebSocket (see the module docs of the hub's
/// `api::streams` for its messages). Query: `command` (repeated, one word
/// each, at least one), `tty`, `replica`, `cols`, `rows`. Members of the
/// project only; recorded in the project's audit log.
#[utoipa::path(get, path = "/projects/{project}/stages/{stage}/components/{component}/exec",
    tag = "components",
    params(
        ("project" = String, Path), ("stage" = String, Path), ("component" = String, Path),
        ("command" = Vec<String>, Query, description = "the command, one word per `command` parameter", explode = true),
        ("tty" = Option<bool>, Query, description = "run it under a pseudo-terminal"),
        ("replica" = Option<u32>, Query, description = "which replica (0-based); the first running one when absent"),
        ("cols" = Option<u16>, Query, description = "the terminal's width"),
        ("rows" = Option<u16>, Query, description = "the terminal's height")),
    responses(
        (status = 101, description = "the command runs; the socket carries its input and output"),
        (status = 400, description = "no command, bad query, or not a WebSocket upgrade (`invalid-request`, `tty-unsupported`)", body = crate::error::ErrorBody),
        (status = 401, description = "no or a wrong access key", body = crate::error::ErrorBody),
        (status = 404, description = "no such project, stage or component (`not-found`, `no-such-component`)", body = crate::error::ErrorBody),
        (status = 409, description = "the stage has no release, or the component does not run (`no-release`, `component-not-running`, `replica-not-running`)", body = crate::error::ErrorBody),
        (status = 429, description = "too many streams open (`too-many-streams`)", body = crate::error::ErrorBody),
        (status = 502, description = "the outpost could not start the command (`exec-failed`, `command-not-started`)", body = crate::error::ErrorBody),
        (status = 503, description = "the outpost is offline or busy (`outpost-offline`, `outpost-busy`)", body = crate::error::ErrorBody),
        (status = 504, description = "the outpost did not answer in time (`outpost-timeout`)", body = crate::error::ErrorBody)))]
pub async fn exec(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, stage, component)): Path<(String, String, String)>,
    RawQuery(query): RawQuery,
    uri: Uri,
    upgrade: Upgrade,
) -> ApiResult<Response> {
    let query = ExecQuery::parse(query.as_deref().unwrap_or(""))?;
    let upgrade = upgrade.map_err(not_upgrade)?;
    let detail = query.command.join(" ");
    let target = StreamTarget::Exec {
        component: component.clone(),
        replica: query.replica,
        command: query.command,
        tty: query.tty,
        cols: query.cols,
        rows: query.rows,
    };
    let route = open(
        &state, &caller, &project, &stage, &component, target, "exec", &detail,
    )
    .await?;
    route.answer(&state, &caller, &uri, upgrade).await
}

/// The query of an exec: `command` repeats, which the usual query
/// extractor does not take.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ExecQuery {
    pub command: Vec<String>,
    pub tty: bool,
    pub replica: Option<u32>,
    pub cols: u16,
    pub rows: u16,
}

impl ExecQuery {
    pub fn parse(query: &str) -> ApiResult<Self> {
        let mut q = ExecQuery::default();
        let bad = |name: &str, value: &str| {
            ApiError::bad_request(
                format!("the query parameter {name}={value:?} is not valid"),
                "tty is true or false; replica, cols and rows are whole numbers",
            )
        };
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            match name.as_ref() {
                "command" => q.command.push(value.into_owned()),
                "tty" => q.tty = value.parse().map_err(|_| bad(&name, &value))?,
                "replica" => q.replica = Some(value.parse().map_err(|_| bad(&name, &value))?),
                "cols" => q.cols = value.parse().map_err(|_| bad(&name, &value))?,
                "rows" => q.rows = value.parse().map_err(|_| bad(&name, &value))?,
                other => {
                    return Err(ApiError::bad_request(
                        format!("unknown query parameter {other:?}"),
                        "an exec takes command (repeated), tty, replica, cols and rows",
                    ));
                }
            }
        }
        if q.command.is_empty() || q.command[0].is_empty() {
            return Err(ApiError::bad_request(
                "an exec needs a command",
                "give its words as command=… parameters, e.g. ?command=sh&command=-c&command=ls",
            ));
        }
        if q.command.iter().map(String::len).sum::<usize>() > MAX_COMMAND_BYTES {
            return Err(ApiError::bad_request(
                format!("the command is longer than {MAX_COMMAND_BYTES} bytes"),
                "pass long input on stdin instead",
            ));
        }
        Ok(q)
    }
}

// === port-forward ===

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ForwardQuery {
    /// The component's port (one its manifest lists).
    pub port: u16,
    /// Which replica (0-based); the first running one when absent.
    pub replica: Option<u32>,
}

/// Opens a TCP connection to a port of a component of the stage and
/// carries it over a WebSocket (channel 0 to the component, 1 from it).
/// Members of the project only; recorded in the project's audit log.
#[utoipa::path(get, path = "/projects/{project}/stages/{stage}/components/{component}/port-forward",
    tag = "components",
    params(("project" = String, Path), ("stage" = String, Path), ("component" = String, Path), ForwardQuery),
    responses(
        (status = 101, description = "connected; the socket carries the connection's bytes"),
        (status = 400, description = "a port the component does not expose, bad query, or not a WebSocket upgrade (`port-not-exposed`, `invalid-request`)", body = crate::error::ErrorBody),
        (status = 401, description = "no or a wrong access key", body = crate::error::ErrorBody),
        (status = 404, description = "no such project, stage or component (`not-found`, `no-such-component`)", body = crate::error::ErrorBody),
        (status = 409, description = "the stage has no release, or the component does not run (`no-release`, `component-not-running`)", body = crate::error::ErrorBody),
        (status = 429, description = "too many streams open (`too-many-streams`)", body = crate::error::ErrorBody),
        (status = 502, description = "the component refused the connection (`connection-refused`)", body = crate::error::ErrorBody),
        (status = 503, description = "the outpost is offline or busy (`outpost-offline`, `outpost-busy`)", body = crate::error::ErrorBody),
        (status = 504, description = "the outpost did not answer in time (`outpost-timeout`)", body = crate::error::ErrorBody)))]
pub async fn port_forward(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, stage, component)): Path<(String, String, String)>,
    Query(query): Query<ForwardQuery>,
    uri: Uri,
    upgrade: Upgrade,
) -> ApiResult<Response> {
    let upgrade = upgrade.map_err(not_upgrade)?;
    let target = StreamTarget::Forward {
        component: component.clone(),
        replica: query.replica,
        port: query.port,
    };
    let route = open(
        &state,
        &caller,
        &project,
        &stage,
        &component,
        target,
        "port-forward",
        &query.port.to_string(),
    )
    .await?;
    route.answer(&state, &caller, &uri, upgrade).await
}

fn not_upgrade(rejection: axum::extract::ws::rejection::WebSocketUpgradeRejection) -> ApiError {
    ApiError::bad_request(
        format!(
            "this endpoint takes a WebSocket upgrade: {}",
            rejection.body_text()
        ),
        "`trellis exec` and `trellis port-forward` use it",
    )
}

// === audit ===

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// At most this many entries, newest first (default and most: 1000).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

/// The project's audit log: every exec, port forward and console terminal
/// opened into its stages (who, when, which component, which command or
/// port, and whether the outpost opened it), newest first. Owners only.
#[utoipa::path(get, path = "/projects/{project}/audit", tag = "projects",
    params(("project" = String, Path), AuditQuery),
    responses(
        (status = 200, body = Vec<AuditEntry>),
        (status = 400, description = "bad query (`invalid-request`)", body = crate::error::ErrorBody),
        (status = 401, description = "no or a wrong access key", body = crate::error::ErrorBody),
        (status = 403, description = "members who are not owners (`forbidden`)", body = crate::error::ErrorBody),
        (status = 404, description = "no such project (`not-found`)", body = crate::error::ErrorBody)))]
pub async fn list_audit(
    State(state): State<AppState>,
    caller: Caller,
    Path(project): Path<String>,
    Query(query): Query<AuditQuery>,
) -> ApiResult<Json<Vec<AuditEntry>>> {
    caller
        .require_owner(&state, &project, "read the audit log")
        .await?;
    let limit = query.limit.unwrap_or(MAX_AUDIT_ENTRIES);
    if !(1..=MAX_AUDIT_ENTRIES).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid-limit",
            format!("limit {limit} is not between 1 and {MAX_AUDIT_ENTRIES}"),
            "ask for at most 1000 entries (the newest come first)",
        ));
    }
    Ok(Json(state.store().list_audit(&project, limit).await?))
}

// === opening ===

/// A stream the agent accepted, with its slot in the limits.
pub struct Opened {
    handle: StreamHandle,
    _permit: StreamPermit,
}

/// Where a stream asked of this instance runs.
pub enum Route {
    /// Opened on this instance's session.
    Here(Opened),
    /// The outpost's link is on another hub instance (they share the
    /// store): the request goes there, which checks, limits and records it
    /// again ([`crate::cluster::forward_stream`]).
    Forward(trellis_store::Instance),
}

impl Route {
    /// Upgrades the client's request: relayed to this instance's stream,
    /// or to the instance holding the link.
    pub async fn answer(
        self,
        state: &AppState,
        caller: &Caller,
        uri: &Uri,
        upgrade: WebSocketUpgrade,
    ) -> ApiResult<Response> {
        match self {
            Route::Here(opened) => Ok(upgrade.on_upgrade(move |socket| relay(socket, opened))),
            Route::Forward(instance) => {
                let path = uri.path_and_query().map_or("/", |p| p.as_str());
                crate::cluster::forward_stream::websocket(
                    state,
                    &instance,
                    &caller.user,
                    path,
                    upgrade,
                )
                .await
            }
        }
    }
}

/// Authorises, limits, opens and records a stream; see the module docs.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn open(
    state: &AppState,
    caller: &Caller,
    project: &str,
    stage: &str,
    component: &str,
    target: StreamTarget,
    action: &str,
    detail: &str,
) -> ApiResult<Route> {
    // Members and owners alike; a non-member sees a missing project.
    caller.role_in(state, project).await?;
    let user = caller.user.as_str();
    let record = state.store().get_stage(project, stage).await?;
    validate_name(NameKind::Component, component)?;
    let (_, _, manifest) =
        super::components::release_with_component(state, &record, Some(component)).await?;
    if let StreamTarget::Forward { port, .. } = &target
        && let Some(c) = manifest.component(component)
        && !c.ports.iter().any(|p| p == port)
    {
        let ports: Vec<String> = c.ports.iter().map(u16::to_string).collect();
        let entry = audit_entry(
            user,
            project,
            stage,
            component,
            &record.outpost,
            action,
            detail,
        );
        record_audit(state, entry, "port-not-exposed").await?;
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "port-not-exposed",
            format!(
                "component {component:?} does not expose port {port}{}",
                if ports.is_empty() {
                    " (its manifest lists no ports)".to_owned()
                } else {
                    format!(" (its ports: {})", ports.join(", "))
                }
            ),
            "forward one of the ports the manifest lists for the component",
        ));
    }
    let limited = state
        .links()
        .stream_limits
        .acquire(user, &record.outpost)
        .map_err(|e| match e {
            LimitError::Outpost { outpost, limit } => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too-many-streams",
                format!(
                    "outpost {outpost:?} already carries {limit} streams, the most it may at once"
                ),
                "end an exec or port-forward that is still open, or retry in a moment",
            ),
            LimitError::User { user, limit } => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too-many-streams",
                format!("{user} already has {limit} streams open, the most a user may at once"),
                "end an exec or port-forward that is still open",
            ),
        });
    let permit = match limited {
        Ok(permit) => permit,
        Err(e) => {
            let entry = audit_entry(
                user,
                project,
                stage,
                component,
                &record.outpost,
                action,
                detail,
            );
            record_audit(state, entry, e.code).await?;
            return Err(e);
        }
    };

    let result = match state
        .links()
        .open_stream(&record.outpost, project, stage, target)
    {
        Ok(pending) => pending.opened().await,
        Err(OpenStreamError::Offline) => {
            // Where hubs share the store, the link may be on another
            // instance: the request goes there (once), which records it.
            if state.cluster().is_shared()
                && !caller.forwarded
                && let crate::cluster::Holder::Other { instance, .. } = state
                    .cluster()
                    .holder(state.store(), &record.outpost)
                    .await?
            {
                drop(permit);
                return Ok(Route::Forward(instance));
            }
            Err(OpenStreamError::Offline)
        }
        Err(e) => Err(e),
    };
    let outcome = match &result {
        Ok(_) => "opened",
        Err(e) => refusal_code(e),
    };
    let entry = audit_entry(
        user,
        project,
        stage,
        component,
        &record.outpost,
        action,
        detail,
    );
    // Nothing opens unrecorded.
    record_audit(state, entry, outcome).await?;
    match result {
        Ok(handle) => {
            tracing::info!(
                user,
                project,
                stage,
                component,
                action,
                detail,
                "stream opened"
            );
            Ok(Route::Here(Opened {
                handle,
                _permit: permit,
            }))
        }
        Err(e) => Err(refusal(state, &record, e).await),
    }
}

fn audit_entry(
    user: &str,
    project: &str,
    stage: &str,
    component: &str,
    outpost: &str,
    action: &str,
    detail: &str,
) -> NewAuditEntry {
    NewAuditEntry {
        time: Utc::now(),
        user: user.to_owned(),
        project: project.to_owned(),
        stage: stage.to_owned(),
        component: component.to_owned(),
        outpost: outpost.to_owned(),
        action: action.to_owned(),
        detail: detail.to_owned(),
        result: String::new(),
    }
}

/// Writes the entry with its outcome; an entry that cannot be written
/// refuses the open.
async fn record_audit(state: &AppState, mut entry: NewAuditEntry, result: &str) -> ApiResult<()> {
    entry.result = result.to_owned();
    if let Err(e) = state.store().record_audit(&entry).await {
        tracing::error!(error = %e, "could not record a stream in the audit log");
        return Err(e.into());
    }
    Ok(())
}

fn refusal_code(e: &OpenStreamError) -> &str {
    match e {
        OpenStreamError::Offline => "outpost-offline",
        OpenStreamError::Unsupported => "streams-unsupported",
        OpenStreamError::Busy => "outpost-busy",
        OpenStreamError::Refused(error) => &error.code,
        OpenStreamError::Timeout => "outpost-timeout",
        OpenStreamError::LinkClosed => "outpost-offline",
    }
}

async fn refusal(state: &AppState, stage: &trellis_model::Stage, e: OpenStreamError) -> ApiError {
    match e {
        OpenStreamError::Offline | OpenStreamError::LinkClosed => {
            super::components::offline(state, stage).await
        }
        OpenStreamError::Unsupported => ApiError::new(
            StatusCode::CONFLICT,
            "streams-unsupported",
            format!(
                "the agent of outpost {:?} is of a version that cannot run commands or forward ports",
                stage.outpost
            ),
            "ask the administrator to upgrade the outpost's agent",
        ),
        OpenStreamError::Busy => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "outpost-busy",
            format!("the link to outpost {:?} is busy", stage.outpost),
            "retry in a moment",
        ),
        OpenStreamError::Timeout => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "outpost-timeout",
            format!(
                "outpost {:?} did not start the command or connection in time",
                stage.outpost
            ),
            "retry; `trellis status stage` shows the outpost's link",
        ),
        OpenStreamError::Refused(error) => agent_refusal(error),
    }
}

/// The agent's reason as an API error: its stable code, with the status
/// that fits it.
fn agent_refusal(error: StreamError) -> ApiError {
    let (status, code) = match error.code.as_str() {
        "no-such-component" => (StatusCode::NOT_FOUND, "no-such-component"),
        "no-release" => (StatusCode::CONFLICT, "no-release"),
        "component-not-running" => (StatusCode::CONFLICT, "component-not-running"),
        "replica-not-running" => (StatusCode::CONFLICT, "replica-not-running"),
        "port-not-exposed" => (StatusCode::BAD_REQUEST, "port-not-exposed"),
        "tty-unsupported" => (StatusCode::BAD_REQUEST, "tty-unsupported"),
        "too-many-streams" => (StatusCode::TOO_MANY_REQUESTS, "too-many-streams"),
        "connection-refused" => (StatusCode::BAD_GATEWAY, "connection-refused"),
        "connection-timeout" => (StatusCode::GATEWAY_TIMEOUT, "connection-timeout"),
        "command-not-started" => (StatusCode::BAD_GATEWAY, "command-not-started"),
        _ => (StatusCode::BAD_GATEWAY, "exec-failed"),
    };
    ApiError::new(
        status,
        code,
        format!("the outpost refused: {}", error.message),
        error.hint.unwrap_or_default(),
    )
}

// === relaying ===

/// Moves bytes between the client's socket and the stream until either
/// ends; see the module docs for the messages.
pub(crate) async fn relay(socket: WebSocket, opened: Opened) {
    let Opened { handle, _permit } = opened;
    let StreamHandle {
        mut reader,
        mut writer,
    } = handle;
    let id = writer.id();
    let (mut to_client, mut from_client) = socket.split();

    let down = async move {
        let end = loop {
            let Some(event) = reader.recv().await else {
                break json!({"type": "error", "error": {
                    "code": "outpost-offline",
                    "message": "the link to the outpost closed",
                    "hint": "retry once the outpost is online again"}});
            };
            match event {
                Inbound::Data { channel, bytes } => {
                    let n = bytes.len();
                    let mut message = Vec::with_capacity(n + 1);
                    message.push(channel.as_byte());
                    message.extend_from_slice(&bytes);
                    if to_client
                        .send(WsMessage::Binary(message.into()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    reader.consumed(n);
                }
                Inbound::Eof => {
                    if to_client
                        .send(WsMessage::Text(json!({"type": "eof"}).to_string().into()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Inbound::Closed {
                    error: Some(error), ..
                } => {
                    break json!({"type": "error", "error": {
                        "code": error.code, "message": error.message,
                        "hint": error.hint.unwrap_or_default()}});
                }
                Inbound::Closed { exit_code, .. } => {
                    break json!({"type": "exit", "code": exit_code});
                }
                Inbound::Opened | Inbound::Resize { .. } => {}
            }
        };
        let _ = to_client
            .send(WsMessage::Text(end.to_string().into()))
            .await;
        let _ = to_client.send(WsMessage::Close(None)).await;
    };

    let up = async move {
        while let Some(Ok(message)) = from_client.next().await {
            let sent = match message {
                WsMessage::Binary(bytes) if bytes.len() > 1 => {
                    writer.send_bytes(StreamChannel::In, bytes.slice(1..)).await
                }
                WsMessage::Text(text) => match serde_json::from_str::<ClientControl>(&text) {
                    Ok(ClientControl::Resize { cols, rows }) => {
                        writer
                            .send_message(Message::StreamResize { id, cols, rows })
                            .await
                    }
                    Ok(ClientControl::Eof) => writer.eof().await,
                    Err(_) => Ok(()),
                },
                WsMessage::Close(_) => break,
                _ => Ok(()),
            };
            if sent.is_err() {
                break;
            }
        }
        // The client left (or the stream is gone): dropping the writer
        // ends the stream on the outpost.
        drop(writer);
        std::future::pending::<()>().await;
    };
    tokio::select! {
        () = down => {}
        () = up => {}
    }
}

/// What a client sends as text.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
enum ClientControl {
    Resize { cols: u16, rows: u16 },
    Eof,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_queries_take_repeated_words_and_refuse_the_rest() {
        let q = ExecQuery::parse("command=sh&command=-c&command=echo%20hi%20%26%26%20id&tty=true&replica=1&cols=80&rows=24").unwrap();
        assert_eq!(q.command, ["sh", "-c", "echo hi && id"]);
        assert!(q.tty);
        assert_eq!((q.replica, q.cols, q.rows), (Some(1), 80, 24));
        for bad in [
            "",
            "tty=true",
            "command=",
            "command=ls&tty=yes",
            "command=ls&replica=-1",
            "command=ls&x=1",
        ] {
            let e = ExecQuery::parse(bad).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
        }
    }
}
