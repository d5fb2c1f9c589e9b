//! Hub start-up and serving.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use chrono::Utc;
use tokio::net::TcpListener;
use trellis_model::{AccessKey, LOCAL_OUTPOST, Outpost, User};
use trellis_store::sqlite::SqliteStore;
use trellis_store::{Store, StoreError};

use crate::auth::mint_key;
use crate::link::{LinkSettings, Links};
use crate::outposts::LinkSecret;
use crate::state::AppState;

/// File in the data directory holding the first administrator key.
pub const ADMIN_KEY_FILE: &str = "admin.key";
/// File in the data directory holding the secret Outpost URI keys are
/// derived from.
pub const LINK_SECRET_FILE: &str = "link.secret";
/// The first administrator's user name.
pub const ADMIN_USER: &str = "admin";
/// The default store's database file in the data directory.
pub const DATABASE_FILE: &str = "hub.db";

#[derive(Debug, Clone, Default)]
pub struct HubOptions {
    /// Where the database, the artifacts, `admin.key` and `link.secret` live.
    pub data_dir: PathBuf,
    /// The store: `None` for SQLite in the data directory (`hub.db`), or a
    /// `postgres://` URL, which several hubs may share.
    pub store: Option<String>,
    /// Pooled connections to PostgreSQL (default 10).
    pub store_connections: Option<u32>,
    /// The artifact store: `None` for the directory `artifacts/` in the
    /// data directory, or `s3://BUCKET[/PREFIX]?endpoint=…`.
    pub chunks: Option<String>,
    /// An artifact store the caller opened (tests), used instead of
    /// `chunks`.
    pub chunk_store: Option<crate::chunks::Chunks>,
    /// `host:port` under which users and agents reach the hub, as written
    /// into Outpost URIs. Defaults to the address the hub listens on.
    pub public_address: Option<String>,
    /// Heartbeat, admission and certificate settings of the outpost link.
    pub link: LinkSettings,
    /// How the local outpost's agent runs components (container engine,
    /// published ports, health window). Its packages always come straight
    /// from the hub's artifact store.
    pub local_runtime: trellis_agent::RuntimeSettings,
    /// How long deleted (archived) projects and stages are kept before
    /// they are purged; [`crate::archive::DEFAULT_RETENTION`] when `None`.
    pub archive_retention: Option<std::time::Duration>,
    /// Do not run the local outpost's agent. On a store several hubs share
    /// it runs on one instance at a time (a job lock), where it runs at all.
    pub no_local_outpost: bool,
    /// With a store several hubs share: the key the secrets every instance
    /// needs (CA, link secret) are sealed with in the store (see
    /// [`crate::cluster::secrets`]). Without it each instance uses its data
    /// directory's own.
    pub cluster_key: Option<crate::cluster::secrets::ClusterKey>,
    /// `host:port` at which the other hub instances reach this one
    /// (default: the listen address, which must then be a specific one).
    pub instance_address: Option<String>,
    /// Agent binaries to hold from the start (`--agent-binary`), each
    /// registered under the version it prints with `--version` (see
    /// [`crate::agent_binaries::register_file`]).
    pub agent_binaries: Vec<PathBuf>,
}

/// A hub ready to serve.
pub struct Hub {
    state: AppState,
    data_dir: PathBuf,
    local_runtime: trellis_agent::RuntimeSettings,
    archive_retention: std::time::Duration,
    no_local_outpost: bool,
    instance_address: Option<String>,
    admin_key: Option<AccessKey>,
}

impl Hub {
    /// Opens (or creates) the hub's data directory and the store the
    /// options name: SQLite in the data directory, or PostgreSQL.
    pub async fn open(options: HubOptions) -> anyhow::Result<Hub> {
        create_private_dir(&options.data_dir)?;
        let store = open_store(
            &options.data_dir,
            options.store.as_deref(),
            options.store_connections,
        )
        .await?;
        Self::open_with_store(options, store).await
    }

