//! Answering the hub's log requests ([`Message::Logs`]) over the link.
//!
//! Each request gets a task that runs [`StageRunner::logs`] and turns the
//! lines it yields into [`Message::LogLines`] frames: batched (at most
//! [`Batching::max_lines`] lines or [`Batching::max_bytes`] bytes per frame)
//! and flushed at least every [`Batching::flush`], so a followed line
//! reaches the hub well within a second. The first frame goes out after one
//! flush interval even if empty: it tells the hub the request is under way.
//! The last frame has `end: true`, with `error` if the runner failed.
//!
//! The session owns the link, so tasks hand their frames to it through a
//! bounded channel; when the link is slow the runner is slowed down in turn
//! instead of lines piling up. A `logs-cancel` from the hub, or the end of
//! the session, aborts the task — dropping the runner's sink, which is how a
//! following runner learns to stop.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use trellis_link::Message;
use trellis_link::protocol::{LogLine, LogQuery};

use crate::runner::StageRunner;
use crate::state::StageKey;

/// Log requests one session serves at once; more are refused.
pub const MAX_LOG_STREAMS: usize = 32;

/// Lines a runner may be ahead of the frame being built.
const LINE_QUEUE: usize = 1024;

/// A line longer than this is cut (and marked) so that frames stay small.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

const TRUNCATED: &str = " …[line truncated]";

/// How lines become frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    pub max_lines: usize,
    pub max_bytes: usize,
    /// A line waits at most this long for more to share its frame.
    pub flush: Duration,
}

impl Default for Batching {
    fn default() -> Self {
        Batching {
            max_lines: 200,
            max_bytes: 64 * 1024,
            flush: Duration::from_millis(100),
        }
    }
}

/// The session's running log tasks, by request id. Dropping it (the
/// session ended) aborts them all.
#[derive(Debug, Default)]
pub(super) struct LogTasks {
    tasks: HashMap<u64, JoinHandle<()>>,
}

impl LogTasks {
    /// Starts answering request `id`; refuses beyond [`MAX_LOG_STREAMS`].
    pub(super) fn start(
        &mut self,
        id: u64,
        runtime: Arc<dyn StageRunner>,
        stage: StageKey,
        query: LogQuery,
        out: mpsc::Sender<Message>,
    ) -> Result<(), String> {
        self.tasks.retain(|_, task| !task.is_finished());
        if self.tasks.contains_key(&id) {
            return Err(format!("log request {id} is already being answered"));
        }
        if self.tasks.len() >= MAX_LOG_STREAMS {
            return Err(format!(
                "the outpost is already streaming {MAX_LOG_STREAMS} logs, the most it serves at \
                 once; stop one (e.g. a `trellis logs --follow`) and retry"
            ));
        }
        let task = tokio::spawn(forward(runtime, stage, id, query, out, Batching::default()));
        self.tasks.insert(id, task);
        Ok(())
    }

    /// The hub cancelled request `id`; whether it was running.
    pub(super) fn cancel(&mut self, id: u64) -> bool {
        match self.tasks.remove(&id) {
            Some(task) => {
                task.abort();
                true
            }
            None => false,
        }
    }

    /// Request `id` sent its last frame.
    pub(super) fn finished(&mut self, id: u64) {
        self.tasks.remove(&id);
    }
}

impl Drop for LogTasks {
    fn drop(&mut self) {
        for task in self.tasks.values() {
            task.abort();
        }
    }
}

/// Lines collected for the next frame.
#[derive(Default)]
struct Batch {
    lines: Vec<LogLine>,
    bytes: usize,
}

impl Batch {
    fn push(&mut self, mut line: LogLine) {
        if line.line.len() > MAX_LINE_BYTES {
            let mut cut = MAX_LINE_BYTES;
            while !line.line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.line.truncate(cut);
            line.line.push_str(TRUNCATED);
        }
        // Roughly what the line costs as JSON.
        self.bytes += line.line.len() + line.component.len() + 80;
        self.lines.push(line);
    }

