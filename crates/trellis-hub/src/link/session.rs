//! One connected agent's session: hello, then keeping every stage of the
//! outpost at its newest desired revision, recording what the agent
//! reports, answering certificate renewals, and watching liveness.
//!
//! The session talks to a [`LinkIo`], so the same code runs over a real
//! WebSocket and inside the deterministic simulation.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::Utc;
use serde_json::{Value, json};
use tokio::time::Instant;
use trellis_link::identity::PeerIdentity;
use trellis_link::protocol::{
    AgentError, BackupOp, DesiredAck, DesiredControl, StageRevision, StatusReport,
};
use trellis_link::{Envelope, Incoming, LinkIo, LinkIoError, Message};
use trellis_model::link_profile::WindowState;
use trellis_model::{Stage, StageSync};
use trellis_store::{DesiredParts, LinkActivity, LinkHello, OutpostStage, SyncUpdate};

use crate::state::AppState;

/// How long a new connection may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

type StageId = trellis_store::StageKey;

/// Runs a session until the link closes, the agent falls silent, the
/// outpost is revoked or a newer session replaces this one.
pub async fn run(mut io: Box<dyn LinkIo>, peer: PeerIdentity, state: AppState) {
    let outpost = peer.outpost.clone();
    let reason = match serve(&mut io, &peer, &state).await {
        Ok(reason) => reason,
        Err(reason) => {
            state.links().record_error(&outpost, "link-protocol-error", &reason, "the agent and hub disagree about the protocol; check that both run compatible versions");
            reason
        }
    };
    tracing::info!(%outpost, %reason, "link closed");
}

struct Session<'a> {
    outpost: &'a str,
    state: &'a AppState,
    seq: u64,
    /// The newest revision per stage the agent holds or was sent.
    known: HashMap<StageId, u64>,
    /// The stages the store placed on this outpost at the last sync: what
    /// the agent may report on without another read.
    placed: HashSet<StageId>,
    /// What this session last committed of each stage's sync record. One
    /// session writes an outpost's stages at a time, so the next report
    /// builds on this without reading it back.
    synced: HashMap<StageId, Committed>,
    /// Open log requests, by id.
    logs: super::logs::LogRouter,
    /// Open streams; made with the first one.
    streams: Option<Box<trellis_link::stream::Mux>>,
    /// The backup jobs sent this session (`None`: the agent does not make
    /// backups). The store says what is open; a job is sent once per
    /// session, so a reconnect sends the open ones again.
    backup_jobs: Option<HashSet<(u64, BackupOp, i64)>>,
    /// The outpost's agent update, if it can update itself.
    updates: super::agent_update::Updates,
}

