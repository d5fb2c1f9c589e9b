//! Rollouts in waves, end to end with the real binaries: a hub and 30
//! outposts, each its own `trellis agent` process (process runtime), with
//! labels; stages chosen by label selectors.
//!
//! One fleet goes through three rollouts in a row:
//! (a) wave 2 holds two stages whose release fails its health check (their
//!     config makes the component exit), past the threshold: the rollout
//!     halts at wave 2 by itself, its reason names both stages, and no
//!     stage of waves 3 and 4 ever gets the release;
//! (b) three outposts of wave 2 are offline when it starts: the wave
//!     passes on the online ones, the three are listed as carried along,
//!     and they apply the release once their agents link again;
//! (c) the hub is killed with SIGKILL while wave 3 is out and started
//!     again: the rollout carries on from wave 3 (no stage gets the release
//!     twice) and completes, with an outpost of wave 4 offline: carried
//!     along, it applies the release after the rollout completed, and the
//!     completed rollout's record says so;
//! then a third rollout over a subset (`site=hamburg`) is aborted after its
//! first wave with `--rollback`: those stages run the build before again,
//! the second wave's never got the new one.
//!
//! And the bad input: a selector that matches nothing, an unknown build,
//! malformed selector, waves and threshold, an overlapping rollout.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{AgentProcess, Cli, HubProcess, git_commit, git_project, join_command, wait_until};
use serde_json::Value;

const OUTPOSTS: usize = 30;

const MANIFEST: &str = r#"version: v1
components:
  - name: app
    process:
      path: ./app
      command: ["sh", "./run.sh"]
    env:
      - name: FAIL
        config-ref: fail
"#;

/// Exits at once when the stage's config says so: that release never
/// passes its health window, and the agent rolls it back.
const RUN_SH: &str = "#!/bin/sh\nif [ \"$FAIL\" = 1 ]; then echo failing on purpose; exit 1; fi\nexec sleep 100000\n";

fn agent_args() -> Vec<&'static str> {
    vec![
        "--no-containers",
        "--health-window",
        "6s",
        "--settle-time",
        "1s",
    ]
}

fn outpost(i: usize) -> String {
    format!("edge-{i:02}")
}

fn stage(i: usize) -> String {
    format!("line-{i:02}")
}

struct Fleet {
    tmp: tempfile::TempDir,
    port: u16,
    hub: Option<HubProcess>,
    cli: Cli,
    agents: BTreeMap<String, AgentProcess>,
}

impl Fleet {
    fn hub(&self) -> &HubProcess {
        self.hub.as_ref().expect("the hub runs")
    }

    fn agent_dir(&self, outpost: &str) -> std::path::PathBuf {
        self.tmp.path().join(format!("agent-{outpost}"))
    }

    fn rollout(&self, id: u64) -> Value {
        self.cli.json(&["status", "rollout", &id.to_string()])
    }

    /// Waits until rollout `id` is in `state`; returns it.
    fn rollout_until(
        &self,
        id: u64,
        what: &str,
        timeout: Duration,
        f: impl Fn(&Value) -> bool,
    ) -> Value {
        let mut last = Value::Null;
        wait_until(what, timeout, || {
            last = self.rollout(id);
            f(&last)
        });
        last
    }

