//! The Trellis Outpost Agent: runs stages on a remote host and keeps them
//! running while its link to the hub is down (BRIEF §4–5).
//!
//! [`join()`] enrols the outpost once, with a join token; [`run`] then keeps
//! two loops going until told to stop:
//!
//! - the **link** ([`link::run_link`]) dials the hub, says which revisions
//!   the outpost holds, persists every desired state *before* acknowledging
//!   it, sends the status outbox, renews the certificate, and reconnects with
//!   jittered backoff when the link breaks;
//! - the **reconciler** ([`reconciler::Reconciler`]) applies the newest held
//!   desired state of each stage through a [`runner::StageRunner`], whether or
//!   not the link is up, and queues a status report for each apply.
//!
//! They meet only in the durable [`state::AgentState`] and the
//! [`report::Reporter`], so a crash of the agent at any instant loses
//! nothing that was acknowledged.
//!
//! # Layout
//! - [`state`]: the agent's durable local state — identity, desired and
//!   applied revisions per stage, and the outbox of status reports — in one
//!   crash-safe file (`<data>/agent.redb`).
//! - [`runtime`]: the [`runner::StageRunner`] seam and [`runner::RecordOnly`],
//!   the one runtime shipped so far.
//! - [`reconciler`]: applies the newest held revision of each stage.
//! - [`report`]: status reports into the outbox; the bounded, de-duplicated
//!   log of errors met while the hub could not be reached.
//! - [`link`]: the session with the hub over any [`trellis_link::LinkIo`],
//!   the [`link::Connector`] seam, reconnects with backoff.
//! - [`ws`]: the real transport — TLS (tokio-rustls) + WebSocket — and
//!   [`ws::HubConnector`].
//! - [`mod@join`]: first contact with a join token, and renewal of an expired
//!   certificate over HTTPS.
//! - `https`, `cert`, `host`: the hub URL and the two HTTPS calls, reading
//!   the agent's own certificate, probing the host's capacity.
//! - [`backup`]: backups of stages' volumes and their restore (jobs the
//!   hub sends over the link; content over HTTPS), and the restore journal
//!   a restart finishes.
//! - [`update`]: self-update to another agent version, with the watchdog
//!   that restores the previous one when the new one does not link.
//! - [`shutdown`]: the stop signal every task waits on.
//! - `cli` (feature `cli`, on by default): the command line shared by the
//!   standalone `trellis-agent` binary and `trellis agent …`.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::SeedableRng;
use rand::rngs::StdRng;

pub mod backup;
#[cfg(feature = "cli")]
pub mod cli;
pub mod delivery;
pub mod deploy;
pub mod devices;
pub mod ingress;
mod ingress_cert;
#[cfg(feature = "cli")]
pub mod install;
pub mod join;
pub mod link;
pub mod reconciler;
pub mod report;
pub mod runner;
pub mod runtime;
pub mod seal;
pub mod shutdown;
pub mod state;
pub mod update;
pub mod ws;

mod cert;
mod host;
mod https;

pub use https::connect_from;
pub use join::{JoinError, join};
pub use link::{Backoff, BackoffConfig, ConnectError, Connector, LinkConfig};
pub use runner::{ApplyOutcome, RecordOnly, StageRunner};
pub use shutdown::{Shutdown, ShutdownTrigger};
pub use state::{
    AgentState, DEFAULT_OUTBOX_CAPACITY, Identity, OutboxStats, SCHEMA_VERSION, StageKey,
    StageRecord, StateError, StateOptions, StoreOutcome,
};

/// The agent's state file inside its data directory.
pub const STATE_FILE: &str = "agent.redb";

/// This agent's version, sent in `hello`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Why the agent stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    State(#[from] StateError),

    #[error(
        "this outpost has not joined a hub yet (no identity in {path}); run `trellis agent join \
         <hub-url> --token <token>` with the token printed by `trellis create outpost`",
        path = .path.display()
    )]
    NotJoined { path: PathBuf },

    #[error(
        "this outpost was revoked by the hub ({reason}); ask the administrator — `trellis agent \
         join` with a new token is needed"
    )]
    Revoked { reason: String },

    #[error("the outpost's entry point cannot start: {message}")]
    Ingress { message: String },

    #[error("the agent could not {what}; this is a bug in the agent, please report it")]
    Internal { what: String },
}

