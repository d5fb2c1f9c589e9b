//! Status reports on their way to the hub, and the errors met while the hub
//! could not be told.
//!
//! [`Reporter`] is shared by the reconciler (which produces a report per
//! apply) and the link (which sends the outbox and, once connected, flushes
//! the [`ErrorLog`]). Every report goes through the durable outbox in
//! [`AgentState`], so nothing reported while the link is down is lost
//! (BRIEF §4). Reports are whole states of a stage, never deltas: the outbox
//! may coalesce superseded ones.
//!
//! The error log is in memory on purpose: it holds errors about *reaching*
//! the hub (DNS, refused, TLS, HTTP status), which describe the recent past
//! and are re-discovered after a restart if they persist.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use trellis_link::protocol::{AgentError as ReportedError, StatusReport};

use crate::state::{AgentState, StageKey, StageRecord, StateError};
use crate::{AgentError, blocking};

/// How many distinct errors the log keeps by default.
pub const DEFAULT_ERROR_LOG_CAPACITY: usize = 32;

/// A bounded, de-duplicated list of errors: the same code and message bump
/// a count and the last-seen time instead of adding an entry; when full, the
/// entry seen least recently is dropped.
#[derive(Debug, Clone)]
pub struct ErrorLog {
    capacity: usize,
    /// Ordered by last sighting, oldest first.
    entries: VecDeque<ReportedError>,
}

impl ErrorLog {
    /// An empty log holding up to `capacity` (at least 1) entries.
    pub fn new(capacity: usize) -> Self {
        ErrorLog {
            capacity: capacity.max(1),
            entries: VecDeque::new(),
        }
    }

    /// Records one sighting of an error at `now`.
    pub fn record(&mut self, code: &str, message: &str, hint: Option<&str>, now: DateTime<Utc>) {
        if let Some(pos) = self
            .entries
            .iter()
            .position(|e| e.code == code && e.message == message)
            && let Some(mut entry) = self.entries.remove(pos)
        {
            entry.count = entry.count.saturating_add(1);
            entry.last_seen = now;
            if entry.hint.is_none() {
                entry.hint = hint.map(str::to_owned);
            }
            self.entries.push_back(entry);
            return;
        }
        if self.entries.len() >= self.capacity {
            self.entries.pop_front();
        }
        self.entries.push_back(ReportedError {
            code: code.to_owned(),
            message: message.to_owned(),
            hint: hint.map(str::to_owned),
            first_seen: now,
            last_seen: now,
            count: 1,
        });
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries, least recently seen first.
    pub fn entries(&self) -> impl Iterator<Item = &ReportedError> {
        self.entries.iter()
    }

    /// Takes every entry out, least recently seen first.
    pub fn drain(&mut self) -> Vec<ReportedError> {
        self.entries.drain(..).collect()
    }
}

/// Produces status reports into the durable outbox and wakes the link when
/// there is something to send. Cheap to share behind an `Arc`.
pub struct Reporter {
    state: Arc<AgentState>,
    /// The newest report of each stage, so one can be re-sent with errors
    /// attached or after a stale desired state, without re-applying.
    last: Mutex<HashMap<StageKey, StatusReport>>,
    errors: Mutex<ErrorLog>,
    outbox_changed: Notify,
    deliveries: Arc<crate::delivery::DeliveryBoard>,
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reporter").finish_non_exhaustive()
    }
}

