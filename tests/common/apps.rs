//! What the end-to-end tests of apps share: a hub with a project and
//! outposts whose agents run on a real engine, and small HTTP helpers.

use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;
use trellis_testkit::engines::{self, EngineKind, Object, TestEngine};

use super::{AgentProcess, Cli, HubProcess, join_command};

/// The engine under test, and everything the test made on it removed when
/// it ends, however it ends.
pub struct OnEngine {
    pub engine: TestEngine,
    outposts: Vec<String>,
    images: Vec<String>,
}

impl OnEngine {
    /// The engine, or `None` (the test is skipped, and says so) where it
    /// is not installed — except under CI, where a missing engine fails the
    /// test: CI installs both, and a skipped test there would prove nothing.
    pub fn new(kind: EngineKind) -> Option<OnEngine> {
        let Some(engine) = engines::get(kind) else {
            assert!(
                std::env::var_os("CI").is_none(),
                "{kind:?} is not installed; CI must run this test"
            );
            eprintln!("skipped: {kind:?} is not installed (CI would fail here)");
            return None;
        };
        Some(OnEngine {
            engine,
            outposts: Vec::new(),
            images: Vec::new(),
        })
    }

    /// An outpost name unique to this test run, cleaned up at the end.
    pub fn outpost(&mut self, name: &str) -> String {
        let name = format!("{name}-{}-{}", self.engine.name(), std::process::id());
        self.outposts.push(name.clone());
        name
    }

    /// `trellis push build` in `dir`, with this engine's command line; the
    /// images it built are removed at the end.
    pub fn push_build(&mut self, cli: &Cli, dir: &std::path::Path, project: &str) -> Output {
        let mut command = cli.command();
        command
            .current_dir(dir)
            .args(["push", "build", "-p", project])
            .env("TRELLIS_ENGINE", self.engine.name());
        for (key, value) in self.engine.cli_env() {
            command.env(key, value);
        }
        let out = command.output().expect("run trellis push build");
        if out.status.success() {
            let builds = cli.json(&["list", "build", "-p", project]);
            for component in builds[0]["components"].as_array().unwrap() {
                let artifact = &component["artifact"];
                let each = artifact["platforms"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let references = std::iter::once(&artifact["reference"])
                    .chain(each.iter().map(|p| &p["reference"]))
                    .filter_map(Value::as_str)
                    // Only what the build made, never the shared test image.
                    .filter(|r| r.starts_with("trellis.local/"));
                self.images.extend(references.map(str::to_owned));
            }
        }
        out
    }

    pub fn agent_args(&self) -> Vec<String> {
        [
            "--docker-host",
            &self.engine.docker_host(),
            "--health-window",
            "60s",
            "--publish-ports",
            "127.0.0.1",
        ]
        .map(str::to_owned)
        .to_vec()
    }

    pub fn container(&self, id: &str) -> Value {
        self.engine
            .inspect(Object::Container, id)
            .unwrap_or_else(|| panic!("container {id} exists on {}", self.engine.name()))
    }
}

impl Drop for OnEngine {
    fn drop(&mut self) {
        for outpost in &self.outposts {
            self.engine
                .remove_labelled(&format!("io.trellis.outpost={outpost}"));
        }
        for image in &self.images {
            let _ = self.engine.cli(&["rmi", "-f", image]);
        }
    }
}

pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// GET `url` on loopback; the body when it answers 200.
pub fn fetch(url: &str) -> Option<String> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut stream = std::net::TcpStream::connect(host).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(stream, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.0 200")
        .then(|| body.to_owned())
        .or_else(|| head.starts_with("HTTP/1.1 200").then(|| body.to_owned()))
}

/// A hub with a project, and an outpost of it whose agent runs on the
/// engine with `extra` agent arguments.
///
/// Fields drop in order: the agents (and the stage processes they started,
/// swept by their working directory) go before the directory they live in.
pub struct World {
    pub agents: Vec<AgentProcess>,
    pub hub: HubProcess,
    pub cli: Cli,
    pub tmp: tempfile::TempDir,
}

impl World {
    pub fn new(project: &str) -> World {
        Self::with_hub_args(project, &[])
    }

    /// A world whose hub runs with `args` besides a free loopback port.
    pub fn with_hub_args(project: &str, args: &[&str]) -> World {
        let tmp = tempfile::tempdir().unwrap();
        let mut all = vec!["--listen", "127.0.0.1:0"];
        all.extend_from_slice(args);
        let hub = HubProcess::start_with(&tmp.path().join("hub"), &all);
        let cli = Cli::for_hub(&hub, &hub.admin_key(), &tmp.path().join("config"));
        cli.ok(&["create", "project", project]);
        World {
            tmp,
            hub,
            cli,
            agents: Vec::new(),
        }
    }

    /// Registers `outpost`, starts its agent, and places `stage` on it.
    pub fn stage_on(&mut self, project: &str, stage: &str, outpost: &str, args: &[String]) {
        let created = self.cli.ok(&["create", "outpost", outpost]);
        let uri = self
            .cli
            .ok(&["get", "outpost-uri", outpost])
            .trim()
            .to_owned();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.agents.push(AgentProcess::join_with(
            &join_command(&created),
            &self.tmp.path().join(format!("agent-{outpost}")),
            &args,
        ));
        self.cli.ok(&[
            "create",
            "stage",
            stage,
            "-p",
            project,
            "--type",
            "prod",
            "--outpost-uri",
            &uri,
        ]);
    }

    pub fn status(&self, project: &str, stage: &str) -> Value {
        self.cli.json(&["status", "stage", stage, "-p", project])
    }

    /// Waits until `stage` runs `release` with `components` components all
    /// running, and returns its status.
    pub fn running(&self, project: &str, stage: &str, release: u64, components: usize) -> Value {
        let mut last = Value::Null;
        let ok = wait_for(Duration::from_secs(120), || {
            last = self.status(project, stage);
            last["sync"]["state"] == "in-sync"
                && last["sync"]["applied_release"] == release
                && last["components"].as_array().is_some_and(|c| {
                    c.len() == components && c.iter().all(|c| c["state"] == "running")
                })
        });
        assert!(ok, "{stage} never ran release {release}: {last:#}");
        last
    }
}

/// The container ids of a component, as the stage's status reports them.
pub fn ids_of(status: &Value, component: &str) -> Vec<String> {
    status["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == component)
        .unwrap_or_else(|| panic!("{component} in {status:#}"))["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap().to_owned())
        .collect()
}
