//! The process runtime with real processes: packages made with
//! `trellis_cas::pack_dir` and served from a chunk store in a temporary
//! directory (`LocalArtifacts`, standing in for the hub), components that
//! reach each other over loopback, crash loops, adoption by a new runtime
//! over the same root, logs, stopping process groups, scheduled runs.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::mpsc;
use trellis_agent::StageKey;
use trellis_agent::runtime::artifacts::{ArtifactSource, LocalArtifacts};
use trellis_agent::runtime::plan::{PlanContext, plan_from_desired};
use trellis_agent::runtime::process::{ProcessOptions, ProcessRuntime};
use trellis_agent::runtime::{
    ActionKind, ComponentObservation, ComponentPlan, ComponentState, LogQuery, LogStream,
    PlannedDevice, PlannedVolume, Runtime, RuntimeKind, StagePlan, Workload,
};
use trellis_cas::{ArtifactKind, ChunkStore, Durability};
use trellis_model::manifest::{Schedule, StorageKind};

/// A temporary world: a blob store with packages and a runtime root.
struct World {
    dir: tempfile::TempDir,
    blobs: ChunkStore,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let blobs = ChunkStore::open(&dir.path().join("hub-blobs"), Durability::Synced).unwrap();
        World { dir, blobs }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("processes")
    }

    fn packages(&self) -> Arc<dyn ArtifactSource> {
        Arc::new(LocalArtifacts::new(self.blobs.clone()))
    }

    fn runtime(&self, options: ProcessOptions) -> ProcessRuntime {
        ProcessRuntime::with_options(self.root(), self.packages(), options)
    }

    /// Packs `files` (path, content, executable) and stores the package.
    fn package(&self, files: &[(&str, &str, bool)]) -> (String, u64) {
        let src = tempfile::tempdir().unwrap();
        for (path, content, exec) in files {
            let p = src.path().join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, content).unwrap();
            let mode = if *exec { 0o755 } else { 0o644 };
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let mut tar = Vec::new();
        trellis_cas::pack_dir(src.path(), &mut tar).unwrap();
        let put = self
            .blobs
            .put_artifact(ArtifactKind::Package, &tar[..])
            .unwrap();
        (put.index_digest.to_string(), put.index.size)
    }

    fn stage_dir(&self, stage: &StageKey) -> PathBuf {
        self.root().join(&stage.project).join(&stage.stage)
    }
}

