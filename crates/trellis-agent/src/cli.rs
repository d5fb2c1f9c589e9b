//! The agent's command line: `join`, `install`, `unit` and `run`, and how the outpost runs
//! components. The standalone `trellis-agent` binary parses it at the top
//! level; the `trellis` binary nests it as `trellis agent …`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use trellis_link::identity::JoinToken;

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Enrol this host as an outpost with a join token, then run the agent
    Join {
        /// The hub's URL, as printed with the token (https://host:port)
        hub: String,
        /// The join token printed by `trellis create outpost`
        #[arg(long, env = "TRELLIS_JOIN_TOKEN", hide_env_values = true)]
        token: String,
        /// The agent's data directory (identity, state, stages)
        #[arg(long, env = "TRELLIS_AGENT_DATA", default_value = "trellis-agent")]
        data: PathBuf,
        /// Only enrol; do not start the agent
        #[arg(long)]
        no_run: bool,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
    /// Make this host an outpost: join the hub with a join token, copy
    /// this binary to PREFIX/bin/trellis-agent, write the systemd unit
    /// (KillMode=process, Restart=always) and enable and start it where
    /// systemd runs. A failed join installs nothing
    Install {
        /// The join token printed by `trellis create outpost`
        #[arg(long, env = "TRELLIS_JOIN_TOKEN", hide_env_values = true)]
        token: String,
        /// The hub's URL (default: the token's; given, it must be the token's)
        #[arg(long)]
        hub: Option<String>,
        /// Where the binary goes: PREFIX/bin/trellis-agent
        #[arg(long, default_value = crate::install::DEFAULT_PREFIX)]
        prefix: PathBuf,
        /// The installed agent's data directory
        #[arg(long, default_value = crate::install::DEFAULT_DATA)]
        data: PathBuf,
        /// Where the unit file goes
        #[arg(long, default_value = crate::install::DEFAULT_UNIT_DIR)]
        unit_dir: PathBuf,
        /// Install and join, but do not enable or start the unit
        #[arg(long)]
        no_start: bool,
    },
    /// Print the systemd unit `install` writes (for packaging)
    Unit {
        /// The agent binary's path on the host
        #[arg(long, default_value = "/usr/local/bin/trellis-agent")]
        binary: PathBuf,
        /// The agent's data directory
        #[arg(long, default_value = crate::install::DEFAULT_DATA)]
        data: PathBuf,
    },
    /// Run the agent of an enrolled host
    Run {
        #[arg(long, env = "TRELLIS_AGENT_DATA", default_value = "trellis-agent")]
        data: PathBuf,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
    /// Watches an agent update the agent started: restores the previous
    /// agent when the new one does not link in time (started by the agent
    /// itself, from the previous binary)
    #[command(hide = true)]
    UpdateWatchdog {
        #[arg(long)]
        data: PathBuf,
        /// Start the previous agent again after rolling back (when no
        /// service manager restarts it)
        #[arg(long)]
        restart: bool,
    },
}

/// How an outpost runs components (the agent's, or the hub's local outpost's).
#[derive(Debug, Clone, Args)]
pub struct RuntimeArgs {
    /// How long a new release has to come up (components running and
    /// answering on their first port) before it is rolled back, e.g. 60s, 5m
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub health_window: std::time::Duration,
    /// How long every component must stay up without restarting to count as up
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub settle_time: std::time::Duration,
    /// The container engine's API socket, e.g. unix:///run/podman/podman.sock
    /// (default: DOCKER_HOST, then Podman's and Docker's usual sockets)
    #[arg(long, env = "DOCKER_HOST")]
    pub docker_host: Option<String>,
    /// Run only `process:` components, even when a container engine is reachable
    #[arg(long)]
    pub no_containers: bool,
    /// Publish container components' ports on the host at this address
    /// (same port numbers), e.g. 127.0.0.1 or 0.0.0.0
    #[arg(long, value_name = "IP")]
    pub publish_ports: Option<std::net::IpAddr>,
    /// The CPU architecture the outpost reports and runs images for
    /// (amd64, arm64, …), instead of this host's; for testing
    /// multi-architecture builds on one machine
    #[arg(long, env = "TRELLIS_AGENT_ARCH", value_parser = parse_arch)]
    pub arch: Option<String>,
    /// Serve the outpost's entry point here: every ingress of its stages at
    /// http(s)://<host>.<stage>.<project>.<ingress domain>, e.g. 0.0.0.0:80
    #[arg(long, value_name = "ADDR", env = "TRELLIS_INGRESS_LISTEN")]
    pub ingress_listen: Option<std::net::SocketAddr>,
    /// Serve the entry point over HTTPS with this certificate chain (PEM;
    /// re-read when it changes); needs --ingress-key
    #[arg(
        long,
        value_name = "FILE",
        requires = "ingress_key",
        requires = "ingress_listen"
    )]
    pub ingress_cert: Option<PathBuf>,
    /// The private key (PEM) of --ingress-cert
    #[arg(long, value_name = "FILE", requires = "ingress_cert")]
    pub ingress_key: Option<PathBuf>,
    /// Serve the entry point over HTTPS with a certificate the hub's CA
    /// issues for the outpost's stages (*.<stage>.<project>.<ingress
    /// domain>), kept in the data directory and renewed by the agent, so
    /// clients that trust the hub's CA trust the ingresses
    #[arg(long, requires = "ingress_listen", conflicts_with = "ingress_cert")]
    pub ingress_hub_cert: bool,
    /// The port clients reach the entry point on, for the URLs the outpost
    /// reports, when it differs from the one listened on
    #[arg(long, value_name = "PORT", requires = "ingress_listen")]
    pub ingress_public_port: Option<u16>,
    /// Offer a device node of this host to components under NAME (what a
    /// manifest asks for with `devices: [{name: NAME}]`), with the access
    /// given (r, w, m for mknod; default rw), e.g. camera=/dev/video0 or
    /// plc-serial=/dev/ttyUSB0:rw; repeat it for every device
    #[arg(long = "device", value_name = "NAME=PATH[:MODE]")]
    pub devices: Vec<crate::devices::DeviceFlag>,
    /// Offer GPUs to components as the device `gpu`, through the engine's
    /// CDI support: all, indexes like 0,1, or CDI device names like
    /// nvidia.com/gpu=0
    #[arg(long, value_name = "all|0,1|CDI-NAME,…")]
    pub gpu: Option<crate::devices::GpuFlag>,
    /// Let at most one replica on the outpost hold this device (across
    /// stages and replicas); a release asking for it while another stage
    /// holds it fails, naming the holder; repeatable
    #[arg(long = "device-exclusive", value_name = "NAME")]
    pub device_exclusive: Vec<String>,
    /// Let only the stages of these projects use this device (without it:
    /// every project's); repeatable
    #[arg(long = "device-grant", value_name = "NAME=PROJECT[,PROJECT…]")]
    pub device_grants: Vec<crate::devices::GrantFlag>,
}

