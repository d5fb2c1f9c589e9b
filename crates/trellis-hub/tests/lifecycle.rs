//! Component lifecycle through the API — start, stop, restart, suspend,
//! resume — and the component listing: what the store records, the desired
//! revisions they bump, the controls the outpost's agent receives, and the
//! desired and observed state the listing shows (never a stale green).

mod common;

use chrono::Utc;
use common::{M, TestHub, start};
use reqwest::StatusCode;
use serde_json::{Value, json};
use trellis_link::Message;
use trellis_link::protocol::{ComponentStatus, DesiredAck, StatusReport};

const MANIFEST: &str = "version: v1
components:
  - name: web
    docker:
      image: web:1
  - name: worker
    docker:
      image: worker:1
  - name: nightly
    docker:
      image: job:1
    scheduled: \"0 3 * * *\"
";

const STAGE: &str = "/projects/shop/stages/line3";

/// Project `shop` with stage `line3` on outpost `edge` and one build; no
/// release yet.
async fn setup(hub: &TestHub) {
    common::shop_line3_on_edge(
        hub,
        MANIFEST,
        json!([
            {"name": "web", "artifact": {"kind": "image", "reference": "web:1"}},
            {"name": "worker", "artifact": {"kind": "image", "reference": "worker:1"}},
            {"name": "nightly", "artifact": {"kind": "image", "reference": "job:1"}}
        ]),
    )
    .await;
}

async fn push(hub: &TestHub) -> u64 {
    let (s, r) = hub
        .call(
            Some(&hub.admin),
            M::POST,
            &format!("{STAGE}/releases"),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    r["revision"].as_u64().unwrap()
}

async fn act(hub: &TestHub, key: &str, component: &str, action: &str) -> (StatusCode, Value) {
    hub.call(
        Some(key),
        M::POST,
        &format!("{STAGE}/components/{component}/{action}"),
        None,
    )
    .await
}

async fn components(hub: &TestHub) -> Value {
    let (s, b) = hub
        .call(
            Some(&hub.admin),
            M::GET,
            &format!("{STAGE}/components"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    b
}

fn component<'a>(list: &'a Value, name: &str) -> &'a Value {
    list["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {list}"))
}

use common::ScriptedAgent as Agent;

impl Agent {
    /// The next desired state: its revision and state, acknowledged.
    async fn desired(&mut self) -> (u64, Value) {
        match self.next().await {
            Message::Desired {
                revision, state, ..
            } => {
                self.send(Message::Ack {
                    desired: vec![DesiredAck {
                        project: "shop".into(),
                        stage: "line3".into(),
                        revision,
                    }],
                })
                .await;
                (revision, state)
            }
            other => panic!("expected desired, got {other:?}"),
        }
    }

