//! `trellis dev`: a development hub on loopback with the product set up —
//! an example project released on the hub's local outpost, and a demo
//! outpost whose agent runs in this process but reaches the hub as a remote
//! one would (its own data directory, joined with a token, the link over
//! mutual TLS on loopback), with a stage placed on it by its Outpost URI.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use trellis_hub::api::types::{
    CreateOutpostRequest, CreateProjectRequest, CreateStageRequest, CreatedOutpost,
    JoinTokenRequest, JoinTokenResponse, OutpostUriResponse, PushReleaseRequest,
};
use trellis_hub::{ADMIN_KEY_FILE, CA_CERT_FILE, Hub, HubOptions};
use trellis_model::{Outpost, Project, Release, Stage, StageType};

use super::hub::bind;
use crate::cli::DevArgs;
use crate::client::{ClientError, HubClient};
use trellis_agent::cli::shutdown_signal;

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

const EXAMPLE_INDEX: &str = "<!doctype html>\n<title>hello</title>\n<h1>Hello from a Trellis stage</h1>\n<p>This page is the example release of project <code>{project}</code>.</p>\n";

/// Where `trellis dev`'s local outpost serves ingresses unless told
/// otherwise (`--ingress-listen`).
const DEV_INGRESS_LISTEN: &str = "127.0.0.1:7480";
/// The outpost `trellis dev` registers and runs an agent for. Its entry
/// point listens on the port after the local outpost's (any free one when
/// that one is 0).
const DEMO_OUTPOST: &str = "demo";

/// One copy of the example, released to one stage.
struct Example {
    project: &'static str,
    stage: &'static str,
    stage_type: StageType,
    display_name: &'static str,
    /// Where its work tree is written.
    dir: PathBuf,
    port: u16,
    /// Placed on a remote outpost by its URI; `None`: the local outpost.
    outpost_uri: Option<String>,
}

pub async fn dev(args: DevArgs) -> anyhow::Result<()> {
    let data = &args.data;
    let mut local_runtime = args.runtime.settings()?;
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
    // The demo outpost's agent runs components as the local one does, and
    // serves its own entry point on the next port.
    let mut demo_runtime = local_runtime.clone();
    if let Some(ingress) = demo_runtime.ingress.as_mut() {
        let port = ingress.listen.port();
        ingress
            .listen
            .set_port(if port == 0 { 0 } else { port.saturating_add(1) });
        ingress.public_port = None;
    }
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
    let local = Example {
        project: "hello",
        stage: "dev",
        stage_type: StageType::Dev,
        display_name: "Development",
        dir: data.join("example"),
        port: args.example_port,
        outpost_uri: None,
    };
    setup_example(&client, &local).await?;
    let example_url = wait_for_example(&client, &local).await;

    // The demo outpost: its agent, and a copy of the example on it (on the
    // next port, since the two run on this one host).
    let (agent_stop, agent_stopped) = tokio::sync::oneshot::channel::<()>();
    let demo = async {
        let agent_dir = data.join("demo-outpost");
        let agent = start_demo_agent(&client, &agent_dir, demo_runtime, agent_stopped).await?;
        let uri: OutpostUriResponse = client
            .get(
                &format!("/outposts/{DEMO_OUTPOST}/uri"),
                "getting the demo outpost's URI",
            )
            .await?;
        let example = Example {
            project: "hello-outpost",
            stage: "demo",
            stage_type: StageType::Prod,
            display_name: "On the demo outpost",
            dir: data.join("example-outpost"),
            port: args.example_port.wrapping_add(1).max(1),
            outpost_uri: Some(uri.uri),
        };
        setup_example(&client, &example).await?;
        anyhow::Ok((agent, example))
    }
    .await;
    let demo_url = match &demo {
        Ok((_, example)) => wait_for_example(&client, example).await,
        Err(e) => Err(format!("{e:#}")),
    };

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
        for url in example_ingress_urls(&client, &local).await {
            println!(
                "  ingress:   {url}   (the example by its host name, through the local outpost's entry point)"
            );
        }
    }
    match (&demo, &demo_url) {
        (Ok((_, example)), Ok(url)) => {
            println!(
                "  outpost:   {url}   (project {}, stage {} on outpost {DEMO_OUTPOST}, running)",
                example.project, example.stage
            );
            for url in example_ingress_urls(&client, example).await {
                println!("  ingress:   {url}   (the same, through the demo outpost's entry point)");
            }
            println!(
                "  status:    {endpoint}/projects/{}/stages/{}/status   (its connection status)",
                example.project, example.stage
            );
        }
        (_, Err(why)) => println!("  outpost:   the demo outpost's stage is not running: {why}"),
        (Err(_), Ok(_)) => {}
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
    println!("Things to try:");
    println!("  trellis list stage -p hello");
    println!("  trellis status stage dev -p hello");
    println!(
        "  cd {} && trellis push build -p hello && trellis push release -p hello -s dev",
        local.dir.display()
    );
    println!("  trellis status stage demo -p hello-outpost");
    println!();
    println!(
        "Project `hello` has stage `dev` with a release of the example app (a static site), run \
         by the hub's local outpost as a supervised process. Project `hello-outpost` has stage \
         `demo` on outpost `{DEMO_OUTPOST}`, whose agent (data in {}) runs in this process and \
         reaches the hub as a remote one does: joined with a token, linked over mutual TLS.",
        data.join("demo-outpost").display()
    );
    println!();
    if !args.no_serve {
        println!("Press Ctrl-C to stop.");
        shutdown_signal().await;
    }
    let _ = agent_stop.send(());
    if let Ok((agent, _)) = demo {
        match agent.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("the demo outpost's agent stopped: {e}"),
            Err(e) => eprintln!("the demo outpost's agent failed: {e}"),
        }
    }
    let _ = stop_tx.send(());
    server.await.context("the hub task failed")??;
    Ok(())
}

