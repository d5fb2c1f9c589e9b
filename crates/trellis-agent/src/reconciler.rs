//! The reconciler: makes each stage run the newest desired state the agent
//! holds, whether or not the link is up.
//!
//! It is level-triggered, like the sync it serves: it does not replay the
//! desired states the link received, it looks at what is *held* (in
//! [`AgentState`](crate::state::AgentState)) and what is *applied*, and applies the newest held
//! revision of every stage that is behind. That gives the ordering rules for
//! free:
//!
//! - a revision older than the applied one is never applied (the state
//!   refuses to record it, and the reconciler never picks it);
//! - revisions that arrive while another is being applied are skipped but
//!   for the newest, which is applied next.
//!
//! A failed apply is recorded as applied-with-failure and reported; it is
//! not retried until the hub sends a newer revision (retries with backoff
//! belong with the real runtimes' health checks).
//!
//! Stages deleted on the hub are forgotten by the link (durably, at once, so
//! the stage's revisions may start over) and queued here for
//! [`Runtime::remove`], which runs before any apply of the same pass.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use trellis_link::protocol::StatusReport;

use crate::report::Reporter;
use crate::runner::StageRunner;
use crate::shutdown::Shutdown;
use crate::state::{StageKey, StateError};
use crate::{AgentError, blocking};

/// Wakes the reconciler; held by the link. Cloning is cheap.
#[derive(Clone, Debug, Default)]
pub struct ReconcilerHandle {
    inner: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    wake: Notify,
    removals: Mutex<VecDeque<StageKey>>,
}

impl ReconcilerHandle {
    pub fn new() -> Self {
        ReconcilerHandle::default()
    }

    /// The held desired state changed: look again.
    pub fn desired_changed(&self) {
        self.inner.wake.notify_one();
    }

    /// `stage` was forgotten (already removed from the state): remove its
    /// components.
    pub fn forget(&self, stage: StageKey) {
        self.inner
            .removals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(stage);
        self.inner.wake.notify_one();
    }

    fn next_removal(&self) -> Option<StageKey> {
        self.inner
            .removals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front()
    }
}

/// How often applied stages are looked at again by default.
pub const DEFAULT_OBSERVE_INTERVAL: Duration = Duration::from_secs(3);

/// The reconcile loop; see the module docs.
pub struct Reconciler {
    runner: Arc<dyn StageRunner>,
    reporter: Arc<Reporter>,
    handle: ReconcilerHandle,
    /// The revision last attempted per stage in this process, so a stage
    /// whose result could not be recorded (storage trouble) is not applied
    /// again in a tight loop.
    attempted: HashMap<StageKey, u64>,
    /// Stages being applied right now (each stage has at most one apply in
    /// flight; different stages apply concurrently, so one release's health
    /// window never holds up another stage).
    busy: HashSet<StageKey>,
    /// Removals waiting for an apply of the same stage to finish.
    deferred_removals: Vec<StageKey>,
    /// The last report made per stage, so observation reports changes only.
    reported: Arc<Mutex<HashMap<StageKey, StatusReport>>>,
    observe_interval: Duration,
}

type ApplyResult = (StageKey, Option<u64>, Result<(), AgentError>);

impl Reconciler {
    pub fn new(runner: Arc<dyn StageRunner>, reporter: Arc<Reporter>) -> Self {
        Reconciler {
            runner,
            reporter,
            handle: ReconcilerHandle::new(),
            attempted: HashMap::new(),
            busy: HashSet::new(),
            deferred_removals: Vec::new(),
            reported: Arc::default(),
            observe_interval: DEFAULT_OBSERVE_INTERVAL,
        }
    }

    /// Looks at applied stages every `interval` (see [`StageRunner::observe`]).
    pub fn with_observe_interval(mut self, interval: Duration) -> Self {
        self.observe_interval = interval.max(Duration::from_millis(50));
        self
    }

    /// The handle that wakes this reconciler.
    pub fn handle(&self) -> ReconcilerHandle {
        self.handle.clone()
    }