impl Session<'_> {
    async fn send(&mut self, io: &mut Box<dyn LinkIo>, msg: Message) -> Result<(), String> {
        self.seq += 1;
        io.send(&Envelope::new(self.seq, msg))
            .await
            .map_err(|e| format!("sending to the agent failed: {e}"))
    }

    /// Sends every stage whose desired revision is newer than what the
    /// agent has, and tells the agent to forget stages that are gone: one
    /// read of the store for all of it.
    async fn sync(&mut self, io: &mut Box<dyn LinkIo>) -> Result<(), String> {
        let stages = self
            .state
            .outpost_desired(self.outpost, &self.known)
            .await?;
        self.placed = stages
            .iter()
            .map(|s| (s.stage.project.clone(), s.stage.name.clone()))
            .collect();
        self.synced.retain(|id, _| self.placed.contains(id));
        // A new ingress domain bumps the revision of every stage on the
        // outpost, so whenever one is sent the domain is read afresh.
        let mut ingress_domain = None;
        for OutpostStage { stage, desired } in stages {
            let Some(parts) = desired else { continue };
            let revision = stage.desired_revision;
            let domain = match &ingress_domain {
                Some(domain) => domain,
                None => {
                    let outpost = self
                        .state
                        .store()
                        .get_outpost(self.outpost)
                        .await
                        .map_err(|e| e.to_string())?;
                    ingress_domain.insert(outpost.ingress_domain().to_owned())
                }
            };
            let state = desired_state(&stage, parts, domain);
            let id = (stage.project, stage.name);
            self.send(
                io,
                Message::Desired {
                    project: id.0.clone(),
                    stage: id.1.clone(),
                    revision,
                    state,
                },
            )
            .await?;
            self.known.insert(id, revision);
        }
        let gone: Vec<StageId> = self
            .known
            .keys()
            .filter(|id| !self.placed.contains(*id))
            .cloned()
            .collect();
        for (project, stage) in gone {
            self.send(
                io,
                Message::Forget {
                    project: project.clone(),
                    stage: stage.clone(),
                },
            )
            .await?;
            self.known.remove(&(project, stage));
        }
        self.send_backup_jobs(io).await?;
        if let Some(update) = self.updates.due(self.state, self.outpost).await? {
            self.send(io, update).await?;
        }
        Ok(())
    }

    /// Sends the backups and restores open for stages on this outpost that
    /// this session has not sent yet. An agent that does not make backups
    /// has its pending ones say so.
    async fn send_backup_jobs(&mut self, io: &mut Box<dyn LinkIo>) -> Result<(), String> {
        let work = self
            .state
            .store()
            .outpost_backup_work(self.outpost)
            .await
            .map_err(|e| e.to_string())?;
        let Some(sent) = &mut self.backup_jobs else {
            for mut backup in work {
                let message =
                    "the outpost's agent does not make backups; upgrade it to this hub's version"
                        .to_owned();
                let mut changed = false;
                if backup.state.is_open() && backup.message != message {
                    backup.message.clone_from(&message);
                    changed = true;
                }
                if let Some(r) = backup
                    .restore
                    .as_mut()
                    .filter(|r| r.state.is_open() && r.message != message)
                {
                    r.message.clone_from(&message);
                    changed = true;
                }
                if changed {
                    let _ = self.state.store().save_backup(&backup).await;
                }
            }
            return Ok(());
        };
        // A job is known by its backup, what it does, and for a restore
        // when it was asked (a backup restored twice is two jobs).
        let keyed: Vec<_> = work
            .into_iter()
            .map(|backup| {
                let restore = backup.restore.as_ref().filter(|r| r.state.is_open());
                let key = match restore {
                    Some(r) => (
                        backup.id,
                        BackupOp::Restore,
                        r.requested_at.timestamp_millis(),
                    ),
                    None => (backup.id, BackupOp::Backup, 0),
                };
                (key, backup)
            })
            .collect();
        sent.retain(|k| keyed.iter().any(|(key, _)| key == k));
        let mut jobs = Vec::new();
        for ((id, op, at), backup) in keyed {
            if sent.insert((id, op, at)) {
                jobs.push(Message::BackupJob {
                    id: backup.id,
                    project: backup.project,
                    stage: backup.stage,
                    op,
                });
            }
        }
        for job in jobs {
            self.send(io, job).await?;
        }
        Ok(())
    }

    /// Whether a report or ack may touch the stage: only stages placed on
    /// this session's outpost. One placed after the last sync is looked up.
    async fn owns(&self, project: &str, stage: &str) -> bool {
        if self
            .placed
            .contains(&(project.to_owned(), stage.to_owned()))
        {
            return true;
        }
        match self.state.store().get_stage(project, stage).await {
            Ok(s) => s.outpost == self.outpost,
            Err(_) => false,
        }
    }

    /// Commits a sync write and remembers what was committed.
    async fn record(&mut self, id: StageId, update: SyncUpdate) -> Result<(), String> {
        match self.state.record_sync(update).await {
            Ok(sync) => {
                self.synced.insert(id, Committed::from(sync));
                Ok(())
            }
            Err(e) => {
                self.synced.remove(&id);
                Err(e)
            }
        }
    }
}

