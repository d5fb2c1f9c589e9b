//! Serving the hub's streams ([`Message::StreamOpen`]): a command run in a
//! component (`trellis exec`, the console's terminal) or a TCP connection
//! to one of its ports (`trellis port-forward`).
//!
//! Each stream gets a task that asks the runner for the command or the
//! connection, says `stream-opened` (or closes the stream with the
//! runner's reason), and then moves bytes both ways through its
//! [`StreamHandle`], whose windows keep either side from running ahead of
//! the other (see [`trellis_link::stream`]). A command's exit code closes
//! the stream. The hub closing the stream, or the session ending (link
//! lost, outpost revoked, agent stopping), aborts the task: a command
//! started for the stream is killed with it, a connection closed.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use trellis_link::Message;
use trellis_link::protocol::{StreamChannel, StreamError, StreamTarget};
use trellis_link::stream::{Inbound, StreamHandle, StreamReader, StreamWriter, WINDOW_BYTES};
use trellis_model::{NameKind, validate_name};

use crate::runner::{ExecProcess, ExecRequest, StageRunner, stream_error};
use crate::state::StageKey;

/// Streams one session serves at once; more are refused.
pub const MAX_STREAMS: usize = 64;

/// Bytes read from a connection or a command at a time.
const READ_BYTES: usize = trellis_link::stream::CHUNK_BYTES;

/// The session's running stream tasks, by id. Dropping it (the session
/// ended) aborts them all.
#[derive(Debug, Default)]
pub(super) struct StreamTasks {
    tasks: HashMap<u64, JoinHandle<()>>,
}

impl Drop for StreamTasks {
    fn drop(&mut self) {
        for task in self.tasks.values() {
            task.abort();
        }
    }
}

impl StreamTasks {
    /// Checks a `stream-open`: `Err` is the reason to refuse it.
    pub(super) fn check(
        &mut self,
        id: u64,
        stage: &StageKey,
        target: &StreamTarget,
    ) -> Result<(), StreamError> {
        self.tasks.retain(|_, task| !task.is_finished());
        if self.tasks.contains_key(&id) {
            return Err(stream_error(
                "stream-id-in-use",
                format!("stream {id} is open already"),
                "",
            ));
        }
        if self.tasks.len() >= MAX_STREAMS {
            return Err(stream_error(
                "too-many-streams",
                format!(
                    "the outpost already serves {MAX_STREAMS} streams (execs and forwarded \
                     connections), the most it serves at once"
                ),
                "end an exec or port-forward that is still open and retry",
            ));
        }
        let component = match target {
            StreamTarget::Exec {
                component, command, ..
            } => {
                if command.is_empty() {
                    return Err(stream_error(
                        "empty-command",
                        "an exec needs a command",
                        "give the command after `--`",
                    ));
                }
                component
            }
            StreamTarget::Forward { component, .. } => component,
        };
        validate_name(NameKind::Project, &stage.project)
            .and_then(|()| validate_name(NameKind::Stage, &stage.stage))
            .and_then(|()| validate_name(NameKind::Component, component))
            .map_err(|e| {
                stream_error(
                    "invalid-name",
                    format!("the hub asked for a stream with an invalid name: {e}"),
                    "",
                )
            })
    }

    /// Serves stream `id` (checked with [`StreamTasks::check`]).
    pub(super) fn start(
        &mut self,
        id: u64,
        runner: Arc<dyn StageRunner>,
        stage: StageKey,
        target: StreamTarget,
        handle: StreamHandle,
    ) {
        let task = tokio::spawn(serve(runner, stage, target, handle));
        self.tasks.insert(id, task);
    }
}

async fn serve(
    runner: Arc<dyn StageRunner>,
    stage: StageKey,
    target: StreamTarget,
    handle: StreamHandle,
) {
    let StreamHandle { reader, mut writer } = handle;
    let id = writer.id();
    match target {
        StreamTarget::Exec {
            component,
            replica,
            command,
            tty,
            cols,
            rows,
        } => {
            let request = ExecRequest {
                component,
                replica,
                command,
                tty,
                cols,
                rows,
            };
            match runner.exec(&stage, request).await {
                Err(error) => {
                    tracing::info!(%stage, id, code = %error.code, error = %error.message, "refusing an exec");
                    writer.close(None, Some(error)).await;
                }
                Ok(process) => {
                    if opened(&mut writer).await {
                        tracing::info!(%stage, id, "exec started");
                        pump_exec(process, reader, writer).await;
                    }
                }
            }
        }
        StreamTarget::Forward {
            component,
            replica,
            port,
        } => match runner.connect(&stage, &component, replica, port).await {
            Err(error) => {
                tracing::info!(%stage, id, code = %error.code, error = %error.message, "refusing a forwarded connection");
                writer.close(None, Some(error)).await;
            }
            Ok(connection) => {
                if opened(&mut writer).await {
                    tracing::debug!(%stage, id, port, "forwarding a connection");
                    pump_tcp(connection, reader, writer).await;
                }
            }
        },
    }
}

async fn opened(writer: &mut StreamWriter) -> bool {
    let id = writer.id();
    writer
        .send_message(Message::StreamOpened {
            id,
            window: WINDOW_BYTES,
        })
        .await
        .is_ok()
}

