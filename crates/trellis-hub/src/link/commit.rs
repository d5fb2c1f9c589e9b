//! Group commit of what agents acknowledge: delivered revisions and status
//! reports from every link, written to the store together.
//!
//! Each of these is a promise — the hub tells the agent its report is kept
//! (`status-ack`) only after the write is committed — so unlike link
//! bookkeeping ([`super::record`]) they cannot be dropped or merged. But one
//! fsync'd transaction per report caps a fleet at the disk's commit rate:
//! a release pushed to 10,000 stages means 20,000 writes. Here a session
//! queues its write and waits; one writer takes everything queued, commits
//! it in one transaction, and answers each waiter with its own result. A
//! lone write goes out at once, and under load a batch gathers while the
//! previous one commits, so nothing waits on a timer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use trellis_model::StageSync;
use trellis_store::{Store, SyncUpdate};

use super::batch::Batches;

/// The most writes committed in one transaction.
const BATCH: usize = 1000;

/// The most stages [`ReportedStages`] keeps between two looks; past it,
/// the next look reads every stage.
const REPORTED_MOST: usize = 100_000;

type Answer = Result<StageSync, String>;

/// Queued writes, committed by one writer at a time ([`super::batch`]).
pub struct SyncCommitter {
    batches: Arc<Batches<SyncUpdate, Answer>>,
    /// Told after a batch with a status report was committed: the rollout
    /// driver judges a wave as soon as its stages' reports are in, instead
    /// of at its next tick.
    pub reported: Arc<tokio::sync::Notify>,
    /// Which stages those reports were of, while the driver asks.
    pub reported_stages: Arc<ReportedStages>,
}

impl Default for SyncCommitter {
    fn default() -> Self {
        SyncCommitter {
            batches: Arc::new(Batches::new(BATCH, 1)),
            reported: Arc::default(),
            reported_stages: Arc::default(),
        }
    }
}

/// The stages whose status reports this instance committed since the
/// rollout driver last looked, and what each report said, so that a round
/// woken by reports needs to read neither every stage still on its way (a
/// wave of 5,000 read 5,000 every few milliseconds) nor, mostly, those
/// that reported: a report written as sent tells the driver what it would
/// have read ([`Committed`]). Kept only while the driver takes them.
#[derive(Default)]
pub struct ReportedStages(Mutex<Reported>);

/// Stage → what its newest committed report said.
pub type CommittedStages = HashMap<String, Committed>;

#[derive(Default)]
enum Reported {
    /// Nobody looks: nothing is kept.
    #[default]
    Off,
    /// By project.
    Since(HashMap<String, CommittedStages>),
    /// More than [`REPORTED_MOST`] since the last look.
    TooMany,
}

/// What a committed status report says of its stage's releases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// Written as sent, with no failed revision: the stage runs the
    /// revision, and the store holds its newest release at or below it as
    /// applied (the rule of `record_sync_batch`).
    Runs(u64),
    /// A failure, or a report older than the one recorded (not written):
    /// what it means for the stage's releases is read from the store.
    Unclear,
}

impl Committed {
    /// What `update`, answered with `written`, says.
    fn of(update: &SyncUpdate, written: &StageSync) -> Option<Committed> {
        let SyncUpdate::Status {
            applied_revision,
            failed_revision,
            report,
            ..
        } = update
        else {
            return None;
        };
        // A report is written unless the record holds a newer one, whose
        // applied revision is then larger.
        let as_sent = written.applied_revision == *applied_revision;
        let failed = failed_revision.is_some()
            || report.get("state").and_then(|s| s.as_str()) == Some("failed");
        Some(if as_sent && !failed {
            Committed::Runs(*applied_revision)
        } else {
            Committed::Unclear
        })
    }
}

/// What [`ReportedStages::take`] gives.
#[derive(Debug, PartialEq)]
pub enum Reports {
    /// Only these stages (by project) may have reported.
    Stages(HashMap<String, CommittedStages>),
    /// Any stage may have: nothing was kept before this look, or too much.
    Any,
}

