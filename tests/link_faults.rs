//! The link under faults, with the real binaries: a TCP fault proxy between
//! agent and hub (drop, blackhole, delay, throttle) and SIGKILL of either
//! side, in a loop with releases pushed throughout. The agent always
//! converges to the newest desired revision, never applies out of order,
//! and the hub never loses an acknowledged status. Also: certificate expiry
//! during an outage.

mod common;

use std::time::Duration;

use common::{AgentProcess, Cli, HubProcess, free_port, git_project, join_command, wait_until};
use trellis_faultproxy::{FaultProxy, Mode};

const MANIFEST: &str = "version: v1
components:
  - name: bridge
    process:
      path: ./bin
      command: [\"sh\", \"./bridge.sh\"]
";

fn hub_args(port: u16, public: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--listen".to_owned(),
        format!("127.0.0.1:{port}"),
        "--public-address".to_owned(),
        public.to_owned(),
        "--heartbeat-secs".to_owned(),
        "1".to_owned(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

fn start_hub(data: &std::path::Path, args: &[String]) -> HubProcess {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    HubProcess::start_with(data, &refs)
}

/// Per stage: (desired revision, applied revision, applied release).
fn sync_of(cli: &Cli, stage: &str) -> Option<(u64, u64, Option<u64>)> {
    let out = cli.run(&["status", "stage", stage, "-p", "plant", "-o", "json"]);
    if !out.status.success() {
        return None; // the hub is down right now
    }
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some((
        s["sync"]["desired_revision"].as_u64()?,
        s["sync"]["applied_revision"].as_u64()?,
        s["sync"]["applied_release"].as_u64(),
    ))
}

#[test]
fn the_agent_converges_through_faults_and_kills_without_losing_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let hub_port = free_port();
    let proxy = rt
        .block_on(FaultProxy::start(
            format!("127.0.0.1:{hub_port}").parse().unwrap(),
        ))
        .unwrap();
    let public = proxy.addr().to_string();
    let data = tmp.path().join("hub");
    let args = hub_args(hub_port, &public, &[]);
    let mut hub = start_hub(&data, &args);
    // The CLI talks to the hub directly; only the agent goes through the proxy.
    let direct = |hub: &HubProcess| Cli::for_hub(hub, &hub.admin_key(), &tmp.path().join("config"));
    let mut cli = direct(&hub);
    cli.ok(&["create", "project", "plant"]);
    let app = tmp.path().join("app");
    git_project(
        &app,
        &[
            ("trellis.yaml", MANIFEST),
            (
                "bin/bridge.sh",
                "#!/bin/sh\necho bridge up\n# Runs until its directory goes away (the test cleans up), so nothing leaks.\nwhile [ -e \"$PWD/bridge.sh\" ]; do sleep 1; done\n",
            ),
        ],
    );
    assert!(
        cli.run_in(&app, &["push", "build", "-p", "plant"])
            .status
            .success()
    );
    let out = cli.ok(&["create", "outpost", "edge"]);
    let join = join_command(&out);
    let uri = cli.ok(&["get", "outpost-uri", "edge"]).trim().to_owned();
    let stages = ["line1", "line2"];
    for stage in stages {
        cli.ok(&[
            "create",
            "stage",
            stage,
            "-p",
            "plant",
            "--type",
            "prod",
            "--outpost-uri",
            &uri,
        ]);
    }
    let agent_dir = tmp.path().join("agent");
    let mut agent = Some(AgentProcess::join(&join, &agent_dir));

    // (applied revision, applied release) seen per stage; never to go back.
    let mut high = [(0u64, 0u64); 2];
    let check = |cli: &Cli, high: &mut [(u64, u64); 2]| {
        for (i, stage) in stages.iter().enumerate() {
            if let Some((_, applied, release)) = sync_of(cli, stage) {
                let release = release.unwrap_or(0);
                assert!(
                    applied >= high[i].0,
                    "{stage}: the hub's applied revision went back from {} to {applied}",
                    high[i].0
                );
                assert!(
                    release >= high[i].1,
                    "{stage}: the applied release went back from {} to {release}",
                    high[i].1
                );
                high[i] = (applied, release);
            }
        }
    };

    let faults = [
        "blackhole",
        "agent-kill",
        "delay",
        "drop",
        "hub-kill",
        "throttle",
        "drop",
        "agent-kill",
        "blackhole",
        "hub-kill",
        "delay",
        "agent-kill",
        "drop",
        "throttle",
        "pass",
    ];
    let (mut agent_kills, mut hub_kills, mut flaps) = (0, 0, 0);
    for (round, fault) in faults.iter().enumerate() {
        let stage = stages[round % 2];
        // Releases are pushed straight to the hub, whatever the link does.
        let _ = cli.run(&["push", "release", "-p", "plant", "-s", stage]);
        match *fault {
            "blackhole" => {
                proxy.set(Mode::Blackhole);
                std::thread::sleep(Duration::from_millis(2500));
                proxy.set(Mode::Pass);
                flaps += 1;
            }
            "drop" => {
                proxy.drop_connections();
                flaps += 1;
            }
            "delay" => {
                proxy.set(Mode::Delay(Duration::from_millis(300)));
                std::thread::sleep(Duration::from_millis(1500));
                proxy.set(Mode::Pass);
            }
            "throttle" => {
                proxy.set(Mode::Throttle {
                    bytes_per_sec: 2048,
                });
                std::thread::sleep(Duration::from_millis(1500));
                proxy.set(Mode::Pass);
            }
            "agent-kill" => {
                if let Some(a) = agent.take() {
                    a.kill9();
                }
                agent_kills += 1;
                let _ = cli.run(&["push", "release", "-p", "plant", "-s", stage]);
                agent = Some(AgentProcess::run(&agent_dir));
            }
            "hub-kill" => {
                hub.kill9();
                hub_kills += 1;
                hub = start_hub(&data, &args);
                cli = direct(&hub);
            }
            _ => proxy.set(Mode::Pass),
        }
        std::thread::sleep(Duration::from_millis(300));
        check(&cli, &mut high);
    }
    assert!(agent_kills >= 3 && hub_kills >= 2 && flaps >= 5);

    proxy.set(Mode::Pass);
    wait_until("every stage to converge", Duration::from_secs(60), || {
        check(&cli, &mut high);
        stages
            .iter()
            .all(|s| matches!(sync_of(&cli, s), Some((d, a, _)) if d == a))
    });
    for stage in stages {
        let list = cli.json(&["list", "release", "-p", "plant", "-s", stage]);
        let list = list.as_array().unwrap();
        let newest = list
            .iter()
            .map(|r| r["number"].as_u64().unwrap())
            .max()
            .unwrap();
        for r in list {
            let (n, state) = (r["number"].as_u64().unwrap(), r["state"].as_str().unwrap());
            if n == newest {
                assert_eq!(state, "applied", "{stage}: newest release {n}");
            } else {
                assert!(
                    state == "superseded" || state == "replaced",
                    "{stage}: release {n} is {state}"
                );
            }
        }
    }
    rt.block_on(proxy.shutdown());
}

#[test]
fn an_agent_whose_certificate_expired_during_an_outage_renews_and_reconnects() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("hub");
    let hub = HubProcess::start_with(
        &data,
        &["--listen", "127.0.0.1:0", "--cert-validity-secs", "3"],
    );
    let cli = Cli::for_hub(&hub, &hub.admin_key(), &tmp.path().join("config"));
    cli.ok(&["create", "project", "plant"]);
    let out = cli.ok(&["create", "outpost", "edge"]);
    let uri = cli.ok(&["get", "outpost-uri", "edge"]).trim().to_owned();
    let agent_dir = tmp.path().join("agent");
    let status = || cli.json(&["status", "stage", "line", "-p", "plant"]);
    cli.ok(&[
        "create",
        "stage",
        "line",
        "-p",
        "plant",
        "--type",
        "dev",
        "--outpost-uri",
        &uri,
    ]);
    let agent = AgentProcess::join(&join_command(&out), &agent_dir);
    wait_until("online", Duration::from_secs(20), || {
        status()["link"]["state"] == "online"
    });
    agent.kill9();
    wait_until("offline", Duration::from_secs(10), || {
        status()["link"]["state"] == "offline"
    });
    // Past the certificate's validity.
    std::thread::sleep(Duration::from_secs(4));
    let app = tmp.path().join("app");
    git_project(
        &app,
        &[
            ("trellis.yaml", MANIFEST),
            (
                "bin/bridge.sh",
                "#!/bin/sh\necho bridge up\n# Runs until its directory goes away (the test cleans up), so nothing leaks.\nwhile [ -e \"$PWD/bridge.sh\" ]; do sleep 1; done\n",
            ),
        ],
    );
    assert!(
        cli.run_in(&app, &["push", "build", "-p", "plant"])
            .status
            .success()
    );
    cli.ok(&["push", "release", "-p", "plant", "-s", "line"]);
    let _agent = AgentProcess::run(&agent_dir);
    wait_until("renewed and in-sync", Duration::from_secs(30), || {
        let s = status();
        s["link"]["state"] == "online"
            && s["sync"]["state"] == "in-sync"
            && s["sync"]["applied_release"] == 1
    });
}

#[test]
fn a_connected_agent_renews_its_certificate_over_the_link() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("hub");
    // Certificates live 6 s; the agent renews in their last third.
    let hub = HubProcess::start_with(
        &data,
        &["--listen", "127.0.0.1:0", "--cert-validity-secs", "6"],
    );
    let cli = Cli::for_hub(&hub, &hub.admin_key(), &tmp.path().join("config"));
    cli.ok(&["create", "project", "plant"]);
    let out = cli.ok(&["create", "outpost", "edge"]);
    let uri = cli.ok(&["get", "outpost-uri", "edge"]).trim().to_owned();
    cli.ok(&[
        "create",
        "stage",
        "line",
        "-p",
        "plant",
        "--type",
        "dev",
        "--outpost-uri",
        &uri,
    ]);
    let _agent = AgentProcess::join(&join_command(&out), &tmp.path().join("agent"));
    let status = || cli.json(&["status", "stage", "line", "-p", "plant"]);
    wait_until("online", Duration::from_secs(20), || {
        status()["link"]["state"] == "online"
    });
    let first = status()["link"]["certificate_expires"]
        .as_str()
        .unwrap()
        .to_owned();
    // The link stays up past the first certificate's end, on a renewed one.
    wait_until("a renewed certificate", Duration::from_secs(20), || {
        let s = status();
        s["link"]["state"] == "online"
            && s["link"]["certificate_expires"].as_str().unwrap() > first.as_str()
    });
    std::thread::sleep(Duration::from_secs(7));
    let s = status();
    assert_eq!(s["link"]["state"], "online", "{s}");
    let expires: chrono::DateTime<chrono::Utc> = s["link"]["certificate_expires"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        expires > chrono::Utc::now(),
        "the certificate in use has expired: {s}"
    );
}
