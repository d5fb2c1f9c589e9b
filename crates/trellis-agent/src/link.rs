//! The agent's side of the link: one session per connection, and the loop
//! that reconnects.
//!
//! The session talks to any [`LinkIo`] — a WebSocket over mutual TLS in
//! production ([`crate::ws`]), an in-memory pipe or a simulated network in
//! tests — so the logic that carries the sync invariants is the same
//! everywhere. Its duties (BRIEF §4):
//!
//! - say `hello` first: version, host, runtimes, capacity, the revisions
//!   held per stage, and where the status outbox starts;
//! - **persist every desired state before acknowledging it**, then wake the
//!   reconciler; a stale revision is not acknowledged, the current status is
//!   reported instead;
//! - send the status outbox whenever connected (everything still pending is
//!   resent on every connection) and drop what the hub acknowledges;
//! - once the link is up, attach the errors met while it was down to one
//!   report per stage;
//! - ask for a new certificate when a third of its lifetime is left; store
//!   the one the hub sends for the next connection;
//! - treat a link silent for three heartbeats as dead. The agent pings every
//!   heartbeat itself, so a live hub always has something to answer;
//! - answer log requests with the runner's lines, batched into frames
//!   ([`logs`]); cancelled by the hub or with the session.
//!
//! [`run_link`] reconnects with exponential backoff and full jitter
//! ([`Backoff`]), honours the hub's "retry after", and stops for good only
//! on shutdown or revocation. Time comes from `tokio::time` alone and
//! randomness from the RNG passed in, so tests can pause time and fix seeds.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use rand::Rng;
use rand::rngs::StdRng;
use tokio::time::Instant;
use trellis_link::identity::AgentKey;
use trellis_link::protocol::{DesiredAck, StageRevision, StatusReport};
use trellis_link::{Envelope, FrameError, Incoming, LinkIo, LinkIoError, Message};
use trellis_model::{NameKind, validate_name};

use crate::reconciler::ReconcilerHandle;
use crate::report::Reporter;
use crate::runner::StageRunner;
use crate::shutdown::Shutdown;
use crate::state::{AgentState, StageKey, StoreOutcome};
use crate::{AgentError, blocking, cert, host};

pub mod logs;
pub mod streams;

/// Log frames the session's log tasks may queue for the link.
const LOG_FRAME_QUEUE: usize = 16;

/// The longest heartbeat or "retry after" the agent accepts from the hub:
/// a hub bug must not park its outposts for days.
const MAX_HUB_DELAY_SECS: u32 = 3600;

// === connecting ===

/// Why a connection attempt failed, in the words the agent reports to the
/// hub once it gets through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ConnectError {
    /// Stable code, e.g. `hub-dns-failed`, `hub-refused`, `hub-busy`.
    pub code: String,
    pub message: String,
    pub hint: Option<String>,
    /// The hub asked to come back after this long (admission limit).
    pub retry_after: Option<Duration>,
    /// The hub refused this outpost for good: stop reconnecting.
    pub revoked: bool,
}

impl ConnectError {
    /// A transient failure: retried with backoff.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        ConnectError {
            code: code.into(),
            message: message.into(),
            hint: None,
            retry_after: None,
            revoked: false,
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

/// Opens links to the hub. The production one is [`crate::ws::HubConnector`];
/// tests and the simulation substitute their own transport.
#[async_trait]
pub trait Connector: Send + Sync {
    async fn connect(&self) -> Result<Box<dyn LinkIo>, ConnectError>;
}

// === backoff ===

/// Reconnect timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// The ceiling of the first delay.
    pub base: Duration,
    /// No delay is longer than this.
    pub cap: Duration,
    /// A connection that stayed up this long resets the backoff.
    pub reset_after: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(30),
            reset_after: Duration::from_secs(30),
        }
    }
}

/// Exponential backoff with full jitter: the n-th delay is uniform in
/// `[0, min(cap, base·2ⁿ)]`, so agents that lost the hub at the same moment
/// do not come back at the same moment.
#[derive(Debug)]
pub struct Backoff {
    config: BackoffConfig,
    attempt: u32,
    rng: StdRng,
}

impl Backoff {
    pub fn new(config: BackoffConfig, rng: StdRng) -> Self {
        Backoff {
            config,
            attempt: 0,
            rng,
        }
    }

