//! `trellis agent join` and `trellis agent run`: the Outpost Agent on the
//! outpost's host.

use std::path::Path;

use anyhow::{Context, bail};
use trellis_link::identity::JoinToken;

use crate::cli::RuntimeArgs;

/// Enrols this host with a join token, then runs the agent unless told not
/// to.
pub async fn join(
    hub: &str,
    token: &str,
    data: &Path,
    no_run: bool,
    runtime: &RuntimeArgs,
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
    let identity = trellis_agent::join(&token, data).await.map_err(|e| {
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
            "start the agent with: trellis agent run --data {}",
            data.display()
        );
        return Ok(());
    }
    run(data, runtime).await
}

/// Runs the agent until Ctrl-C or SIGTERM. Components keep running when it
/// stops; the next start adopts them.
pub async fn run(data: &Path, runtime: &RuntimeArgs) -> anyhow::Result<()> {
    trellis_link::identity::install_crypto_provider();
    println!("agent running (data in {}); Ctrl-C to stop", data.display());
    trellis_agent::run(
        data,
        trellis_agent::AgentOptions {
            runtime_settings: runtime.settings(),
            ..Default::default()
        },
        super::hub::shutdown_signal(),
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))
    .context("running the agent")
}