/// What a status report builds on of the stage's stored sync record: only
/// that, so an idle link keeps a few bytes per stage, not the report.
struct Committed {
    delivered_revision: u64,
    /// The `errors` of the stored report.
    errors: Vec<Value>,
}

impl From<StageSync> for Committed {
    fn from(sync: StageSync) -> Self {
        let errors = match sync.report {
            Some(Value::Object(mut report)) => match report.remove("errors") {
                Some(Value::Array(errors)) => errors,
                _ => Vec::new(),
            },
            _ => Vec::new(),
        };
        Committed {
            delivered_revision: sync.delivered_revision,
            errors,
        }
    }
}

/// The full desired state of a stage at its current desired revision:
/// everything the agent needs to run it without asking again.
/// `controls` maps each component ever started, stopped or restarted to
/// its [`DesiredControl`]; `ingress.domain` is the outpost's
/// ingress domain, which the stage's ingress hosts end in.
pub fn desired_state(stage: &Stage, parts: DesiredParts, ingress_domain: &str) -> Value {
    let controls: serde_json::Map<String, Value> = parts
        .controls
        .into_iter()
        .map(|c| {
            let wire = DesiredControl {
                stopped: c.stopped,
                killed: c.killed,
                restarts: c.restarts,
            };
            (c.component, json!(wire))
        })
        .collect();
    json!({
        "revision": stage.desired_revision,
        "suspended": stage.suspended,
        "release": parts.release,
        "build": parts.build,
        "controls": controls,
        "ingress": {"domain": ingress_domain},
    })
}

async fn serve(
    io: &mut Box<dyn LinkIo>,
    peer: &PeerIdentity,
    state: &AppState,
) -> Result<String, String> {
    let outpost = peer.outpost.as_str();
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, io.recv()).await {
        Err(_) => return Ok("the agent sent no hello within 10 s".into()),
        Ok(Ok(Some(Incoming::Frame(env)))) => env,
        Ok(Ok(_)) => return Ok("the agent closed the link before its hello".into()),
        Ok(Err(e)) => return Err(format!("the agent's first frame was not understood: {e}")),
    };
    let Message::Hello {
        agent_version,
        os,
        arch,
        runtimes,
        capacity,
        devices,
        stages,
        features,
        ..
    } = hello.msg
    else {
        return Err(format!(
            "the agent's first message was {:?}, not hello",
            hello.msg.kind()
        ));
    };

    // Remember what the agent said about its host (written in a batch, off
    // this path: the welcome does not wait for the disk).
    state.record_link_activity(LinkActivity {
        outpost: outpost.to_owned(),
        seen: Utc::now(),
        hello: Some(LinkHello {
            agent: json!({
                "version": agent_version, "os": os, "arch": arch,
                "runtimes": runtimes, "capacity": capacity, "devices": devices,
                "features": features,
            }),
            cert_serial: peer.serial_hex.clone(),
            cert_not_after: peer.not_after,
        }),
        disconnect: None,
    });

    let (handle, inbox) = state.links().connected(outpost, &agent_version);
    state.links().set_streams(
        outpost,
        handle.id(),
        features
            .iter()
            .any(|f| f == trellis_link::protocol::FEATURE_STREAMS),
    );
    // Where hubs share the store, this session now holds the outpost's
    // link: an older one on any instance ends.
    state.cluster().claim(state, outpost, &handle);
    let backups = features
        .iter()
        .any(|f| f == trellis_link::protocol::FEATURE_BACKUPS);
    let updates_itself = features
        .iter()
        .any(|f| f == trellis_link::protocol::FEATURE_AGENT_UPDATE);
    let follows_profile = features
        .iter()
        .any(|f| f == trellis_link::protocol::FEATURE_LINK_PROFILE);
    let features = Features {
        backups,
        updates_itself,
        follows_profile,
    };
    let result = session_loop(io, peer, state, &handle, inbox, &stages, features).await;
    let reason = match &result {
        Ok(r) | Err(r) => r.clone(),
    };
    state.links().disconnected(outpost, handle.id(), &reason);
    state.cluster().release(state, outpost, &handle);
    state.record_link_activity(LinkActivity {
        outpost: outpost.to_owned(),
        seen: Utc::now(),
        hello: None,
        disconnect: Some(reason.clone()),
    });
    result
}

