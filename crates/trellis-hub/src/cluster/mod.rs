//! Several hub instances on one store (PostgreSQL; in tests and the
//! simulation, one in-memory store).
//!
//! Each instance keeps the links of the agents that reached it; the store
//! tells every instance what any of them changed ([`trellis_store::Change`])
//! and records which instance holds each outpost's link. This module is the
//! instance's side of that:
//!
//! - **changes**: the feed pokes the sessions this instance holds, closes
//!   links of revoked outposts, and ends a session when another instance
//!   claimed its outpost at a higher epoch (fencing). When the feed says it
//!   missed changes, everything is checked again.
//! - **claims**: a session claims its outpost's link as soon as the agent
//!   said hello, in batches (one statement for many link-ups), and releases
//!   it when it ends.
//! - **safety nets**, for what the feed cannot promise: every heartbeat the
//!   instance compares its sessions with its claims in the store (a session
//!   whose claim went elsewhere ends), and every few minutes every session
//!   re-reads its outpost's desired state, spread over the interval.
//! - **liveness**: the instance beats its record several times a
//!   heartbeat; a link held by an instance whose beat is older than a
//!   heartbeat is shown offline ([`Cluster::holder`]).
//! - **forwarding** (`forward.rs`): a request that needs a live link held
//!   by another instance (logs) is sent there.
//! - **secrets** (`secrets.rs`): the CA and the URI secret every instance
//!   must share, sealed in the store with the cluster key.
//!
//! On a store only one hub opens (SQLite) none of this runs: the hub knows
//! every change it makes.

pub mod forward;
pub mod forward_stream;
pub mod secrets;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use trellis_store::{Change, Instance, LinkClaim, Store};

use crate::link::SessionHandle;
use crate::state::AppState;

/// How the instance paces its cluster work; derived from the link's
/// heartbeat.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How often the instance beats its record.
    pub beat: Duration,
    /// An instance whose last beat is older than this is dead, and the
    /// links it held are offline.
    pub alive_within: Duration,
    /// How often the instance compares its sessions with its claims.
    pub check_claims: Duration,
    /// How often each session re-reads its desired state regardless.
    pub resync: Duration,
}

impl Timing {
    pub fn for_heartbeat(heartbeat: Duration, resync: Duration) -> Timing {
        Timing {
            beat: (heartbeat / 5).max(Duration::from_millis(200)),
            alive_within: heartbeat,
            check_claims: heartbeat,
            resync,
        }
    }
}

/// This instance, as the others see it.
pub struct Cluster {
    id: String,
    started_at: DateTime<Utc>,
    address: OnceLock<String>,
    /// Whether the store is shared (has a change feed).
    shared: bool,
    timing: Timing,
    /// Changes received from the store.
    pub notifications: AtomicU64,
    /// Requests forwarded to the instance holding a link.
    pub forwarded: AtomicU64,
    /// Times the feed said changes were missed.
    pub missed: AtomicU64,
    claims: Arc<ClaimQueue>,
    /// The instances, as last read, and when.
    instances: Mutex<Option<(tokio::time::Instant, Arc<Vec<Instance>>)>>,
}

impl Cluster {
    pub fn new(shared: bool, timing: Timing) -> Cluster {
        let id: [u8; 6] = rand::random();
        Cluster {
            id: format!("i-{}", hex::encode(id)),
            started_at: Utc::now(),
            address: OnceLock::new(),
            shared,
            timing,
            notifications: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            missed: AtomicU64::new(0),
            claims: Arc::default(),
            instances: Mutex::new(None),
        }
    }

    /// This instance's id, unique per process start.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether other hubs share the store.
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// Sets the address the other instances reach this one at (once).
    pub fn set_address(&self, address: String) {
        let _ = self.address.set(address);
    }

