//! The container runtime against real engines: every test runs on
//! Podman's API service (`on_podman::…`) and on Docker Engine
//! (`on_docker::…`), both started and shared by `trellis-testkit` (see
//! `crates/trellis-testkit`). Every test uses its own project name, so they
//! run in parallel, and removes what it made even when it fails.
//!
//! Without an engine installed its tests pass as skipped, except under
//! `CI`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use trellis_agent::StageKey;
use trellis_agent::runtime::container::{ContainerRuntime, PublishPolicy};
use trellis_agent::runtime::{
    Action, ActionKind, ComponentObservation, ComponentPlan, ComponentState, LogLine, LogQuery,
    PlannedDevice, PlannedFile, PlannedVolume, Runtime, StagePlan, Workload,
};
use trellis_model::manifest::{Schedule, StorageKind};
use trellis_testkit::engines::{self, EngineKind, Object, TestEngine};

const OUTPOST: &str = "test-outpost";

/// One test's engine, image, data directory, project and outpost (tests
/// run in parallel, and an outpost's stages are all of its stages);
/// removes every object of the project when dropped.
struct Env {
    engine: TestEngine,
    image: &'static str,
    data: tempfile::TempDir,
    project: String,
    outpost: String,
}

impl Env {
    fn new(kind: EngineKind) -> Option<Env> {
        let engine = engines::get(kind)?;
        let image = engine.busybox_image();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let project = format!(
            "t{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        Some(Env {
            engine,
            image,
            data: tempfile::tempdir().unwrap(),
            outpost: format!("outpost-{project}"),
            project,
        })
    }

    /// The engine's version as its own CLI tells it.
    fn engine_version(&self) -> String {
        let format = match self.engine.kind() {
            // Podman runs the service itself: its client is its version.
            EngineKind::Podman => "{{.Client.Version}}",
            EngineKind::Docker => "{{.Server.Version}}",
        };
        let version = self.engine.cli_ok(&["version", "--format", format]);
        version.trim().to_owned()
    }

    fn stage(&self, name: &str) -> StageKey {
        StageKey::new(self.project.clone(), name)
    }

    async fn runtime(&self, publish: PublishPolicy) -> ContainerRuntime {
        ContainerRuntime::connect(
            Some(&self.engine.docker_host()),
            &self.outpost,
            self.data.path(),
            publish,
        )
        .await
        .unwrap()
        .with_stop_timeout(Duration::from_secs(1))
        .with_retry_delay(Duration::from_millis(200))
        .with_pull_timeout(Duration::from_secs(20))
    }

    fn label(&self) -> String {
        format!("io.trellis.project={}", self.project)
    }

    fn leftovers(&self) -> Vec<String> {
        let label = self.label();
        let mut all = Vec::new();
        for object in [Object::Container, Object::Network, Object::Volume] {
            all.extend(self.engine.labelled(object, &label));
        }
        all
    }

    /// A component running the test image.
    fn component(&self, name: &str, command: &[&str]) -> ComponentPlan {
        ComponentPlan {
            command: Some(command.iter().map(|s| s.to_string()).collect()),
            ..ComponentPlan::new(
                name,
                Workload::Image {
                    reference: self.image.to_owned(),
                    platform: None,
                    archive: None,
                },
            )
        }
    }

    /// The host path of a volume's data.
    fn volume_dir(&self, stage: &StageKey, component: &str, storage: &str) -> PathBuf {
        let name = format!(
            "trellis-{}_{}_{component}_{storage}",
            stage.project, stage.stage
        );
        let volume = self
            .engine
            .inspect(Object::Volume, &name)
            .unwrap_or_else(|| panic!("volume {name} exists"));
        PathBuf::from(volume["Mountpoint"].as_str().unwrap())
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.engine.remove_labelled(&self.label());
    }
}

/// A plan of `components` at `revision`, with their spec hashes filled in
/// the way the agent's planner makes them.
fn plan(revision: u64, release: u64, mut components: Vec<ComponentPlan>) -> StagePlan {
    for c in &mut components {
        c.update_spec_hash();
    }
    StagePlan {
        revision,
        release: Some(release),
        build: Some(format!("main_b{release}")),
        suspended: false,
        components,
        notices: Vec::new(),
        ingresses: Vec::new(),
    }
}

fn volume(name: &str, path: &str) -> PlannedVolume {
    PlannedVolume {
        name: name.to_owned(),
        path: path.to_owned(),
        kind: StorageKind::Standard,
        size_bytes: None,
    }
}

async fn plan_and_apply(rt: &ContainerRuntime, stage: &StageKey, plan: &StagePlan) -> Vec<Action> {
    let actions = rt.plan(stage, plan).await.unwrap();
    rt.apply(stage, plan, &actions).await.unwrap();
    actions
}