    /// The ceiling of the next delay.
    pub fn ceiling(&self) -> Duration {
        // 2^20 · base is far past any sensible cap; stopping the exponent
        // there keeps the multiplication from overflowing.
        let factor = 1u32 << self.attempt.min(20);
        self.config
            .base
            .checked_mul(factor)
            .unwrap_or(self.config.cap)
            .min(self.config.cap)
    }

    /// The next delay, and one step further up.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        self.uniform(ceiling)
    }

    /// Back to the first step (after a connection that stayed up).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// How long to wait when the hub said "retry after `after`": that, plus
    /// up to a twentieth of it (at least up to `base`) so agents told the
    /// same number spread out. Little, because the hub already spreads the
    /// slots it hands out and keeps each agent's: a quarter made a restarted
    /// fleet return ~10 s later than its slots, its capacity idle meanwhile.
    pub fn retry_after(&mut self, after: Duration) -> Duration {
        let spread = (after / 20).max(self.config.base);
        after + self.uniform(spread)
    }

    fn uniform(&mut self, max: Duration) -> Duration {
        let max_ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(self.rng.gen_range(0..=max_ms))
    }
}

// === configuration ===

/// Timing of the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkConfig {
    pub backoff: BackoffConfig,
    /// How long to wait for `welcome` after `hello`.
    pub handshake_timeout: Duration,
    /// How long to wait for a certificate after asking for one before
    /// asking again.
    pub renew_retry: Duration,
    /// How many outbox entries to read and send per step (the rest follow
    /// at once, between incoming frames).
    pub status_batch: usize,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            backoff: BackoffConfig::default(),
            handshake_timeout: Duration::from_secs(30),
            renew_retry: Duration::from_secs(3600),
            status_batch: 64,
        }
    }
}

/// What a session works with.
#[derive(Clone)]
pub struct LinkContext {
    pub state: Arc<AgentState>,
    pub reporter: Arc<Reporter>,
    pub reconciler: ReconcilerHandle,
    pub runtime: Arc<dyn StageRunner>,
    /// Where free disk space is measured for `hello`.
    pub data_dir: PathBuf,
    /// The architecture `hello` reports (`amd64`, `arm64`, …): the one the
    /// runner picks images for.
    pub arch: String,
    /// Runs backup and restore jobs; `None`: this agent makes no backups
    /// (its runner has no volumes), and `hello` does not offer them.
    pub backups: Option<Arc<crate::backup::Backups>>,
    /// Replaces this agent with another version; `None`: this agent cannot
    /// (it is not the standalone binary), and `hello` does not offer it.
    pub updater: Option<Arc<UpdaterLink>>,
}

/// The updater and the frames it has for the hub, which sessions forward.
#[derive(Debug)]
pub struct UpdaterLink {
    pub updater: Arc<crate::update::Updater>,
    pub frames: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<Message>>,
}

impl std::fmt::Debug for LinkContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkContext")
            .field("state", &self.state)
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

// === the reconnect loop ===

