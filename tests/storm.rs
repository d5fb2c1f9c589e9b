//! A reconnect storm: 500 agents (real agent code, in this one test
//! process) linked to a hub process that is killed with SIGKILL and
//! restarted. All come back, and the hub never has more TLS handshakes in
//! flight than its limit.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{HubProcess, free_port};
use trellis_link::identity::JoinToken;

const AGENTS: usize = 500;
const MAX_HANDSHAKES: &str = "8";

fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

#[test]
fn five_hundred_agents_all_come_back_after_a_hub_restart_within_the_handshake_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("hub");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let args = [
        "--listen",
        listen.as_str(),
        "--admissions-per-sec",
        "150",
        "--max-handshakes",
        MAX_HANDSHAKES,
    ];
    let hub = HubProcess::start_with(&data, &args);
    let admin = hub.admin_key();
    let ca = std::fs::read(hub.ca_cert()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .build()
        .unwrap();
    let endpoint = hub.endpoint.clone();
    let metrics = {
        let http = http.clone();
        let url = format!("{endpoint}/metrics");
        move || {
            let http = http.clone();
            let url = url.clone();
            async move {
                let text = http.get(&url).send().await.ok()?.text().await.ok()?;
                Some((
                    metric(&text, "trellis_links_connected")?,
                    metric(&text, "trellis_link_handshakes_peak")?,
                ))
            }
        }
    };

    let (stop, stopped) = tokio::sync::watch::channel(false);
    rt.block_on(async {
        // Register and enrol every outpost, then run its agent.
        let mut joins = tokio::task::JoinSet::new();
        let limit = Arc::new(tokio::sync::Semaphore::new(16));
        for i in 0..AGENTS {
            let http = http.clone();
            let endpoint = endpoint.clone();
            let admin = admin.clone();
            let dir = tmp.path().join(format!("agent-{i}"));
            let limit = limit.clone();
            let mut stopped = stopped.clone();
            joins.spawn(async move {
                let permit = limit.acquire_owned().await.unwrap();
                let created: serde_json::Value = http
                    .post(format!("{endpoint}/api/v1/outposts"))
                    .bearer_auth(&admin)
                    .json(&serde_json::json!({"name": format!("edge-{i}")}))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                let token: JoinToken = created["join"]["token"].as_str().unwrap().parse().unwrap();
                std::fs::create_dir_all(&dir).unwrap();
                trellis_agent::join(&token, &dir).await.unwrap();
                drop(permit);
                tokio::spawn(async move {
                    let options = trellis_agent::AgentOptions {
                        // The storm is about the link; nothing is released.
                        runtime: Some(Arc::new(trellis_agent::RecordOnly::new(&dir))),
                        rng_seed: Some(i as u64),
                        ..Default::default()
                    };
                    let _ = trellis_agent::run(&dir, options, async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    })
                    .await;
                });
            });
        }
        while let Some(r) = joins.join_next().await {
            r.unwrap();
        }
    });

    // The local outpost counts as one link too.
    let wait_all = |what: &str| {
        let started = std::time::Instant::now();
        rt.block_on(async {
            loop {
                if let Some((connected, _)) = metrics().await
                    && connected as usize > AGENTS
                {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(180),
                    "not all agents came back ({what})"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        started.elapsed()
    };
    let first = wait_all("first connect");
    eprintln!("{AGENTS} agents linked in {first:?}");

    hub.kill9();
    let hub = HubProcess::start_with(&data, &args);
    let again = wait_all("after the restart");
    eprintln!("{AGENTS} agents back {again:?} after the hub restarted");
    let (_, peak) = rt.block_on(metrics()).unwrap();
    let limit: u64 = MAX_HANDSHAKES.parse().unwrap();
    assert!(
        peak <= limit,
        "{peak} handshakes were in flight at once; the limit is {limit}"
    );
    assert!(peak >= 1);
    let _ = stop.send(true);
    drop(hub);
}