    async fn report(&mut self, seq: u64, applied: u64, components: Vec<ComponentStatus>) {
        self.send(Message::Status {
            seq,
            reports: vec![StatusReport {
                project: "shop".into(),
                stage: "line3".into(),
                applied_revision: applied,
                state: "running".into(),
                message: None,
                components,
                errors: vec![],
                rolled_back_to: None,
            }],
        })
        .await;
        match self.next().await {
            Message::StatusAck { up_to_seq } => assert_eq!(up_to_seq, seq),
            other => panic!("expected status-ack, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn controls_bump_the_revision_and_reach_the_outpost() {
    let hub = start().await;
    setup(&hub).await;
    let admin = hub.admin.clone();
    let mut agent = Agent::connect(&hub, &[]).await;

    // Nothing released yet: nothing to stop.
    let (s, b) = act(&hub, &admin, "web", "stop").await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    assert_eq!(b["error"]["code"], "no-release");
    assert!(
        b["error"]["hint"]
            .as_str()
            .unwrap()
            .contains("trellis push release"),
        "{b}"
    );

    assert_eq!(push(&hub).await, 1);
    let (revision, state) = agent.desired().await;
    assert_eq!(revision, 1);
    assert_eq!(state["controls"], json!({}));

    let (s, b) = act(&hub, &admin, "web", "stop").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["changed"], true);
    assert_eq!(b["desired_revision"], 2);
    assert_eq!(
        b["control"],
        json!({"stopped": true, "killed": false, "restarts": 0})
    );
    assert_eq!(b["stage_suspended"], false);
    let (revision, state) = agent.desired().await;
    assert_eq!(revision, 2);
    assert_eq!(
        state["controls"],
        json!({"web": {"stopped": true, "killed": false, "restarts": 0}})
    );
    assert_eq!(state["release"]["number"], 1, "the release stays");

    // A stop of a stopped component changes nothing and sends nothing.
    let (s, b) = act(&hub, &admin, "web", "stop").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["changed"], false);
    assert_eq!(b["desired_revision"], 2);
    agent.quiet().await;

    let (_, b) = act(&hub, &admin, "web", "restart").await;
    assert_eq!(b["desired_revision"], 3);
    assert_eq!(
        b["control"],
        json!({"stopped": false, "killed": false, "restarts": 1})
    );
    let (revision, state) = agent.desired().await;
    assert_eq!(revision, 3);
    assert_eq!(
        state["controls"]["web"],
        json!({"stopped": false, "killed": false, "restarts": 1})
    );

    // Suspend and resume, by their own endpoints and by PATCH.
    let (s, b) = hub
        .call(Some(&admin), M::POST, &format!("{STAGE}/suspend"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["suspended"], true);
    assert_eq!(b["desired_revision"], 4);
    let (revision, state) = agent.desired().await;
    assert_eq!((revision, state["suspended"].clone()), (4, json!(true)));
    let (_, b) = hub
        .call(Some(&admin), M::POST, &format!("{STAGE}/suspend"), None)
        .await;
    assert_eq!(b["desired_revision"], 4, "suspending twice");
    let (_, b) = act(&hub, &admin, "worker", "stop").await;
    assert_eq!(b["stage_suspended"], true);
    assert_eq!(b["desired_revision"], 5);
    agent.desired().await;
    let (_, b) = hub
        .call(Some(&admin), M::POST, &format!("{STAGE}/resume"), None)
        .await;
    assert_eq!(
        (b["suspended"].clone(), b["desired_revision"].clone()),
        (json!(false), json!(6))
    );
    let (revision, state) = agent.desired().await;
    assert_eq!(revision, 6);
    assert_eq!(state["suspended"], false);
    assert_eq!(state["controls"]["worker"]["stopped"], true);
    let (s, b) = hub
        .call(
            Some(&admin),
            M::PATCH,
            STAGE,
            Some(json!({"suspended": true})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["desired_revision"], 7);
    assert_eq!(agent.desired().await.0, 7);
}

#[tokio::test]
async fn bad_requests_get_stable_codes_and_only_members_may_act() {
    let hub = start().await;
    setup(&hub).await;
    push(&hub).await;
    let admin = hub.admin.clone();

    let (s, b) = act(&hub, &admin, "db", "stop").await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    assert_eq!(b["error"]["code"], "no-such-component");
    let hint = b["error"]["hint"].as_str().unwrap();
    assert!(hint.contains("web, worker, nightly"), "{hint}");

    let (s, b) = act(&hub, &admin, "web", "kill").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert_eq!(b["error"]["code"], "invalid-action");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("start, stop, restart")
    );

    let (s, b) = act(&hub, &admin, "Bad_Name", "stop").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert_eq!(b["error"]["code"], "invalid-name");

    let (s, b) = hub
        .call(
            Some(&admin),
            M::POST,
            "/projects/shop/stages/nope/components/web/stop",
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");

    // Outsiders see no project; members may act.
    let eve = hub.user("eve").await;
    let (s, b) = act(&hub, &eve, "web", "stop").await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not a member")
    );
    for path in ["components", "logs", "suspend"] {
        let method = if path == "suspend" { M::POST } else { M::GET };
        let (s, _) = hub
            .call(Some(&eve), method, &format!("{STAGE}/{path}"), None)
            .await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}");
    }
    let bob = hub.user("bob").await;
    let (s, b) = hub
        .call(
            Some(&admin),
            M::PUT,
            "/projects/shop/members/bob",
            Some(json!({"role": "member"})),
        )
        .await;
    assert!(s.is_success(), "{b}");
    let (s, b) = act(&hub, &bob, "web", "stop").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["changed"], true);

