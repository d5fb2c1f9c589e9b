//! Access control through the real HTTP API: two users, two projects.

mod common;

use common::{M, TestHub, start};
use reqwest::StatusCode;
use serde_json::json;

/// Sets up alice (owner of `alpha`) and bob (owner of `beta`).
async fn two_projects(hub: &TestHub) -> (String, String) {
    let alice = hub.user("alice").await;
    let bob = hub.user("bob").await;
    for (key, project) in [(&alice, "alpha"), (&bob, "beta")] {
        let (s, b) = hub
            .call(
                Some(key),
                M::POST,
                "/projects",
                Some(json!({"name": project})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        let (s, b) = hub
            .call(
                Some(key),
                M::POST,
                &format!("/projects/{project}/stages"),
                Some(json!({"name": "dev", "type": "dev"})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
    }
    (alice, bob)
}

#[tokio::test]
async fn requests_without_a_valid_key_get_401_saying_what_to_do() {
    let hub = start().await;
    for key in [
        None,
        Some("garbage"),
        Some("tk_0000000000000000:wrong"),
        Some("id:with space"),
    ] {
        let (status, body) = hub.call(key, M::GET, "/projects", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "key {key:?}");
        assert_eq!(body["error"]["code"], "unauthenticated");
        assert!(
            body["error"]["hint"]
                .as_str()
                .unwrap()
                .contains("Authorization: Bearer"),
            "{body}"
        );
    }
    // A right key id with a wrong secret is refused too.
    let id = hub.admin.split(':').next().unwrap();
    let (status, _) = hub
        .call(
            Some(&format!("{id}:not-the-secret")),
            M::GET,
            "/projects",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Health needs no key.
    let (status, body) = hub.call(None, M::GET, "/health", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "ok");
}

#[tokio::test]
async fn a_member_of_one_project_sees_nothing_of_another() {
    let hub = start().await;
    let (alice, bob) = two_projects(&hub).await;

    let (status, body) = hub.call(Some(&alice), M::GET, "/projects", None).await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<&str> = body
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alpha"]);

    // Every route into bob's project answers 404, exactly as for a project
    // that does not exist.
    for path in [
        "/projects/beta",
        "/projects/beta/stages",
        "/projects/beta/stages/dev",
        "/projects/beta/stages/dev/releases",
        "/projects/beta/stages/dev/configs",
        "/projects/beta/builds",
        "/projects/beta/members",
        "/projects/nonexistent",
    ] {
        let (status, body) = hub.call(Some(&alice), M::GET, path, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
        assert_eq!(body["error"]["code"], "not-found");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("does not exist or you are not a member"),
            "{body}"
        );
    }
    for (method, path, body) in [
        (
            M::POST,
            "/projects/beta/stages",
            Some(json!({"name": "x", "type": "qa"})),
        ),
        (
            M::POST,
            "/projects/beta/stages/dev/releases",
            Some(json!({})),
        ),
        (
            M::POST,
            "/projects/beta/stages/dev/configs/c/data",
            Some(json!({"env": {"A": "1"}, "files": {}})),
        ),
        (M::DELETE, "/projects/beta?force=true", None),
        (
            M::PUT,
            "/projects/beta/members/alice",
            Some(json!({"role": "owner"})),
        ),
    ] {
        let (status, resp) = hub.call(Some(&alice), method.clone(), path, body).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {resp}");
    }
    // Bob's project is untouched.
    let (status, body) = hub
        .call(Some(&bob), M::GET, "/projects/beta/stages", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn members_who_are_not_owners_and_non_admins_get_403() {
    let hub = start().await;
    let (alice, bob) = two_projects(&hub).await;
    // Alice adds bob to alpha as a plain member.
    let (status, body) = hub
        .call(
            Some(&alice),
            M::PUT,
            "/projects/alpha/members/bob",
            Some(json!({"role": "member"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Bob can now work in alpha ...
    let (status, _) = hub
        .call(Some(&bob), M::GET, "/projects/alpha/stages", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    // ... but not delete it or manage its members.
    let (status, body) = hub
        .call(Some(&bob), M::DELETE, "/projects/alpha", None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"]["code"], "forbidden");
    let (status, _) = hub
        .call(
            Some(&bob),
            M::PUT,
            "/projects/alpha/members/bob",
            Some(json!({"role": "owner"})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Administration is for administrators.
    for (method, path, body) in [
        (
            M::POST,
            "/users",
            Some(json!({"name": "mallory", "admin": true})),
        ),
        (M::GET, "/users", None),
        (M::POST, "/outposts", Some(json!({"name": "factory-7"}))),
        (M::GET, "/outposts", None),
        (M::POST, "/users/alice/keys", Some(json!({}))),
    ] {
        let (status, resp) = hub.call(Some(&bob), method.clone(), path, body).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {resp}");
        assert!(
            resp["error"]["hint"]
                .as_str()
                .unwrap()
                .contains("administrator"),
            "{resp}"
        );
    }
    // The last owner cannot leave or be demoted.
    let (status, body) = hub
        .call(
            Some(&alice),
            M::DELETE,
            "/projects/alpha/members/alice",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "last-owner");
    let (status, _) = hub
        .call(
            Some(&alice),
            M::PUT,
            "/projects/alpha/members/alice",
            Some(json!({"role": "member"})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    // Bob may mint a key for himself, and it works.
    let (status, body) = hub
        .call(
            Some(&bob),
            M::POST,
            "/users/bob/keys",
            Some(json!({"description": "laptop"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let second = body["key"].as_str().unwrap();
    let (status, who) = hub.call(Some(second), M::GET, "/whoami", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(who["user"], "bob");
}

#[tokio::test]
async fn a_deleted_key_stops_working_at_once() {
    let hub = start().await;
    let alice = hub.user("alice").await;
    let (status, _) = hub.call(Some(&alice), M::GET, "/whoami", None).await;
    assert_eq!(status, StatusCode::OK);
    let id = alice.split(':').next().unwrap();
    let (status, _) = hub
        .call(Some(&hub.admin), M::DELETE, &format!("/keys/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = hub.call(Some(&alice), M::GET, "/whoami", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn releases_bump_the_desired_revision_and_deletes_refuse_dangling_references() {
    let hub = start().await;
    let (alice, _) = two_projects(&hub).await;
    // No build yet: pushing a release says what to do.
    let (status, body) = hub
        .call(
            Some(&alice),
            M::POST,
            "/projects/alpha/stages/dev/releases",
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "no-build");

    let manifest = "version: v1\ncomponents:\n  - name: web\n    docker:\n      image: registry.example/web:1\n";
    let build = json!({
        "branch": "main", "commit": "0123456789abcdef0123456789abcdef01234567",
        "manifest_file": "trellis.yaml", "manifest": manifest,
        "components": [{"name": "web", "artifact": {"kind": "image", "reference": "registry.example/web:1"}}]
    });
    let (status, body) = hub
        .call(
            Some(&alice),
            M::POST,
            "/projects/alpha/builds",
            Some(build.clone()),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["name"], "main_b1");

    let (status, body) = hub
        .call(
            Some(&alice),
            M::POST,
            "/projects/alpha/stages/dev/configs/settings/data",
            Some(json!({"env": {"GREETING": "hi"}, "files": {"app.toml": "x = 1\n"}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["version"], 1);

    let (status, r1) = hub
        .call(
            Some(&alice),
            M::POST,
            "/projects/alpha/stages/dev/releases",
            Some(json!({"config": "settings"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{r1}");
    assert_eq!(r1["number"], 1);
    assert_eq!(r1["revision"], 1);
    assert_eq!(r1["config"]["data"]["env"]["GREETING"], "hi");
    let (_, r2) = hub
        .call(
            Some(&alice),
            M::POST,
            "/projects/alpha/stages/dev/releases",
            Some(json!({"build": "main_b1"})),
        )
        .await;
    assert_eq!(r2["revision"], 2);
    let (_, stage) = hub
        .call(Some(&alice), M::GET, "/projects/alpha/stages/dev", None)
        .await;
    assert_eq!(stage["desired_revision"], 2);
    assert_eq!(stage["latest_release"], 2);

    // A config edit does not rewrite the release that froze it.
    hub.call(
        Some(&alice),
        M::POST,
        "/projects/alpha/stages/dev/configs/settings/data",
        Some(json!({"env": {"GREETING": "changed"}, "files": {}})),
    )
    .await;
    let (_, r1_again) = hub
        .call(
            Some(&alice),
            M::GET,
            "/projects/alpha/stages/dev/releases/1",
            None,
        )
        .await;
    assert_eq!(r1_again["config"]["data"]["env"]["GREETING"], "hi");

    // The build is referenced by releases; the stage and project hold things.
    let (status, body) = hub
        .call(
            Some(&alice),
            M::DELETE,
            "/projects/alpha/builds/main_b1",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "in-use");
    // Deleting a stage or a project archives it: kept, listed apart,
    // refusing changes, restorable.
    let (status, _) = hub
        .call(Some(&alice), M::DELETE, "/projects/alpha/stages/dev", None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, stage) = hub
        .call(Some(&alice), M::GET, "/projects/alpha/stages/dev", None)
        .await;
    assert!(stage["archived_at"].is_string(), "{stage}");
    let (_, live) = hub
        .call(Some(&alice), M::GET, "/projects/alpha/stages", None)
        .await;
    assert!(live.as_array().unwrap().iter().all(|s| s["name"] != "dev"));
    let (_, archived) = hub
        .call(
            Some(&alice),
            M::GET,
            "/projects/alpha/stages?archived=true",
            None,
        )
        .await;
    assert_eq!(archived[0]["name"], "dev", "{archived}");
    let (status, body) = hub
        .call(
            Some(&alice),
            M::POST,
            "/projects/alpha/stages/dev/releases",
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "archived");
    assert!(
        body["error"]["hint"]
            .as_str()
            .unwrap()
            .contains("trellis restore stage dev")
    );
    let (status, restored) = hub
        .call(
            Some(&alice),
            M::POST,
            "/projects/alpha/stages/dev/restore",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{restored}");
    assert!(restored.get("archived_at").is_none(), "{restored}");
    let (status, _) = hub
        .call(Some(&alice), M::DELETE, "/projects/alpha", None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, projects) = hub.call(Some(&alice), M::GET, "/projects", None).await;
    assert!(
        projects
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["name"] != "alpha")
    );
    let (_, archived) = hub
        .call(Some(&alice), M::GET, "/projects?archived=true", None)
        .await;
    assert_eq!(archived[0]["name"], "alpha", "{archived}");
    let (status, body) = hub
        .call(
            Some(&alice),
            M::POST,
            "/projects/alpha/stages/dev/restore",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["error"]["hint"]
            .as_str()
            .unwrap()
            .contains("trellis restore project alpha")
    );
    // Purged: gone for good.
    let (status, _) = hub
        .call(Some(&alice), M::DELETE, "/projects/alpha?purge=true", None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = hub
        .call(Some(&alice), M::GET, "/projects/alpha", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let hub = start().await;
    let (alice, _) = two_projects(&hub).await;
    let cases = [
        (
            M::POST,
            "/projects",
            json!({"name": "Bad_Name"}),
            "invalid-name",
        ),
        (
            M::POST,
            "/projects/alpha/stages",
            json!({"name": "x", "type": "staging"}),
            "",
        ),
        (
            M::POST,
            "/projects/alpha/builds",
            json!({"branch": "main", "commit": "nothex", "manifest_file": "trellis.yaml", "manifest": "", "components": []}),
            "invalid-build",
        ),
        (
            M::POST,
            "/projects/alpha/builds",
            json!({"branch": "main", "commit": "0123456789abcdef0123456789abcdef01234567", "manifest_file": "trellis.yaml", "manifest": "version: v1\ncomponents: [", "components": []}),
            "invalid-manifest",
        ),
        (
            M::POST,
            "/projects/alpha/stages/dev/configs/c/data",
            json!({"env": {"BAD KEY": "x"}, "files": {}}),
            "invalid-config-key",
        ),
        (
            M::POST,
            "/projects/alpha/stages/dev/configs/c/data",
            json!({"env": {}, "files": {"../etc/passwd": "x"}}),
            "invalid-file-name",
        ),
    ];
    for (method, path, body, code) in cases {
        let (status, resp) = hub
            .call(Some(&alice), method.clone(), path, Some(body))
            .await;
        assert!(status.is_client_error(), "{method} {path}: {status} {resp}");
        if !code.is_empty() {
            assert_eq!(resp["error"]["code"], code, "{path}: {resp}");
        }
    }
    let (_, builds) = hub
        .call(Some(&alice), M::GET, "/projects/alpha/builds", None)
        .await;
    assert_eq!(builds.as_array().unwrap().len(), 0);
    let (_, configs) = hub
        .call(
            Some(&alice),
            M::GET,
            "/projects/alpha/stages/dev/configs",
            None,
        )
        .await;
    assert_eq!(configs.as_array().unwrap().len(), 0);
    // Unknown endpoints answer in the same error shape.
    let (status, body) = hub.call(Some(&alice), M::GET, "/nope", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "no-such-endpoint");
}

#[tokio::test]
async fn the_openapi_document_describes_every_route() {
    let hub = start().await;
    let (status, doc) = hub.call(None, M::GET, "/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    let paths = doc["paths"].as_object().unwrap();
    for path in [
        "/projects",
        "/projects/{project}/stages/{stage}/releases",
        "/chunks/missing",
        "/chunks/{digest}",
        "/agent/chunks/{digest}",
        "/agent/artifacts/{index}/content",
        "/admin/collect-garbage",
        "/outposts",
        "/users",
    ] {
        assert!(
            paths.contains_key(path),
            "{path} missing from {:?}",
            paths.keys()
        );
    }
}