/// Keeps a link to the hub until `shutdown` (then `Ok`) or revocation.
pub async fn run_link(
    connector: &dyn Connector,
    ctx: &LinkContext,
    config: LinkConfig,
    rng: StdRng,
    mut shutdown: Shutdown,
) -> Result<(), AgentError> {
    let mut backoff = Backoff::new(config.backoff, rng);
    loop {
        if shutdown.is_triggered() {
            return Ok(());
        }
        let attempt = tokio::select! {
            _ = shutdown.wait() => return Ok(()),
            attempt = connector.connect() => attempt,
        };
        let delay = match attempt {
            Err(e) if e.revoked => {
                return Err(AgentError::Revoked { reason: e.message });
            }
            Err(e) => {
                tracing::warn!(code = %e.code, error = %e.message, hint = ?e.hint, "could not connect to the hub");
                ctx.reporter
                    .record_error(&e.code, &e.message, e.hint.as_deref());
                match e.retry_after {
                    Some(after) => backoff.retry_after(after),
                    None => backoff.next_delay(),
                }
            }
            Ok(mut io) => {
                let connected = Instant::now();
                tracing::info!("connected to the hub");
                let end = run_session(io.as_mut(), ctx, &config, &mut shutdown).await;
                if connected.elapsed() >= config.backoff.reset_after {
                    backoff.reset();
                }
                match end {
                    SessionEnd::Shutdown => return Ok(()),
                    SessionEnd::Revoked(reason) => return Err(AgentError::Revoked { reason }),
                    SessionEnd::RetryAfter(after) => {
                        tracing::info!(secs = after.as_secs(), "the hub asked to reconnect later");
                        backoff.retry_after(after)
                    }
                    SessionEnd::Closed => {
                        tracing::info!("the hub closed the link");
                        backoff.next_delay()
                    }
                    SessionEnd::Lost {
                        code,
                        message,
                        hint,
                    } => {
                        tracing::warn!(%code, error = %message, "lost the link to the hub");
                        ctx.reporter.record_error(&code, &message, hint.as_deref());
                        backoff.next_delay()
                    }
                }
            }
        };
        tracing::debug!(
            delay_ms = delay.as_millis() as u64,
            "reconnecting after a delay"
        );
        tokio::select! {
            _ = shutdown.wait() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

// === one session ===

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The agent is stopping.
    Shutdown,
    /// The hub closed the link cleanly.
    Closed,
    /// The hub asked the agent to come back after this long.
    RetryAfter(Duration),
    /// The hub revoked this outpost.
    Revoked(String),
    /// The link failed; reported once the next one is up.
    Lost {
        code: String,
        message: String,
        hint: Option<String>,
    },
}

impl SessionEnd {
    fn lost(code: &str, message: impl Into<String>) -> Self {
        SessionEnd::Lost {
            code: code.to_owned(),
            message: message.into(),
            hint: None,
        }
    }

    fn from_io(e: &LinkIoError, doing: &str) -> Self {
        SessionEnd::lost(e.code(), format!("the link failed while {doing}: {e}"))
    }

    fn from_agent(e: &AgentError, doing: &str) -> Self {
        SessionEnd::lost(
            e.code(),
            format!("the agent dropped the link because it could not {doing}: {e}"),
        )
    }
}

/// Numbers outgoing frames (per connection, from 1).
struct Outgoing {
    seq: u64,
}

impl Outgoing {
    async fn send(&mut self, io: &mut dyn LinkIo, msg: Message) -> Result<(), LinkIoError> {
        self.seq += 1;
        tracing::trace!(kind = msg.kind(), seq = self.seq, "sending");
        io.send(&Envelope::new(self.seq, msg)).await
    }
}

/// What to do after a frame.
enum Next {
    Continue,
    End(SessionEnd),
}

/// Per-session bookkeeping the frame handlers update.
struct Session<'a> {
    ctx: &'a LinkContext,
    config: &'a LinkConfig,
    out: Outgoing,
    welcomed: bool,
    heartbeat: Duration,
    /// The hub changed the heartbeat: the next ping is due within it.
    heartbeat_changed: bool,
    /// Outbox entries up to here were sent on this connection.
    sent_up_to: u64,
    outbox_dirty: bool,
    /// When to ask for a new certificate, if the agent has one.
    renew_at: Option<Instant>,
    /// Log requests being answered, and where their frames go.
    log_tasks: logs::LogTasks,
    log_frames: tokio::sync::mpsc::Sender<Message>,
    /// Streams (exec, port forwarding) open on this link, and their tasks.
    streams: trellis_link::stream::Mux,
    stream_tasks: streams::StreamTasks,
}

/// Runs one session on an established link until it ends; see the module
/// docs for the duties.
pub async fn run_session(
    io: &mut dyn LinkIo,
    ctx: &LinkContext,
    config: &LinkConfig,
    shutdown: &mut Shutdown,
) -> SessionEnd {
    let (log_frames, mut log_out) = tokio::sync::mpsc::channel(LOG_FRAME_QUEUE);
    // Held for the session: only one session runs at a time.
    let mut update_frames = match &ctx.updater {
        Some(u) => Some(u.frames.lock().await),
        None => None,
    };
    let mut session = Session {
        ctx,
        config,
        out: Outgoing { seq: 0 },
        welcomed: false,
        heartbeat: config.handshake_timeout,
        heartbeat_changed: false,
        sent_up_to: 0,
        outbox_dirty: true,
        renew_at: None,
        log_tasks: logs::LogTasks::default(),
        log_frames,
        streams: trellis_link::stream::Mux::new(),
        stream_tasks: streams::StreamTasks::default(),
    };

    let hello = match hello(ctx).await {
        Ok(hello) => hello,
        Err(e) => {
            io.close("agent error").await;
            return SessionEnd::from_agent(&e, "read its state for hello");
        }
    };
    if let Err(e) = session.out.send(io, hello).await {
        return SessionEnd::from_io(&e, "sending hello");
    }

    let started = Instant::now();
    let mut last_heard = started;
    let mut next_ping = started;
    let mut ping_count: u64 = 0;
    loop {
        let deadline = if session.welcomed {
            last_heard + session.heartbeat * 3
        } else {
            started + config.handshake_timeout
        };
        let renew_at = session.renew_at.filter(|_| session.welcomed);
        let send_now = session.welcomed && session.outbox_dirty;
        // Unbiased on purpose: a flood of incoming frames must not starve the
        // outbox or the heartbeat, nor a long outbox the reading of acks.
        tokio::select! {
            _ = shutdown.wait() => {
                io.close("agent shutting down").await;
                return SessionEnd::Shutdown;
            }
            received = tokio::time::timeout_at(deadline, io.recv()) => {
                match received {
                    Err(_) => {
                        io.close("link silent").await;
                        return if session.welcomed {
                            SessionEnd::lost("link-silent", format!(
                                "the hub sent nothing for {} s (three heartbeats); the link was dropped",
                                (session.heartbeat * 3).as_secs()))
                        } else {
                            SessionEnd::lost("hub-handshake-timeout", format!(
                                "the hub did not answer hello within {} s",
                                config.handshake_timeout.as_secs()))
                        };
                    }
                    Ok(Ok(None)) => {
                        return if session.welcomed {
                            SessionEnd::Closed
                        } else {
                            SessionEnd::lost("hub-closed-before-welcome",
                                "the hub closed the link before answering hello")
                        };
                    }
                    Ok(Err(e)) => {
                        if let LinkIoError::Frame(frame) = &e {
                            // Tell the hub what was wrong before dropping it.
                            let _ = session.out.send(io, Message::Error {
                                code: frame.code().into(),
                                message: frame.to_string(),
                            }).await;
                            io.close("invalid frame").await;
                        }
                        return SessionEnd::from_io(&e, "receiving");
                    }
                    Ok(Ok(Some(Incoming::Pong(_) | Incoming::Ping))) => last_heard = Instant::now(),
                    Ok(Ok(Some(Incoming::Frame(envelope)))) => {
                        last_heard = Instant::now();
                        let was_welcomed = session.welcomed;
                        match session.handle(io, envelope.msg).await {
                            Next::Continue => {}
                            Next::End(end) => return end,
                        }
                        if std::mem::take(&mut session.heartbeat_changed) {
                            next_ping = next_ping.min(Instant::now() + session.heartbeat);
                        }
                        if session.welcomed && !was_welcomed {
                            next_ping = Instant::now() + session.heartbeat;
                            if let Err(e) = ctx.reporter.flush_errors().await {
                                tracing::warn!(error = %e, "could not queue the errors met while disconnected; they are kept for the next connection");
                            }
                        }
                    }
                }
            }
            _ = tokio::time::sleep_until(next_ping), if session.welcomed => {
                ping_count += 1;
                if let Err(e) = io.ping(ping_count.to_be_bytes().to_vec()).await {
                    return SessionEnd::from_io(&e, "sending a heartbeat");
                }
                next_ping = Instant::now() + session.heartbeat;
            }
            _ = sleep_until_opt(renew_at) => {
                session.renew_at = Some(Instant::now() + config.renew_retry);
                if let Some(end) = session.request_renewal(io).await {
                    return end;
                }
            }
            _ = ctx.reporter.outbox_changed(), if session.welcomed => {
                session.outbox_dirty = true;
            }
            _ = ctx.reporter.deliveries().changed(), if session.welcomed => {
                for frame in ctx.reporter.deliveries().take_changes() {
                    if let Next::End(end) = session.send_or_end(io, frame).await {
                        return end;
                    }
                }
            }
            Some(frame) = next_update_frame(&mut update_frames), if session.welcomed => {
                if let Next::End(end) = session.send_or_end(io, frame).await {
                    return end;
                }
            }
            Some(frame) = log_out.recv() => {
                if let Message::LogLines { id, end: true, .. } = &frame {
                    session.log_tasks.finished(*id);
                }
                if let Next::End(end) = session.send_or_end(io, frame).await {
                    return end;
                }
            }
            _ = std::future::ready(()), if send_now => {
                if let Some(end) = session.send_outbox(io).await {
                    return end;
                }
            }
            // Stream data goes only when nothing above is ready.
            frame = session.streams.next_outgoing() => {
                if let Next::End(end) = session.send_or_end(io, frame).await {
                    return end;
                }
            }
        }
    }
}

async fn next_update_frame(
    frames: &mut Option<tokio::sync::MutexGuard<'_, tokio::sync::mpsc::UnboundedReceiver<Message>>>,
) -> Option<Message> {
    match frames {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Session<'_> {
    async fn handle(&mut self, io: &mut dyn LinkIo, msg: Message) -> Next {
        tracing::trace!(kind = msg.kind(), "received");
        match msg {
            Message::Welcome {
                hub_version,
                heartbeat_secs,
                server_time,
            } => {
                // Clamped: a zero would make every instant a deadline, and
                // a huge value would keep a dead link "up" for years.
                self.heartbeat =
                    Duration::from_secs(u64::from(heartbeat_secs.clamp(1, MAX_HUB_DELAY_SECS)));
                // A hub with a profile for this outpost says so right after
                // the welcome; without one, deliveries may move.
                self.ctx
                    .reporter
                    .deliveries()
                    .set_window(crate::delivery::Window::default());
                if !self.welcomed {
                    self.welcomed = true;
                    let skew = (Utc::now() - server_time).num_seconds();
                    tracing::info!(%hub_version, heartbeat_secs, clock_skew_secs = skew, "link is up");
                    self.renew_at = self.renewal_time().await;
                    // Deliveries in progress, for this session's hub.
                    self.ctx.reporter.deliveries().resend_all();
                    if let Some(u) = &self.ctx.updater {
                        // An outcome the hub has not stored yet, then (a
                        // new agent's first link) the confirmation.
                        if let Some(outcome) = u.updater.unacknowledged()
                            && let Next::End(end) =
                                self.send_or_end(io, outcome.to_message()).await
                        {
                            return Next::End(end);
                        }
                        u.updater.linked();
                    }
                }
                Next::Continue
            }
            Message::LinkProfile {
                heartbeat_secs,
                delivery_open,
                opens,
                ..
            } => {
                let heartbeat =
                    Duration::from_secs(u64::from(heartbeat_secs.clamp(1, MAX_HUB_DELAY_SECS)));
                if heartbeat != self.heartbeat {
                    tracing::info!(heartbeat_secs, "the hub changed the link's heartbeat");
                    self.heartbeat = heartbeat;
                    self.heartbeat_changed = true;
                }
                if !delivery_open {
                    tracing::info!(
                        opens = opens.as_deref().unwrap_or("unknown"),
                        "outside the outpost's delivery window: artifacts wait until it opens"
                    );
                }
                self.ctx
                    .reporter
                    .deliveries()
                    .set_window(crate::delivery::Window {
                        open: delivery_open,
                        opens,
                    });
                Next::Continue
            }
            Message::Desired {
                project,
                stage,
                revision,
                state,
            } => {
                self.desired(io, StageKey::new(project, stage), revision, state)
                    .await
            }
            Message::Forget { project, stage } => {
                let key = StageKey::new(project, stage);
                let stage = key.clone();
                match blocking(&self.ctx.state, move |s| s.forget_stage(&stage)).await {
                    Ok(held) => {
                        tracing::info!(stage = %key, held, "the hub deleted a stage; forgetting it");
                        self.ctx.reconciler.forget(key);
                        Next::Continue
                    }
                    Err(e) => Next::End(SessionEnd::from_agent(&e, "forget a deleted stage")),
                }
            }
            Message::StatusAck { up_to_seq } => {
                match blocking(&self.ctx.state, move |s| s.ack_status(up_to_seq)).await {
                    Ok(removed) => {
                        tracing::debug!(up_to_seq, removed, "status acknowledged");
                        Next::Continue
                    }
                    Err(e) => Next::End(SessionEnd::from_agent(&e, "drop acknowledged reports")),
                }
            }
            Message::Certificate { cert_pem } => {
                self.store_certificate(io, cert_pem).await;
                Next::Continue
            }
            Message::RetryAfter { secs, reason } => {
                io.close("retry after").await;
                tracing::info!(secs, %reason, "the hub asked the agent to reconnect later");
                Next::End(SessionEnd::RetryAfter(Duration::from_secs(u64::from(
                    secs.min(MAX_HUB_DELAY_SECS),
                ))))
            }
            Message::Revoked { reason } => {
                io.close("revoked").await;
                tracing::error!(%reason, "this outpost was revoked by the hub");
                Next::End(SessionEnd::Revoked(reason))
            }
            Message::Error { code, message } => {
                tracing::warn!(%code, %message, "the hub reported an error");
                Next::Continue
            }
            Message::Logs {
                id,
                project,
                stage,
                query,
            } => {
                self.start_logs(io, id, StageKey::new(project, stage), query)
                    .await
            }
            Message::LogsCancel { id } => {
                if self.log_tasks.cancel(id) {
                    tracing::debug!(id, "the hub cancelled a log request");
                }
                Next::Continue
            }
            Message::StreamOpen {
                id,
                project,
                stage,
                target,
                window,
            } => {
                let key = StageKey::new(project, stage);
                match self.stream_tasks.check(id, &key, &target) {
                    Err(error) => {
                        tracing::info!(stage = %key, id, code = %error.code, "refusing a stream");
                        self.send_or_end(
                            io,
                            Message::StreamClose {
                                id,
                                exit_code: None,
                                error: Some(error),
                            },
                        )
                        .await
                    }
                    Ok(()) => {
                        let handle = self.streams.register(
                            id,
                            trellis_link::stream::WINDOW_BYTES,
                            window,
                        );
                        self.stream_tasks
                            .start(id, self.ctx.runtime.clone(), key, target, handle);
                        Next::Continue
                    }
                }
            }
            Message::BackupJob {
                id,
                project,
                stage,
                op,
            } => {
                match &self.ctx.backups {
                    Some(backups) => {
                        tracing::info!(id, %project, %stage, ?op, "the hub asked for a backup job");
                        backups.start(self.ctx.runtime.clone(), id, project, stage, op);
                    }
                    None => {
                        tracing::warn!(id, "the hub asked for a backup job; this agent makes none");
                    }
                }
                Next::Continue
            }
            Message::AgentUpdate {
                id,
                version,
                arch,
                artifact,
                digest,
                size,
                deadline_secs,
            } => match &self.ctx.updater {
                Some(u) => {
                    tracing::info!(id, %version, "the hub asked for an agent update");
                    u.updater.start(crate::update::UpdateJob {
                        id,
                        version,
                        arch,
                        artifact,
                        digest,
                        size,
                        deadline: Duration::from_secs(u64::from(deadline_secs.max(1))),
                    });
                    Next::Continue
                }
                None => {
                    self.send_or_end(
                        io,
                        Message::AgentUpdateState {
                            id,
                            version,
                            state: "failed".into(),
                            message: "this agent cannot update itself (it runs inside the `trellis` binary, not as `trellis-agent`)".into(),
                        },
                    )
                    .await
                }
            },
            Message::AgentUpdateAck { id } => {
                if let Some(u) = &self.ctx.updater {
                    u.updater.acknowledged(id);
                }
                Next::Continue
            }
            msg @ (Message::StreamData { .. }
            | Message::StreamCredit { .. }
            | Message::StreamEof { .. }
            | Message::StreamResize { .. }
            | Message::StreamClose { .. }) => match self.streams.incoming(msg) {
                Some(reply) => self.send_or_end(io, reply).await,
                None => Next::Continue,
            },
            other @ (Message::Hello { .. }
            | Message::Ack { .. }
            | Message::Status { .. }
            | Message::RenewCertificate { .. }
            | Message::LogLines { .. }
            | Message::StreamOpened { .. }
            | Message::AgentUpdateState { .. }
            | Message::Delivery { .. }) => {
                let kind = other.kind();
                tracing::warn!(kind, "the hub sent a message only agents send; ignoring it");
                self.send_or_end(
                    io,
                    Message::Error {
                        code: "unexpected-message".into(),
                        message: format!("an agent does not accept {kind:?} messages"),
                    },
                )
                .await
            }
        }
    }

    /// Persist, then acknowledge, then wake the reconciler — in that order,
    /// so an acknowledged revision survives any crash.
    async fn desired(
        &mut self,
        io: &mut dyn LinkIo,
        key: StageKey,
        revision: u64,
        state: serde_json::Value,
    ) -> Next {
        let invalid = validate_name(NameKind::Project, &key.project)
            .and_then(|()| validate_name(NameKind::Stage, &key.stage))
            .err()
            .map(|e| ("invalid-stage-name", e.to_string()))
            .or_else(|| {
                (revision == 0).then(|| {
                    (
                        "desired-revision-zero",
                        format!("stage {key}: revision 0 is not a revision"),
                    )
                })
            });
        if let Some((code, message)) = invalid {
            tracing::warn!(stage = %key, code, %message, "refusing a desired state from the hub");
            return self
                .send_or_end(
                    io,
                    Message::Error {
                        code: code.into(),
                        message,
                    },
                )
                .await;
        }

        let stage = key.clone();
        let outcome = match blocking(&self.ctx.state, move |s| {
            s.store_desired(&stage, revision, &state)
        })
        .await
        {
            Ok(outcome) => outcome,
            // Not acknowledged, so the hub sends it again on the next
            // connection.
            Err(e) => return Next::End(SessionEnd::from_agent(&e, "persist a desired state")),
        };
        match outcome {
            StoreOutcome::Stored | StoreOutcome::AlreadyHeld => {
                tracing::info!(stage = %key, revision, ?outcome, "desired state persisted");
                let ack = Message::Ack {
                    desired: vec![DesiredAck {
                        project: key.project.clone(),
                        stage: key.stage.clone(),
                        revision,
                    }],
                };
                let next = self.send_or_end(io, ack).await;
                self.ctx.reconciler.desired_changed();
                next
            }
            StoreOutcome::Stale { held } => {
                tracing::info!(stage = %key, revision, held, "ignoring a stale desired state");
                if let Err(e) = self.ctx.reporter.report_current(&key).await {
                    tracing::warn!(stage = %key, error = %e, "could not queue the stage's current status");
                }
                Next::Continue
            }
        }
    }

    /// Starts answering log request `id`, or answers it with an error at
    /// once (invalid names, too many requests).
    async fn start_logs(
        &mut self,
        io: &mut dyn LinkIo,
        id: u64,
        key: StageKey,
        query: trellis_link::protocol::LogQuery,
    ) -> Next {
        let started = validate_name(NameKind::Project, &key.project)
            .and_then(|()| validate_name(NameKind::Stage, &key.stage))
            .and_then(|()| match &query.component {
                Some(c) => validate_name(NameKind::Component, c),
                None => Ok(()),
            })
            .map_err(|e| format!("the hub asked for logs with an invalid name: {e}"))
            .and_then(|()| {
                self.log_tasks.start(
                    id,
                    self.ctx.runtime.clone(),
                    key.clone(),
                    query,
                    self.log_frames.clone(),
                )
            });
        match started {
            Ok(()) => {
                tracing::debug!(stage = %key, id, "answering a log request");
                Next::Continue
            }
            Err(error) => {
                tracing::info!(stage = %key, id, %error, "refusing a log request");
                self.send_or_end(
                    io,
                    Message::LogLines {
                        id,
                        lines: Vec::new(),
                        end: true,
                        error: Some(error),
                    },
                )
                .await
            }
        }
    }

    async fn send_or_end(&mut self, io: &mut dyn LinkIo, msg: Message) -> Next {
        let kind = msg.kind();
        match self.out.send(io, msg).await {
            Ok(()) => Next::Continue,
            Err(e) => Next::End(SessionEnd::from_io(&e, &format!("sending {kind}"))),
        }
    }

    /// Sends the next batch of the outbox; `Some` ends the session.
    async fn send_outbox(&mut self, io: &mut dyn LinkIo) -> Option<SessionEnd> {
        let after = self.sent_up_to;
        let limit = self.config.status_batch.max(1);
        let pending = match blocking(&self.ctx.state, move |s| s.pending_status(after, limit)).await
        {
            Ok(pending) => pending,
            Err(e) => return Some(SessionEnd::from_agent(&e, "read the status outbox")),
        };
        self.outbox_dirty = pending.len() >= limit;
        for (seq, value) in pending {
            self.sent_up_to = seq;
            let report: StatusReport = match serde_json::from_value(value) {
                Ok(report) => report,
                Err(e) => {
                    // Written by this agent, so only a format change between
                    // versions gets here; the hub's next acknowledgement
                    // (a prefix) drops it.
                    tracing::warn!(seq, error = %e, "skipping an unreadable status report");
                    continue;
                }
            };
            match self
                .out
                .send(
                    io,
                    Message::Status {
                        seq,
                        reports: vec![report],
                    },
                )
                .await
            {
                Ok(()) => {}
                Err(LinkIoError::Frame(e @ FrameError::TooLarge { .. })) => {
                    tracing::warn!(seq, error = %e, "skipping a status report too large to send");
                    self.ctx
                        .reporter
                        .record_error(e.code(), &e.to_string(), None);
                }
                Err(e) => return Some(SessionEnd::from_io(&e, "sending status")),
            }
        }
        None
    }

    /// When to renew the current certificate, as a `tokio` instant.
    async fn renewal_time(&self) -> Option<Instant> {
        let identity = blocking(&self.ctx.state, |s| s.identity()).await.ok()??;
        let (not_before, not_after) = match cert::validity(&identity.cert_pem) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read this agent's certificate; not scheduling its renewal");
                return None;
            }
        };
        let due = cert::renew_at(not_before, not_after);
        let wait = (due - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        Some(Instant::now() + wait)
    }

    /// Sends `renew-certificate` with a CSR of the agent's existing key;
    /// `Some` ends the session.
    async fn request_renewal(&mut self, io: &mut dyn LinkIo) -> Option<SessionEnd> {
        let identity = match blocking(&self.ctx.state, |s| s.identity()).await {
            Ok(Some(identity)) => identity,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the identity to renew the certificate");
                return None;
            }
        };
        let csr =
            AgentKey::from_pem(&identity.key_pem).and_then(|key| key.csr_pem(&identity.outpost));
        match csr {
            Ok(csr_pem) => {
                tracing::info!("asking the hub for a new certificate");
                match self
                    .out
                    .send(io, Message::RenewCertificate { csr_pem })
                    .await
                {
                    Ok(()) => None,
                    Err(e) => Some(SessionEnd::from_io(&e, "asking for a new certificate")),
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot make a certificate request with the stored key");
                None
            }
        }
    }

    /// Stores a renewed certificate after checking it is this agent's; it
    /// is used from the next connection on.
    async fn store_certificate(&mut self, io: &mut dyn LinkIo, cert_pem: String) {
        let result = async {
            let Some(identity) = blocking(&self.ctx.state, |s| s.identity())
                .await
                .map_err(|e| e.to_string())?
            else {
                return Err("this agent has no identity to renew".to_owned());
            };
            cert::check_own(&identity, &cert_pem)?;
            let renewed = crate::state::Identity {
                cert_pem,
                ..identity
            };
            blocking(&self.ctx.state, move |s| s.set_identity(&renewed))
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        match result {
            Ok(()) => {
                tracing::info!(
                    "stored the renewed certificate; it is used from the next connection"
                );
                self.renew_at = self.renewal_time().await;
            }
            Err(reason) => {
                tracing::warn!(%reason, "refusing the certificate the hub sent");
                let _ = self
                    .out
                    .send(
                        io,
                        Message::Error {
                            code: "certificate-refused".into(),
                            message: format!("the agent refused the renewed certificate: {reason}"),
                        },
                    )
                    .await;
            }
        }
    }
}

/// The `hello` frame from the current state.
async fn hello(ctx: &LinkContext) -> Result<Message, AgentError> {
    let (stages, outbox) = blocking(&ctx.state, |s| Ok((s.stages()?, s.outbox_stats()?))).await?;
    let data_dir = ctx.data_dir.clone();
    let capacity = tokio::task::spawn_blocking(move || host::capacity(&data_dir))
        .await
        .map_err(|e| AgentError::Internal {
            what: format!("probe the host's capacity ({e})"),
        })?;
    Ok(Message::Hello {
        agent_version: crate::update::version().into(),
        os: std::env::consts::OS.into(),
        arch: ctx.arch.clone(),
        runtimes: ctx.runtime.describe(),
        capacity,
        devices: ctx.runtime.devices(),
        stages: stages
            .into_iter()
            .map(|r| StageRevision {
                project: r.key.project,
                stage: r.key.stage,
                applied_revision: r.applied_revision.unwrap_or(0),
                desired_revision_held: r.desired_revision,
            })
            .collect(),
        outbox_from: outbox
            .oldest_seq
            .unwrap_or_else(|| outbox.last_seq.saturating_add(1)),
        features: [
            trellis_link::protocol::FEATURE_STREAMS,
            trellis_link::protocol::FEATURE_LINK_PROFILE,
        ]
        .into_iter()
        .chain(
            ctx.backups
                .as_ref()
                .map(|_| trellis_link::protocol::FEATURE_BACKUPS),
        )
        .chain(
            ctx.updater
                .as_ref()
                .map(|_| trellis_link::protocol::FEATURE_AGENT_UPDATE),
        )
        .map(str::to_owned)
        .collect(),
    })
}
