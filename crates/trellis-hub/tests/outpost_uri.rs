//! Outpost URIs and their validation, through the real HTTP API: every
//! error code has a case here, and the description has every field.

mod common;

use common::{M, TestHub, start};
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn outpost(hub: &TestHub, name: &str, max_stages: Option<u32>) -> String {
    let (s, b) = hub
        .call(
            Some(&hub.admin),
            M::POST,
            "/outposts",
            Some(json!({
                "name": name,
                "display_name": format!("Line {name}"),
                "description": "Edge box next to line 3",
                "labels": {"site": "plant-3", "arch": "arm64"},
                "max_stages": max_stages,
            })),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    uri(hub, name).await
}

async fn uri(hub: &TestHub, name: &str) -> String {
    let (s, b) = hub
        .call(
            Some(&hub.admin),
            M::GET,
            &format!("/outposts/{name}/uri"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    b["uri"].as_str().unwrap().to_owned()
}

async fn validate(
    hub: &TestHub,
    key: &str,
    uri: &str,
    project: Option<&str>,
) -> (StatusCode, Value) {
    hub.call(
        Some(key),
        M::POST,
        "/outposts/validate",
        Some(json!({"uri": uri, "project": project})),
    )
    .await
}

fn assert_code(got: &(StatusCode, Value), status: StatusCode, code: &str) {
    assert_eq!(got.0, status, "{}", got.1);
    assert_eq!(got.1["error"]["code"], code, "{}", got.1);
    assert!(
        !got.1["error"]["hint"].as_str().unwrap().is_empty(),
        "{}",
        got.1
    );
}

/// alice owns project `shop`.
async fn alice(hub: &TestHub) -> String {
    let alice = hub.user("alice").await;
    let (s, _) = hub
        .call(
            Some(&alice),
            M::POST,
            "/projects",
            Some(json!({"name": "shop"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    alice
}

#[tokio::test]
async fn a_valid_uri_describes_the_outpost() {
    let hub = start().await;
    let alice = alice(&hub).await;
    let uri = outpost(&hub, "factory-7", Some(3)).await;
    assert!(uri.starts_with("trellis://127.0.0.1:"), "{uri}");
    assert!(uri.contains("/factory-7?key="), "{uri}");
    let (status, d) = validate(&hub, &alice, &uri, Some("shop")).await;
    assert_eq!(status, StatusCode::OK, "{d}");
    assert_eq!(d["name"], "factory-7");
    assert_eq!(d["display_name"], "Line factory-7");
    assert_eq!(d["description"], "Edge box next to line 3");
    assert_eq!(d["labels"]["site"], "plant-3");
    assert_eq!(d["link"]["state"], "awaiting-agent");
    assert!(d["link"]["since"].is_string());
    assert!(d["link"]["last_seen"].is_null());
    assert!(d["agent"].is_null(), "no agent has connected: {d}");
    assert_eq!(d["stage_count"], 0);
    assert_eq!(d["max_stages"], 3);
    assert_eq!(d["ingress_domain"], "localhost");
    // Surrounding whitespace from a copy-paste is fine.
    let (status, _) = validate(&hub, &alice, &format!("  {uri}\n"), None).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn an_outpost_stage_is_created_with_the_uri_and_takes_releases_at_once() {
    let hub = start().await;
    let alice = alice(&hub).await;
    let bob = hub.user("bob").await;
    hub.call(
        Some(&bob),
        M::POST,
        "/projects",
        Some(json!({"name": "other"})),
    )
    .await;
    let uri = outpost(&hub, "factory-7", Some(2)).await;
    let (s, stage) = hub
        .call(
            Some(&alice),
            M::POST,
            "/projects/shop/stages",
            Some(json!({"name": "line3", "type": "prod", "outpost_uri": uri})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{stage}");
    assert_eq!(stage["outpost"], "factory-7");
    let manifest = "version: v1\ncomponents:\n  - name: web\n    docker:\n      image: web:1\n";
    let (s, b) = hub
        .call(
            Some(&alice),
            M::POST,
            "/projects/shop/builds",
            Some(json!({
            "branch": "main", "commit": "0123456789abcdef0123456789abcdef01234567",
            "manifest_file": "trellis.yaml", "manifest": manifest,
            "components": [{"name": "web", "artifact": {"kind": "image", "reference": "web:1"}}]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let (s, r) = hub
        .call(
            Some(&alice),
            M::POST,
            "/projects/shop/stages/line3/releases",
            Some(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    assert_eq!(r["revision"], 1);

    // The description counts every stage but names only the caller's.
    let (s, _) = hub
        .call(
            Some(&bob),
            M::POST,
            "/projects/other/stages",
            Some(json!({"name": "edge", "type": "dev", "outpost_uri": uri})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    // Two of two: full now.
    let full = validate(&hub, &alice, &uri, None).await;
    assert_code(&full, StatusCode::CONFLICT, "outpost-full");
    assert!(
        full.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("2 of 2")
    );
    hub.call(
        Some(&hub.admin),
        M::DELETE,
        "/projects/other?force=true",
        None,
    )
    .await;
    let (_, d) = validate(&hub, &alice, &uri, None).await;
    assert_eq!(d["stage_count"], 1);
    assert_eq!(d["your_stages"], json!(["shop/line3"]));
}

#[tokio::test]
async fn an_outposts_ingress_domain_is_checked_described_and_sends_its_stages_again() {
    let hub = start().await;
    let alice = alice(&hub).await;
    let admin = Some(hub.admin.as_str());
    // A domain that is not a DNS name is refused, and nothing is created.
    for bad in ["https://plant7.example.net", "Plant7.example.net", "a..b"] {
        let (s, b) = hub
            .call(
                admin,
                M::POST,
                "/outposts",
                Some(json!({"name": "plant7", "ingress_domain": bad})),
            )
            .await;
        assert_code(&(s, b), StatusCode::BAD_REQUEST, "invalid-ingress-domain");
    }
    let (s, _) = hub.call(admin, M::GET, "/outposts/plant7", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let uri = outpost(&hub, "plant7", None).await;
    let (s, stage) = hub
        .call(
            Some(&alice),
            M::POST,
            "/projects/shop/stages",
            Some(json!({"name": "line3", "type": "prod", "outpost_uri": uri})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{stage}");
    let revision = stage["desired_revision"].as_u64().unwrap();

    // Only administrators change it; a bad one changes nothing.
    let change = json!({"ingress_domain": "plant7.example.net"});
    let (s, _) = hub
        .call(
            Some(&alice),
            M::PATCH,
            "/outposts/plant7",
            Some(change.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, b) = hub
        .call(
            admin,
            M::PATCH,
            "/outposts/plant7",
            Some(json!({"ingress_domain": "-bad.example"})),
        )
        .await;
    assert_code(&(s, b), StatusCode::BAD_REQUEST, "invalid-ingress-domain");
    let (s, b) = hub
        .call(admin, M::PATCH, "/outposts/plant7", Some(change))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["ingress_domain"], "plant7.example.net");
    assert_eq!(
        b["description"], "Edge box next to line 3",
        "the rest stays"
    );

    // The stage is sent again (its hosts changed), and the description
    // shows the domain.
    let (_, stage) = hub
        .call(Some(&alice), M::GET, "/projects/shop/stages/line3", None)
        .await;
    assert_eq!(stage["desired_revision"], revision + 1);
    let (_, d) = validate(&hub, &alice, &uri, None).await;
    assert_eq!(d["ingress_domain"], "plant7.example.net");
    // Back to the default.
    let (_, b) = hub
        .call(
            admin,
            M::PATCH,
            "/outposts/plant7",
            Some(json!({"ingress_domain": ""})),
        )
        .await;
    assert_eq!(b["ingress_domain"], Value::Null);
}

#[tokio::test]
async fn every_validation_error_has_its_code_and_hint() {
    let hub = start().await;
    let alice = alice(&hub).await;
    let good = outpost(&hub, "factory-7", Some(1)).await;

    // malformed, naming the part
    for (bad, part) in [
        ("", "empty"),
        ("http://127.0.0.1:1/x?key=a", "scheme"),
        ("trellis://127.0.0.1:99999/factory-7?key=x", "port"),
        ("trellis://127.0.0.1:7440/Factory_7?key=x", "outpost name"),
        ("trellis://127.0.0.1:7440/factory-7?key=shortsecret", "key"),
        ("trellis://127.0.0.1:7440/factory-7?key=x&extra=1", "query"),
        ("trellis://host_name:7440/factory-7?key=x", "host"),
        ("trellis://127.0.0.1:7440/factory-7?key=\u{202e}evil", ""),
    ] {
        let got = validate(&hub, &alice, bad, None).await;
        assert_code(&got, StatusCode::BAD_REQUEST, "malformed-uri");
        let message = got.1["error"]["message"].as_str().unwrap();
        assert!(message.contains(part), "{bad:?}: {message}");
        // The key is never echoed back.
        assert!(!message.contains("shortsecret"), "{message}");
    }
    // another hub's URI
    let key = good.split("key=").nth(1).unwrap();
    let other = format!("trellis://hub.elsewhere.example:7443/factory-7?key={key}");
    assert_code(
        &validate(&hub, &alice, &other, None).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "other-hub",
    );
    // unknown outpost
    let authority = good
        .trim_start_matches("trellis://")
        .split('/')
        .next()
        .unwrap();
    let unknown = format!("trellis://{authority}/factory-9?key={key}");
    assert_code(
        &validate(&hub, &alice, &unknown, None).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unknown-outpost",
    );
    // wrong key: another outpost's key, and a rotated URI
    let other_outpost = outpost(&hub, "factory-8", None).await;
    let other_key = other_outpost.split("key=").nth(1).unwrap();
    let wrong = format!("trellis://{authority}/factory-7?key={other_key}");
    assert_code(
        &validate(&hub, &alice, &wrong, None).await,
        StatusCode::FORBIDDEN,
        "wrong-key",
    );
    // not allowed: a project the caller is not a member of (or that does not exist)
    let bob = hub.user("bob").await;
    assert_code(
        &validate(&hub, &bob, &good, Some("shop")).await,
        StatusCode::FORBIDDEN,
        "not-allowed",
    );
    assert_code(
        &validate(&hub, &bob, &good, Some("ghost")).await,
        StatusCode::FORBIDDEN,
        "not-allowed",
    );
    let (s, _) = hub
        .call(
            Some(&bob),
            M::POST,
            "/projects/shop/stages",
            Some(json!({"name": "x", "type": "dev", "outpost_uri": good})),
        )
        .await;
    assert_eq!(
        s,
        StatusCode::NOT_FOUND,
        "a non-member cannot create stages in shop at all"
    );
    // full
    let (s, b) = hub
        .call(
            Some(&alice),
            M::POST,
            "/projects/shop/stages",
            Some(json!({"name": "a", "type": "dev", "outpost_uri": good})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_code(
        &validate(&hub, &alice, &good, None).await,
        StatusCode::CONFLICT,
        "outpost-full",
    );
    let (s, b) = hub
        .call(
            Some(&alice),
            M::POST,
            "/projects/shop/stages",
            Some(json!({"name": "b", "type": "dev", "outpost_uri": good})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "creating re-validates: {b}");
    assert_eq!(b["error"]["code"], "outpost-full");
    // revoked
    let (s, _) = hub
        .call(
            Some(&hub.admin),
            M::POST,
            "/outposts/factory-8/revoke",
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_code(
        &validate(&hub, &alice, &other_outpost, None).await,
        StatusCode::FORBIDDEN,
        "revoked",
    );
    // Without a key there is no validation at all.
    let (s, _) = hub
        .call(
            None,
            M::POST,
            "/outposts/validate",
            Some(json!({"uri": good})),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn rotating_a_uri_invalidates_old_copies_and_keeps_existing_stages() {
    let hub = start().await;
    let alice = alice(&hub).await;
    let old = outpost(&hub, "factory-7", None).await;
    let (s, _) = hub
        .call(
            Some(&alice),
            M::POST,
            "/projects/shop/stages",
            Some(json!({"name": "line3", "type": "prod", "outpost_uri": old})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, rotated) = hub
        .call(
            Some(&hub.admin),
            M::POST,
            "/outposts/factory-7/uri/rotate",
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let new = rotated["uri"].as_str().unwrap();
    assert_ne!(new, old);
    assert_eq!(
        uri(&hub, "factory-7").await,
        new,
        "get returns the rotated URI"
    );
    assert_code(
        &validate(&hub, &alice, &old, None).await,
        StatusCode::FORBIDDEN,
        "wrong-key",
    );
    assert_eq!(validate(&hub, &alice, new, None).await.0, StatusCode::OK);
    let (s, stage) = hub
        .call(Some(&alice), M::GET, "/projects/shop/stages/line3", None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(stage["outpost"], "factory-7");
    // URIs are for administrators to hand out.
    let (s, _) = hub
        .call(Some(&alice), M::GET, "/outposts/factory-7/uri", None)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // The local outpost has no URI.
    let (s, b) = hub
        .call(Some(&hub.admin), M::GET, "/outposts/local/uri", None)
        .await;
    assert_code(&(s, b), StatusCode::CONFLICT, "local-outpost");
}
