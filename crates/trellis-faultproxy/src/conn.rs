//! One proxied connection: dialling the upstream, then one task per
//! direction that reads chunks from one socket and writes them to the other,
//! applying the current [`Mode`] to every chunk.
//!
//! Inside a direction task a reader and a writer run concurrently, joined by
//! a bounded channel of [`QUEUE_CHUNKS`] chunks. The split is what lets
//! `Delay` be latency rather than a throughput cap (chunks read at t, t+1ms,
//! … are all in flight at once), and the bound is the backpressure: when the
//! writer is held back the queue fills, the reader stops reading, and the
//! sender's kernel buffers fill as they would on a slow link.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Mode;
use crate::proxy::{Shared, reset};

/// Largest chunk read at once.
const CHUNK: usize = 16 * 1024;
/// Chunks a direction holds between reading and writing. With [`CHUNK`] that
/// caps the proxy at 512 KiB buffered per direction per connection.
const QUEUE_CHUNKS: usize = 32;
/// Throttled writes go out in slices of a tenth of a second's budget, so the
/// pacing is smooth at that granularity rather than one burst per second.
const THROTTLE_SLICES_PER_SEC: u64 = 10;

/// Which way a direction task moves bytes; picks the counter and names logs.
#[derive(Clone, Copy, Debug)]
enum Direction {
    /// client → upstream
    Up,
    /// upstream → client
    Down,
}

/// Decrements the active-connection count when the last direction task of a
/// connection lets go of it.
struct ActiveGuard(Arc<Shared>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one accepted client until it closes, fails, or is cancelled.
/// Runs the up direction itself and spawns the down direction.
pub(crate) async fn serve(
    client: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    token: CancellationToken,
) {
    shared.active.fetch_add(1, Ordering::Relaxed);
    let guard = Arc::new(ActiveGuard(shared.clone()));

    // Dial only once bytes may flow: a blackholed link does not carry the
    // upstream's SYN either, so the upstream must not see the connection yet.
    let mut mode_rx = shared.mode.subscribe();
    if wait_forwarding(&mut mode_rx, &token).await.is_none() {
        reset(&client);
        return;
    }
    let upstream = tokio::select! {
        _ = token.cancelled() => {
            reset(&client);
            return;
        }
        dialled = TcpStream::connect(shared.upstream) => match dialled {
            Ok(s) => s,
            Err(e) => {
                // To the client this looks like the service being down.
                tracing::warn!(%peer, upstream = %shared.upstream, error = %e, "fault proxy could not reach upstream");
                reset(&client);
                return;
            }
        },
    };
    // The proxy forwards whatever it has at once; Nagle on top of that would
    // add its own delay that no Mode asked for.
    for s in [&client, &upstream] {
        if let Err(e) = s.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
    }
    tracing::debug!(%peer, "proxying connection");

    let (client_rd, client_wr) = client.into_split();
    let (upstream_rd, upstream_wr) = upstream.into_split();
    shared.tracker.spawn(direction(
        Direction::Down,
        upstream_rd,
        client_wr,
        shared.clone(),
        token.clone(),
        guard.clone(),
    ));
    direction(Direction::Up, client_rd, upstream_wr, shared, token, guard).await;
}

/// Moves bytes one way until EOF has been forwarded, an error, or
/// cancellation. A failure in either direction cancels the connection token,
/// which ends the other direction too.
async fn direction(
    dir: Direction,
    mut rd: OwnedReadHalf,
    mut wr: OwnedWriteHalf,
    shared: Arc<Shared>,
    token: CancellationToken,
    _active: Arc<ActiveGuard>,
) {
    let counter = match dir {
        Direction::Up => &shared.bytes_up,
        Direction::Down => &shared.bytes_down,
    };
    let (tx, rx) = mpsc::channel(QUEUE_CHUNKS);
    tokio::join!(
        read_side(dir, &mut rd, tx, shared.mode.subscribe(), &token),
        write_side(dir, &mut wr, rx, shared.mode.subscribe(), &token, counter),
    );
    if token.is_cancelled() {
        // Reset both sockets this task holds a half of. Each socket's other
        // half lives in the other direction task, which may already have
        // ended cleanly, so both tasks must do this for a reset to be sure
        // to reach both peers. `forget` skips the FIN the write half would
        // otherwise send on drop, so the peer sees only the RST.
        reset(rd.as_ref());
        reset(wr.as_ref());
        wr.forget();
    }
}

/// A chunk and when it was read, so `Delay` can deliver it relative to that.
struct Chunk {
    read_at: Instant,
    data: Vec<u8>,
}

/// Reads chunks while the mode forwards and queues them. Returns (dropping
/// `tx`, which tells the writer) on EOF, error, or cancellation.
async fn read_side(
    dir: Direction,
    rd: &mut OwnedReadHalf,
    tx: mpsc::Sender<Chunk>,
    mut mode_rx: watch::Receiver<Mode>,
    token: &CancellationToken,
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let Some(mode) = wait_forwarding(&mut mode_rx, token).await else {
            return;
        };
        // Under Throttle read no more than one slice at a time, so the queue
        // holds a few seconds of throttled data rather than 512 KiB of it.
        let limit = match mode {
            Mode::Throttle { bytes_per_sec } => slice_len(bytes_per_sec),
            _ => CHUNK,
        };
        let n = tokio::select! {
            _ = token.cancelled() => return,
            // Re-check the mode: a switch to Blackhole must stop reading now.
            changed = mode_rx.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
            read = rd.read(&mut buf[..limit]) => match read {
                Ok(0) => {
                    tracing::debug!(?dir, "EOF");
                    return;
                }
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!(?dir, error = %e, "read failed; closing connection");
                    token.cancel();
                    return;
                }
            },
        };
        let chunk = Chunk {
            read_at: Instant::now(),
            data: buf[..n].to_vec(),
        };
        tokio::select! {
            _ = token.cancelled() => return,
            sent = tx.send(chunk) => if sent.is_err() {
                // The writer only goes away when the connection is ending.
                return;
            },
        }
    }
}