    fn stages_of_wave(rollout: &Value, wave: u64) -> Vec<String> {
        rollout["stages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["wave"] == wave)
            .map(|s| s["stage"].as_str().unwrap().to_owned())
            .collect()
    }

    fn releases(&self, stage: &str) -> Vec<Value> {
        self.cli
            .json(&["list", "release", "-p", "fleet", "-s", stage])
            .as_array()
            .unwrap()
            .clone()
    }

    fn set_fail(&self, stage: &str, fail: bool) {
        self.cli.ok(&[
            "add",
            "config-data",
            "app",
            "-p",
            "fleet",
            "-s",
            stage,
            "--env",
            if fail { "fail=1" } else { "fail=0" },
        ]);
    }
}

/// The hub (on a fixed port, so agents find it again after a restart), 30
/// outposts with labels, an agent process and a stage on each, and two
/// builds.
fn fleet() -> Fleet {
    let tmp = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let hub = HubProcess::start_with(
        &tmp.path().join("hub"),
        &["--listen", &format!("127.0.0.1:{port}")],
    );
    let cli = Cli::for_hub(&hub, &hub.admin_key(), &tmp.path().join("config"));
    cli.ok(&["create", "project", "fleet"]);
    let mut fleet = Fleet {
        tmp,
        port,
        hub: Some(hub),
        cli,
        agents: BTreeMap::new(),
    };
    for i in 0..OUTPOSTS {
        let name = outpost(i);
        let site = if i % 3 == 0 { "hamburg" } else { "munich" };
        let created = fleet.cli.ok(&[
            "create",
            "outpost",
            &name,
            "--label",
            "fleet=edge",
            "--label",
            &format!("site={site}"),
            "--label",
            &format!("line={}", i % 4),
        ]);
        let uri = fleet
            .cli
            .ok(&["get", "outpost-uri", &name])
            .trim()
            .to_owned();
        let agent = AgentProcess::join_with(
            &join_command(&created),
            &fleet.agent_dir(&name),
            &agent_args(),
        );
        fleet.agents.insert(name.clone(), agent);
        fleet.cli.ok(&[
            "create",
            "stage",
            &stage(i),
            "-p",
            "fleet",
            "--type",
            "prod",
            "--outpost-uri",
            &uri,
        ]);
        fleet.set_fail(&stage(i), false);
    }
    let app = fleet.tmp.path().join("app");
    git_project(&app, &[("trellis.yaml", MANIFEST), ("app/run.sh", RUN_SH)]);
    fleet.cli.ok_in(&app, &["push", "build", "-p", "fleet"]);
    std::fs::write(app.join("app/VERSION"), "2\n").unwrap();
    git_commit(&app, "second");
    fleet.cli.ok_in(&app, &["push", "build", "-p", "fleet"]);
    std::fs::write(app.join("app/VERSION"), "3\n").unwrap();
    git_commit(&app, "third");
    fleet.cli.ok_in(&app, &["push", "build", "-p", "fleet"]);
    // Every agent linked.
    wait_until("every outpost online", Duration::from_secs(120), || {
        let status = fleet.cli.json(&["status", "stage", "-p", "fleet"]);
        status
            .as_array()
            .is_some_and(|s| s.len() == OUTPOSTS && s.iter().all(|s| s["connected"] == true))
    });
    fleet
}

/// `trellis create rollout -p fleet -b BUILD -l SELECTOR MORE…`, which must
/// fail; returns the error as printed.
fn create_rollout_refused(cli: &Cli, build: &str, selector: &str, more: &[&str]) -> String {
    let mut args = vec![
        "create", "rollout", "-p", "fleet", "-b", build, "-l", selector,
    ];
    args.extend_from_slice(more);
    cli.err(&args)
}

#[test]
fn a_fleet_rolls_out_in_waves_halts_carries_offline_outposts_and_survives_sigkill() {
    let mut fleet = fleet();
    let cli = &fleet.cli;

    // --- selecting the fleet ---
    let hamburg = cli.json(&["list", "stage", "-p", "fleet", "-l", "site=hamburg"]);
    let names: BTreeSet<String> = hamburg
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    let expect: BTreeSet<String> = (0..OUTPOSTS).filter(|i| i % 3 == 0).map(stage).collect();
    assert_eq!(names, expect);
    let some = cli.json(&[
        "list",
        "stage",
        "-p",
        "fleet",
        "-l",
        "site in (hamburg),line notin (0,1)",
    ]);
    assert_eq!(
        some.as_array().unwrap().len(),
        (0..OUTPOSTS).filter(|i| i % 3 == 0 && i % 4 >= 2).count()
    );
    let status = cli.json(&["status", "stage", "-p", "fleet", "-l", "!site"]);
    assert_eq!(status, serde_json::json!([]));

    // --- bad input: each refused with a clear error, nothing created ---
    // (build, selector, further arguments) and what the error must say.
    let refused: [(&str, &str, &[&str], &[&str]); 6] = [
        (
            "main_b1",
            "site=nowhere",
            &[],
            &["no live stage", "site=nowhere"],
        ),
        (
            "main_b99",
            "fleet=edge",
            &[],
            &["main_b99", "does not exist"],
        ),
        (
            "main_b1",
            "site in munich",
            &[],
            &["at character 9", "expected '('"],
        ),
        (
            "main_b1",
            "fleet=edge",
            &["--waves", "50%,25%,100%"],
            &["do not grow"],
        ),
        ("main_b1", "fleet=edge", &["--waves", "1,50%"], &["100%"]),
        (
            "main_b1",
            "fleet=edge",
            &["--success-threshold", "120%"],
            &["success threshold"],
        ),
    ];
    for (build, selector, more, says) in refused {
        let e = create_rollout_refused(cli, build, selector, more);
        assert!(says.iter().all(|s| e.contains(s)), "{e}");
    }
    let e = cli.err(&["push", "release", "-p", "fleet", "-l", "site=nowhere"]);
    assert!(e.contains("no live stage"), "{e}");
    assert_eq!(
        cli.json(&["list", "rollout", "-p", "fleet"]),
        serde_json::json!([])
    );
    for i in 0..OUTPOSTS {
        assert!(
            fleet.releases(&stage(i)).is_empty(),
            "a refused command pushed to {}",
            stage(i)
        );
    }

    // --- (a) a failing wave 2 halts the rollout ---
    let rollout = [
        "create",
        "rollout",
        "-p",
        "fleet",
        "-b",
        "main_b1",
        "-c",
        "app",
        "-l",
        "fleet=edge",
        "--waves",
        "2,40%,60%,100%",
        "--success-threshold",
        "90%",
        "--wave-timeout",
        "5m",
    ];
    let mut dry = rollout.to_vec();
    dry.push("--dry-run");
    let plan = cli.json(&dry);
    assert_eq!(plan["id"], 0);
    let wave_sizes: Vec<u64> = plan["waves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["stages"].as_u64().unwrap())
        .collect();
    assert_eq!(wave_sizes, vec![2, 10, 6, 12]);
    // The same selection plans the same waves.
    assert_eq!(cli.json(&dry)["stages"], plan["stages"]);
    let wave2 = Fleet::stages_of_wave(&plan, 1);
    let failing = [wave2[0].clone(), wave2[1].clone()];
    for s in &failing {
        fleet.set_fail(s, true);
    }
    let created = cli.json(&rollout);
    let first = created["id"].as_u64().unwrap();
    assert_eq!(
        created["stages"], plan["stages"],
        "the plan is what was created"
    );
    // Two rollouts over the same stages at once: refused, naming the other.
    let e = create_rollout_refused(cli, "main_b2", "site=munich", &[]);
    assert!(e.contains(&format!("rollout {first}")), "{e}");
    assert!(e.contains(&format!("trellis abort rollout {first}")), "{e}");

    let halted = fleet.rollout_until(
        first,
        "the first rollout halts",
        Duration::from_secs(240),
        |r| r["state"] == "halted",
    );
    let reason = halted["halt_reason"].as_str().unwrap();
    assert!(reason.starts_with("wave 2:"), "{reason}");
    for s in &failing {
        assert!(
            reason.contains(s.as_str()),
            "the reason names {s}: {reason}"
        );
    }
    assert_eq!(halted["waves"][0]["outcome"], "passed");
    assert_eq!(halted["waves"][1]["outcome"], "halted");
    assert_eq!(halted["waves"][2]["started_at"], Value::Null);
    for s in &failing {
        let releases = fleet.releases(s);
        assert_eq!(releases[0]["state"], "failed", "{s}: {releases:?}");
    }
    for wave in [2, 3] {
        for s in Fleet::stages_of_wave(&halted, wave) {
            assert!(
                fleet.releases(&s).is_empty(),
                "{s} of wave {} got the release",
                wave + 1
            );
        }
    }
    for s in Fleet::stages_of_wave(&halted, 0) {
        assert_eq!(fleet.releases(&s)[0]["state"], "applied", "{s}");
    }
    let audit = cli.json(&["list", "audit", "-p", "fleet"]);
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["action"].as_str())
        .collect();
    assert!(
        actions.contains(&"rollout-create") && actions.contains(&"rollout-halted"),
        "{actions:?}"
    );

    // --- (b) outposts offline during wave 2 are carried along ---
    for s in &failing {
        fleet.set_fail(s, false);
    }
    let manual = [
        "create",
        "rollout",
        "-p",
        "fleet",
        "-b",
        "main_b2",
        "-c",
        "app",
        "-l",
        "fleet=edge",
        "--waves",
        "2,40%,60%,100%",
        "--success-threshold",
        "90%",
        "--manual",
    ];
    let second = cli.json(&manual)["id"].as_u64().unwrap();
    let waiting = fleet.rollout_until(
        second,
        "wave 1 of the second rollout passes",
        Duration::from_secs(180),
        |r| r["state"] == "waiting",
    );
    assert_eq!(waiting["waves"][0]["outcome"], "passed");
    let offline: Vec<(String, String)> = waiting["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["wave"] == 1)
        .take(3)
        .map(|s| {
            (
                s["stage"].as_str().unwrap().to_owned(),
                s["outpost"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for (_, o) in &offline {
        fleet.agents.remove(o).unwrap().kill9();
    }
    wait_until("three outposts offline", Duration::from_secs(60), || {
        let status = cli.json(&["status", "stage", "-p", "fleet"]);
        status
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["connected"] == false)
            .count()
            == 3
    });
    cli.ok(&["resume", "rollout", &second.to_string()]);
    let passed = fleet.rollout_until(
        second,
        "wave 2 passes without the offline outposts",
        Duration::from_secs(180),
        |r| r["waves"][1]["outcome"] == "passed",
    );
    assert_eq!(passed["state"], "waiting");
    for s in passed["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["wave"] == 1)
    {
        let carried = offline.iter().any(|(name, _)| s["stage"] == name.as_str());
        assert_eq!(s["carried"], carried, "{s}");
        if carried {
            assert_eq!(s["state"], "pushed", "{s}");
        } else {
            assert_eq!(s["state"], "applied", "{s}");
        }
    }
    let shown = cli.ok(&["status", "rollout", &second.to_string()]);
    assert!(shown.contains("offline, carried along"), "{shown}");
    // They catch up when they link again.
    for (_, o) in &offline {
        let dir = fleet.agent_dir(o);
        fleet
            .agents
            .insert(o.clone(), AgentProcess::run_with(&dir, &agent_args()));
    }
    fleet.rollout_until(
        second,
        "the carried stages catch up",
        Duration::from_secs(180),
        |r| {
            r["stages"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|s| s["carried"] == true)
                .all(|s| s["state"] == "applied")
        },
    );
    for (s, _) in &offline {
        assert_eq!(fleet.releases(s)[0]["build"], "main_b2");
        assert_eq!(fleet.releases(s)[0]["state"], "applied", "{s}");
    }

    // --- (c) SIGKILL while wave 3 is out: it resumes there ---
    let before_kill = fleet.rollout(second);
    cli.ok(&["resume", "rollout", &second.to_string()]);
    fleet.rollout_until(second, "wave 3 starts", Duration::from_secs(60), |r| {
        r["waves"][2]["started_at"] != Value::Null
    });
    fleet.hub.take().unwrap().kill9();
    let hub = HubProcess::start_with(
        &fleet.tmp.path().join("hub"),
        &["--listen", &format!("127.0.0.1:{}", fleet.port)],
    );
    fleet.hub = Some(hub);
    let after = fleet.rollout_until(
        second,
        "wave 3 passes after the restart",
        Duration::from_secs(240),
        |r| r["waves"][2]["outcome"] == "passed",
    );
    assert_eq!(after["state"], "waiting", "manual: it waits for wave 4");
    // Waves 1 and 2 kept their releases; nothing was pushed twice.
    for (was, now) in before_kill["stages"]
        .as_array()
        .unwrap()
        .iter()
        .zip(after["stages"].as_array().unwrap())
    {
        if was["wave"].as_u64().unwrap() < 2 {
            assert_eq!(was["release"], now["release"], "{now}");
        }
    }
    // One outpost of wave 4 is offline when it starts: carried along, it
    // catches up after the rollout completed, and the rollout's record
    // says so (the driver follows a finished rollout's late stages).
    let (late_stage, late_outpost) = after["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["wave"] == 3)
        .map(|s| {
            (
                s["stage"].as_str().unwrap().to_owned(),
                s["outpost"].as_str().unwrap().to_owned(),
            )
        })
        .unwrap();
    fleet.agents.remove(&late_outpost).unwrap().kill9();
    wait_until(
        "the late outpost is offline",
        Duration::from_secs(60),
        || {
            let status = cli.json(&["status", "stage", "-p", "fleet"]);
            status
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["stage"] == late_stage.as_str() && s["connected"] == false)
        },
    );
    cli.ok(&["resume", "rollout", &second.to_string()]);
    let done = fleet.rollout_until(
        second,
        "the second rollout completes",
        Duration::from_secs(240),
        |r| r["state"] == "completed",
    );
    let late = |r: &Value| {
        r["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["stage"] == late_stage.as_str())
            .cloned()
            .unwrap()
    };
    assert_eq!(late(&done)["carried"], true, "{}", late(&done));
    assert_eq!(late(&done)["state"], "pushed", "{}", late(&done));
    let dir = fleet.agent_dir(&late_outpost);
    fleet.agents.insert(
        late_outpost.clone(),
        AgentProcess::run_with(&dir, &agent_args()),
    );
    let caught_up = fleet.rollout_until(
        second,
        "the late stage's apply is recorded in the completed rollout",
        Duration::from_secs(180),
        |r| late(r)["state"] == "applied",
    );
    assert_eq!(caught_up["state"], "completed");
    assert!(
        done["waves"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["outcome"] == "passed")
    );
    // Every stage got build 2 exactly once, and runs it (an outpost still
    // linking again after the restart may have been carried along).
    for i in 0..OUTPOSTS {
        wait_until(
            &format!("{} runs build 2", stage(i)),
            Duration::from_secs(120),
            || {
                let of_b2: Vec<Value> = fleet
                    .releases(&stage(i))
                    .into_iter()
                    .filter(|r| r["build"] == "main_b2")
                    .collect();
                assert_eq!(of_b2.len(), 1, "{}: {of_b2:?}", stage(i));
                of_b2[0]["state"] == "applied"
            },
        );
    }

    // --- abort --rollback: the stages that got build 3 go back to build 2 ---
    let third = cli.json(&[
        "create",
        "rollout",
        "-p",
        "fleet",
        "-b",
        "main_b3",
        "-c",
        "app",
        "-l",
        "site=hamburg",
        "--waves",
        "5,100%",
        "--manual",
    ])["id"]
        .as_u64()
        .unwrap();
    let waiting = fleet.rollout_until(
        third,
        "wave 1 of the third rollout passes",
        Duration::from_secs(180),
        |r| r["state"] == "waiting",
    );
    let first_wave = Fleet::stages_of_wave(&waiting, 0);
    assert_eq!(first_wave.len(), 5);
    cli.ok(&["abort", "rollout", &third.to_string(), "--rollback"]);
    let aborted = fleet.rollout(third);
    assert_eq!(aborted["state"], "aborted");
    for s in &first_wave {
        wait_until(
            &format!("{s} runs build 2 again"),
            Duration::from_secs(120),
            || {
                let releases = fleet.releases(s);
                releases[0]["build"] == "main_b2" && releases[0]["state"] == "applied"
            },
        );
        assert_eq!(fleet.releases(s)[1]["build"], "main_b3");
    }
    for s in Fleet::stages_of_wave(&aborted, 1) {
        assert!(
            fleet.releases(&s).iter().all(|r| r["build"] != "main_b3"),
            "{s} of the wave after the abort got build 3"
        );
    }
    let e = cli.err(&["resume", "rollout", &third.to_string()]);
    assert!(e.contains("aborted"), "{e}");

    let metrics = reqwest_metrics(fleet.hub());
    assert!(
        metrics.contains("trellis_rollouts{state=\"completed\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("trellis_rollouts{state=\"halted\"} 1"),
        "{metrics}"
    );
}

/// `/metrics` of the hub, read with curl (it needs no key).
fn reqwest_metrics(hub: &HubProcess) -> String {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(hub.ca_cert())
        .arg(format!("{}/metrics", hub.endpoint))
        .output()
        .expect("run curl");
    assert!(out.status.success(), "{}", common::describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}
