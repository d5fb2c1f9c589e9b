//! Streams multiplexed on a link: an exec's stdin/stdout/stderr or a
//! forwarded TCP connection, many at once, beside the link's sync.
//!
//! Each side's session keeps a [`Mux`]: the table of its open streams. The
//! work of a stream (a command on the outpost, a client on the hub) runs in
//! its own task with a [`StreamHandle`], split into a [`StreamReader`] and
//! a [`StreamWriter`]; the session moves frames between the link and those
//! tasks and never waits for one.
//!
//! **Flow control.** Each direction of a stream has a window: the sender
//! may have at most that many bytes sent and not yet consumed by the
//! receiving task; the receiver grants credit ([`Message::StreamCredit`])
//! as its task consumes — in batches of a quarter window, so a bulk
//! transfer costs one small frame per quarter. A stream's task whose peer
//! stops reading therefore stops after one window, and the memory a stream
//! holds on either side is bounded by its window. A peer that sends beyond
//! the window, or grants more credit than was sent, has the stream closed
//! with an error.
//!
//! **Window growth.** A window starts at [`WINDOW_BYTES`] and doubles, up to
//! [`MAX_WINDOW_BYTES`], each time the receiving task consumed all of it
//! within [`GROW_WITHIN`]: only a stream whose link and consumer are fast
//! gets the larger window, which then fills the link without waiting on
//! every credit's round trip (a forwarded download on loopback moved
//! 11–26% more with it, for less CPU per byte: fewer stalls, fewer
//! wake-ups; BENCHMARKS.md, streams). On a slow link a window never grows, so what it lets be in
//! flight ahead of a control frame stays what it was; on a fast one it
//! drains within about twice [`GROW_WITHIN`]. The windows of one side's
//! streams grow to [`LINK_WINDOW_BUDGET`] together at most, so the memory
//! a link's streams can hold is no more than before growth existed. The
//! growth rides on a credit frame (`grow`); a peer that predates it ignores
//! the field and keeps sending within the window it knew.
//!
//! **Priority.** Stream data is cut into chunks of at most
//! [`CHUNK_BYTES`] and queued for the session, which takes the next one
//! only when nothing else of the link is ready to go: [`Mux::next_outgoing`]
//! yields once before it looks at its queue, so in a `select!` every other
//! branch that is ready (a sync, a status report, a heartbeat) wins over
//! it. A control frame therefore waits behind at most one chunk written by
//! this side, plus what the open streams' windows allow in flight.
//!
//! **Ends.** A stream ends when either side sends
//! [`Message::StreamClose`] (a task's writer sends one when it is closed or
//! dropped), and for every stream at once when the session ends (the link
//! closed, broke, or the outpost was revoked): dropping the [`Mux`] ends
//! every task's [`StreamReader::recv`] with `None` and fails its writes.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{Semaphore, mpsc};

use crate::protocol::{Message, StreamChannel, StreamError};

/// The most bytes one data frame carries: bounds how long a control frame
/// can wait behind stream data this side writes (128 KiB take well under a
/// millisecond through TLS on a link that is not slower than the stream
/// itself). Each frame costs a fixed amount on every hop — a WebSocket
/// frame, a trip through the session, a wake-up of the stream's task — so
/// bulk streams want few, large ones: at 32 KiB, that per-frame cost was
/// most of a forwarded connection's CPU.
pub const CHUNK_BYTES: usize = 128 * 1024;

/// The window each direction of a stream starts with: four chunks, so a
/// sender has the next three on their way while the receiver hands one on.
/// It bounds what a stream holds on the receiving side until it grows.
pub const WINDOW_BYTES: u32 = 512 * 1024;

/// The most a stream's window grows to (see the module docs), and the most
/// send credit this side takes from a peer's window: the size of an
/// OpenSSH channel's window, for the same job.
pub const MAX_WINDOW_BYTES: u32 = 2 * 1024 * 1024;

/// A window doubles when the receiving task consumed all of it within this
/// long: the stream then moves at least [`WINDOW_BYTES`] per 20 ms (25
/// MiB/s) at first, more for each doubling.
pub const GROW_WITHIN: Duration = Duration::from_millis(20);

