//! The fleet scenarios over several hub instances: `cluster-connect` (idle
//! outposts spread over the instances: memory and bytes per outpost),
//! `failover` (one instance SIGKILLed under a linked fleet: time until its
//! outposts are back on the others) and `cluster-fanout` (a release pushed
//! through one instance to stages whose outposts are linked to all of
//! them).
//!
//! The cluster: a PostgreSQL server of its own (the test kit's private
//! cluster, default settings), `--hubs` `trellis hub` processes on it, and
//! HAProxy in front running the repository's configuration
//! (`deploy/haproxy/haproxy.cfg`, its `server` lines written out for the
//! instances), as many HAProxy processes on the one public port
//! (SO_REUSEPORT) as the ~20,000 file descriptors per process require (two
//! per connection). The outposts join through the first instance's API;
//! their join tokens carry the balancer's address, so every agent links
//! through it. A fresh cluster and fleet every run.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;

use crate::fleet::{self, FleetDirs, HubChild, WorkerMode, Workers, cpu_seconds_of, rss};
use crate::report::{Report, percentile};
use crate::scale::Common;

/// Links one HAProxy process carries (two descriptors each, under the
/// per-process limit with room for the health checks).
const LINKS_PER_BALANCER: usize = 9000;

/// How long a freshly started instance gets to settle before its memory is
/// read as the zero point.
const SETTLE: Duration = Duration::from_secs(5);

pub struct ClusterSettings {
    pub hubs: usize,
    pub outposts: usize,
    /// How long `cluster-connect` measures the idle fleet.
    pub idle: Duration,
}

/// The running cluster.
struct Cluster {
    hubs: Vec<Option<HubChild>>,
    addrs: Vec<SocketAddr>,
    _balancers: Vec<trellis_testkit::haproxy::Balancer>,
    // Dropped last: the hubs go before their database.
    _pg: trellis_testkit::postgres::PrivatePostgres,
    dirs: FleetDirs,
}

impl Cluster {
    /// A new database, `s.hubs` instances on it, the balancers, and
    /// `s.outposts` outposts joined.
    async fn start(common: &Common, s: &ClusterSettings) -> anyhow::Result<Cluster> {
        let work = common
            .dirs
            .hub
            .parent()
            .map(Path::to_owned)
            .unwrap_or_else(std::env::temp_dir)
            .with_file_name("trellis-bench-cluster");
        let agents = common
            .dirs
            .agents
            .with_file_name("trellis-bench-cluster-agents");
        for dir in [&work, &agents] {
            if dir.exists() {
                std::fs::remove_dir_all(dir)
                    .with_context(|| format!("removing the old {}", dir.display()))?;
            }
        }
        std::fs::create_dir_all(&work)?;
        let dirs = FleetDirs {
            hub: work.join("hub-0"),
            agents,
        };
        let pg = trellis_testkit::postgres::PrivatePostgres::start()
            .context("the cluster scenarios need PostgreSQL (Debian's postgresql package)")?;
        let public: SocketAddr = ([127, 0, 0, 1], fleet::free_port()?).into();
        let ports: Vec<u16> = (0..s.hubs)
            .map(|_| fleet::free_port())
            .collect::<Result<_, _>>()?;
        let addrs: Vec<SocketAddr> = ports.iter().map(|p| ([127, 0, 0, 1], *p).into()).collect();
        let mut hubs = Vec::new();
        for (h, port) in ports.iter().enumerate() {
            let data = work.join(format!("hub-{h}"));
            if h > 0 {
                // What the first instance made and the others are given:
                // the cluster key (as `TRELLIS_CLUSTER_KEY` would) and the
                // administrator key the benchmark calls the API with. The
                // CA they take from the store themselves, writing it only
                // once they have it.
                std::fs::create_dir_all(&data)?;
                for file in [
                    trellis_hub::cluster::secrets::CLUSTER_KEY_FILE,
                    trellis_hub::ADMIN_KEY_FILE,
                ] {
                    std::fs::copy(work.join("hub-0").join(file), data.join(file))
                        .with_context(|| format!("copying {file} to instance {h}"))?;
                }
            }
            let mut args = vec![
                "--store".to_owned(),
                pg.url(),
                "--public-address".to_owned(),
                public.to_string(),
                "--instance-address".to_owned(),
                format!("127.0.0.1:{port}"),
            ];
            args.extend(common.hub_args.iter().cloned());
            hubs.push(Some(
                HubChild::start(&common.trellis, &data, *port, &args).await?,
            ));
        }
        // The repository's balancer configuration, with a server line per
        // instance.
        let config = include_str!("../../../deploy/haproxy/haproxy.cfg");
        let servers: String = addrs
            .iter()
            .enumerate()
            .map(|(h, a)| format!("    server hub-{} {a}\n", h + 1))
            .collect();
        let config: String = config
            .lines()
            .filter(|l| !l.trim_start().starts_with("server hub-"))
            .map(|l| format!("{l}\n"))
            .collect::<String>()
            + &servers;
        let config_file = work.join("haproxy.cfg");
        std::fs::write(&config_file, config)?;
        let ca = work.join("hub-0").join("ca.pem");
        let mut balancers = Vec::new();
        for _ in 0..(s.outposts + 100).div_ceil(LINKS_PER_BALANCER) {
            balancers.push(
                trellis_testkit::haproxy::Balancer::start(&config_file, public, &[], &ca)
                    .context("the cluster scenarios need HAProxy (Debian's haproxy package)")?,
            );
            // The next one binds the same port (SO_REUSEPORT); let this one
            // finish starting first.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let cluster = Cluster {
            hubs,
            addrs,
            _balancers: balancers,
            _pg: pg,
            dirs,
        };
        let started = Instant::now();
        eprintln!(
            "joining {} outposts through instance 1 (tokens name the balancer {public})",
            s.outposts
        );
        fleet::join_range(cluster.hub(0), &cluster.dirs, 0, s.outposts).await?;
        eprintln!(
            "{} outposts joined in {:.0} s",
            s.outposts,
            started.elapsed().as_secs_f64()
        );
        Ok(cluster)
    }

