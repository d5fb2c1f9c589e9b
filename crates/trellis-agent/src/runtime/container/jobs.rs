//! Scheduled components: one task per component runs its container at
//! its time — on its cron schedule (in its time zone), or once for its
//! release (`@release`) — waits for it, and retries a failed run up to
//! `max-retries` times. The container is created with restart policy `no`,
//! so only this task starts it.
//!
//! Progress is recorded in the stage's [`StageStore`] by container id, and
//! the container itself says whether it ever ran, so a restarted agent
//! picks up where the previous one stopped: a run under way is waited for,
//! not started again, and an `@release` job that ran does not run again.
//! Runs a cron schedule named while no agent ran are skipped.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use trellis_model::manifest::Schedule;

use super::engine::{Engine, Inspected, engine_error};
use super::state::{JobOutcome, JobRecord, StageStore};
use crate::runtime::schedule::next_run;

/// One scheduled component's job.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub component: String,
    pub container_id: String,
    pub schedule: Schedule,
    pub timezone: Option<String>,
    pub max_retries: u32,
    /// Delay before retry `n` is `n × retry_delay` (capped at five minutes).
    pub retry_delay: Duration,
}

/// The longest pause between two retries.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);
/// How long to wait before asking an engine that did not answer again.
const ENGINE_RETRY: Duration = Duration::from_secs(2);

/// Runs `spec` until its work is done (`@release`) or forever (cron).
pub async fn run(engine: Engine, store: Arc<StageStore>, spec: JobSpec) {
    let job = Job {
        engine,
        store,
        spec,
    };
    job.run().await;
}

struct Job {
    engine: Engine,
    store: Arc<StageStore>,
    spec: JobSpec,
}

/// How the next attempt begins.
enum Begin {
    Start,
    /// The container runs already (a restarted agent adopts the run).
    Wait,
    /// An attempt already ended with this exit code.
    Ended(i64),
}