    /// Runs until `shutdown`. Errors of single stages are logged and
    /// reported, never fatal; storage errors are retried on the next wake.
    pub async fn run(mut self, mut shutdown: Shutdown) {
        let mut inflight: JoinSet<ApplyResult> = JoinSet::new();
        let mut observe = tokio::time::interval(self.observe_interval);
        observe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Register interest before looking, so a change made while this
            // pass runs wakes the next one instead of being missed.
            let wake = self.handle.inner.clone();
            let notified = wake.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();

            let start = self.start_due(&mut inflight);
            tokio::select! {
                _ = shutdown.wait() => return,
                result = start => {
                    if let Err(e) = result {
                        tracing::error!(error = %e, "reconciling stages failed; retrying when the desired state changes");
                    }
                }
            }
            tokio::select! {
                _ = shutdown.wait() => {
                    // An apply cut short is applied again after the restart:
                    // its revision was not recorded as applied.
                    inflight.abort_all();
                    while inflight.join_next().await.is_some() {}
                    return;
                }
                Some(done) = inflight.join_next() => self.finished(done),
                _ = &mut notified => {}
                _ = observe.tick() => {
                    tokio::select! {
                        _ = shutdown.wait() => return,
                        _ = self.observe_stages() => {}
                    }
                }
            }
        }
    }

    /// One pass, waited for: pending removals, then every stage that is
    /// behind, each at its newest held revision.
    pub async fn pass(&mut self) -> Result<(), AgentError> {
        let mut inflight = JoinSet::new();
        let result = self.start_due(&mut inflight).await;
        while let Some(done) = inflight.join_next().await {
            self.finished(done);
        }
        result
    }

    /// Looks at every applied stage that is not being applied and reports
    /// the ones whose status changed (a component started crash-looping, a
    /// replica came back…).
    pub async fn observe_stages(&mut self) {
        let stages = match blocking(self.reporter.state(), |s| s.stages()).await {
            Ok(stages) => stages,
            Err(e) => {
                tracing::warn!(error = %e, "could not list stages to observe them");
                return;
            }
        };
        for record in stages {
            let Some(applied) = record.applied_revision else {
                continue;
            };
            if self.busy.contains(&record.key) {
                continue;
            }
            let Some(outcome) = self.runner.observe(&record.key, applied).await else {
                continue;
            };
            let last = self
                .reported
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&record.key)
                .cloned();
            // What the observation found wrong now (a device node gone):
            // the errors of this report. The apply's own were reported with
            // it, and the hub keeps them.
            let errors = notice_errors(outcome.notices);
            let report = match last {
                // A failed apply stays failed (with its reason and what was
                // rolled back to) until a newer revision is applied; only
                // the components' view is refreshed.
                Some(last) if last.state == "failed" => StatusReport {
                    components: outcome.components,
                    errors,
                    ..last
                },
                Some(last) => StatusReport {
                    state: outcome.state,
                    message: outcome.message,
                    components: outcome.components,
                    errors,
                    ..last
                },
                // After a restart nothing was reported by this process; a
                // failed revision's reason is not known any more, so leave
                // its report alone.
                None if !record.applied_ok => continue,
                None => StatusReport {
                    project: record.key.project.clone(),
                    stage: record.key.stage.clone(),
                    applied_revision: applied,
                    state: outcome.state,
                    message: outcome.message,
                    components: outcome.components,
                    errors,
                    rolled_back_to: None,
                },
            };
            if let Err(e) = enqueue_if_changed(&self.reporter, &self.reported, report).await {
                tracing::warn!(stage = %record.key, error = %e, "could not queue a status report");
            }
        }
    }

    fn finished(&mut self, done: Result<ApplyResult, tokio::task::JoinError>) {
        match done {
            Ok((stage, revision, result)) => {
                self.busy.remove(&stage);
                if let Some(revision) = revision {
                    self.attempted.insert(stage.clone(), revision);
                }
                if let Err(e) = result {
                    tracing::error!(%stage, error = %e, "applying a stage failed; retrying when the desired state changes");
                }
            }
            Err(e) => {
                // Only a panic of a runner gets here; the stage stays busy
                // (not re-applied in a loop) until the agent restarts.
                tracing::error!(error = %e, "an apply task failed unexpectedly; this is a bug in the agent");
            }
        }
    }

    /// Runs pending removals and starts an apply for every stage that is
    /// behind and not being applied.
    async fn start_due(&mut self, inflight: &mut JoinSet<ApplyResult>) -> Result<(), AgentError> {
        let mut removals = std::mem::take(&mut self.deferred_removals);
        while let Some(stage) = self.handle.next_removal() {
            removals.push(stage);
        }
        for stage in removals {
            if self.busy.contains(&stage) {
                self.deferred_removals.push(stage);
                continue;
            }
            match self.runner.remove(&stage).await {
                Ok(()) => tracing::info!(%stage, "stage removed: the hub deleted it"),
                Err(e) => {
                    tracing::warn!(%stage, error = %e, "could not remove a stage the hub deleted")
                }
            }
            self.attempted.remove(&stage);
            self.reported
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&stage);
        }

        let stages = blocking(self.reporter.state(), |s| s.stages()).await?;
        for record in stages {
            if self.busy.contains(&record.key) {
                continue;
            }
            let applied = record.applied_revision.unwrap_or(0);
            let attempted = self.attempted.get(&record.key).copied().unwrap_or(0);
            if record.desired_revision <= applied.max(attempted) {
                continue;
            }
            self.busy.insert(record.key.clone());
            let runner = self.runner.clone();
            let reporter = self.reporter.clone();
            let reported = self.reported.clone();
            let handle = self.handle.clone();
            let key = record.key.clone();
            inflight.spawn(async move {
                let (revision, result) = apply_newest(&runner, &reporter, &reported, &key).await;
                // Look again: a newer revision may have arrived meanwhile.
                handle.desired_changed();
                (key, revision, result)
            });
        }
        Ok(())
    }
}