    fn is_full(&self, batching: &Batching) -> bool {
        self.lines.len() >= batching.max_lines.max(1) || self.bytes >= batching.max_bytes
    }

    fn take(&mut self) -> Vec<LogLine> {
        self.bytes = 0;
        std::mem::take(&mut self.lines)
    }
}

/// Runs the runner's `logs` for request `id` and sends its lines as frames
/// into `out` until the runner is done (or the task is aborted).
pub async fn forward(
    runtime: Arc<dyn StageRunner>,
    stage: StageKey,
    id: u64,
    query: LogQuery,
    out: mpsc::Sender<Message>,
    batching: Batching,
) {
    let (sink, mut lines) = mpsc::channel::<LogLine>(LINE_QUEUE);
    let producer = runtime.logs(&stage, &query, sink);
    tokio::pin!(producer);
    let frame = |lines: Vec<LogLine>, end: bool, error: Option<String>| Message::LogLines {
        id,
        lines,
        end,
        error,
    };

    let mut result: Option<Result<(), String>> = None;
    let mut batch = Batch::default();
    let mut announced = false;
    let mut flush_at = Instant::now() + batching.flush;
    loop {
        let timer_armed = !announced || !batch.lines.is_empty();
        tokio::select! {
            done = &mut producer, if result.is_none() => {
                result = Some(done);
                // Whatever is queued still comes out of `recv`, then `None`.
                lines.close();
            }
            line = lines.recv() => match line {
                Some(line) => {
                    if batch.lines.is_empty() && announced {
                        flush_at = Instant::now() + batching.flush;
                    }
                    batch.push(line);
                    if batch.is_full(&batching) {
                        if out.send(frame(batch.take(), false, None)).await.is_err() {
                            return;
                        }
                        announced = true;
                        flush_at = Instant::now() + batching.flush;
                    }
                }
                None => {
                    if result.is_none() {
                        // The runner let go of its sink but is not done.
                        result = Some((&mut producer).await);
                    }
                    break;
                }
            },
            () = tokio::time::sleep_until(flush_at), if timer_armed => {
                if out.send(frame(batch.take(), false, None)).await.is_err() {
                    return;
                }
                announced = true;
                flush_at = Instant::now() + batching.flush;
            }
        }
    }
    let error = result.and_then(Result::err);
    if let Some(e) = &error {
        tracing::info!(%stage, id, error = %e, "a log request failed");
    }
    let _ = out.send(frame(batch.take(), true, error)).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use trellis_link::protocol::LogStream;

    fn line(text: String) -> LogLine {
        LogLine {
            time: Utc::now(),
            component: "web".into(),
            replica: 0,
            stream: LogStream::Stdout,
            line: text,
        }
    }

    #[test]
    fn long_lines_are_cut_on_a_character_boundary() {
        let mut batch = Batch::default();
        batch.push(line("é".repeat(MAX_LINE_BYTES)));
        let cut = &batch.lines[0].line;
        assert!(cut.ends_with(TRUNCATED));
        assert!(cut.len() <= MAX_LINE_BYTES + TRUNCATED.len());
        batch.push(line("short".into()));
        assert_eq!(batch.lines[1].line, "short");
    }

    #[test]
    fn a_batch_is_full_by_lines_or_bytes() {
        let batching = Batching {
            max_lines: 3,
            max_bytes: 1000,
            flush: Duration::from_millis(100),
        };
        let mut batch = Batch::default();
        for _ in 0..2 {
            batch.push(line("x".into()));
        }
        assert!(!batch.is_full(&batching));
        batch.push(line("x".into()));
        assert!(batch.is_full(&batching));
        assert_eq!(batch.take().len(), 3);
        batch.push(line("x".repeat(1000)));
        assert!(batch.is_full(&batching));
    }
}