/// The receive windows of one side's open streams grow to at most this
/// many bytes together (64 streams at [`WINDOW_BYTES`] hold 32 MiB; growth
/// never adds to that).
pub const LINK_WINDOW_BUDGET: u64 = 16 * 1024 * 1024;

/// Data frames (and ordered ends) the tasks of one session may have queued
/// for it: with [`CHUNK_BYTES`] a bound of 1 MiB, whatever the windows.
const DATA_QUEUE: usize = 8;

/// What a stream's task receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// The peer accepted the stream (hub side: the agent's
    /// [`Message::StreamOpened`]).
    Opened,
    /// Bytes; hand them on, then call [`StreamReader::consumed`].
    Data {
        channel: StreamChannel,
        bytes: Bytes,
    },
    /// The peer sends no more data.
    Eof,
    /// The terminal changed size (agent side).
    Resize { cols: u16, rows: u16 },
    /// The peer ended the stream.
    Closed {
        exit_code: Option<i32>,
        error: Option<StreamError>,
    },
}

/// The stream is gone (closed by the peer, or the link ended).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the stream is closed")]
pub struct StreamGone;

/// One side's table of open streams; see the module docs.
#[derive(Debug)]
pub struct Mux {
    entries: HashMap<u64, Entry>,
    data_tx: mpsc::Sender<Message>,
    data_rx: mpsc::Receiver<Message>,
    ctl_tx: mpsc::UnboundedSender<Message>,
    ctl_rx: mpsc::UnboundedReceiver<Message>,
}

#[derive(Debug)]
struct Entry {
    to_task: mpsc::UnboundedSender<Inbound>,
    /// How much the peer may send before this side grants more; the task's
    /// reader sizes its credit batches by it.
    window: Arc<AtomicU32>,
    /// Bytes received and not yet credited back.
    uncredited: u64,
    /// When the window's current round began, and what was credited since:
    /// a whole window credited within [`GROW_WITHIN`] grows it.
    round_started: Instant,
    round_credited: u64,
    /// Bytes this side sent that the peer has not credited back yet.
    in_flight: u64,
    /// The peer's window as this side knows it: what it announced, plus its
    /// growth; at most [`MAX_WINDOW_BYTES`].
    peer_window: u32,
    /// What this side's task may still send.
    credit: Arc<Semaphore>,
    eof_received: bool,
}

impl Entry {
    fn window(&self) -> u32 {
        self.window.load(Ordering::Relaxed)
    }

    /// `bytes` are credited to the peer: by how much the window grows with
    /// them (`budget`: what the link's windows may still grow together).
    fn grow_with(&mut self, bytes: u32, now: Instant, budget: u64) -> Option<u32> {
        self.round_credited += u64::from(bytes);
        let window = self.window();
        if self.round_credited < u64::from(window) {
            return None;
        }
        let fast = now.duration_since(self.round_started) < GROW_WITHIN;
        self.round_started = now;
        self.round_credited = 0;
        let grow = window.min(MAX_WINDOW_BYTES.saturating_sub(window));
        if !fast || grow == 0 || u64::from(grow) > budget {
            return None;
        }
        self.window.store(window + grow, Ordering::Relaxed);
        Some(grow)
    }

    /// Takes `bytes` of the peer's window (announced or grown) as send
    /// credit, up to [`MAX_WINDOW_BYTES`] in all.
    fn take_peer_window(&mut self, bytes: u32) {
        let bytes = bytes.min(MAX_WINDOW_BYTES - self.peer_window);
        self.peer_window += bytes;
        self.credit.add_permits(bytes as usize);
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        // Wakes a writer waiting for credit: the stream is gone.
        self.credit.close();
    }
}

impl Default for Mux {
    fn default() -> Self {
        Self::new()
    }
}

impl Mux {
    pub fn new() -> Self {
        let (data_tx, data_rx) = mpsc::channel(DATA_QUEUE);
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        Mux {
            entries: HashMap::new(),
            data_tx,
            data_rx,
            ctl_tx,
            ctl_rx,
        }
    }

