//! Agent updates in waves, against the real hub in process with scripted
//! agents on in-memory links (the agent's side of an update — fetching,
//! swapping, the watchdog — is tested with real processes in the
//! workspace's `tests/agent_update.rs`): a wave is sent once the one
//! before it passed, an outpost offline when its wave is sent is carried
//! along and updated when it links, and a wave whose failures put the
//! threshold out of reach halts the rest, which are never sent.

mod common;

use std::time::Duration;

use common::{M, ScriptedAgent, TestHub};
use reqwest::StatusCode;
use serde_json::{Value, json};
use trellis_link::Message;
use trellis_link::protocol::FEATURE_AGENT_UPDATE;

async fn connect(hub: &TestHub, outpost: &str) -> ScriptedAgent {
    ScriptedAgent::connect_outpost(hub, outpost, &[], "0.1.0", &[FEATURE_AGENT_UPDATE]).await
}

/// The update the hub sends the agent: its id.
async fn update_sent(agent: &mut ScriptedAgent) -> u64 {
    agent
        .next_such(|m| match m {
            Message::AgentUpdate { id, version, .. } => {
                assert_eq!(version, "0.2.0");
                Some(id)
            }
            _ => None,
        })
        .await
}

/// Registers outposts `names` with `labels`.
async fn add_outposts(hub: &TestHub, names: &[String], labels: Value) {
    for name in names {
        let (status, body) = hub
            .call(
                Some(hub.admin.as_str()),
                M::POST,
                "/outposts",
                Some(json!({"name": name, "labels": labels})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
}

/// Waits until the hub knows the architecture of every outpost in
/// `names`: it records an agent's as it handles the hello, after the
/// welcome, and refuses to update an outpost whose architecture it does
/// not know.
async fn architectures_known(hub: &TestHub, names: &[String]) {
    let admin = Some(hub.admin.as_str());
    for _ in 0..300 {
        let (_, agents) = hub.call(admin, M::GET, "/agent-updates", None).await;
        let known = |name: &String| {
            agents
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["outpost"] == name.as_str() && !a["arch"].is_null())
        };
        if names.iter().all(known) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the hub did not record the agents' architectures");
}

/// Every outpost's latest update, by outpost, once `until` holds (within
/// 30 s: the driver sends waves only once it has run for a few seconds).
async fn updates_once(hub: &TestHub, until: impl Fn(&Value) -> bool) -> Value {
    let admin = Some(hub.admin.as_str());
    for _ in 0..300 {
        let (_, agents) = hub.call(admin, M::GET, "/agent-updates", None).await;
        let by_outpost: serde_json::Map<String, Value> = agents
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["outpost"].as_str().unwrap().to_owned(),
                    a["update"].clone(),
                )
            })
            .collect();
        let by_outpost = Value::Object(by_outpost);
        if until(&by_outpost) {
            return by_outpost;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the agent updates did not get there");
}

#[tokio::test]
async fn agent_updates_go_in_waves_carry_offline_outposts_and_halt_past_the_threshold() {
    let hub = common::start().await;
    let admin = Some(hub.admin.as_str());
    let names: Vec<String> = (1..=7).map(|i| format!("line-{i}")).collect();
    add_outposts(&hub, &names, json!({"site": "plant-3"})).await;
    hub.put_agent_binary("0.2.0").await;
    // The waves as documented: the outposts in their fixed order, cut at
    // 1, 3, 5 and 100% (7).
    let order = trellis_model::agent_update::outpost_order(names.clone());
    let mut agents = Vec::new();
    for name in &order {
        agents.push(Some(connect(&hub, name).await));
    }
    architectures_known(&hub, &names).await;
    // The second of wave 2 linked once (its architecture is known) and is
    // offline now.
    agents[2] = None;

    // Bad waves and thresholds are refused, nothing recorded.
    for (body, code) in [
        (
            json!({"selector": "site=plant-3", "version": "0.2.0", "waves": "1,50%"}),
            "invalid-waves",
        ),
        (
            json!({"selector": "site=plant-3", "version": "0.2.0", "waves": "3,2,100%"}),
            "invalid-waves",
        ),
        (
            json!({"selector": "site=plant-3", "version": "0.2.0", "success_threshold": "120%"}),
            "invalid-threshold",
        ),
    ] {
        let (status, error) = hub.call(admin, M::POST, "/agent-updates", Some(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
        assert_eq!(error["error"]["code"], code, "{error}");
    }
    let (_, listed) = hub.call(admin, M::GET, "/agent-updates", None).await;
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["update"].is_null()),
        "{listed}"
    );

    let (status, created) = hub
        .call(
            admin,
            M::POST,
            "/agent-updates",
            Some(json!({"selector": "site=plant-3", "version": "0.2.0",
                        "waves": "1,3,5,100%", "success_threshold": "50%"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let waves: Vec<(String, u64, String)> = created["updates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            (
                u["outpost"].as_str().unwrap().to_owned(),
                u["wave"].as_u64().unwrap(),
                u["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected: Vec<(String, u64, String)> = order
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let wave = match i {
                0 => 0,
                1 | 2 => 1,
                3 | 4 => 2,
                _ => 3,
            };
            let state = if wave == 0 { "pending" } else { "waiting" };
            (o.clone(), wave, state.to_owned())
        })
        .collect();
    assert_eq!(waves, expected);

    // Wave 1: sent at once, to its outpost only.
    let first = agents[0].as_mut().unwrap();
    let id = update_sent(first).await;
    for agent in agents[1..].iter_mut().flatten() {
        agent.quiet().await;
    }
    agents[0]
        .as_mut()
        .unwrap()
        .report_update(id, "applied", "")
        .await;

    // Wave 2 once wave 1 passed: the online outpost gets it, the offline
    // one is carried along and does not hold the wave.
    let seen = updates_once(&hub, |u| u[&order[2]]["state"] == "pending").await;
    let id = update_sent(agents[1].as_mut().unwrap()).await;
    assert_eq!(seen[&order[2]]["carried"], true, "{seen}");
    assert_eq!(seen[&order[1]]["carried"], false, "{seen}");
    for agent in agents[3..].iter_mut().flatten() {
        agent.quiet().await;
    }
    agents[1]
        .as_mut()
        .unwrap()
        .report_update(id, "applied", "")
        .await;

    // Wave 3: both fail, so fewer than 50% can apply: the rest is halted,
    // never sent, the reason naming the failed outposts.
    for i in [3, 4] {
        let agent = agents[i].as_mut().unwrap();
        let id = update_sent(agent).await;
        agent
            .report_update(
                id,
                "failed",
                "rolled back: the new agent did not link within 120 s",
            )
            .await;
    }
    let seen = updates_once(&hub, |u| u[&order[6]]["state"] == "halted").await;
    for i in [5, 6] {
        let message = seen[&order[i]]["message"].as_str().unwrap();
        assert!(
            message.starts_with("not sent: wave 3: 2 of its 2 online outpost(s) failed"),
            "{message}"
        );
        assert!(
            message.contains(&order[3]) && message.contains(&order[4]),
            "{message}"
        );
        agents[i].as_mut().unwrap().quiet().await;
    }
    assert_eq!(seen[&order[0]]["state"], "applied");
    assert_eq!(seen[&order[3]]["state"], "failed");

    // The carried outpost updates when it links.
    let mut late = connect(&hub, &order[2]).await;
    let id = update_sent(&mut late).await;
    late.report_update(id, "applied", "").await;
    let seen = updates_once(&hub, |u| u[&order[2]]["state"] == "applied").await;
    assert_eq!(seen[&order[2]]["wave"], 1);

    // A halted outpost takes a new update.
    let (status, body) = hub
        .call(
            admin,
            M::POST,
            "/agent-updates",
            Some(json!({"outposts": [order[5]], "version": "0.2.0"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    update_sent(agents[5].as_mut().unwrap()).await;
}

#[tokio::test]
async fn a_wave_with_a_silent_outpost_passes_or_halts_at_its_timeout() {
    let hub = common::start().await;
    let admin = Some(hub.admin.as_str());
    let mut groups = Vec::new();
    for group in ["a", "b"] {
        let names: Vec<String> = (1..=3).map(|i| format!("{group}-{i}")).collect();
        add_outposts(&hub, &names, json!({"group": group})).await;
        groups.push(trellis_model::agent_update::outpost_order(names));
    }
    hub.put_agent_binary("0.2.0").await;
    let mut agents = std::collections::HashMap::new();
    for name in groups.iter().flatten() {
        agents.insert(name.clone(), connect(&hub, name).await);
    }
    architectures_known(&hub, &groups.concat()).await;

    // A wave timeout of none, or past 30 days, is refused.
    for timeout in [0, 2_592_001] {
        let (status, error) = hub
            .call(
                admin,
                M::POST,
                "/agent-updates",
                Some(json!({"selector": "group=a", "version": "0.2.0",
                            "wave_timeout_seconds": timeout})),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
        assert_eq!(error["error"]["code"], "invalid-timeout", "{error}");
    }

    // Each group: a first wave of two, one of which applies and one of
    // which takes the update and goes silent; 3 s to finish.
    for (group, threshold) in [("a", "50%"), ("b", "100%")] {
        let (status, created) = hub
            .call(
                admin,
                M::POST,
                "/agent-updates",
                Some(
                    json!({"selector": format!("group={group}"), "version": "0.2.0",
                            "waves": "2,100%", "success_threshold": threshold,
                            "wave_timeout_seconds": 3}),
                ),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        assert_eq!(
            created["updates"][0]["wave_timeout_seconds"], 3,
            "{created}"
        );
    }
    for order in &groups {
        let applies = agents.get_mut(&order[0]).unwrap();
        let id = update_sent(applies).await;
        applies.report_update(id, "applied", "").await;
        let silent = agents.get_mut(&order[1]).unwrap();
        update_sent(silent).await;
    }

    // Half needed: the silent one does not hold the wave, the last is sent
    // at the timeout.
    let (a, b) = (&groups[0], &groups[1]);
    let seen = updates_once(&hub, |u| u[&a[2]]["state"] == "pending").await;
    assert_eq!(seen[&a[1]]["state"], "pending", "{seen}");
    update_sent(agents.get_mut(&a[2]).unwrap()).await;

    // All needed: halted at the timeout, naming the one not updated.
    let seen = updates_once(&hub, |u| u[&b[2]]["state"] == "halted").await;
    let message = seen[&b[2]]["message"].as_str().unwrap();
    assert!(
        message.starts_with(
            "not sent: wave 1: only 1 of its 2 online outpost(s) updated within the wave timeout (100% needed)"
        ),
        "{message}"
    );
    assert!(
        message.ends_with(&format!("not updated: {}", b[1])),
        "{message}"
    );
    agents.get_mut(&b[2]).unwrap().quiet().await;
    // The silent outpost's update stays open: it may still report.
    assert_eq!(seen[&b[1]]["state"], "pending", "{seen}");
}
