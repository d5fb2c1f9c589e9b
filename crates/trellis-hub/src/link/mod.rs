//! The hub's half of the outpost link: which outposts are connected, their
//! live link state, admission of new links, and the sessions that keep each
//! connected agent in sync.
//!
//! Sync is level-triggered. A change to a stage (a release push, suspend,
//! resume, deletion) only *pokes* the session of the stage's outpost; the
//! session then reads the current desired revisions from the store and sends
//! whatever is newer than what the agent holds. A poke can never carry stale
//! data and a lost poke is repaired by the next one or the next reconnect.
//!
//! # Layout
//! - `mod.rs`: [`Links`], the registry and admission.
//! - `session.rs`: one connected agent's session.
//! - `endpoint.rs`: the WebSocket endpoint and the join/renew endpoints.
//! - `backups.rs`: the agent's backup endpoints (chunks and manifests of
//!   backups, over mutual TLS); the session sends the jobs (`backup-job`).
//! - `logs.rs`: log requests into a live session and their lines back out.
//! - `profile.rs`: outposts' link profiles as applied (heartbeat, delivery
//!   pace and windows) and the clock windows are judged by.
//! - `status.rs`: the connection-status view of a stage.
//! - `errors.rs`: the bounded, de-duplicated error log.
//! - `record.rs`: what sessions saw, written to the store in batches.

pub mod agent_update;
pub mod artifacts;
pub mod backups;
pub mod batch;
pub mod commit;
pub mod endpoint;
pub mod errors;
pub mod ingress_cert;
pub mod logs;
pub mod profile;
pub mod reads;
pub mod record;
pub mod session;
pub mod status;
pub mod streams;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use trellis_link::protocol::LogQuery;
use utoipa::ToSchema;

use errors::ErrorLog;

/// The state of an outpost's link, as the status popup shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum LinkState {
    /// No agent has ever connected.
    AwaitingAgent,
    Online,
    /// Connected, but something needs attention (e.g. certificate near expiry).
    Degraded,
    Offline,
    Revoked,
}

impl LinkState {
    /// The agent is connected (possibly needing attention).
    pub fn is_connected(self) -> bool {
        matches!(self, LinkState::Online | LinkState::Degraded)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::AwaitingAgent => "awaiting-agent",
            LinkState::Online => "online",
            LinkState::Degraded => "degraded",
            LinkState::Offline => "offline",
            LinkState::Revoked => "revoked",
        }
    }
}

/// Settings of the link layer.
#[derive(Debug, Clone)]
pub struct LinkSettings {
    /// How often the hub pings each agent. Silence for two intervals marks
    /// the outpost offline. The default (25 s) stays under common NAT idle
    /// timeouts (30 s and up).
    pub heartbeat: Duration,
    /// New links admitted per second; the rest are told when to retry.
    pub admissions_per_sec: u32,
    /// TLS handshakes in flight at most.
    pub max_handshakes: usize,
    /// Validity of the client certificates the hub issues.
    pub cert_validity: Duration,
    /// Streams (exec, port forwarding) open at once per outpost and user.
    pub streams: streams::StreamLimitSettings,
    /// On a store several hubs share: how often every session re-reads its
    /// desired state even without a change announced (a safety net for a
    /// lost notification).
    pub resync: Duration,
}

impl Default for LinkSettings {
    fn default() -> Self {
        LinkSettings {
            heartbeat: Duration::from_secs(25),
            // Measured: a 2-core hub brought 15,000 agents back faster at
            // 400 a second than at 200 (BENCHMARKS.md, storm).
            admissions_per_sec: 400,
            max_handshakes: 64,
            cert_validity: Duration::from_secs(30 * 24 * 3600),
            streams: streams::StreamLimitSettings::default(),
            resync: Duration::from_secs(300),
        }
    }
}