    /// How many streams are open.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, id: u64) -> bool {
        self.entries.contains_key(&id)
    }

    /// Adds stream `id`: the peer may send `window` bytes before this side
    /// grants more; this side may send `send_credit` bytes (the peer's
    /// window; 0 until the peer says how much, with
    /// [`Message::StreamOpened`]), at most [`MAX_WINDOW_BYTES`].
    pub fn register(&mut self, id: u64, window: u32, send_credit: u32) -> StreamHandle {
        let (to_task, inbound) = mpsc::unbounded_channel();
        let credit = Arc::new(Semaphore::new(0));
        let window = Arc::new(AtomicU32::new(window));
        let mut entry = Entry {
            to_task,
            window: window.clone(),
            uncredited: 0,
            round_started: Instant::now(),
            round_credited: 0,
            in_flight: 0,
            peer_window: 0,
            credit: credit.clone(),
            eof_received: false,
        };
        entry.take_peer_window(send_credit);
        self.entries.insert(id, entry);
        StreamHandle {
            reader: StreamReader {
                id,
                inbound,
                ctl: self.ctl_tx.clone(),
                window,
                consumed: 0,
            },
            writer: StreamWriter {
                id,
                data: self.data_tx.clone(),
                ctl: self.ctl_tx.clone(),
                credit,
                closed: false,
            },
        }
    }

    /// Ends stream `id` from this side (e.g. the session refuses it): the
    /// task hears `Closed` with `error`; returns the frame for the peer.
    pub fn close(&mut self, id: u64, error: StreamError) -> Option<Message> {
        let entry = self.entries.remove(&id)?;
        let _ = entry.to_task.send(Inbound::Closed {
            exit_code: None,
            error: Some(error.clone()),
        });
        Some(Message::StreamClose {
            id,
            exit_code: None,
            error: Some(error),
        })
    }

    /// A stream frame from the peer; returns a frame to send back (a close,
    /// when the peer broke the stream's rules). Frames of streams this side
    /// does not know (closed a moment ago) are dropped.
    pub fn incoming(&mut self, msg: Message) -> Option<Message> {
        match msg {
            Message::StreamOpened { id, window } => {
                let entry = self.entries.get_mut(&id)?;
                entry.take_peer_window(window);
                let _ = entry.to_task.send(Inbound::Opened);
                None
            }
            Message::StreamData { id, channel, data } => {
                let entry = self.entries.get_mut(&id)?;
                entry.uncredited += data.len() as u64;
                let window = entry.window();
                if entry.uncredited > u64::from(window) || entry.eof_received {
                    return self.close(
                        id,
                        protocol_error(
                            "stream-window-exceeded",
                            format!(
                                "the peer sent more data on stream {id} than its window of \
                                 {window} bytes allows"
                            ),
                        ),
                    );
                }
                if entry
                    .to_task
                    .send(Inbound::Data {
                        channel,
                        bytes: data,
                    })
                    .is_err()
                {
                    // Its task is gone without closing (it panicked).
                    return self.close(id, protocol_error("stream-ended", "the stream ended"));
                }
                None
            }
            Message::StreamCredit { id, bytes, grow } => {
                let entry = self.entries.get_mut(&id)?;
                let bytes = u64::from(bytes);
                if bytes > entry.in_flight {
                    return self.close(
                        id,
                        protocol_error(
                            "stream-credit-invalid",
                            format!(
                                "the peer granted {bytes} bytes of credit on stream {id}, more \
                                 than was sent"
                            ),
                        ),
                    );
                }
                entry.in_flight -= bytes;
                entry.credit.add_permits(bytes as usize);
                if let Some(grow) = grow {
                    entry.take_peer_window(grow);
                }
                None
            }
            Message::StreamEof { id } => {
                let entry = self.entries.get_mut(&id)?;
                if !entry.eof_received {
                    entry.eof_received = true;
                    let _ = entry.to_task.send(Inbound::Eof);
                }
                None
            }
            Message::StreamResize { id, cols, rows } => {
                let entry = self.entries.get(&id)?;
                let _ = entry.to_task.send(Inbound::Resize { cols, rows });
                None
            }
            Message::StreamClose {
                id,
                exit_code,
                error,
            } => {
                let entry = self.entries.remove(&id)?;
                let _ = entry.to_task.send(Inbound::Closed { exit_code, error });
                None
            }
            _ => None,
        }
    }

    /// The next frame the tasks want sent, after the bookkeeping it needs.
    /// Yields once first, so that in a `select!` any other branch that is
    /// ready goes before stream data. Cancel-safe.
    pub async fn next_outgoing(&mut self) -> Message {
        tokio::task::yield_now().await;
        loop {
            // Credit and dropped streams' ends first: they are small and
            // let data flow; then data and ordered ends.
            let msg = tokio::select! {
                biased;
                Some(msg) = self.ctl_rx.recv() => msg,
                Some(msg) = self.data_rx.recv() => msg,
            };
            if let Some(msg) = self.outgoing(msg) {
                return msg;
            }
        }
    }

    /// Bookkeeping of a frame on its way out; `None`: it is not to be sent
    /// (its stream is gone already). A credit may grow its stream's window.
    fn outgoing(&mut self, mut msg: Message) -> Option<Message> {
        match &mut msg {
            Message::StreamData { id, data, .. } => {
                let entry = self.entries.get_mut(id)?;
                entry.in_flight += data.len() as u64;
            }
            Message::StreamCredit { id, bytes, grow } => {
                let windows: u64 = self.entries.values().map(|e| u64::from(e.window())).sum();
                let entry = self.entries.get_mut(id)?;
                entry.uncredited = entry.uncredited.saturating_sub(u64::from(*bytes));
                *grow = entry.grow_with(
                    *bytes,
                    Instant::now(),
                    LINK_WINDOW_BUDGET.saturating_sub(windows),
                );
            }
            Message::StreamClose { id, .. } => {
                self.entries.remove(id)?;
            }
            Message::StreamEof { id }
            | Message::StreamOpened { id, .. }
            | Message::StreamResize { id, .. }
                if !self.entries.contains_key(id) =>
            {
                return None;
            }
            _ => {}
        }
        Some(msg)
    }
}

