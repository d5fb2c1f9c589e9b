//! A fleet for the scale scenarios: a real hub process (`trellis hub`) and
//! many outposts, each joined with the real join flow and run by the real
//! agent code (`trellis_agent::run` over mutual TLS and WebSocket, with the
//! record-only runtime, so a release is applied by recording it). The
//! agents run in worker processes (`trellis-bench fleet-worker`), a few
//! thousand each, because one process may hold only ~20,000 file
//! descriptors.
//!
//! The fleet is kept in a work directory and reused by later runs of the
//! same size or smaller: joining 15,000 outposts takes minutes, and every
//! scenario needs them.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// Agents per worker process: two descriptors each (socket, state file)
/// plus the runtime's own, well under the per-process limit.
pub const AGENTS_PER_WORKER: usize = 4000;

/// Where a fleet lives.
#[derive(Debug, Clone)]
pub struct FleetDirs {
    /// The hub's data directory and the fleet record (on disk, as a hub's
    /// would be).
    pub hub: PathBuf,
    /// The agents' data directories. Default: on `/dev/shm`, because on a
    /// real fleet every agent writes to its own disk; here thousands share
    /// one, and their fsyncs would measure this machine's disk, not the hub.
    pub agents: PathBuf,
}

impl FleetDirs {
    pub fn new(work_dir: Option<PathBuf>, agents_dir: Option<PathBuf>) -> FleetDirs {
        let hub = work_dir.unwrap_or_else(|| std::env::temp_dir().join("trellis-bench-fleet"));
        let agents = agents_dir.unwrap_or_else(|| {
            let shm = Path::new("/dev/shm");
            if shm.is_dir() {
                shm.join("trellis-bench-fleet-agents")
            } else {
                hub.join("agents")
            }
        });
        FleetDirs {
            hub: hub.join("hub"),
            agents,
        }
    }

    fn record(&self) -> PathBuf {
        self.hub.with_file_name("fleet.json")
    }

    pub fn agent(&self, i: usize) -> PathBuf {
        self.agents.join(format!("edge-{i}"))
    }
}

/// The outpost names of the fleet.
pub fn outpost_name(i: usize) -> String {
    format!("edge-{i}")
}

// === the hub process ===

/// `trellis hub` as a child process, killed when dropped.
pub struct HubChild {
    pub child: Child,
    pub port: u16,
    pub http: reqwest::Client,
    pub admin: String,
}

