//! A deterministic simulation of one hub and many outpost agents.
//!
//! Everything runs in one single-threaded Tokio runtime with paused time, so
//! minutes of simulated partitions, crashes and delays take milliseconds and
//! every random choice comes from one seed: a failing seed replays.
//!
//! The hub and the agents are the real code — the hub's link sessions, the
//! agent's reconnect loop, session, reconciler and durable state — joined by
//! in-memory links ([`trellis_link::mem`]) instead of sockets. What the
//! simulation adds is a network that can partition an agent, delay frames,
//! cut live links, refuse connections while the hub is "down", crash agents
//! (their task is dropped mid-flight; their state file stays) and crash the
//! hub (all sessions and all in-memory link state are dropped; the store
//! stays, as a database would).
//!
//! After the faults stop and the network heals, the run checks:
//! 1. every stage's agent applied the stage's newest desired revision, and
//!    the hub knows it (convergence);
//! 2. no agent ever applied a revision older than one it applied before
//!    (no out-of-order apply), across its own crashes;
//! 3. the hub's record of each stage's applied revision never went
//!    backwards (no acknowledged status lost).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinHandle;
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

/// The shape of one simulated run.
#[derive(Debug, Clone, Copy)]
pub struct SimConfig {
    pub agents: usize,
    /// How long faults are injected (simulated time).
    pub fault_phase: Duration,
    /// How long the healed system gets to converge (simulated time).
    pub settle: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            agents: 50,
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
    pub agent_crashes: u64,
    pub hub_crashes: u64,
    pub applies: u64,
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

/// The simulated network between the agents and the hub.
struct Net {
    rng: Mutex<StdRng>,
    hub: Mutex<Option<AppState>>,
    partitioned: Mutex<Vec<bool>>,
    /// Per agent, the cut switch of its current link.
    cuts: Mutex<Vec<Option<tokio_util::sync::CancellationToken>>>,
    sessions: Mutex<Vec<JoinHandle<()>>>,
    max_delay_ms: Mutex<u64>,
}

impl Net {
    fn delay(&self) -> Duration {
        let max = *self.max_delay_ms.lock().unwrap_or_else(|p| p.into_inner());
        let ms = self
            .rng
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .gen_range(0..=max);
        Duration::from_millis(ms)
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
        if self
            .net
            .partitioned
            .lock()
            .unwrap_or_else(|p| p.into_inner())[self.index]
        {
            return Err(ConnectError::new("hub-unreachable", "simulated partition"));
        }
        let Some(hub) = self
            .net
            .hub
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return Err(ConnectError::new("hub-refused", "simulated hub is down"));
        };
        let (hub_end, agent_end) = pair();
        let cut = tokio_util::sync::CancellationToken::new();
        self.net.cuts.lock().unwrap_or_else(|p| p.into_inner())[self.index] = Some(cut.clone());
        let peer = PeerIdentity {
            outpost: outpost_name(self.index),
            serial_hex: "5e".into(),
            not_after: Utc::now() + chrono::Duration::days(365),
            public_key_fingerprint: KeyFingerprint([0; 32]),
        };
        let hub_side = FaultyLink {
            inner: hub_end,
            cut: cut.clone(),
            net: self.net.clone(),
        };
        let session = tokio::spawn(trellis_hub::link::session::run(
            Box::new(hub_side),
            peer,
            hub,
        ));
        self.net
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(session);
        Ok(Box::new(FaultyLink {
            inner: agent_end,
            cut,
            net: self.net.clone(),
        }))
    }
}

/// A link end whose frames are delayed by the network and which fails at
/// once when its link is cut.
struct FaultyLink {
    inner: MemLink,
    cut: tokio_util::sync::CancellationToken,
    net: Arc<Net>,
}

fn cut_error() -> LinkIoError {
    LinkIoError::Transport("simulated link failure".into())
}

#[async_trait]
impl LinkIo for FaultyLink {
    async fn send(&mut self, envelope: &Envelope) -> Result<(), LinkIoError> {
        let delay = self.net.delay();
        tokio::select! {
            () = self.cut.cancelled() => return Err(cut_error()),
            () = tokio::time::sleep(delay) => {}
        }
        tokio::select! {
            () = self.cut.cancelled() => Err(cut_error()),
            r = self.inner.send(envelope) => r,
        }
    }

    async fn recv(&mut self) -> Result<Option<Incoming>, LinkIoError> {
        tokio::select! {
            () = self.cut.cancelled() => Err(cut_error()),
            r = self.inner.recv() => r,
        }
    }

    async fn ping(&mut self, payload: Vec<u8>) -> Result<(), LinkIoError> {
        if self.cut.is_cancelled() {
            return Err(cut_error());
        }
        self.inner.ping(payload).await
    }