/// [`Mux::next_outgoing`] of a table that may not exist yet (sessions make
/// theirs with the first stream, so an idle link holds none): pending
/// forever without one.
pub async fn next_outgoing(mux: &mut Option<Box<Mux>>) -> Message {
    match mux {
        Some(mux) => mux.next_outgoing().await,
        None => std::future::pending().await,
    }
}

fn protocol_error(code: &str, message: impl Into<String>) -> StreamError {
    StreamError {
        code: code.into(),
        message: message.into(),
        hint: None,
    }
}

/// A stream's task's end of it.
#[derive(Debug)]
pub struct StreamHandle {
    pub reader: StreamReader,
    pub writer: StreamWriter,
}

impl StreamHandle {
    pub fn id(&self) -> u64 {
        self.writer.id
    }
}

/// What a stream's task receives.
#[derive(Debug)]
pub struct StreamReader {
    id: u64,
    inbound: mpsc::UnboundedReceiver<Inbound>,
    ctl: mpsc::UnboundedSender<Message>,
    /// The stream's receive window, grown by the session's table.
    window: Arc<AtomicU32>,
    consumed: u32,
}

impl StreamReader {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The next thing from the peer; `None` once the link has ended (no
    /// `Closed` came). Cancel-safe.
    pub async fn recv(&mut self) -> Option<Inbound> {
        self.inbound.recv().await
    }

    /// `n` bytes of received data were handed on: the peer may send as
    /// much more. Granted in batches of a quarter window.
    pub fn consumed(&mut self, n: usize) {
        self.consumed = self
            .consumed
            .saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
        if self.consumed >= (self.window.load(Ordering::Relaxed) / 4).max(1) {
            let bytes = std::mem::take(&mut self.consumed);
            let _ = self.ctl.send(Message::StreamCredit {
                id: self.id,
                bytes,
                grow: None,
            });
        }
    }
}

/// What a stream's task sends. Dropping it without [`StreamWriter::close`]
/// closes the stream with an error.
#[derive(Debug)]
pub struct StreamWriter {
    id: u64,
    data: mpsc::Sender<Message>,
    ctl: mpsc::UnboundedSender<Message>,
    credit: Arc<Semaphore>,
    closed: bool,
}

impl StreamWriter {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Sends `bytes` on `channel`, in chunks, each once the peer's window
    /// has room for it.
    pub async fn send(&mut self, channel: StreamChannel, bytes: &[u8]) -> Result<(), StreamGone> {
        self.send_bytes(channel, Bytes::copy_from_slice(bytes))
            .await
    }

