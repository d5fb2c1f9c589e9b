//! Log lines streamed from an outpost over its link.
//!
//! A reader (the HTTP handler of `GET …/logs`) asks [`super::Links::open_logs`]
//! for a [`LogStream`]. That hands a [`SessionRequest::Logs`] to the live
//! session of the stage's outpost, which sends [`Message::Logs`] with a fresh
//! id and from then on routes every [`Message::LogLines`] frame with that id
//! into the stream ([`LogRouter`]). When the reader goes away the stream's
//! drop asks the session to send [`Message::LogsCancel`].
//!
//! Memory stays bounded and the session never waits for a reader: each
//! stream has a small bounded queue of batches, the session only ever
//! `try_send`s into it, and a reader that falls that far behind has its
//! request cancelled with [`LogEnd::TooSlow`] instead of holding up the link
//! (which carries the sync of every stage on the outpost). A session takes
//! at most [`MAX_STREAMS_PER_SESSION`] streams at once.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use trellis_link::Message;
use trellis_link::protocol::{LogLine, LogQuery};

/// Log streams one outpost session serves at once.
pub const MAX_STREAMS_PER_SESSION: usize = 32;

/// Batches (frames of lines) queued per stream before the reader counts as
/// too slow. A batch holds at most a few hundred lines or 64 KiB.
pub const STREAM_QUEUE_BATCHES: usize = 32;

/// Requests queued for a session's loop.
pub(crate) const SESSION_QUEUE: usize = 2 * MAX_STREAMS_PER_SESSION;

/// What a reader asks of a live session.
#[derive(Debug)]
pub(crate) enum SessionRequest {
    /// Boxed: every session's queue allocates room for a block of
    /// requests up front, so the enum's size is paid per link, idle or not.
    Logs(Box<LogsRequest>),
    Cancel {
        id: u64,
    },
    /// A stream to open (see [`super::streams`]).
    Stream(Box<super::streams::StreamRequest>),
}

#[derive(Debug)]
pub(crate) struct LogsRequest {
    id: u64,
    project: String,
    stage: String,
    query: LogQuery,
    reader: ReaderEnd,
}

/// The session's side of one stream.
#[derive(Debug)]
pub(crate) struct ReaderEnd {
    lines: mpsc::Sender<Vec<LogLine>>,
    end: oneshot::Sender<LogEnd>,
}

/// How a stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEnd {
    /// The agent sent everything there was (without `follow`).
    Done,
    /// The agent could not serve the request; its words.
    Failed(String),
    /// The reader did not keep up; the request was cancelled.
    TooSlow,
    /// The link to the outpost closed (or was replaced) mid-stream.
    LinkClosed,
}

/// What a [`LogStream`] yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEvent {
    /// Lines in the order the outpost sent them; empty for the agent's
    /// first frame, which says the request is under way.
    Lines(Vec<LogLine>),
    End(LogEnd),
}

/// Why no stream could be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenLogsError {
    /// The outpost has no live session.
    Offline,
    /// The session serves [`MAX_STREAMS_PER_SESSION`] streams already, or its
    /// queue is full.
    Busy,
}

/// A reader's end of one log request. Dropping it before the end cancels
/// the request on the outpost.
#[derive(Debug)]
pub struct LogStream {
    id: u64,
    lines: mpsc::Receiver<Vec<LogLine>>,
    end: Option<oneshot::Receiver<LogEnd>>,
    requests: mpsc::Sender<SessionRequest>,
    finished: bool,
    _permit: OwnedSemaphorePermit,
}

