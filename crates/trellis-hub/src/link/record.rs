//! Writes what link sessions saw (last seen, the agent's hello, why a
//! session ended) to the store in batches, off the session's path.
//!
//! These are bookkeeping, not commitments: the live view answers status
//! queries, and the next hello rewrites them. Written one fsync'd
//! transaction per link-up, they capped how fast a fleet could link after
//! a hub restart at the disk's commit rate (about 45 links a second on the
//! benchmark machine, while sessions queued for the database and agents
//! timed out waiting for their welcome). Batched, a whole burst of link-ups
//! costs one transaction.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use trellis_store::{LinkActivity, Store};

/// Pending activity, merged per outpost, and whether a writer is running.
#[derive(Default)]
pub struct LinkRecorder {
    inner: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    activity: HashMap<String, LinkActivity>,
    writing: bool,
}

/// The most entries written in one transaction.
const BATCH: usize = 2000;

impl LinkRecorder {
    /// Queues `activity`; a writer task writes it (with whatever else is
    /// queued by then) as soon as the store takes it.
    pub fn record(self: &Arc<Self>, store: Arc<dyn Store>, activity: LinkActivity) {
        let start_writer = {
            let mut pending = self.lock();
            match pending.activity.get_mut(&activity.outpost) {
                Some(queued) => queued.merge(activity),
                None => {
                    pending.activity.insert(activity.outpost.clone(), activity);
                }
            }
            !std::mem::replace(&mut pending.writing, true)
        };
        if start_writer {
            let recorder = self.clone();
            tokio::spawn(async move { recorder.write_all(store).await });
        }
    }

    async fn write_all(self: Arc<Self>, store: Arc<dyn Store>) {
        loop {
            let batch: Vec<LinkActivity> = {
                let mut pending = self.lock();
                if pending.activity.is_empty() {
                    pending.writing = false;
                    return;
                }
                let keys: Vec<String> = pending.activity.keys().take(BATCH).cloned().collect();
                keys.iter()
                    .filter_map(|k| pending.activity.remove(k))
                    .collect()
            };
            if let Err(e) = store.record_link_activity(&batch).await {
                tracing::warn!(error = %e, entries = batch.len(), "could not record outpost link activity; the live view still has it, and the next hello records it again");
            }
        }
    }

    /// Entries waiting to be written.
    pub fn pending(&self) -> usize {
        self.lock().activity.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        // A poisoned lock only means a panic mid-insert; the map is usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}
