//! The state every request handler shares.

use std::sync::{Arc, OnceLock};

use crate::chunks::Chunks;
use tokio_util::sync::CancellationToken;
use trellis_link::identity::HubCa;
use trellis_store::Store;

use crate::auth::KeyVerifier;
use crate::cluster::Cluster;
use crate::link::Links;
use crate::link::artifacts::ArtifactAccess;
use crate::outposts::LinkSecret;

/// Cheap to clone: one `Arc` around everything.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

struct Inner {
    store: Arc<dyn Store>,
    chunks: Chunks,
    keys: KeyVerifier,
    link_secret: LinkSecret,
    ca: HubCa,
    links: Links,
    cluster: Cluster,
    artifact_access: ArtifactAccess,
    /// Backups in progress: uploads not yet recorded, manifests' chunks.
    backups: crate::backups::BackupTracker,
    /// What the rollout driver counted.
    rollouts: crate::rollouts::Counters,
    /// `(host, port)` under which users and agents reach this hub; it goes
    /// into Outpost URIs. Set once, before the first request is served.
    public_address: OnceLock<(String, u16)>,
    /// The public-key pin of the hub's TLS key (`sha256//…`, as `curl
    /// --pinnedpubkey` takes it), once it serves TLS: what the install
    /// script and the command that fetches it trust the hub by.
    tls_pin: OnceLock<String>,
    /// Cancelled when the hub shuts down, so that responses that never end
    /// by themselves (live status streams) end and let shutdown finish.
    shutdown: CancellationToken,
}

impl AppState {
    pub fn new(
        store: Arc<dyn Store>,
        chunks: Chunks,
        link_secret: LinkSecret,
        ca: HubCa,
        links: Links,
        cluster: Cluster,
    ) -> Self {
        AppState(Arc::new(Inner {
            store,
            chunks,
            keys: KeyVerifier::default(),
            link_secret,
            ca,
            links,
            cluster,
            artifact_access: ArtifactAccess::default(),
            backups: crate::backups::BackupTracker::default(),
            rollouts: crate::rollouts::Counters::default(),
            public_address: OnceLock::new(),
            tls_pin: OnceLock::new(),
            shutdown: CancellationToken::new(),
        }))
    }

    pub fn store(&self) -> &dyn Store {
        self.0.store.as_ref()
    }

    /// The store, for a task that outlives the request.
    pub fn store_handle(&self) -> Arc<dyn Store> {
        self.0.store.clone()
    }

    /// Queues what a link session saw for the store (see
    /// [`crate::link::record`]).
    pub fn record_link_activity(&self, activity: trellis_store::LinkActivity) {
        self.0.links.recorder.record(self.store_handle(), activity);
    }

    /// Writes what an agent acknowledged or reported, committed together
    /// with other links' writes (see [`crate::link::commit`]); returns once
    /// it is durable.
    pub async fn record_sync(
        &self,
        update: trellis_store::SyncUpdate,
    ) -> Result<trellis_model::StageSync, String> {
        self.0.links.syncs.write(self.store_handle(), update).await
    }

    /// What [`trellis_store::Store::outpost_desired`] answers for
    /// `outpost`, read together with other sessions' questions (see
    /// [`crate::link::reads`]).
    pub async fn outpost_desired(
        &self,
        outpost: &str,
        held: &std::collections::HashMap<trellis_store::StageKey, u64>,
    ) -> Result<Vec<trellis_store::OutpostStage>, String> {
        self.0
            .links
            .desired_reads
            .read(self.store_handle(), outpost, held)
            .await
    }

    /// The artifact store: every build's images and packages, as chunks.
    pub fn chunks(&self) -> &Chunks {
        &self.0.chunks
    }

    pub fn keys(&self) -> &KeyVerifier {
        &self.0.keys
    }

    pub fn ca(&self) -> &HubCa {
        &self.0.ca
    }

    /// Which artifacts each outpost's agent may fetch.
    pub fn artifact_access(&self) -> &ArtifactAccess {
        &self.0.artifact_access
    }

    /// Backups in progress (see [`crate::backups`]).
    pub fn backups(&self) -> &crate::backups::BackupTracker {
        &self.0.backups
    }

    /// What the rollout driver counted (see [`crate::rollouts`]).
    pub fn rollout_counters(&self) -> &crate::rollouts::Counters {
        &self.0.rollouts
    }

    pub fn links(&self) -> &Links {
        &self.0.links
    }

    /// This hub instance among those sharing the store.
    pub fn cluster(&self) -> &Cluster {
        &self.0.cluster
    }

    /// Cancelled when the hub shuts down.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.0.shutdown
    }

    pub fn link_secret(&self) -> &LinkSecret {
        &self.0.link_secret
    }

    /// Sets the public address unless it is set already; returns the one
    /// in force.
    pub fn set_public_address(&self, host: String, port: u16) -> (String, u16) {
        self.0.public_address.get_or_init(|| (host, port)).clone()
    }

    pub fn set_tls_pin(&self, pin: String) {
        let _ = self.0.tls_pin.set(pin);
    }

    /// See [`Inner::tls_pin`]; `None` when the hub serves no TLS itself.
    pub fn tls_pin(&self) -> Option<&str> {
        self.0.tls_pin.get().map(String::as_str)
    }

    /// The URL users and agents reach the hub at: `https://host:port`.
    pub fn public_url(&self) -> String {
        let (host, port) = self.public_address();
        if host.contains(':') {
            format!("https://[{host}]:{port}")
        } else {
            format!("https://{host}:{port}")
        }
    }

    pub fn public_address(&self) -> (String, u16) {
        self.0
            .public_address
            .get()
            .cloned()
            // Only reachable before `Hub::serve`, when no request is handled.
            .unwrap_or_else(|| ("localhost".into(), 7440))
    }
}
