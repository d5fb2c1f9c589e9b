//! The real Outpost Agent's footprint: the standalone `trellis-agent join`
//! process linked to a hub on loopback, measured from `/proc` while idle and
//! while it deploys a release of a process component; and the size of the
//! binary it ships in (and of the all-roles `trellis` binary, for scale).

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::json;

use crate::report::Report;
use crate::setup::{self, BenchHub, status_field};

pub struct Settings {
    pub idle: Duration,
    pub trellis: std::path::PathBuf,
    pub agent: std::path::PathBuf,
    /// Extra environment for the agent process (`KEY=VALUE`), to compare
    /// e.g. allocator or runtime settings in the same setup.
    pub env: Vec<(String, String)>,
    pub json: Option<std::path::PathBuf>,
}

/// Kills the agent (and the component it started) when dropped.
struct AgentProcess(Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `VmRSS` and `VmHWM` (peak) of a process, in bytes.
fn memory(pid: u32) -> anyhow::Result<(u64, u64)> {
    Ok((status_field(pid, "VmRSS:")?, status_field(pid, "VmHWM:")?))
}

/// CPU time (user + system) of a process so far, in seconds.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    Ok(setup::cpu_seconds_in(&format!("/proc/{pid}/stat")))
}

async fn stage_status(hub: &BenchHub) -> anyhow::Result<serde_json::Value> {
    hub.api(
        reqwest::Method::GET,
        "/projects/bench/stages/line/outpost-status",
        None,
    )
    .await
}

async fn wait_for(
    hub: &BenchHub,
    what: &str,
    timeout: Duration,
    check: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        if check(&stage_status(hub).await?) {
            return Ok(());
        }
        if started.elapsed() > timeout {
            bail!("{what} did not happen within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let hub = BenchHub::start(&work.path().join("hub")).await?;
    let agent = AgentProcess(
        hub.edge_agent(&settings.agent, &work.path().join("agent"), &settings.env)
            .await?,
    );
    let pid = agent.0.id();
    wait_for(&hub, "the agent linking", Duration::from_secs(60), |s| {
        s["link"]["state"] == "online"
    })
    .await?;

    // Idle: linked, one stage, nothing to do but heartbeats.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let cpu_before = cpu_seconds(pid)?;
    let idle_started = Instant::now();
    tokio::time::sleep(settings.idle).await;
    let idle_cpu = (cpu_seconds(pid)? - cpu_before) / idle_started.elapsed().as_secs_f64();
    let (idle_rss, _) = memory(pid)?;
    // Private memory, and pages of the binary and libraries (shared).
    let idle_anon = status_field(pid, "RssAnon:")?;
    let idle_file = status_field(pid, "RssFile:")?;
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))?.count();

    // A deploy: a build of a process component, pushed and applied.
    let project = work.path().join("project");
    setup::bridge_project(&project)?;
    let config = work.path().join("config");
    setup::trellis(
        &settings.trellis,
        &hub,
        hub.addr,
        &config,
        &project,
        &["push", "build", "-p", "bench"],
    )?;
    let cpu_before = cpu_seconds(pid)?;
    let started = Instant::now();
    hub.api(
        reqwest::Method::POST,
        "/projects/bench/stages/line/releases",
        Some(json!({})),
    )
    .await?;
    let mut peak = idle_rss;
    loop {
        peak = peak.max(memory(pid)?.0);
        let status = stage_status(&hub).await?;
        if status["sync"]["state"] == "in-sync" && status["sync"]["applied_release"] == 1 {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("the release was not applied within 120 s: {status}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deploy_time = started.elapsed();
    let deploy_cpu = cpu_seconds(pid)? - cpu_before;
    let (_, hwm) = memory(pid)?;
    drop(agent);

    let size = std::fs::metadata(&settings.agent)?.len();
    let stripped = stripped_size(&settings.agent, work.path());
    let all_roles = stripped_size(&settings.trellis, work.path());

    const MIB: f64 = (1 << 20) as f64;
    let mut report = Report::new(
        "agent",
        json!({
            "agent": "trellis-agent join --no-containers (process runtime)",
            "idle_secs": settings.idle.as_secs(),
            "env": settings.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        }),
    );
    // Issue 21's goals (issue 7 asked for 15 MiB and 15 MB).
    report.at_most("idle RSS", idle_rss as f64 / MIB, "MiB", 8.0);
    report.add("  of it private (RssAnon)", idle_anon as f64 / MIB, "MiB");
    report.add(
        "  of it file pages (RssFile)",
        idle_file as f64 / MIB,
        "MiB",
    );
    report.add("  threads", threads as f64, "");
    report.at_most("idle CPU", idle_cpu * 100.0, "% of a core", 0.5);
    report.add(
        "peak RSS while deploying",
        peak.max(hwm) as f64 / MIB,
        "MiB",
    );
    report.add("deploy: push to in-sync", deploy_time.as_secs_f64(), "s");
    report.add("deploy: agent CPU time", deploy_cpu, "s");
    report.at_most("trellis-agent binary", size as f64 / 1e6, "MB", 10.0);
    match (stripped, all_roles) {
        (Some(agent), Some(all)) => {
            report.at_most(
                "trellis-agent binary, stripped",
                agent as f64 / 1e6,
                "MB",
                15.0,
            );
            report.add(
                "trellis binary (all roles), stripped",
                all as f64 / 1e6,
                "MB",
            );
        }
        _ => report.note("strip(1) is not installed: no stripped sizes"),
    }
    report.finish(settings.json.as_deref())?;
    Ok(())
}

/// The size of a stripped copy of the binary, if `strip` is installed.
fn stripped_size(binary: &Path, scratch: &Path) -> Option<u64> {
    let name = binary.file_name().unwrap_or_default().to_string_lossy();
    let copy = scratch.join(format!("{name}-stripped"));
    std::fs::copy(binary, &copy).ok()?;
    let ok = Command::new("strip").arg(&copy).status().ok()?.success();
    ok.then(|| std::fs::metadata(&copy).ok().map(|m| m.len()))
        .flatten()
}