    /// Opens the hub over a store the caller chose (tests use the
    /// in-memory one).
    pub async fn open_with_store(
        options: HubOptions,
        store: Arc<dyn Store>,
    ) -> anyhow::Result<Hub> {
        create_private_dir(&options.data_dir)?;
        let chunks = match &options.chunk_store {
            Some(chunks) => chunks.clone(),
            None => {
                crate::chunks::Chunks::open(options.chunks.as_deref(), &options.data_dir).await?
            }
        };
        if let Some(key) = &options.cluster_key {
            crate::cluster::secrets::share(store.as_ref(), &options.data_dir, key).await?;
        }
        let link_secret = LinkSecret::load_or_create(&options.data_dir.join(LINK_SECRET_FILE))?;
        let config_key_file = options.data_dir.join(crate::sealed::CONFIG_KEY_FILE);
        let config_key = trellis_agent::seal::SealKey::load_or_create(&config_key_file)
            .with_context(|| format!("reading the config key {}", config_key_file.display()))?;
        let store: Arc<dyn Store> = Arc::new(crate::sealed::SealedStore::new(store, config_key));
        let admin_key = bootstrap_admin(store.as_ref(), &options.data_dir).await?;
        ensure_local_outpost(store.as_ref()).await?;
        let ca = crate::tls::load_or_create_ca(&options.data_dir)?;
        let timing =
            crate::cluster::Timing::for_heartbeat(options.link.heartbeat, options.link.resync);
        let cluster = crate::cluster::Cluster::new(store.is_shared(), timing);
        let state = AppState::new(
            store,
            chunks,
            link_secret,
            ca,
            Links::new(options.link.clone()),
            cluster,
        );
        state
            .links()
            .profiles
            .load(state.store())
            .await
            .context("reading the outposts' link profiles")?;
        if let Some(address) = &options.public_address {
            let (host, port) = split_address(address)?;
            state.set_public_address(host, port);
        }
        for path in &options.agent_binaries {
            let binary = crate::agent_binaries::register_file(&state, path).await?;
            tracing::info!(version = %binary.version, arch = %binary.arch, "holding agent binary");
        }
        Ok(Hub {
            state,
            data_dir: options.data_dir,
            local_runtime: options.local_runtime,
            archive_retention: options
                .archive_retention
                .unwrap_or(crate::archive::DEFAULT_RETENTION),
            no_local_outpost: options.no_local_outpost,
            instance_address: options.instance_address,
            admin_key,
        })
    }

    /// The administrator key created by this start, if this was the first
    /// start of the data directory. Show it once; it is also in
    /// `<data>/admin.key`.
    pub fn first_admin_key(&self) -> Option<&AccessKey> {
        self.admin_key.as_ref()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Everything the hub serves over HTTP.
    pub fn router(&self) -> axum::Router {
        let link = axum::Router::new()
            .route("/link/v1", axum::routing::get(crate::link::endpoint::link))
            .route("/metrics", axum::routing::get(crate::metrics::metrics))
            .with_state(self.state.clone());
        axum::Router::new()
            .merge(crate::console::router(self.state.clone()))
            .merge(link)
            .merge(crate::install::router(self.state.clone()))
            .nest("/api/v1", crate::api::router(self.state.clone()))
            .layer(axum::middleware::from_fn(crate::drain::unread_body))
            // A 503 from the link's admission control is back-pressure, not
            // a fault; failures are for debugging, errors are logged where
            // they are handled.
            .layer(tower_http::trace::TraceLayer::new_for_http().on_failure(
                tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG),
            ))
    }