impl AgentError {
    /// The stable error code, for logs and the status model.
    pub fn code(&self) -> &'static str {
        match self {
            AgentError::State(_) => "agent-state-failed",
            AgentError::NotJoined { .. } => "not-joined",
            AgentError::Revoked { .. } => "revoked",
            AgentError::Ingress { .. } => "ingress-unavailable",
            AgentError::Internal { .. } => "agent-internal",
        }
    }
}

/// How the production runner ([`deploy::Deployer`]) runs components.
#[derive(Clone)]
pub struct RuntimeSettings {
    /// Use a container engine when one is reachable (for `docker:`
    /// components). Off: only `process:` components run.
    pub containers: bool,
    /// The engine's API address (`unix:///path.sock`); default: `DOCKER_HOST`,
    /// then Podman's and Docker's usual sockets.
    pub docker_host: Option<String>,
    /// Publish container components' ports on the host at this address
    /// (same port numbers); `None`: not published (reachable inside the
    /// stage's network only).
    pub publish_ports: Option<std::net::IpAddr>,
    /// Health window and settle time of new releases.
    pub deploy: deploy::DeployOptions,
    /// How often running stages are looked at again, so a component that
    /// starts failing later is reported.
    pub observe_interval: std::time::Duration,
    /// Where the artifacts of releases (image archives, process packages)
    /// come from; default: the hub, over HTTPS with the agent's
    /// certificate, cached in `<data>/artifacts`.
    pub artifacts: Option<Arc<dyn runtime::artifacts::ArtifactSource>>,
    /// The outpost's name on workload labels; default: from the identity.
    pub outpost: Option<String>,
    /// Serve the outpost's entry point (its ingresses); `None`: no entry
    /// point, components are reachable only by their published ports.
    pub ingress: Option<IngressSettings>,
    /// The devices the outpost offers its components (`--device`,
    /// `--gpu`); default: none.
    pub devices: devices::DeviceOffers,
    /// Where backups go and restores come from; default: the hub, over
    /// HTTPS with the agent's certificate ([`backup::HttpBackupHub`]).
    pub backups: Option<Arc<dyn backup::BackupHub>>,
}

/// Where and how the outpost's entry point listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressSettings {
    pub listen: std::net::SocketAddr,
    /// Where the HTTPS certificate comes from; `None`: plain HTTP.
    pub tls: Option<IngressTls>,
    /// The port clients connect to, for the URLs the outpost reports, when
    /// it is not the one listened on (a port forwarded by a firewall).
    pub public_port: Option<u16>,
}

/// The entry point's HTTPS certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IngressTls {
    /// A certificate chain and its key, PEM files the administrator
    /// provides (re-read when they change).
    Files { cert: PathBuf, key: PathBuf },
    /// Issued by the hub's CA for the names of the stages served, kept in
    /// `<data>/ingress-tls` and renewed by the agent.
    FromHub,
}

impl std::fmt::Debug for RuntimeSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeSettings")
            .field("containers", &self.containers)
            .field("docker_host", &self.docker_host)
            .field("publish_ports", &self.publish_ports)
            .field("deploy", &self.deploy)
            .field("observe_interval", &self.observe_interval)
            .field("artifacts", &self.artifacts.is_some())
            .field("outpost", &self.outpost)
            .field("ingress", &self.ingress)
            .field("devices", &self.devices)
            .field("backups", &self.backups.is_some())
            .finish()
    }
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        RuntimeSettings {
            containers: true,
            docker_host: None,
            publish_ports: None,
            deploy: deploy::DeployOptions::default(),
            observe_interval: reconciler::DEFAULT_OBSERVE_INTERVAL,
            artifacts: None,
            outpost: None,
            ingress: None,
            devices: devices::DeviceOffers::default(),
            backups: None,
        }
    }
}