/// Writes queued chunks as the mode dictates, then forwards EOF (FIN) once
/// the reader has hit it and the mode lets it through.
async fn write_side(
    dir: Direction,
    wr: &mut OwnedWriteHalf,
    mut rx: mpsc::Receiver<Chunk>,
    mut mode_rx: watch::Receiver<Mode>,
    token: &CancellationToken,
    counter: &AtomicU64,
) {
    // Throttle pacing: the earliest time the next slice may go out. A past
    // value means budget is available now; it is not allowed to accumulate
    // into a burst (see the `max` below).
    let mut next_slot = Instant::now();
    loop {
        let chunk = tokio::select! {
            _ = token.cancelled() => return,
            chunk = rx.recv() => chunk,
        };
        let Some(chunk) = chunk else { break };
        let mut off = 0;
        while off < chunk.data.len() {
            let Some(mode) = wait_forwarding(&mut mode_rx, token).await else {
                return;
            };
            let rest = chunk.data.len() - off;
            let (due, len) = match mode {
                Mode::Delay(d) => (Some(chunk.read_at + d), rest),
                Mode::Throttle { bytes_per_sec } => {
                    (Some(next_slot), rest.min(slice_len(bytes_per_sec)))
                }
                // Pass; wait_forwarding never returns a non-forwarding mode.
                _ => (None, rest),
            };
            if let Some(due) = due.filter(|due| *due > Instant::now()) {
                tokio::select! {
                    _ = token.cancelled() => return,
                    // A new mode may change or lift the wait: re-plan.
                    changed = mode_rx.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        continue;
                    }
                    _ = tokio::time::sleep_until(due) => {}
                }
            }
            let slice = &chunk.data[off..off + len];
            tokio::select! {
                _ = token.cancelled() => return,
                written = wr.write_all(slice) => if let Err(e) = written {
                    tracing::debug!(?dir, error = %e, "write failed; closing connection");
                    token.cancel();
                    return;
                },
            }
            off += len;
            counter.fetch_add(len as u64, Ordering::Relaxed);
            if let Mode::Throttle { bytes_per_sec } = mode {
                next_slot = next_slot.max(Instant::now()) + transmit_time(len, bytes_per_sec);
            }
        }
    }
    // EOF is data too: a blackholed link does not deliver the FIN either.
    if wait_forwarding(&mut mode_rx, token).await.is_none() {
        return;
    }
    tokio::select! {
        _ = token.cancelled() => {}
        shut = wr.shutdown() => if let Err(e) = shut {
            tracing::debug!(?dir, error = %e, "forwarding EOF failed");
            token.cancel();
        },
    }
}

/// Waits until the mode lets bytes through and returns it. `None` means the
/// connection must end: cancelled, the proxy is gone, or the mode is
/// `Refuse` (which cancels the connection so both directions reset).
async fn wait_forwarding(
    mode_rx: &mut watch::Receiver<Mode>,
    token: &CancellationToken,
) -> Option<Mode> {
    loop {
        let mode = *mode_rx.borrow_and_update();
        if mode == Mode::Refuse {
            token.cancel();
            return None;
        }
        if mode.forwards() {
            return Some(mode);
        }
        tokio::select! {
            _ = token.cancelled() => return None,
            changed = mode_rx.changed() => if changed.is_err() {
                return None;
            },
        }
    }
}

/// Bytes per throttled write (and read): a tenth of a second's budget, at
/// least 1 and at most one chunk.
fn slice_len(bytes_per_sec: u64) -> usize {
    let slice = (bytes_per_sec / THROTTLE_SLICES_PER_SEC).clamp(1, CHUNK as u64);
    // Clamped to CHUNK, which is a usize.
    slice as usize
}

/// How long `len` bytes take at `bytes_per_sec` (never called with 0, which
/// does not forward; guarded anyway).
fn transmit_time(len: usize, bytes_per_sec: u64) -> Duration {
    Duration::from_secs_f64(len as f64 / bytes_per_sec.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_slices_are_bounded() {
        assert_eq!(slice_len(0), 1);
        assert_eq!(slice_len(5), 1);
        assert_eq!(slice_len(10_240), 1024);
        assert_eq!(slice_len(u64::MAX), CHUNK);
        assert_eq!(transmit_time(1024, 10_240), Duration::from_millis(100));
    }
}
