//! What the benchmarks stand on: an in-process hub serving real HTTPS on
//! loopback, its API, a joined outpost agent's identity, and the `trellis`
//! CLI binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use trellis_agent::{AgentState, STATE_FILE};
use trellis_hub::{Hub, HubOptions};

/// The `trellis` binary: the one given, or the one next to this program
/// (`cargo build --release` puts both in `target/release`).
pub fn trellis_binary(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    sibling_binary(given, "trellis")
}

/// `given`, or the program `name` built next to this one; absolute.
pub fn sibling_binary(given: Option<PathBuf>, name: &str) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(path) => path,
        None => std::env::current_exe()?
            .parent()
            .context("this program has no directory")?
            .join(name),
    };
    if !path.is_file() {
        bail!(
            "{} does not exist; build it first (`cargo build --release -p trellis -p trellis-agent -p trellis-bench`) or pass its path",
            path.display()
        );
    }
    // Absolute: the benchmarks run it in other working directories.
    Ok(path.canonicalize()?)
}

/// A hub serving HTTPS on 127.0.0.1 until dropped.
pub struct BenchHub {
    pub addr: std::net::SocketAddr,
    pub data: PathBuf,
    pub admin: String,
    pub http: reqwest::Client,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl BenchHub {
    pub async fn start(data: &Path) -> anyhow::Result<BenchHub> {
        let hub = Hub::open(HubOptions {
            data_dir: data.to_path_buf(),
            local_runtime: trellis_agent::RuntimeSettings {
                containers: false,
                ..Default::default()
            },
            ..Default::default()
        })
        .await?;
        let admin = hub
            .first_admin_key()
            .context("a new hub has an admin key")?
            .to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(hub.serve_tls(listener, async {
            let _ = stopped.await;
        }));
        let ca = std::fs::read(data.join("ca.pem"))?;
        let http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
            .build()?;
        Ok(BenchHub {
            addr,
            data: data.to_path_buf(),
            admin,
            http,
            _stop: stop,
        })
    }

    pub fn ca_path(&self) -> PathBuf {
        self.data.join("ca.pem")
    }

    /// An API call with the admin key; fails unless the status is 2xx.
    pub async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        api_call(
            &self.http,
            &format!("https://{}", self.addr),
            &self.admin,
            method,
            path,
            body,
        )
        .await
    }

    /// Project `bench` with stage `line` placed on `outpost` through its
    /// Outpost URI, as a user would.
    pub async fn stage_on_outpost(&self, outpost: &str) -> anyhow::Result<()> {
        self.api(
            reqwest::Method::POST,
            "/projects",
            Some(json!({"name": "bench"})),
        )
        .await?;
        let uri = self
            .api(
                reqwest::Method::GET,
                &format!("/outposts/{outpost}/uri"),
                None,
            )
            .await?["uri"]
            .as_str()
            .context("the outpost has a URI")?
            .to_owned();
        self.api(
            reqwest::Method::POST,
            "/projects/bench/stages",
            Some(json!({"name": "line", "type": "prod", "outpost_uri": uri})),
        )
        .await?;
        Ok(())
    }

    /// Registers outpost `edge` with stage `bench/line` on it, and starts
    /// the standalone agent (`agent`, process runtime) with `env` and its
    /// data in `data`, joining it with the command the hub printed.
    pub async fn edge_agent(
        &self,
        agent: &Path,
        data: &Path,
        env: &[(String, String)],
    ) -> anyhow::Result<std::process::Child> {
        let created = self
            .api(
                reqwest::Method::POST,
                "/outposts",
                Some(json!({"name": "edge"})),
            )
            .await?;
        let command = created["join"]["command"]
            .as_str()
            .context("a join command")?
            .to_owned();
        self.stage_on_outpost("edge").await?;
        // `trellis agent join …` as printed; the standalone binary takes
        // the same words after `trellis agent`.
        let words: Vec<&str> = command.split_whitespace().collect();
        if words.get(..2) != Some(&["trellis", "agent"][..]) {
            bail!("unexpected join command: {command}");
        }
        Command::new(agent)
            .args(&words[2..])
            .arg("--data")
            .arg(data)
            .arg("--no-containers")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting trellis-agent join")
    }