/// What the hub knows live about one outpost's link.
#[derive(Debug)]
struct Live {
    state: LinkState,
    since: DateTime<Utc>,
    last_seen: Option<DateTime<Utc>>,
    rtt: Option<Duration>,
    agent_version: Option<String>,
    last_disconnect: Option<String>,
    session: Option<SessionHandle>,
    errors: ErrorLog,
    /// Why the link is degraded, if it is.
    degraded: Option<String>,
    /// The connected agent serves streams.
    streams: bool,
    /// The highest epoch another hub instance claimed this outpost's link
    /// at (see [`Links::fence`]): a session of ours whose own claim comes
    /// back lower has been replaced.
    foreign_epoch: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct SessionHandle {
    id: u64,
    poke: Arc<Notify>,
    /// The outpost's link profile changed.
    profile: Arc<Notify>,
    cancel: CancellationToken,
    /// Requests for the session's loop (log streams).
    requests: mpsc::Sender<logs::SessionRequest>,
    /// Log streams the session may still take.
    log_slots: Arc<Semaphore>,
    /// The epoch this session's claim of the link got from the store (0
    /// until it is known; only on a store several hubs share).
    pub(crate) epoch: Arc<std::sync::atomic::AtomicU64>,
}

impl SessionHandle {
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// The session has ended (its loop no longer takes requests) or was
    /// told to.
    pub(crate) fn is_closed(&self) -> bool {
        self.requests.is_closed() || self.cancel.is_cancelled()
    }
}

/// A snapshot of one outpost's link, for status views.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LinkView {
    pub state: LinkState,
    pub since: DateTime<Utc>,
    pub last_seen: Option<DateTime<Utc>>,
    pub rtt_ms: Option<u64>,
    pub agent_version: Option<String>,
    pub last_disconnect: Option<String>,
    /// Why the link is degraded, when it is.
    pub attention: Option<String>,
    /// The hub instance holding the link, when several share the store
    /// (its id and the address the instances reach it at).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_address: Option<String>,
    /// When the agent's current client certificate expires (it renews
    /// itself over the link well before).
    pub certificate_expires: Option<DateTime<Utc>>,
    pub errors: Vec<errors::ErrorEntry>,
}

/// The registry of links. One per hub.
pub struct Links {
    settings: LinkSettings,
    live: Mutex<HashMap<String, Live>>,
    admission: Mutex<Admission>,
    next_session: std::sync::atomic::AtomicU64,
    next_request: std::sync::atomic::AtomicU64,
    pub handshakes: Arc<crate::tls::HandshakeGauge>,
    /// The newest delivery progress each stage's agent sent.
    deliveries: Mutex<HashMap<(String, String), status::DeliveryView>>,
    /// Link bookkeeping on its way to the store.
    pub recorder: Arc<record::LinkRecorder>,
    /// Agents' acknowledgements and status reports on their way to the
    /// store, committed in groups.
    pub syncs: Arc<commit::SyncCommitter>,
    /// Sessions' reads of their outposts' desired state, read together.
    pub desired_reads: Arc<reads::DesiredReads>,
    /// Streams open per outpost and per user.
    pub stream_limits: Arc<streams::StreamLimits>,
    /// The store announces changes to every hub (it is shared): pokes come
    /// from its feed, not from the handler that made the change.
    feed_pokes: std::sync::atomic::AtomicBool,
    /// Sessions ended because another connection of their outpost (on any
    /// hub instance) replaced them.
    pub fenced: std::sync::atomic::AtomicU64,
    /// Outposts' link profiles as applied.
    pub profiles: profile::Profiles,
}

