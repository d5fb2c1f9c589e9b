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

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;
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

/// The reconcile loop; see the module docs.
pub struct Reconciler {
    runtime: Arc<dyn StageRunner>,
    reporter: Arc<Reporter>,
    handle: ReconcilerHandle,
    /// The revision last attempted per stage in this process, so a stage
    /// whose result could not be recorded (storage trouble) is not applied
    /// again in a tight loop.
    attempted: HashMap<StageKey, u64>,
}

impl Reconciler {
    pub fn new(runtime: Arc<dyn StageRunner>, reporter: Arc<Reporter>) -> Self {
        Reconciler {
            runtime,
            reporter,
            handle: ReconcilerHandle::new(),
            attempted: HashMap::new(),
        }
    }

    /// The handle that wakes this reconciler.
    pub fn handle(&self) -> ReconcilerHandle {
        self.handle.clone()
    }

    /// Runs until `shutdown`. Errors of single stages are logged and
    /// reported, never fatal; storage errors are retried on the next wake.
    pub async fn run(mut self, mut shutdown: Shutdown) {
        loop {
            // Register interest before looking, so a change made while this
            // pass runs wakes the next one instead of being missed.
            let wake = self.handle.inner.clone();
            let notified = wake.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();

            let pass = self.pass();
            tokio::select! {
                _ = shutdown.wait() => return,
                result = pass => {
                    if let Err(e) = result {
                        tracing::error!(error = %e, "reconciling stages failed; retrying when the desired state changes");
                    }
                }
            }
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = &mut notified => {}
            }
        }
    }

    /// One pass: pending removals, then every stage that is behind, each at
    /// its newest held revision.
    pub async fn pass(&mut self) -> Result<(), AgentError> {
        while let Some(stage) = self.handle.next_removal() {
            match self.runtime.remove(&stage).await {
                Ok(()) => tracing::info!(%stage, "stage removed: the hub deleted it"),
                Err(e) => {
                    tracing::warn!(%stage, error = %e, "could not remove a stage the hub deleted")
                }
            }
            self.attempted.remove(&stage);
        }

        let stages = blocking(self.reporter.state(), |s| s.stages()).await?;
        for record in stages {
            let applied = record.applied_revision.unwrap_or(0);
            let attempted = self.attempted.get(&record.key).copied().unwrap_or(0);
            if record.desired_revision <= applied.max(attempted) {
                continue;
            }
            self.apply_newest(&record.key).await?;
        }
        Ok(())
    }

    /// Applies the newest held revision of `stage`, records and reports it.
    async fn apply_newest(&mut self, stage: &StageKey) -> Result<(), AgentError> {
        let key = stage.clone();
        // Read at apply time, not from the pass's listing: a newer revision
        // that arrived since is the one to apply.
        let Some((revision, desired)) =
            blocking(self.reporter.state(), move |s| s.desired(&key)).await?
        else {
            return Ok(()); // forgotten meanwhile
        };
        self.attempted.insert(stage.clone(), revision);
        tracing::info!(%stage, revision, "applying desired state");
        let outcome = self.runtime.apply(stage, revision, &desired).await;
        if outcome.ok {
            tracing::info!(%stage, revision, state = %outcome.state, "applied");
        } else {
            tracing::warn!(%stage, revision, state = %outcome.state, message = ?outcome.message, "apply failed");
        }

        let key = stage.clone();
        let ok = outcome.ok;
        match blocking(self.reporter.state(), move |s| {
            s.record_applied(&key, revision, ok)
        })
        .await
        {
            Ok(()) => {}
            // The hub deleted the stage (and maybe re-created it with
            // revisions starting over) while this apply ran; the removal
            // and the new revision are handled next, and a report of the
            // old stage would only confuse.
            Err(AgentError::State(
                StateError::UnknownStage { .. } | StateError::AppliedAheadOfDesired { .. },
            )) => {
                tracing::info!(%stage, revision, "stage was forgotten while being applied; not reporting it");
                return Ok(());
            }
            Err(e) => return Err(e),
        }

        let state = if outcome.state.is_empty() {
            if outcome.ok { "running" } else { "failed" }.to_owned()
        } else {
            outcome.state
        };
        self.reporter
            .enqueue(StatusReport {
                project: stage.project.clone(),
                stage: stage.stage.clone(),
                applied_revision: revision,
                state,
                message: outcome.message,
                components: outcome.components,
                errors: Vec::new(),
                rolled_back_to: outcome.rolled_back_to,
            })
            .await?;
        Ok(())
    }
}
