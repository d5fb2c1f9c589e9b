//! `chaos`: the end-to-end fault campaign with real processes. A hub
//! process and one `trellis agent run` process per outpost, each linked
//! through its own fault proxy, run a process component per stage while a
//! seeded schedule pushes releases, flaps links (resets, refusals, dead
//! links), kills agents with SIGKILL and restarts them, and kills the hub
//! with SIGKILL and restarts it. Then every fault is lifted and the run
//! checks:
//!
//! - every stage converged: the hub's latest release of it is applied,
//!   reported `in-sync` by its agent, with its component running;
//! - no committed write was lost: every release push the API acknowledged
//!   is still there, with the revision it was acknowledged with;
//! - no acknowledged status was lost: the applied revision the hub showed
//!   for a stage never went back, across hub restarts included.
//!
//! Violations are printed with the seed; the same seed replays the same
//! schedule (the processes' own timing still varies).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::json;
use trellis_faultproxy::{FaultProxy, Mode};

use crate::fleet::{HubChild, free_port};
use crate::report::Report;
use crate::setup::{self, Client};

pub struct Settings {
    pub outposts: usize,
    pub releases: usize,
    pub flaps: usize,
    pub agent_kills: usize,
    pub hub_kills: usize,
    pub seed: u64,
    pub trellis: PathBuf,
    pub json: Option<PathBuf>,
}

const PROJECT: &str = "chaos";

#[derive(Debug, Clone, Copy)]
enum Event {
    Push,
    Flap,
    KillAgent,
    KillHub,
}

/// One outpost: its agent process (when running), its data and its proxy.
struct Outpost {
    stage: String,
    dir: PathBuf,
    proxy: FaultProxy,
    agent: Option<Child>,
}

impl Outpost {
    fn start_agent(&mut self, trellis: &Path) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.with_extension("log"))?;
        self.agent = Some(
            Command::new(trellis)
                .args(["agent", "run", "--no-containers", "--settle-time", "1s"])
                .arg("--data")
                .arg(&self.dir)
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting trellis agent run")?,
        );
        Ok(())
    }

    fn kill_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What the run saw.
#[derive(Default)]
struct Ledger {
    /// Per stage, the releases the API acknowledged: (number, revision).
    acknowledged: HashMap<String, Vec<(u64, u64)>>,
    unacknowledged_pushes: usize,
    /// Per stage, the highest applied revision the hub has shown.
    applied_high: HashMap<String, u64>,
    violations: Vec<String>,
    flaps: usize,
    agent_kills: usize,
    hub_kills: usize,
    observations: usize,
}

impl Ledger {
    /// Reads every stage's applied revision from the hub and checks none
    /// went back.
    async fn observe(&mut self, hub: &HubChild) {
        let Ok(rows) = hub
            .api(
                reqwest::Method::GET,
                &format!("/projects/{PROJECT}/outpost-status"),
                None,
            )
            .await
        else {
            return;
        };
        self.observations += 1;
        for row in rows.as_array().into_iter().flatten() {
            let (Some(stage), Some(applied)) =
                (row["stage"].as_str(), row["applied_revision"].as_u64())
            else {
                continue;
            };
            let high = self.applied_high.entry(stage.to_owned()).or_default();
            if applied < *high {
                self.violations.push(format!(
                    "stage {stage}: the hub showed applied revision {high}, later {applied} — an \
                     acknowledged status was lost"
                ));
            }
            *high = (*high).max(applied);
        }
    }
}

