//! Uploading a build's chunks: ask the hub which ones it lacks, send only
//! those (a few at a time, each retried on connection errors), and say how
//! much was sent against how much the build holds.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::Mutex;
use trellis_cas::{ChunkStore, Digest};

use crate::client::{ClientError, HubClient};
use crate::output::bytes;

/// Chunk uploads in flight at once.
pub const PARALLEL_UPLOADS: usize = 4;

/// Tries per chunk when the connection fails (the first and two retries).
const ATTEMPTS: u32 = 3;

/// One chunk the build needs on the hub.
#[derive(Debug, Clone)]
pub struct Wanted {
    pub digest: Digest,
    /// Size of its stored (compressed) form: what travels.
    pub stored: u64,
    /// The component whose artifact holds it (the first, when shared), for
    /// messages.
    pub component: String,
}

/// The chunks of a build, each once: every artifact's data chunks, then
/// the artifacts' index chunks (so an index reaches the hub after the
/// chunks it lists).
#[derive(Debug, Default)]
pub struct ChunkList {
    data: Vec<Wanted>,
    indexes: Vec<Wanted>,
    seen: HashSet<Digest>,
}

impl ChunkList {
    /// Adds the chunks of an artifact stored in `store`.
    pub fn add_artifact(
        &mut self,
        store: &ChunkStore,
        component: &str,
        index: &Digest,
        chunks: impl IntoIterator<Item = Digest>,
    ) -> anyhow::Result<()> {
        for digest in chunks {
            if let Some(wanted) = self.wanted(store, component, digest)? {
                self.data.push(wanted);
            }
        }
        if let Some(wanted) = self.wanted(store, component, *index)? {
            self.indexes.push(wanted);
        }
        Ok(())
    }

    fn wanted(
        &mut self,
        store: &ChunkStore,
        component: &str,
        digest: Digest,
    ) -> anyhow::Result<Option<Wanted>> {
        if !self.seen.insert(digest) {
            return Ok(None);
        }
        let stored = store
            .stored_size(&digest)?
            .with_context(|| format!("chunk {digest} is missing from the staging directory"))?;
        Ok(Some(Wanted {
            digest,
            stored,
            component: component.to_owned(),
        }))
    }

    fn all(&self) -> impl Iterator<Item = &Wanted> {
        self.data.iter().chain(&self.indexes)
    }
}

/// What an upload moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Stored bytes sent.
    pub uploaded: u64,
    /// Stored bytes of all the build's distinct chunks.
    pub total: u64,
    pub chunks_uploaded: usize,
    pub chunks_total: usize,
}

impl Summary {
    /// `uploaded 3.1 MiB of 412.0 MiB; 99.2% already on hub`. The share is
    /// rounded down, so 100.0% means nothing was sent.
    pub fn line(&self) -> String {
        let kept = u128::from(self.total - self.uploaded.min(self.total));
        let share = (kept * 1000)
            .checked_div(u128::from(self.total))
            .unwrap_or(1000);
        format!(
            "uploaded {} of {}; {}.{}% already on hub",
            bytes(self.uploaded),
            bytes(self.total),
            share / 10,
            share % 10
        )
    }
}