    /// Serves until `shutdown` resolves, then finishes in-flight requests.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let local = listener.local_addr()?;
        self.state
            .set_public_address(local.ip().to_string(), local.port());
        self.set_instance_address(local)
            .map_err(std::io::Error::other)?;
        let cancel = self.start_background(shutdown);
        let router = self.router();
        axum::serve(listener, router)
            .with_graceful_shutdown(cancel.cancelled_owned())
            .await
    }

    /// Starts what runs beside the server (the local outpost's agent) and
    /// returns the token that `shutdown` cancels.
    fn start_background(
        &self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> tokio_util::sync::CancellationToken {
        let cancel = self.state.shutdown_token().clone();
        let trigger = cancel.clone();
        tokio::spawn(async move {
            shutdown.await;
            trigger.cancel();
        });
        crate::cluster::spawn(self.state.clone(), cancel.clone());
        if !self.no_local_outpost {
            let (data_dir, runtime) = (self.data_dir.clone(), self.local_runtime.clone());
            crate::cluster::lead(
                self.state.clone(),
                "local-outpost",
                cancel.clone(),
                move |state, stop| {
                    crate::local::run(state, data_dir.clone(), runtime.clone(), stop)
                },
            );
        }
        crate::cluster::lead(
            self.state.clone(),
            "collect-garbage",
            cancel.clone(),
            crate::gc::run,
        );
        crate::cluster::lead(
            self.state.clone(),
            "backup-schedule",
            cancel.clone(),
            crate::backup_schedule::run,
        );
        crate::cluster::lead(
            self.state.clone(),
            "rollouts",
            cancel.clone(),
            crate::rollouts::run,
        );
        let retention = self.archive_retention;
        crate::cluster::lead(
            self.state.clone(),
            "purge-archives",
            cancel.clone(),
            move |state, stop| crate::archive::run(state, retention, stop),
        );
        if self.state.cluster().is_shared() {
            crate::cluster::lead(
                self.state.clone(),
                "forget-dead-instances",
                cancel.clone(),
                crate::cluster::forget_dead_instances,
            );
        }
        cancel
    }

    /// Where the other instances reach this one: the address given, else
    /// the listen address. Needed only on a shared store.
    fn set_instance_address(&self, local: std::net::SocketAddr) -> anyhow::Result<()> {
        let address = match &self.instance_address {
            Some(address) => {
                split_address(address).map_err(|_| {
                    anyhow::anyhow!(
                        "the instance address {address:?} is not host:port (the address the other hub instances reach this one at)"
                    )
                })?;
                address.clone()
            }
            None if local.ip().is_unspecified() => {
                if self.state.cluster().is_shared() {
                    anyhow::bail!(
                        "this hub listens on all interfaces ({local}) and shares its store with other hub instances, which must reach it: give --instance-address host:port (this host's address among the instances)"
                    );
                }
                return Ok(());
            }
            None => local.to_string(),
        };
        self.state.cluster().set_address(address);
        Ok(())
    }

    /// Serves HTTPS (the API, the console and the outpost link on one port)
    /// until `shutdown` resolves. The server certificate is issued by the
    /// hub's CA for the public address, the listen address and localhost.
    pub async fn serve_tls(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let local = listener.local_addr()?;
        let (host, _) = self
            .state
            .set_public_address(local.ip().to_string(), local.port());
        self.set_instance_address(local)?;
        let mut names = vec!["localhost".to_owned()];
        let mut ips: Vec<std::net::IpAddr> = vec![
            std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::Ipv6Addr::LOCALHOST.into(),
        ];
        match host.parse::<std::net::IpAddr>() {
            Ok(ip) => ips.push(ip),
            Err(_) => names.push(host.clone()),
        }
        if !local.ip().is_unspecified() {
            ips.push(local.ip());
        }
        // The other instances call this one at its instance address.
        if let Some(address) = self.state.cluster().address()
            && let Ok((instance_host, _)) = split_address(address)
        {
            match instance_host.parse::<std::net::IpAddr>() {
                Ok(ip) => ips.push(ip),
                Err(_) => names.push(instance_host),
            }
        }
        names.dedup();
        ips.sort();
        ips.dedup();
        let key = crate::tls::load_or_create_server_key(&self.data_dir)?;
        self.state
            .set_tls_pin(trellis_link::identity::HubCa::public_key_pin(&key)?);
        let config = crate::tls::server_tls_with_key(self.state.ca(), &names, &ips, &key)?;
        let cancel = self.start_background(shutdown);
        let settings = self.state.links().settings().clone();
        let gauge = self.state.links().handshakes.clone();
        let router = self.router();
        crate::tls::serve(
            listener,
            router,
            config,
            settings.max_handshakes,
            gauge,
            cancel,
        )
        .await?;
        Ok(())
    }
}

/// The store a hub uses: PostgreSQL when `store` names one (`--store`),
/// else SQLite in its data directory.
async fn open_store(
    data_dir: &Path,
    store: Option<&str>,
    connections: Option<u32>,
) -> anyhow::Result<Arc<dyn Store>> {
    if let Some(url) = store {
        return Ok(Arc::new(open_postgres(url, connections).await?));
    }
    let db = data_dir.join(DATABASE_FILE);
    let store = SqliteStore::open(&db)
        .await
        .with_context(|| format!("opening the hub database {}", db.display()))?;
    Ok(Arc::new(store))
}