/// Registers the demo outpost (once), joins its agent to the hub with a
/// token (once: the agent keeps its identity in `dir`) and runs it until
/// `stop`.
async fn start_demo_agent(
    client: &HubClient,
    dir: &Path,
    runtime: trellis_agent::RuntimeSettings,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> anyhow::Result<tokio::task::JoinHandle<Result<(), trellis_agent::AgentError>>> {
    let registered: Result<Outpost, _> = client
        .get(
            &format!("/outposts/{DEMO_OUTPOST}"),
            "looking up the demo outpost",
        )
        .await;
    let token = match registered {
        Ok(_) => None,
        Err(ClientError::Refused { code, .. }) if code == "not-found" => {
            let created: CreatedOutpost = client
                .post(
                    "/outposts",
                    &CreateOutpostRequest {
                        name: DEMO_OUTPOST.into(),
                        display_name: Some("Demo outpost".into()),
                        description: "The demo outpost of `trellis dev`: its agent runs in the \
                                      development hub's process and links to it over mutual TLS, \
                                      as one on a remote host does"
                            .into(),
                        ..Default::default()
                    },
                    "registering the demo outpost",
                )
                .await?;
            Some(created.join.token)
        }
        Err(e) => return Err(e.into()),
    };
    // Joined before, to this hub at this address: the identity is kept. A
    // hub listening elsewhere now (`--listen` with port 0) is joined again.
    if joined_to(dir).await?.as_deref() != Some(client.endpoint()) {
        let token = match token {
            Some(token) => token,
            // Registered by an earlier run.
            None => {
                let join: JoinTokenResponse = client
                    .post(
                        &format!("/outposts/{DEMO_OUTPOST}/join-tokens"),
                        &JoinTokenRequest::default(),
                        "creating a join token for the demo outpost",
                    )
                    .await?;
                join.token
            }
        };
        let token: trellis_link::identity::JoinToken = token
            .parse()
            .map_err(|e| anyhow::anyhow!("the hub's join token does not parse: {e}"))?;
        trellis_agent::join(&token, dir)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context("joining the demo outpost's agent to the hub")?;
    }
    let dir = dir.to_owned();
    Ok(tokio::spawn(async move {
        trellis_agent::run(
            &dir,
            trellis_agent::AgentOptions {
                runtime_settings: runtime,
                ..Default::default()
            },
            async {
                let _ = stop.await;
            },
        )
        .await
    }))
}

/// The hub the agent data in `dir` is joined to, if any.
async fn joined_to(dir: &Path) -> anyhow::Result<Option<String>> {
    let path = dir.join(trellis_agent::STATE_FILE);
    if !path.exists() {
        return Ok(None);
    }
    tokio::task::spawn_blocking(move || {
        let state = trellis_agent::AgentState::open(&path).with_context(|| {
            format!("opening the demo outpost's agent state {}", path.display())
        })?;
        Ok(state.identity()?.map(|id| id.hub_url))
    })
    .await?
}

/// Creates the example's project and stage, its git work tree, a build of
/// it and a first release — each only if not there yet, so `trellis dev`
/// can be run again on the same data.
async fn setup_example(client: &HubClient, example: &Example) -> anyhow::Result<()> {
    let project = example.project;
    match client
        .post::<_, Project>(
            "/projects",
            &CreateProjectRequest {
                name: project.into(),
                description: "Example project of `trellis dev`".into(),
                display_name: None,
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
            &format!("/projects/{project}/stages"),
            &CreateStageRequest {
                name: example.stage.into(),
                stage_type: example.stage_type,
                display_name: Some(example.display_name.into()),
                outpost_uri: example.outpost_uri.clone(),
            },
            "creating the example stage",
        )
        .await
    {
        Ok(_) => {}
        Err(ClientError::Refused { code, .. }) if code == "already-exists" => {}
        Err(e) => return Err(e.into()),
    }
    if !example.dir.join(".git").exists() {
        write_example(&example.dir, project, example.port)?;
    }
    let releases_path = format!("/projects/{project}/stages/{}/releases", example.stage);
    let releases: Vec<Release> = client
        .get(&releases_path, "listing the example's releases")
        .await?;
    if releases.is_empty() {
        let build = super::build::push_build(client, project, &example.dir, false).await?;
        let _: Release = client
            .post(
                &releases_path,
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

fn write_example(dir: &Path, project: &str, port: u16) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("site"))
        .with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(
        dir.join("trellis.yaml"),
        EXAMPLE_MANIFEST.replace("{port}", &port.to_string()),
    )?;
    std::fs::write(
        dir.join("site").join("index.html"),
        EXAMPLE_INDEX.replace("{project}", project),
    )?;
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

/// Waits until the example's release runs on its outpost and answers;
/// returns its URL, or why it is not running.
async fn wait_for_example(client: &HubClient, example: &Example) -> Result<String, String> {
    // The port is the one in the example's manifest (an earlier run may
    // have written it with another `--example-port`).
    let manifest = std::fs::read_to_string(example.dir.join("trellis.yaml"))
        .map_err(|e| format!("cannot read the example's manifest: {e}"))?;
    let port = trellis_model::manifest::parse_manifest(&manifest)
        .ok()
        .and_then(|m| m.components.first().and_then(|c| c.ports.first().copied()))
        .ok_or("the example's manifest has no port")?;
    let url = format!("http://127.0.0.1:{port}/");
    let status_path = format!(
        "/projects/{}/stages/{}/outpost-status",
        example.project, example.stage
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut last = String::from("its outpost has not reported yet");
    while std::time::Instant::now() < deadline {
        let status: Result<trellis_hub::link::status::StageStatus, _> = client
            .get(&status_path, "checking the example's status")
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

/// The URLs the outpost reports for the example's ingresses (it reports
/// them with the stage's status, shortly after the release is up).
async fn example_ingress_urls(client: &HubClient, example: &Example) -> Vec<String> {
    let path = format!(
        "/projects/{}/stages/{}/components",
        example.project, example.stage
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let listed: Result<trellis_hub::api::types::StageComponents, _> =
            client.get(&path, "listing the example's components").await;
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