    /// Registers outpost `name` and joins an agent to it in `dir`.
    pub async fn joined_agent(&self, name: &str, dir: &Path) -> anyhow::Result<Arc<AgentState>> {
        register_and_join(
            &self.http,
            &format!("https://{}", self.addr),
            &self.admin,
            name,
            dir,
        )
        .await?;
        Ok(Arc::new(AgentState::open(&dir.join(STATE_FILE))?))
    }

    /// A client that presents the agent's certificate, as the agent does.
    pub fn agent_http(&self, agent: &AgentState) -> anyhow::Result<reqwest::Client> {
        let id = agent.identity()?.context("the agent has joined")?;
        let pem = format!("{}\n{}", id.cert_pem, id.key_pem);
        let ca = std::fs::read(self.ca_path())?;
        Ok(reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
            .identity(reqwest::Identity::from_pem(pem.as_bytes())?)
            .build()?)
    }
}

/// Points the agent at `addr` (a fault proxy, or the hub itself).
pub fn route_agent(agent: &AgentState, addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let mut id = agent.identity()?.context("the agent has joined")?;
    id.hub_url = format!("https://{addr}");
    agent.set_identity(&id)?;
    Ok(())
}

/// Runs `trellis ARGS` in `dir` against the hub at `endpoint`.
pub fn trellis(
    binary: &Path,
    hub: &BenchHub,
    endpoint: std::net::SocketAddr,
    config: &Path,
    dir: &Path,
    args: &[&str],
) -> anyhow::Result<Output> {
    let client = Client {
        endpoint: format!("https://{endpoint}"),
        key: hub.admin.clone(),
        ca: hub.ca_path(),
        config: config.to_path_buf(),
    };
    client.run(binary, dir, args)
}

/// How the `trellis` CLI reaches a hub.
pub struct Client {
    pub endpoint: String,
    pub key: String,
    pub ca: PathBuf,
    pub config: PathBuf,
}