/// A failing test must not leave its processes behind: every process group
/// still recorded in a pid file is killed when the world goes away.
impl Drop for World {
    fn drop(&mut self) {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() && !path.is_symlink() {
                    walk(&path, out);
                } else if path.parent().and_then(Path::file_name) == Some("run".as_ref()) {
                    out.push(path);
                }
            }
        }
        let mut pid_files = Vec::new();
        walk(&self.root(), &mut pid_files);
        for file in pid_files {
            let pid = std::fs::read(&file)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v["pid"].as_i64())
                .and_then(|p| rustix::process::Pid::from_raw(p as i32));
            if let Some(pid) = pid {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

fn fast() -> ProcessOptions {
    ProcessOptions {
        stop_grace: Duration::from_secs(2),
        restart_initial: Duration::from_millis(50),
        restart_max: Duration::from_millis(400),
        reset_after: Duration::from_secs(5),
        tick: Duration::from_millis(50),
        log_file_max: 1 << 20,
    }
}

/// A component plan made by hand, with its spec hash.
fn component(name: &str, package: &(String, u64), argv: &[&str]) -> ComponentPlan {
    ComponentPlan::new(
        name,
        Workload::Package {
            digest: package.0.clone(),
            size: package.1,
            argv: argv.iter().map(|s| s.to_string()).collect(),
        },
    )
}

fn rehash(plan: &mut ComponentPlan) {
    plan.update_spec_hash();
}

fn volume(name: &str, path: &str) -> PlannedVolume {
    PlannedVolume {
        name: name.into(),
        path: path.into(),
        kind: StorageKind::Standard,
        size_bytes: None,
    }
}

fn stage_plan(revision: u64, components: Vec<ComponentPlan>) -> StagePlan {
    StagePlan {
        revision,
        release: Some(revision),
        build: Some("main_b1".into()),
        suspended: false,
        components,
        notices: Vec::new(),
        ingresses: Vec::new(),
    }
}

async fn deploy(runtime: &ProcessRuntime, stage: &StageKey, plan: &StagePlan) -> Vec<ActionKind> {
    let actions = runtime.plan(stage, plan).await.unwrap();
    runtime.apply(stage, plan, &actions).await.unwrap();
    actions.iter().map(|a| a.kind).collect()
}

async fn observe(runtime: &ProcessRuntime, stage: &StageKey, name: &str) -> ComponentObservation {
    runtime
        .observe(stage)
        .await
        .unwrap()
        .into_iter()
        .find(|o| o.name == name)
        .unwrap_or_else(|| ComponentObservation::missing(name))
}

/// Polls until `check` holds for the component's observation.
async fn wait_for(
    runtime: &ProcessRuntime,
    stage: &StageKey,
    name: &str,
    what: &str,
    check: impl Fn(&ComponentObservation) -> bool,
) -> ComponentObservation {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let obs = observe(runtime, stage, name).await;
        if check(&obs) {
            return obs;
        }
        assert!(Instant::now() < deadline, "{name} never {what}: {obs:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_file(path: &Path, what: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && what(&text)
        {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{} never had the expected content",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat[stat.rfind(')').unwrap() + 2..].starts_with('Z'),
    }
}

async fn wait_gone(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gone(pid) {
        assert!(Instant::now() < deadline, "process {pid} is still there");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn all_logs(runtime: &ProcessRuntime, stage: &StageKey, query: LogQuery) -> Vec<String> {
    let (tx, mut rx) = mpsc::channel(1024);
    runtime.logs(stage, &query, tx).await.unwrap();
    let mut lines = Vec::new();
    while let Some(line) = rx.recv().await {
        lines.push(line.line);
    }
    lines
}

const CLIENT: &str = r#"#!/bin/sh
echo "client starting in mode $MODE, api at $API_URL"
while true; do
  python3 -c "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen('$API_URL/etc/greeting', timeout=2).read().decode())" > data/fetched.tmp 2>/dev/null && mv data/fetched.tmp data/fetched
  echo "$MODE" >> data/runs
  sleep 0.1
done
"#;

fn desired(
    manifest: &str,
    artifacts: serde_json::Value,
    mode: &str,
    revision: u64,
) -> serde_json::Value {
    json!({
        "revision": revision,
        "suspended": false,
        "release": {
            "project": "shop", "stage": "dev", "number": revision, "build": "main_b1",
            "config": {"name": "dev", "version": revision, "data": {
                "env": {"mode": mode}, "files": {"greeting": "hello from config\n"}}},
            "revision": revision, "state": "pending",
            "created_at": "2026-01-01T00:00:00Z", "created_by": "admin"
        },
        "build": {
            "project": "shop", "name": "main_b1", "number": 1, "branch": "main",
            "commit": "abc", "manifest_file": "trellis.yaml", "manifest": manifest,
            "components": artifacts,
            "created_at": "2026-01-01T00:00:00Z", "created_by": "admin"
        }
    })
}

#[tokio::test]
async fn components_reach_each_other_keep_volumes_and_are_adopted_after_an_agent_restart() {
    let world = World::new();
    let stage = StageKey::new("shop", "dev");
    let port = free_port();
    let api = world.package(&[("index.html", "api\n", false)]);
    let client = world.package(&[("client.sh", CLIENT, true)]);
    let manifest = format!(
        r#"version: v1
components:
  - name: api
    process: {{path: ./api, command: [python3, -m, http.server, "{port}", --bind, 127.0.0.1]}}
    ports: [{port}]
    files:
      - {{path: /etc/greeting, config-ref: greeting}}
  - name: client
    process: {{path: ./client, command: [sh, ./client.sh]}}
    env:
      - {{name: API, component-ref: api}}
      - {{name: API_URL, value: "http://$(API):{port}"}}
      - {{name: MODE, config-ref: mode}}
    storage:
      - {{name: data, path: /data, size: 1Gi}}
"#
    );
    let artifacts = json!([
        {"name": "api", "artifact": {"kind": "package", "digest": api.0, "size": api.1}},
        {"name": "client", "artifact": {"kind": "package", "digest": client.0, "size": client.1}},
    ]);
    let runtime = world.runtime(fast());
    let address = |name: &str, kind: RuntimeKind, port: Option<u16>| {
        assert_eq!(kind, RuntimeKind::Process);
        runtime.address_of(name, port)
    };
    let no_devices = trellis_agent::devices::DeviceOffers::default();
    let address = PlanContext {
        arch: "amd64",
        address_of: &address,
        devices: &no_devices,
    };
    let plan = plan_from_desired(
        1,
        &desired(&manifest, artifacts.clone(), "fast", 1),
        &address,
    )
    .unwrap();
    assert_eq!(
        plan.component("client").unwrap().env["API"],
        "127.0.0.1",
        "a component-ref is a host name, without the port"
    );
    assert_eq!(
        plan.component("client").unwrap().env["API_URL"],
        format!("http://127.0.0.1:{port}")
    );
    assert_eq!(
        deploy(&runtime, &stage, &plan).await,
        [ActionKind::Create, ActionKind::Create]
    );

    // The client fetched the api's config file through the component-ref
    // and wrote it into its volume.
    let volume = world.stage_dir(&stage).join("volumes/client/data");
    let fetched = wait_file(&volume.join("fetched"), |t| !t.is_empty()).await;
    assert_eq!(fetched, "hello from config\n");
    let api_obs = wait_for(&runtime, &stage, "api", "ran", |o| {
        o.state == ComponentState::Running
    })
    .await;
    assert_eq!(
        api_obs.endpoint,
        Some(format!("127.0.0.1:{port}").parse().unwrap())
    );
    assert_eq!(api_obs.ids.len(), 1);
    assert_eq!(api_obs.spec_hash, plan.component("api").unwrap().spec_hash);
    assert_eq!((api_obs.revision, api_obs.release), (1, Some(1)));
    let api_ids = api_obs.ids.clone();

    // Files are read-only; the stage is private.
    let stage_mode = std::fs::metadata(world.stage_dir(&stage))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(stage_mode & 0o777, 0o700);
    let greeting = world.stage_dir(&stage).join(format!(
        "components/api/{}/root/etc/greeting",
        plan.component("api").unwrap().spec_hash
    ));
    assert_eq!(
        std::fs::metadata(&greeting).unwrap().permissions().mode() & 0o777,
        0o444
    );
    // The collector takes the line in at its next tick: it may not be in
    // the log yet although the client wrote it before fetching.
    let starting = format!("client starting in mode fast, api at http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let logs = all_logs(
            &runtime,
            &stage,
            LogQuery {
                component: Some("client".into()),
                ..Default::default()
            },
        )
        .await;
        if logs.contains(&starting) {
            break;
        }
        assert!(Instant::now() < deadline, "{logs:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A new config value: the client is replaced, the api kept; the
    // volume keeps what the old client wrote.
    let plan2 = plan_from_desired(2, &desired(&manifest, artifacts, "slow", 2), &address).unwrap();
    assert_eq!(
        deploy(&runtime, &stage, &plan2).await,
        [ActionKind::Keep, ActionKind::Replace]
    );
    let runs = wait_file(&volume.join("runs"), |t| t.contains("slow")).await;
    assert!(runs.starts_with("fast\n"), "{runs}");
    let client_obs = wait_for(&runtime, &stage, "client", "ran", |o| {
        o.state == ComponentState::Running
    })
    .await;
    assert_eq!(client_obs.revision, 2);
    assert_eq!(observe(&runtime, &stage, "api").await.ids, api_ids);
    // The old release's directory is gone.
    let client_dir = world.stage_dir(&stage).join("components/client");
    assert!(
        !client_dir
            .join(&plan.component("client").unwrap().spec_hash)
            .exists()
    );

    // The agent restarts: a new runtime over the same root adopts both
    // processes without restarting them.
    drop(runtime);
    let runtime = world.runtime(fast());
    let api_obs = wait_for(&runtime, &stage, "api", "was adopted", |o| {
        o.state == ComponentState::Running
    })
    .await;
    assert_eq!(api_obs.ids, api_ids);
    assert_eq!(
        observe(&runtime, &stage, "client").await.ids,
        client_obs.ids
    );
    let actions = runtime.plan(&stage, &plan2).await.unwrap();
    assert!(
        actions.iter().all(|a| a.kind == ActionKind::Keep),
        "{actions:?}"
    );
    runtime.apply(&stage, &plan2, &actions).await.unwrap();
    assert_eq!(observe(&runtime, &stage, "api").await.ids, api_ids);
    assert_eq!(
        runtime.stages().await.unwrap(),
        std::slice::from_ref(&stage)
    );

    // Removing the stage stops everything and leaves nothing behind.
    let client_pid: i32 = client_obs.ids[0].parse().unwrap();
    runtime.remove(&stage).await.unwrap();
    wait_gone(api_ids[0].parse().unwrap()).await;
    wait_gone(client_pid).await;
    assert!(!world.stage_dir(&stage).exists());
    assert!(!world.root().join("shop").exists());
    assert!(runtime.stages().await.unwrap().is_empty());
    assert!(runtime.observe(&stage).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_component_that_exits_at_once_is_crash_looping_with_its_exit_code() {
    let world = World::new();
    let stage = StageKey::new("crash", "dev");
    let package = world.package(&[("run.sh", "echo boom >&2\nexit 3\n", false)]);
    let plan = stage_plan(1, vec![component("bad", &package, &["sh", "run.sh"])]);
    let runtime = world.runtime(fast());
    deploy(&runtime, &stage, &plan).await;
    let obs = wait_for(&runtime, &stage, "bad", "crash-looped", |o| {
        o.state == ComponentState::CrashLooping && o.restarts >= 2
    })
    .await;
    assert_eq!(obs.exit_code, Some(3));
    let message = obs.message.unwrap();
    assert!(message.contains("exit code 3"), "{message}");
    assert!(message.contains("last output: boom"), "{message}");
    let (tx, mut rx) = mpsc::channel(1024);
    runtime
        .logs(&stage, &LogQuery::default(), tx)
        .await
        .unwrap();
    let line = rx.recv().await.unwrap();
    assert_eq!(
        (line.line.as_str(), line.stream, line.component.as_str()),
        ("boom", LogStream::Stderr, "bad")
    );
    runtime.remove(&stage).await.unwrap();
}

#[tokio::test]
async fn a_command_that_cannot_start_or_a_missing_package_fails_only_its_component() {
    let world = World::new();
    let stage = StageKey::new("broken", "dev");
    let package = world.package(&[("README", "no program here\n", false)]);
    let good = world.package(&[("ok.sh", "exec sleep 1000\n", false)]);
    let missing = ("ab".repeat(32), 10);
    let plan = stage_plan(
        1,
        vec![
            component("nocmd", &package, &["./server"]),
            component("nopkg", &missing, &["./server"]),
            component("fine", &good, &["sh", "ok.sh"]),
        ],
    );
    let runtime = world.runtime(fast());
    deploy(&runtime, &stage, &plan).await;
    let nocmd = observe(&runtime, &stage, "nocmd").await;
    assert_eq!(nocmd.state, ComponentState::Failed, "{nocmd:?}");
    let message = nocmd.message.unwrap();
    assert!(message.contains("server"), "{message}");
    assert!(message.contains("No such file"), "{message}");
    let nopkg = observe(&runtime, &stage, "nopkg").await;
    assert_eq!(nopkg.state, ComponentState::Failed);
    assert!(
        nopkg
            .message
            .as_deref()
            .unwrap()
            .contains("not in the store"),
        "{nopkg:?}"
    );
    wait_for(&runtime, &stage, "fine", "ran", |o| {
        o.state == ComponentState::Running
    })
    .await;
    // The same plan again retries the component whose package was missing.
    let actions = runtime.plan(&stage, &plan).await.unwrap();
    let kinds: Vec<_> = actions
        .iter()
        .map(|a| (a.component.as_str(), a.kind))
        .collect();
    assert_eq!(
        kinds,
        [
            ("nocmd", ActionKind::Keep),
            ("nopkg", ActionKind::Replace),
            ("fine", ActionKind::Keep)
        ]
    );
    runtime.remove(&stage).await.unwrap();
}

#[tokio::test]
async fn stages_see_only_their_own_env_files_and_volumes() {
    let world = World::new();
    let a = StageKey::new("alpha", "prod");
    let b = StageKey::new("beta", "prod");
    let package = world.package(&[("x", "", false)]);
    let runtime = world.runtime(fast());
    for (stage, secret) in [(&a, "a-secret"), (&b, "b-secret")] {
        let mut env = component("env", &package, &["env"]);
        env.env.insert("SECRET".into(), secret.into());
        env.volumes.push(volume("data", "/data"));
        env.schedule = Some(Schedule::OnRelease);
        rehash(&mut env);
        deploy(&runtime, stage, &stage_plan(1, vec![env])).await;
    }
    for (stage, secret) in [(&a, "a-secret"), (&b, "b-secret")] {
        wait_for(&runtime, stage, "env", "succeeded", |o| {
            o.state == ComponentState::Succeeded
        })
        .await;
        let lines = all_logs(&runtime, stage, LogQuery::default()).await;
        let mut names: Vec<&str> = lines.iter().map(|l| l.split_once('=').unwrap().0).collect();
        names.sort();
        assert_eq!(
            names,
            ["HOME", "PATH", "SECRET", "TRELLIS_REPLICA", "TRELLIS_ROOT"],
            "{lines:?}"
        );
        assert!(lines.contains(&format!("SECRET={secret}")));
        let root = lines
            .iter()
            .find_map(|l| l.strip_prefix("TRELLIS_ROOT="))
            .unwrap();
        assert!(
            Path::new(root).starts_with(world.stage_dir(stage)),
            "{root}"
        );
        // The volume is the stage's, under its private directory.
        let dir = world.stage_dir(stage);
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let link = std::fs::read_link(Path::new(root).join("data")).unwrap();
        assert_eq!(link, dir.join("volumes/env/data"));
    }
    assert_ne!(world.stage_dir(&a), world.stage_dir(&b));
    // A stage without process components has no lines here, and no error
    // (its containers may have some).
    let none = all_logs(
        &runtime,
        &StageKey::new("gamma", "prod"),
        LogQuery::default(),
    )
    .await;
    assert!(none.is_empty());
    runtime.remove(&a).await.unwrap();
    assert!(!world.stage_dir(&a).exists());
    assert!(world.stage_dir(&b).join("volumes/env/data").is_dir());
    runtime.remove(&b).await.unwrap();
}

#[tokio::test]
async fn logs_follow_delivers_a_new_line_within_a_second() {
    let world = World::new();
    let stage = StageKey::new("follow", "dev");
    let script = "echo waiting\nwhile [ ! -e data/go ]; do sleep 0.02; done\necho go-seen\nexec sleep 1000\n";
    let package = world.package(&[("run.sh", script, false)]);
    let mut c = component("watcher", &package, &["sh", "run.sh"]);
    c.volumes.push(volume("data", "/data"));
    rehash(&mut c);
    // Production's collection interval: the latency bound must hold with it.
    let options = ProcessOptions {
        tick: ProcessOptions::default().tick,
        ..fast()
    };
    let runtime = Arc::new(world.runtime(options));
    deploy(&runtime, &stage, &stage_plan(1, vec![c])).await;

    let (tx, mut rx) = mpsc::channel(16);
    let follower = {
        let runtime = runtime.clone();
        let stage = stage.clone();
        tokio::spawn(async move {
            let query = LogQuery {
                component: Some("watcher".into()),
                follow: true,
                ..Default::default()
            };
            runtime.logs(&stage, &query, tx).await
        })
    };
    let first = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.line, "waiting");
    let go = Instant::now();
    std::fs::write(world.stage_dir(&stage).join("volumes/watcher/data/go"), b"").unwrap();
    let line = tokio::time::timeout(Duration::from_secs(1), rx.recv())
        .await
        .expect("the new line arrived within a second")
        .unwrap();
    assert_eq!(line.line, "go-seen");
    assert!(go.elapsed() < Duration::from_secs(1));
    // Closing the sink ends the follow.
    drop(rx);
    tokio::time::timeout(Duration::from_secs(2), follower)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    // `tail` and `since` on what is there.
    let lines = all_logs(
        &runtime,
        &stage,
        LogQuery {
            tail: Some(1),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(lines, ["go-seen"]);
    let lines = all_logs(
        &runtime,
        &stage,
        LogQuery {
            since: Some(chrono::Utc::now() + chrono::Duration::seconds(5)),
            ..Default::default()
        },
    )
    .await;
    assert!(lines.is_empty());
    runtime.remove(&stage).await.unwrap();
}

#[tokio::test]
async fn stopping_kills_the_whole_group_and_sigkills_after_the_grace_period() {
    let world = World::new();
    let stage = StageKey::new("stopper", "dev");
    // `polite` leaves a child behind; `stubborn` and its child ignore TERM.
    let polite = "sleep 1000 &\necho $! > data/polite.child\nwait\n";
    let stubborn = "trap '' TERM\nsleep 1000 &\necho $! > data/stubborn.child\nwait\n";
    let package = world.package(&[
        ("polite.sh", polite, false),
        ("stubborn.sh", stubborn, false),
    ]);
    let mut a = component("polite", &package, &["sh", "polite.sh"]);
    let mut b = component("stubborn", &package, &["sh", "stubborn.sh"]);
    for c in [&mut a, &mut b] {
        c.volumes.push(volume("data", "/data"));
        rehash(c);
    }
    let grace = Duration::from_millis(800);
    let runtime = world.runtime(ProcessOptions {
        stop_grace: grace,
        ..fast()
    });
    deploy(&runtime, &stage, &stage_plan(1, vec![a.clone(), b.clone()])).await;
    let volumes = world.stage_dir(&stage).join("volumes");
    let polite_child: i32 = wait_file(&volumes.join("polite/data/polite.child"), |t| {
        t.ends_with('\n')
    })
    .await
    .trim()
    .parse()
    .unwrap();
    let stubborn_child: i32 = wait_file(&volumes.join("stubborn/data/stubborn.child"), |t| {
        t.ends_with('\n')
    })
    .await
    .trim()
    .parse()
    .unwrap();
    let polite_pid: i32 = observe(&runtime, &stage, "polite").await.ids[0]
        .parse()
        .unwrap();
    let stubborn_pid: i32 = observe(&runtime, &stage, "stubborn").await.ids[0]
        .parse()
        .unwrap();

    // A restart request replaces the process (new pid), the child too.
    a.restart_generation = 1;
    let plan = stage_plan(2, vec![a.clone(), b.clone()]);
    assert_eq!(
        deploy(&runtime, &stage, &plan).await,
        [ActionKind::Restart, ActionKind::Keep]
    );
    assert!(gone(polite_pid) && gone(polite_child));
    let new_pid = wait_for(&runtime, &stage, "polite", "restarted", |o| {
        o.state == ComponentState::Running
    })
    .await
    .ids[0]
        .clone();
    assert_ne!(new_pid, polite_pid.to_string());

    // Stopping the stubborn one takes the grace period, then SIGKILL.
    b.stopped = true;
    let plan = stage_plan(3, vec![a.clone(), b]);
    let started = Instant::now();
    assert_eq!(
        deploy(&runtime, &stage, &plan).await,
        [ActionKind::Keep, ActionKind::Stop]
    );
    assert!(started.elapsed() >= grace, "{:?}", started.elapsed());
    assert!(gone(stubborn_pid) && gone(stubborn_child));
    let obs = observe(&runtime, &stage, "stubborn").await;
    assert_eq!(obs.state, ComponentState::Stopped);
    assert!(obs.ids.is_empty());
    runtime.remove(&stage).await.unwrap();
}

#[tokio::test]
async fn release_jobs_run_once_per_release_with_retries_even_across_agent_restarts() {
    let world = World::new();
    let stage = StageKey::new("jobs", "dev");
    // Fails on its first attempt, succeeds on the second.
    let flaky = "n=$(cat data/n 2>/dev/null || echo 0)\nn=$((n+1))\necho $n > data/n\necho attempt $n\n[ $n -ge 2 ]\n";
    let package = world.package(&[("flaky.sh", flaky, false), ("fail.sh", "exit 7\n", false)]);
    let mut migrate = component("migrate", &package, &["sh", "flaky.sh"]);
    migrate.schedule = Some(Schedule::OnRelease);
    migrate.max_retries = 2;
    migrate.volumes.push(volume("data", "/data"));
    rehash(&mut migrate);
    let mut broken = component("broken", &package, &["sh", "fail.sh"]);
    broken.schedule = Some(Schedule::OnRelease);
    broken.max_retries = 1;
    rehash(&mut broken);
    let mut nightly = component("nightly", &package, &["sh", "fail.sh"]);
    nightly.schedule = Some(Schedule::Cron("0 3 * * *".into()));
    nightly.timezone = Some("Europe/Zurich".into());
    rehash(&mut nightly);
    let mut lost = component("lost", &package, &["sh", "fail.sh"]);
    lost.schedule = Some(Schedule::Cron("* * * * *".into()));
    lost.timezone = Some("Mars/Olympus".into());
    rehash(&mut lost);
    let plan = stage_plan(
        1,
        vec![
            migrate.clone(),
            broken.clone(),
            nightly.clone(),
            lost.clone(),
        ],
    );
    let runtime = world.runtime(fast());
    deploy(&runtime, &stage, &plan).await;
    // Cron components wait for their time, read in their time zone.
    let obs = observe(&runtime, &stage, "nightly").await;
    assert_eq!(obs.state, ComponentState::Waiting, "{obs:?}");
    let next = obs.next_run.unwrap();
    let zurich = next.with_timezone(&chrono_tz::Europe::Zurich);
    assert_eq!(
        (
            chrono::Timelike::hour(&zurich),
            chrono::Timelike::minute(&zurich)
        ),
        (3, 0)
    );
    assert!(next > chrono::Utc::now() && next < chrono::Utc::now() + chrono::Duration::days(1));
    let obs = observe(&runtime, &stage, "lost").await;
    assert_eq!(obs.state, ComponentState::Failed);
    assert!(obs.message.unwrap().contains("Mars/Olympus"));
    let obs = wait_for(&runtime, &stage, "migrate", "succeeded", |o| {
        o.state == ComponentState::Succeeded
    })
    .await;
    assert_eq!(obs.exit_code, Some(0));
    assert!(obs.last_run.is_some());
    assert!(obs.next_run.is_none());
    let obs = wait_for(&runtime, &stage, "broken", "failed", |o| {
        o.state == ComponentState::Failed
    })
    .await;
    assert_eq!(obs.exit_code, Some(7));
    assert!(obs.message.unwrap().contains("2 attempt"));
    let n = world.stage_dir(&stage).join("volumes/migrate/data/n");
    assert_eq!(std::fs::read_to_string(&n).unwrap(), "2\n");

    // The agent restarts: nothing runs again for the same release.
    drop(runtime);
    let runtime = world.runtime(fast());
    let actions = runtime.plan(&stage, &plan).await.unwrap();
    runtime.apply(&stage, &plan, &actions).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(std::fs::read_to_string(&n).unwrap(), "2\n");
    let obs = observe(&runtime, &stage, "migrate").await;
    assert_eq!(
        (obs.state, obs.exit_code),
        (ComponentState::Succeeded, Some(0))
    );

    // A new release runs it again (and it succeeds at once now).
    let mut plan2 = stage_plan(2, vec![migrate, broken, nightly, lost]);
    plan2.release = Some(2);
    let actions = runtime.plan(&stage, &plan2).await.unwrap();
    runtime.apply(&stage, &plan2, &actions).await.unwrap();
    let _ = wait_file(&n, |t| t == "3\n").await;
    wait_for(&runtime, &stage, "migrate", "succeeded again", |o| {
        o.state == ComponentState::Succeeded && o.release == Some(2)
    })
    .await;
    runtime.remove(&stage).await.unwrap();
}

/// Reads four bytes of `$TARGET` every 100 ms and says what happened.
const READ_DEVICE: &str = r#"#!/bin/sh
while true; do
  if head -c 4 "$TARGET" > data/bytes 2> data/err; then
    echo "read $(wc -c < data/bytes) bytes" > data/result
  else
    echo "refused: $(cat data/err)" > data/result
  fi
  sleep 0.1
done
"#;

#[tokio::test]
async fn a_process_component_reaches_the_device_node_it_holds_and_no_other() {
    if !rustix::process::geteuid().is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "this test needs root (to make a device node and switch users)"
        );
        eprintln!("skipped: needs root to make a device node and switch users");
        return;
    }
    let world = World::new();
    // The components run as users of their own, who must pass through the
    // directories above the runtime's root.
    std::fs::set_permissions(world.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    // A copy of /dev/zero (1:5) that only root may open.
    let node = world.dir.path().join("sensor");
    let made = std::process::Command::new("mknod")
        .arg(&node)
        .args(["c", "1", "5"])
        .status()
        .unwrap();
    assert!(made.success());
    std::fs::set_permissions(&node, std::fs::Permissions::from_mode(0o600)).unwrap();
    let path = node.to_string_lossy().into_owned();

    let package = world.package(&[("read.sh", READ_DEVICE, true)]);
    let reader = |name: &str, uid: u32, holds: bool| {
        let mut c = component(name, &package, &["./read.sh"]);
        c.user = Some(format!("{uid}:{uid}"));
        c.env.insert("TARGET".into(), path.clone());
        c.volumes = vec![volume("data", "/data")];
        if holds {
            c.devices = vec![PlannedDevice {
                name: "sensor".into(),
                path: Some(path.clone()),
                access: "r".into(),
                cdi: vec![],
                exclusive: false,
            }];
        }
        rehash(&mut c);
        c
    };
    let runtime = world.runtime(fast());
    let stage = StageKey::new("line", "dev");
    let result = |name: &str| {
        world
            .stage_dir(&stage)
            .join(format!("volumes/{name}/data/result"))
    };

    deploy(
        &runtime,
        &stage,
        &stage_plan(
            1,
            vec![reader("holder", 65534, true), reader("other", 65533, false)],
        ),
    )
    .await;
    // The holder's user reads it (through its ACL entry); the other
    // component's user, like every user but root, may not open it.
    wait_file(&result("holder"), |t| t == "read 4 bytes\n").await;
    let refused = wait_file(&result("other"), |t| t.starts_with("refused")).await;
    assert!(refused.contains("Permission denied"), "{refused}");
    let mode = std::fs::metadata(&node).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o640,
        "the ACL's mask shows in the group bits: {mode:o}"
    );

    // Letting go of it (the holder is removed) takes the entry off again:
    // the node is back to root only, without an ACL.
    deploy(
        &runtime,
        &stage,
        &stage_plan(2, vec![reader("other", 65533, false)]),
    )
    .await;
    let mut buf = [0u8; 256];
    let acl = rustix::fs::getxattr(&node, "system.posix_acl_access", &mut buf[..]);
    assert_eq!(acl, Err(rustix::io::Errno::NODATA), "the ACL is gone");
    let mode = std::fs::metadata(&node).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{mode:o}");
    runtime.remove(&stage).await.unwrap();
}
