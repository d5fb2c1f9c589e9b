//! `trellis hub` and `trellis dev`.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};
use trellis_hub::api::types::{CreateProjectRequest, CreateStageRequest, PushReleaseRequest};
use trellis_hub::link::LinkSettings;
use trellis_hub::{ADMIN_KEY_FILE, CA_CERT_FILE, Hub, HubOptions};
use trellis_model::{Project, Release, Stage, StageType};

use crate::cli::{DevArgs, HubArgs};
use crate::client::{ClientError, HubClient};

/// Connections the kernel holds for the hub until it accepts them. Tokio's
/// default (1,024) overflows when a whole fleet reconnects after a hub
/// restart while the hub admits a few dozen TLS handshakes at a time: the
/// kernel then drops connection attempts, and each such agent waits out
/// TCP's retransmission timers (1 s, 3 s, 7 s, …) on top of its own
/// backoff. The kernel caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 16_384;

async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
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
    if let Some(n) = args.max_handshakes {
        link.max_handshakes = n.max(1);
    }
    if let Some(secs) = args.cert_validity_secs {
        link.cert_validity = std::time::Duration::from_secs(secs.max(1));
    }
    let hub = Hub::open(HubOptions {
        data_dir: args.data.clone(),
        public_address: args.public_address.clone(),
        link,
        local_runtime: args.runtime.settings(),
    })
    .await?;
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

/// The example app `trellis dev` releases: a static site served by a
/// process component, so it needs nothing beyond a fresh machine (Python
/// ships with it). `{port}` is the example's port.
const EXAMPLE_MANIFEST: &str = r#"version: v1
components:
  - name: web
    process:
      path: ./site
      command: ["python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1"]
    ports: [{port}]
    ingresses:
      - host: web
    env:
      - name: GREETING
        config-ref: greeting
        value: "Hello from Trellis"
"#;

/// Where `trellis dev`'s local outpost serves ingresses unless told
/// otherwise (`--ingress-listen`).
const DEV_INGRESS_LISTEN: &str = "127.0.0.1:7480";

const EXAMPLE_INDEX: &str = "<!doctype html>\n<title>hello</title>\n<h1>Hello from a Trellis stage</h1>\n<p>This page is the example release of project <code>hello</code>.</p>\n";

pub async fn dev(args: DevArgs) -> anyhow::Result<()> {
    let data = &args.data;
    let mut local_runtime = args.runtime.settings();
    // Container components of the example's kind are reached on loopback.
    local_runtime.publish_ports = local_runtime
        .publish_ports
        .or(Some(std::net::Ipv4Addr::LOCALHOST.into()));
    // The local outpost serves its stages' ingresses on loopback, so the
    // example has a URL by its host name.
    local_runtime.ingress = local_runtime
        .ingress
        .or(Some(trellis_agent::IngressSettings {
            listen: DEV_INGRESS_LISTEN.parse().expect("a socket address"),
            tls: None,
            public_port: None,
        }));
    let hub = Hub::open(HubOptions {
        data_dir: data.join("hub"),
        local_runtime,
        ..Default::default()
    })
    .await?;
    let key_file = data.join("hub").join(ADMIN_KEY_FILE);
    let key = match hub.first_admin_key() {
        Some(k) => k.to_string(),
        None => std::fs::read_to_string(&key_file)
            .with_context(|| {
                format!(
                    "reading the development hub's key from {}",
                    key_file.display()
                )
            })?
            .trim()
            .to_owned(),
    };
    let listener = bind(args.listen).await?;
    let addr = listener.local_addr()?;
    let endpoint = format!("https://{addr}");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(hub.serve_tls(listener, async {
        let _ = stop_rx.await;
    }));

    let ca_cert = data.join("hub").join(CA_CERT_FILE);
    let client = HubClient::new(&endpoint, Some(key.clone()), Some(&ca_cert))?;
    let example = data.join("example");
    setup_example(&client, &example, args.example_port).await?;
    let example_url = wait_for_example(&client, &example).await;

    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "trellis".into());
    println!();
    if args.no_serve {
        println!(
            "Trellis is set up (development hub, data in {}).",
            data.display()
        );
    } else {
        println!(
            "Trellis is running (development hub, data in {}).",
            data.display()
        );
    }
    println!();
    match &example_url {
        Ok(url) => println!("  example:   {url}   (project hello, stage dev, running)"),
        Err(why) => println!("  example:   not running: {why}"),
    }
    if example_url.is_ok() {
        for url in example_ingress_urls(&client).await {
            println!(
                "  ingress:   {url}   (the example by its host name, through the local outpost's entry point)"
            );
        }
    }
    println!("  console:   {endpoint}/");
    println!("  endpoint:  {endpoint}");
    println!("  key:       {key}");
    println!();
    println!("Use the CLI against it:");
    println!("  alias trellis={exe}");
    println!("  export TRELLIS_ENDPOINT={endpoint} TRELLIS_KEY={key}");
    println!("  export TRELLIS_CA_CERT={}", absolute(&ca_cert).display());
    println!();
    println!("Three things to try:");
    println!("  trellis list stage -p hello");
    println!("  trellis status stage dev -p hello");
    println!(
        "  cd {} && trellis push build -p hello && trellis push release -p hello -s dev",
        example.display()
    );
    println!();
    println!(
        "Project `hello` has stage `dev` with a release of the example app (a static site), run \
         by the hub's local outpost as a supervised process."
    );
    println!();
    if args.no_serve {
        let _ = stop_tx.send(());
    } else {
        println!("Press Ctrl-C to stop.");
        shutdown_signal().await;
        let _ = stop_tx.send(());
    }
    server.await.context("the hub task failed")??;
    Ok(())
}

