//! A deterministic simulation of several hub instances sharing one store,
//! and many outpost agents.
//!
//! Everything runs in one single-threaded Tokio runtime with paused time, so
//! minutes of simulated partitions, crashes and delays take milliseconds and
//! every random choice comes from one seed: a failing seed replays.
//!
//! The hubs and the agents are the real code — the hub's link sessions and
//! its cluster side (the change feed, link claims and fencing, the safety
//! nets), the agent's reconnect loop, session, reconciler and durable state
//! — joined by in-memory links ([`trellis_link::mem`]) instead of sockets,
//! over one in-memory store that announces changes as PostgreSQL's
//! triggers do. What the simulation adds is a network that can partition an
//! agent, delay frames, cut live links, leave a link half-open (the agent
//! gave up on it and reconnected elsewhere, its hub never heard), refuse
//! connections to hubs that are down, send each new connection to a random
//! live hub (as a balancer would), lose change notifications on their way
//! to a hub (nobody is told), crash agents (their task is dropped
//! mid-flight; their state file stays) and crash hubs (all of that hub's
//! sessions and in-memory state are dropped; its link claims stay in the
//! store, as a killed process leaves them; it comes back as a new
//! instance).
//!
//! The run checks, during the faults and after the network heals:
//! 1. every stage's agent applied the stage's newest desired revision, and
//!    the store knows it (convergence);
//! 2. no agent ever applied a revision older than one it applied before
//!    (no out-of-order apply), across its own crashes;
//! 3. the store's record of each stage's applied revision never went
//!    backwards (no acknowledged status lost);
//! 4. no outpost keeps live sessions on two hubs for longer than a
//!    heartbeat and a bit (a newer link-up fences the older one, by
//!    notification or by the claim check), and at the end each outpost has
//!    exactly one session, on the hub the store says holds it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use trellis_agent::state::StageKey;
use trellis_agent::{
    ApplyOutcome, BackoffConfig, ConnectError, Connector, LinkConfig, StageRunner,
};
use trellis_hub::link::LinkSettings;
use trellis_hub::state::AppState;
use trellis_hub::{Hub, HubOptions};
use trellis_link::identity::{KeyFingerprint, PeerIdentity};
use trellis_link::mem::{MemLink, pair};
use trellis_link::protocol::RuntimeInfo;
use trellis_link::{Envelope, Incoming, LinkIo, LinkIoError};
use trellis_model::{NewBuild, Outpost, Project, StageType, User};
use trellis_store::memory::MemoryStore;
use trellis_store::{NewRelease, NewStage, Store};

/// The link heartbeat of the simulated hubs.
const HEARTBEAT: Duration = Duration::from_secs(5);

/// How long two hubs may both hold a session of one outpost: the claim
/// check runs every heartbeat (fencing a session whose notification was
/// lost), plus the time a claim takes. Without fencing a half-open link's
/// session would live two heartbeats.
const FENCE_LIMIT: Duration = Duration::from_secs(7);

/// The shape of one simulated run.
#[derive(Debug, Clone, Copy)]
pub struct SimConfig {
    pub agents: usize,
    /// Hub instances sharing the store.
    pub hubs: usize,
    /// The chance that a change notification is lost on its way to a hub.
    pub lose_notifications: f64,
    /// How long faults are injected (simulated time).
    pub fault_phase: Duration,
    /// How long the healed system gets to converge (simulated time).
    pub settle: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            agents: 50,
            hubs: 3,
            lose_notifications: 0.1,
            fault_phase: Duration::from_secs(30),
            settle: Duration::from_secs(40),
        }
    }
}

/// What a run did, for the campaign's summary.
#[derive(Debug, Default, Clone, Copy)]
pub struct SimStats {
    pub releases: u64,
    pub partitions: u64,
    pub link_cuts: u64,
    /// Links the agent gave up on without its hub hearing of it.
    pub half_open: u64,
    pub agent_crashes: u64,
    pub hub_crashes: u64,
    pub applies: u64,
    /// Change notifications lost on their way to a hub.
    pub notifications_lost: u64,
    /// Sessions ended because a newer link-up replaced them.
    pub fenced: u64,
}