/// An architecture as OCI platforms name it: lower-case letters and digits.
fn parse_arch(text: &str) -> Result<String, String> {
    let ok = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "{text:?} is not an architecture; use the name OCI platforms give it, like amd64 or arm64"
        ))
    }
}

impl RuntimeArgs {
    /// The settings these flags make; fails on a device offer that does not
    /// add up (see [`crate::devices::DeviceOffers::new`]).
    pub fn settings(&self) -> anyhow::Result<crate::RuntimeSettings> {
        let devices = crate::devices::DeviceOffers::new(
            &self.devices,
            self.gpu.as_ref(),
            &self.device_exclusive,
            &self.device_grants,
        )
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("reading the devices the outpost offers")?;
        Ok(crate::RuntimeSettings {
            containers: !self.no_containers,
            docker_host: self.docker_host.clone(),
            publish_ports: self.publish_ports,
            deploy: crate::deploy::DeployOptions {
                health_window: self.health_window,
                settle: self.settle_time,
                arch: self
                    .arch
                    .clone()
                    .unwrap_or_else(|| crate::host::arch().to_owned()),
                ..Default::default()
            },
            ingress: self.ingress_listen.map(|listen| crate::IngressSettings {
                listen,
                tls: match (&self.ingress_cert, &self.ingress_key) {
                    (Some(cert), Some(key)) => Some(crate::IngressTls::Files {
                        cert: cert.clone(),
                        key: key.clone(),
                    }),
                    _ if self.ingress_hub_cert => Some(crate::IngressTls::FromHub),
                    _ => None,
                },
                public_port: self.ingress_public_port,
            }),
            devices,
            ..Default::default()
        })
    }
}