impl LogStream {
    /// Makes the request and its stream; the caller hands the request to
    /// the session.
    pub(crate) fn open(
        id: u64,
        project: &str,
        stage: &str,
        query: LogQuery,
        requests: &mpsc::Sender<SessionRequest>,
        slots: &Arc<Semaphore>,
    ) -> Result<LogStream, OpenLogsError> {
        let permit = slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| OpenLogsError::Busy)?;
        let (lines_tx, lines_rx) = mpsc::channel(STREAM_QUEUE_BATCHES);
        let (end_tx, end_rx) = oneshot::channel();
        let request = SessionRequest::Logs(Box::new(LogsRequest {
            id,
            project: project.to_owned(),
            stage: stage.to_owned(),
            query,
            reader: ReaderEnd {
                lines: lines_tx,
                end: end_tx,
            },
        }));
        requests.try_send(request).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => OpenLogsError::Busy,
            mpsc::error::TrySendError::Closed(_) => OpenLogsError::Offline,
        })?;
        Ok(LogStream {
            id,
            lines: lines_rx,
            end: Some(end_rx),
            requests: requests.clone(),
            finished: false,
            _permit: permit,
        })
    }

    /// The request's id on the link.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The next batch of lines, or how the stream ended (then `None`
    /// forever after). Cancel-safe.
    pub async fn next(&mut self) -> Option<LogEvent> {
        if self.finished {
            return None;
        }
        if let Some(lines) = self.lines.recv().await {
            return Some(LogEvent::Lines(lines));
        }
        // The session dropped its sender: it said how the stream ended, or
        // the session itself is gone.
        let end = match &mut self.end {
            Some(end) => end.await.unwrap_or(LogEnd::LinkClosed),
            None => LogEnd::LinkClosed,
        };
        self.end = None;
        self.finished = true;
        Some(LogEvent::End(end))
    }
}

impl Drop for LogStream {
    fn drop(&mut self) {
        if !self.finished {
            // Best effort: if the queue is full the session still finds out
            // at the next frame for this id (the reader's queue is closed).
            let _ = self
                .requests
                .try_send(SessionRequest::Cancel { id: self.id });
        }
    }
}

/// The session's table of open log requests: id → reader.
#[derive(Debug, Default)]
pub(crate) struct LogRouter {
    readers: HashMap<u64, ReaderEnd>,
}

impl LogRouter {
    /// A reader's request; returns the frame to send to the agent.
    pub(crate) fn request(&mut self, request: SessionRequest) -> Option<Message> {
        match request {
            SessionRequest::Logs(request) => {
                let LogsRequest {
                    id,
                    project,
                    stage,
                    query,
                    reader,
                } = *request;
                if reader.lines.is_closed() {
                    // Gone before the session got to it.
                    return None;
                }
                self.readers.insert(id, reader);
                Some(Message::Logs {
                    id,
                    project,
                    stage,
                    query,
                })
            }
            SessionRequest::Cancel { id } => {
                self.readers.remove(&id).map(|_| Message::LogsCancel { id })
            }
            // The session hands streams to `streams::open`.
            SessionRequest::Stream(_) => None,
        }
    }

