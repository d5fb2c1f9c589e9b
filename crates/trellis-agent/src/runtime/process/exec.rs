//! Reaching into a process component: a command run in the component's
//! directory with its environment and user (`trellis exec`), and a TCP
//! connection to its port on loopback (`trellis port-forward`).
//!
//! The command is a new process beside the component's (processes share
//! the host), started like a replica — the unpacked package as working
//! directory, exactly the component's env plus `PATH`, `HOME`,
//! `TRELLIS_ROOT` and `TRELLIS_REPLICA`, its user — with pipes instead of
//! log files, in a process group of its own, killed when the stream ends.

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
        if request.tty {
            return Err(stream_error(
                "tty-unsupported",
                format!(
                    "{} is a process component; a terminal (-t) is given only in containers",
                    component.name
                ),
                "run the command without -t (stdin still works with -i)",
            ));
        }
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
        let mut command = tokio::process::Command::new(&path);
        command
            .args(&request.command[1..])
            .current_dir(&root)
            .env_clear()
            .envs(&component.env);
        if !component.env.contains_key("PATH") {
            command.env("PATH", DEFAULT_PATH);
        }
        if !component.env.contains_key("HOME") {
            command.env("HOME", &root);
        }
        command
            .env("TRELLIS_ROOT", &root)
            .env("TRELLIS_REPLICA", request.replica.unwrap_or(0).to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some((uid, gid)) = owner {
            command.uid(uid).gid(gid);
        }
        let mut child = command.spawn().map_err(|e| {
            stream_error(
                "command-not-started",
                format!(
                    "cannot start {program:?} in component {}: {e}",
                    component.name
                ),
                "a relative path is taken from the component's directory; a bare name is \
                 looked up in its PATH",
            )
        })?;
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
            control: Box::new(ChildExec { child }),
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

struct ChildExec {
    child: tokio::process::Child,
}

#[async_trait]
impl ExecControl for ChildExec {
    async fn resize(&mut self, _cols: u16, _rows: u16) {}

    async fn wait(&mut self) -> Option<i32> {
        self.child.wait().await.ok().map(super::sys::exit_code)
    }
}