impl HubChild {
    /// Starts the hub on `127.0.0.1:port` and waits until it answers.
    pub async fn start(
        trellis: &Path,
        data: &Path,
        port: u16,
        extra: &[String],
    ) -> anyhow::Result<HubChild> {
        std::fs::create_dir_all(data)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data.with_file_name("hub.log"))?;
        let child = Command::new(trellis)
            .arg("hub")
            .arg("--data")
            .arg(data)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .args(["--no-containers"])
            .args(extra)
            // `TRELLIS_BENCH_HUB_LOG` (a `TRELLIS_LOG` filter, such as
            // `warn,trellis_hub::rollouts=debug`) asks the hub for more, in
            // its `hub.log`.
            .env(
                "TRELLIS_LOG",
                std::env::var("TRELLIS_BENCH_HUB_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} hub", trellis.display()))?;
        let started = Instant::now();
        loop {
            if data.join("ca.pem").exists() && data.join(trellis_hub::ADMIN_KEY_FILE).exists() {
                break;
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("the hub did not create its CA and admin key within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let ca = std::fs::read(data.join("ca.pem"))?;
        let http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
            .pool_max_idle_per_host(64)
            .build()?;
        let admin = std::fs::read_to_string(data.join(trellis_hub::ADMIN_KEY_FILE))?
            .trim()
            .to_owned();
        let hub = HubChild {
            child,
            port,
            http,
            admin,
        };
        loop {
            if hub.metrics().await.is_ok() {
                return Ok(hub);
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!(
                    "the hub did not answer within 60 s; see its log next to {}",
                    data.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    /// An API call with the admin key; fails unless the status is 2xx.
    pub async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        crate::setup::api_call(&self.http, &self.url(""), &self.admin, method, path, body).await
    }

    /// The hub's `/metrics` gauges.
    pub async fn metrics(&self) -> anyhow::Result<Metrics> {
        let text = self
            .http
            .get(self.url("/metrics"))
            .timeout(Duration::from_secs(10))
            .send()
            .await?
            .text()
            .await?;
        let gauge = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<usize>().ok())
                .with_context(|| format!("the hub's metrics lack {name}"))
        };
        Ok(Metrics {
            // The hub's own (local) outpost is one of the links.
            connected: gauge("trellis_links_connected")?.saturating_sub(1),
            handshakes_peak: gauge("trellis_link_handshakes_peak")?,
            handshake_limit: gauge("trellis_link_handshake_limit")?,
        })
    }

    /// Kills the hub with SIGKILL: no chance to flush or say goodbye.
    pub fn kill9(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Whether the process is still running (it has not crashed).
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for HubChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Metrics {
    /// Remote outposts with a live link.
    pub connected: usize,
    pub handshakes_peak: usize,
    pub handshake_limit: usize,
}

/// A free TCP port on loopback (bound and released).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

// === setting up ===

/// The hub's port and how many outposts have joined, kept next to its data.
pub struct FleetRecord {
    pub port: u16,
    pub outposts: usize,
}

/// Makes sure a fleet of at least `n` joined outposts exists (joining the
/// missing ones), and returns the running hub.
pub async fn prepare(
    trellis: &Path,
    dirs: &FleetDirs,
    n: usize,
    hub_args: &[String],
) -> anyhow::Result<(HubChild, FleetRecord)> {
    let existing = std::fs::read(dirs.record())
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
        .and_then(|v| {
            Some(FleetRecord {
                port: u16::try_from(v["port"].as_u64()?).ok()?,
                outposts: usize::try_from(v["outposts"].as_u64()?).ok()?,
            })
        })
        .filter(|r| {
            (0..r.outposts).all(|i| dirs.agent(i).join(trellis_agent::STATE_FILE).exists())
                || r.outposts == 0
        });
    let mut record = match existing {
        Some(record) => {
            eprintln!(
                "reusing the fleet in {} ({} outposts joined)",
                dirs.hub.display(),
                record.outposts
            );
            record
        }
        None => {
            for dir in [&dirs.hub, &dirs.agents] {
                if dir.exists() {
                    std::fs::remove_dir_all(dir)
                        .with_context(|| format!("removing the old {}", dir.display()))?;
                }
            }
            if let Some(parent) = dirs.hub.parent() {
                let _ = std::fs::remove_file(parent.join("hub.log"));
            }
            FleetRecord {
                port: free_port()?,
                outposts: 0,
            }
        }
    };
    let hub = HubChild::start(trellis, &dirs.hub, record.port, hub_args).await?;
    if record.outposts < n {
        let started = Instant::now();
        eprintln!("joining outposts {}..{n}", record.outposts);
        join_range(&hub, dirs, record.outposts, n).await?;
        record.outposts = n;
        eprintln!(
            "{} outposts joined in {:.0} s",
            n,
            started.elapsed().as_secs_f64()
        );
    }
    std::fs::write(
        dirs.record(),
        serde_json::to_vec(&json!({"port": record.port, "outposts": record.outposts}))?,
    )?;
    Ok((hub, record))
}

/// Registers outposts `from..to` and joins an agent to each, as an
/// administrator and `trellis agent join` would.
pub async fn join_range(
    hub: &HubChild,
    dirs: &FleetDirs,
    from: usize,
    to: usize,
) -> anyhow::Result<()> {
    let limit = Arc::new(tokio::sync::Semaphore::new(16));
    let mut joins = tokio::task::JoinSet::new();
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for i in from..to {
        let permit = limit.clone().acquire_owned().await?;
        let http = hub.http.clone();
        let base = hub.url("");
        let admin = hub.admin.clone();
        let dir = dirs.agent(i);
        let done = done.clone();
        joins.spawn(async move {
            let _permit = permit;
            crate::setup::register_and_join(&http, &base, &admin, &outpost_name(i), &dir).await?;
            let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            if n.is_multiple_of(1000) {
                eprintln!("  {n} joined");
            }
            anyhow::Ok(())
        });
        while let Some(done) = joins.try_join_next() {
            done??;
        }
    }
    while let Some(done) = joins.join_next().await {
        done??;
    }
    Ok(())
}

// === worker processes ===

/// What the worker processes hold open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerMode {
    /// The real agent, linked to the hub.
    Agents,
    /// A bare TLS connection per outpost, to the baseline server at the
    /// given port, with the outpost's client certificate.
    Tls(u16),
}

/// The fleet workers' niceness (`nice -n`): below the hubs they measure.
const WORKER_NICENESS: i32 = 15;

/// The worker processes running outposts `0..n`; killed when dropped.
pub struct Workers {
    children: Vec<(Child, Option<ChildStdin>)>,
    /// Outposts `0..started` have a worker.
    started: usize,
}

impl Workers {
    pub fn start(dirs: &FleetDirs, n: usize, mode: WorkerMode) -> anyhow::Result<Workers> {
        let mut workers = Workers::none();
        while workers.started < n {
            workers.add(dirs, n, mode)?;
        }
        Ok(workers)
    }

    /// No worker yet: [`Workers::add`] starts them one by one.
    pub fn none() -> Workers {
        Workers {
            children: Vec::new(),
            started: 0,
        }
    }

    /// How many outposts the workers started so far run.
    pub fn started(&self) -> usize {
        self.started
    }

    /// Starts the next worker process: the next [`AGENTS_PER_WORKER`]
    /// outposts, up to outpost `n`.
    pub fn add(&mut self, dirs: &FleetDirs, n: usize, mode: WorkerMode) -> anyhow::Result<()> {
        let from = self.started;
        let to = (from + AGENTS_PER_WORKER).min(n);
        if from >= to {
            return Ok(());
        }
        // The simulated fleet shares the hubs' cores, which a real one
        // does not: at a lower priority its link-up retries cannot
        // starve the hubs it measures (they took ~155% of two cores,
        // the hubs fell behind on handshakes and heartbeats, and links
        // already up timed out).
        let mut command = Command::new("nice");
        command
            .arg("-n")
            .arg(WORKER_NICENESS.to_string())
            .arg(std::env::current_exe()?)
            .arg("fleet-worker")
            .arg("--agents-dir")
            .arg(&dirs.agents)
            .arg("--from")
            .arg(from.to_string())
            .arg("--to")
            .arg(to.to_string());
        if let WorkerMode::Tls(port) = mode {
            command.arg("--tls-baseline").arg(port.to_string());
        }
        let mut child = command
            .env("RUST_LOG", "error")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting a fleet worker")?;
        let stdin = child.stdin.take();
        self.children.push((child, stdin));
        self.started = to;
        Ok(())
    }

    /// The worker processes' ids.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|(c, _)| c.id()).collect()
    }

    /// Stops the workers: their agents shut down cleanly.
    pub fn stop(mut self) {
        for (_, stdin) in &mut self.children {
            stdin.take();
        }
        for (child, _) in &mut self.children {
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for (child, _) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits until at least `n` remote outposts are linked; returns how long
/// that took.
pub async fn wait_connected(
    hub: &HubChild,
    n: usize,
    within: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut last_said = Instant::now();
    loop {
        if let Ok(m) = hub.metrics().await {
            if m.connected >= n {
                return Ok(started.elapsed());
            }
            if last_said.elapsed() > Duration::from_secs(10) {
                eprintln!("  {} of {n} linked", m.connected);
                last_said = Instant::now();
            }
        }
        if started.elapsed() > within {
            bail!("not all {n} outposts linked within {} s", within.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

// === inside a worker process ===

/// The loopback address worker `k`'s connections leave from. A connection
/// to one address and port needs a source port of its own, and one source
/// address has at most ~64,000 of them: every worker on its own address,
/// as every agent of a real fleet is on its own host, lifts that cap from
/// the fleet (all of 127.0.0.0/8 is loopback on Linux).
pub fn worker_source(k: usize) -> std::net::IpAddr {
    let k = u16::try_from(k).unwrap_or(u16::MAX);
    std::net::Ipv4Addr::new(127, 1, (k / 250) as u8, (k % 250) as u8 + 1).into()
}

/// How often the fleet's agents look at their stages between changes. The
/// record-only runtime has nothing to observe, but each look reads the
/// agent's state: every 3 s (the default, right for a real device's
/// components) that was most of an idle worker's CPU, ~7% of a core per
/// 4,000 agents, and at ~80,000 agents the idle fleet took the two cores
/// the link-up needed.
const RECORD_ONLY_OBSERVE_INTERVAL: Duration = Duration::from_secs(600);

/// Runs the agents `from..to` until stdin closes.
pub fn run_worker(
    agents: &Path,
    from: usize,
    to: usize,
    tls_baseline: Option<u16>,
) -> anyhow::Result<()> {
    // Each agent of a real fleet is its own process with its own blocking
    // pool and a handful of state commits at a time. Thousands of agents
    // sharing tokio's default pool (up to 512 threads) spend the machine's
    // two cores switching between those threads instead.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(16)
        .build()?;
    let source = worker_source(from / AGENTS_PER_WORKER);
    runtime.block_on(async move {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        // The parent closes our stdin to stop us.
        std::thread::spawn(move || {
            let mut sink = String::new();
            let _ = std::io::stdin().read_line(&mut sink);
            let _ = stop.send(true);
        });
        let mut tasks = tokio::task::JoinSet::new();
        for i in from..to {
            let dir = agents.join(format!("edge-{i}"));
            let mut stopped = stopped.clone();
            match tls_baseline {
                None => {
                    tasks.spawn(async move {
                        let options = trellis_agent::AgentOptions {
                            runtime: Some(Arc::new(trellis_agent::RecordOnly::new(&dir))),
                            runtime_settings: trellis_agent::RuntimeSettings {
                                observe_interval: RECORD_ONLY_OBSERVE_INTERVAL,
                                ..Default::default()
                            },
                            rng_seed: Some(i as u64),
                            link_source: Some(source),
                            ..Default::default()
                        };
                        if let Err(e) = trellis_agent::run(&dir, options, async move {
                            let _ = stopped.wait_for(|s| *s).await;
                        })
                        .await
                        {
                            eprintln!("agent edge-{i} stopped: {e}");
                        }
                    });
                }
                Some(port) => {
                    let identity = tokio::task::spawn_blocking(move || {
                        let state =
                            trellis_agent::AgentState::open(&dir.join(trellis_agent::STATE_FILE))?;
                        state.identity()?.context("the outpost has joined")
                    })
                    .await??;
                    tasks.spawn(async move {
                        tokio::select! {
                            r = crate::baseline::hold_connection(port, source, &identity) => {
                                if let Err(e) = r {
                                    eprintln!("baseline connection edge-{i} ended: {e:#}");
                                }
                            }
                            _ = stopped.wait_for(|s| *s) => {}
                        }
                    });
                }
            }
            // Spread the first connections a little, as a fleet's power-on would be.
            if i % 200 == 199 {
                tokio::task::yield_now().await;
            }
        }
        while tasks.join_next().await.is_some() {}
        anyhow::Ok(())
    })
}

// === measuring a process ===

/// Resident memory of `pid` in bytes (0 once it is gone).
pub fn rss(pid: u32) -> u64 {
    crate::setup::status_field(pid, "VmRSS:").unwrap_or(0)
}

/// CPU seconds (user + system) `pid` has used so far.
pub fn cpu_seconds_of(pid: u32) -> f64 {
    crate::setup::cpu_seconds_in(&format!("/proc/{pid}/stat"))
}

/// Bytes the hub's established connections on `port` have sent and
/// received so far, and how many connections there are.
pub fn socket_bytes(port: u16) -> anyhow::Result<(u64, u64, usize)> {
    let sockets = socket_counters(port)?;
    let (sent, received) = sockets
        .values()
        .fold((0, 0), |(s, r), (s1, r1)| (s + s1, r + r1));
    Ok((sent, received, sockets.len()))
}

/// Bytes sent and received so far by each established connection of the
/// hub's `port`, by peer address (TCP payload from the kernel's
/// `tcp_info` via `ss`).
pub fn socket_counters(port: u16) -> anyhow::Result<HashMap<String, (u64, u64)>> {
    let output = Command::new("ss")
        .args(["-tinH", "state", "established"])
        .arg(format!("( sport = :{port} )"))
        .output()
        .context("running ss (iproute2) to read socket counters")?;
    if !output.status.success() {
        bail!("ss failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let mut sockets = HashMap::new();
    let mut peer: Option<String> = None;
    for line in text.lines() {
        // A socket's line names its addresses; its counters follow on an
        // indented line (absent while zero).
        if !line.starts_with(char::is_whitespace) {
            peer = line.split_whitespace().nth(3).map(str::to_owned);
            if let Some(p) = &peer {
                sockets.insert(p.clone(), (0, 0));
            }
            continue;
        }
        let Some(entry) = peer.as_ref().and_then(|p| sockets.get_mut(p)) else {
            continue;
        };
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .and_then(|v| v.parse::<u64>().ok())
        };
        if let Some(s) = field("bytes_sent:") {
            entry.0 = s;
        }
        if let Some(r) = field("bytes_received:") {
            entry.1 = r;
        }
    }
    Ok(sockets)
}

/// What the connections open at both snapshots sent and received in
/// between, how many they are, and how many of the first snapshot's were
/// gone by the second (closed, or replaced by a new link).
pub fn payload_between(
    before: &HashMap<String, (u64, u64)>,
    after: &HashMap<String, (u64, u64)>,
) -> (u64, u64, usize, usize) {
    let (mut sent, mut received, mut kept) = (0, 0, 0);
    for (peer, (s0, r0)) in before {
        if let Some((s1, r1)) = after.get(peer) {
            sent += s1.saturating_sub(*s0);
            received += r1.saturating_sub(*r0);
            kept += 1;
        }
    }
    (sent, received, kept, before.len() - kept)
}

/// A line-oriented child process (the baseline server).
pub struct LineChild {
    pub child: Child,
    stdin: ChildStdin,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl LineChild {
    pub fn spawn(mut command: Command) -> anyhow::Result<LineChild> {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take().context("piped stdin")?;
        let stdout = child.stdout.take().context("piped stdout")?;
        Ok(LineChild {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        })
    }

    /// Sends a command and returns the next line it answers.
    pub fn ask(&mut self, command: &str) -> anyhow::Result<String> {
        writeln!(self.stdin, "{command}")?;
        self.stdin.flush()?;
        self.read_line()
    }

    pub fn read_line(&mut self) -> anyhow::Result<String> {
        self.lines
            .next()
            .context("the child process ended")?
            .map_err(Into::into)
    }
}

impl Drop for LineChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