/// How [`run`] is wired; the defaults are production's.
pub struct AgentOptions {
    /// What runs the stages; default a [`deploy::Deployer`] over the process
    /// runtime and, when an engine is reachable, the container runtime
    /// (see [`RuntimeSettings`]).
    pub runtime: Option<Arc<dyn StageRunner>>,
    pub runtime_settings: RuntimeSettings,
    /// How the hub is reached; default [`ws::HubConnector`] from the stored
    /// identity (which then must exist).
    pub connector: Option<Arc<dyn Connector>>,
    pub link: LinkConfig,
    /// Seed of the backoff jitter; default from the OS. Tests fix it.
    pub rng_seed: Option<u64>,
    pub state: StateOptions,
    /// How many distinct errors are kept while the hub is unreachable.
    pub error_log_capacity: usize,
    /// The binary and arguments to replace and restart with when the hub
    /// asks for another agent version; `None`: this agent does not update
    /// itself (it runs inside another program).
    pub self_update: Option<update::SelfUpdate>,
    /// The local address the link to the hub leaves from, for the default
    /// connector; `None`: the system's choice. The fleet benchmarks give
    /// each worker process's agents a loopback address of their own, as
    /// the agents of a real fleet each have their own host's address.
    pub link_source: Option<std::net::IpAddr>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            runtime: None,
            runtime_settings: RuntimeSettings::default(),
            connector: None,
            link: LinkConfig::default(),
            rng_seed: None,
            state: StateOptions::default(),
            error_log_capacity: report::DEFAULT_ERROR_LOG_CAPACITY,
            self_update: None,
            link_source: None,
        }
    }
}

impl std::fmt::Debug for AgentOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentOptions")
            .field("runtime", &self.runtime.is_some())
            .field("runtime_settings", &self.runtime_settings)
            .field("connector", &self.connector.is_some())
            .field("link", &self.link)
            .field("rng_seed", &self.rng_seed)
            .field("state", &self.state)
            .field("error_log_capacity", &self.error_log_capacity)
            .field("link_source", &self.link_source)
            .finish()
    }
}

