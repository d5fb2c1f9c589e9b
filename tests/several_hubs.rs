//! Several hubs end to end, with real processes: a PostgreSQL cluster of
//! the test's own (it is restarted), the test kit's SeaweedFS S3 gateway
//! for the artifacts, three `trellis hub` processes on them and HAProxy in
//! front, running the repository's `deploy/haproxy/haproxy.cfg`. Outpost
//! Agents (`trellis agent join`, process components) reach the hubs only
//! through the balancer; the CLI talks to instances directly.
//!
//! - Outpost URIs and join tokens carry the balancer's address.
//! - A release pushed through A reaches an agent linked to B; its status
//!   and logs read through C are live (C names B as the holder).
//! - SIGKILL B while releases are pushed: B's outposts are shown offline
//!   (never online on B) while their agents are away, the agents come back
//!   through the balancer on A or C, every release is applied in order and
//!   every acknowledged push is still there.
//! - PostgreSQL restarted (immediate stop: a crash as far as its data goes)
//!   while releases are pushed: the hubs recover by themselves and no
//!   acknowledged push is lost.
//!
//! Skipped without PostgreSQL, SeaweedFS or HAProxy (except under `CI`).

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{AgentProcess, Cli, bin, git_project, join_command, wait_until};
use serde_json::Value;

const MANIFEST: &str = "version: v1
components:
  - name: bridge
    process:
      path: ./bin
      command: [\"sh\", \"./bridge.sh\"]
";

/// The hubs' link heartbeat (`--heartbeat-secs`).
const HEARTBEAT: Duration = Duration::from_secs(1);

/// Outposts (one agent and one stage each), spread by the balancer.
const OUTPOSTS: usize = 6;

/// One `trellis hub` process of the cluster.
struct Instance {
    child: Child,
    addr: SocketAddr,
    data: PathBuf,
}

impl Instance {
    fn start(data: &Path, env: &[(String, String)], args: &[String]) -> Instance {
        let port = trellis_testkit::free_port(None);
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut child = Command::new(bin())
            .arg("hub")
            .arg("--data")
            .arg(data)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--instance-address")
            .arg(addr.to_string())
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start trellis hub");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("hub listening on ") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(60))
            .expect("the hub printed its address");
        Instance {
            child,
            addr,
            data: data.to_owned(),
        }
    }

    fn endpoint(&self) -> String {
        format!("https://{}", self.addr)
    }

    fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL the hub");
        self.child.wait().expect("reap the hub");
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig} {pid}");
}

fn stage_name(i: usize) -> String {
    format!("line-{i}")
}