    /// [`StreamWriter::send`] of bytes the caller owns already: cut into
    /// chunks without copying them.
    pub async fn send_bytes(
        &mut self,
        channel: StreamChannel,
        mut bytes: Bytes,
    ) -> Result<(), StreamGone> {
        while !bytes.is_empty() {
            self.send_chunk(channel, &mut bytes).await?;
        }
        Ok(())
    }

    /// Sends the front of `bytes`: at most a chunk, and no more than the
    /// peer's window has room for. It waits for room for one byte, then
    /// takes what there is, so a peer whose window is smaller than a chunk
    /// still gets data.
    async fn send_chunk(
        &mut self,
        channel: StreamChannel,
        bytes: &mut Bytes,
    ) -> Result<(), StreamGone> {
        let want = bytes.len().min(CHUNK_BYTES);
        self.credit
            .acquire()
            .await
            .map_err(|_| StreamGone)?
            .forget();
        // This task is the only one taking permits, so what is available
        // now stays available.
        let more = self.credit.available_permits().min(want - 1);
        if more > 0 {
            self.credit
                .try_acquire_many(u32::try_from(more).map_err(|_| StreamGone)?)
                .map_err(|_| StreamGone)?
                .forget();
        }
        let data = bytes.split_to(1 + more);
        self.data
            .send(Message::StreamData {
                id: self.id,
                channel,
                data,
            })
            .await
            .map_err(|_| StreamGone)
    }

    /// Sends a stream frame in order with the data (`stream-opened`,
    /// `stream-eof`, `stream-resize`).
    pub async fn send_message(&mut self, msg: Message) -> Result<(), StreamGone> {
        self.data.send(msg).await.map_err(|_| StreamGone)
    }

    /// No more data from this side.
    pub async fn eof(&mut self) -> Result<(), StreamGone> {
        self.send_message(Message::StreamEof { id: self.id }).await
    }