/// What the agent announced it does beyond the protocol's core.
struct Features {
    /// Makes and restores backups.
    backups: bool,
    /// Replaces itself with another version.
    updates_itself: bool,
    /// Follows the link profile the hub sends (`link-profile`).
    follows_profile: bool,
}

/// The hub measures the round trip on the first heartbeat tick of a
/// session and then on every this-many ticks.
const RTT_EVERY_TICKS: u64 = 4;

/// What the session last told the agent of the outpost's link profile.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ProfileSent {
    heartbeat_secs: u32,
    delivery_open: bool,
    opens: Option<String>,
}

/// The outpost's link profile as it applies now, as a frame and what it
/// says; `None` when the outpost has no profile (the welcome said it all).
fn profile_frame(
    state: &AppState,
    outpost: &str,
    heartbeat: Duration,
) -> Option<(Message, ProfileSent)> {
    state.links().profiles.get(outpost)?;
    let heartbeat_secs = secs(heartbeat);
    let (delivery_open, opens_at, opens) = match state.links().profiles.window(outpost) {
        WindowState::Open => (true, None, None),
        WindowState::Closed { opens_at, opens } => (false, Some(opens_at), Some(opens)),
    };
    let sent = ProfileSent {
        heartbeat_secs,
        delivery_open,
        opens: opens.clone(),
    };
    let msg = Message::LinkProfile {
        heartbeat_secs,
        delivery_open,
        opens_at,
        opens,
    };
    Some((msg, sent))
}

fn secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX)
}