/// The guarded data is plain values, valid after any panic that poisoned
/// the lock, so poisoning is ignored.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Reporter {
    pub fn new(state: Arc<AgentState>, error_log_capacity: usize) -> Self {
        Reporter {
            state,
            last: Mutex::new(HashMap::new()),
            errors: Mutex::new(ErrorLog::new(error_log_capacity)),
            outbox_changed: Notify::new(),
            deliveries: Arc::default(),
        }
    }

    /// Deliveries in progress, sent to the hub by the link session.
    pub fn deliveries(&self) -> &Arc<crate::delivery::DeliveryBoard> {
        &self.deliveries
    }

    pub fn state(&self) -> &Arc<AgentState> {
        &self.state
    }

    /// Queues `report` durably and wakes the link.
    pub async fn enqueue(&self, report: StatusReport) -> Result<u64, AgentError> {
        self.queue(report, |s, key, json| s.enqueue_status(key, json))
            .await
    }

    /// Records that the report's revision was applied (`ok`: successfully)
    /// and queues the report, in one write (see
    /// [`AgentState::record_applied_and_report`]), then wakes the link.
    pub async fn applied(&self, report: StatusReport, ok: bool) -> Result<u64, AgentError> {
        let revision = report.applied_revision;
        self.queue(report, move |s, key, json| {
            s.record_applied_and_report(key, revision, ok, json)
        })
        .await
    }

    async fn queue(
        &self,
        report: StatusReport,
        write: impl FnOnce(&AgentState, &StageKey, &serde_json::Value) -> Result<u64, StateError>
        + Send
        + 'static,
    ) -> Result<u64, AgentError> {
        let stage = StageKey::new(report.project.clone(), report.stage.clone());
        let json = serde_json::to_value(&report).map_err(|e| AgentError::Internal {
            what: format!("encode a status report of stage {stage}: {e}"),
        })?;
        let key = stage.clone();
        let seq = blocking(&self.state, move |s| write(s, &key, &json)).await?;
        lock(&self.last).insert(stage, report);
        self.outbox_changed.notify_one();
        Ok(seq)
    }

    /// Queues the stage's current status again (e.g. after the hub offered a
    /// stale revision, so it learns what the outpost holds).
    pub async fn report_current(&self, stage: &StageKey) -> Result<(), AgentError> {
        let report = self.current(stage).await?;
        if let Some(report) = report {
            self.enqueue(report).await?;
        }
        Ok(())
    }

    /// Records an error to report once the link is back.
    pub fn record_error(&self, code: &str, message: &str, hint: Option<&str>) {
        lock(&self.errors).record(code, message, hint, Utc::now());
    }

    /// A copy of the error log, least recently seen first.
    pub fn errors(&self) -> Vec<ReportedError> {
        lock(&self.errors).entries().cloned().collect()
    }

    /// Sends the collected errors: one report per held stage, its current
    /// status with the errors attached, queued in the outbox; then clears
    /// the log. With no stage held there is nothing to attach them to, so
    /// they stay for the next time. Returns how many reports were queued.
    pub async fn flush_errors(&self) -> Result<usize, AgentError> {
        let errors = lock(&self.errors).drain();
        if errors.is_empty() {
            return Ok(0);
        }
        let stages = match blocking(&self.state, |s| s.stages()).await {
            Ok(stages) => stages,
            Err(e) => {
                self.restore_errors(errors);
                return Err(e);
            }
        };
        if stages.is_empty() {
            self.restore_errors(errors);
            return Ok(0);
        }
        let mut queued = 0;
        for record in &stages {
            let mut report = self.current_of(record);
            report.errors = errors.clone();
            if let Err(e) = self.enqueue(report).await {
                // Nothing is lost by keeping the errors: a second report
                // with them on the next connect repeats, never misleads.
                self.restore_errors(errors);
                return Err(e);
            }
            queued += 1;
        }
        Ok(queued)
    }

    /// Waits until a report was queued since the last call (or one is
    /// pending from before).
    pub async fn outbox_changed(&self) {
        self.outbox_changed.notified().await;
    }

    fn restore_errors(&self, errors: Vec<ReportedError>) {
        let mut log = lock(&self.errors);
        for e in errors {
            // Merging keeps counts and first sightings.
            let count = e.count;
            log.record(&e.code, &e.message, e.hint.as_deref(), e.first_seen);
            if let Some(entry) = log.entries.back_mut() {
                entry.count = entry.count.saturating_add(count.saturating_sub(1));
                entry.last_seen = entry.last_seen.max(e.last_seen);
                entry.first_seen = entry.first_seen.min(e.first_seen);
            }
        }
    }

    async fn current(&self, stage: &StageKey) -> Result<Option<StatusReport>, AgentError> {
        let stages = blocking(&self.state, |s| s.stages()).await?;
        Ok(stages
            .iter()
            .find(|r| &r.key == stage)
            .map(|r| self.current_of(r)))
    }

    /// The last report made in this process, without its errors; after a
    /// restart, one rebuilt from the durable record.
    fn current_of(&self, record: &StageRecord) -> StatusReport {
        if let Some(report) = lock(&self.last).get(&record.key) {
            let mut report = report.clone();
            report.errors.clear();
            return report;
        }
        let (state, message) = match record.applied_revision {
            None => (
                "pending",
                "the desired state is held; it is not applied yet",
            ),
            Some(_) if record.applied_ok => (
                "applied",
                "the agent restarted since this revision was applied; its details were reported then",
            ),
            Some(_) => (
                "failed",
                "applying this revision failed before the agent restarted; the details were reported then",
            ),
        };
        StatusReport {
            project: record.key.project.clone(),
            stage: record.key.stage.clone(),
            applied_revision: record.applied_revision.unwrap_or(0),
            state: state.into(),
            message: Some(message.into()),
            components: Vec::new(),
            errors: Vec::new(),
            rolled_back_to: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_log_deduplicates_and_stays_bounded() {
        let t0 = Utc::now();
        let t1 = t0 + chrono::Duration::seconds(5);
        let mut log = ErrorLog::new(3);
        log.record("hub-dns-failed", "no such host", Some("check DNS"), t0);
        log.record("hub-refused", "refused", None, t0);
        log.record("hub-dns-failed", "no such host", None, t1);
        assert_eq!(log.len(), 2);
        let dns = log.entries().last().unwrap().clone();
        assert_eq!((dns.count, dns.first_seen, dns.last_seen), (2, t0, t1));
        assert_eq!(dns.hint.as_deref(), Some("check DNS"));

        // Full: the entry seen least recently goes.
        log.record("a", "1", None, t1);
        log.record("b", "2", None, t1);
        assert_eq!(log.len(), 3);
        let codes: Vec<_> = log.entries().map(|e| e.code.as_str()).collect();
        assert_eq!(codes, ["hub-dns-failed", "a", "b"]);

        assert_eq!(log.drain().len(), 3);
        assert!(log.is_empty());
    }
}