impl SimStats {
    pub fn add(&mut self, other: &SimStats) {
        self.releases += other.releases;
        self.partitions += other.partitions;
        self.link_cuts += other.link_cuts;
        self.half_open += other.half_open;
        self.agent_crashes += other.agent_crashes;
        self.hub_crashes += other.hub_crashes;
        self.applies += other.applies;
        self.notifications_lost += other.notifications_lost;
        self.fenced += other.fenced;
    }
}

/// Runs one seed; `Err` describes the violated invariant.
pub fn run_seed(seed: u64, config: SimConfig) -> Result<SimStats, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .map_err(|e| format!("cannot build the runtime: {e}"))?;
    runtime.block_on(simulate(seed, config))
}

/// Applied revisions per stage, in the order the agent applied them. Lives
/// outside the agents, so it survives their crashes.
#[derive(Default)]
struct Recorder {
    applied: Mutex<HashMap<String, Vec<u64>>>,
    violations: Mutex<Vec<String>>,
}

struct SimRuntime {
    outpost: String,
    recorder: Arc<Recorder>,
}

#[async_trait]
impl StageRunner for SimRuntime {
    fn describe(&self) -> Vec<RuntimeInfo> {
        vec![RuntimeInfo {
            name: "sim".into(),
            version: "1".into(),
        }]
    }

    async fn apply(
        &self,
        stage: &StageKey,
        revision: u64,
        _desired: &serde_json::Value,
    ) -> ApplyOutcome {
        let mut applied = self
            .recorder
            .applied
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let list = applied
            .entry(format!("{}/{}", stage.project, stage.stage))
            .or_default();
        if let Some(&last) = list.last()
            && revision < last
        {
            self.recorder
                .violations
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(format!(
                    "outpost {} applied revision {revision} of {}/{} after revision {last}",
                    self.outpost, stage.project, stage.stage
                ));
        }
        list.push(revision);
        ApplyOutcome {
            ok: true,
            state: "running".into(),
            message: None,
            components: vec![],
            rolled_back_to: None,
            notices: Vec::new(),
        }
    }

    async fn remove(&self, _stage: &StageKey) -> Result<(), String> {
        Ok(())
    }
}

/// One hub instance: its data directory, and while it runs, its state,
/// what stops its background work, and its sessions.
struct HubSlot {
    dir: PathBuf,
    state: Option<AppState>,
    cancel: CancellationToken,
    sessions: Vec<JoinHandle<()>>,
}

/// An agent's current link: the hub it reached, the switch that breaks it
/// for both ends, and the one that breaks it for the agent only (the hub
/// keeps a half-open link until its heartbeat or a newer link-up ends it).
struct AgentLink {
    hub: usize,
    cut: CancellationToken,
    agent_cut: CancellationToken,
}

