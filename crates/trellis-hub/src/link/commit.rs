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

use std::sync::Arc;

use trellis_model::StageSync;
use trellis_store::{Store, SyncUpdate};

use super::batch::Batches;

/// The most writes committed in one transaction.
const BATCH: usize = 1000;

type Answer = Result<StageSync, String>;

/// Queued writes, committed by one writer at a time ([`super::batch`]).
pub struct SyncCommitter {
    batches: Arc<Batches<SyncUpdate, Answer>>,
    /// Told after a batch with a status report was committed: the rollout
    /// driver judges a wave as soon as its stages' reports are in, instead
    /// of at its next tick.
    pub reported: Arc<tokio::sync::Notify>,
}

impl Default for SyncCommitter {
    fn default() -> Self {
        SyncCommitter {
            batches: Arc::new(Batches::new(BATCH, 1)),
            reported: Arc::default(),
        }
    }
}

impl SyncCommitter {
    /// Writes `update` with whatever else is queued, and returns once it is
    /// committed (or with what went wrong).
    pub async fn write(&self, store: Arc<dyn Store>, update: SyncUpdate) -> Answer {
        let reported = self.reported.clone();
        self.batches
            .call(update, move |updates| {
                let (store, reported) = (store.clone(), reported.clone());
                async move {
                    let reports = updates
                        .iter()
                        .any(|u| matches!(u, SyncUpdate::Status { .. }));
                    match store.record_sync_batch(&updates, chrono::Utc::now()).await {
                        Ok(results) => {
                            if reports {
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