    fn hub(&self, h: usize) -> &HubChild {
        self.hubs[h].as_ref().expect("a live instance")
    }

    /// Links each instance holds (`None` for a dead one or one that did not
    /// answer).
    async fn links(&self) -> Vec<Option<usize>> {
        let mut out = Vec::new();
        for hub in &self.hubs {
            out.push(match hub {
                Some(hub) => gauge(hub, "trellis_links_connected").await.ok(),
                None => None,
            });
        }
        out
    }

    /// Starts the fleet's workers one after the other, each once the
    /// outposts of those before it have all but half a worker's worth
    /// linked: a fleet powered on in stages. All at once, 100,000 agents'
    /// handshakes starved the instances' health checks, HAProxy took
    /// every instance out of service, and the agents it cut off came back
    /// as a storm (1,476 linked after four minutes).
    async fn power_on(&self, n: usize) -> anyhow::Result<Workers> {
        let mut workers = Workers::none();
        while workers.started() < n {
            workers.add(&self.dirs, n, WorkerMode::Agents)?;
            let lagging = workers
                .started()
                .saturating_sub(fleet::AGENTS_PER_WORKER / 2);
            self.wait_linked(lagging, Duration::from_secs(1800)).await?;
        }
        Ok(workers)
    }

    async fn wait_linked(&self, n: usize, within: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let mut said = Instant::now();
        loop {
            let links = self.links().await;
            let total: usize = links.iter().flatten().sum();
            if total >= n {
                return Ok(started.elapsed());
            }
            if said.elapsed() > Duration::from_secs(10) {
                eprintln!("  {total} of {n} linked: {links:?}");
                said = Instant::now();
            }
            if started.elapsed() > within {
                bail!(
                    "only {total} of {n} outposts linked within {} s",
                    within.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// A gauge or counter of an instance's `/metrics`.
async fn gauge(hub: &HubChild, name: &str) -> anyhow::Result<usize> {
    let text = hub
        .http
        .get(hub.url("/metrics"))
        .timeout(Duration::from_secs(10))
        .send()
        .await?
        .text()
        .await?;
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as usize)
        .with_context(|| format!("the instance's metrics lack {name}"))
}

fn settings_json(common: &Common, s: &ClusterSettings) -> serde_json::Value {
    json!({"hubs": s.hubs, "outposts": s.outposts, "hub_args": common.hub_args})
}

// === cluster-connect ===

pub async fn connect(common: Common, s: ClusterSettings) -> anyhow::Result<()> {
    let n = s.outposts;
    let cluster = Cluster::start(&common, &s).await?;
    tokio::time::sleep(SETTLE).await;
    let pids: Vec<u32> = cluster.hubs.iter().flatten().map(HubChild::pid).collect();
    let rss_empty: Vec<u64> = pids.iter().map(|p| rss(*p)).collect();
    eprintln!("linking {n} outposts through the balancer, a worker's at a time");
    let started = Instant::now();
    let workers = cluster.power_on(n).await?;
    cluster.wait_linked(n, Duration::from_secs(3600)).await?;
    let linked = started.elapsed();
    tokio::time::sleep(SETTLE).await;
    let spread = cluster.links().await;
    let rss_held: Vec<u64> = pids.iter().map(|p| rss(*p)).collect();
    // The simulated fleet's own footprint, which shares this machine with
    // the hubs: what limits how many outposts one box can simulate.
    let fleet_rss: u64 = workers.pids().iter().map(|p| rss(*p)).sum();
    let memory_available = crate::setup::meminfo_field("MemAvailable:").unwrap_or(0);
    eprintln!("idle for {} s", s.idle.as_secs());
    let bytes_before: Vec<(u64, u64, usize)> = cluster
        .addrs
        .iter()
        .map(|a| fleet::socket_bytes(a.port()))
        .collect::<Result<_, _>>()?;
    let cpu_before: Vec<f64> = pids.iter().map(|p| cpu_seconds_of(*p)).collect();
    tokio::time::sleep(s.idle).await;
    let bytes_after: Vec<(u64, u64, usize)> = cluster
        .addrs
        .iter()
        .map(|a| fleet::socket_bytes(a.port()))
        .collect::<Result<_, _>>()?;
    let cpu_after: Vec<f64> = pids.iter().map(|p| cpu_seconds_of(*p)).collect();
    workers.stop();

    let held = rss_held.iter().sum::<u64>() as f64 - rss_empty.iter().sum::<u64>() as f64;
    let moved: u64 = bytes_after
        .iter()
        .zip(&bytes_before)
        .map(|(a, b)| (a.0 + a.1).saturating_sub(b.0 + b.1))
        .sum();
    let cpu: f64 = cpu_after.iter().zip(&cpu_before).map(|(a, b)| a - b).sum();
    let mut report = Report::new("cluster-connect", settings_json(&common, &s));
    report.at_least(
        "outposts linked (all instances)",
        spread.iter().flatten().sum::<usize>() as f64,
        "",
        n as f64,
    );
    report.add("time until all linked", linked.as_secs_f64(), "s");
    report.add(
        "hub RSS per outpost (all instances, held − empty)",
        held / n as f64 / 1024.0,
        "KiB",
    );
    report.add(
        "idle bytes per outpost per second (both directions, hub side)",
        moved as f64 / n as f64 / s.idle.as_secs_f64(),
        "B/s",
    );
    report.add(
        "hub CPU while idle (all instances)",
        cpu / s.idle.as_secs_f64() * 100.0,
        "% of a core",
    );
    report.note(format!(
        "links per instance: {}; RSS per instance (empty → held): {}",
        spread
            .iter()
            .map(|l| l.map_or("?".into(), |l| l.to_string()))
            .collect::<Vec<_>>()
            .join(", "),
        rss_empty
            .iter()
            .zip(&rss_held)
            .map(|(e, h)| format!("{} → {} MiB", e >> 20, h >> 20))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    report.note(format!(
        "the simulated fleet: {} MiB in its worker processes ({:.0} KiB per agent), \
         the machine's available memory {} MiB, when all were linked",
        fleet_rss >> 20,
        fleet_rss as f64 / n as f64 / 1024.0,
        memory_available >> 20
    ));
    report.finish(common.json.as_deref())?;
    Ok(())
}

// === failover ===

pub async fn failover(common: Common, s: ClusterSettings) -> anyhow::Result<()> {
    if s.hubs < 2 {
        bail!("failover needs at least two instances (--hubs)");
    }
    let n = s.outposts;
    let mut cluster = Cluster::start(&common, &s).await?;
    eprintln!("linking {n} outposts through the balancer");
    let workers = Workers::start(&cluster.dirs, n, WorkerMode::Agents)?;
    cluster.wait_linked(n, Duration::from_secs(3600)).await?;
    tokio::time::sleep(SETTLE).await;
    let before = cluster.links().await;
    // The instance holding the most links goes.
    let victim = before
        .iter()
        .enumerate()
        .max_by_key(|(_, l)| l.unwrap_or(0))
        .map(|(h, _)| h)
        .unwrap_or(0);
    let lost = before[victim].unwrap_or(0);
    let others_before: usize = before
        .iter()
        .enumerate()
        .filter(|(h, _)| *h != victim)
        .filter_map(|(_, l)| *l)
        .sum();
    eprintln!("SIGKILL to instance {} holding {lost} links", victim + 1);
    let fenced_before = fenced(&cluster).await;
    if let Some(hub) = cluster.hubs[victim].take() {
        hub.kill9()?;
    }
    let killed = Instant::now();
    let ninety_nine = others_before + (lost * 99).div_ceil(100);
    let (mut at_99, mut at_all) = (None, None);
    let mut timeline: Vec<(u64, usize)> = Vec::new();
    let mut peak = 0;
    while at_all.is_none() && killed.elapsed() < Duration::from_secs(600) {
        let total: usize = cluster.links().await.iter().flatten().sum();
        peak = peak.max(total);
        let t = killed.elapsed().as_secs_f64();
        let tick = t as u64 / 5 * 5;
        if timeline.last().is_none_or(|(last, _)| *last < tick) {
            timeline.push((tick, total));
        }
        if total >= ninety_nine && at_99.is_none() {
            at_99 = Some(t);
        }
        if total >= n {
            at_all = Some(t);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Settled: every outpost has one session, on a live instance.
    tokio::time::sleep(SETTLE).await;
    let after = cluster.links().await;
    let total_after: usize = after.iter().flatten().sum();
    let fenced_after = fenced(&cluster).await;
    let mut crashed = 0;
    for hub in cluster.hubs.iter_mut().flatten() {
        if !hub.alive() {
            crashed += 1;
        }
    }
    workers.stop();

    let mut report = Report::new("failover", settings_json(&common, &s));
    report.add("links on the killed instance", lost as f64, "");
    report.at_most(
        "killed → 99% of its outposts back on the others",
        at_99.unwrap_or(f64::INFINITY),
        "s",
        60.0,
    );
    report.add("killed → all back", at_all.unwrap_or(f64::INFINITY), "s");
    report.at_most(
        "sessions after settling − outposts (a double session counts twice)",
        total_after as f64 - n as f64,
        "",
        0.0,
    );
    report.at_most("peak sessions − outposts", peak as f64 - n as f64, "", 0.0);
    report.at_most("instances crashed", crashed as f64, "", 0.0);
    report.add(
        "sessions fenced meanwhile (a newer link-up ended an older one)",
        fenced_after.saturating_sub(fenced_before) as f64,
        "",
    );
    report.note(format!(
        "links per instance before: {before:?}, after: {after:?}; linked (all instances) every 5 s after the kill: {}",
        timeline
            .iter()
            .map(|(t, n)| format!("{t} s: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    report.note(
        "the agents of the killed instance see their connection closed by the balancer, back off \
         with full jitter and reconnect through it; HAProxy marks the instance down after two \
         failed checks (1 s apart) and retries a refused connection on another",
    );
    report.finish(common.json.as_deref())?;
    Ok(())
}

async fn fenced(cluster: &Cluster) -> usize {
    let mut total = 0;
    for hub in cluster.hubs.iter().flatten() {
        total += gauge(hub, "trellis_link_sessions_fenced_total")
            .await
            .unwrap_or(0);
    }
    total
}

// === cluster-fanout ===

pub async fn fanout(common: Common, s: ClusterSettings) -> anyhow::Result<()> {
    let n = s.outposts;
    let cluster = Cluster::start(&common, &s).await?;
    crate::scale::place_stages(cluster.hub(0), n).await?;
    eprintln!("linking {n} outposts through the balancer");
    let workers = Workers::start(&cluster.dirs, n, WorkerMode::Agents)?;
    cluster.wait_linked(n, Duration::from_secs(3600)).await?;
    tokio::time::sleep(SETTLE).await;
    let spread = cluster.links().await;
    eprintln!("pushing a release to {n} stages through instance 1");
    let Cluster { mut hubs, .. } = cluster;
    let first = Arc::new(hubs[0].take().expect("instance 1 runs"));
    let run = crate::scale::push_and_watch(first, n, crate::scale::PUSH_CHUNK).await?;
    workers.stop();
    drop(hubs);
    let latencies: Vec<f64> = run
        .applied_at
        .iter()
        .filter_map(|(stage, seen)| run.pushed.get(stage).map(|(_, at)| seen - at))
        .collect();
    let all = if run.applied_at.len() == n {
        run.applied_at.values().copied().fold(0.0, f64::max)
    } else {
        f64::INFINITY
    };
    let mut report = Report::new("cluster-fanout", settings_json(&common, &s));
    report.at_least(
        "stages that reported the release applied",
        run.applied_at.len() as f64,
        "",
        n as f64,
    );
    report.add(
        format!(
            "pushing the release to every stage ({} API calls)",
            run.requests
        ),
        run.push_phase,
        "s",
    );
    report.add("push → applied, p50", percentile(&latencies, 50.0), "s");
    report.add("push → applied, p99", percentile(&latencies, 99.0), "s");
    if n >= 10_000 {
        report.at_most("first push → last stage applied", all, "s", 15.0);
    } else {
        report.add("first push → last stage applied", all, "s");
    }
    report.note(format!(
        "links per instance: {spread:?}; pushed and watched through instance 1, so stages on the \
         others were told through PostgreSQL's NOTIFY; a poll of the pending list took {:.0} ms \
         at the median",
        crate::setup::median(run.polls.clone()) * 1000.0
    ));
    report.finish(common.json.as_deref())?;
    Ok(())
}