    // No key at all.
    let (s, _) = hub
        .call(
            None,
            M::POST,
            &format!("{STAGE}/components/web/start"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_listing_shows_desired_and_observed_and_unknown_until_reported() {
    let hub = start().await;
    setup(&hub).await;

    // No release: no components, and it says so.
    let list = components(&hub).await;
    assert_eq!(list["release"], Value::Null);
    assert_eq!(list["components"], json!([]));
    assert_eq!(list["link"], "awaiting-agent");

    let revision = push(&hub).await;
    let list = components(&hub).await;
    assert_eq!(list["release"], 1);
    assert_eq!(list["build"], "main_b1");
    assert_eq!(list["desired_revision"], revision);
    assert_eq!(list["reported_revision"], 0);
    assert_eq!(list["current"], false);
    assert_eq!(list["observed_at"], Value::Null);
    let names: Vec<&str> = list["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["web", "worker", "nightly"], "manifest order");
    for name in names {
        assert_eq!(
            component(&list, name)["observed"]["state"],
            "unknown",
            "never reported: {list}"
        );
    }
    assert_eq!(component(&list, "nightly")["scheduled"], true);

    let mut agent = Agent::connect(&hub, &[]).await;
    agent.desired().await;
    let since = Utc::now();
    agent
        .report(
            1,
            revision,
            vec![
                ComponentStatus {
                    name: "web".into(),
                    state: "running".into(),
                    replicas: 2,
                    running: 2,
                    restarts: 1,
                    since: Some(since),
                    release: Some(1),
                    ..Default::default()
                },
                ComponentStatus {
                    name: "worker".into(),
                    state: "crash-looping".into(),
                    replicas: 1,
                    running: 0,
                    restarts: 5,
                    exit_code: Some(3),
                    release: Some(1),
                    message: Some("exits with 3 right after starting".into()),
                    ..Default::default()
                },
            ],
        )
        .await;
    let list = components(&hub).await;
    assert_eq!(list["current"], true, "{list}");
    assert_eq!(list["reported_revision"], revision);
    assert!(list["observed_at"].is_string());
    assert_eq!(list["link"], "online");
    let web = component(&list, "web");
    assert_eq!(web["observed"]["state"], "running");
    assert_eq!(
        (
            web["observed"]["running"].clone(),
            web["observed"]["replicas"].clone()
        ),
        (json!(2), json!(2))
    );
    assert_eq!(web["observed"]["restarts"], 1);
    assert_eq!(
        web["desired"],
        json!({"stopped": false, "killed": false, "restarts": 0})
    );
    let worker = component(&list, "worker");
    assert_eq!(worker["observed"]["exit_code"], 3);
    assert!(
        worker["observed"]["message"]
            .as_str()
            .unwrap()
            .contains("exits with 3")
    );
    assert_eq!(
        component(&list, "nightly")["observed"]["state"],
        "unknown",
        "a component the agent did not report is not assumed fine"
    );

    // A stop the outpost has not applied yet: desired changes at once, the
    // observation is marked as not current.
    act(&hub, &hub.admin, "worker", "stop").await;
    let list = components(&hub).await;
    assert_eq!(list["current"], false);
    assert_eq!(list["desired_revision"], revision + 1);
    let worker = component(&list, "worker");
    assert_eq!(worker["desired"]["stopped"], true);
    assert_eq!(worker["observed"]["state"], "crash-looping");
    let (applied, _) = agent.desired().await;
    agent
        .report(
            2,
            applied,
            vec![ComponentStatus {
                name: "worker".into(),
                state: "stopped".into(),
                replicas: 1,
                ..Default::default()
            }],
        )
        .await;
    let list = components(&hub).await;
    assert_eq!(list["current"], true);
    assert_eq!(component(&list, "worker")["observed"]["state"], "stopped");
    assert_eq!(
        component(&list, "web")["observed"]["state"],
        "unknown",
        "the newest report no longer mentions web"
    );
}

#[tokio::test]
async fn the_openapi_document_describes_the_new_endpoints() {
    let hub = start().await;
    let (s, doc) = hub.call(None, M::GET, "/openapi.json", None).await;
    assert_eq!(s, StatusCode::OK);
    let paths = &doc["paths"];
    for (path, method) in [
        (
            "/projects/{project}/stages/{stage}/components/{component}/{action}",
            "post",
        ),
        ("/projects/{project}/stages/{stage}/components", "get"),
        ("/projects/{project}/stages/{stage}/suspend", "post"),
        ("/projects/{project}/stages/{stage}/resume", "post"),
        ("/projects/{project}/stages/{stage}/logs", "get"),
    ] {
        assert!(paths[path][method].is_object(), "{method} {path} missing");
    }
    let logs = &paths["/projects/{project}/stages/{stage}/logs"]["get"];
    assert!(
        logs["responses"]["200"]["content"]["application/x-ndjson"].is_object(),
        "{logs}"
    );
    let params: Vec<&str> = logs["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for p in ["component", "since", "tail", "follow"] {
        assert!(params.contains(&p), "{params:?}");
    }
}

#[tokio::test]
async fn the_status_shows_how_far_a_delivery_has_come_until_the_revision_is_applied() {
    let hub = start().await;
    setup(&hub).await;
    let revision = push(&hub).await;
    let mut agent = Agent::connect(&hub, &[]).await;
    let (got, _) = agent.desired().await;
    assert_eq!(got, revision);
    agent
        .send(Message::Delivery {
            project: "shop".into(),
            stage: "line3".into(),
            revision,
            fetched: 3 << 20,
            total: 12 << 20,
            step: "fetching artifacts".into(),
        })
        .await;
    // A delivery frame of a stage that is not on this outpost is ignored.
    agent
        .send(Message::Delivery {
            project: "shop".into(),
            stage: "elsewhere".into(),
            revision,
            fetched: 1,
            total: 2,
            step: "fetching artifacts".into(),
        })
        .await;
    let path = format!("{STAGE}/outpost-status");
    let mut seen = Value::Null;
    for _ in 0..50 {
        let (s, body) = hub.call(Some(&hub.admin), M::GET, &path, None).await;
        assert_eq!(s, StatusCode::OK, "{body}");
        seen = body;
        if !seen["sync"]["delivery"].is_null() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(seen["sync"]["state"], "syncing", "{seen}");
    let delivery = &seen["sync"]["delivery"];
    assert_eq!(delivery["revision"], revision, "{seen}");
    assert_eq!(delivery["fetched"], 3 << 20, "{seen}");
    assert_eq!(delivery["total"], 12 << 20, "{seen}");
    assert_eq!(delivery["step"], "fetching artifacts", "{seen}");

    // Once the revision is reported applied, the progress is history.
    agent.report(1, revision, vec![]).await;
    let (_, body) = hub.call(Some(&hub.admin), M::GET, &path, None).await;
    assert_eq!(body["sync"]["state"], "in-sync", "{body}");
    assert!(body["sync"]["delivery"].is_null(), "{body}");
}

#[tokio::test]
async fn the_project_overview_shows_every_stage_sync_in_one_call() {
    let hub = start().await;
    setup(&hub).await;
    // A second stage, on the hub's own outpost, never released.
    let (s, b) = hub
        .call(
            Some(&hub.admin),
            M::POST,
            "/projects/shop/stages",
            Some(json!({"name": "lab", "type": "qa"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let revision = push(&hub).await;
    let overview = || async {
        let (s, body) = hub
            .call(
                Some(&hub.admin),
                M::GET,
                "/projects/shop/outpost-status",
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        let rows = body.as_array().unwrap().clone();
        assert_eq!(rows.len(), 2, "{body}");
        let line3 = rows.iter().find(|r| r["stage"] == "line3").unwrap().clone();
        let lab = rows.iter().find(|r| r["stage"] == "lab").unwrap().clone();
        (line3, lab)
    };
    let pending = || async {
        let (s, body) = hub
            .call(
                Some(&hub.admin),
                M::GET,
                "/projects/shop/outpost-status?pending=true",
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        body.as_array()
            .unwrap()
            .iter()
            .map(|r| r["stage"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    // Pushed while the outpost has never linked: not in sync, not connected.
    let (line3, lab) = overview().await;
    assert_eq!(line3["outpost"], "edge");
    assert_eq!(line3["connected"], false);
    assert_eq!(line3["sync"], "linking", "{line3}");
    assert_eq!(line3["desired_revision"], revision);
    assert_eq!(line3["applied_revision"], 0);
    assert_eq!(line3["latest_release"], 1);
    assert!(line3["applied_release"].is_null(), "{line3}");
    assert!(line3["updated_at"].is_null(), "nothing heard yet: {line3}");
    assert_eq!(lab["outpost"], "local");
    assert_eq!(lab["desired_revision"], 0);
    // What the rollout still waits for: line3 only (lab has nothing to apply).
    assert_eq!(pending().await, ["line3"]);

    // The agent links, takes the release and reports it applied.
    let mut agent = Agent::connect(&hub, &[]).await;
    let (got, _) = agent.desired().await;
    assert_eq!(got, revision);
    let before_report = chrono::Utc::now() - chrono::Duration::seconds(1);
    agent.report(1, revision, vec![]).await;
    let (line3, _) = overview().await;
    // When the hub recorded the report: what a watcher reads applied times from.
    let heard: chrono::DateTime<chrono::Utc> = line3["updated_at"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("a time: {line3}"));
    assert!(
        heard >= before_report && heard <= chrono::Utc::now(),
        "{line3}"
    );
    assert_eq!(line3["connected"], true, "{line3}");
    assert_eq!(line3["sync"], "in-sync", "{line3}");
    assert_eq!(line3["applied_revision"], revision);
    assert_eq!(line3["applied_release"], 1, "{line3}");
    assert!(pending().await.is_empty());

    // A malformed filter is refused with the API's error shape.
    let (s, body) = hub
        .call(
            Some(&hub.admin),
            M::GET,
            "/projects/shop/outpost-status?pending=maybe",
            None,
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"]["code"].is_string(), "{body}");

    // Members of other projects see nothing of it.
    let outsider = hub.user("outsider").await;
    let (s, _) = hub
        .call(
            Some(&outsider),
            M::GET,
            "/projects/shop/outpost-status",
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

/// One push releases the build to several stages; the outpost's agent gets
/// its release and its report is kept. A push naming a stage that does not
/// exist releases nothing anywhere.
#[tokio::test]
async fn one_push_releases_a_build_to_several_stages_or_to_none() {
    let hub = start().await;
    setup(&hub).await;
    let (s, b) = hub
        .call(
            Some(&hub.admin),
            M::POST,
            "/projects/shop/stages",
            Some(json!({"name": "lab", "type": "qa"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let push_to = |stages: Value| {
        let hub = &hub;
        async move {
            hub.call(
                Some(&hub.admin),
                M::POST,
                "/projects/shop/releases",
                Some(json!({ "stages": stages })),
            )
            .await
        }
    };
    let latest = |stage: &'static str| {
        let hub = &hub;
        async move {
            let (s, b) = hub
                .call(
                    Some(&hub.admin),
                    M::GET,
                    &format!("/projects/shop/stages/{stage}"),
                    None,
                )
                .await;
            assert_eq!(s, StatusCode::OK, "{b}");
            b["latest_release"].clone()
        }
    };

    let (s, releases) = push_to(json!(["line3", "lab"])).await;
    assert_eq!(s, StatusCode::CREATED, "{releases}");
    let pushed: Vec<(&str, u64, u64)> = releases
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["stage"].as_str().unwrap(),
                r["number"].as_u64().unwrap(),
                r["revision"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(pushed, [("line3", 1, 1), ("lab", 1, 1)]);

    // The outpost's agent gets line3's release and reports it applied.
    let mut agent = Agent::connect(&hub, &[]).await;
    let (got, _) = agent.desired().await;
    assert_eq!(got, 1);
    agent.report(1, 1, vec![]).await;
    let (s, b) = hub
        .call(
            Some(&hub.admin),
            M::GET,
            &format!("{STAGE}/outpost-status"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["sync"]["state"], "in-sync", "{b}");
    assert_eq!(b["sync"]["applied_release"], 1, "{b}");

    // A push while the agent is linked reaches it at once: the push tells
    // the session of each outpost it touched.
    let (s, releases) = push_to(json!(["lab", "line3"])).await;
    assert_eq!(s, StatusCode::CREATED, "{releases}");
    let (got, _) = agent.desired().await;
    assert_eq!(got, 2);

    // Refused pushes change no stage.
    for (stages, status, code) in [
        (json!(["line3", "nope"]), StatusCode::NOT_FOUND, "not-found"),
        (json!([]), StatusCode::BAD_REQUEST, "no-stages"),
        (
            json!(["lab", "lab"]),
            StatusCode::BAD_REQUEST,
            "duplicate-stage",
        ),
    ] {
        let (s, b) = push_to(stages.clone()).await;
        assert_eq!(s, status, "{stages}: {b}");
        assert_eq!(b["error"]["code"], code, "{stages}: {b}");
        assert!(
            b["error"]["hint"].as_str().is_some_and(|h| !h.is_empty()),
            "{b}"
        );
    }
    assert_eq!(latest("line3").await, 2);
    assert_eq!(latest("lab").await, 2);

    // Members of other projects cannot push to its stages.
    let outsider = hub.user("outsider").await;
    let (s, _) = hub
        .call(
            Some(&outsider),
            M::POST,
            "/projects/shop/releases",
            Some(json!({"stages": ["lab"]})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(latest("lab").await, 2);
}