/// Runs the agent on `data_dir` until `shutdown` completes (then `Ok`) or
/// the hub revokes the outpost ([`AgentError::Revoked`]). Stages keep their
/// last applied state when the agent stops.
pub async fn run(
    data_dir: &Path,
    options: AgentOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    // The entry point's certificate is checked first: a wrong file is the
    // operator's to fix before anything else happens.
    let fail = |message: String| AgentError::Ingress { message };
    let (certificates, kept_cert) = match options
        .runtime_settings
        .ingress
        .as_ref()
        .and_then(|i| i.tls.as_ref())
    {
        Some(IngressTls::Files { cert, key }) => (
            Some(
                trellis_ingress::Certificates::from_files(cert, key)
                    .map_err(|e| fail(e.to_string()))?,
            ),
            None,
        ),
        Some(IngressTls::FromHub) => {
            let (certificates, kept) = ingress_cert::initial(data_dir)?;
            (Some(certificates), Some(kept))
        }
        None => (None, None),
    };
    let state_path = data_dir.join(STATE_FILE);
    let state_options = options.state;
    let path = state_path.clone();
    let state = tokio::task::spawn_blocking(move || AgentState::open_with(&path, state_options))
        .await
        .map_err(|e| AgentError::Internal {
            what: format!("open its state file ({e})"),
        })??;
    let state = Arc::new(state);

    let connector: Arc<dyn Connector> = match options.connector {
        Some(connector) => connector,
        None => {
            if blocking(&state, |s| s.identity()).await?.is_none() {
                return Err(AgentError::NotJoined { path: state_path });
            }
            Arc::new(ws::HubConnector::new(state.clone()).with_source(options.link_source))
        }
    };
    let settings = options.runtime_settings;
    let observe_interval = settings.observe_interval;
    let arch = settings.deploy.arch.clone();
    let reporter = Arc::new(report::Reporter::new(
        state.clone(),
        options.error_log_capacity,
    ));
    let (trigger, signal) = Shutdown::channel();
    // Backups need the production runtimes' volumes; a restore the agent
    // was stopped in is finished before they start.
    let backups = match (&options.runtime, &settings.backups) {
        (Some(_), _) => None,
        (None, hub) => {
            let hub = hub
                .clone()
                .unwrap_or_else(|| Arc::new(backup::HttpBackupHub::new(state.clone())));
            let backups = Arc::new(backup::Backups::new(hub, data_dir));
            let recovering = backups.clone();
            tokio::task::spawn_blocking(move || recovering.recover())
                .await
                .map_err(|e| AgentError::Internal {
                    what: format!("finish an interrupted restore ({e})"),
                })?;
            Some(backups)
        }
    };
    let runtime: Arc<dyn StageRunner> = match options.runtime {
        Some(runtime) => runtime,
        None => {
            let outpost = outpost_name(&state, settings.outpost.clone()).await?;
            let routes = match &settings.ingress {
                Some(ingress) => Some(
                    serve_ingress(ingress, certificates.clone(), &outpost, signal.clone()).await?,
                ),
                None => None,
            };
            if let (Some(routes), Some(certificates), Some(kept)) =
                (&routes, certificates, kept_cert)
            {
                let keeper = ingress_cert::Keeper {
                    state: state.clone(),
                    reporter: reporter.clone(),
                    certificates,
                    dir: data_dir.join(ingress_cert::DIR),
                };
                tokio::spawn(keeper.run(kept, routes.certificate_names(), signal.clone()));
            }
            let traffic = routes.clone().map(|r| r as Arc<dyn runtime::Traffic>);
            let mut deployer = deployer(data_dir, &state, &outpost, settings, traffic)
                .await?
                .with_deliveries(reporter.deliveries().clone());
            if let Some(routes) = routes {
                deployer = deployer.with_ingress(routes);
            }
            let deployer = Arc::new(deployer);
            // What runs from before the agent started is served at once,
            // not only after the first observation or release.
            tokio::spawn({
                let deployer = deployer.clone();
                async move { deployer.route_all().await }
            });
            deployer
        }
    };
    let reconciler = reconciler::Reconciler::new(runtime.clone(), reporter.clone())
        .with_observe_interval(observe_interval);
    // A reference of our own, so that when the others are gone the last
    // one is dropped here and the state file is closed before `run`
    // returns (a weak reference would see the count reach zero while
    // another thread is still closing the file).
    let state_in_use = state.clone();
    let updater = options.self_update.map(|this| {
        let (updater, frames) = update::Updater::new(data_dir, state.clone(), arch.clone(), this);
        updater.after_restart();
        Arc::new(link::UpdaterLink {
            updater,
            frames: tokio::sync::Mutex::new(frames),
        })
    });
    let ctx = link::LinkContext {
        state,
        reporter,
        reconciler: reconciler.handle(),
        runtime,
        data_dir: data_dir.to_path_buf(),
        arch,
        backups,
        updater,
    };
    let rng = match options.rng_seed {
        Some(seed) => StdRng::seed_from_u64(seed),
        None => StdRng::from_entropy(),
    };

    let reconciler_task = tokio::spawn(reconciler.run(signal.clone()));
    let result = {
        let link = link::run_link(connector.as_ref(), &ctx, options.link, rng, signal);
        tokio::pin!(link);
        tokio::pin!(shutdown);
        tokio::select! {
            result = &mut link => result,
            _ = &mut shutdown => {
                trigger.trigger();
                // Let the link close politely (it tells the hub why).
                link.await
            }
        }
    };
    trigger.trigger();
    if let Err(e) = reconciler_task.await {
        tracing::error!(error = %e, "the reconciler task failed");
    }
    drop(ctx);
    // Calls on the state that the shutdown cut short may still be finishing
    // on a blocking thread; the state file is free (for the next `run` in
    // this process) once they are done. Runtimes that keep supervising
    // components after the agent stops may hold it longer; not waited for.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
    while Arc::strong_count(&state_in_use) > 1 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // Closing the file may write; not on an async worker.
    let _ = tokio::task::spawn_blocking(move || drop(state_in_use)).await;
    result
}