impl Links {
    pub fn new(settings: LinkSettings) -> Self {
        let rate = settings.admissions_per_sec.max(1);
        Links {
            admission: Mutex::new(Admission::new(rate)),
            stream_limits: Arc::new(streams::StreamLimits::new(settings.streams)),
            settings,
            live: Mutex::new(HashMap::new()),
            next_session: std::sync::atomic::AtomicU64::new(1),
            next_request: std::sync::atomic::AtomicU64::new(1),
            handshakes: Arc::default(),
            recorder: Arc::default(),
            syncs: Arc::default(),
            desired_reads: Arc::default(),
            deliveries: Mutex::new(HashMap::new()),
            feed_pokes: std::sync::atomic::AtomicBool::new(false),
            fenced: std::sync::atomic::AtomicU64::new(0),
            profiles: profile::Profiles::new(profile::clock_from_env()),
        }
    }

    /// The outpost's link profile is now `profile` (set on this hub): its
    /// session here applies it.
    pub fn profile_changed(
        &self,
        outpost: &str,
        profile: trellis_model::link_profile::LinkProfile,
    ) {
        self.profiles.set(outpost, profile);
        self.notify_profile(outpost);
    }

    /// Tells this hub's session of the outpost, if it has one, that its
    /// profile changed.
    pub fn notify_profile(&self, outpost: &str) {
        if let Some(session) = self.lock().get(outpost).and_then(|e| e.session.as_ref()) {
            session.profile.notify_one();
        }
    }

