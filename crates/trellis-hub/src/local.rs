//! The hub's local outpost: an agent embedded in the hub process, linked to
//! the hub through an in-memory link instead of a socket. Stages that are
//! not placed on a remote outpost run here, through exactly the same
//! session, sync and status code as remote ones.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::Utc;
use tokio_util::sync::CancellationToken;
use trellis_agent::{ConnectError, Connector};
use trellis_link::LinkIo;
use trellis_link::identity::{KeyFingerprint, PeerIdentity};
use trellis_model::LOCAL_OUTPOST;

use crate::state::AppState;

/// Directory of the local outpost's agent, under the hub's data directory.
pub const LOCAL_AGENT_DIR: &str = "local-outpost";

struct LocalConnector {
    state: AppState,
}

#[async_trait]
impl Connector for LocalConnector {
    async fn connect(&self) -> Result<Box<dyn LinkIo>, ConnectError> {
        let (hub_end, agent_end) = trellis_link::mem::pair();
        // The local agent is part of the hub; its identity is given, not
        // proven with a certificate.
        let peer = PeerIdentity {
            outpost: LOCAL_OUTPOST.to_owned(),
            serial_hex: "local".to_owned(),
            not_after: Utc::now() + chrono::Duration::days(36_500),
            public_key_fingerprint: KeyFingerprint([0; 32]),
        };
        tokio::spawn(crate::link::session::run(
            Box::new(hub_end),
            peer,
            self.state.clone(),
        ));
        Ok(Box::new(agent_end))
    }
}

/// Runs the local outpost's agent until `shutdown`.
pub fn spawn(
    state: AppState,
    data_dir: PathBuf,
    mut runtime: trellis_agent::RuntimeSettings,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        let dir = data_dir.join(LOCAL_AGENT_DIR);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::error!(error = %e, dir = %dir.display(), "cannot create the local outpost's directory");
            return;
        }
        // The local agent reads artifacts from the hub's own store.
        runtime.artifacts = Some(Arc::new(
            trellis_agent::runtime::artifacts::LocalArtifacts::new(state.chunks().clone()),
        ));
        runtime.outpost = Some(LOCAL_OUTPOST.to_owned());
        let options = trellis_agent::AgentOptions {
            connector: Some(Arc::new(LocalConnector { state })),
            runtime_settings: runtime,
            ..Default::default()
        };
        if let Err(e) = trellis_agent::run(&dir, options, shutdown.cancelled_owned()).await {
            tracing::error!(error = %e, "the local outpost's agent stopped");
        }
    });
}