/// Uploads the chunks of `list` the hub lacks from `store`. Shows a
/// progress bar on stderr when `progress` (indicatif draws nothing when
/// stderr is not a terminal).
pub async fn upload(
    client: &HubClient,
    store: &ChunkStore,
    list: &ChunkList,
    progress: bool,
) -> anyhow::Result<Summary> {
    let digests: Vec<String> = list.all().map(|w| w.digest.as_hex()).collect();
    let total: u64 = list.all().map(|w| w.stored).sum();
    let missing = retrying(|| client.missing_chunks(&digests))
        .await
        .context("asking the hub which of the build's chunks it lacks; nothing was recorded")?;
    let missing: HashSet<String> = missing.into_iter().collect();
    let queue: VecDeque<Wanted> = list
        .all()
        .filter(|w| missing.contains(&w.digest.as_hex()))
        .cloned()
        .collect();
    let to_send: u64 = queue.iter().map(|w| w.stored).sum();
    let count = queue.len();

    let bar = if progress {
        ProgressBar::with_draw_target(Some(to_send), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "uploading {binary_bytes}/{binary_total_bytes} [{bar:30}] {binary_bytes_per_sec}, ETA {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );

    let queue = Arc::new(Mutex::new(queue));
    let sent = Arc::new(AtomicU64::new(0));
    let sent_chunks = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..PARALLEL_UPLOADS.min(count) {
        let (client, store, queue, bar) =
            (client.clone(), store.clone(), queue.clone(), bar.clone());
        let (sent, sent_chunks) = (sent.clone(), sent_chunks.clone());
        workers.spawn(async move {
            loop {
                let Some(chunk) = queue.lock().await.pop_front() else {
                    return Ok::<(), anyhow::Error>(());
                };
                send(&client, &store, &chunk).await?;
                sent.fetch_add(chunk.stored, Ordering::Relaxed);
                sent_chunks.fetch_add(1, Ordering::Relaxed);
                bar.inc(chunk.stored);
            }
        });
    }
    // The first failure stops the others; their cancellation is not news.
    let mut failure = None;
    while let Some(joined) = workers.join_next().await {
        let result = match joined {
            Ok(result) => result,
            Err(e) if e.is_cancelled() => continue,
            Err(e) => Err(anyhow::anyhow!("an upload task failed: {e}")),
        };
        if let Err(e) = result
            && failure.is_none()
        {
            failure = Some(e);
            workers.abort_all();
        }
    }
    bar.finish_and_clear();
    let summary = Summary {
        uploaded: sent.load(Ordering::Relaxed),
        total,
        chunks_uploaded: sent_chunks.load(Ordering::Relaxed),
        chunks_total: list.all().count(),
    };
    if let Some(e) = failure {
        return Err(e.context(format!(
            "uploading the build's chunks to the hub stopped after {} of the {count} it lacked \
             ({} of {}); no build was recorded. Chunks already uploaded stay on the hub: pushing \
             again sends only what is still missing",
            summary.chunks_uploaded,
            bytes(summary.uploaded),
            bytes(to_send)
        )));
    }
    Ok(summary)
}

/// Sends one chunk's stored form.
async fn send(client: &HubClient, store: &ChunkStore, chunk: &Wanted) -> anyhow::Result<()> {
    let path = store.path(&chunk.digest);
    let data = tokio::fs::read(&path)
        .await
        .with_context(|| format!("reading staged chunk {}", path.display()))?;
    let digest = chunk.digest.as_hex();
    retrying(|| client.put_chunk(&digest, data.clone()))
        .await
        .with_context(|| {
            format!(
                "chunk {} of component {:?} was not uploaded",
                crate::output::short(&chunk.digest.as_hex()),
                chunk.component
            )
        })?;
    Ok(())
}

/// Runs `request`, again after a pause when the connection failed (or the
/// hub said it is briefly unavailable), up to [`ATTEMPTS`] times. A hub
/// that answered with an error is not asked again.
async fn retrying<T, F, Fut>(mut request: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let mut attempt = 1;
    loop {
        match request().await {
            Err(ClientError::Transport { .. } | ClientError::Unavailable { .. })
                if attempt < ATTEMPTS =>
            {
                tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_line_rounds_the_share_down() {
        let line = |uploaded, total| {
            Summary {
                uploaded,
                total,
                chunks_uploaded: 0,
                chunks_total: 0,
            }
            .line()
        };
        assert_eq!(
            line(0, 412 * 1024 * 1024),
            "uploaded 0 B of 412.0 MiB; 100.0% already on hub"
        );
        assert_eq!(
            line(1, 1_000_000),
            "uploaded 1 B of 976.6 KiB; 99.9% already on hub"
        );
        assert_eq!(
            line(100, 100),
            "uploaded 100 B of 100 B; 0.0% already on hub"
        );
        assert_eq!(
            line(3_250_586, 432_013_312),
            "uploaded 3.1 MiB of 412.0 MiB; 99.2% already on hub"
        );
    }
}