    /// Ends the stream after the data sent so far.
    pub async fn close(mut self, exit_code: Option<i32>, error: Option<StreamError>) {
        self.closed = true;
        let _ = self
            .data
            .send(Message::StreamClose {
                id: self.id,
                exit_code,
                error,
            })
            .await;
    }
}

impl Drop for StreamWriter {
    fn drop(&mut self) {
        if !self.closed {
            let _ = self.ctl.send(Message::StreamClose {
                id: self.id,
                exit_code: None,
                error: Some(protocol_error(
                    "stream-ended",
                    "the other end of the stream went away",
                )),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn out(mux: &mut Mux) -> Message {
        tokio::time::timeout(std::time::Duration::from_secs(1), mux.next_outgoing())
            .await
            .expect("a frame to send")
    }

    #[tokio::test]
    async fn data_waits_for_credit_and_credit_follows_consumption() {
        let mut a = Mux::new();
        let mut b = Mux::new();
        let StreamHandle {
            reader: _ra,
            writer: mut wa,
        } = a.register(1, 64 * 1024, 0);
        let StreamHandle {
            reader: mut rb,
            writer: _wb,
        } = b.register(1, 64 * 1024, 64 * 1024);
        // No credit yet on a's side: the send waits.
        let sender = tokio::spawn(async move {
            wa.send(StreamChannel::Out, &vec![7u8; 100 * 1024])
                .await
                .unwrap();
            wa
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!sender.is_finished());
        assert_eq!(
            a.incoming(Message::StreamOpened {
                id: 1,
                window: 64 * 1024
            }),
            None
        );
        let mut received = 0;
        while received < 64 * 1024 {
            let msg = out(&mut a).await;
            assert!(b.incoming(msg).is_none());
            match rb.recv().await.unwrap() {
                Inbound::Data { bytes, .. } => {
                    assert!(bytes.len() <= CHUNK_BYTES);
                    received += bytes.len();
                    rb.consumed(bytes.len());
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(received, 64 * 1024, "one window, then the sender waits");
        // Credits flow back; the rest follows.
        while received < 100 * 1024 {
            tokio::select! {
                msg = b.next_outgoing() => { assert!(a.incoming(msg).is_none()); }
                msg = a.next_outgoing() => {
                    assert!(b.incoming(msg).is_none());
                    if let Some(Inbound::Data { bytes, .. }) = rb.recv().await {
                        received += bytes.len();
                        rb.consumed(bytes.len());
                    }
                }
            }
        }
        let wa = sender.await.unwrap();
        wa.close(Some(3), None).await;
        let close = out(&mut a).await;
        assert!(matches!(
            close,
            Message::StreamClose {
                exit_code: Some(3),
                ..
            }
        ));
        assert!(a.is_empty());
        b.incoming(close);
        assert_eq!(
            rb.recv().await,
            Some(Inbound::Closed {
                exit_code: Some(3),
                error: None
            })
        );
        assert!(b.is_empty());
    }

    #[tokio::test]
    async fn a_peer_overrunning_its_window_or_crediting_too_much_is_cut_off() {
        let mut a = Mux::new();
        let mut h = a.register(5, 10, 0);
        let reply = a.incoming(Message::StreamData {
            id: 5,
            channel: StreamChannel::In,
            data: vec![0; 11].into(),
        });
        assert!(matches!(reply, Some(Message::StreamClose { id: 5, .. })));
        assert!(matches!(
            h.reader.recv().await,
            Some(Inbound::Closed { error: Some(e), .. }) if e.code == "stream-window-exceeded"
        ));
        assert!(
            h.writer.send(StreamChannel::Out, b"x").await.is_err(),
            "writes fail once closed"
        );

        let mut h = a.register(6, 10, 0);
        let reply = a.incoming(Message::StreamCredit {
            id: 6,
            bytes: 1,
            grow: None,
        });
        assert!(matches!(reply, Some(Message::StreamClose { id: 6, .. })));
        assert!(matches!(
            h.reader.recv().await,
            Some(Inbound::Closed { error: Some(e), .. }) if e.code == "stream-credit-invalid"
        ));
        assert_eq!(
            a.incoming(Message::StreamEof { id: 99 }),
            None,
            "unknown ids are dropped"
        );
    }

    #[tokio::test]
    async fn a_dropped_writer_closes_and_a_dropped_mux_ends_every_stream() {
        let mut a = Mux::new();
        let h = a.register(1, 10, 10);
        drop(h);
        assert!(matches!(
            out(&mut a).await,
            Message::StreamClose {
                id: 1,
                error: Some(_),
                ..
            }
        ));
        let mut h = a.register(2, 10, 0);
        drop(a);
        assert_eq!(h.reader.recv().await, None);
        assert!(h.writer.send(StreamChannel::Out, b"x").await.is_err());
    }

    #[test]
    fn a_window_doubles_only_when_a_whole_one_was_consumed_quickly_and_the_link_has_room() {
        let mut mux = Mux::new();
        let _h = mux.register(1, WINDOW_BYTES, 0);
        let entry = mux.entries.get_mut(&1).unwrap();
        let start = entry.round_started;
        let quarter = WINDOW_BYTES / 4;
        let budget = LINK_WINDOW_BUDGET;
        // Three quarters: the round is not over.
        for _ in 0..3 {
            assert_eq!(entry.grow_with(quarter, start, budget), None);
        }
        // The fourth within GROW_WITHIN: doubled.
        let soon = start + GROW_WITHIN / 2;
        assert_eq!(entry.grow_with(quarter, soon, budget), Some(WINDOW_BYTES));
        assert_eq!(entry.window(), 2 * WINDOW_BYTES);
        // A whole window consumed slowly: it stays.
        let late = soon + GROW_WITHIN * 3;
        assert_eq!(entry.grow_with(2 * WINDOW_BYTES, late, budget), None);
        assert_eq!(entry.window(), 2 * WINDOW_BYTES);
        // Quickly again, but the link's windows have no room left: it stays.
        assert_eq!(
            entry.grow_with(2 * WINDOW_BYTES, late, u64::from(WINDOW_BYTES)),
            None
        );
        // With room: doubled, up to the most a window grows to, then no more.
        assert_eq!(
            entry.grow_with(2 * WINDOW_BYTES, late, budget),
            Some(2 * WINDOW_BYTES)
        );
        assert_eq!(entry.window(), MAX_WINDOW_BYTES);
        assert_eq!(entry.grow_with(MAX_WINDOW_BYTES, late, budget), None);
        assert_eq!(entry.window(), MAX_WINDOW_BYTES);
    }

    #[tokio::test]
    async fn a_grown_window_is_used_by_the_sender_and_enforced_by_the_receiver() {
        let mut sender = Mux::new();
        let mut receiver = Mux::new();
        let mut tx = sender.register(1, WINDOW_BYTES, WINDOW_BYTES);
        let mut rx = receiver.register(1, WINDOW_BYTES, WINDOW_BYTES);
        // One window sent; the receiver consumes it at once, so its credit
        // carries growth.
        tx.writer
            .send_bytes(
                StreamChannel::Out,
                Bytes::from(vec![1; WINDOW_BYTES as usize]),
            )
            .await
            .unwrap();
        let mut grown = 0;
        let mut received = 0;
        while received < WINDOW_BYTES as usize {
            let frame = out(&mut sender).await;
            assert_eq!(receiver.incoming(frame), None);
            while let Ok(Inbound::Data { bytes, .. }) = rx.reader.inbound.try_recv() {
                received += bytes.len();
                rx.reader.consumed(bytes.len());
            }
        }
        // However slowly this test runs, the round counts as quick.
        receiver.entries.get_mut(&1).unwrap().round_started =
            Instant::now() + Duration::from_secs(3600);
        let mut credited = 0;
        while credited < WINDOW_BYTES {
            match out(&mut receiver).await {
                Message::StreamCredit { id: 1, bytes, grow } => {
                    credited += bytes;
                    grown += grow.unwrap_or(0);
                    assert_eq!(
                        sender.incoming(Message::StreamCredit { id: 1, bytes, grow }),
                        None
                    );
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(grown, WINDOW_BYTES, "a window consumed at once doubles");
        // The sender may now have the doubled window in flight.
        assert_eq!(
            tx.writer.credit.available_permits(),
            2 * WINDOW_BYTES as usize
        );
        // The receiver takes that much and cuts off a byte more.
        let window = 2 * WINDOW_BYTES as usize;
        let data = |n: usize| Message::StreamData {
            id: 1,
            channel: StreamChannel::Out,
            data: Bytes::from(vec![2; n]),
        };
        assert_eq!(receiver.incoming(data(window)), None);
        assert!(matches!(
            receiver.incoming(data(1)),
            Some(Message::StreamClose { id: 1, .. })
        ));
        // A peer's growth beyond the most a window grows to is not taken.
        sender.incoming(Message::StreamCredit {
            id: 1,
            bytes: 0,
            grow: Some(u32::MAX),
        });
        assert_eq!(
            tx.writer.credit.available_permits(),
            MAX_WINDOW_BYTES as usize
        );
    }

    #[tokio::test]
    async fn other_branches_that_are_ready_go_before_stream_data() {
        let mut a = Mux::new();
        let mut h = a.register(1, 1 << 20, 1 << 20);
        h.writer.send(StreamChannel::Out, b"data").await.unwrap();
        let ready = std::future::ready(());
        tokio::pin!(ready);
        for _ in 0..100 {
            let first = tokio::select! {
                msg = a.next_outgoing() => Some(msg),
                () = &mut ready => None,
            };
            assert_eq!(first, None, "the ready branch wins");
            ready.set(std::future::ready(()));
        }
        assert!(matches!(out(&mut a).await, Message::StreamData { .. }));
    }
}