/// The production runner: the process runtime always, the container
/// runtime when an engine answers.
async fn deployer(
    data_dir: &Path,
    state: &Arc<AgentState>,
    outpost: &str,
    settings: RuntimeSettings,
    traffic: Option<Arc<dyn runtime::Traffic>>,
) -> Result<deploy::Deployer, AgentError> {
    let artifacts: Arc<dyn runtime::artifacts::ArtifactSource> = match settings.artifacts {
        Some(artifacts) => artifacts,
        None => {
            let cache = data_dir.join("artifacts");
            let store = trellis_cas::ChunkStore::open(&cache, trellis_cas::Durability::Cache)
                .map_err(|e| AgentError::Internal {
                    what: format!("open its artifact cache: {e}"),
                })?;
            Arc::new(runtime::artifacts::HubArtifacts::new(state.clone(), store))
        }
    };
    let mut runtimes: Vec<Arc<dyn runtime::Runtime>> = vec![Arc::new(
        runtime::process::ProcessRuntime::new(data_dir.join("processes"), artifacts.clone()),
    )];
    if settings.containers {
        let publish = runtime::container::PublishPolicy {
            publish: settings.publish_ports.is_some(),
            host_ip: settings
                .publish_ports
                .map(|ip| ip.to_string())
                .unwrap_or_else(|| "127.0.0.1".into()),
        };
        match runtime::container::ContainerRuntime::connect(
            settings.docker_host.as_deref(),
            outpost,
            data_dir,
            publish,
        )
        .await
        {
            Ok(containers) => {
                let mut containers = containers.with_artifacts(artifacts.clone());
                if let Some(traffic) = traffic {
                    containers = containers.with_traffic(traffic);
                }
                runtimes.push(Arc::new(containers));
            }
            // Asked for by address: the operator should hear that it failed.
            Err(e) if settings.docker_host.is_some() => tracing::error!(
                error = %e.sentence(),
                "the container engine given with --docker-host does not answer; only process components run on this outpost"
            ),
            Err(e) => tracing::info!(
                error = %e.sentence(),
                "no container engine answered; only process components run on this outpost"
            ),
        }
    }
    for r in &runtimes {
        let info = r.describe();
        tracing::info!(runtime = %r.kind(), engine = %info.name, version = %info.version, "runtime ready");
    }
    for offer in settings.devices.offers() {
        tracing::info!(device = %offer.name, exclusive = offer.exclusive, "offering a device");
    }
    Ok(deploy::Deployer::new(data_dir, runtimes, settings.deploy)
        .with_artifacts(artifacts)
        .with_devices(settings.devices.for_outpost(outpost))
        .with_seal(state.seal_key()))
}

/// The outpost's name: given, or from the identity.
async fn outpost_name(
    state: &Arc<AgentState>,
    given: Option<String>,
) -> Result<String, AgentError> {
    Ok(match given {
        Some(name) => name,
        None => blocking(state, |s| s.identity())
            .await?
            .map(|id| id.outpost)
            .unwrap_or_else(|| trellis_model::LOCAL_OUTPOST.to_owned()),
    })
}

/// Binds the entry point and serves it until `shutdown`; its routes are
/// the deployer's to set.
async fn serve_ingress(
    settings: &IngressSettings,
    certificates: Option<trellis_ingress::Certificates>,
    outpost: &str,
    mut shutdown: Shutdown,
) -> Result<Arc<ingress::IngressRoutes>, AgentError> {
    let fail = |message: String| AgentError::Ingress { message };
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|e| {
            fail(format!(
                "listening on {} failed ({e}); free the port or give another with --ingress-listen",
                settings.listen
            ))
        })?;
    let bound = listener.local_addr().map_err(|e| fail(e.to_string()))?;
    let base = ingress::PublicBase {
        scheme: if certificates.is_some() {
            "https"
        } else {
            "http"
        },
        port: settings.public_port.unwrap_or(bound.port()),
    };
    tracing::info!(listen = %bound, scheme = base.scheme, "the outpost's entry point is serving");
    let entry = trellis_ingress::Ingress::new(outpost);
    let routes = Arc::new(ingress::IngressRoutes::new(entry.clone(), base));
    tokio::spawn(async move {
        if let Err(e) = entry
            .serve(listener, certificates, async move { shutdown.wait().await })
            .await
        {
            tracing::error!(error = %e, "the outpost's entry point stopped");
        }
    });
    Ok(routes)
}

/// Runs a call on the (synchronous, fsyncing) state off the async threads.
pub(crate) async fn blocking<T, F>(state: &Arc<AgentState>, f: F) -> Result<T, AgentError>
where
    T: Send + 'static,
    F: FnOnce(&AgentState) -> Result<T, StateError> + Send + 'static,
{
    let state = state.clone();
    tokio::task::spawn_blocking(move || f(&state))
        .await
        .map_err(|e| AgentError::Internal {
            what: format!("finish a call on its state file ({e})"),
        })?
        .map_err(AgentError::State)
}
