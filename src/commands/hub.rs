//! `trellis hub`.

use anyhow::{Context, bail};
use trellis_hub::link::LinkSettings;
use trellis_hub::{ADMIN_KEY_FILE, CA_CERT_FILE, Hub, HubOptions};

use crate::cli::{HubArgs, StoreArgs};

/// Connections the kernel holds for the hub until it accepts them. Tokio's
/// default (1,024) overflows when a whole fleet reconnects after a hub
/// restart while the hub admits a few dozen TLS handshakes at a time: the
/// kernel then drops connection attempts, and each such agent waits out
/// TCP's retransmission timers (1 s, 3 s, 7 s, …) on top of its own
/// backoff. The kernel caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 16_384;

pub(super) async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let listen = || -> std::io::Result<tokio::net::TcpListener> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // As `TcpListener::bind` does: a restarted hub can listen again
        // while the old connections linger in TIME_WAIT.
        #[cfg(unix)]
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    listen().with_context(|| {
        format!("cannot listen on {addr}; is another hub running there? Choose another address with --listen (port 0 picks a free one)")
    })
}

use trellis_agent::cli::shutdown_signal;

pub async fn hub(args: HubArgs) -> anyhow::Result<()> {
    if args.listen.ip().is_unspecified() && args.public_address.is_none() {
        bail!(
            "the hub listens on {} but has no public address to put into Outpost URIs and join tokens; \
             give --public-address host:port (the name agents and users reach it by)",
            args.listen
        );
    }
    let mut link = LinkSettings::default();
    if let Some(secs) = args.heartbeat_secs {
        link.heartbeat = std::time::Duration::from_secs(secs.max(1));
    }
    if let Some(rate) = args.admissions_per_sec {
        link.admissions_per_sec = rate.max(1);
    }
    if let Some(n) = args.max_streams_per_outpost {
        link.streams.per_outpost = n;
    }
    if let Some(n) = args.max_streams_per_user {
        link.streams.per_user = n;
    }
    if let Some(n) = args.max_handshakes {
        link.max_handshakes = n.max(1);
    }
    if let Some(secs) = args.cert_validity_secs {
        link.cert_validity = std::time::Duration::from_secs(secs.max(1));
    }
    // Several hubs share a PostgreSQL store: they share their CA and link
    // secret through it, sealed with the cluster key.
    let shared = args.store.is_some();
    let cluster_key = if shared {
        std::fs::create_dir_all(&args.data)
            .with_context(|| format!("creating the data directory {}", args.data.display()))?;
        Some(trellis_hub::cluster::secrets::ClusterKey::find_or_create(
            &args.data,
        )?)
    } else {
        None
    };
    let hub = Hub::open(HubOptions {
        data_dir: args.data.clone(),
        store: args.store.clone(),
        store_connections: args.store_connections,
        chunks: args.chunks.clone(),
        public_address: args.public_address.clone(),
        link,
        local_runtime: args.runtime.settings()?,
        archive_retention: Some(args.archive_retention),
        no_local_outpost: shared && !args.local_outpost,
        cluster_key: cluster_key.as_ref().map(|(key, _)| key.clone()),
        instance_address: args.instance_address.clone(),
        agent_binaries: args.agent_binaries.clone(),
        ..HubOptions::default()
    })
    .await?;
    if let Some((_, made)) = &cluster_key
        && *made
    {
        println!(
            "made the cluster key, in {} (keep it with the database's backups; it is the \
             cluster's secret, so it is not printed); to add a hub instance on another host, \
             copy that file there and run:",
            args.data
                .join(trellis_hub::cluster::secrets::CLUSTER_KEY_FILE)
                .display()
        );
        println!(
            "  {}=\"$(cat {})\" trellis hub --store '{}'{} --public-address {} --listen 0.0.0.0:{} --instance-address THAT-HOST:{}",
            trellis_hub::cluster::secrets::CLUSTER_KEY_ENV,
            trellis_hub::cluster::secrets::CLUSTER_KEY_FILE,
            args.store
                .as_deref()
                .map(trellis_hub::redact_url)
                .unwrap_or_default(),
            args.chunks
                .as_deref()
                .map(|c| format!(" --chunks '{c}'"))
                .unwrap_or_default(),
            args.public_address.as_deref().unwrap_or("BALANCER:7440"),
            args.listen.port(),
            args.listen.port(),
        );
    }
    let listener = bind(args.listen).await?;
    let addr = listener.local_addr()?;
    if let Some(key) = hub.first_admin_key() {
        println!(
            "first start: created the administrator key (shown once; also in {}):",
            args.data.join(ADMIN_KEY_FILE).display()
        );
        println!("{key}");
    }
    println!(
        "clients trust the hub's CA with TRELLIS_CA_CERT={}",
        args.data.join(CA_CERT_FILE).display()
    );
    // Tests and scripts read this line to find a hub started on port 0.
    println!("hub listening on https://{addr}");
    hub.serve_tls(listener, shutdown_signal()).await?;
    Ok(())
}

/// `trellis hub reset-admin-key --data DIR [--store URL]`.
pub async fn reset_admin_key(args: StoreArgs) -> anyhow::Result<()> {
    if args.store.is_some() {
        std::fs::create_dir_all(&args.data)
            .with_context(|| format!("creating the data directory {}", args.data.display()))?;
    }
    let store = trellis_hub::open_existing_store(&args.data, args.store.as_deref()).await?;
    let key = trellis_hub::reset_admin_key(store.as_ref(), &args.data).await?;
    println!(
        "a new administrator key (shown once; also in {}):",
        args.data.join(ADMIN_KEY_FILE).display()
    );
    println!("{key}");
    Ok(())
}

/// `trellis hub migrate`: copies a SQLite hub into PostgreSQL, all or
/// nothing, and says what it copied and how to go on.
pub async fn migrate(from: &std::path::Path, to: &str) -> anyhow::Result<()> {
    let (file, data_dir) = if from.is_dir() {
        (from.join("hub.db"), from.to_owned())
    } else {
        (
            from.to_owned(),
            from.parent()
                .map(std::path::Path::to_owned)
                .unwrap_or_default(),
        )
    };
    if !file.is_file() {
        bail!(
            "there is no SQLite hub at {}; give --from the hub's data directory (the one holding hub.db) or its hub.db file",
            file.display()
        );
    }
    let sqlite = trellis_store::sqlite::SqliteStore::open(&file)
        .await
        .with_context(|| format!("opening the hub's SQLite store {}", file.display()))?;
    let pg = trellis_store::postgres::PgStore::open(to, &Default::default())
        .await
        .context("opening the PostgreSQL store to copy into")?;
    let report = trellis_store::copy::sqlite_to_postgres(&sqlite, &pg)
        .await
        .context("copying the hub into PostgreSQL (nothing was copied)");
    pg.close().await;
    sqlite.close().await;
    let report = report?;
    let total: u64 = report.tables.iter().map(|(_, n)| n).sum();
    println!(
        "copied {total} rows from {} into {}:",
        file.display(),
        trellis_hub::redact_url(to)
    );
    for (table, rows) in report.tables.iter().filter(|(_, n)| *n > 0) {
        println!("  {table}: {rows}");
    }
    println!(
        "now run the hub on it from the same data directory (its CA and link secret stay valid, so agents, \
         Outpost URIs and keys keep working):"
    );
    println!(
        "  trellis hub --data {} --store '{}'",
        data_dir.display(),
        trellis_hub::redact_url(to)
    );
    Ok(())
}