/// The standalone `trellis-agent` binary: parses its command line, runs the
/// command, exits 0 or 1 (2 when the async runtime cannot start).
/// `version`: the version it reports, when a build ships under another
/// than the crate's (see [`crate::update::set_version`]).
pub fn standalone_main(version: Option<String>) -> std::process::ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    use std::process::ExitCode;

    /// The Trellis Outpost Agent: runs the stages the hub places on this host
    #[derive(Debug, clap::Parser)]
    #[command(name = "trellis-agent", version)]
    struct Cli {
        #[command(subcommand)]
        command: AgentCommand,
    }

    crate::update::reap_inherited_children();
    let mut command = Cli::command();
    if let Some(version) = version {
        let shown: &'static str = Box::leak(version.clone().into_boxed_str());
        command = command.version(shown);
        crate::update::set_version(version);
    }
    let cli = match Cli::from_arg_matches(&command.get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    init_tracing();
    // At most two worker threads, whatever the host's cores: enough for the
    // link, the reconciler and a delivery at once, and the agent's memory
    // does not grow with the core count (each worker is a thread with its
    // own stack and allocator arena).
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(2));
    let runtime = match runtime(Some(workers)) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    // The standalone agent owns its binary, so it can replace it when the
    // hub offers another version.
    let self_update = crate::update::SelfUpdate::current().ok();
    match runtime.block_on(execute_with(cli.command, "trellis-agent", self_update)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The async runtime a command line runs on (`workers`: that many worker
/// threads, or one per core); when it cannot start, the error is printed
/// and the exit code (2) returned.
pub fn runtime(workers: Option<usize>) -> Result<tokio::runtime::Runtime, std::process::ExitCode> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = workers {
        builder.worker_threads(workers);
    }
    builder.enable_all().build().map_err(|e| {
        eprintln!("error: cannot start the async runtime: {e}");
        std::process::ExitCode::from(2)
    })
}

/// Runs one agent command. `program` is how the user invoked the agent
/// (`trellis agent` or `trellis-agent`), for the commands it prints.
pub async fn execute(command: AgentCommand, program: &str) -> anyhow::Result<()> {
    execute_with(command, program, None).await
}

/// [`execute`], for a binary that can replace itself with another agent
/// version (`self_update`: how to restart; see [`crate::update`]).
pub async fn execute_with(
    command: AgentCommand,
    program: &str,
    self_update: Option<crate::update::SelfUpdate>,
) -> anyhow::Result<()> {
    match command {
        AgentCommand::Join {
            hub,
            token,
            data,
            no_run,
            runtime,
        } => join(&hub, &token, &data, no_run, &runtime, program, self_update).await,
        AgentCommand::Run { data, runtime } => run(&data, &runtime, self_update).await,
        AgentCommand::Install {
            token,
            hub,
            prefix,
            data,
            unit_dir,
            no_start,
        } => {
            crate::install::install(&crate::install::InstallOptions {
                hub,
                token,
                prefix,
                data,
                unit_dir,
                no_start,
            })
            .await
        }
        AgentCommand::Unit { binary, data } => {
            print!("{}", crate::install::unit_file(&binary, &data));
            Ok(())
        }
        AgentCommand::UpdateWatchdog { data, restart } => {
            tokio::task::spawn_blocking(move || crate::update::watchdog(&data, restart))
                .await
                .context("running the update watchdog")?
                .map_err(|e| anyhow::anyhow!("{e}"))
                .context("watching the agent update")
        }
    }
}

/// Enrols this host with a join token, then runs the agent unless told not
/// to.
async fn join(
    hub: &str,
    token: &str,
    data: &Path,
    no_run: bool,
    runtime: &RuntimeArgs,
    program: &str,
    self_update: Option<crate::update::SelfUpdate>,
) -> anyhow::Result<()> {
    let token: JoinToken = token
        .trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("reading the join token")?;
    if hub.trim_end_matches('/') != token.hub_url.trim_end_matches('/') {
        bail!(
            "the join token is for the hub at {}, not {hub}; run the command exactly as `trellis create outpost` printed it",
            token.hub_url
        );
    }
    std::fs::create_dir_all(data)
        .with_context(|| format!("creating the agent's data directory {}", data.display()))?;
    let identity = crate::join(&token, data).await.map_err(|e| {
        let hint = e.hint().map(|h| format!("\nhint: {h}")).unwrap_or_default();
        anyhow::anyhow!("{e}{hint}")
    })?;
    println!(
        "joined the hub at {} as outpost {}; identity stored in {}",
        identity.hub_url,
        identity.outpost,
        data.display()
    );
    if no_run {
        println!(
            "start the agent with: {program} run --data {}",
            data.display()
        );
        return Ok(());
    }
    // A restart after an update runs the agent, not the join again.
    let self_update = self_update.map(|mut this| {
        this.args = std::iter::once("run".into())
            .chain(["--data".into(), data.as_os_str().to_owned()])
            .chain(runtime_args(&this.args))
            .collect();
        this
    });
    run(data, runtime, self_update).await
}

/// The runtime flags of a `join` command line: everything after the hub
/// URL except the token and `--data`.
fn runtime_args(join_args: &[std::ffi::OsString]) -> Vec<std::ffi::OsString> {
    let mut out = Vec::new();
    let mut args = join_args.iter().skip_while(|a| *a != "join").skip(1);
    let mut positional_seen = false;
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy();
        if text == "--token" || text == "--data" {
            args.next();
        } else if text.starts_with("--token=") || text.starts_with("--data=") || text == "--no-run"
        {
        } else if !positional_seen && !text.starts_with('-') {
            positional_seen = true;
        } else {
            out.push(arg.clone());
        }
    }
    out
}

