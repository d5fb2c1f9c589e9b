//! Test doubles shared by the agent's tests: an in-memory link pair, a
//! connector that hands the hub's end of each connection to the test (a
//! scripted hub), and runtimes that record, fail or block on command.

#![allow(dead_code)] // each test file uses a different part

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use trellis_agent::link::{self, LinkContext};
use trellis_agent::reconciler::Reconciler;
use trellis_agent::report::Reporter;
use trellis_agent::runner::{ApplyOutcome, StageRunner};
use trellis_agent::{
    AgentError, AgentState, ConnectError, Connector, LinkConfig, Shutdown, ShutdownTrigger,
    StageKey,
};
use trellis_link::protocol::{ComponentStatus, RuntimeInfo};
use trellis_link::{Envelope, Incoming, LinkIo, LinkIoError, Message};

// === in-memory link ===

/// The agent's end of an in-memory link.
pub struct AgentEnd {
    to_hub: Option<mpsc::UnboundedSender<Envelope>>,
    from_hub: mpsc::UnboundedReceiver<Incoming>,
    /// Lets `ping` answer itself with a pong while the hub end lives,
    /// like a WebSocket peer does.
    loopback: mpsc::WeakUnboundedSender<Incoming>,
    mute: Arc<AtomicBool>,
    closed: Arc<Mutex<Option<String>>>,
}

/// The hub's end: what a scripted hub reads and writes.
pub struct HubEnd {
    pub from_agent: mpsc::UnboundedReceiver<Envelope>,
    pub to_agent: mpsc::UnboundedSender<Incoming>,
    /// When set, the agent's pings go unanswered.
    pub mute: Arc<AtomicBool>,
    /// The reason the agent gave when it closed the link.
    pub closed: Arc<Mutex<Option<String>>>,
    seq: u64,
}

pub fn mem_link() -> (AgentEnd, HubEnd) {
    let (to_hub, from_agent) = mpsc::unbounded_channel();
    let (to_agent, from_hub) = mpsc::unbounded_channel();
    let mute = Arc::new(AtomicBool::new(false));
    let closed = Arc::new(Mutex::new(None));
    (
        AgentEnd {
            to_hub: Some(to_hub),
            from_hub,
            loopback: to_agent.downgrade(),
            mute: mute.clone(),
            closed: closed.clone(),
        },
        HubEnd {
            from_agent,
            to_agent,
            mute,
            closed,
            seq: 0,
        },
    )
}

#[async_trait]
impl LinkIo for AgentEnd {
    async fn send(&mut self, envelope: &Envelope) -> Result<(), LinkIoError> {
        // Through the real codec, so what the hub sees is what the wire
        // would carry.
        let bytes = trellis_link::encode(envelope)?;
        let envelope = trellis_link::decode(&bytes)?;
        match &self.to_hub {
            Some(tx) => tx
                .send(envelope)
                .map_err(|_| LinkIoError::Transport("the hub end is gone".into())),
            None => Err(LinkIoError::Transport("the link is closed".into())),
        }
    }

    async fn recv(&mut self) -> Result<Option<Incoming>, LinkIoError> {
        Ok(self.from_hub.recv().await)
    }

    async fn ping(&mut self, payload: Vec<u8>) -> Result<(), LinkIoError> {
        if !self.mute.load(Ordering::SeqCst)
            && let Some(tx) = self.loopback.upgrade()
        {
            let _ = tx.send(Incoming::Pong(payload));
        }
        Ok(())
    }

    async fn close(&mut self, reason: &str) {
        *self.closed.lock().unwrap() = Some(reason.to_owned());
        self.to_hub = None;
    }
}

impl HubEnd {
    pub fn send(&mut self, msg: Message) {
        self.seq += 1;
        // The agent may have dropped the link already; tests check that
        // through what they receive.
        let _ = self
            .to_agent
            .send(Incoming::Frame(Envelope::new(self.seq, msg)));
    }

    /// The next message from the agent; `None` once it closed the link.
    /// Panics after 120 s of (virtual or real) silence.
    pub async fn recv(&mut self) -> Option<Message> {
        tokio::time::timeout(Duration::from_secs(120), self.from_agent.recv())
            .await
            .expect("the agent sent nothing for 120 s")
            .map(|e| e.msg)
    }

