//! Reaching into a container component: a command run with the engine's
//! exec API (`trellis exec`), and a TCP connection to a replica's address
//! on the stage network (`trellis port-forward`).

use std::net::IpAddr;
use std::time::Duration;

use async_trait::async_trait;
use bollard::Docker;
use bollard::exec::{CreateExecOptions, ResizeExecOptions, StartExecOptions, StartExecResults};
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::engine::Inspected;
use super::{ContainerRuntime, naming};
use crate::runner::{
    ExecControl, ExecProcess, ExecRequest, StreamChannel, StreamError, stream_error,
};
use crate::runtime::ComponentPlan;
use crate::state::StageKey;

/// Output chunks a command may be ahead of the link.
const OUTPUT_QUEUE: usize = 4;

impl ContainerRuntime {
    /// The running replica `replica` (or the first running one) of
    /// `component`.
    async fn running_replica(
        &self,
        stage: &StageKey,
        component: &ComponentPlan,
        replica: Option<u32>,
    ) -> Result<Inspected, StreamError> {
        let mut filters = self.stage_filters(stage);
        filters.push(format!("{}={}", naming::COMPONENT, component.name));
        let engine_error = |e: crate::runtime::RuntimeError| {
            stream_error(
                e.code,
                format!("the container engine failed: {}", e.message),
                "",
            )
        };
        let listed = self
            .engine
            .containers(&filters)
            .await
            .map_err(engine_error)?;
        let mut replicas = Vec::new();
        for c in &listed {
            if c.labels.get(naming::COMPONENT) != Some(&component.name) {
                continue;
            }
            if let Some(inspected) = self.engine.inspect(&c.id).await.map_err(engine_error)? {
                let number = inspected
                    .config
                    .labels
                    .get(naming::REPLICA)
                    .and_then(|r| r.parse::<u32>().ok())
                    .unwrap_or(u32::MAX);
                replicas.push((number, inspected));
            }
        }
        replicas.sort_by_key(|(n, _)| *n);
        let running = |r: &&(u32, Inspected)| r.1.state.running;
        let found = match replica {
            Some(n) => replicas
                .iter()
                .filter(running)
                .find(|(number, _)| *number == n),
            None => replicas.iter().find(running),
        };
        match found {
            Some((_, inspected)) => Ok(inspected.clone()),
            None => Err(not_running(&component.name, replica, replicas.len())),
        }
    }

    pub(super) async fn exec_in(
        &self,
        stage: &StageKey,
        component: &ComponentPlan,
        request: ExecRequest,
    ) -> Result<ExecProcess, StreamError> {
        let container = self
            .running_replica(stage, component, request.replica)
            .await?;
        let docker = self.engine.docker.clone();
        let failed = |doing: &str, e: bollard::errors::Error| {
            stream_error(
                "exec-failed",
                format!(
                    "the container engine could not {doing} in {}: {e}",
                    component.name
                ),
                "",
            )
        };
        let created = docker
            .create_exec(
                &container.id,
                CreateExecOptions::<String> {
                    attach_stdin: Some(true),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    tty: Some(request.tty),
                    cmd: Some(request.command.clone()),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| failed("create the command", e))?;
        let started = docker
            .start_exec(
                &created.id,
                Some(StartExecOptions {
                    detach: false,
                    tty: request.tty,
                    output_capacity: Some(64 * 1024),
                }),
            )
            .await
            .map_err(|e| failed("start the command", e))?;
        let StartExecResults::Attached { mut output, input } = started else {
            return Err(stream_error(
                "exec-failed",
                "the container engine started the command detached",
                "",
            ));
        };
        let mut control = EngineExec {
            docker,
            id: created.id,
        };
        if request.tty && request.cols > 0 && request.rows > 0 {
            control.resize(request.cols, request.rows).await;
        }
        let (tx, rx) = mpsc::channel(OUTPUT_QUEUE);
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    () = tx.closed() => return,
                    next = output.next() => next,
                };
                let (channel, bytes) = match next {
                    Some(Ok(bollard::container::LogOutput::StdOut { message }))
                    | Some(Ok(bollard::container::LogOutput::Console { message })) => {
                        (StreamChannel::Out, message)
                    }
                    Some(Ok(bollard::container::LogOutput::StdErr { message })) => {
                        (StreamChannel::Err, message)
                    }
                    Some(Ok(bollard::container::LogOutput::StdIn { .. })) => continue,
                    Some(Err(_)) | None => return,
                };
                if tx.send((channel, bytes.to_vec())).await.is_err() {
                    return;
                }
            }
        });
        Ok(ExecProcess {
            stdin: input,
            output: rx,
            control: Box::new(control),
        })
    }

    pub(super) async fn connect_to(
        &self,
        stage: &StageKey,
        component: &ComponentPlan,
        replica: Option<u32>,
        port: u16,
    ) -> Result<tokio::net::TcpStream, StreamError> {
        let container = self.running_replica(stage, component, replica).await?;
        let network = naming::network_name(stage);
        let ip: IpAddr = container
            .network
            .networks
            .get(&network)
            .and_then(|n| n.ip_address.parse().ok())
            .ok_or_else(|| {
                stream_error(
                    "component-unreachable",
                    format!(
                        "{} has no address on the stage's network {network}",
                        component.name
                    ),
                    "",
                )
            })?;
        connect(&component.name, (ip, port).into()).await
    }
}

/// Connects to a component's port, with a bound on the wait.
pub(crate) async fn connect(
    component: &str,
    addr: std::net::SocketAddr,
) -> Result<tokio::net::TcpStream, StreamError> {
    match tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(stream_error(
            "connection-refused",
            format!(
                "{component} does not accept connections on port {}: {e}",
                addr.port()
            ),
            "check that the component listens on that port (`trellis logs component`)",
        )),
        Err(_) => Err(stream_error(
            "connection-timeout",
            format!(
                "{component} did not accept a connection on port {} within 10 s",
                addr.port()
            ),
            "",
        )),
    }
}

/// Why there is no replica to reach.
pub(crate) fn not_running(component: &str, replica: Option<u32>, replicas: usize) -> StreamError {
    match replica {
        Some(n) if replicas > 0 => stream_error(
            "replica-not-running",
            format!("replica {n} of component {component} is not running"),
            "`trellis list component` shows its replicas; replicas count from 0",
        ),
        _ => stream_error(
            "component-not-running",
            format!("component {component} is not running on the outpost"),
            "start it with `trellis start component`, or look at `trellis list component`",
        ),
    }
}

/// A command run through the engine's exec API.
struct EngineExec {
    docker: Docker,
    id: String,
}

#[async_trait]
impl ExecControl for EngineExec {
    async fn resize(&mut self, cols: u16, rows: u16) {
        let _ = self
            .docker
            .resize_exec(
                &self.id,
                ResizeExecOptions {
                    height: rows,
                    width: cols,
                },
            )
            .await;
    }

    async fn wait(&mut self) -> Option<i32> {
        // The output ends as the command exits; the engine may need a
        // moment more to record its exit code.
        for _ in 0..50 {
            match self.docker.inspect_exec(&self.id).await {
                Ok(inspected) if inspected.running != Some(true) => {
                    return inspected.exit_code.and_then(|c| i32::try_from(c).ok());
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(_) => return None,
            }
        }
        None
    }
}