    pub fn address(&self) -> Option<&str> {
        self.address.get().map(String::as_str)
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    fn record(&self) -> Instance {
        Instance {
            id: self.id.clone(),
            address: self.address().unwrap_or_default().to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at: self.started_at,
            beat_at: Utc::now(),
        }
    }

    /// The instances sharing the store, read at most once a second.
    pub async fn instances(&self, store: &dyn Store) -> trellis_store::Result<Arc<Vec<Instance>>> {
        if let Some((at, list)) = &*self.lock_instances()
            && at.elapsed() < Duration::from_secs(1)
        {
            return Ok(list.clone());
        }
        let list = Arc::new(store.instances().await?);
        *self.lock_instances() = Some((tokio::time::Instant::now(), list.clone()));
        Ok(list)
    }

    fn lock_instances(
        &self,
    ) -> std::sync::MutexGuard<'_, Option<(tokio::time::Instant, Arc<Vec<Instance>>)>> {
        self.instances.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `instance` beat recently enough to count as alive.
    pub fn alive(&self, instance: &Instance) -> bool {
        let age = Utc::now() - instance.beat_at;
        age.to_std()
            .map_or(true, |age| age <= self.timing.alive_within)
    }

    /// Who holds the outpost's link according to the store: the claim, and
    /// the holding instance if it is another one and alive.
    pub async fn holder(&self, store: &dyn Store, outpost: &str) -> trellis_store::Result<Holder> {
        let Some(claim) = store.link_claim(outpost).await? else {
            return Ok(Holder::Nobody);
        };
        if claim.released_at.is_some() {
            return Ok(Holder::Released(claim));
        }
        if claim.instance == self.id {
            return Ok(Holder::Me(claim));
        }
        let instances = self.instances(store).await?;
        match instances.iter().find(|i| i.id == claim.instance) {
            Some(i) if self.alive(i) => Ok(Holder::Other {
                instance: i.clone(),
                claim,
            }),
            Some(i) => Ok(Holder::Dead {
                instance: Some(i.clone()),
                claim,
            }),
            None => Ok(Holder::Dead {
                instance: None,
                claim,
            }),
        }
    }

    /// Claims the outpost's link for `session` (in a batch with other
    /// link-ups) and remembers the epoch; releases it at once if the
    /// session ended meanwhile.
    pub(crate) fn claim(&self, state: &AppState, outpost: &str, session: &SessionHandle) {
        if !self.shared {
            return;
        }
        let (tx, rx) = oneshot::channel();
        self.claims.push(
            outpost.to_owned(),
            tx,
            state.store_handle(),
            self.id.clone(),
        );
        let state = state.clone();
        let outpost = outpost.to_owned();
        let session = session.clone();
        tokio::spawn(async move {
            let Ok(epoch) = rx.await else { return };
            if epoch == 0 {
                // The outpost was deleted meanwhile: revocation ends it.
                return;
            }
            let kept = state.links().claimed(&outpost, &session, epoch);
            if !kept || session.is_closed() {
                release(&state, &outpost, epoch).await;
            }
        });
    }

    /// The session ended: its claim is released (unless another session
    /// claimed the outpost since, which the store checks).
    pub(crate) fn release(&self, state: &AppState, outpost: &str, session: &SessionHandle) {
        if !self.shared {
            return;
        }
        let epoch = session.epoch.load(Ordering::Relaxed);
        if epoch == 0 {
            // Its claim is still on its way; the claim's task releases it.
            return;
        }
        let state = state.clone();
        let outpost = outpost.to_owned();
        tokio::spawn(async move { release(&state, &outpost, epoch).await });
    }
}

/// Releases a claim, trying a few times while the store is unreachable (a
/// claim left behind only makes the link look held until this instance's
/// beat goes stale or its next check).
async fn release(state: &AppState, outpost: &str, epoch: u64) {
    let me = state.cluster().id().to_owned();
    let mut wait = Duration::from_millis(200);
    for _ in 0..5 {
        match state
            .store()
            .release_link(&me, outpost, epoch, Utc::now())
            .await
        {
            Ok(()) => return,
            Err(e) => {
                tracing::debug!(%outpost, error = %e, "could not release a link claim; retrying");
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
        }
    }
}

/// Who holds a link, as [`Cluster::holder`] reads it.
#[derive(Debug, Clone)]
pub enum Holder {
    /// Never claimed.
    Nobody,
    /// The last session ended.
    Released(LinkClaim),
    /// This instance.
    Me(LinkClaim),
    /// Another live instance.
    Other {
        instance: Instance,
        claim: LinkClaim,
    },
    /// An instance that stopped beating (or was forgotten).
    Dead {
        instance: Option<Instance>,
        claim: LinkClaim,
    },
}

// === claims, in batches ===

/// Link claims on their way to the store, written a batch at a time.
#[derive(Default)]
struct ClaimQueue {
    inner: Mutex<Claims>,
}

#[derive(Default)]
struct Claims {
    waiting: Vec<(String, oneshot::Sender<u64>)>,
    writing: bool,
}

/// The most claims written in one statement.
const CLAIM_BATCH: usize = 2000;

impl ClaimQueue {
    fn push(
        self: &Arc<Self>,
        outpost: String,
        answer: oneshot::Sender<u64>,
        store: Arc<dyn Store>,
        me: String,
    ) {
        let start = {
            let mut claims = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            claims.waiting.push((outpost, answer));
            !std::mem::replace(&mut claims.writing, true)
        };
        if start {
            let queue = self.clone();
            tokio::spawn(async move { queue.write_all(store, me).await });
        }
    }

    async fn write_all(self: Arc<Self>, store: Arc<dyn Store>, me: String) {
        let mut wait = Duration::from_millis(100);
        loop {
            let batch: Vec<(String, oneshot::Sender<u64>)> = {
                let mut claims = self.inner.lock().unwrap_or_else(|p| p.into_inner());
                claims.waiting.retain(|(_, tx)| !tx.is_closed());
                if claims.waiting.is_empty() {
                    claims.writing = false;
                    return;
                }
                let take = claims.waiting.len().min(CLAIM_BATCH);
                claims.waiting.drain(..take).collect()
            };
            let outposts: Vec<String> = batch.iter().map(|(o, _)| o.clone()).collect();
            match store.claim_links(&me, &outposts, Utc::now()).await {
                Ok(epochs) => {
                    wait = Duration::from_millis(100);
                    for ((_, tx), epoch) in batch.into_iter().zip(epochs) {
                        let _ = tx.send(epoch);
                    }
                }
                Err(e) => {
                    // The store is down: the sessions run on, and their
                    // claims are written once it is back.
                    tracing::warn!(error = %e, claims = batch.len(), "could not record which outposts this hub holds; retrying");
                    {
                        let mut claims = self.inner.lock().unwrap_or_else(|p| p.into_inner());
                        let rest = std::mem::take(&mut claims.waiting);
                        claims.waiting = batch;
                        claims.waiting.extend(rest);
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

// === the instance's background work ===

/// Starts what an instance on a shared store runs until `cancel`: the
/// change feed, its beat, and the safety nets. Does nothing on a store only
/// this hub uses.
pub fn spawn(state: AppState, cancel: CancellationToken) {
    let Some(feed) = state.store().changes() else {
        return;
    };
    if !state.cluster().is_shared() {
        return;
    }
    state.links().use_feed_pokes();
    tokio::spawn(follow(state.clone(), feed, cancel.clone()));
    tokio::spawn(beat(state.clone(), cancel.clone()));
    tokio::spawn(check_claims(state.clone(), cancel.clone()));
    tokio::spawn(resync(state, cancel));
}

/// Acts on every change the store announces.
async fn follow(state: AppState, mut feed: trellis_store::ChangeFeed, cancel: CancellationToken) {
    let me = state.cluster().id().to_owned();
    loop {
        let change = tokio::select! {
            () = cancel.cancelled() => return,
            change = feed.recv() => change,
        };
        let Some(change) = change else {
            tracing::warn!(
                "the store's change feed ended; this hub no longer hears other hubs' changes"
            );
            return;
        };
        state
            .cluster()
            .notifications
            .fetch_add(1, Ordering::Relaxed);
        match change {
            Change::Outpost(outpost) => state.links().poke_local(&outpost),
            Change::Profile(outpost) => {
                state.links().profiles.reload(state.store(), &outpost).await;
                state.links().notify_profile(&outpost);
            }
            Change::Revoked(outpost) => {
                state.artifact_access().forget(&outpost);
                // A deleted outpost has nobody to show as revoked; its
                // session is ended all the same.
                match state.store().get_outpost(&outpost).await {
                    Ok(o) if o.revoked_at.is_none() => {}
                    _ => state.links().revoke(&outpost),
                }
            }
            Change::Claimed {
                outpost,
                instance,
                epoch,
            } => {
                if instance != me && state.links().fence(&outpost, epoch) {
                    tracing::info!(%outpost, %instance, epoch, "another hub instance took this outpost's link");
                }
            }
            Change::Missed => {
                state.cluster().missed.fetch_add(1, Ordering::Relaxed);
                // Profiles changed meanwhile are read again too.
                if let Err(e) = state.links().profiles.load(state.store()).await {
                    tracing::warn!(error = %e, "could not read the outposts' link profiles again");
                }
                recheck_everything(&state).await;
            }
        }
    }
}

/// After missed changes: every session re-syncs, sessions whose claim went
/// elsewhere end, and links of revoked or deleted outposts close.
async fn recheck_everything(state: &AppState) {
    let sessions = state.links().local_sessions();
    for (outpost, _, _) in &sessions {
        state.links().poke_local(outpost);
    }
    verify_claims(state).await;
    match state.store().list_outposts().await {
        Ok(outposts) => {
            let by_name: HashMap<&str, bool> = outposts
                .iter()
                .map(|o| (o.name.as_str(), o.revoked_at.is_some()))
                .collect();
            for (outpost, _, _) in &sessions {
                if by_name.get(outpost.as_str()).copied().unwrap_or(true) {
                    state.links().revoke(outpost);
                    state.artifact_access().forget(outpost);
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not re-check revocations after missed changes"),
    }
}

/// Ends sessions whose claim the store no longer has for this instance at
/// their epoch (another instance took the link and its notification was
/// lost, or this instance was taken for dead and forgotten).
async fn verify_claims(state: &AppState) {
    let me = state.cluster().id().to_owned();
    let claims = match state.store().link_claims(Some(&me)).await {
        Ok(claims) => claims,
        Err(e) => {
            tracing::debug!(error = %e, "could not compare sessions with their claims");
            return;
        }
    };
    let held: HashMap<&str, &LinkClaim> = claims
        .iter()
        .filter(|c| c.released_at.is_none())
        .map(|c| (c.outpost.as_str(), c))
        .collect();
    for (outpost, session, epoch) in state.links().local_sessions() {
        if epoch == 0 {
            continue;
        }
        let ours = held.get(outpost.as_str()).is_some_and(|c| c.epoch == epoch);
        if !ours && state.links().fence_session(&outpost, session) {
            tracing::info!(%outpost, epoch, "this hub's claim of the link is gone; ending the session");
        }
    }
}

async fn beat(state: AppState, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(state.cluster().timing().beat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = state.store().beat_instance(&state.cluster().record()).await {
            tracing::warn!(error = %e, "could not record that this hub instance is alive");
        }
    }
}

async fn check_claims(state: AppState, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(state.cluster().timing().check_claims);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        verify_claims(&state).await;
    }
}

/// Pokes every session once per resync interval, a slice each second, so
/// a change whose notification was lost reaches its agent anyway.
async fn resync(state: AppState, cancel: CancellationToken) {
    let period = state.cluster().timing().resync.max(Duration::from_secs(1));
    let step = Duration::from_secs(1).min(period);
    let steps = (period.as_secs_f64() / step.as_secs_f64()).ceil().max(1.0) as usize;
    let mut tick = tokio::time::interval(step);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut round: Vec<String> = Vec::new();
    let mut per_step = 1;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if round.is_empty() {
            round = state
                .links()
                .local_sessions()
                .into_iter()
                .map(|(o, _, _)| o)
                .collect();
            per_step = round.len().div_ceil(steps).max(1);
        }
        let take = per_step.min(round.len());
        for outpost in round.drain(..take) {
            state.links().poke_local(&outpost);
        }
    }
}

/// Runs `job` (GC and other single-writer work) on one instance at a
/// time: waits for the job's lock, runs `job` until the lock is lost or
/// `cancel`, then waits for it again. On a store only this hub uses the
/// lock is always free.
pub fn lead<F, Fut>(state: AppState, name: &'static str, cancel: CancellationToken, job: F)
where
    F: Fn(AppState, CancellationToken) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let retry = Duration::from_secs(10);
        loop {
            let lock = tokio::select! {
                () = cancel.cancelled() => return,
                lock = state.store().lock_job(name) => lock,
            };
            match lock {
                Ok(Some(mut lock)) => {
                    tracing::info!(job = name, "this hub instance runs the job now");
                    let stop = cancel.child_token();
                    let running = tokio::spawn(job(state.clone(), stop.clone()));
                    tokio::select! {
                        () = cancel.cancelled() => {}
                        () = lock.lost() => {
                            tracing::warn!(job = name, "lost the job's lock; stopping it until it is taken again");
                        }
                    }
                    stop.cancel();
                    let _ = running.await;
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(job = name, error = %e, "could not take the job's lock"),
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(retry) => {}
            }
        }
    });
}

/// Instances that stopped beating this long ago are forgotten (their
/// record removed, the links they held released).
pub const FORGET_AFTER: Duration = Duration::from_secs(600);

/// A leader's housekeeping: forgets long-dead instances.
pub async fn forget_dead_instances(state: AppState, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(instances) = state.store().instances().await else {
            continue;
        };
        for instance in instances.iter() {
            let age = (Utc::now() - instance.beat_at).to_std().unwrap_or_default();
            if age > FORGET_AFTER {
                tracing::info!(instance = %instance.id, address = %instance.address, "forgetting a hub instance that stopped beating");
                if let Err(e) = state.store().forget_instance(&instance.id).await {
                    tracing::warn!(error = %e, "could not forget a dead hub instance");
                }
            }
        }
    }
}