    /// From now on, changes poke sessions through the store's feed
    /// ([`Links::poke_local`]) and [`Links::poke`] does nothing: on a shared
    /// store the hub that made a change and the one holding the link are
    /// told the same way.
    pub fn use_feed_pokes(&self) {
        self.feed_pokes
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Keeps the delivery progress an agent sent for a stage.
    pub fn record_delivery(&self, project: &str, stage: &str, view: status::DeliveryView) {
        let mut deliveries = self.deliveries.lock().unwrap_or_else(|p| p.into_inner());
        deliveries.insert((project.to_owned(), stage.to_owned()), view);
    }

    /// The newest delivery progress of a stage, if any was sent.
    pub fn delivery(&self, project: &str, stage: &str) -> Option<status::DeliveryView> {
        let deliveries = self.deliveries.lock().unwrap_or_else(|p| p.into_inner());
        deliveries
            .get(&(project.to_owned(), stage.to_owned()))
            .cloned()
    }

    pub fn settings(&self) -> &LinkSettings {
        &self.settings
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        // A poisoned lock means a panic mid-update of plain status fields;
        // the map is still usable and the next update repairs the entry.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a new link of `outpost` now, or says how long until the slot
    /// reserved for it.
    pub fn admit(&self, outpost: &str) -> Result<(), Duration> {
        self.admission
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(outpost, Instant::now())
    }

    /// Registers a connected session, replacing (and closing) an older one
    /// of the same outpost. The receiver is the session's queue of requests.
    pub(crate) fn connected(
        &self,
        outpost: &str,
        agent_version: &str,
    ) -> (SessionHandle, mpsc::Receiver<logs::SessionRequest>) {
        let (requests, inbox) = mpsc::channel(logs::SESSION_QUEUE);
        let handle = SessionHandle {
            id: self
                .next_session
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            poke: Arc::new(Notify::new()),
            profile: Arc::new(Notify::new()),
            cancel: CancellationToken::new(),
            requests,
            log_slots: Arc::new(Semaphore::new(logs::MAX_STREAMS_PER_SESSION)),
            epoch: Arc::default(),
        };
        let now = Utc::now();
        let mut live = self.lock();
        let entry = live
            .entry(outpost.to_owned())
            .or_insert_with(|| Live::new(LinkState::Online, now));
        if let Some(old) = entry.session.replace(handle.clone()) {
            old.cancel.cancel();
            self.fenced
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        entry.state = LinkState::Online;
        entry.since = now;
        entry.last_seen = Some(now);
        entry.agent_version = Some(agent_version.to_owned());
        entry.degraded = None;
        entry.streams = false;
        (handle, inbox)
    }

    /// The session ended; the outpost is offline unless a newer session has
    /// taken over already.
    pub(crate) fn disconnected(&self, outpost: &str, session: u64, reason: &str) {
        let now = Utc::now();
        let mut live = self.lock();
        let Some(entry) = live.get_mut(outpost) else {
            return;
        };
        if entry.session.as_ref().is_some_and(|s| s.id == session) {
            entry.session = None;
            if entry.state != LinkState::Revoked {
                entry.state = LinkState::Offline;
                entry.since = now;
            }
            entry.last_disconnect = Some(reason.to_owned());
        }
    }

    pub(crate) fn seen(&self, outpost: &str, rtt: Option<Duration>) {
        let mut live = self.lock();
        if let Some(entry) = live.get_mut(outpost) {
            entry.last_seen = Some(Utc::now());
            if rtt.is_some() {
                entry.rtt = rtt;
            }
        }
    }

    pub(crate) fn set_degraded(&self, outpost: &str, why: Option<String>) {
        let mut live = self.lock();
        if let Some(entry) = live.get_mut(outpost) {
            let connected = entry.session.is_some();
            entry.degraded = why;
            if connected {
                let want = if entry.degraded.is_some() {
                    LinkState::Degraded
                } else {
                    LinkState::Online
                };
                if entry.state != want {
                    entry.state = want;
                    entry.since = Utc::now();
                }
            }
        }
    }

    /// Records an error about the outpost's link (hub side).
    pub fn record_error(&self, outpost: &str, code: &str, message: &str, hint: &str) {
        let now = Utc::now();
        let mut live = self.lock();
        let entry = live
            .entry(outpost.to_owned())
            .or_insert_with(|| Live::new(LinkState::Offline, now));
        entry.errors.record("hub", code, message, hint, now, now, 1);
    }

    /// Something about the outpost's stages changed: its session re-syncs
    /// (unless the store's feed says so to every hub, see
    /// [`Links::use_feed_pokes`]).
    pub fn poke(&self, outpost: &str) {
        if !self.feed_pokes.load(std::sync::atomic::Ordering::Relaxed) {
            self.poke_local(outpost);
        }
    }

    /// Pokes this hub's session of the outpost, if it has one.
    pub fn poke_local(&self, outpost: &str) {
        if let Some(session) = self.lock().get(outpost).and_then(|e| e.session.as_ref()) {
            session.poke.notify_one();
        }
    }

    /// Whether this hub has a session of the outpost.
    pub fn has_local_session(&self, outpost: &str) -> bool {
        self.lock()
            .get(outpost)
            .is_some_and(|e| e.session.is_some())
    }

    /// The outposts with a session here, each with its session's id and
    /// claim epoch (0 while unknown).
    pub fn local_sessions(&self) -> Vec<(String, u64, u64)> {
        self.lock()
            .iter()
            .filter_map(|(outpost, e)| {
                e.session.as_ref().map(|s| {
                    (
                        outpost.clone(),
                        s.id,
                        s.epoch.load(std::sync::atomic::Ordering::Relaxed),
                    )
                })
            })
            .collect()
    }

    /// Another hub instance claimed the outpost's link at `epoch`: a
    /// session of ours with a lower (or no longer matching) epoch ends. A
    /// session whose own claim is still on its way remembers the epoch and
    /// ends if its claim comes back lower ([`Links::claimed`]). Returns
    /// whether a session was ended.
    pub fn fence(&self, outpost: &str, epoch: u64) -> bool {
        let mut live = self.lock();
        let Some(entry) = live.get_mut(outpost) else {
            return false;
        };
        entry.foreign_epoch = entry.foreign_epoch.max(epoch);
        let mine = entry
            .session
            .as_ref()
            .map(|s| s.epoch.load(std::sync::atomic::Ordering::Relaxed));
        match mine {
            Some(mine) if mine != 0 && mine < epoch => {
                if let Some(session) = entry.session.as_ref() {
                    session.cancel.cancel();
                }
                self.fenced
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                true
            }
            _ => false,
        }
    }

    /// Ends our session of the outpost, if it is `session`: its claim is
    /// gone from the store (another instance took the link, or the store
    /// was told this instance died).
    pub fn fence_session(&self, outpost: &str, session: u64) -> bool {
        let live = self.lock();
        match live.get(outpost).and_then(|e| e.session.as_ref()) {
            Some(s) if s.id == session => {
                s.cancel.cancel();
                self.fenced
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                true
            }
            _ => false,
        }
    }

    /// Session `session` of the outpost got its claim at `epoch`. Returns
    /// `false` if another instance claimed it higher meanwhile (the session
    /// is ended).
    pub(crate) fn claimed(&self, outpost: &str, session: &SessionHandle, epoch: u64) -> bool {
        session
            .epoch
            .store(epoch, std::sync::atomic::Ordering::Relaxed);
        let foreign = self.lock().get(outpost).map_or(0, |e| e.foreign_epoch);
        if foreign > epoch {
            session.cancel.cancel();
            self.fenced
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Asks the outpost's live session for the log lines of a stage placed
    /// on it. Never waits for the outpost: the stream's first event comes
    /// when the agent answers.
    pub fn open_logs(
        &self,
        outpost: &str,
        project: &str,
        stage: &str,
        query: LogQuery,
    ) -> Result<logs::LogStream, logs::OpenLogsError> {
        let session = self
            .lock()
            .get(outpost)
            .and_then(|e| e.session.clone())
            .ok_or(logs::OpenLogsError::Offline)?;
        let id = self
            .next_request
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        logs::LogStream::open(
            id,
            project,
            stage,
            query,
            &session.requests,
            &session.log_slots,
        )
    }

    /// Says whether session `session` of `outpost` serves streams (its
    /// agent announced them in hello).
    pub(crate) fn set_streams(&self, outpost: &str, session: u64, streams: bool) {
        let mut live = self.lock();
        if let Some(entry) = live.get_mut(outpost)
            && entry.session.as_ref().is_some_and(|s| s.id == session)
        {
            entry.streams = streams;
        }
    }

    /// Asks the outpost's live session to open a stream into a stage placed
    /// on it (same path as [`Links::open_logs`]). Never waits for the
    /// outpost: [`streams::PendingStream::opened`] does.
    pub fn open_stream(
        &self,
        outpost: &str,
        project: &str,
        stage: &str,
        target: trellis_link::protocol::StreamTarget,
    ) -> Result<streams::PendingStream, streams::OpenStreamError> {
        let session = {
            let live = self.lock();
            let entry = live.get(outpost);
            let session = entry
                .and_then(|e| e.session.clone())
                .ok_or(streams::OpenStreamError::Offline)?;
            if !entry.is_some_and(|e| e.streams) {
                return Err(streams::OpenStreamError::Unsupported);
            }
            session
        };
        let id = self
            .next_request
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (reply, pending) = tokio::sync::oneshot::channel();
        session
            .requests
            .try_send(logs::SessionRequest::Stream(Box::new(
                streams::StreamRequest {
                    id,
                    project: project.to_owned(),
                    stage: stage.to_owned(),
                    target,
                    reply,
                },
            )))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => streams::OpenStreamError::Busy,
                mpsc::error::TrySendError::Closed(_) => streams::OpenStreamError::Offline,
            })?;
        Ok(streams::PendingStream { reply: pending })
    }

    /// Revokes the outpost's link: its session is closed at once.
    pub fn revoke(&self, outpost: &str) {
        let now = Utc::now();
        let mut live = self.lock();
        let entry = live
            .entry(outpost.to_owned())
            .or_insert_with(|| Live::new(LinkState::Revoked, now));
        entry.state = LinkState::Revoked;
        entry.since = now;
        if let Some(session) = entry.session.take() {
            session.cancel.cancel();
        }
    }

    /// The live view, or `None` if no session has existed since the hub
    /// started (the caller then falls back to what the store remembers).
    pub fn view(&self, outpost: &str) -> Option<LinkView> {
        let live = self.lock();
        let entry = live.get(outpost)?;
        Some(LinkView {
            state: entry.state,
            since: entry.since,
            last_seen: entry.last_seen,
            rtt_ms: entry
                .rtt
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            agent_version: entry.agent_version.clone(),
            last_disconnect: entry.last_disconnect.clone(),
            attention: entry.degraded.clone(),
            instance: None,
            instance_address: None,
            certificate_expires: None,
            errors: entry.errors.entries(),
        })
    }

    pub fn is_connected(&self, outpost: &str) -> bool {
        self.lock()
            .get(outpost)
            .is_some_and(|e| e.session.is_some())
    }

    /// How many outposts have a session right now.
    pub fn connected_count(&self) -> usize {
        self.lock().values().filter(|e| e.session.is_some()).count()
    }
}

impl Live {
    fn new(state: LinkState, now: DateTime<Utc>) -> Self {
        Live {
            state,
            since: now,
            last_seen: None,
            rtt: None,
            agent_version: None,
            last_disconnect: None,
            session: None,
            errors: ErrorLog::default(),
            degraded: None,
            streams: false,
            foreign_epoch: 0,
        }
    }
}

/// Admission of new links: at most `rate` a second on average, with a
/// burst of up to `rate` at once. A link that cannot be admitted now gets
/// a **reserved slot** — the next free one, `1/rate` after the last given
/// out — and is told to come back then; when it does, it is admitted on
/// its reservation, whatever else arrived in the meantime.
///
/// Telling every refused agent "retry in a second" would bring the whole
/// queue back every second, each retry costing a TLS handshake at both
/// ends: 15,000 agents after a hub restart would spend the hub's CPU on
/// refusals. Slots without reservations were not enough either: agents
/// returning at their slot met newcomers that had taken the capacity, were
/// refused again and sent to the back of an ever longer queue (15,000
/// agents at 400 a second stalled for 30 s). With reservations each agent
/// is refused about once, and the hub admits at its rate throughout.
///
/// The schedule is the generic cell rate algorithm: `next_free` is when
/// the next unreserved admission falls due; a link is admitted at once if
/// that is at most one burst ahead of now.
#[derive(Debug)]
struct Admission {
    interval: Duration,
    /// How far `next_free` may run ahead of now with links still admitted
    /// at once: the burst.
    burst: Duration,
    next_free: Option<Instant>,
    /// The slot each refused outpost holds.
    reservations: HashMap<String, Instant>,
    /// Prune reservations nobody came back for when there are this many.
    prune_at: usize,
}

/// No refused link is told to wait longer than this; beyond it the queue
/// is far longer than any restart should make it.
const MAX_ADMISSION_WAIT: Duration = Duration::from_secs(600);

/// A reservation nobody claimed this long after its slot is dropped.
const RESERVATION_KEPT: Duration = Duration::from_secs(600);

impl Admission {
    fn new(rate: u32) -> Self {
        let rate = rate.max(1);
        let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
        Admission {
            interval,
            // `rate` at once: the first, and `rate - 1` more ahead of it.
            burst: interval * (rate - 1),
            next_free: None,
            reservations: HashMap::new(),
            prune_at: 1024,
        }
    }

    /// Admits `outpost` now, or says how long until its slot.
    fn admit(&mut self, outpost: &str, now: Instant) -> Result<(), Duration> {
        if let Some(&slot) = self.reservations.get(outpost) {
            if slot <= now {
                self.reservations.remove(outpost);
                return Ok(());
            }
            // Back early: the same slot, not a new one.
            return Err(slot - now);
        }
        let due = self.next_free.map_or(now, |t| t.max(now));
        let slot = due.checked_sub(self.burst).unwrap_or(now).max(now);
        if slot <= now {
            self.next_free = Some(due + self.interval);
            return Ok(());
        }
        if slot - now > MAX_ADMISSION_WAIT {
            // The queue is past any sensible length: no reservation; the
            // link tries again later like any other.
            return Err(MAX_ADMISSION_WAIT);
        }
        self.next_free = Some(due + self.interval);
        self.reservations.insert(outpost.to_owned(), slot);
        if self.reservations.len() >= self.prune_at {
            self.reservations
                .retain(|_, slot| *slot + RESERVATION_KEPT > now);
            self.prune_at = (self.reservations.len() * 2).max(1024);
        }
        Err(slot - now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(i: usize) -> String {
        format!("edge-{i}")
    }

    #[test]
    fn admission_takes_a_burst_then_says_when_to_retry() {
        let mut admission = Admission::new(10);
        let t0 = Instant::now();
        for i in 0..10 {
            assert!(admission.admit(&name(i), t0).is_ok());
        }
        let wait = admission.admit(&name(10), t0).unwrap_err();
        assert!(
            wait <= Duration::from_millis(100) && wait > Duration::ZERO,
            "{wait:?}"
        );
        // Early, it is told the rest of the same wait.
        let again = admission
            .admit(&name(10), t0 + Duration::from_millis(50))
            .unwrap_err();
        assert_eq!(again, wait - Duration::from_millis(50));
        assert!(admission.admit(&name(10), t0 + wait).is_ok());
    }

    #[test]
    fn refused_links_get_reserved_slots_spread_at_the_admission_rate() {
        let mut admission = Admission::new(100);
        let t0 = Instant::now();
        for i in 0..100 {
            assert!(admission.admit(&name(i), t0).is_ok());
        }
        // 1,000 more at once: each told a later time, 10 ms apart, so they
        // come back at the rate they can be admitted.
        let waits: Vec<Duration> = (100..1100)
            .map(|i| admission.admit(&name(i), t0).unwrap_err())
            .collect();
        for pair in waits.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= Duration::from_micros(9_999) && gap <= Duration::from_micros(10_001),
                "{gap:?}"
            );
        }
        assert!(waits[999] >= Duration::from_secs(9), "{:?}", waits[999]);
        // Newcomers keep arriving while the queue drains; each link that
        // returns at its slot — even late — is admitted on its reservation,
        // and the newcomers queue behind.
        for (k, wait) in waits.iter().enumerate() {
            let at = t0 + *wait + Duration::from_millis(k as u64 % 7);
            let newcomer = admission.admit(&name(5000 + k), at);
            assert!(newcomer.is_err(), "newcomer {k} took a reserved slot");
            assert!(
                admission.admit(&name(100 + k), at).is_ok(),
                "link {k} refused at its slot"
            );
        }
        // Nobody is sent away for longer than the cap.
        let mut flood = Admission::new(1);
        let t1 = Instant::now();
        let longest = (0..2000)
            .map(|i| flood.admit(&name(i), t1).err().unwrap_or_default())
            .max()
            .unwrap();
        assert!(longest <= MAX_ADMISSION_WAIT, "{longest:?}");
    }

    #[test]
    fn a_newer_session_replaces_an_older_one() {
        let links = Links::new(LinkSettings::default());
        let (first, _) = links.connected("edge", "1.0");
        let (second, _) = links.connected("edge", "1.0");
        assert!(first.cancel.is_cancelled());
        links.disconnected("edge", first.id, "replaced");
        assert_eq!(
            links.view("edge").unwrap().state,
            LinkState::Online,
            "the old session's end must not mark it offline"
        );
        links.disconnected("edge", second.id, "closed");
        assert_eq!(links.view("edge").unwrap().state, LinkState::Offline);
    }

    #[test]
    fn revoking_cancels_the_session_and_sticks() {
        let links = Links::new(LinkSettings::default());
        let (s, _) = links.connected("edge", "1.0");
        links.revoke("edge");
        assert!(s.cancel.is_cancelled());
        links.disconnected("edge", s.id, "revoked");
        assert_eq!(links.view("edge").unwrap().state, LinkState::Revoked);
    }
}