/// The simulated network between the agents and the hubs.
struct Net {
    rng: Mutex<StdRng>,
    hubs: Mutex<Vec<HubSlot>>,
    partitioned: Mutex<Vec<bool>>,
    links: Mutex<Vec<Option<AgentLink>>>,
    /// Agent ends of half-open links, kept so their hub sees no close.
    zombies: Mutex<Vec<MemLink>>,
    max_delay_ms: Mutex<u64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Net {
    fn delay(&self) -> Duration {
        let max = *lock(&self.max_delay_ms);
        Duration::from_millis(lock(&self.rng).gen_range(0..=max))
    }

    /// Breaks agent `i`'s link for both ends.
    fn cut(&self, i: usize) -> bool {
        match lock(&self.links)[i].take() {
            Some(link) => {
                link.cut.cancel();
                true
            }
            None => false,
        }
    }

    fn live_hubs(&self) -> Vec<(usize, AppState)> {
        lock(&self.hubs)
            .iter()
            .enumerate()
            .filter_map(|(h, slot)| slot.state.clone().map(|s| (h, s)))
            .collect()
    }
}

struct SimConnector {
    index: usize,
    net: Arc<Net>,
}

#[async_trait]
impl Connector for SimConnector {
    async fn connect(&self) -> Result<Box<dyn LinkIo>, ConnectError> {
        tokio::time::sleep(self.net.delay()).await;
        if lock(&self.net.partitioned)[self.index] {
            return Err(ConnectError::new("hub-unreachable", "simulated partition"));
        }
        // The balancer sends the connection to any live hub.
        let live = self.net.live_hubs();
        if live.is_empty() {
            return Err(ConnectError::new(
                "hub-refused",
                "every simulated hub is down",
            ));
        }
        let (h, hub) = live[lock(&self.net.rng).gen_range(0..live.len())].clone();
        let (hub_end, agent_end) = pair();
        let link = AgentLink {
            hub: h,
            cut: CancellationToken::new(),
            agent_cut: CancellationToken::new(),
        };
        let peer = PeerIdentity {
            outpost: outpost_name(self.index),
            serial_hex: "5e".into(),
            not_after: Utc::now() + chrono::Duration::days(365),
            public_key_fingerprint: KeyFingerprint([0; 32]),
        };
        let hub_side = FaultyLink {
            inner: Some(hub_end),
            cut: link.cut.clone(),
            agent_cut: None,
            net: self.net.clone(),
        };
        let agent_side = FaultyLink {
            inner: Some(agent_end),
            cut: link.cut.clone(),
            agent_cut: Some(link.agent_cut.clone()),
            net: self.net.clone(),
        };
        let session = tokio::spawn(trellis_hub::link::session::run(
            Box::new(hub_side),
            peer,
            hub,
        ));
        lock(&self.net.hubs)[h].sessions.push(session);
        if let Some(old) = lock(&self.net.links)[self.index].replace(link) {
            old.cut.cancel();
        }
        Ok(Box::new(agent_side))
    }
}

/// A link end whose frames are delayed by the network and which fails at
/// once when its link is cut. The agent's end also fails when the link goes
/// half-open, and then keeps its channel alive, so the hub's end hears
/// nothing.
struct FaultyLink {
    inner: Option<MemLink>,
    cut: CancellationToken,
    /// The agent's end only.
    agent_cut: Option<CancellationToken>,
    net: Arc<Net>,
}

fn cut_error() -> LinkIoError {
    LinkIoError::Transport("simulated link failure".into())
}

impl FaultyLink {
    async fn broken(&self) {
        match &self.agent_cut {
            Some(agent_cut) => {
                tokio::select! {
                    () = self.cut.cancelled() => {}
                    () = agent_cut.cancelled() => {}
                }
            }
            None => self.cut.cancelled().await,
        }
    }

    fn is_broken(&self) -> bool {
        self.cut.is_cancelled() || self.agent_cut.as_ref().is_some_and(|c| c.is_cancelled())
    }
}

impl Drop for FaultyLink {
    fn drop(&mut self) {
        if let Some(agent_cut) = &self.agent_cut
            && agent_cut.is_cancelled()
            && !self.cut.is_cancelled()
            && let Some(inner) = self.inner.take()
        {
            lock(&self.net.zombies).push(inner);
        }
    }
}

#[async_trait]
impl LinkIo for FaultyLink {
    async fn send(&mut self, envelope: &Envelope) -> Result<(), LinkIoError> {
        let delay = self.net.delay();
        tokio::select! {
            () = self.broken() => return Err(cut_error()),
            () = tokio::time::sleep(delay) => {}
        }
        let Some(inner) = self.inner.as_mut() else {
            return Err(cut_error());
        };
        tokio::select! {
            () = async { match &self.agent_cut {
                Some(a) => tokio::select! { () = self.cut.cancelled() => {}, () = a.cancelled() => {} },
                None => self.cut.cancelled().await,
            } } => Err(cut_error()),
            r = inner.send(envelope) => r,
        }
    }