fn kinds(actions: &[Action]) -> Vec<(String, ActionKind)> {
    let mut out: Vec<_> = actions
        .iter()
        .map(|a| (a.component.clone(), a.kind))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Polls `check` every 100 ms until it answers, or panics after `limit`
/// with the last thing it saw.
async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + limit;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) if Instant::now() > deadline => {
                panic!("{what}: not within {limit:?}; last seen: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn observation(rt: &ContainerRuntime, stage: &StageKey, name: &str) -> ComponentObservation {
    rt.observe(stage)
        .await
        .unwrap()
        .into_iter()
        .find(|o| o.name == name)
        .unwrap_or_else(|| ComponentObservation::missing(name))
}

/// Waits until `name` is in `state` and returns its observation.
async fn until_state(
    rt: &ContainerRuntime,
    stage: &StageKey,
    name: &str,
    state: ComponentState,
) -> ComponentObservation {
    eventually(
        &format!("{name} {}", state.as_str()),
        Duration::from_secs(15),
        || async {
            let o = observation(rt, stage, name).await;
            if o.state == state {
                Ok(o)
            } else {
                Err(format!("{o:?}"))
            }
        },
    )
    .await
}

/// An HTTP GET over plain TCP (the way a health check reaches a component).
fn http_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").map_err(|e| e.to_string())?;
    let mut out = String::new();
    stream.read_to_string(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn exec_ok(env: &Env, container: &str, argv: &[&str]) -> Result<String, String> {
    let out = env.engine.exec(container, argv);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `web` serves a mounted file over HTTP; `client` fetches it by the
/// name `web` (its component-ref) into its volume.
fn web_and_client(env: &Env, mode: &str, rt: &ContainerRuntime) -> Vec<ComponentPlan> {
    let mut web = env.component("web", &["httpd", "-f", "-p", "8080", "-h", "/www"]);
    web.ports = vec![8080];
    web.files = vec![PlannedFile {
        path: "/www/index.html".into(),
        content: "hello from web\n".into(),
    }];
    web.cpu_millis = Some(500);
    web.memory_bytes = Some(64 << 20);
    let mut client = env.component(
        "client",
        &[
            "sh",
            "-c",
            "[ -f /data/first ] || echo \"$MODE\" > /data/first; \
             while true; do \
               wget -qO /data/got.tmp \"http://$WEB:8080/\" && mv /data/got.tmp /data/got; \
               echo \"$MODE\" > /data/mode; sleep 0.2; \
             done",
        ],
    );
    client
        .env
        .insert("WEB".into(), rt.address_of("web", Some(8080)));
    client.env.insert("MODE".into(), mode.into());
    client.volumes = vec![volume("data", "/data")];
    vec![web, client]
}

/// Runs each test body on both engines: `on_podman::<body>` and
/// `on_docker::<body>`.
macro_rules! on_both_engines {
    ($($body:ident),+ $(,)?) => {
        mod on_podman {
            $(
                #[tokio::test]
                async fn $body() {
                    if let Some(env) = super::Env::new(super::EngineKind::Podman) {
                        super::$body(env).await;
                    }
                }
            )+
        }
        mod on_docker {
            $(
                #[tokio::test]
                async fn $body() {
                    if let Some(env) = super::Env::new(super::EngineKind::Docker) {
                        super::$body(env).await;
                    }
                }
            )+
        }
    };
}

on_both_engines!(
    a_stage_runs_keeps_its_volume_and_is_adopted_without_restarts,
    a_missing_image_fails_that_component_only,
    a_component_that_exits_at_once_is_crash_looping,
    stages_cannot_reach_each_others_components_or_volumes,
    followed_logs_of_a_stage_arrive_within_a_second,
    a_taken_port_fails_that_component_and_the_others_are_published,
    release_jobs_run_once_per_release_and_retry,
    stop_start_and_restart_on_request,
    the_stage_networks_bridge_keeps_its_hardware_address,
    a_component_gets_exactly_the_device_node_it_holds,
    a_gpu_reaches_the_container_where_the_host_has_one,
);

async fn a_stage_runs_keeps_its_volume_and_is_adopted_without_restarts(env: Env) {
    let rt = env.runtime(PublishPolicy::off()).await;
    let info = rt.describe();
    assert_eq!(info.name, env.engine.name());
    assert_eq!(info.version, env.engine_version(), "{info:?}");
    assert_eq!(rt.address_of("web", Some(8080)), "web");

    let stage = env.stage("dev");
    let one = plan(1, 1, web_and_client(&env, "one", &rt));
    let actions = plan_and_apply(&rt, &stage, &one).await;
    assert_eq!(
        kinds(&actions),
        [
            ("client".into(), ActionKind::Create),
            ("web".into(), ActionKind::Create)
        ]
    );
    let web = until_state(&rt, &stage, "web", ComponentState::Running).await;
    let client = until_state(&rt, &stage, "client", ComponentState::Running).await;
    assert_eq!(web.revision, 1);
    assert_eq!(web.release, Some(1));
    assert_eq!(web.spec_hash, one.components[0].spec_hash);

    // The agent on the host reaches the component at its endpoint (its
    // address on the stage network).
    let endpoint = web.endpoint.expect("web has an endpoint");
    let page = eventually("web answers", Duration::from_secs(5), || async {
        http_get(endpoint, "/index.html")
    })
    .await;
    assert!(page.contains("hello from web"), "{page}");

    // The client reached web by its name and wrote into its volume.
    let client_name = format!("trellis-{}_dev_client-0", env.project);
    let got = eventually("client fetched web", Duration::from_secs(10), || async {
        exec_ok(&env, &client_name, &["cat", "/data/got"])
    })
    .await;
    assert_eq!(got, "hello from web\n");

    // Labels on everything; limits applied.
    let inspected = env
        .engine
        .inspect(
            Object::Container,
            &format!("trellis-{}_dev_web-0", env.project),
        )
        .unwrap();
    let labels = &inspected["Config"]["Labels"];
    for key in [
        "io.trellis.outpost",
        "io.trellis.project",
        "io.trellis.stage",
        "io.trellis.component",
        "io.trellis.replica",
        "io.trellis.revision",
        "io.trellis.release",
        "io.trellis.spec-hash",
        "io.trellis.restart-generation",
    ] {
        assert!(labels[key].is_string(), "label {key} on {labels}");
    }
    assert_eq!(labels["io.trellis.outpost"], env.outpost.as_str());
    assert_eq!(inspected["HostConfig"]["Memory"], 64 << 20);
    assert_eq!(inspected["HostConfig"]["NanoCpus"], 500_000_000);
    let network = env
        .engine
        .inspect(Object::Network, &format!("trellis-{}_dev", env.project))
        .unwrap();
    match env.engine.kind() {
        // Podman shows its own network format, where name resolution is a
        // setting; Docker's user-defined networks always resolve names.
        EngineKind::Podman => {
            assert_eq!(network["labels"]["io.trellis.stage"], "dev");
            assert_eq!(network["dns_enabled"], true);
        }
        EngineKind::Docker => {
            assert_eq!(network["Labels"]["io.trellis.stage"], "dev");
            assert_eq!(network["Driver"], "bridge");
        }
    }
    let volume = env
        .engine
        .inspect(
            Object::Volume,
            &format!("trellis-{}_dev_client_data", env.project),
        )
        .unwrap();
    assert_eq!(volume["Labels"]["io.trellis.component"], "client");

    // Applying the same plan again changes nothing.
    let ids = (web.ids.clone(), client.ids.clone());
    let again = plan_and_apply(&rt, &stage, &one).await;
    assert!(
        again.iter().all(|a| a.kind == ActionKind::Keep),
        "{again:?}"
    );
    let web_again = observation(&rt, &stage, "web").await;
    assert_eq!(web_again.ids, ids.0);

    // A restarted agent (a new runtime) adopts everything as it runs.
    drop(rt);
    let rt = env.runtime(PublishPolicy::off()).await;
    let adopted = plan_and_apply(&rt, &stage, &one).await;
    assert!(
        adopted.iter().all(|a| a.kind == ActionKind::Keep),
        "{adopted:?}"
    );
    let web = observation(&rt, &stage, "web").await;
    let client = observation(&rt, &stage, "client").await;
    assert_eq!((web.ids.clone(), client.ids.clone()), ids);
    assert_eq!(web.state, ComponentState::Running);
    assert_eq!(web.restarts, 0);

    // A new revision with another env replaces the client only; its
    // volume keeps what the first release wrote.
    let two = plan(2, 2, web_and_client(&env, "two", &rt));
    let actions = plan_and_apply(&rt, &stage, &two).await;
    assert_eq!(
        kinds(&actions),
        [
            ("client".into(), ActionKind::Replace),
            ("web".into(), ActionKind::Keep)
        ]
    );
    let client2 = until_state(&rt, &stage, "client", ComponentState::Running).await;
    assert_ne!(client2.ids, ids.1);
    assert_eq!(client2.revision, 2);
    assert_eq!(observation(&rt, &stage, "web").await.ids, ids.0);
    let mode = eventually("the new client runs", Duration::from_secs(10), || async {
        match exec_ok(&env, &client_name, &["cat", "/data/mode"]) {
            Ok(m) if m == "two\n" => Ok(m),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(mode, "two\n");
    assert_eq!(
        exec_ok(&env, &client_name, &["cat", "/data/first"]).unwrap(),
        "one\n",
        "the volume outlived the release"
    );

    // A component dropped from the plan is removed; its volume stays.
    let three = plan(3, 3, vec![two.components[0].clone()]);
    let actions = plan_and_apply(&rt, &stage, &three).await;
    assert!(actions.contains(&Action {
        component: "client".into(),
        kind: ActionKind::Remove,
        reason: "it is no longer in the plan".into(),
    }));
    assert!(observation(&rt, &stage, "client").await.ids.is_empty());
    assert!(
        env.volume_dir(&stage, "client", "data")
            .join("first")
            .exists()
    );

    assert_eq!(rt.stages().await.unwrap(), std::slice::from_ref(&stage));
    rt.remove(&stage).await.unwrap();
    assert_eq!(env.leftovers(), Vec::<String>::new());
    assert!(
        !env.data
            .path()
            .join("container")
            .join(&env.project)
            .join("dev")
            .exists()
    );
    assert!(rt.stages().await.unwrap().is_empty());
}

async fn a_missing_image_fails_that_component_only(env: Env) {
    let rt = env.runtime(PublishPolicy::off()).await;
    let stage = env.stage("dev");
    let ok = env.component("ok", &["sleep", "3600"]);
    let mut bad = env.component("bad", &["sleep", "3600"]);
    bad.workload = Workload::Image {
        reference: "localhost/trellis-test/missing:1".into(),
        platform: None,
        archive: None,
    };
    plan_and_apply(&rt, &stage, &plan(1, 1, vec![bad, ok])).await;
    until_state(&rt, &stage, "ok", ComponentState::Running).await;
    let bad = observation(&rt, &stage, "bad").await;
    assert_eq!(bad.state, ComponentState::Failed);
    let message = bad.message.unwrap();
    assert!(
        message.contains("image \"localhost/trellis-test/missing:1\"")
            && message.contains("is not on this outpost and could not be pulled")
            && message.contains(&format!("{} load", env.engine.name())),
        "{message}"
    );
    // A restarted agent still knows why.
    drop(rt);
    let rt = env.runtime(PublishPolicy::off()).await;
    assert_eq!(
        observation(&rt, &stage, "bad").await.state,
        ComponentState::Failed
    );
    rt.remove(&stage).await.unwrap();
    assert_eq!(env.leftovers(), Vec::<String>::new());
}

async fn a_component_that_exits_at_once_is_crash_looping(env: Env) {
    let rt = env.runtime(PublishPolicy::off()).await;
    let stage = env.stage("dev");
    let crash = env.component("crash", &["sh", "-c", "echo boom; exit 3"]);
    plan_and_apply(&rt, &stage, &plan(1, 1, vec![crash])).await;
    let o = eventually("crash loops", Duration::from_secs(15), || async {
        let o = observation(&rt, &stage, "crash").await;
        if o.state == ComponentState::CrashLooping && o.restarts > 0 && o.exit_code == Some(3) {
            Ok(o)
        } else {
            Err(format!("{o:?}"))
        }
    })
    .await;
    assert!(o.message.unwrap().contains("code 3"));

    // Its lines are in its logs.
    let (tx, mut rx) = mpsc::channel(1000);
    let query = LogQuery {
        component: Some("crash".into()),
        since: None,
        tail: Some(5),
        follow: false,
    };
    rt.logs(&stage, &query, tx).await.unwrap();
    let mut lines = Vec::new();
    while let Some(line) = rx.recv().await {
        lines.push(line);
    }
    assert!(!lines.is_empty() && lines.len() <= 5, "{lines:?}");
    assert!(
        lines
            .iter()
            .all(|l| l.line == "boom" && l.component == "crash")
    );

    rt.remove(&stage).await.unwrap();
    assert_eq!(env.leftovers(), Vec::<String>::new());
}

async fn stages_cannot_reach_each_others_components_or_volumes(env: Env) {
    let rt = env.runtime(PublishPolicy::off()).await;
    let a = env.stage("a");
    let b = env.stage("b");
    let prober = env.component("prober", &["sleep", "3600"]);
    let mut secret = env.component("secret", &["httpd", "-f", "-p", "8080", "-h", "/www"]);
    secret.ports = vec![8080];
    secret.files = vec![PlannedFile {
        path: "/www/index.html".into(),
        content: "b's secret\n".into(),
    }];
    secret.volumes = vec![volume("vault", "/vault")];
    // Stage a has a prober; stage b has the same prober and its secret.
    plan_and_apply(&rt, &a, &plan(1, 1, vec![prober.clone()])).await;
    plan_and_apply(&rt, &b, &plan(1, 1, vec![prober, secret])).await;
    let secret = until_state(&rt, &b, "secret", ComponentState::Running).await;
    until_state(&rt, &a, "prober", ComponentState::Running).await;
    until_state(&rt, &b, "prober", ComponentState::Running).await;
    let b_ip = secret.endpoint.unwrap().ip().to_string();

    let prober_a = format!("trellis-{}_a_prober-0", env.project);
    let prober_b = format!("trellis-{}_b_prober-0", env.project);
    // Inside b the name works…
    let page = eventually(
        "b's prober reaches secret",
        Duration::from_secs(5),
        || async { exec_ok(&env, &prober_b, &["wget", "-qO-", "http://secret:8080/"]) },
    )
    .await;
    assert_eq!(page, "b's secret\n");
    // …from a neither the name nor b's address does.
    assert!(exec_ok(&env, &prober_a, &["nslookup", "secret"]).is_err());
    assert!(
        exec_ok(
            &env,
            &prober_a,
            &["wget", "-qO-", "-T", "2", "http://secret:8080/"]
        )
        .is_err()
    );
    assert!(
        exec_ok(
            &env,
            &prober_a,
            &["wget", "-qO-", "-T", "2", &format!("http://{b_ip}:8080/")]
        )
        .is_err(),
        "stage a reached stage b's address {b_ip}"
    );
    // a's container mounts nothing of b.
    let mounts = env.engine.inspect(Object::Container, &prober_a).unwrap()["Mounts"].to_string();
    assert!(
        !mounts.contains("vault") && !mounts.contains("_b"),
        "{mounts}"
    );

    // Removing b leaves a alone.
    rt.remove(&b).await.unwrap();
    assert_eq!(rt.stages().await.unwrap(), std::slice::from_ref(&a));
    assert_eq!(
        observation(&rt, &a, "prober").await.state,
        ComponentState::Running
    );
    rt.remove(&a).await.unwrap();
    assert_eq!(env.leftovers(), Vec::<String>::new());
}

async fn followed_logs_of_a_stage_arrive_within_a_second(env: Env) {
    let rt = env.runtime(PublishPolicy::off()).await;
    let stage = env.stage("dev");
    let quiet = env.component(
        "quiet",
        &["sh", "-c", "echo quiet started; exec sleep 3600"],
    );
    let talker = env.component(
        "talker",
        &["sh", "-c", "echo talker started >&2; exec sleep 3600"],
    );
    plan_and_apply(&rt, &stage, &plan(1, 1, vec![quiet, talker])).await;
    until_state(&rt, &stage, "quiet", ComponentState::Running).await;
    until_state(&rt, &stage, "talker", ComponentState::Running).await;

    let (tx, mut rx) = mpsc::channel::<LogLine>(100);
    let query = LogQuery {
        component: None,
        since: None,
        tail: None,
        follow: true,
    };
    let follow = {
        let stage = stage.clone();
        let rt = std::sync::Arc::new(rt);
        let rt2 = rt.clone();
        (
            tokio::spawn(async move { rt2.logs(&stage, &query, tx).await }),
            rt,
        )
    };
    let (task, rt) = follow;
    // The backlog of both components, merged.
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let line = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("backlog lines")
            .expect("the follow goes on");
        seen.push((line.component.clone(), line.line.clone(), line.stream));
    }
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(seen[0].1, "quiet started");
    assert_eq!(seen[1].1, "talker started");
    assert_eq!(seen[1].2, trellis_agent::runtime::LogStream::Stderr);

    // A line written now arrives within a second.
    let talker = format!("trellis-{}_dev_talker-0", env.project);
    exec_ok(
        &env,
        &talker,
        &["sh", "-c", "echo fresh line > /proc/1/fd/1"],
    )
    .unwrap();
    let written = Instant::now();
    let line = tokio::time::timeout(Duration::from_secs(1), rx.recv())
        .await
        .expect("the line arrives within a second")
        .unwrap();
    assert_eq!(
        (line.component.as_str(), line.line.as_str()),
        ("talker", "fresh line")
    );
    assert!(written.elapsed() < Duration::from_secs(1));

    // Closing the sink ends the follow.
    drop(rx);
    tokio::time::timeout(Duration::from_secs(3), task)
        .await
        .expect("the follow ends when its reader leaves")
        .unwrap()
        .unwrap();
    rt.remove(&stage).await.unwrap();
    assert_eq!(env.leftovers(), Vec::<String>::new());
}

async fn a_taken_port_fails_that_component_and_the_others_are_published(env: Env) {
    let rt = env.runtime(PublishPolicy::on("127.0.0.1")).await;
    let stage = env.stage("dev");
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let free = free_port();
    let mut blocked = env.component("blocked", &["sleep", "3600"]);
    blocked.ports = vec![taken_port];
    let mut served = env.component(
        "served",
        &["httpd", "-f", "-p", &free.to_string(), "-h", "/www"],
    );
    served.ports = vec![free];
    served.files = vec![PlannedFile {
        path: "/www/index.html".into(),
        content: "published\n".into(),
    }];
    plan_and_apply(&rt, &stage, &plan(1, 1, vec![blocked, served])).await;

    let served = until_state(&rt, &stage, "served", ComponentState::Running).await;
    let endpoint = served.endpoint.unwrap();
    assert_eq!(endpoint, SocketAddr::from(([127, 0, 0, 1], free)));
    let page = eventually("published port answers", Duration::from_secs(5), || async {
        http_get(endpoint, "/")
    })
    .await;
    assert!(page.contains("published"), "{page}");

    let blocked = observation(&rt, &stage, "blocked").await;
    assert_eq!(blocked.state, ComponentState::Failed, "{blocked:?}");
    let message = blocked.message.unwrap();
    assert!(
        message.contains(&taken_port.to_string()) && message.contains("already in use"),
        "{message}"
    );
    drop(taken);
    rt.remove(&stage).await.unwrap();
    assert_eq!(env.leftovers(), Vec::<String>::new());
}

async fn release_jobs_run_once_per_release_and_retry(env: Env) {
    let rt = env.runtime(PublishPolicy::off()).await;
    let stage = env.stage("dev");
    let mut once = env.component("once", &["sh", "-c", "echo ran >> /data/runs"]);
    once.schedule = Some(Schedule::OnRelease);
    once.volumes = vec![volume("data", "/data")];
    let mut failing = env.component("failing", &["sh", "-c", "echo try >> /data/tries; exit 4"]);
    failing.schedule = Some(Schedule::OnRelease);
    failing.max_retries = 2;
    failing.volumes = vec![volume("data", "/data")];
    let mut cron = env.component("nightly", &["true"]);
    cron.schedule = Some(Schedule::Cron("0 3 * * *".into()));
    cron.timezone = Some("Europe/Berlin".into());
    let jobs = vec![once, failing, cron];

    plan_and_apply(&rt, &stage, &plan(1, 1, jobs.clone())).await;
    let once = until_state(&rt, &stage, "once", ComponentState::Succeeded).await;
    assert_eq!(once.exit_code, Some(0));
    assert!(once.last_run.is_some());
    let failing = until_state(&rt, &stage, "failing", ComponentState::Failed).await;
    assert_eq!((failing.exit_code, failing.restarts), (Some(4), 2));
    assert!(failing.message.unwrap().contains("code 4"));
    let nightly = until_state(&rt, &stage, "nightly", ComponentState::Waiting).await;
    let next = nightly.next_run.expect("a cron job has its next run");
    assert!(next > chrono::Utc::now());
    assert!(rt.job_running(&stage, "nightly"));

    let runs = |component: &str, file: &str| {
        std::fs::read_to_string(env.volume_dir(&stage, component, "data").join(file))
            .unwrap_or_default()
    };
    assert_eq!(runs("once", "runs"), "ran\n");
    assert_eq!(runs("failing", "tries"), "try\ntry\ntry\n");

    // A restarted agent adopts the jobs: nothing runs again.
    drop(rt);
    let rt = env.runtime(PublishPolicy::off()).await;
    let actions = plan_and_apply(&rt, &stage, &plan(2, 1, jobs.clone())).await;
    assert!(
        actions.iter().all(|a| a.kind == ActionKind::Keep),
        "{actions:?}"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(runs("once", "runs"), "ran\n");
    assert_eq!(
        observation(&rt, &stage, "once").await.state,
        ComponentState::Succeeded
    );

    // The next release runs it once more.
    plan_and_apply(&rt, &stage, &plan(3, 2, jobs)).await;
    eventually(
        "the job ran for release 2",
        Duration::from_secs(10),
        || async {
            let o = observation(&rt, &stage, "once").await;
            if o.release == Some(2) && o.state == ComponentState::Succeeded {
                Ok(())
            } else {
                Err(format!("{o:?}"))
            }
        },
    )
    .await;
    assert_eq!(runs("once", "runs"), "ran\nran\n");

    rt.remove(&stage).await.unwrap();
    assert_eq!(env.leftovers(), Vec::<String>::new());
}

async fn stop_start_and_restart_on_request(env: Env) {
    let rt = env.runtime(PublishPolicy::off()).await;
    let stage = env.stage("dev");
    let mut svc = env.component("svc", &["sleep", "3600"]);
    svc.replicas = 2;
    plan_and_apply(&rt, &stage, &plan(1, 1, vec![svc.clone()])).await;
    let running = until_state(&rt, &stage, "svc", ComponentState::Running).await;
    assert_eq!((running.replicas_desired, running.replicas_running), (2, 2));

    svc.stopped = true;
    let actions = plan_and_apply(&rt, &stage, &plan(2, 1, vec![svc.clone()])).await;
    assert_eq!(kinds(&actions), [("svc".into(), ActionKind::Stop)]);
    let stopped = until_state(&rt, &stage, "svc", ComponentState::Stopped).await;
    assert_eq!(stopped.ids, running.ids);

    svc.stopped = false;
    let actions = plan_and_apply(&rt, &stage, &plan(3, 1, vec![svc.clone()])).await;
    assert_eq!(kinds(&actions), [("svc".into(), ActionKind::Create)]);
    let started = until_state(&rt, &stage, "svc", ComponentState::Running).await;
    assert_eq!(started.ids, running.ids, "started again, not recreated");

    svc.restart_generation = 1;
    let actions = plan_and_apply(&rt, &stage, &plan(4, 1, vec![svc])).await;
    assert_eq!(kinds(&actions), [("svc".into(), ActionKind::Restart)]);
    let restarted = until_state(&rt, &stage, "svc", ComponentState::Running).await;
    assert_ne!(restarted.ids, running.ids);
    rt.remove(&stage).await.unwrap();
    assert_eq!(env.leftovers(), Vec::<String>::new());
}

#[tokio::test]
async fn an_engine_that_does_not_answer_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("none.sock");
    let err = ContainerRuntime::connect(
        Some(&format!("unix://{}", socket.display())),
        OUTPOST,
        dir.path(),
        PublishPolicy::off(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code, "engine-unreachable");
    assert!(err.message.contains("none.sock"), "{}", err.message);
    assert!(err.hint.is_some());
    let err = ContainerRuntime::connect(
        Some("tcp://127.0.0.1:2375"),
        OUTPOST,
        dir.path(),
        PublishPolicy::off(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code, "engine-unsupported");
}

/// The host's bridge of container `name`'s network: (interface, hardware
/// address, how the kernel assigned it — 3 is "set").
fn bridge_of(env: &Env, name: &str) -> (String, String, String) {
    let inspected = env.engine.inspect(Object::Container, name).unwrap();
    let networks = inspected["NetworkSettings"]["Networks"]
        .as_object()
        .unwrap();
    let gateway = networks
        .values()
        .find_map(|n| n["Gateway"].as_str().filter(|g| !g.is_empty()))
        .unwrap_or_else(|| panic!("{name} has no gateway: {networks:?}"))
        .to_owned();
    let out = std::process::Command::new("ip")
        .args(["-o", "addr", "show", "to", &gateway])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    let interface = listed
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no interface holds {gateway}: {listed}"))
        .to_owned();
    let read = |file: &str| {
        std::fs::read_to_string(format!("/sys/class/net/{interface}/{file}"))
            .unwrap()
            .trim()
            .to_owned()
    };
    (interface.clone(), read("address"), read("addr_assign_type"))
}

/// Linux gives an unset bridge address the lowest of its ports', so
/// containers joining and leaving would change the gateway's address under
/// the others (their answers stall until their ARP entry expires); the
/// runtime keeps it fixed.
async fn the_stage_networks_bridge_keeps_its_hardware_address(env: Env) {
    let rt = env.runtime(PublishPolicy::off()).await;
    let stage = env.stage("dev");
    let sleeper = |name: &str| env.component(name, &["sleep", "3600"]);
    let container = |name: &str| format!("trellis-{}_dev_{name}-0", env.project);

    plan_and_apply(&rt, &stage, &plan(1, 1, vec![sleeper("a")])).await;
    until_state(&rt, &stage, "a", ComponentState::Running).await;
    let (interface, address, assigned) = bridge_of(&env, &container("a"));
    assert_eq!(
        assigned, "3",
        "{interface} {address}: the address is not set"
    );

    // Three containers join; then the first two leave, the first of which
    // gave the bridge its address.
    let three = vec![sleeper("a"), sleeper("b"), sleeper("c")];
    plan_and_apply(&rt, &stage, &plan(2, 2, three)).await;
    for name in ["a", "b", "c"] {
        until_state(&rt, &stage, name, ComponentState::Running).await;
    }
    assert_eq!(
        bridge_of(&env, &container("c")),
        (interface.clone(), address.clone(), "3".into())
    );
    plan_and_apply(&rt, &stage, &plan(3, 3, vec![sleeper("c")])).await;
    assert_eq!(
        bridge_of(&env, &container("c")),
        (interface, address, "3".into())
    );

    rt.remove(&stage).await.unwrap();
    assert_eq!(env.leftovers(), Vec::<String>::new());
}

/// A character device node made for the test (a copy of `/dev/zero`,
/// 1:5), readable by root only.
fn make_zero_node(path: &std::path::Path) {
    let made = std::process::Command::new("mknod")
        .arg(path)
        .args(["c", "1", "5"])
        .status()
        .expect("mknod runs");
    assert!(made.success(), "mknod {} (needs root)", path.display());
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
}

async fn a_component_gets_exactly_the_device_node_it_holds(env: Env) {
    let rt = env.runtime(PublishPolicy::off()).await;
    let node = env.data.path().join("camera");
    make_zero_node(&node);
    let path = node.to_string_lossy().into_owned();
    let device = PlannedDevice {
        name: "camera".into(),
        path: Some(path.clone()),
        access: "r".into(),
        cdi: vec![],
        exclusive: false,
    };
    let mut holder = env.component("holder", &["sleep", "1000"]);
    holder.devices = vec![device];
    holder
        .env
        .insert("TRELLIS_DEVICE_CAMERA".into(), path.clone());
    let other = env.component("other", &["sleep", "1000"]);
    let stage = env.stage("line");
    plan_and_apply(&rt, &stage, &plan(1, 1, vec![holder, other])).await;
    until_state(&rt, &stage, "holder", ComponentState::Running).await;
    until_state(&rt, &stage, "other", ComponentState::Running).await;
    let holder_name = format!("trellis-{}_line_holder-0", env.project);
    let other_name = format!("trellis-{}_line_other-0", env.project);

    // The holder reads the node, at its host path.
    let read = exec_ok(
        &env,
        &holder_name,
        &[
            "sh",
            "-c",
            "test -c \"$TRELLIS_DEVICE_CAMERA\" && head -c 16 \"$TRELLIS_DEVICE_CAMERA\" | wc -c",
        ],
    )
    .unwrap_or_else(|e| panic!("the holder cannot read its device: {e}"));
    assert_eq!(read.trim(), "16");
    // The other component of the same stage does not see it at all.
    let seen = exec_ok(&env, &other_name, &["test", "-e", &path]);
    assert!(
        seen.is_err(),
        "{path} is visible in a component not granted it"
    );
    // Nothing else of the host's /dev came with it: both see the same /dev.
    let dev = |name: &str| exec_ok(&env, name, &["ls", "/dev"]).unwrap();
    assert_eq!(dev(&holder_name), dev(&other_name));

    // One device mapping, with the access given; nothing privileged.
    let inspected = env.engine.inspect(Object::Container, &holder_name).unwrap();
    let host = &inspected["HostConfig"];
    let devices = host["Devices"].as_array().cloned().unwrap_or_default();
    assert_eq!(devices.len(), 1, "{host}");
    assert_eq!(devices[0]["PathInContainer"], path.as_str(), "{host}");
    if env.engine.kind() == EngineKind::Docker {
        // Podman 4 reports the node back by the /dev name of its numbers
        // (/dev/zero here), and no permissions.
        assert_eq!(devices[0]["PathOnHost"], path.as_str(), "{host}");
        assert_eq!(devices[0]["CgroupPermissions"], "r", "{host}");
    }
    assert_eq!(host["Privileged"], false, "{host}");
    let other_host = env.engine.inspect(Object::Container, &other_name).unwrap();
    let none = other_host["HostConfig"]["Devices"]
        .as_array()
        .is_none_or(|d| d.is_empty());
    assert!(none, "{}", other_host["HostConfig"]);
}

/// Whether this host has a GPU a container could be given: an NVIDIA
/// device node, or a CDI specification of some vendor's devices.
fn host_gpu() -> Option<String> {
    if std::path::Path::new("/dev/nvidia0").exists() {
        return Some("/dev/nvidia0".into());
    }
    ["/etc/cdi", "/var/run/cdi"]
        .iter()
        .flat_map(|dir| std::fs::read_dir(dir).into_iter().flatten().flatten())
        .map(|e| e.path().display().to_string())
        .next()
}

async fn a_gpu_reaches_the_container_where_the_host_has_one(env: Env) {
    let rt = env.runtime(PublishPolicy::off()).await;
    let mut infer = env.component("infer", &["sleep", "1000"]);
    infer.devices = vec![PlannedDevice {
        name: "gpu".into(),
        path: None,
        access: String::new(),
        cdi: vec!["nvidia.com/gpu=all".into()],
        exclusive: false,
    }];
    let refusal = rt.cannot_hold(&infer);
    let Some(gpu) = host_gpu() else {
        eprintln!(
            "skipped: this host has no GPU (no /dev/nvidia0, no CDI specification in /etc/cdi \
             or /var/run/cdi); the request {} would get is unit-tested in \
             runtime::container::spec{}",
            env.engine.name(),
            refusal
                .map(|why| format!(", and this engine would refuse it: {why}"))
                .unwrap_or_default()
        );
        return;
    };
    if let Some(why) = refusal {
        eprintln!("skipped: the host has a GPU ({gpu}), but {why}");
        return;
    }
    let stage = env.stage("gpu");
    plan_and_apply(&rt, &stage, &plan(1, 1, vec![infer])).await;
    until_state(&rt, &stage, "infer", ComponentState::Running).await;
    let name = format!("trellis-{}_gpu_infer-0", env.project);
    let listed = exec_ok(&env, &name, &["ls", "/dev"]).unwrap();
    assert!(
        listed.lines().any(|l| l.starts_with("nvidia")),
        "no GPU device in the container: {listed}"
    );
}