/// Queues `report` unless it says what the last report of its stage said
/// (ignoring `since` timestamps, which move without news).
async fn enqueue_if_changed(
    reporter: &Reporter,
    reported: &Mutex<HashMap<StageKey, StatusReport>>,
    report: StatusReport,
) -> Result<(), AgentError> {
    let key = StageKey::new(report.project.clone(), report.stage.clone());
    let unchanged = reported
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&key)
        .is_some_and(|last| same_news(last, &report));
    if unchanged {
        return Ok(());
    }
    reporter.enqueue(report.clone()).await?;
    reported
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(key, report);
    Ok(())
}

/// Whether `b` tells the hub nothing `a` did not: the same state and
/// components, and no error `a` lacked (an error that went away is no
/// news: the hub keeps the ones it was told).
fn same_news(a: &StatusReport, b: &StatusReport) -> bool {
    let strip = |r: &StatusReport| {
        let mut r = r.clone();
        r.errors.clear();
        for c in &mut r.components {
            c.since = None;
        }
        r
    };
    let known = |e: &trellis_link::protocol::AgentError| {
        a.errors
            .iter()
            .any(|k| k.code == e.code && k.message == e.message)
    };
    strip(a) == strip(b) && b.errors.iter().all(known)
}

/// Notices as the errors of a status report, seen now.
fn notice_errors(notices: Vec<crate::runner::Notice>) -> Vec<trellis_link::protocol::AgentError> {
    let now = chrono::Utc::now();
    notices
        .into_iter()
        .map(|n| trellis_link::protocol::AgentError {
            code: n.code,
            message: n.message,
            hint: Some(n.hint),
            first_seen: now,
            last_seen: now,
            count: 1,
        })
        .collect()
}

/// Applies the newest held revision of `stage`, records and reports it.
/// Returns the revision attempted.
async fn apply_newest(
    runner: &Arc<dyn StageRunner>,
    reporter: &Arc<Reporter>,
    reported: &Mutex<HashMap<StageKey, StatusReport>>,
    stage: &StageKey,
) -> (Option<u64>, Result<(), AgentError>) {
    let key = stage.clone();
    // Read at apply time, not from the pass's listing: a newer revision
    // that arrived since is the one to apply.
    let (revision, desired) = match blocking(reporter.state(), move |s| s.desired(&key)).await {
        Ok(Some(held)) => held,
        Ok(None) => return (None, Ok(())), // forgotten meanwhile
        Err(e) => return (None, Err(e)),
    };
    tracing::info!(%stage, revision, "applying desired state");
    let outcome = runner.apply(stage, revision, &desired).await;
    if outcome.ok {
        tracing::info!(%stage, revision, state = %outcome.state, "applied");
    } else {
        tracing::warn!(%stage, revision, state = %outcome.state, message = ?outcome.message, "apply failed");
    }

    let ok = outcome.ok;
    let state = if outcome.state.is_empty() {
        if outcome.ok { "running" } else { "failed" }.to_owned()
    } else {
        outcome.state
    };
    // What the release asks for that the outpost runs differently goes to
    // the stage's error list, where the hub keeps it with first and last
    // sighting.
    let errors = notice_errors(outcome.notices);
    let report = StatusReport {
        project: stage.project.clone(),
        stage: stage.stage.clone(),
        applied_revision: revision,
        state,
        message: outcome.message,
        components: outcome.components,
        errors,
        rolled_back_to: outcome.rolled_back_to,
    };
    // Every apply is recorded and reported in one write, even when it says
    // what the last one did: the applied revision is news to the hub.
    match reporter.applied(report.clone(), ok).await {
        Ok(_) => {
            reported
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(stage.clone(), report);
            (Some(revision), Ok(()))
        }
        // The hub deleted the stage (and maybe re-created it with
        // revisions starting over) while this apply ran; the removal and
        // the new revision are handled next, and a report of the old stage
        // would only confuse. Nothing was recorded or queued.
        Err(AgentError::State(
            StateError::UnknownStage { .. } | StateError::AppliedAheadOfDesired { .. },
        )) => {
            tracing::info!(%stage, revision, "stage was forgotten while being applied; not reporting it");
            (Some(revision), Ok(()))
        }
        Err(e) => (Some(revision), Err(e)),
    }
}