    async fn recv(&mut self) -> Result<Option<Incoming>, LinkIoError> {
        let cut = self.cut.clone();
        let agent_cut = self.agent_cut.clone();
        let Some(inner) = self.inner.as_mut() else {
            return Err(cut_error());
        };
        tokio::select! {
            () = cut.cancelled() => Err(cut_error()),
            () = async { match &agent_cut { Some(a) => a.cancelled().await, None => std::future::pending().await } } => Err(cut_error()),
            r = inner.recv() => r,
        }
    }

    async fn ping(&mut self, payload: Vec<u8>) -> Result<(), LinkIoError> {
        if self.is_broken() {
            return Err(cut_error());
        }
        match self.inner.as_mut() {
            Some(inner) => inner.ping(payload).await,
            None => Err(cut_error()),
        }
    }

    async fn close(&mut self, reason: &str) {
        if let Some(inner) = self.inner.as_mut() {
            inner.close(reason).await;
        }
    }
}

fn outpost_name(i: usize) -> String {
    format!("edge-{i}")
}

fn stage_name(i: usize) -> String {
    format!("line-{i}")
}

const PROJECT: &str = "plant";

struct AgentSlot {
    dir: PathBuf,
    task: Option<JoinHandle<()>>,
}

fn start_agent(
    i: usize,
    slot: &mut AgentSlot,
    net: &Arc<Net>,
    recorder: &Arc<Recorder>,
    seed: u64,
    generation: u64,
) {
    let options = trellis_agent::AgentOptions {
        runtime: Some(Arc::new(SimRuntime {
            outpost: outpost_name(i),
            recorder: recorder.clone(),
        })),
        connector: Some(Arc::new(SimConnector {
            index: i,
            net: net.clone(),
        })),
        link: LinkConfig {
            backoff: BackoffConfig {
                base: Duration::from_millis(200),
                cap: Duration::from_secs(5),
                reset_after: Duration::from_secs(10),
            },
            ..LinkConfig::default()
        },
        rng_seed: Some(
            seed.wrapping_mul(1_000_003)
                .wrapping_add(i as u64 * 7919 + generation),
        ),
        ..Default::default()
    };
    let dir = slot.dir.clone();
    slot.task = Some(tokio::spawn(async move {
        let _ = trellis_agent::run(&dir, options, std::future::pending::<()>()).await;
    }));
}

/// Opens hub `h` over the shared store and starts its cluster side.
async fn start_hub(net: &Net, h: usize, store: Arc<MemoryStore>) -> Result<(), String> {
    let dir = lock(&net.hubs)[h].dir.clone();
    let hub = Hub::open_with_store(
        HubOptions {
            data_dir: dir,
            link: LinkSettings {
                heartbeat: HEARTBEAT,
                resync: Duration::from_secs(10),
                ..LinkSettings::default()
            },
            ..Default::default()
        },
        store,
    )
    .await
    .map_err(|e| format!("opening hub {h}: {e:#}"))?;
    let state = hub.state().clone();
    let cancel = CancellationToken::new();
    trellis_hub::cluster::spawn(state.clone(), cancel.clone());
    let mut hubs = lock(&net.hubs);
    hubs[h].state = Some(state);
    hubs[h].cancel = cancel;
    Ok(())
}

/// Hub `h` dies: its sessions and background work stop mid-flight, its
/// agents' links break; its claims stay in the store.
fn crash_hub(net: &Net, h: usize, stats: &mut SimStats) {
    let (sessions, state) = {
        let mut hubs = lock(&net.hubs);
        hubs[h].cancel.cancel();
        (std::mem::take(&mut hubs[h].sessions), hubs[h].state.take())
    };
    if let Some(state) = state {
        stats.fenced += state.links().fenced.load(Ordering::Relaxed);
    }
    for session in sessions {
        session.abort();
    }
    let on_it: Vec<usize> = lock(&net.links)
        .iter()
        .enumerate()
        .filter_map(|(i, l)| l.as_ref().filter(|l| l.hub == h).map(|_| i))
        .collect();
    for i in on_it {
        net.cut(i);
    }
}

async fn simulate(seed: u64, config: SimConfig) -> Result<SimStats, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut stats = SimStats::default();
    // tmpfs when there is one: agents fsync their state on every write.
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        tempfile::Builder::new()
            .prefix("trellis-sim")
            .tempdir_in("/dev/shm")
    } else {
        tempfile::tempdir()
    }
    .map_err(|e| format!("creating a temporary directory: {e}"))?;

    let store = Arc::new(MemoryStore::new());
    let lost = Arc::new(AtomicU64::new(0));
    {
        let mut loss = StdRng::seed_from_u64(seed ^ 0x1055);
        let lost = lost.clone();
        let chance = config.lose_notifications;
        store.set_change_filter(Box::new(move |_| {
            let keep = !loss.gen_bool(chance.clamp(0.0, 1.0));
            if !keep {
                lost.fetch_add(1, Ordering::Relaxed);
            }
            keep
        }));
    }
    let net = Arc::new(Net {
        rng: Mutex::new(StdRng::seed_from_u64(seed ^ 0x5eed)),
        hubs: Mutex::new(
            (0..config.hubs.max(1))
                .map(|h| HubSlot {
                    dir: base.path().join(format!("hub-{h}")),
                    state: None,
                    cancel: CancellationToken::new(),
                    sessions: Vec::new(),
                })
                .collect(),
        ),
        partitioned: Mutex::new(vec![false; config.agents]),
        links: Mutex::new((0..config.agents).map(|_| None).collect()),
        zombies: Mutex::new(Vec::new()),
        max_delay_ms: Mutex::new(50),
    });
    for h in 0..config.hubs.max(1) {
        start_hub(&net, h, store.clone()).await?;
    }
    let s: &dyn Store = store.as_ref();
    let now = Utc::now();
    let fail = |e: trellis_store::StoreError| e.to_string();
    s.create_user(&User {
        name: "sim".into(),
        admin: true,
        created_at: now,
    })
    .await
    .ok();
    s.create_project(
        &Project {
            name: PROJECT.into(),
            display_name: String::new(),
            archived_at: None,
            description: String::new(),
            created_at: now,
        },
        "sim",
    )
    .await
    .map_err(fail)?;
    for i in 0..config.agents {
        s.create_outpost(&Outpost {
            name: outpost_name(i),
            display_name: outpost_name(i),
            description: String::new(),
            labels: Default::default(),
            max_stages: None,
            uri_generation: 1,
            revoked_at: None,
            ingress_domain: None,
            created_at: now,
        })
        .await
        .map_err(fail)?;
        s.create_stage(
            &NewStage {
                project: PROJECT.into(),
                name: stage_name(i),
                stage_type: StageType::Prod,
                display_name: stage_name(i),
                outpost: outpost_name(i),
            },
            now,
        )
        .await
        .map_err(fail)?;
    }
    let build = s
        .create_build(
            PROJECT,
            &NewBuild {
                branch: "main".into(),
                commit: "0".repeat(40),
                manifest_file: "trellis.yaml".into(),
                manifest:
                    "version: v1\ncomponents:\n  - name: web\n    docker:\n      image: web:1\n"
                        .into(),
                components: vec![],
            },
            "sim",
            now,
        )
        .await
        .map_err(fail)?;

    let recorder = Arc::new(Recorder::default());
    let mut slots: Vec<AgentSlot> = (0..config.agents)
        .map(|i| AgentSlot {
            dir: base.path().join(format!("agent-{i}")),
            task: None,
        })
        .collect();
    for (i, slot) in slots.iter_mut().enumerate() {
        std::fs::create_dir_all(&slot.dir).map_err(|e| e.to_string())?;
        start_agent(i, slot, &net, &recorder, seed, 0);
    }

    // Per stage, the store's applied revision must never go backwards.
    let mut hub_applied = vec![0u64; config.agents];
    // Per outpost, since when more than one hub holds a session of it.
    let mut doubled: Vec<Option<tokio::time::Instant>> = vec![None; config.agents];

    // Fault phase: one event every 0–500 ms of simulated time.
    let mut restarts: Vec<(tokio::time::Instant, usize)> = Vec::new();
    let mut heal_partition: Vec<(tokio::time::Instant, usize)> = Vec::new();
    let mut hub_back: Vec<(tokio::time::Instant, usize)> = Vec::new();
    let mut generation = 1;
    let end = tokio::time::Instant::now() + config.fault_phase;
    while tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..500))).await;
        let now = tokio::time::Instant::now();
        // Scheduled recoveries.
        for (_, i) in restarts.extract_if(.., |(at, _)| *at <= now) {
            generation += 1;
            start_agent(i, &mut slots[i], &net, &recorder, seed, generation);
        }
        for (_, i) in heal_partition.extract_if(.., |(at, _)| *at <= now) {
            lock(&net.partitioned)[i] = false;
        }
        let back: Vec<usize> = hub_back
            .extract_if(.., |(at, _)| *at <= now)
            .map(|(_, h)| h)
            .collect();
        for h in back {
            start_hub(&net, h, store.clone()).await?;
        }
        let i = rng.gen_range(0..config.agents);
        match rng.gen_range(0..100) {
            0..=44 => {
                // A release, through the store as any hub's API writes it;
                // the store's feed tells the hubs (or loses it).
                s.push_release(
                    &NewRelease {
                        project: PROJECT.into(),
                        stage: stage_name(i),
                        build: build.name.clone(),
                        config: None,
                        created_by: "sim".into(),
                    },
                    Utc::now(),
                )
                .await
                .map_err(fail)?;
                stats.releases += 1;
            }
            45..=59 => {
                // Partition: the live link dies and reconnects fail for a while.
                lock(&net.partitioned)[i] = true;
                net.cut(i);
                heal_partition.push((now + Duration::from_millis(rng.gen_range(500..20_000)), i));
                stats.partitions += 1;
            }
            60..=69 => {
                if net.cut(i) {
                    stats.link_cuts += 1;
                }
            }
            70..=77 => {
                // Half-open: the agent gives up on its link and reconnects
                // (to any hub); the hub holding it hears nothing.
                if let Some(link) = lock(&net.links)[i].take() {
                    link.agent_cut.cancel();
                    stats.half_open += 1;
                }
            }
            78..=89 => {
                if let Some(task) = slots[i].task.take() {
                    task.abort();
                    let _ = task.await;
                    net.cut(i);
                    restarts.push((now + Duration::from_millis(rng.gen_range(100..10_000)), i));
                    stats.agent_crashes += 1;
                }
            }
            90..=92 => {
                // A hub dies (its agents reconnect to the others) and comes
                // back later as a new instance.
                let live = net.live_hubs();
                if !live.is_empty() {
                    let (h, _) = live[rng.gen_range(0..live.len())];
                    crash_hub(&net, h, &mut stats);
                    hub_back.push((now + Duration::from_millis(rng.gen_range(500..8_000)), h));
                    stats.hub_crashes += 1;
                }
            }
            _ => {
                *lock(&net.max_delay_ms) = rng.gen_range(0..300);
            }
        }
        check_hub(&mut hub_applied, store.as_ref()).await?;
        check_fencing(&net, &mut doubled)?;
    }

    // Heal everything and let the system settle.
    *lock(&net.max_delay_ms) = 20;
    for flag in lock(&net.partitioned).iter_mut() {
        *flag = false;
    }
    for (_, h) in hub_back.drain(..) {
        start_hub(&net, h, store.clone()).await?;
    }
    for (_, i) in restarts.drain(..) {
        generation += 1;
        start_agent(i, &mut slots[i], &net, &recorder, seed, generation);
    }
    let settle_end = tokio::time::Instant::now() + config.settle;
    while tokio::time::Instant::now() < settle_end {
        tokio::time::sleep(Duration::from_secs(1)).await;
        check_hub(&mut hub_applied, store.as_ref()).await?;
        check_fencing(&net, &mut doubled)?;
    }

    // Invariants.
    if let Some(v) = lock(&recorder.violations).first() {
        return Err(v.clone());
    }
    let applied = lock(&recorder.applied).clone();
    for i in 0..config.agents {
        let stage = s.get_stage(PROJECT, &stage_name(i)).await.map_err(fail)?;
        let sync = s
            .get_stage_sync(PROJECT, &stage_name(i))
            .await
            .map_err(fail)?;
        let key = format!("{PROJECT}/{}", stage_name(i));
        let agent_last = applied
            .get(&key)
            .and_then(|l| l.last().copied())
            .unwrap_or(0);
        if stage.desired_revision > 0 && agent_last != stage.desired_revision {
            return Err(format!(
                "{key} did not converge: desired revision {}, the agent applied {agent_last} last",
                stage.desired_revision
            ));
        }
        if sync.applied_revision != stage.desired_revision {
            return Err(format!(
                "{key}: the store records applied revision {}, but desired is {} and the agent applied {agent_last}",
                sync.applied_revision, stage.desired_revision
            ));
        }
        stats.applies += applied.get(&key).map_or(0, |l| l.len() as u64);
    }
    // One session per outpost, on the hub the store says holds it.
    let live = net.live_hubs();
    for i in 0..config.agents {
        let outpost = outpost_name(i);
        let holders: Vec<&AppState> = live
            .iter()
            .map(|(_, s)| s)
            .filter(|s| s.links().is_connected(&outpost))
            .collect();
        if holders.len() != 1 {
            return Err(format!(
                "after settling, {outpost} has sessions on {} hubs",
                holders.len()
            ));
        }
        let claim = s.link_claim(&outpost).await.map_err(fail)?;
        let holder = holders[0].cluster().id();
        if !claim
            .as_ref()
            .is_some_and(|c| c.instance == holder && c.released_at.is_none())
        {
            return Err(format!(
                "{outpost} is held by hub {holder}, but the store's claim says {claim:?}"
            ));
        }
    }
    for (_, state) in &live {
        stats.fenced += state.links().fenced.load(Ordering::Relaxed);
    }
    stats.notifications_lost = lost.load(Ordering::Relaxed);
    for slot in &mut slots {
        if let Some(task) = slot.task.take() {
            task.abort();
        }
    }
    let hubs: Vec<usize> = (0..config.hubs.max(1)).collect();
    for h in hubs {
        let mut ignored = SimStats::default();
        crash_hub(&net, h, &mut ignored);
    }
    Ok(stats)
}

