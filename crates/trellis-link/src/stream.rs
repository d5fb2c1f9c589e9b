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

/// The window each direction of a stream starts with (and keeps): four
/// chunks, so a sender has the next three on their way while the receiver
/// hands one on. It bounds what a stream holds on the receiving side.
pub const WINDOW_BYTES: u32 = 512 * 1024;

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
    /// How much the peer may send before this side grants more.
    window: u32,
    /// Bytes received and not yet credited back.
    uncredited: u64,
    /// Bytes this side sent that the peer has not credited back yet.
    in_flight: u64,
    /// What this side's task may still send.
    credit: Arc<Semaphore>,
    eof_received: bool,
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
    /// grants more; this side may send `send_credit` bytes (0 until the
    /// peer says how much, with [`Mux::opened`]).
    pub fn register(&mut self, id: u64, window: u32, send_credit: u32) -> StreamHandle {
        let (to_task, inbound) = mpsc::unbounded_channel();
        let credit = Arc::new(Semaphore::new(send_credit as usize));
        self.entries.insert(
            id,
            Entry {
                to_task,
                window,
                uncredited: 0,
                in_flight: 0,
                credit: credit.clone(),
                eof_received: false,
            },
        );
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
                entry
                    .credit
                    .add_permits(window.min(WINDOW_BYTES * 4) as usize);
                let _ = entry.to_task.send(Inbound::Opened);
                None
            }
            Message::StreamData { id, channel, data } => {
                let entry = self.entries.get_mut(&id)?;
                entry.uncredited += data.len() as u64;
                if entry.uncredited > u64::from(entry.window) || entry.eof_received {
                    let window = entry.window;
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
            Message::StreamCredit { id, bytes } => {
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
    /// (its stream is gone already).
    fn outgoing(&mut self, msg: Message) -> Option<Message> {
        match &msg {
            Message::StreamData { id, data, .. } => {
                let entry = self.entries.get_mut(id)?;
                entry.in_flight += data.len() as u64;
            }
            Message::StreamCredit { id, bytes } => {
                let entry = self.entries.get_mut(id)?;
                entry.uncredited = entry.uncredited.saturating_sub(u64::from(*bytes));
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
    window: u32,
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
        if self.consumed >= (self.window / 4).max(1) {
            let bytes = std::mem::take(&mut self.consumed);
            let _ = self.ctl.send(Message::StreamCredit { id: self.id, bytes });
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
        let reply = a.incoming(Message::StreamCredit { id: 6, bytes: 1 });
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