/// A stage's status through `cli`, or `None` while that instance cannot
/// answer.
fn status(cli: &Cli, stage: &str) -> Option<Value> {
    let out = cli.run(&["status", "stage", stage, "-p", "plant", "-o", "json"]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

/// Pushes a release; `Some(number)` when the hub acknowledged it.
fn push(cli: &Cli, stage: &str) -> Option<u64> {
    let out = cli.run(&["push", "release", "-p", "plant", "-s", stage]);
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let number = text
        .strip_prefix("pushed release ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok());
    assert!(number.is_some(), "unexpected push output: {text}");
    number
}

/// Acknowledged release numbers per stage.
type Acked = Arc<Mutex<BTreeMap<String, Vec<u64>>>>;

/// Pushes releases round the stages through the given instances until
/// stopped; records every acknowledged one.
fn pusher(clis: Vec<Cli>, acked: Acked, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut failed = 0;
        let mut n = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let stage = stage_name(n % OUTPOSTS);
            match push(&clis[n % clis.len()], &stage) {
                Some(number) => acked.lock().unwrap().entry(stage).or_default().push(number),
                None => failed += 1,
            }
            n += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
        failed
    })
}

/// Every stage's applied revision through `cli`; asserts none went back.
fn check_applied(cli: &Cli, high: &mut [u64]) {
    for (i, seen) in high.iter_mut().enumerate() {
        if let Some(s) = status(cli, &stage_name(i))
            && let Some(applied) = s["sync"]["applied_revision"].as_u64()
        {
            assert!(
                applied >= *seen,
                "{}: the applied revision went back from {seen} to {applied}",
                stage_name(i)
            );
            *seen = applied;
        }
    }
}

/// Waits until every stage applied its newest release, then checks every
/// acknowledged push is there and only the newest is applied.
fn converged(cli: &Cli, acked: &Acked, high: &mut [u64]) {
    wait_until("every stage to converge", Duration::from_secs(90), || {
        check_applied(cli, high);
        (0..OUTPOSTS).all(|i| {
            status(cli, &stage_name(i)).is_some_and(|s| {
                s["sync"]["desired_revision"] == s["sync"]["applied_revision"]
                    && s["sync"]["state"] == "in-sync"
            })
        })
    });
    let acked = acked.lock().unwrap().clone();
    for i in 0..OUTPOSTS {
        let stage = stage_name(i);
        let list = cli.json(&["list", "release", "-p", "plant", "-s", &stage]);
        let list: BTreeMap<u64, String> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["number"].as_u64().unwrap(),
                    r["state"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        for n in acked.get(&stage).into_iter().flatten() {
            assert!(
                list.contains_key(n),
                "{stage}: acknowledged release {n} is lost: {list:?}"
            );
        }
        let (newest, state) = list.iter().next_back().unwrap();
        assert_eq!(state, "applied", "{stage}: newest release {newest}");
        for (n, state) in list.iter().filter(|(n, _)| *n != newest) {
            assert!(
                state == "superseded" || state == "replaced",
                "{stage}: release {n} is {state}"
            );
        }
    }
}

#[test]
fn three_hubs_behind_haproxy_survive_an_instance_and_a_database_restart() {
    let Some(pg) = trellis_testkit::postgres::PrivatePostgres::start() else {
        return;
    };
    let Some(s3) = trellis_testkit::seaweedfs::server() else {
        return;
    };
    if trellis_testkit::haproxy::binary().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (bucket, prefix) = s3.area();
    let mut random = [0u8; 32];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").unwrap(),
        &mut random,
    )
    .unwrap();
    let cluster_key: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let mut env = s3.env();
    env.push(("TRELLIS_CLUSTER_KEY".into(), cluster_key));
    // The balancer's address must be known before the hubs start (it goes
    // into their certificates, URIs and tokens): reserve it first.
    let public_port = trellis_testkit::free_port(None);
    let public: SocketAddr = ([127, 0, 0, 1], public_port).into();
    let args = vec![
        "--store".to_owned(),
        pg.url(),
        "--chunks".to_owned(),
        format!("s3://{bucket}/{prefix}?endpoint={}", s3.endpoint),
        "--public-address".to_owned(),
        public.to_string(),
        "--heartbeat-secs".to_owned(),
        "1".to_owned(),
    ];
    let mut hubs: Vec<Instance> = ["a", "b", "c"]
        .iter()
        .map(|n| Instance::start(&tmp.path().join(format!("hub-{n}")), &env, &args))
        .collect();
    let ca = hubs[0].data.join("ca.pem");
    for hub in &hubs[1..] {
        assert_eq!(
            std::fs::read(hub.data.join("ca.pem")).unwrap(),
            std::fs::read(&ca).unwrap(),
            "every instance uses the cluster's CA"
        );
    }
    let admin = std::fs::read_to_string(hubs[0].data.join("admin.key"))
        .unwrap()
        .trim()
        .to_owned();
    let cli_for = |hub: &Instance| Cli {
        ca_cert: Some(ca.clone()),
        ..Cli::new(&hub.endpoint(), &admin, &tmp.path().join("config"))
    };
    let (a, c) = (cli_for(&hubs[0]), cli_for(&hubs[2]));
    let addrs: Vec<SocketAddr> = hubs.iter().map(|h| h.addr).collect();
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/haproxy/haproxy.cfg");
    let Some(balancer) = trellis_testkit::haproxy::Balancer::start(&config, public, &addrs, &ca)
    else {
        return;
    };

    // A project, a build (its package goes to S3), outposts and stages,
    // all through A.
    a.ok(&["create", "project", "plant"]);
    let app = tmp.path().join("app");
    git_project(
        &app,
        &[
            ("trellis.yaml", MANIFEST),
            (
                "bin/bridge.sh",
                "#!/bin/sh\necho \"bridge up in $PWD\"\n# Runs until its directory goes away (the test cleans up), so nothing leaks.\nwhile [ -e \"$PWD/bridge.sh\" ]; do sleep 1; done\n",
            ),
        ],
    );
    a.ok_in(&app, &["push", "build", "-p", "plant"]);
    let mut agents = Vec::new();
    for i in 0..OUTPOSTS {
        let outpost = format!("edge-{i}");
        let out = a.ok(&["create", "outpost", &outpost]);
        let join = join_command(&out);
        assert!(
            join.contains(&public.to_string()),
            "the join command names the balancer {public}: {join}"
        );
        let uri = a.ok(&["get", "outpost-uri", &outpost]).trim().to_owned();
        assert!(
            uri.starts_with(&format!("trellis://{public}/")),
            "the Outpost URI carries the balancer {public}"
        );
        a.ok(&[
            "create",
            "stage",
            &stage_name(i),
            "-p",
            "plant",
            "--type",
            "prod",
            "--outpost-uri",
            &uri,
        ]);
        agents.push(AgentProcess::join(
            &join,
            &tmp.path().join(format!("agent-{i}")),
        ));
    }
    let holder =
        |s: &Value| -> Option<SocketAddr> { s["link"]["instance_address"].as_str()?.parse().ok() };
    // Every outpost online, each held by one of the three.
    let mut held: Vec<SocketAddr> = Vec::new();
    wait_until("every agent linked", Duration::from_secs(60), || {
        held = (0..OUTPOSTS)
            .filter_map(|i| status(&c, &stage_name(i)))
            .filter(|s| s["link"]["state"] == "online")
            .filter_map(|s| holder(&s))
            .collect();
        held.len() == OUTPOSTS
    });
    let on_b: Vec<usize> = (0..OUTPOSTS).filter(|&i| held[i] == addrs[1]).collect();
    assert!(
        !on_b.is_empty(),
        "the balancer spread the links ({held:?}), so B holds some"
    );

    // A release through A reaches an agent on B; status and logs through C.
    let first = on_b[0];
    let number = push(&a, &stage_name(first)).expect("the push through A");
    wait_until(
        "the release through A applied on B's agent",
        Duration::from_secs(60),
        || {
            status(&c, &stage_name(first)).is_some_and(|s| {
                s["sync"]["applied_release"].as_u64() == Some(number)
                    && s["components"][0]["state"] == "running"
            })
        },
    );
    let s = status(&c, &stage_name(first)).unwrap();
    assert_eq!(holder(&s), Some(addrs[1]), "C names B as the holder: {s}");
    let mut logs = String::new();
    wait_until("the logs through C", Duration::from_secs(30), || {
        let out = c.run(&[
            "logs",
            "component",
            "bridge",
            "-p",
            "plant",
            "-s",
            &stage_name(first),
        ]);
        logs = String::from_utf8_lossy(&out.stdout).into_owned();
        out.status.success() && logs.contains("bridge up in")
    });
    // The stages on A and C get their first release too.
    for i in 0..OUTPOSTS {
        if i != first {
            push(&a, &stage_name(i)).expect("a push through A");
        }
    }

    // SIGKILL B while releases are pushed through A and C. B's agents are
    // held still at first, so that their absence is visible.
    let acked: Acked = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let load = pusher(
        vec![cli_for(&hubs[0]), cli_for(&hubs[2])],
        acked.clone(),
        stop.clone(),
    );
    std::thread::sleep(Duration::from_secs(2));
    for &i in &on_b {
        signal(agents[i].child.id(), "STOP");
    }
    hubs[1].kill9();
    let killed = Instant::now();
    let mut high = vec![0u64; OUTPOSTS];
    wait_until(
        "B's outposts shown offline through A and C",
        Duration::from_secs(15),
        || {
            on_b.iter().all(|&i| {
                [&a, &c].iter().all(|cli| {
                    let asked = killed.elapsed();
                    status(cli, &stage_name(i)).is_some_and(|s| {
                        // Within two heartbeats B may still look alive;
                        // after that it must not.
                        assert!(
                            asked <= 2 * HEARTBEAT
                                || (s["link"]["state"].as_str(), holder(&s))
                                    != (Some("online"), Some(addrs[1])),
                            "an outpost of the dead instance B shown online {asked:.1?} after the kill: {s}"
                        );
                        s["link"]["state"] == "offline"
                    })
                })
            })
        },
    );
    eprintln!(
        "B's {} outposts shown offline {:.1?} after the kill",
        on_b.len(),
        killed.elapsed()
    );
    // Releases keep going to their stages while they are away.
    std::thread::sleep(Duration::from_secs(2));
    for &i in &on_b {
        signal(agents[i].child.id(), "CONT");
    }
    wait_until(
        "B's agents back through the balancer on A or C",
        Duration::from_secs(60),
        || {
            check_applied(&c, &mut high);
            on_b.iter().all(|&i| {
                status(&c, &stage_name(i)).is_some_and(|s| {
                    s["link"]["state"] == "online"
                        && holder(&s).is_some_and(|h| h == addrs[0] || h == addrs[2])
                })
            })
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let failed = load.join().unwrap();
    assert_eq!(failed, 0, "pushes through A and C failed while B was down");
    converged(&c, &acked, &mut high);
    let during: usize = acked.lock().unwrap().values().map(Vec::len).sum();
    assert!(during >= 10, "{during} releases pushed around the kill");

    // PostgreSQL restarted under load: pushes fail while it is down, the
    // hubs recover by themselves, nothing acknowledged is lost.
    let stop = Arc::new(AtomicBool::new(false));
    let load = pusher(
        vec![cli_for(&hubs[0]), cli_for(&hubs[2])],
        acked.clone(),
        stop.clone(),
    );
    std::thread::sleep(Duration::from_secs(2));
    pg.stop(false);
    std::thread::sleep(Duration::from_secs(3));
    pg.resume();
    let back = Instant::now();
    let before = acked.lock().unwrap().values().map(Vec::len).sum::<usize>();
    wait_until(
        "pushes acknowledged again through A and C",
        Duration::from_secs(60),
        || acked.lock().unwrap().values().map(Vec::len).sum::<usize>() >= before + 4,
    );
    eprintln!(
        "pushes acknowledged again {:.1?} after PostgreSQL came back",
        back.elapsed()
    );
    stop.store(true, Ordering::Relaxed);
    let failed = load.join().unwrap();
    eprintln!("{failed} pushes refused while PostgreSQL was down");
    for hub in [&hubs[0], &hubs[2]] {
        wait_until("the instance healthy", Duration::from_secs(30), || {
            Command::new("curl")
                .args(["-sSf", "-o", "/dev/null", "--cacert"])
                .arg(&ca)
                .arg(format!("{}/api/v1/health", hub.endpoint()))
                .status()
                .is_ok_and(|s| s.success())
        });
    }
    converged(&c, &acked, &mut high);
    converged(&a, &acked, &mut high);
    drop(agents);
    drop(balancer);
}

/// `trellis hub migrate`: a SQLite hub with a project, a stage on an
/// outpost whose agent is linked, a build, releases and keys, copied into
/// PostgreSQL; the hub started again on it from the same data directory:
/// the same agent relinks, the same key works, the same Outpost URI is
/// valid and a new release reaches the agent.
#[test]
fn a_sqlite_hub_migrated_to_postgres_keeps_its_agents_uris_and_keys() {
    let Some(server) = trellis_testkit::postgres::server() else {
        return;
    };
    let db = server.database();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("hub");
    let port = trellis_testkit::free_port(None);
    let listen = format!("127.0.0.1:{port}");
    let args = ["--listen", listen.as_str(), "--heartbeat-secs", "1"];
    let hub = common::HubProcess::start_with(&data, &args);
    let key = hub.admin_key();
    let cli = Cli::for_hub(&hub, &key, &tmp.path().join("config"));
    cli.ok(&["create", "project", "plant"]);
    let app = tmp.path().join("app");
    git_project(
        &app,
        &[
            ("trellis.yaml", MANIFEST),
            (
                "bin/bridge.sh",
                "#!/bin/sh\necho bridge up\nwhile [ -e \"$PWD/bridge.sh\" ]; do sleep 1; done\n",
            ),
        ],
    );
    cli.ok_in(&app, &["push", "build", "-p", "plant"]);
    let out = cli.ok(&["create", "outpost", "edge"]);
    let uri = cli.ok(&["get", "outpost-uri", "edge"]).trim().to_owned();
    cli.ok(&[
        "create",
        "stage",
        "line",
        "-p",
        "plant",
        "--type",
        "prod",
        "--outpost-uri",
        &uri,
    ]);
    let other = cli.ok(&["create", "key", "--description", "ci"]);
    let agent = AgentProcess::join(&join_command(&out), &tmp.path().join("agent"));
    let applied = |cli: &Cli, release: u64| {
        status(cli, "line").is_some_and(|s| {
            s["link"]["state"] == "online"
                && s["sync"]["applied_release"].as_u64() == Some(release)
                && s["sync"]["state"] == "in-sync"
        })
    };
    let first = push(&cli, "line").unwrap();
    wait_until("release applied on SQLite", Duration::from_secs(60), || {
        applied(&cli, first)
    });
    drop(hub);

    let out = Command::new(bin())
        .args(["hub", "migrate", "--from"])
        .arg(&data)
        .args(["--to", &db.url])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", common::describe(&out));
    assert!(said.contains("copied"), "{said}");
    for table in [
        "projects: 1",
        "stages: 1",
        "outposts:",
        "builds: 1",
        "releases: 1",
        "access_keys:",
    ] {
        assert!(said.contains(table), "the report names {table}: {said}");
    }
    // A second copy into the same database is refused, naming why.
    let again = Command::new(bin())
        .args(["hub", "migrate", "--from"])
        .arg(&data)
        .args(["--to", &db.url])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already holds a hub"),
        "{}",
        common::describe(&again)
    );

    let store_args = [
        "--listen",
        listen.as_str(),
        "--heartbeat-secs",
        "1",
        "--store",
        db.url.as_str(),
    ];
    let hub = common::HubProcess::start_with(&data, &store_args);
    let cli = Cli::for_hub(&hub, &key, &tmp.path().join("config"));
    wait_until(
        "the agent relinked to the migrated hub",
        Duration::from_secs(60),
        || applied(&cli, first),
    );
    // The same Outpost URI is still valid, the other key still works.
    cli.ok(&["validate", "outpost-uri", &uri, "-p", "plant"]);
    let ci_key = other
        .lines()
        .map(str::trim)
        .find(|l| l.contains(':') && !l.contains(' '))
        .unwrap_or_else(|| panic!("no key in: {other}"));
    let ci = Cli::for_hub(&hub, ci_key, &tmp.path().join("config-ci"));
    ci.ok(&["whoami"]);
    let second = push(&cli, "line").unwrap();
    assert_eq!(second, first + 1);
    wait_until(
        "a new release applied after migrating",
        Duration::from_secs(60),
        || applied(&cli, second),
    );
    drop(agent);
    drop(hub);
}
