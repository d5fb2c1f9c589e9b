//! Reads of what outposts should run, gathered from every link into one
//! store read.
//!
//! A push to thousands of stages wakes thousands of sessions at once, and
//! each reads its outpost's stages and their desired state
//! ([`Store::outpost_desired`]): a read transaction of four statements,
//! each a round trip to the database's own thread. At 10,000 outposts those
//! round trips, and the thread switches they cost, were a third of the
//! hub's CPU. Here a session queues its question and waits; one reader
//! takes everything queued and asks the store once
//! ([`Store::outposts_desired`]: five statements whatever their number),
//! then answers each session. A lone read goes out at once, and under load
//! a batch gathers while the previous one runs, so nothing waits on a
//! timer — as the group commit of [`super::commit`] does for writes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use trellis_store::{DesiredAsk, OutpostStage, StageKey, Store};

/// The most outposts asked about in one read.
const BATCH: usize = 500;

/// Reads in flight at once. One would serialise every session behind each
/// batch's round trips; a few keep the store's readers busy while a batch
/// gathers for the next.
const READERS: usize = 4;

type Waiter = oneshot::Sender<Result<Vec<OutpostStage>, String>>;

/// Queued questions, and how many readers run.
#[derive(Default)]
pub struct DesiredReads {
    inner: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    asks: Vec<(DesiredAsk, Waiter)>,
    readers: usize,
}

impl DesiredReads {
    /// What [`Store::outpost_desired`] answers for `outpost`, read together
    /// with the other sessions' questions.
    pub async fn read(
        self: &Arc<Self>,
        store: Arc<dyn Store>,
        outpost: &str,
        held: &HashMap<StageKey, u64>,
    ) -> Result<Vec<OutpostStage>, String> {
        let (tx, rx) = oneshot::channel();
        let start_reader = {
            let mut queue = self.lock();
            queue.asks.push((
                DesiredAsk {
                    outpost: outpost.to_owned(),
                    held: held.clone(),
                },
                tx,
            ));
            let start = queue.readers < READERS;
            if start {
                queue.readers += 1;
            }
            start
        };
        if start_reader {
            let reads = self.clone();
            tokio::spawn(async move { reads.read_all(store).await });
        }
        rx.await
            .map_err(|_| "the hub stopped before the outpost's stages were read".to_owned())?
    }

    async fn read_all(self: Arc<Self>, store: Arc<dyn Store>) {
        loop {
            let batch: Vec<(DesiredAsk, Waiter)> = {
                let mut queue = self.lock();
                if queue.asks.is_empty() {
                    queue.readers -= 1;
                    return;
                }
                let take = queue.asks.len().min(BATCH);
                queue.asks.drain(..take).collect()
            };
            let (asks, waiters): (Vec<DesiredAsk>, Vec<Waiter>) = batch.into_iter().unzip();
            match store.outposts_desired(&asks).await {
                Ok(answers) => {
                    for (waiter, answer) in waiters.into_iter().zip(answers) {
                        let _ = waiter.send(answer.map_err(|e| e.to_string()));
                    }
                }
                Err(e) => {
                    let message = e.to_string();
                    for waiter in waiters {
                        let _ = waiter.send(Err(message.clone()));
                    }
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // A poisoned lock only means a panic mid-push; the queue is usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_store::memory::MemoryStore;

    /// Questions asked from many tasks at once each get their own answer,
    /// an unknown outpost's error included.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_reads_each_get_their_own_answer() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        trellis_store::testsuite::seed_stages(store.as_ref(), "shop", 3).await;
        let stage_outpost = store.get_stage("shop", "s0").await.unwrap().outpost;
        let reads = Arc::new(DesiredReads::default());
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..50 {
            let (store, reads) = (store.clone(), reads.clone());
            let outpost = if i % 2 == 0 {
                stage_outpost.clone()
            } else {
                "nowhere".to_owned()
            };
            tasks.spawn(async move { (i, reads.read(store, &outpost, &HashMap::new()).await) });
        }
        while let Some(done) = tasks.join_next().await {
            let (i, answer) = done.unwrap();
            if i % 2 == 0 {
                let names: Vec<String> =
                    answer.unwrap().into_iter().map(|s| s.stage.name).collect();
                assert_eq!(names, ["s0", "s1", "s2"], "{i}");
            } else {
                let error = answer.unwrap_err();
                assert!(error.contains("nowhere"), "{i}: {error}");
            }
        }
        assert_eq!(reads.lock().readers, 0, "the readers stopped once idle");
    }
}