/// When the session next looks at the outpost's delivery windows: only
/// while it has some.
fn window_check(state: &AppState, outpost: &str) -> Option<Instant> {
    let applied = state.links().profiles.get(outpost)?;
    applied.schedule.as_ref()?;
    Some(Instant::now() + state.links().profiles.clock().recheck())
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[allow(clippy::too_many_arguments)] // one session's whole context, passed once
async fn session_loop(
    io: &mut Box<dyn LinkIo>,
    peer: &PeerIdentity,
    state: &AppState,
    handle: &super::SessionHandle,
    mut inbox: tokio::sync::mpsc::Receiver<super::logs::SessionRequest>,
    held: &[StageRevision],
    features: Features,
) -> Result<String, String> {
    let follows_profile = features.follows_profile;
    let outpost = peer.outpost.as_str();
    // The outpost's own heartbeat (its link profile), else the hub's: the
    // welcome tells the agent, and silence is judged by it.
    let default_heartbeat = state.links().settings().heartbeat;
    let mut heartbeat = state.links().profiles.heartbeat(outpost, default_heartbeat);
    let mut session = Session {
        outpost,
        state,
        seq: 0,
        known: held
            .iter()
            .map(|s| {
                (
                    (s.project.clone(), s.stage.clone()),
                    s.desired_revision_held,
                )
            })
            .collect(),
        placed: HashSet::new(),
        synced: HashMap::new(),
        logs: super::logs::LogRouter::default(),
        streams: None,
        backup_jobs: features.backups.then(HashSet::new),
        updates: super::agent_update::Updates::new(features.updates_itself),
    };
    session
        .send(
            io,
            Message::Welcome {
                hub_version: env!("CARGO_PKG_VERSION").into(),
                heartbeat_secs: secs(heartbeat),
                server_time: Utc::now(),
            },
        )
        .await?;
    // Before the desired states: an agent outside its delivery window
    // knows to hold the artifacts back before it hears of them.
    let mut profile_sent = None;
    if follows_profile && let Some((msg, sent)) = profile_frame(state, outpost, heartbeat) {
        session.send(io, msg).await?;
        profile_sent = Some(sent);
    }
    check_certificate(state, peer);
    Box::pin(session.sync(io)).await?;

    let started = Instant::now();
    let mut last_heard = Instant::now();
    let mut ticker = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
    let mut ticks: u64 = 0;
    let mut next_window_check = window_check(state, outpost);
    loop {
        tokio::select! {
            () = handle.cancel.cancelled() => {
                let revoked = state.store().get_outpost(outpost).await.map(|o| o.revoked_at.is_some()).unwrap_or(false);
                if revoked {
                    let _ = session.send(io, Message::Revoked { reason: "an administrator revoked this outpost".into() }).await;
                    io.close("revoked").await;
                    return Ok("the outpost was revoked".into());
                }
                io.close("replaced by a newer connection").await;
                return Ok("a newer connection of the same outpost replaced this one".into());
            }
            () = handle.poke.notified() => {
                // Boxed, here and below: an idle link's task then holds
                // only the waiting below, not room for the work.
                Box::pin(session.sync(io)).await?;
            }
            () = handle.profile.notified() => {
                let new = state.links().profiles.heartbeat(outpost, default_heartbeat);
                if new != heartbeat {
                    heartbeat = new;
                    ticker = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
                    if !follows_profile {
                        // An agent that does not follow profiles learns a
                        // heartbeat only from a welcome: have it link again.
                        let _ = session.send(io, Message::RetryAfter { secs: 1, reason: "the outpost's link profile changed".into() }).await;
                        io.close("link profile changed").await;
                        return Ok("the outpost's link profile changed; the agent links again to take its new heartbeat".into());
                    }
                }
                if follows_profile {
                    let frame = profile_frame(state, outpost, heartbeat).unwrap_or_else(|| {
                        // Back to the defaults: say so once.
                        let sent = ProfileSent { heartbeat_secs: secs(heartbeat), delivery_open: true, opens: None };
                        (Message::LinkProfile { heartbeat_secs: sent.heartbeat_secs, delivery_open: true, opens_at: None, opens: None }, sent)
                    });
                    if profile_sent.as_ref() != Some(&frame.1) {
                        session.send(io, frame.0).await?;
                        profile_sent = Some(frame.1);
                    }
                }
                next_window_check = window_check(state, outpost);
            }
            () = sleep_until_opt(next_window_check) => {
                if follows_profile
                    && let Some((msg, sent)) = profile_frame(state, outpost, heartbeat)
                    && profile_sent.as_ref() != Some(&sent)
                {
                    tracing::debug!(%outpost, open = sent.delivery_open, "the outpost's delivery window changed");
                    session.send(io, msg).await?;
                    profile_sent = Some(sent);
                }
                next_window_check = window_check(state, outpost);
            }
            Some(request) = inbox.recv() => {
                let msg = match request {
                    super::logs::SessionRequest::Stream(request) => {
                        super::streams::open(&mut session.streams, *request)
                    }
                    request => session.logs.request(request),
                };
                if let Some(msg) = msg {
                    session.send(io, msg).await?;
                }
            }
            // Stream data goes only when nothing above is ready.
            msg = super::streams::outgoing(&mut session.streams) => {
                session.send(io, msg).await?;
            }
            // Silence for two heartbeat intervals ends the link: the
            // deadline moves with every frame or pong heard.
            () = tokio::time::sleep_until(last_heard + heartbeat * 2) => {
                io.close("no heartbeat").await;
                return Ok(format!("the agent was silent for {} s (two heartbeats)", (heartbeat * 2).as_secs()));
            }
            _ = ticker.tick() => {
                // The agent pings every heartbeat, so hearing it is the
                // rule. The hub pings only to measure the round trip (the
                // first tick, then every fourth) or when the agent has been
                // quiet for a whole heartbeat: on a metered link every
                // ping and pong is a TLS record of ~35 bytes.
                let rtt_due = ticks.is_multiple_of(RTT_EVERY_TICKS);
                ticks += 1;
                if rtt_due || last_heard.elapsed() >= heartbeat {
                    let sent_at = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    io.ping(sent_at.to_be_bytes().to_vec())
                        .await
                        .map_err(|e| format!("pinging the agent failed: {e}"))?;
                }
            }
            incoming = io.recv() => {
                let incoming = match incoming {
                    Ok(Some(i)) => i,
                    Ok(None) => return Ok("the agent closed the link".into()),
                    // A connection that broke (the agent's host or process
                    // died, the network dropped it) is an outage, shown as
                    // `offline` with this reason, not a protocol error.
                    Err(LinkIoError::Transport(reason)) => {
                        return Ok(format!("the connection to the agent broke: {reason}"));
                    }
                    Err(e) => {
                        let _ = session.send(io, Message::Error { code: e.code().into(), message: e.to_string() }).await;
                        io.close("bad frame").await;
                        return Err(format!("the agent sent a frame that was not understood: {e}"));
                    }
                };
                last_heard = Instant::now();
                match incoming {
                    Incoming::Pong(payload) => {
                        // Only our own pings carry 8 bytes of send time.
                        let rtt = <[u8; 8]>::try_from(payload.as_slice()).ok().map(|b| {
                            let sent = Duration::from_nanos(u64::from_be_bytes(b));
                            started.elapsed().saturating_sub(sent)
                        });
                        state.links().seen(outpost, rtt);
                    }
                    Incoming::Ping => state.links().seen(outpost, None),
                    Incoming::Frame(env) => {
                        state.links().seen(outpost, None);
                        Box::pin(handle_frame(io, &mut session, peer, env.msg)).await?;
                    }
                }
            }
        }
    }
}

async fn handle_frame(
    io: &mut Box<dyn LinkIo>,
    session: &mut Session<'_>,
    peer: &PeerIdentity,
    msg: Message,
) -> Result<(), String> {
    let state = session.state;
    match msg {
        Message::Ack { desired } => {
            for DesiredAck {
                project,
                stage,
                revision,
            } in desired
            {
                if !session.owns(&project, &stage).await {
                    continue;
                }
                let id = (project.clone(), stage.clone());
                session
                    .record(
                        id,
                        SyncUpdate::Delivered {
                            project,
                            stage,
                            revision,
                        },
                    )
                    .await?;
            }
        }
        Message::Status { seq, reports } => {
            for report in reports {
                if !session.owns(&report.project, &report.stage).await {
                    continue;
                }
                record_report(session, report).await?;
            }
            session
                .send(io, Message::StatusAck { up_to_seq: seq })
                .await?;
        }
        Message::RenewCertificate { csr_pem } => {
            match super::endpoint::issue_for_registered_key(state, &peer.outpost, &csr_pem).await {
                Ok(issued) => {
                    session
                        .send(
                            io,
                            Message::Certificate {
                                cert_pem: issued.cert_pem,
                            },
                        )
                        .await?;
                    state.links().set_degraded(&peer.outpost, None);
                }
                Err(e) => {
                    state
                        .links()
                        .record_error(&peer.outpost, e.code, &e.message, &e.hint);
                    session
                        .send(
                            io,
                            Message::Error {
                                code: e.code.into(),
                                message: e.message,
                            },
                        )
                        .await?;
                }
            }
        }
        Message::Delivery {
            project,
            stage,
            revision,
            fetched,
            total,
            step,
        } => {
            if session.owns(&project, &stage).await {
                state.links().record_delivery(
                    &project,
                    &stage,
                    super::status::DeliveryView {
                        revision,
                        fetched,
                        total,
                        step,
                        updated_at: Utc::now(),
                    },
                );
            }
        }
        Message::LogLines {
            id,
            lines,
            end,
            error,
        } => {
            if let Some(reply) = session.logs.lines(id, lines, end, error) {
                session.send(io, reply).await?;
            }
        }
        Message::AgentUpdateState {
            id,
            version: _,
            state: reported,
            message,
        } => {
            if let Some(ack) = super::agent_update::Updates::reported(
                state,
                &peer.outpost,
                id,
                &reported,
                &message,
            )
            .await
            {
                session.send(io, ack).await?;
            }
        }
        msg @ (Message::StreamOpened { .. }
        | Message::StreamData { .. }
        | Message::StreamCredit { .. }
        | Message::StreamEof { .. }
        | Message::StreamClose { .. }) => {
            if let Some(reply) = super::streams::incoming(&mut session.streams, msg) {
                session.send(io, reply).await?;
            }
        }
        other => {
            let message = format!(
                "the agent sent {:?}, which agents do not send after hello",
                other.kind()
            );
            let _ = session
                .send(
                    io,
                    Message::Error {
                        code: "unexpected-message".into(),
                        message: message.clone(),
                    },
                )
                .await;
            return Err(message);
        }
    }
    Ok(())
}

/// Stores a status report, merging its errors into those already known so
/// errors the agent reported once are kept (bounded) for the status view.
async fn record_report(session: &mut Session<'_>, report: StatusReport) -> Result<(), String> {
    let id = (report.project.clone(), report.stage.clone());
    let previous = match session.synced.remove(&id) {
        Some(committed) => committed,
        None => session
            .state
            .store()
            .get_stage_sync(&report.project, &report.stage)
            .await
            .map_err(|e| e.to_string())?
            .into(),
    };
    let mut log = super::errors::ErrorLog::default();
    for e in previous.errors {
        if let Ok(entry) = serde_json::from_value::<super::errors::ErrorEntry>(e) {
            log.record(
                &entry.source,
                &entry.code,
                &entry.message,
                &entry.hint,
                entry.first_seen,
                entry.last_seen,
                entry.count,
            );
        }
    }
    for AgentError {
        code,
        message,
        hint,
        first_seen,
        last_seen,
        count,
    } in &report.errors
    {
        log.record(
            "agent",
            code,
            message,
            hint.as_deref().unwrap_or(""),
            *first_seen,
            *last_seen,
            u64::from(*count),
        );
    }
    // A failed report names the revision that failed: the one it reports
    // (the agent rolled it back, or kept what ran), or a newer delivered one
    // it could not get to.
    let failed = (report.state == "failed")
        .then(|| previous.delivered_revision.max(report.applied_revision));
    let stored = json!({
        "state": report.state,
        "message": report.message,
        "components": report.components,
        "errors": log.entries(),
        "applied_revision": report.applied_revision,
        "rolled_back_to": report.rolled_back_to,
    });
    session
        .record(
            id,
            SyncUpdate::Status {
                project: report.project,
                stage: report.stage,
                applied_revision: report.applied_revision,
                failed_revision: failed,
                report: stored,
            },
        )
        .await
}

/// A certificate in its last third of life marks the link degraded until
/// the agent renews it.
fn check_certificate(state: &AppState, peer: &PeerIdentity) {
    let left = peer.not_after - Utc::now();
    let total = chrono::Duration::from_std(state.links().settings().cert_validity)
        .unwrap_or(chrono::Duration::MAX);
    let why = (left < total / 3).then(|| {
        format!(
            "the agent's certificate expires on {}; it renews over the link by itself",
            peer.not_after.format("%Y-%m-%d %H:%M UTC")
        )
    });
    state.links().set_degraded(&peer.outpost, why);
}