    async fn close(&mut self, reason: &str) {
        self.inner.close(reason).await;
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

async fn open_hub(dir: &std::path::Path, store: Arc<MemoryStore>) -> Result<AppState, String> {
    let hub = Hub::open_with_store(
        HubOptions {
            data_dir: dir.to_owned(),
            link: LinkSettings {
                heartbeat: Duration::from_secs(5),
                ..LinkSettings::default()
            },
            ..Default::default()
        },
        store,
    )
    .await
    .map_err(|e| format!("opening the hub: {e:#}"))?;
    Ok(hub.state().clone())
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
    let hub_dir = base.path().join("hub");
    let hub = open_hub(&hub_dir, store.clone()).await?;
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

    let net = Arc::new(Net {
        rng: Mutex::new(StdRng::seed_from_u64(seed ^ 0x5eed)),
        hub: Mutex::new(Some(hub)),
        partitioned: Mutex::new(vec![false; config.agents]),
        cuts: Mutex::new(vec![None; config.agents]),
        sessions: Mutex::new(Vec::new()),
        max_delay_ms: Mutex::new(50),
    });
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

    // Per stage, the hub's applied revision must never go backwards.
    let mut hub_applied = vec![0u64; config.agents];

    // Fault phase: one event every 0–500 ms of simulated time.
    let mut restarts: Vec<(tokio::time::Instant, usize)> = Vec::new();
    let mut heal_partition: Vec<(tokio::time::Instant, usize)> = Vec::new();
    let mut hub_back: Option<tokio::time::Instant> = None;
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
            net.partitioned.lock().unwrap_or_else(|p| p.into_inner())[i] = false;
        }
        if hub_back.is_some_and(|at| at <= now) {
            hub_back = None;
            let state = open_hub(&hub_dir, store.clone()).await?;
            *net.hub.lock().unwrap_or_else(|p| p.into_inner()) = Some(state);
        }
        let i = rng.gen_range(0..config.agents);
        match rng.gen_range(0..100) {
            0..=44 => {
                let release = s
                    .push_release(
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
                let _ = release;
                stats.releases += 1;
                if let Some(hub) = net.hub.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                    hub.links().poke(&outpost_name(i));
                }
            }
            45..=64 => {
                // Partition: the live link dies and reconnects fail for a while.
                net.partitioned.lock().unwrap_or_else(|p| p.into_inner())[i] = true;
                if let Some(cut) = net.cuts.lock().unwrap_or_else(|p| p.into_inner())[i].take() {
                    cut.cancel();
                }
                heal_partition.push((now + Duration::from_millis(rng.gen_range(500..20_000)), i));
                stats.partitions += 1;
            }
            65..=79 => {
                if let Some(cut) = net.cuts.lock().unwrap_or_else(|p| p.into_inner())[i].take() {
                    cut.cancel();
                    stats.link_cuts += 1;
                }
            }
            80..=91 => {
                if let Some(task) = slots[i].task.take() {
                    task.abort();
                    let _ = task.await;
                    if let Some(cut) = net.cuts.lock().unwrap_or_else(|p| p.into_inner())[i].take()
                    {
                        cut.cancel();
                    }
                    restarts.push((now + Duration::from_millis(rng.gen_range(100..10_000)), i));
                    stats.agent_crashes += 1;
                }
            }
            92..=93 if hub_back.is_none() => {
                // The hub crashes: every session and all live link state go.
                *net.hub.lock().unwrap_or_else(|p| p.into_inner()) = None;
                for session in net
                    .sessions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .drain(..)
                {
                    session.abort();
                }
                for cut in net
                    .cuts
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter_mut()
                {
                    if let Some(cut) = cut.take() {
                        cut.cancel();
                    }
                }
                hub_back = Some(now + Duration::from_millis(rng.gen_range(500..5_000)));
                stats.hub_crashes += 1;
            }
            _ => {
                *net.max_delay_ms.lock().unwrap_or_else(|p| p.into_inner()) = rng.gen_range(0..300);
            }
        }
        check_hub(&mut hub_applied, store.as_ref()).await?;
    }

    // Heal everything and let the system settle.
    *net.max_delay_ms.lock().unwrap_or_else(|p| p.into_inner()) = 20;
    for flag in net
        .partitioned
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter_mut()
    {
        *flag = false;
    }
    if net.hub.lock().unwrap_or_else(|p| p.into_inner()).is_none() {
        let state = open_hub(&hub_dir, store.clone()).await?;
        *net.hub.lock().unwrap_or_else(|p| p.into_inner()) = Some(state);
    }
    for (_, i) in restarts.drain(..) {
        generation += 1;
        start_agent(i, &mut slots[i], &net, &recorder, seed, generation);
    }
    let settle_end = tokio::time::Instant::now() + config.settle;
    while tokio::time::Instant::now() < settle_end {
        tokio::time::sleep(Duration::from_secs(1)).await;
        check_hub(&mut hub_applied, store.as_ref()).await?;
    }

    // Invariants.
    if let Some(v) = recorder
        .violations
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .first()
    {
        return Err(v.clone());
    }
    let applied = recorder
        .applied
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
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
                "{key}: the hub records applied revision {}, but desired is {} and the agent applied {agent_last}",
                sync.applied_revision, stage.desired_revision
            ));
        }
        stats.applies += applied.get(&key).map_or(0, |l| l.len() as u64);
    }
    for slot in &mut slots {
        if let Some(task) = slot.task.take() {
            task.abort();
        }
    }
    for session in net
        .sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain(..)
    {
        session.abort();
    }
    Ok(stats)
}

/// The hub's applied revision of every stage must never go backwards: a
/// status it acknowledged is never lost.
async fn check_hub(hub_applied: &mut [u64], store: &dyn Store) -> Result<(), String> {
    for (i, seen) in hub_applied.iter_mut().enumerate() {
        let sync = store
            .get_stage_sync(PROJECT, &stage_name(i))
            .await
            .map_err(|e| e.to_string())?;
        if sync.applied_revision < *seen {
            return Err(format!(
                "the hub's applied revision of {PROJECT}/{} went back from {seen} to {}",
                stage_name(i),
                sync.applied_revision
            ));
        }
        *seen = sync.applied_revision;
    }
    Ok(())
}