impl Client {
    /// Runs `trellis ARGS` in `dir`; fails with its output unless it succeeds.
    pub fn run(&self, binary: &Path, dir: &Path, args: &[&str]) -> anyhow::Result<Output> {
        let output = self
            .command(binary)
            .current_dir(dir)
            .args(args)
            .output()
            .with_context(|| format!("running {}", binary.display()))?;
        if !output.status.success() {
            bail!(
                "trellis {args:?} failed:\n{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(output)
    }
}

impl Client {
    /// `binary` (the `trellis` CLI) set up to reach the hub.
    pub fn command(&self, binary: &Path) -> Command {
        let mut command = Command::new(binary);
        command
            .env("TRELLIS_ENDPOINT", &self.endpoint)
            .env("TRELLIS_KEY", &self.key)
            .env("TRELLIS_CA_CERT", &self.ca)
            .env("TRELLIS_CONFIG_DIR", &self.config);
        command
    }
}

/// Runs a command and fails with its output unless it succeeds.
pub fn run(dir: &Path, program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(program)
        .current_dir(dir)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Commits everything in `project` (a git work tree) as the benchmark.
pub fn commit(project: &Path, message: &str) -> anyhow::Result<()> {
    run(project, "git", &["add", "-A"])?;
    run(
        project,
        "git",
        &[
            "-c",
            "user.name=bench",
            "-c",
            "user.email=bench@example.invalid",
            "commit",
            "-q",
            "-m",
            message,
        ],
    )?;
    Ok(())
}

/// The median of some durations, in seconds.
pub fn median(mut secs: Vec<f64>) -> f64 {
    secs.sort_by(f64::total_cmp);
    let n = secs.len();
    if n % 2 == 1 {
        secs[n / 2]
    } else {
        (secs[n / 2 - 1] + secs[n / 2]) / 2.0
    }
}

/// A byte count for people.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// CPU time (user + system) this process has used so far, in seconds.
pub fn cpu_seconds() -> f64 {
    cpu_seconds_in("/proc/self/stat")
}

/// CPU time (user + system) of the process whose `stat` file is `path`.
pub fn cpu_seconds_in(path: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(path) else {
        return 0.0;
    };
    // Fields after the command name (which is in parentheses and may hold
    // spaces): utime and stime are the 12th and 13th.
    let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Clock ticks are 100 per second on Linux.
    (ticks(11) + ticks(12)) / 100.0
}

/// A memory figure of `/proc/<pid>/status` (`VmRSS:`, `VmHWM:`, …), in bytes.
pub fn status_field(pid: u32, name: &str) -> anyhow::Result<u64> {
    kib_field(&format!("/proc/{pid}/status"), name)
}

/// A field of `/proc/meminfo` in bytes, e.g. `MemAvailable:`.
pub fn meminfo_field(name: &str) -> anyhow::Result<u64> {
    kib_field("/proc/meminfo", name)
}

/// A `name: N kB` line of a `/proc` file, in bytes.
fn kib_field(path: &str, name: &str) -> anyhow::Result<u64> {
    std::fs::read_to_string(path)?
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kib| kib.parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .with_context(|| format!("{name} in {path}"))
}

/// The manifest of the bridge project: one process component that stays up
/// until its package is removed.
const BRIDGE_MANIFEST: &str = "version: v1
components:
  - name: bridge
    process:
      path: ./bin
      command: [\"sh\", \"./bridge.sh\"]
";

/// Writes the bridge project (a git work tree, committed) into `project`,
/// ready for `trellis push build`.
pub fn bridge_project(project: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(project.join("bin"))?;
    std::fs::write(project.join("trellis.yaml"), BRIDGE_MANIFEST)?;
    std::fs::write(
        project.join("bin/bridge.sh"),
        "#!/bin/sh\necho up\nwhile [ -e \"$PWD/bridge.sh\" ]; do sleep 1; done\n",
    )?;
    run(project, "git", &["init", "-q", "-b", "main"])?;
    commit(project, "bridge")
}

/// An API call to the hub at `base` (`https://host:port`) with `key`;
/// fails unless the status is 2xx.
pub async fn api_call(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let mut request = http
        .request(method.clone(), format!("{base}/api/v1{path}"))
        .bearer_auth(key);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("{method} {path} answered {status}: {body}");
    }
    Ok(body)
}

/// Registers outpost `name` on the hub at `base` and joins an agent to it
/// in `dir`, as an administrator and `trellis agent join` would.
pub async fn register_and_join(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    name: &str,
    dir: &Path,
) -> anyhow::Result<()> {
    let created = api_call(
        http,
        base,
        key,
        reqwest::Method::POST,
        "/outposts",
        Some(json!({ "name": name })),
    )
    .await?;
    let token = created["join"]["token"]
        .as_str()
        .context("the outpost came with a join token")?
        .parse()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    trellis_agent::join(&token, dir)
        .await
        .with_context(|| format!("joining outpost {name}"))?;
    Ok(())
}

/// A TLS server end as the hub makes it: its server configuration, with a
/// certificate its CA (under `hub_data`) issued for loopback.
pub fn loopback_acceptor(hub_data: &Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let ca = trellis_hub::tls::load_or_create_ca(hub_data)?;
    let config = trellis_hub::tls::server_tls(
        &ca,
        &["localhost".to_owned()],
        &[std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)],
    )?;
    Ok(config.into())
}

/// A TLS client end as agents and the CLI make theirs (the same rustls
/// provider, so the same cipher suites), trusting the hub's CA.
pub fn hub_connector(hub_data: &Path) -> anyhow::Result<tokio_rustls::TlsConnector> {
    let ca_pem = std::fs::read_to_string(hub_data.join("ca.pem"))?;
    Ok(trellis_link::identity::client_config(&ca_pem, None)?.into())
}

/// The name a TLS client on loopback checks the server's certificate for.
pub fn loopback_name() -> tokio_rustls::rustls::pki_types::ServerName<'static> {
    tokio_rustls::rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into())
}