/// Creates project `hello` with stage `dev`, the example's git work tree,
/// a build of it and a first release — each only if not there yet, so
/// `trellis dev` can be run again on the same data.
async fn setup_example(client: &HubClient, dir: &Path, port: u16) -> anyhow::Result<()> {
    match client
        .post::<_, Project>(
            "/projects",
            &CreateProjectRequest {
                name: "hello".into(),
                description: "Example project of `trellis dev`".into(),
            },
            "creating the example project",
        )
        .await
    {
        Ok(_) => {}
        Err(ClientError::Refused { code, .. }) if code == "already-exists" => {}
        Err(e) => return Err(e.into()),
    }
    match client
        .post::<_, Stage>(
            "/projects/hello/stages",
            &CreateStageRequest {
                name: "dev".into(),
                stage_type: StageType::Dev,
                display_name: Some("Development".into()),
                outpost_uri: None,
            },
            "creating the example stage",
        )
        .await
    {
        Ok(_) => {}
        Err(ClientError::Refused { code, .. }) if code == "already-exists" => {}
        Err(e) => return Err(e.into()),
    }
    if !dir.join(".git").exists() {
        write_example(dir, port)?;
    }
    let releases: Vec<Release> = client
        .get(
            "/projects/hello/stages/dev/releases",
            "listing the example's releases",
        )
        .await?;
    if releases.is_empty() {
        let build = super::build::push_build(client, "hello", dir, false).await?;
        let _: Release = client
            .post(
                "/projects/hello/stages/dev/releases",
                &PushReleaseRequest {
                    build: Some(build.name),
                    config: None,
                },
                "releasing the example",
            )
            .await?;
    }
    Ok(())
}

fn write_example(dir: &Path, port: u16) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("site"))
        .with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(
        dir.join("trellis.yaml"),
        EXAMPLE_MANIFEST.replace("{port}", &port.to_string()),
    )?;
    std::fs::write(dir.join("site").join("index.html"), EXAMPLE_INDEX)?;
    let git = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args([
                "-c",
                "user.name=Trellis",
                "-c",
                "user.email=dev@trellis.invalid",
                "-c",
                "commit.gpgsign=false",
            ])
            .args(args)
            .output()
            .context("running git (trellis dev needs git to make the example's build)")?;
        if !out.status.success() {
            bail!(
                "git {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    };
    git(&["init", "-q", "-b", "main"])?;
    git(&["add", "-A"])?;
    git(&["commit", "-q", "-m", "Example app"])?;
    Ok(())
}

/// Waits until the example's release runs on the local outpost and
/// answers; returns its URL, or why it is not running.
async fn wait_for_example(client: &HubClient, dir: &Path) -> Result<String, String> {
    // The port is the one in the example's manifest (an earlier run may
    // have written it with another `--example-port`).
    let manifest = std::fs::read_to_string(dir.join("trellis.yaml"))
        .map_err(|e| format!("cannot read the example's manifest: {e}"))?;
    let port = trellis_model::manifest::parse_manifest(&manifest)
        .ok()
        .and_then(|m| m.components.first().and_then(|c| c.ports.first().copied()))
        .ok_or("the example's manifest has no port")?;
    let url = format!("http://127.0.0.1:{port}/");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut last = String::from("the local outpost has not reported yet");
    while std::time::Instant::now() < deadline {
        let status: Result<trellis_hub::link::status::StageStatus, _> = client
            .get(
                "/projects/hello/stages/dev/outpost-status",
                "checking the example's status",
            )
            .await;
        if let Ok(s) = status {
            let state = serde_json::to_value(s.sync.state).unwrap_or_default();
            if state == "failed" {
                return Err(s
                    .sync
                    .message
                    .unwrap_or_else(|| "its release failed".into()));
            }
            if state == "in-sync" && answers(port).await {
                return Ok(url);
            }
            last = s
                .sync
                .message
                .unwrap_or_else(|| format!("sync state {state}"));
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    Err(format!("it did not come up within 120 s ({last})"))
}

/// The URLs the local outpost reports for the example's ingresses (it
/// reports them with the stage's status, shortly after the release is up).
async fn example_ingress_urls(client: &HubClient) -> Vec<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let listed: Result<trellis_hub::api::types::StageComponents, _> = client
            .get(
                "/projects/hello/stages/dev/components",
                "listing the example's components",
            )
            .await;
        let urls: Vec<String> = listed
            .map(|l| {
                l.components
                    .into_iter()
                    .flat_map(|c| c.observed.urls)
                    .collect()
            })
            .unwrap_or_default();
        if !urls.is_empty() || std::time::Instant::now() > deadline {
            return urls;
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

async fn answers(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
}

fn absolute(path: &Path) -> std::path::PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}