/// Runs the agent until Ctrl-C or SIGTERM. Components keep running when it
/// stops; the next start adopts them.
async fn run(
    data: &Path,
    runtime: &RuntimeArgs,
    self_update: Option<crate::update::SelfUpdate>,
) -> anyhow::Result<()> {
    trellis_link::identity::install_crypto_provider();
    println!("agent running (data in {}); Ctrl-C to stop", data.display());
    crate::run(
        data,
        crate::AgentOptions {
            runtime_settings: runtime.settings()?,
            self_update,
            ..Default::default()
        },
        shutdown_signal(),
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))
    .context("running the agent")
}

/// Completes on Ctrl-C or SIGTERM (how service managers stop a process).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

/// Libraries whose trace-level output would carry message contents.
pub const NEVER_TRACED: &[&str] = &["tungstenite", "tokio_tungstenite"];

/// Logs to stderr, filtered by `TRELLIS_LOG` (default: warnings): a
/// level, and `target=level` directives, e.g. `info,trellis_hub=debug`. A
/// value that does not parse is reported and the default used.
pub fn init_tracing() {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let default = Targets::new().with_default(LevelFilter::WARN);
    let mut filter = match std::env::var("TRELLIS_LOG") {
        Ok(text) if !text.trim().is_empty() => text.parse::<Targets>().unwrap_or_else(|e| {
            eprintln!(
                "warning: TRELLIS_LOG={text:?} is not a log filter ({e}); logging warnings only. Give a level or target=level directives, e.g. info,trellis_hub=debug"
            );
            default.clone()
        }),
        _ => default.clone(),
    };
    // The WebSocket library logs every message it sends and receives at
    // trace level, and the link's desired states carry config values
    // (passwords, tokens): whatever TRELLIS_LOG asks (`tungstenite=trace`
    // too, which this directive replaces), its messages are never logged.
    // Capped at warnings: a directive enables its level, and at debug the
    // library's handshake notes would land on every CLI command's stderr
    // (`trellis exec` passes the command's stderr through).
    for target in NEVER_TRACED {
        filter = filter.with_target(*target, LevelFilter::WARN);
    }
    let _ = tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .try_init();
}