pub async fn run(s: Settings) -> anyhow::Result<()> {
    if s.outposts == 0 || s.releases < s.outposts {
        anyhow::bail!(
            "--releases ({}) must be at least --outposts ({}), and there must be an outpost: every stage needs a release to converge to",
            s.releases,
            s.outposts
        );
    }
    let work = tempfile::tempdir()?;
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(s.seed);
    let port = free_port()?;
    let hub_data = work.path().join("hub");
    let mut hub = HubChild::start(&s.trellis, &hub_data, port, &[]).await?;

    // The project and one build of a process component.
    hub.api(
        reqwest::Method::POST,
        "/projects",
        Some(json!({"name": PROJECT})),
    )
    .await?;
    let project = work.path().join("project");
    setup::bridge_project(&project)?;
    let client = Client {
        endpoint: hub.url(""),
        key: hub.admin.clone(),
        ca: hub_data.join("ca.pem"),
        config: work.path().join("config"),
    };
    client.run(&s.trellis, &project, &["push", "build", "-p", PROJECT])?;

    // Outposts, each behind its own fault proxy, with a stage placed on
    // it through its Outpost URI.
    let hub_addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let mut outposts = Vec::with_capacity(s.outposts);
    for i in 0..s.outposts {
        let name = format!("line-{i}");
        let dir = work.path().join(&name);
        setup::register_and_join(&hub.http, &hub.url(""), &hub.admin, &name, &dir).await?;
        let proxy = FaultProxy::start(hub_addr).await?;
        let state = trellis_agent::AgentState::open(&dir.join(trellis_agent::STATE_FILE))?;
        setup::route_agent(&state, proxy.addr())?;
        drop(state);
        let uri = hub
            .api(reqwest::Method::GET, &format!("/outposts/{name}/uri"), None)
            .await?["uri"]
            .clone();
        let stage = format!("s{i}");
        hub.api(
            reqwest::Method::POST,
            &format!("/projects/{PROJECT}/stages"),
            Some(json!({"name": stage, "type": "prod", "outpost_uri": uri})),
        )
        .await?;
        let mut outpost = Outpost {
            stage,
            dir,
            proxy,
            agent: None,
        };
        outpost.start_agent(&s.trellis)?;
        outposts.push(outpost);
    }

    // The schedule: every fault and push, in a seeded order.
    let mut plan: Vec<Event> = std::iter::repeat_n(Event::Push, s.releases)
        .chain(std::iter::repeat_n(Event::Flap, s.flaps))
        .chain(std::iter::repeat_n(Event::KillAgent, s.agent_kills))
        .chain(std::iter::repeat_n(Event::KillHub, s.hub_kills))
        .collect();
    plan.shuffle(&mut rng);
    eprintln!(
        "chaos seed {}: {} events over {} outposts",
        s.seed,
        plan.len(),
        s.outposts
    );

    let mut ledger = Ledger::default();
    let mut pushes = 0;
    // Links restored at these times.
    let mut restore_at: Vec<Option<Instant>> = vec![None; s.outposts];
    for (n, event) in plan.iter().enumerate() {
        for (i, at) in restore_at.iter_mut().enumerate() {
            if at.is_some_and(|t| t <= Instant::now()) {
                outposts[i].proxy.set(Mode::Pass);
                *at = None;
            }
        }
        let mut i = rng.gen_range(0..s.outposts);
        match event {
            Event::Push => {
                // The first pushes go round the stages, so that every stage
                // has a release to converge to (seed 2 once left one
                // without any, and the check waited for it in vain).
                if pushes < s.outposts {
                    i = pushes;
                }
                pushes += 1;
                let stage = outposts[i].stage.clone();
                match hub
                    .api(
                        reqwest::Method::POST,
                        &format!("/projects/{PROJECT}/stages/{stage}/releases"),
                        Some(json!({})),
                    )
                    .await
                {
                    Ok(release) => {
                        let number = release["number"].as_u64().context("release number")?;
                        let revision = release["revision"].as_u64().context("release revision")?;
                        ledger
                            .acknowledged
                            .entry(stage)
                            .or_default()
                            .push((number, revision));
                    }
                    Err(_) => ledger.unacknowledged_pushes += 1,
                }
            }
            Event::Flap => {
                ledger.flaps += 1;
                let proxy = &outposts[i].proxy;
                let down = Duration::from_millis(rng.gen_range(100..2500));
                match rng.gen_range(0..3) {
                    // A reset: the link drops and may come back at once.
                    0 => proxy.drop_connections(),
                    // The hub unreachable for a while.
                    1 => {
                        proxy.set(Mode::Refuse);
                        restore_at[i] = Some(Instant::now() + down);
                    }
                    // A dead link that heals before anyone notices, or not.
                    _ => {
                        proxy.set(Mode::Blackhole);
                        restore_at[i] = Some(Instant::now() + down);
                    }
                }
            }
            Event::KillAgent => {
                ledger.agent_kills += 1;
                outposts[i].kill_agent();
                tokio::time::sleep(Duration::from_millis(rng.gen_range(100..2000))).await;
                outposts[i].start_agent(&s.trellis)?;
            }
            Event::KillHub => {
                ledger.hub_kills += 1;
                ledger.observe(&hub).await;
                hub.kill9()?;
                tokio::time::sleep(Duration::from_millis(rng.gen_range(100..3000))).await;
                hub = HubChild::start(&s.trellis, &hub_data, port, &[]).await?;
            }
        }
        if n % 4 == 0 {
            ledger.observe(&hub).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(20..300))).await;
    }
    let faults_over = started.elapsed();

    // Lift every fault and wait for the fleet to converge.
    for outpost in &mut outposts {
        outpost.proxy.set(Mode::Pass);
        if outpost
            .agent
            .as_mut()
            .is_none_or(|c| !matches!(c.try_wait(), Ok(None)))
        {
            outpost.start_agent(&s.trellis)?;
        }
    }
    let converge_started = Instant::now();
    let mut last;
    let converged = loop {
        ledger.observe(&hub).await;
        let rows = hub
            .api(
                reqwest::Method::GET,
                &format!("/projects/{PROJECT}/outpost-status"),
                None,
            )
            .await?;
        let done = rows.as_array().is_some_and(|rows| {
            rows.iter().all(|r| {
                r["sync"] == "in-sync"
                    && r["latest_release"].as_u64().is_some()
                    && r["applied_release"] == r["latest_release"]
            })
        });
        last = rows;
        if done {
            break true;
        }
        if converge_started.elapsed() > Duration::from_secs(300) {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let converge_time = converge_started.elapsed();
    if !converged {
        ledger.violations.push(format!(
            "the fleet did not converge within 300 s after the faults ended: {last}"
        ));
    }

    // Every acknowledged push is still there, as acknowledged, and the
    // latest release is the one applied with its component running.
    for outpost in &outposts {
        let stage = &outpost.stage;
        let releases = hub
            .api(
                reqwest::Method::GET,
                &format!("/projects/{PROJECT}/stages/{stage}/releases"),
                None,
            )
            .await?;
        let stored: HashMap<u64, u64> = releases
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| Some((r["number"].as_u64()?, r["revision"].as_u64()?)))
            .collect();
        for &(number, revision) in ledger.acknowledged.get(stage).into_iter().flatten() {
            match stored.get(&number) {
                Some(&r) if r == revision => {}
                Some(&r) => ledger.violations.push(format!(
                    "stage {stage}: release #{number} was acknowledged with revision {revision} \
                     but the hub has revision {r}"
                )),
                None => ledger.violations.push(format!(
                    "stage {stage}: release #{number} was acknowledged but is gone — a committed \
                     write was lost"
                )),
            }
        }
        if converged {
            let components = hub
                .api(
                    reqwest::Method::GET,
                    &format!("/projects/{PROJECT}/stages/{stage}/components"),
                    None,
                )
                .await?;
            let running = components.to_string().contains("\"running\"");
            if !running {
                ledger.violations.push(format!(
                    "stage {stage}: in sync but its component is not running: {components}"
                ));
            }
        }
    }
    for outpost in &mut outposts {
        outpost.kill_agent();
    }
    drop(hub);
    trellis_testkit::procs::kill_processes_under(work.path());
    // The hub's and agents' logs, for whoever looks into a violation.
    let kept = (!ledger.violations.is_empty()).then(|| work.keep());

    let pushes: usize = ledger.acknowledged.values().map(Vec::len).sum();
    let mut report = Report::new(
        "chaos",
        json!({
            "seed": s.seed, "outposts": s.outposts, "releases": s.releases, "flaps": s.flaps,
            "agent_kills": s.agent_kills, "hub_kills": s.hub_kills,
        }),
    );
    report.at_least("outposts (agent processes)", s.outposts as f64, "", 10.0);
    report.at_least("releases acknowledged by the API", pushes as f64, "", 50.0);
    report.add(
        "pushes cut off by a hub kill (not acknowledged)",
        ledger.unacknowledged_pushes as f64,
        "",
    );
    report.at_least(
        "link flaps through the fault proxies",
        ledger.flaps as f64,
        "",
        100.0,
    );
    report.at_least("agent SIGKILLs", ledger.agent_kills as f64, "", 10.0);
    report.at_least("hub SIGKILLs", ledger.hub_kills as f64, "", 5.0);
    report.add("status observations", ledger.observations as f64, "");
    report.add("faults phase", faults_over.as_secs_f64(), "s");
    report.add(
        "converged after the faults ended",
        converge_time.as_secs_f64(),
        "s",
    );
    report.at_most("violations", ledger.violations.len() as f64, "", 0.0);
    for v in &ledger.violations {
        report.note(format!("VIOLATION (seed {}): {v}", s.seed));
    }
    if let Some(dir) = &kept {
        report.note(format!(
            "the hub's and agents' data and logs are kept in {}",
            dir.display()
        ));
    }
    report.finish(s.json.as_deref())?;
    if !ledger.violations.is_empty() {
        bail!(
            "{} violations; replay with --seed {}",
            ledger.violations.len(),
            s.seed
        );
    }
    Ok(())
}