/// What the hub sent for the command: stdin (closed at EOF), resizes.
enum FromHub {
    Resize(u16, u16),
    Gone,
}

async fn pump_exec(process: ExecProcess, mut reader: StreamReader, mut writer: StreamWriter) {
    let ExecProcess {
        stdin,
        mut output,
        mut control,
    } = process;
    let (resize_tx, mut resize_rx) = tokio::sync::mpsc::unbounded_channel::<FromHub>();
    // Stdin: from the hub into the command until EOF; ends with the stream.
    let input = async move {
        let mut stdin = Some(stdin);
        loop {
            match reader.recv().await {
                Some(Inbound::Data { bytes, .. }) => {
                    let n = bytes.len();
                    if let Some(pipe) = stdin.as_mut()
                        && (pipe.write_all(&bytes).await.is_err() || pipe.flush().await.is_err())
                    {
                        // The command closed its stdin; what follows is
                        // dropped, and still credited so the hub is not
                        // stuck.
                        stdin = None;
                    }
                    reader.consumed(n);
                }
                Some(Inbound::Eof) => {
                    // Shut down (an engine's attached stream), then closed:
                    // a child's pipe ends only when its end is dropped.
                    if let Some(mut pipe) = stdin.take() {
                        let _ = pipe.shutdown().await;
                    }
                }
                Some(Inbound::Resize { cols, rows }) => {
                    let _ = resize_tx.send(FromHub::Resize(cols, rows));
                }
                Some(Inbound::Opened) => {}
                Some(Inbound::Closed { .. }) | None => {
                    let _ = resize_tx.send(FromHub::Gone);
                    return;
                }
            }
        }
    };
    let input = tokio::spawn(input);
    loop {
        tokio::select! {
            chunk = output.recv() => match chunk {
                Some((channel, bytes)) => {
                    if writer.send(channel, &bytes).await.is_err() {
                        // The hub ended the stream: the command goes with
                        // the task (killed on drop).
                        input.abort();
                        return;
                    }
                }
                None => break,
            },
            event = resize_rx.recv() => match event {
                Some(FromHub::Resize(cols, rows)) => control.resize(cols, rows).await,
                Some(FromHub::Gone) | None => {
                    input.abort();
                    return;
                }
            },
        }
    }
    let code = control.wait().await;
    input.abort();
    writer.close(code, None).await;
}

/// How the hub's side of a forwarded connection ended.
enum Up {
    /// The hub closed the stream (or the link ended).
    Closed,
    /// The hub sends no more; the connection's write half is shut. Once
    /// the component has finished sending too, the stream is over.
    Eof,
    /// The component stopped taking bytes.
    Broken,
}

async fn pump_tcp(
    connection: tokio::net::TcpStream,
    mut reader: StreamReader,
    mut writer: StreamWriter,
) {
    let _ = connection.set_nodelay(true);
    let (mut rx, mut tx) = connection.into_split();
    let upstream = async move {
        loop {
            match reader.recv().await {
                Some(Inbound::Data { bytes, .. }) => {
                    if tx.write_all(&bytes).await.is_err() {
                        return Up::Broken;
                    }
                    reader.consumed(bytes.len());
                }
                Some(Inbound::Eof) => {
                    let _ = tx.shutdown().await;
                    return Up::Eof;
                }
                Some(Inbound::Opened | Inbound::Resize { .. }) => {}
                Some(Inbound::Closed { .. }) | None => return Up::Closed,
            }
        }
    };
    let downstream = async {
        // Each read lands in memory that goes to the link as it is (no
        // copy); a new piece is allocated once the socket has bytes and the
        // last piece is used up.
        let mut buf = bytes::BytesMut::new();
        loop {
            if let Err(e) = rx.readable().await {
                return Some(stream_error(
                    "connection-failed",
                    format!("the connection to the component broke: {e}"),
                    "",
                ));
            }
            buf.reserve(READ_BYTES);
            match rx.read_buf(&mut buf).await {
                Ok(0) => {
                    let _ = writer.eof().await;
                    return None;
                }
                Ok(_) => {
                    let chunk = buf.split().freeze();
                    if writer.send_bytes(StreamChannel::Out, chunk).await.is_err() {
                        return None;
                    }
                }
                Err(e) => {
                    return Some(stream_error(
                        "connection-failed",
                        format!("the connection to the component broke: {e}"),
                        "",
                    ));
                }
            }
        }
    };
    let error = {
        tokio::pin!(upstream, downstream);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                up = &mut upstream, if !up_done => match up {
                    // The hub closed the stream or the link ended: nothing
                    // to say.
                    Up::Closed => return,
                    // The component stopped taking bytes.
                    Up::Broken => break None,
                    Up::Eof => {
                        up_done = true;
                        if down_done {
                            break None;
                        }
                    }
                },
                e = &mut downstream, if !down_done => {
                    down_done = true;
                    if e.is_some() {
                        break e;
                    }
                    if up_done {
                        break None;
                    }
                }
            }
        }
    };
    writer.close(None, error).await;
}
