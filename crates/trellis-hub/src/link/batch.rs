//! Requests from many sessions gathered into batches: each caller queues
//! its request and waits; a runner takes everything queued (up to a
//! batch), handles it in one go and answers each caller with its own
//! answer. A lone request goes out at once, and under load a batch gathers
//! while the ones before it run, so nothing waits on a timer. The group
//! commit of agents' writes ([`super::commit`]) and the gathered reads of
//! outposts' desired state ([`super::reads`]) are two of these.

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// A queue of requests `Q` answered with `A`; see the module docs.
pub struct Batches<Q, A> {
    inner: Mutex<Queue<Q, A>>,
    /// The most requests handled in one batch.
    batch: usize,
    /// Batches in flight at once.
    runners: usize,
}

struct Queue<Q, A> {
    waiting: Vec<(Q, oneshot::Sender<A>)>,
    runners: usize,
}

/// The hub stopped before the request was answered.
#[derive(Debug)]
pub struct Stopped;

impl<Q: Send + 'static, A: Send + 'static> Batches<Q, A> {
    pub fn new(batch: usize, runners: usize) -> Self {
        Batches {
            inner: Mutex::new(Queue {
                waiting: Vec::new(),
                runners: 0,
            }),
            batch: batch.max(1),
            runners: runners.max(1),
        }
    }

    /// Queues `request` and returns its answer. `run` handles a batch: one
    /// answer per request, in order (a batch whose handling failed as a
    /// whole answers each request with that failure). It is called only
    /// when this request starts a runner; otherwise a running one takes
    /// the request.
    pub async fn call<F, Fut>(self: &Arc<Self>, request: Q, run: F) -> Result<A, Stopped>
    where
        F: FnMut(Vec<Q>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<A>> + Send,
    {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut queue = self.lock();
            queue.waiting.push((request, tx));
            let start = queue.runners < self.runners;
            if start {
                queue.runners += 1;
            }
            start
        };
        if start {
            let this = self.clone();
            tokio::spawn(async move { this.run_all(run).await });
        }
        rx.await.map_err(|_| Stopped)
    }

    async fn run_all<F, Fut>(self: Arc<Self>, mut run: F)
    where
        F: FnMut(Vec<Q>) -> Fut,
        Fut: Future<Output = Vec<A>>,
    {
        loop {
            let batch: Vec<(Q, oneshot::Sender<A>)> = {
                let mut queue = self.lock();
                if queue.waiting.is_empty() {
                    queue.runners -= 1;
                    return;
                }
                let take = queue.waiting.len().min(self.batch);
                queue.waiting.drain(..take).collect()
            };
            let (requests, waiters): (Vec<Q>, Vec<oneshot::Sender<A>>) = batch.into_iter().unzip();
            for (waiter, answer) in waiters.into_iter().zip(run(requests).await) {
                let _ = waiter.send(answer);
            }
        }
    }

    /// Runners in flight (for tests).
    #[cfg(test)]
    pub fn running(&self) -> usize {
        self.lock().runners
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue<Q, A>> {
        // A poisoned lock only means a panic mid-push; the queue is usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}
