//! Reads of what outposts should run, gathered from every link into one
//! store read.
//!
//! A push to thousands of stages wakes thousands of sessions at once, and
//! each reads its outpost's stages and their desired state
//! ([`Store::outpost_desired`]): a read transaction of four statements,
//! each a round trip to the database's own thread. At 10,000 outposts those
//! round trips, and the thread switches they cost, were a third of the
//! hub's CPU. Here the sessions' questions are gathered ([`super::batch`])
//! and the store is asked for up to [`BATCH`] outposts at once
//! ([`Store::outposts_desired`]: five statements whatever their number),
//! with a few such reads in flight.

use std::collections::HashMap;
use std::sync::Arc;

use trellis_store::{DesiredAsk, OutpostStage, StageKey, Store};

use super::batch::Batches;

/// The most outposts asked about in one read.
const BATCH: usize = 500;

/// Reads in flight at once. One would serialise every session behind each
/// batch's round trips (6.1–6.3 s against ~5 s for a fan-out to 10,000);
/// a few keep the store's readers busy while a batch gathers for the next.
const READERS: usize = 4;

type Answer = Result<Vec<OutpostStage>, String>;

/// The sessions' queued questions.
pub struct DesiredReads {
    batches: Arc<Batches<DesiredAsk, Answer>>,
}

impl Default for DesiredReads {
    fn default() -> Self {
        DesiredReads {
            batches: Arc::new(Batches::new(BATCH, READERS)),
        }
    }
}

impl DesiredReads {
    /// What [`Store::outpost_desired`] answers for `outpost`, read together
    /// with the other sessions' questions.
    pub async fn read(
        &self,
        store: Arc<dyn Store>,
        outpost: &str,
        held: &HashMap<StageKey, u64>,
    ) -> Answer {
        let ask = DesiredAsk {
            outpost: outpost.to_owned(),
            held: held.clone(),
        };
        self.batches
            .call(ask, move |asks| {
                let store = store.clone();
                async move {
                    match store.outposts_desired(&asks).await {
                        Ok(answers) => answers
                            .into_iter()
                            .map(|a| a.map_err(|e| e.to_string()))
                            .collect(),
                        Err(e) => vec![Err(e.to_string()); asks.len()],
                    }
                }
            })
            .await
            .map_err(|_| "the hub stopped before the outpost's stages were read".to_owned())?
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
        assert_eq!(reads.batches.running(), 0, "the readers stopped once idle");
    }
}