    /// A `log-lines` frame from the agent; returns a frame to send back
    /// (a cancel, when the reader is gone or too slow). Frames for ids the
    /// session does not know (cancelled a moment ago) are dropped.
    pub(crate) fn lines(
        &mut self,
        id: u64,
        lines: Vec<LogLine>,
        end: bool,
        error: Option<String>,
    ) -> Option<Message> {
        let reader = self.readers.get(&id)?;
        // An empty frame before the end says the request is under way; an
        // empty last frame carries nothing but the end.
        let sent = if end && lines.is_empty() {
            Ok(())
        } else {
            reader.lines.try_send(lines)
        };
        let blocked = match sent {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(_)) => Some(LogEnd::TooSlow),
            Err(mpsc::error::TrySendError::Closed(_)) => Some(LogEnd::LinkClosed),
        };
        if let Some(why) = blocked {
            let reader = self.readers.remove(&id)?;
            let _ = reader.end.send(why);
            return (!end).then_some(Message::LogsCancel { id });
        }
        if end && let Some(reader) = self.readers.remove(&id) {
            let _ = reader.end.send(match error {
                Some(e) => LogEnd::Failed(e),
                None => LogEnd::Done,
            });
        }
        None
    }

    /// How many requests are open.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.readers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_link::protocol::LogStream as Std;

    fn line(n: usize) -> LogLine {
        LogLine {
            time: chrono::DateTime::from_timestamp(1_700_000_000 + n as i64, 0).unwrap(),
            component: "web".into(),
            replica: 0,
            stream: Std::Stdout,
            line: format!("line {n}"),
        }
    }

    fn open(id: u64, requests: &mpsc::Sender<SessionRequest>, slots: &Arc<Semaphore>) -> LogStream {
        LogStream::open(id, "shop", "dev", LogQuery::default(), requests, slots).unwrap()
    }

    #[tokio::test]
    async fn lines_are_routed_by_id_and_the_end_is_reported() {
        let (tx, mut rx) = mpsc::channel(SESSION_QUEUE);
        let slots = Arc::new(Semaphore::new(4));
        let mut router = LogRouter::default();
        let mut a = open(1, &tx, &slots);
        let mut b = open(2, &tx, &slots);
        for _ in 0..2 {
            let msg = router.request(rx.recv().await.unwrap()).unwrap();
            assert!(matches!(msg, Message::Logs { .. }));
        }
        assert_eq!(router.lines(2, vec![line(1)], false, None), None);
        assert_eq!(router.lines(1, vec![line(2)], true, None), None);
        assert_eq!(
            router.lines(9, vec![line(3)], false, None),
            None,
            "unknown id"
        );
        assert_eq!(a.next().await, Some(LogEvent::Lines(vec![line(2)])));
        assert_eq!(a.next().await, Some(LogEvent::End(LogEnd::Done)));
        assert_eq!(a.next().await, None);
        assert_eq!(b.next().await, Some(LogEvent::Lines(vec![line(1)])));
        assert_eq!(
            router.lines(2, vec![], true, Some("no such container".into())),
            None
        );
        assert_eq!(
            b.next().await,
            Some(LogEvent::End(LogEnd::Failed("no such container".into())))
        );
        assert_eq!(router.len(), 0);
        drop((a, b));
        assert!(rx.try_recv().is_err(), "finished streams cancel nothing");
    }

    #[tokio::test]
    async fn a_dropped_reader_cancels_and_a_slow_one_is_cut_off() {
        let (tx, mut rx) = mpsc::channel(SESSION_QUEUE);
        let slots = Arc::new(Semaphore::new(4));
        let mut router = LogRouter::default();
        let gone = open(1, &tx, &slots);
        let mut slow = open(2, &tx, &slots);
        router.request(rx.recv().await.unwrap());
        router.request(rx.recv().await.unwrap());

        drop(gone);
        let cancel = rx.recv().await.unwrap();
        assert_eq!(router.request(cancel), Some(Message::LogsCancel { id: 1 }));
        assert_eq!(router.lines(1, vec![line(0)], false, None), None);

        for n in 0..STREAM_QUEUE_BATCHES {
            assert_eq!(router.lines(2, vec![line(n)], false, None), None);
        }
        assert_eq!(
            router.lines(2, vec![line(99)], false, None),
            Some(Message::LogsCancel { id: 2 }),
            "the session cancels instead of waiting"
        );
        for n in 0..STREAM_QUEUE_BATCHES {
            assert_eq!(slow.next().await, Some(LogEvent::Lines(vec![line(n)])));
        }
        assert_eq!(slow.next().await, Some(LogEvent::End(LogEnd::TooSlow)));
        assert_eq!(router.len(), 0);
    }

    #[tokio::test]
    async fn streams_are_limited_and_a_gone_session_ends_them() {
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        let slots = Arc::new(Semaphore::new(1));
        let mut first = open(1, &tx, &slots);
        assert_eq!(
            LogStream::open(2, "shop", "dev", LogQuery::default(), &tx, &slots).unwrap_err(),
            OpenLogsError::Busy
        );
        drop(rx);
        assert_eq!(first.next().await, Some(LogEvent::End(LogEnd::LinkClosed)));
        drop(first);
        assert_eq!(
            LogStream::open(3, "shop", "dev", LogQuery::default(), &tx, &slots).unwrap_err(),
            OpenLogsError::Offline
        );
    }
}