/// The store of a hub that has run with this data directory before, for
/// commands that work on its data (the hub may be running: the store
/// serialises writers): `store` is the hub's `--store`, if it has one.
/// Refuses a directory that holds no hub, so a typo does not make an empty
/// one.
pub async fn open_existing_store(
    data_dir: &Path,
    store: Option<&str>,
) -> anyhow::Result<Arc<dyn Store>> {
    if let Some(url) = store {
        return Ok(Arc::new(open_postgres(url, None).await?));
    }
    let db = data_dir.join(DATABASE_FILE);
    if !db.is_file() {
        anyhow::bail!(
            "{} holds no hub database ({DATABASE_FILE}); give the directory the hub runs with \
             (`trellis hub --data DIR`, or TRELLIS_DATA)",
            data_dir.display()
        );
    }
    open_store(data_dir, None, None).await
}

/// Mints a fresh key for the administrator [`ADMIN_USER`] — created again,
/// or made an administrator again, if needed — and writes it to
/// `<data>/admin.key` as the first start does: for when every
/// administrator key is lost. Keys that exist stay valid. Works while the
/// hub runs: it looks keys up in the store on every request.
pub async fn reset_admin_key(store: &dyn Store, data_dir: &Path) -> anyhow::Result<AccessKey> {
    match store
        .create_user(&User {
            name: ADMIN_USER.into(),
            admin: true,
            created_at: Utc::now(),
        })
        .await
    {
        Ok(()) | Err(StoreError::AlreadyExists { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    // Promoting is never refused.
    store.set_user_admin(ADMIN_USER, true).await?;
    let minted = mint_key(ADMIN_USER, "reset with `trellis hub reset-admin-key`")?;
    // Written before it is stored, as at the first start: a failure in
    // between leaves no key that nobody knows.
    crate::tls::write_file(
        &data_dir.join(ADMIN_KEY_FILE),
        &format!("{}\n", minted.key),
        0o600,
    )?;
    store.create_access_key(&minted.stored).await?;
    Ok(minted.key)
}

/// Opens a `postgres://` store, or says what is wrong with the URL.
pub async fn open_postgres(
    url: &str,
    connections: Option<u32>,
) -> anyhow::Result<trellis_store::postgres::PgStore> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        anyhow::bail!(
            "the store {:?} is not a PostgreSQL URL; give postgres://USER:PASSWORD@HOST:PORT/DATABASE, or leave --store out for SQLite in the data directory",
            redact(url)
        );
    }
    let mut options = trellis_store::postgres::PgOptions::default();
    if let Some(n) = connections {
        options.max_connections = n.max(2);
    }
    trellis_store::postgres::PgStore::open(url, &options)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("the hub cannot use its PostgreSQL store (--store / TRELLIS_STORE)")
}

/// A URL with its password replaced, for messages.
pub fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
                None => url.to_owned(),
            },
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the hub's data directory {}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting access to {}", dir.display()))?;
    }
    Ok(())
}

/// On the first start (no users yet) creates the `admin` user and a key for
/// it. The key file is written before the key is stored, so a crash in
/// between leaves no key that nobody knows: the next start simply makes a
/// new one.
async fn bootstrap_admin(store: &dyn Store, data_dir: &Path) -> anyhow::Result<Option<AccessKey>> {
    if !store.list_users().await?.is_empty() {
        return Ok(None);
    }
    let minted = mint_key(ADMIN_USER, "created at first start")?;
    crate::tls::write_file(
        &data_dir.join(ADMIN_KEY_FILE),
        &format!("{}\n", minted.key),
        0o600,
    )?;
    match store
        .create_user(&User {
            name: ADMIN_USER.into(),
            admin: true,
            created_at: Utc::now(),
        })
        .await
    {
        Ok(()) | Err(StoreError::AlreadyExists { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    store.create_access_key(&minted.stored).await?;
    Ok(Some(minted.key))
}

async fn ensure_local_outpost(store: &dyn Store) -> anyhow::Result<()> {
    let local = Outpost {
        name: LOCAL_OUTPOST.into(),
        display_name: "Hub (local)".into(),
        description:
            "The outpost embedded in the hub; stages not placed on a remote outpost run here."
                .into(),
        labels: Default::default(),
        max_stages: None,
        uri_generation: 1,
        revoked_at: None,
        ingress_domain: None,
        created_at: Utc::now(),
    };
    match store.create_outpost(&local).await {
        Ok(()) | Err(StoreError::AlreadyExists { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Splits `host:port` (IPv6 in brackets).
fn split_address(address: &str) -> anyhow::Result<(String, u16)> {
    let bad = || {
        anyhow::anyhow!(
            "the public address {address:?} is not host:port (e.g. hub.example.com:7440 or [2001:db8::1]:7440)"
        )
    };
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}