/// The store's applied revision of every stage must never go backwards: a
/// status a hub acknowledged is never lost.
async fn check_hub(hub_applied: &mut [u64], store: &dyn Store) -> Result<(), String> {
    for (i, seen) in hub_applied.iter_mut().enumerate() {
        let sync = store
            .get_stage_sync(PROJECT, &stage_name(i))
            .await
            .map_err(|e| e.to_string())?;
        if sync.applied_revision < *seen {
            return Err(format!(
                "the applied revision of {PROJECT}/{} went back from {seen} to {}",
                stage_name(i),
                sync.applied_revision
            ));
        }
        *seen = sync.applied_revision;
    }
    Ok(())
}

/// No outpost may keep sessions on two live hubs for longer than
/// [`FENCE_LIMIT`]: the newer link-up fences the older one.
fn check_fencing(net: &Net, doubled: &mut [Option<tokio::time::Instant>]) -> Result<(), String> {
    let live = net.live_hubs();
    let now = tokio::time::Instant::now();
    for (i, since) in doubled.iter_mut().enumerate() {
        let outpost = outpost_name(i);
        let holders = live
            .iter()
            .filter(|(_, s)| s.links().is_connected(&outpost))
            .count();
        if holders > 1 {
            let since = *since.get_or_insert(now);
            if now - since > FENCE_LIMIT {
                return Err(format!(
                    "{outpost} kept sessions on {holders} hubs for over {} s: the older one was not fenced",
                    FENCE_LIMIT.as_secs()
                ));
            }
        } else {
            *since = None;
        }
    }
    Ok(())
}
