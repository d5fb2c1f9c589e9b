//! Reaching into a process component: a command run in the component's
//! directory with its environment and user (`trellis exec`), and a TCP
//! connection to its port on loopback (`trellis port-forward`).
//!
//! The command is a new process beside the component's (processes share
//! the host), started like a replica — the unpacked package as working
//! directory, exactly the component's env plus `PATH`, `HOME`,
//! `TRELLIS_ROOT` and `TRELLIS_REPLICA`, its user — with pipes instead of
//! log files, in a process group of its own, killed when the stream ends.

use std::os::fd::AsFd;
use std::process::Stdio;

use async_trait::async_trait;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use super::supervisor::DEFAULT_PATH;
use super::{ProcessRuntime, prepare};
use crate::runner::{
    ExecControl, ExecProcess, ExecRequest, StreamChannel, StreamError, stream_error,
};
use crate::runtime::{ComponentPlan, ComponentState};
use crate::state::StageKey;

/// Output chunks a command may be ahead of the link.
const OUTPUT_QUEUE: usize = 4;

impl ProcessRuntime {
    /// Whether `component` runs (a replica is up), so reaching into it
    /// makes sense.
    async fn check_running(
        &self,
        stage: &StageKey,
        component: &ComponentPlan,
        replica: Option<u32>,
    ) -> Result<(), StreamError> {
        let observed = crate::runtime::Runtime::observe(self, stage)
            .await
            .map_err(|e| stream_error(e.code, e.message, ""))?;
        let running = observed
            .iter()
            .find(|o| o.name == component.name)
            .filter(|o| o.state == ComponentState::Running || o.replicas_running > 0)
            .map(|o| o.replicas_running);
        match (running, replica) {
            (Some(n), Some(r)) if r < n.max(component.replicas) => Ok(()),
            (Some(_), None) => Ok(()),
            (Some(_), Some(_)) => Err(super::super::container::exec::not_running(
                &component.name,
                replica,
                1,
            )),
            (None, _) => Err(super::super::container::exec::not_running(
                &component.name,
                None,
                0,
            )),
        }
    }

    pub(super) async fn exec_in(
        &self,
        stage: &StageKey,
        component: &ComponentPlan,
        request: ExecRequest,
    ) -> Result<ExecProcess, StreamError> {
        self.check_running(stage, component, request.replica)
            .await?;
        let dirs = self
            .inner
            .layout
            .component(stage, &component.name)
            .map_err(|e| stream_error(e.code, e.message, ""))?;
        let root = dirs.root(&component.spec_hash);
        let owner = prepare::owner(component)
            .map_err(|e| stream_error(e.code, e.message, e.hint.unwrap_or_default()))?;
        let program = &request.command[0];
        let path = if program.contains('/') && !program.starts_with('/') {
            root.join(program)
        } else {
            std::path::PathBuf::from(program)
        };
        let mut env = component.env.clone();
        env.entry("PATH".into())
            .or_insert_with(|| DEFAULT_PATH.into());
        env.entry("HOME".into())
            .or_insert_with(|| root.display().to_string());
        env.insert("TRELLIS_ROOT".into(), root.display().to_string());
        env.insert(
            "TRELLIS_REPLICA".into(),
            request.replica.unwrap_or(0).to_string(),
        );
        let not_started = |e: &dyn std::fmt::Display| {
            stream_error(
                "command-not-started",
                format!(
                    "cannot start {program:?} in component {}: {e}",
                    component.name
                ),
                "a relative path is taken from the component's directory; a bare name is \
                 looked up in its PATH",
            )
        };
        if request.tty {
            return spawn_on_terminal(&path, &request, &root, &env, owner)
                .map_err(|e| not_started(&e));
        }
        let mut command = tokio::process::Command::new(&path);
        command
            .args(&request.command[1..])
            .current_dir(&root)
            .env_clear()
            .envs(&env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some((uid, gid)) = owner {
            command.uid(uid).gid(gid);
        }
        let mut child = command.spawn().map_err(|e| not_started(&e))?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(stream_error(
                "command-not-started",
                "the command's pipes could not be opened",
                "",
            ));
        };
        let (tx, rx) = mpsc::channel(OUTPUT_QUEUE);
        spawn_reader(stdout, StreamChannel::Out, tx.clone());
        spawn_reader(stderr, StreamChannel::Err, tx);
        Ok(ExecProcess {
            stdin: Box::pin(stdin),
            output: rx,
            control: Box::new(ChildExec {
                child,
                terminal: None,
            }),
        })
    }

    pub(super) async fn connect_to(
        &self,
        stage: &StageKey,
        component: &ComponentPlan,
        replica: Option<u32>,
        port: u16,
    ) -> Result<tokio::net::TcpStream, StreamError> {
        self.check_running(stage, component, replica).await?;
        super::super::container::exec::connect(
            &component.name,
            (std::net::Ipv4Addr::LOCALHOST, port).into(),
        )
        .await
    }
}

fn spawn_reader(
    mut from: impl tokio::io::AsyncRead + Unpin + Send + 'static,
    channel: StreamChannel,
    to: mpsc::Sender<(StreamChannel, Vec<u8>)>,
) {
    tokio::spawn(async move {
        let mut buf = vec![0u8; trellis_link::stream::CHUNK_BYTES];
        loop {
            let n = tokio::select! {
                () = to.closed() => return,
                n = from.read(&mut buf) => n,
            };
            match n {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if to.send((channel, buf[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
}

/// The command under a pseudo-terminal: it is the session leader of a
/// session of its own (so its process group is its own, as without one),
/// the terminal its controlling one and its stdin, stdout and stderr;
/// what it writes comes back as one stream, as from a terminal.
fn spawn_on_terminal(
    path: &std::path::Path,
    request: &ExecRequest,
    root: &std::path::Path,
    env: &std::collections::BTreeMap<String, String>,
    owner: Option<(u32, u32)>,
) -> Result<ExecProcess, pty_process::Error> {
    let (pty, pts) = pty_process::open()?;
    if request.cols > 0 && request.rows > 0 {
        pty.resize(pty_process::Size::new(request.rows, request.cols))?;
    }
    let mut command = pty_process::Command::new(path)
        .args(&request.command[1..])
        .current_dir(root)
        .env_clear()
        .envs(env)
        .kill_on_drop(true);
    if let Some((uid, gid)) = owner {
        command = command.uid(uid).gid(gid);
    }
    let child = command.spawn(pts)?;
    // Resizing goes through a descriptor of its own, as the writing half
    // is the command's stdin.
    let terminal = pty.as_fd().try_clone_to_owned()?;
    let (output, input) = pty.into_split();
    let (tx, rx) = mpsc::channel(OUTPUT_QUEUE);
    spawn_reader(output, StreamChannel::Out, tx);
    Ok(ExecProcess {
        stdin: Box::pin(input),
        output: rx,
        control: Box::new(ChildExec {
            child,
            terminal: Some(terminal),
        }),
    })
}

struct ChildExec {
    child: tokio::process::Child,
    /// The terminal's controlling side, when the command runs under one.
    terminal: Option<std::os::fd::OwnedFd>,
}

#[async_trait]
impl ExecControl for ChildExec {
    async fn resize(&mut self, cols: u16, rows: u16) {
        if let Some(terminal) = &self.terminal {
            let size = rustix::termios::Winsize {
                ws_row: rows,
                ws_col: cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // A terminal that is gone needs no size.
            let _ = rustix::termios::tcsetwinsize(terminal, size);
        }
    }

    async fn wait(&mut self) -> Option<i32> {
        self.child.wait().await.ok().map(super::sys::exit_code)
    }
}