impl ReportedStages {
    /// The stages reported since the last call; from now on, reports are
    /// kept until the next call or [`ReportedStages::stop`].
    pub fn take(&self) -> Reports {
        let mut reported = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match std::mem::replace(&mut *reported, Reported::Since(HashMap::new())) {
            Reported::Since(stages) => Reports::Stages(stages),
            Reported::Off | Reported::TooMany => Reports::Any,
        }
    }

    /// Stops keeping reports (and forgets those kept).
    pub fn stop(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Reported::Off;
    }

    /// Keeps what each committed report (`update` and its answer, in the
    /// order committed) says of its stage: the newest wins.
    fn add<'a>(&self, committed: impl Iterator<Item = (&'a SyncUpdate, &'a StageSync)>) {
        let mut reported = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Reported::Since(by_project) = &mut *reported else {
            return;
        };
        for (update, written) in committed {
            let Some(what) = Committed::of(update, written) else {
                continue;
            };
            by_project
                .entry(written.project.clone())
                .or_default()
                .insert(written.stage.clone(), what);
        }
        if by_project.values().map(HashMap::len).sum::<usize>() > REPORTED_MOST {
            *reported = Reported::TooMany;
        }
    }
}

impl SyncCommitter {
    /// Writes `update` with whatever else is queued, and returns once it is
    /// committed (or with what went wrong).
    pub async fn write(&self, store: Arc<dyn Store>, update: SyncUpdate) -> Answer {
        let reported = self.reported.clone();
        let reported_stages = self.reported_stages.clone();
        self.batches
            .call(update, move |updates| {
                let (store, reported, reported_stages) =
                    (store.clone(), reported.clone(), reported_stages.clone());
                async move {
                    let reports = updates
                        .iter()
                        .any(|u| matches!(u, SyncUpdate::Status { .. }));
                    let began = std::time::Instant::now();
                    match store.record_sync_batch(&updates, chrono::Utc::now()).await {
                        Ok(results) => {
                            tracing::debug!(
                                updates = updates.len(),
                                write_ms = began.elapsed().as_secs_f64() * 1e3,
                                "sync writes committed"
                            );
                            if reports {
                                reported_stages.add(
                                    updates
                                        .iter()
                                        .zip(&results)
                                        .filter_map(|(u, r)| Some((u, r.as_ref().ok()?))),
                                );
                                // One permit is kept while nobody waits: a
                                // report committed during a round wakes the
                                // next one.
                                reported.notify_one();
                            }
                            results
                                .into_iter()
                                .map(|r| r.map_err(|e| e.to_string()))
                                .collect()
                        }
                        Err(e) => vec![Err(e.to_string()); updates.len()],
                    }
                }
            })
            .await
            .map_err(|_| "the hub stopped before the write was committed".to_owned())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_store::memory::MemoryStore;

    /// A status report of `project/stage` at `applied` (`failed`: naming
    /// that revision failed), and its answer: the record with `recorded`
    /// as its applied revision.
    fn report(
        project: &str,
        stage: &str,
        applied: u64,
        failed: Option<u64>,
        recorded: u64,
    ) -> (SyncUpdate, StageSync) {
        let update = SyncUpdate::Status {
            project: project.into(),
            stage: stage.into(),
            applied_revision: applied,
            failed_revision: failed,
            report: serde_json::json!({ "state": if failed.is_some() { "failed" } else { "running" } }),
        };
        let written = StageSync {
            project: project.into(),
            stage: stage.into(),
            delivered_revision: applied.max(recorded),
            applied_revision: recorded,
            report: None,
            updated_at: None,
        };
        (update, written)
    }

    fn add(reported: &ReportedStages, reports: &[(SyncUpdate, StageSync)]) {
        reported.add(reports.iter().map(|(u, w)| (u, w)));
    }

    fn stages(facts: &[(&str, &str, Committed)]) -> Reports {
        let mut by_project: HashMap<String, CommittedStages> = HashMap::new();
        for (project, stage, what) in facts {
            by_project
                .entry((*project).into())
                .or_default()
                .insert((*stage).into(), *what);
        }
        Reports::Stages(by_project)
    }

    /// Reports are kept only between two looks: the first look, one after
    /// a stop and one after too many say any stage may have reported.
    #[test]
    fn reported_stages_are_kept_between_looks() {
        let reported = ReportedStages::default();
        add(&reported, &[report("shop", "a", 1, None, 1)]);
        assert_eq!(reported.take(), Reports::Any, "nothing kept before a look");
        assert_eq!(reported.take(), stages(&[]));
        add(
            &reported,
            &[
                report("shop", "a", 3, None, 3),
                report("shop", "b", 2, None, 2),
                report("shop", "a", 4, None, 4),
                report("farm", "a", 1, None, 1),
            ],
        );
        assert_eq!(
            reported.take(),
            stages(&[
                ("shop", "a", Committed::Runs(4)),
                ("shop", "b", Committed::Runs(2)),
                ("farm", "a", Committed::Runs(1)),
            ])
        );
        assert_eq!(reported.take(), stages(&[]), "a look empties it");
        let many: Vec<_> = (0..=REPORTED_MOST)
            .map(|i| report("shop", &format!("s{i}"), 1, None, 1))
            .collect();
        add(&reported, &many);
        assert_eq!(reported.take(), Reports::Any, "too many to keep");
        reported.stop();
        add(&reported, &[report("shop", "a", 1, None, 1)]);
        assert_eq!(reported.take(), Reports::Any, "nothing kept after a stop");
    }

    /// Only a report written as sent and naming no failure says which
    /// release the stage runs; a failure, a late report (the record holds
    /// a newer one) and a delivery leave it to the store, and the newest
    /// report of a stage is what is kept.
    #[test]
    fn only_a_report_written_as_sent_without_failure_says_what_runs() {
        let reported = ReportedStages::default();
        reported.take();
        let delivered = SyncUpdate::Delivered {
            project: "shop".into(),
            stage: "d".into(),
            revision: 5,
        };
        let (_, answer) = report("shop", "d", 0, None, 0);
        add(
            &reported,
            &[
                report("shop", "ok", 7, None, 7),
                report("shop", "failed", 7, Some(8), 7),
                report("shop", "late", 5, None, 7),
                report("shop", "then-failed", 7, None, 7),
                report("shop", "then-failed", 7, Some(8), 7),
                (delivered, answer),
            ],
        );
        assert_eq!(
            reported.take(),
            stages(&[
                ("shop", "ok", Committed::Runs(7)),
                ("shop", "failed", Committed::Unclear),
                ("shop", "late", Committed::Unclear),
                ("shop", "then-failed", Committed::Unclear),
            ])
        );
    }

    /// Writes queued from many tasks at once each get their own answer,
    /// and all of them are in the store when the answers arrive.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_each_get_their_own_committed_result() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        trellis_store::testsuite::seed_stages(store.as_ref(), "shop", 50).await;
        let committer = Arc::new(SyncCommitter::default());
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..50u64 {
            let committer = committer.clone();
            let store = store.clone();
            tasks.spawn(async move {
                let stage = format!("s{i}");
                let synced = committer
                    .write(
                        store.clone(),
                        SyncUpdate::Delivered {
                            project: "shop".into(),
                            stage: stage.clone(),
                            revision: i + 1,
                        },
                    )
                    .await
                    .unwrap();
                assert_eq!(synced.delivered_revision, i + 1);
                let stored = store.get_stage_sync("shop", &stage).await.unwrap();
                assert_eq!(stored.delivered_revision, i + 1);
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
        let missing = committer
            .write(
                store.clone(),
                SyncUpdate::Delivered {
                    project: "shop".into(),
                    stage: "gone".into(),
                    revision: 1,
                },
            )
            .await
            .unwrap_err();
        assert!(missing.contains("shop/gone"), "{missing}");
    }
}