    /// The next message, which must exist.
    pub async fn next(&mut self) -> Message {
        self.recv().await.expect("the agent closed the link")
    }

    /// Reads until a message matching `pick` arrives; others are returned
    /// in order through `skipped`.
    pub async fn until<T>(
        &mut self,
        skipped: &mut Vec<Message>,
        mut pick: impl FnMut(&Message) -> Option<T>,
    ) -> T {
        loop {
            let msg = self.next().await;
            if let Some(found) = pick(&msg) {
                return found;
            }
            skipped.push(msg);
        }
    }

    /// Expects `hello` and answers `welcome`; returns the hello.
    pub async fn handshake(&mut self, heartbeat_secs: u32) -> Message {
        let hello = self.next().await;
        assert_eq!(hello.kind(), "hello", "{hello:?}");
        self.send(Message::Welcome {
            hub_version: "test".into(),
            heartbeat_secs,
            server_time: chrono::Utc::now(),
        });
        hello
    }
}

// === connector ===

/// Hands the hub's end of each new connection to the test, after failing
/// the attempts scripted in `failures`. Records when each attempt started.
pub struct TestConnector {
    pub failures: Mutex<VecDeque<ConnectError>>,
    pub attempts: Mutex<Vec<Instant>>,
    hubs: mpsc::UnboundedSender<HubEnd>,
}

impl TestConnector {
    pub fn new() -> (Arc<TestConnector>, mpsc::UnboundedReceiver<HubEnd>) {
        let (hubs, rx) = mpsc::unbounded_channel();
        (
            Arc::new(TestConnector {
                failures: Mutex::new(VecDeque::new()),
                attempts: Mutex::new(Vec::new()),
                hubs,
            }),
            rx,
        )
    }

    pub fn fail_next(&self, error: ConnectError) {
        self.failures.lock().unwrap().push_back(error);
    }

    pub fn attempts(&self) -> Vec<Instant> {
        self.attempts.lock().unwrap().clone()
    }
}

#[async_trait]
impl Connector for TestConnector {
    async fn connect(&self) -> Result<Box<dyn LinkIo>, ConnectError> {
        self.attempts.lock().unwrap().push(Instant::now());
        if let Some(error) = self.failures.lock().unwrap().pop_front() {
            return Err(error);
        }
        let (agent, hub) = mem_link();
        self.hubs
            .send(hub)
            .map_err(|_| ConnectError::new("test-over", "the test is over"))?;
        Ok(Box::new(agent))
    }
}

// === runtimes ===

/// A runtime that records applies, fails chosen revisions, and can hold
/// every apply until the test releases it.
#[derive(Default)]
pub struct TestRuntime {
    pub applied: Mutex<Vec<(StageKey, u64)>>,
    pub removed: Mutex<Vec<StageKey>>,
    pub fail: Mutex<HashSet<u64>>,
    /// When set, each apply takes one permit first.
    pub gate: Option<Arc<Semaphore>>,
    /// Signals each apply's start.
    pub started: Option<mpsc::UnboundedSender<(StageKey, u64)>>,
}

impl TestRuntime {
    pub fn applied(&self) -> Vec<u64> {
        self.applied
            .lock()
            .unwrap()
            .iter()
            .map(|(_, r)| *r)
            .collect()
    }
}

#[async_trait]
impl StageRunner for TestRuntime {
    fn describe(&self) -> Vec<RuntimeInfo> {
        vec![RuntimeInfo {
            name: "test".into(),
            version: "1.0".into(),
        }]
    }

    async fn apply(
        &self,
        stage: &StageKey,
        revision: u64,
        _desired: &serde_json::Value,
    ) -> ApplyOutcome {
        if let Some(started) = &self.started {
            let _ = started.send((stage.clone(), revision));
        }
        if let Some(gate) = &self.gate {
            gate.acquire().await.expect("gate open").forget();
        }
        self.applied.lock().unwrap().push((stage.clone(), revision));
        if self.fail.lock().unwrap().contains(&revision) {
            return ApplyOutcome::failed(format!("revision {revision} does not start"));
        }
        ApplyOutcome {
            ok: true,
            state: "running".into(),
            message: None,
            components: vec![ComponentStatus {
                name: "web".into(),
                state: "running".into(),
                restarts: 0,
                exit_code: None,
                ..Default::default()
            }],
            rolled_back_to: None,
            notices: Vec::new(),
        }
    }