impl Job {
    async fn run(&self) {
        let record = self
            .store
            .component(&self.spec.component)
            .and_then(|r| r.job)
            .filter(|r| r.container_id == self.spec.container_id);
        let Some(now) = self.inspect().await else {
            return;
        };
        let ran_before = parse_time(&now.state.started_at).is_some();
        let retries = record.as_ref().map(|r| r.retries).unwrap_or(0);
        if record.is_none() {
            self.record(|r| *r = JobRecord::new(&self.spec.container_id));
        }
        let outcome = record.as_ref().map(|r| r.outcome);

        // Finish what a previous agent (or this one, before a re-apply)
        // left under way.
        if now.state.running {
            self.attempts(Begin::Wait, retries).await;
        } else if outcome == Some(JobOutcome::Running) {
            // Did the last attempt end without its end being recorded, or
            // was the previous agent waiting to retry?
            let finished = parse_time(&now.state.finished_at);
            let recorded = record.as_ref().and_then(|r| r.last_run);
            let unrecorded_end = match (finished, recorded) {
                (Some(f), Some(r)) => f > r,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if unrecorded_end {
                self.attempts(Begin::Ended(now.state.exit_code), retries)
                    .await;
            } else {
                self.attempts(Begin::Start, retries).await;
            }
        } else if record.is_none() && ran_before {
            // It ran, but the record of it is lost: take the container's
            // word for how it went.
            let code = now.state.exit_code;
            self.record(|r| {
                r.last_run = parse_time(&now.state.finished_at);
                r.exit_code = Some(exit_code(code));
                r.outcome = if code == 0 {
                    JobOutcome::Succeeded
                } else {
                    JobOutcome::Failed
                };
            });
        } else if self.spec.schedule == Schedule::OnRelease
            && matches!(outcome, None | Some(JobOutcome::Waiting))
        {
            self.attempts(Begin::Start, 0).await;
        }

        let Schedule::Cron(expr) = &self.spec.schedule else {
            return;
        };
        loop {
            let next = match next_run(expr, self.spec.timezone.as_deref(), Utc::now()) {
                Ok(next) => next,
                Err(why) => {
                    self.record(|r| {
                        r.outcome = JobOutcome::Failed;
                        r.next_run = None;
                        r.message = Some(format!("its schedule cannot be used: {why}"));
                    });
                    return;
                }
            };
            self.record(|r| r.next_run = Some(next));
            let wait = (next - Utc::now()).to_std().unwrap_or_default();
            tokio::time::sleep(wait).await;
            self.attempts(Begin::Start, 0).await;
        }
    }

    /// Runs the job until it succeeds or its retries are used up.
    async fn attempts(&self, mut begin: Begin, mut retries: u32) {
        loop {
            let code = match begin {
                Begin::Ended(code) => code,
                Begin::Start => {
                    self.record(|r| {
                        r.outcome = JobOutcome::Running;
                        r.retries = retries;
                        r.message = None;
                    });
                    if let Err(e) = self
                        .engine
                        .docker
                        .start_container(&self.spec.container_id, None)
                        .await
                    {
                        let e = engine_error(
                            "container-start-failed",
                            &format!("starting scheduled component {:?}", self.spec.component),
                            &e,
                        );
                        self.record(|r| {
                            r.outcome = JobOutcome::Failed;
                            r.last_run = Some(Utc::now());
                            r.message = Some(e.sentence());
                        });
                        return;
                    }
                    match self.wait().await {
                        Some(code) => code,
                        None => return,
                    }
                }
                Begin::Wait => {
                    self.record(|r| r.outcome = JobOutcome::Running);
                    match self.wait().await {
                        Some(code) => code,
                        None => return,
                    }
                }
            };
            let code = exit_code(code);
            let ended = Utc::now();
            if code == 0 {
                self.record(|r| {
                    r.outcome = JobOutcome::Succeeded;
                    r.last_run = Some(ended);
                    r.exit_code = Some(0);
                    r.retries = retries;
                    r.message = None;
                });
                return;
            }
            if retries < self.spec.max_retries {
                retries += 1;
                self.record(|r| {
                    r.last_run = Some(ended);
                    r.exit_code = Some(code);
                    r.retries = retries;
                    r.message = Some(format!(
                        "run exited with code {code}; retry {retries} of {}",
                        self.spec.max_retries
                    ));
                });
                let delay = self
                    .spec
                    .retry_delay
                    .saturating_mul(retries)
                    .min(MAX_RETRY_DELAY);
                tokio::time::sleep(delay).await;
                begin = Begin::Start;
                continue;
            }
            self.record(|r| {
                r.outcome = JobOutcome::Failed;
                r.last_run = Some(ended);
                r.exit_code = Some(code);
                r.retries = retries;
                r.message = Some(if retries == 0 {
                    format!("its run exited with code {code}")
                } else {
                    format!("its run exited with code {code} after {retries} retries")
                });
            });
            return;
        }
    }

    /// Waits until the container is no longer running and returns its exit
    /// code; `None` when it vanished.
    async fn wait(&self) -> Option<i64> {
        loop {
            let mut waiting = self
                .engine
                .docker
                .wait_container(&self.spec.container_id, None);
            // The answer itself is not trusted (Podman and Docker differ
            // on errors); the inspection after it is.
            let _ = waiting.next().await;
            drop(waiting);
            let now = self.inspect().await?;
            if !now.state.running {
                return Some(now.state.exit_code);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The container now; retries while the engine does not answer, `None`
    /// once the container is gone (the task then ends).
    async fn inspect(&self) -> Option<Inspected> {
        loop {
            match self.engine.inspect(&self.spec.container_id).await {
                Ok(found) => return found,
                Err(e) => {
                    tracing::debug!(component = %self.spec.component, error = %e.sentence(),
                        "scheduled job: the engine did not answer; asking again");
                    tokio::time::sleep(ENGINE_RETRY).await;
                }
            }
        }
    }

    fn record(&self, change: impl FnOnce(&mut JobRecord)) {
        let id = &self.spec.container_id;
        self.store.component_mut(&self.spec.component, |r| {
            let job = r.job.get_or_insert_with(|| JobRecord::new(id));
            if job.container_id != *id {
                *job = JobRecord::new(id);
            }
            change(job);
        });
    }
}

/// An engine's exit code as the observation's `i32`.
pub fn exit_code(code: i64) -> i32 {
    i32::try_from(code).unwrap_or(if code < 0 { i32::MIN } else { i32::MAX })
}

/// An engine timestamp; `None` for the zero time engines use for "never".
pub fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    let time = DateTime::parse_from_rfc3339(text).ok()?.with_timezone(&Utc);
    (time.timestamp() > 0).then_some(time)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_times_are_never() {
        assert_eq!(parse_time("0001-01-01T00:00:00Z"), None);
        assert_eq!(parse_time(""), None);
        assert!(parse_time("2026-11-26T13:37:23.867448055Z").is_some());
        assert!(parse_time("2026-11-26T13:37:23.867448055+01:00").is_some());
    }

    #[test]
    fn exit_codes_fit() {
        assert_eq!(exit_code(3), 3);
        assert_eq!(exit_code(i64::MAX), i32::MAX);
    }
}