    async fn remove(&self, stage: &StageKey) -> Result<(), String> {
        self.removed.lock().unwrap().push(stage.clone());
        Ok(())
    }
}

// === an agent made of parts ===

/// The agent's parts, wired like [`trellis_agent::run`] does, but with the
/// state shared with the test and the link's hub ends handed to it.
pub struct Harness {
    pub dir: tempfile::TempDir,
    pub state: Arc<AgentState>,
    pub reporter: Arc<Reporter>,
    pub runtime: Arc<TestRuntime>,
    pub connector: Arc<TestConnector>,
    pub hubs: mpsc::UnboundedReceiver<HubEnd>,
    pub ctx: LinkContext,
    pub trigger: ShutdownTrigger,
    pub link: Option<JoinHandle<Result<(), AgentError>>>,
    pub reconciler: Option<JoinHandle<()>>,
    reconciler_parts: Option<Reconciler>,
    shutdown: Shutdown,
}

pub fn temp_state() -> (tempfile::TempDir, Arc<AgentState>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let state = AgentState::open(&dir.path().join("agent.redb")).expect("open state");
    (dir, Arc::new(state))
}

pub fn web() -> StageKey {
    StageKey::new("shop", "web")
}

impl Harness {
    pub fn new(runtime: TestRuntime) -> Harness {
        let (dir, state) = temp_state();
        let runtime = Arc::new(runtime);
        let reporter = Arc::new(Reporter::new(state.clone(), 32));
        let reconciler = Reconciler::new(runtime.clone(), reporter.clone());
        let (connector, hubs) = TestConnector::new();
        let ctx = LinkContext {
            state: state.clone(),
            reporter: reporter.clone(),
            reconciler: reconciler.handle(),
            runtime: runtime.clone(),
            data_dir: dir.path().to_path_buf(),
            arch: "amd64".into(),
            backups: None,
            updater: None,
        };
        let (trigger, shutdown) = Shutdown::channel();
        Harness {
            dir,
            state,
            reporter,
            runtime,
            connector,
            hubs,
            ctx,
            trigger,
            link: None,
            reconciler: None,
            reconciler_parts: Some(reconciler),
            shutdown,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Starts the reconciler.
    pub fn start_reconciler(&mut self) {
        let reconciler = self.reconciler_parts.take().expect("started once");
        self.reconciler = Some(tokio::spawn(reconciler.run(self.shutdown.clone())));
    }

    /// Starts the link loop with `config` and a fixed seed.
    pub fn start_link(&mut self, config: LinkConfig) {
        let connector = self.connector.clone();
        let ctx = self.ctx.clone();
        let shutdown = self.shutdown.clone();
        self.link = Some(tokio::spawn(async move {
            link::run_link(
                connector.as_ref(),
                &ctx,
                config,
                StdRng::seed_from_u64(7),
                shutdown,
            )
            .await
        }));
    }

    /// The hub's end of the next connection.
    pub async fn next_hub(&mut self) -> HubEnd {
        tokio::time::timeout(Duration::from_secs(600), self.hubs.recv())
            .await
            .expect("the agent did not reconnect within 600 s")
            .expect("connector alive")
    }

    /// Stops everything and returns the link loop's result.
    pub async fn stop(mut self) -> Result<(), AgentError> {
        self.trigger.trigger();
        if let Some(reconciler) = self.reconciler.take() {
            reconciler.await.expect("reconciler task");
        }
        match self.link.take() {
            Some(link) => link.await.expect("link task"),
            None => Ok(()),
        }
    }
}

/// Polls `check` (a cheap read of the state) until it holds, for up to
/// ~10 s of real time.
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if check() {
            return;
        }
        // Real time: state writes are fsyncs on a blocking thread.
        tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(10)))
            .await
            .unwrap();
    }
    panic!("timed out waiting until {what}");
}
