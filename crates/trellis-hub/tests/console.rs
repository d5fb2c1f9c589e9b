//! The console's pages over real HTTP, in process: sessions, the
//! same-origin rule, access, Outpost URI validation (fragment and form),
//! stage creation, the stage page and the live status stream. The browser
//! flow itself is tested in headless Chromium (`tests/console.rs` at the
//! workspace root).

mod common;

use chrono::Utc;
use common::{M, TestHub};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, COOKIE, LOCATION, ORIGIN, SET_COOKIE};
use serde_json::json;

/// A browser-like client of the console: no automatic redirects, a
/// session cookie once signed in.
struct Console {
    base: String,
    http: reqwest::Client,
    cookie: Option<String>,
}

impl Console {
    fn new(hub: &TestHub) -> Console {
        Console {
            base: hub.base.trim_end_matches("/api/v1").to_owned(),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            cookie: None,
        }
    }

    async fn signed_in(hub: &TestHub, key: &str) -> Console {
        let mut console = Console::new(hub);
        let response = console.post("/login", &[("key", key)]).await;
        assert_eq!(response.status(), StatusCode::SEE_OTHER);
        let cookie = response.headers()[SET_COOKIE].to_str().unwrap().to_owned();
        assert!(
            cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"),
            "{cookie}"
        );
        console.cookie = Some(cookie.split(';').next().unwrap().to_owned());
        console
    }

    fn request(&self, method: M, path: &str) -> reqwest::RequestBuilder {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(cookie) = &self.cookie {
            request = request.header(COOKIE, cookie);
        }
        request
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.request(M::GET, path).send().await.unwrap()
    }

    /// A form post as the console's own page sends it.
    async fn post(&self, path: &str, form: &[(&str, &str)]) -> reqwest::Response {
        self.request(M::POST, path)
            .header(ORIGIN, &self.base)
            .form(form)
            .send()
            .await
            .unwrap()
    }

    async fn page(&self, path: &str) -> (StatusCode, String) {
        let response = self.get(path).await;
        (response.status(), response.text().await.unwrap())
    }
}

fn location(response: &reqwest::Response) -> &str {
    response.headers()[LOCATION].to_str().unwrap()
}

#[tokio::test]
async fn pages_need_a_session_and_sign_in_takes_an_access_key() {
    let hub = common::start().await;
    let anonymous = Console::new(&hub);
    let response = anonymous.get("/projects/shop?x=1").await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&response), "/login?next=/projects/shop%3Fx%3D1");

    for bad in ["tk_0000000000000000:nope", "not a key", ""] {
        let response = anonymous.post("/login", &[("key", bad)]).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{bad:?}");
        let page = response.text().await.unwrap();
        assert!(page.contains("class=\"error\""), "{page}");
    }
    // After signing in the browser goes where it wanted, but only on this hub.
    let response = anonymous
        .post(
            "/login",
            &[("key", &hub.admin), ("next", "//evil.example/steal")],
        )
        .await;
    assert_eq!(location(&response), "/projects");

    let alice_key = hub.user("alice").await;
    let alice = Console::signed_in(&hub, &alice_key).await;
    let (status, page) = alice.page("/projects").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("alice"), "the page names who is signed in");

    // A tampered cookie is no session.
    let mut forged = Console::new(&hub);
    let cookie = alice.cookie.clone().unwrap();
    let (head, _mac) = cookie.rsplit_once('.').unwrap();
    forged.cookie = Some(format!("{head}.{}", "0".repeat(64)));
    assert_eq!(
        forged.get("/projects").await.status(),
        StatusCode::SEE_OTHER
    );

    // Deleting the key ends its sessions.
    let key_id = alice_key.split(':').next().unwrap();
    let (status, _) = hub
        .call(
            Some(&hub.admin),
            M::DELETE,
            &format!("/keys/{key_id}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(alice.get("/projects").await.status(), StatusCode::SEE_OTHER);

    // Signing out clears the cookie.
    let admin = Console::signed_in(&hub, &hub.admin).await;
    let response = admin.post("/logout", &[]).await;
    assert!(
        response.headers()[SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
}

#[tokio::test]
async fn changes_from_other_sites_are_refused() {
    let hub = common::start().await;
    let admin = Console::signed_in(&hub, &hub.admin).await;
    let foreign = admin
        .request(M::POST, "/projects")
        .header(ORIGIN, "https://evil.example")
        .form(&[("name", "evil")])
        .send()
        .await
        .unwrap();
    assert_eq!(foreign.status(), StatusCode::FORBIDDEN);
    assert!(foreign.text().await.unwrap().contains("cross-site-request"));
    let cross = admin
        .request(M::POST, "/projects")
        .header("sec-fetch-site", "cross-site")
        .form(&[("name", "evil")])
        .send()
        .await
        .unwrap();
    assert_eq!(cross.status(), StatusCode::FORBIDDEN);
    let (_, projects) = hub.call(Some(&hub.admin), M::GET, "/projects", None).await;
    assert_eq!(projects, json!([]), "nothing was created");

    let ours = admin.post("/projects", &[("name", "shop")]).await;
    assert_eq!(ours.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&ours), "/projects/shop");

    // A body that is not a form gets the error page.
    let json_body = admin
        .request(M::POST, "/projects")
        .header(ORIGIN, &admin.base)
        .json(&json!({"name": "shop2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(json_body.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(
        json_body
            .text()
            .await
            .unwrap()
            .contains("the form was not understood")
    );

    // Bad input gets the form back with the error, and loses nothing typed.
    let bad = admin
        .post(
            "/projects",
            &[("name", "Not A Name"), ("description", "kept")],
        )
        .await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let page = bad.text().await.unwrap();
    assert!(
        page.contains("class=\"error\"") && page.contains("value=\"kept\""),
        "{page}"
    );
}

#[tokio::test]
async fn members_see_only_their_projects_and_only_admins_see_outposts() {
    let hub = common::start().await;
    hub.call(
        Some(&hub.admin),
        M::POST,
        "/projects",
        Some(json!({"name": "shop"})),
    )
    .await;
    let alice = Console::signed_in(&hub, &hub.user("alice").await).await;
    let (status, page) = alice.page("/projects/shop").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(page.contains("data-code=\"not-found\""), "{page}");
    let (status, page) = alice.page("/projects").await;
    assert_eq!(status, StatusCode::OK);
    assert!(!page.contains("/projects/shop"), "{page}");
    assert!(
        !page.contains("href=\"/outposts\""),
        "no outposts link for members"
    );
    let (status, page) = alice.page("/outposts").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(page.contains("only administrators"), "{page}");
}

/// Project `shop`, outpost `edge` (labelled), its URI, and a console
/// signed in as the administrator.
async fn shop_and_edge(hub: &TestHub) -> (Console, String) {
    let admin = Some(hub.admin.as_str());
    hub.call(
        admin,
        M::POST,
        "/outposts",
        Some(
            json!({"name": "edge", "display_name": "Edge box", "labels": {"site": "plant-3"},
                    "ingress_domain": "plant3.example.net"}),
        ),
    )
    .await;
    hub.call(admin, M::POST, "/projects", Some(json!({"name": "shop"})))
        .await;
    let (_, uri) = hub.call(admin, M::GET, "/outposts/edge/uri", None).await;
    let console = Console::signed_in(hub, &hub.admin).await;
    (console, uri["uri"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn validation_answers_a_fragment_to_the_script_and_the_form_without_it() {
    let hub = common::start().await;
    let (console, uri) = shop_and_edge(&hub).await;
    let validate = |uri: String, fragment: bool| {
        let mut request = console
            .request(M::POST, "/projects/shop/stages/validate")
            .header(ORIGIN, &console.base)
            .form(&[("name", "line3"), ("outpost", "on"), ("outpost_uri", &uri)]);
        if fragment {
            request = request.header("x-trellis-fragment", "1");
        }
        async move {
            let response = request.send().await.unwrap();
            (response.status(), response.text().await.unwrap())
        }
    };

    let (status, fragment) = validate(uri.clone(), true).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!fragment.contains("<html"), "a fragment, not a page");
    for fact in [
        "data-valid=\"true\"",
        "Edge box",
        "site=plant-3",
        "awaiting-agent",
    ] {
        assert!(fragment.contains(fact), "{fact:?} missing:\n{fragment}");
    }
    let (status, fragment) = validate("trellis://nonsense".into(), true).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        fragment.contains("data-code=\"malformed-uri\""),
        "{fragment}"
    );
    assert!(fragment.contains("class=\"hint\""), "{fragment}");
    let rotated = uri.replace("key=", "key=A");
    let (status, fragment) = validate(rotated, true).await;
    assert!(status.is_client_error(), "{status}");
    assert!(fragment.contains("data-valid=\"false\""), "{fragment}");

    // Without the script: the whole form, the box ticked, what was typed
    // kept, and Create enabled because this URI validated.
    let (status, page) = validate(uri.clone(), false).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        page.contains("id=\"on-outpost\" name=\"outpost\" checked"),
        "{page}"
    );
    assert!(page.contains("value=\"line3\""));
    assert!(
        page.contains("id=\"create\">"),
        "Create is enabled:\n{page}"
    );
    let (_, page) = validate("trellis://nonsense".into(), false).await;
    assert!(page.contains("id=\"create\" disabled"), "{page}");

    // Create re-validates: a ticked box with no URI, then a good one.
    let response = console
        .post(
            "/projects/shop/stages",
            &[
                ("name", "line3"),
                ("type", "prod"),
                ("outpost", "on"),
                ("outpost_uri", ""),
            ],
        )
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("Outpost URI field is empty")
    );
    let response = console
        .post(
            "/projects/shop/stages",
            &[
                ("name", "line3"),
                ("type", "prod"),
                ("outpost", "on"),
                ("outpost_uri", &uri),
            ],
        )
        .await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&response), "/projects/shop/stages/line3");
    let (_, stage) = hub
        .call(
            Some(&hub.admin),
            M::GET,
            "/projects/shop/stages/line3",
            None,
        )
        .await;
    assert_eq!(stage["outpost"], "edge");
    assert_eq!(stage["type"], "prod");
}

#[tokio::test]
async fn the_stage_page_shows_history_and_outpost_stages_a_live_status() {
    let hub = common::start().await;
    let (console, uri) = shop_and_edge(&hub).await;
    for (name, outpost_uri) in [("line3", uri.as_str()), ("dev", "")] {
        let mut form = vec![("name", name), ("type", "dev")];
        if !outpost_uri.is_empty() {
            form.extend([("outpost", "on"), ("outpost_uri", outpost_uri)]);
        }
        let response = console.post("/projects/shop/stages", &form).await;
        assert_eq!(response.status(), StatusCode::SEE_OTHER);
    }
    let (status, body) = hub
        .call(
            Some(&hub.admin),
            M::POST,
            "/projects/shop/builds",
            Some(json!({
                "branch": "main", "commit": "0123456789abcdef0123456789abcdef01234567",
                "manifest_file": "trellis.yaml",
                "manifest": "version: v1\ncomponents:\n  - name: web\n    docker:\n      image: nginx:1\n    ports: [80]\n    ingresses:\n      - host: shop\n",
                "components": [{"name": "web", "artifact": {"kind": "image", "reference": "nginx:1"}}]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    for _ in 0..2 {
        let response = console
            .post(
                "/projects/shop/stages/line3/releases",
                &[("build", "main_b1")],
            )
            .await;
        assert_eq!(response.status(), StatusCode::SEE_OTHER);
        assert_eq!(location(&response), "/projects/shop/stages/line3#releases");
    }
    // The outpost went straight to revision 2: release 1 never ran.
    let store = hub.state.store();
    store
        .record_delivered("shop", "line3", 2, Utc::now())
        .await
        .unwrap();
    store
        .record_status(
            "shop",
            "line3",
            2,
            None,
            &json!({"state": "running", "components": [
                {"name": "web", "state": "running", "restarts": 3, "replicas": 1, "running": 1,
                 "urls": ["https://shop.line3.shop.localhost:8443/"]}]}),
            Utc::now(),
        )
        .await
        .unwrap();

    let (status, page) = console.page("/projects/shop/stages/line3").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        page.contains("data-release=\"1\" data-state=\"superseded\" class=\"superseded\""),
        "{page}"
    );
    assert!(
        page.contains("data-release=\"2\" data-state=\"applied\""),
        "{page}"
    );
    assert!(
        page.contains("id=\"connection-status\""),
        "outpost stages have the button"
    );
    assert!(page.contains("data-component=\"web\""));
    assert!(
        page.contains("<td>1/1</td>") && page.contains("<td>3</td>"),
        "{page}"
    );
    // The URL the outpost's entry point reported is a link.
    assert!(
        page.contains(
            "<a class=\"small\" href=\"https://shop.line3.shop.localhost:8443/\" rel=\"noopener\">"
        ),
        "{page}"
    );
    // The outpost's page says where its ingresses are reachable.
    let (_, page) = console.page("/outposts/edge").await;
    assert!(
        page.contains(
            "<code>&#60;host&#62;.&#60;stage&#62;.&#60;project&#62;.plant3.example.net</code>"
        ),
        "{page}"
    );
    let (_, page) = console.page("/projects/shop/stages/dev").await;
    assert!(
        !page.contains("id=\"connection-status\""),
        "the hub's own stages do not"
    );

    // The project page: every stage with its sync state and link badge.
    let (_, page) = console.page("/projects/shop").await;
    assert!(page.contains("data-stage=\"line3\""));
    assert!(
        page.contains("data-link-state=\"awaiting-agent\""),
        "{page}"
    );

    // The live stream starts with the popup's content.
    let mut events = console
        .get("/projects/shop/stages/line3/status/events")
        .await;
    assert_eq!(events.status(), StatusCode::OK);
    assert_eq!(events.headers()[CONTENT_TYPE], "text/event-stream");
    let mut first = String::new();
    while !first.contains("\n\n") {
        let chunk = events.chunk().await.unwrap().expect("an event");
        first.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(first.starts_with("data: "), "{first}");
    assert!(
        first.contains("data-link-state=\"awaiting-agent\""),
        "{first}"
    );
    assert!(first.contains("desired #2"), "{first}");
    let missing = console
        .get("/projects/shop/stages/nope/status/events")
        .await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn devices_show_in_the_description_and_on_the_stage_page() {
    let hub = common::start().await;
    let (console, uri) = shop_and_edge(&hub).await;
    // What the agent of `edge` said at hello (as the link session stores
    // it): a camera offered to every project, exclusive, and a serial port
    // granted to another project only.
    let store = hub.state.store();
    store
        .record_link_activity(&[trellis_store::LinkActivity {
            outpost: "edge".into(),
            seen: Utc::now(),
            hello: Some(trellis_store::LinkHello {
                agent: json!({
                    "version": "0.1.0", "os": "linux", "arch": "amd64", "runtimes": [],
                    "capacity": {"cpus": 2, "memory_bytes": 1, "disk_free_bytes": 1},
                    "devices": [
                        {"name": "camera", "kind": "device", "path": "/dev/video0",
                         "access": "rw", "exclusive": true},
                        {"name": "plc", "kind": "device", "path": "/dev/ttyUSB0",
                         "access": "rw", "projects": ["yard"]},
                        {"name": "gpu", "kind": "gpu", "cdi": ["nvidia.com/gpu=all"]}
                    ]
                }),
                cert_serial: "01".into(),
                cert_not_after: Utc::now(),
            }),
            disconnect: None,
        }])
        .await
        .unwrap();

    let response = console
        .request(M::POST, "/projects/shop/stages/validate")
        .header(ORIGIN, &console.base)
        .header("x-trellis-fragment", "1")
        .form(&[("name", "line3"), ("outpost", "on"), ("outpost_uri", &uri)])
        .send()
        .await
        .unwrap();
    let fragment = response.text().await.unwrap();
    for fact in [
        "camera (/dev/video0, rw, exclusive)",
        "plc (/dev/ttyUSB0, rw, not granted to this project)",
        "gpu (nvidia.com/gpu=all)",
    ] {
        assert!(fragment.contains(fact), "{fact:?} missing:\n{fragment}");
    }
    assert!(
        !fragment.contains("yard"),
        "another project named: {fragment}"
    );

    // The stage page: what each component holds, as the outpost reports
    // it, and what its manifest asks for until then.
    let response = console
        .post(
            "/projects/shop/stages",
            &[
                ("name", "line3"),
                ("type", "prod"),
                ("outpost", "on"),
                ("outpost_uri", &uri),
            ],
        )
        .await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let manifest = "version: v1\ncomponents:\n  - name: inspect\n    docker:\n      image: vision:1\n    devices: [{name: camera}, {name: gpu}]\n  - name: report\n    docker:\n      image: report:1\n";
    let (status, body) = hub
        .call(
            Some(&hub.admin),
            M::POST,
            "/projects/shop/builds",
            Some(json!({
                "branch": "main", "commit": "0123456789abcdef0123456789abcdef01234567",
                "manifest_file": "trellis.yaml", "manifest": manifest,
                "components": [
                    {"name": "inspect", "artifact": {"kind": "image", "reference": "vision:1"}},
                    {"name": "report", "artifact": {"kind": "image", "reference": "report:1"}}]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let response = console
        .post(
            "/projects/shop/stages/line3/releases",
            &[("build", "main_b1")],
        )
        .await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let (_, page) = console.page("/projects/shop/stages/line3").await;
    assert!(
        page.contains("data-devices=\"asked\"")
            && page.contains("devices: <code>camera</code>, <code>gpu</code>"),
        "{page}"
    );
    store
        .record_status(
            "shop",
            "line3",
            1,
            None,
            &json!({"state": "running", "components": [
                {"name": "inspect", "state": "running", "restarts": 0, "replicas": 1, "running": 1,
                 "devices": ["camera", "gpu"]},
                {"name": "report", "state": "running", "restarts": 0, "replicas": 1, "running": 1}]}),
            Utc::now(),
        )
        .await
        .unwrap();
    let (_, page) = console.page("/projects/shop/stages/line3").await;
    assert!(page.contains("data-devices=\"held\""), "{page}");
    let report_row = page
        .split("data-component=\"report\"")
        .nth(1)
        .and_then(|rest| rest.split("</tr>").next())
        .unwrap();
    assert!(!report_row.contains("devices:"), "{report_row}");
}

/// The stage list filters by outpost labels (a malformed selector is shown,
/// not applied); a rollout's page shows its waves and stages, and its
/// buttons pause and abort it.
#[tokio::test]
async fn the_stage_list_filters_by_labels_and_a_rollout_has_its_page() {
    let hub = common::start().await;
    let admin = Some(hub.admin.as_str());
    hub.call(admin, M::POST, "/projects", Some(json!({"name": "shop"})))
        .await;
    for (outpost, site) in [("edge-a", "munich"), ("edge-b", "hamburg")] {
        hub.call(
            admin,
            M::POST,
            "/outposts",
            Some(json!({"name": outpost, "labels": {"site": site}})),
        )
        .await;
        let (_, uri) = hub
            .call(admin, M::GET, &format!("/outposts/{outpost}/uri"), None)
            .await;
        let (status, body) = hub
            .call(
                admin,
                M::POST,
                "/projects/shop/stages",
                Some(json!({"name": format!("line-{site}"), "type": "prod", "outpost_uri": uri["uri"]})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let console = Console::signed_in(&hub, &hub.admin).await;
    let (status, page) = console.page("/projects/shop?selector=site%3Dmunich").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("data-stage=\"line-munich\""), "{page}");
    assert!(!page.contains("data-stage=\"line-hamburg\""), "{page}");
    let (_, page) = console.page("/projects/shop?selector=site+in+munich").await;
    assert!(page.contains("id=\"selector-error\""), "{page}");
    assert!(page.contains("at character 9"), "{page}");
    assert!(
        page.contains("data-stage=\"line-hamburg\""),
        "unfiltered: {page}"
    );

    // A rollout over both (their outposts have no agent: carried along).
    let build = json!({"branch": "main", "commit": "0123456789abcdef0123456789abcdef01234567",
        "manifest_file": "trellis.yaml",
        "manifest": "version: v1\ncomponents:\n  - name: web\n    docker:\n      image: web:1\n",
        "components": [{"name": "web", "artifact": {"kind": "image", "reference": "web:1"}}]});
    let (status, body) = hub
        .call(admin, M::POST, "/projects/shop/builds", Some(build))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, rollout) = hub
        .call(
            admin,
            M::POST,
            "/projects/shop/rollouts",
            Some(
                json!({"build": "main_b1", "selector": "site", "waves": "1,100%", "manual": true}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{rollout}");
    let id = rollout["id"].as_u64().unwrap();
    let (_, page) = console.page("/projects/shop").await;
    assert!(page.contains(&format!("href=\"/rollouts/{id}\"")), "{page}");
    let (status, page) = console.page(&format!("/rollouts/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("id=\"waves\""), "{page}");
    assert!(page.contains("data-stage=\"line-munich\""), "{page}");
    assert!(page.contains("data-rollout-state=\"running\""), "{page}");
    let response = console.post(&format!("/rollouts/{id}/pause"), &[]).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let (_, page) = console.page(&format!("/rollouts/{id}")).await;
    assert!(page.contains("data-rollout-state=\"paused\""), "{page}");
    let response = console.post(&format!("/rollouts/{id}/abort"), &[]).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let (_, page) = console.page(&format!("/rollouts/{id}")).await;
    assert!(page.contains("data-rollout-state=\"aborted\""), "{page}");
    // Another's rollout page is not found for outsiders.
    let bob = Console::signed_in(&hub, &hub.user("bob").await).await;
    assert_eq!(
        bob.get(&format!("/rollouts/{id}")).await.status(),
        StatusCode::NOT_FOUND
    );
}

/// The outposts list and an outpost's page show its agent's version and
/// latest update as the agent reports it; the page shows the link profile
/// and changes it (the linked agent is told), and a refused change shows
/// the error with what was typed and changes nothing.
#[tokio::test]
async fn outposts_show_agent_updates_and_change_link_profiles() {
    use trellis_link::Message;
    use trellis_link::protocol::{FEATURE_AGENT_UPDATE, FEATURE_LINK_PROFILE};
    let hub = common::start().await;
    let admin = Some(hub.admin.as_str());
    let (console, _) = shop_and_edge(&hub).await;
    let mut agent = common::ScriptedAgent::connect_as(
        &hub,
        &[],
        "0.1.0",
        &[FEATURE_AGENT_UPDATE, FEATURE_LINK_PROFILE],
    )
    .await;
    let (_, page) = console.page("/outposts").await;
    assert!(page.contains("<td class=\"agent\">0.1.0</td>"), "{page}");

    hub.put_agent_binary("0.2.0").await;
    let (status, body) = hub
        .call(
            admin,
            M::POST,
            "/agent-updates",
            Some(json!({"outposts": ["edge"], "version": "0.2.0"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = agent
        .next_such(|m| match m {
            Message::AgentUpdate { id, .. } => Some(id),
            _ => None,
        })
        .await;

    // The agent's reports show as they are stored.
    for (state, message, shown) in [
        ("fetching", "", "0.2.0 fetching"),
        (
            "failed",
            "rolled back: the new agent did not link within 120 s",
            "0.2.0 failed: rolled back: the new agent did not link within 120 s",
        ),
    ] {
        agent.report_update(id, state, message).await;
        let mut stored = false;
        for _ in 0..100 {
            let (_, agents) = hub.call(admin, M::GET, "/agent-updates", None).await;
            if agents[0]["update"]["state"] == state {
                stored = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(stored, "the {state} report was not stored");
        let (_, list) = console.page("/outposts").await;
        assert!(
            list.contains(&format!("data-agent-update>{shown}</span>")),
            "{list}"
        );
        let (_, page) = console.page("/outposts/edge").await;
        assert!(
            page.contains(&format!("data-agent-update>{shown}</span> from 0.1.0")),
            "{page}"
        );
    }
    let (_, page) = console.page("/outposts/edge").await;
    assert!(page.contains("badge bad\" data-agent-update"), "{page}");

    // The link profile: the hub's defaults, then a refused change.
    assert!(
        page.contains("(the hub&#39;s default)") || page.contains("(the hub's default)"),
        "{page}"
    );
    assert!(
        page.contains("<dd data-windows>always (UTC)</dd>"),
        "{page}"
    );
    let refused = console
        .post(
            "/outposts/edge/link-profile",
            &[("windows", "mon-fri 25:00-06:00"), ("heartbeat", "5m")],
        )
        .await;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    let page = refused.text().await.unwrap();
    assert!(page.contains("data-code=\"invalid-window\""), "{page}");
    assert!(page.contains("value=\"mon-fri 25:00-06:00\""), "{page}");
    let (_, profile) = hub
        .call(admin, M::GET, "/outposts/edge/link-profile", None)
        .await;
    assert_eq!(profile["windows"], "always", "nothing changed: {profile}");
    assert_eq!(
        profile["heartbeat_default"], true,
        "nothing changed: {profile}"
    );

    // A change: stored, shown, and the linked agent takes the heartbeat.
    let changed = console
        .post(
            "/outposts/edge/link-profile",
            &[
                ("heartbeat", "5m"),
                ("bandwidth", "1MiB/s"),
                ("windows", "mon-fri 22:00-06:00"),
                ("timezone", "Europe/Berlin"),
            ],
        )
        .await;
    assert_eq!(changed.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&changed), "/outposts/edge#link-profile");
    let (_, profile) = hub
        .call(admin, M::GET, "/outposts/edge/link-profile", None)
        .await;
    assert_eq!(profile["heartbeat_secs"], 300, "{profile}");
    assert_eq!(profile["bandwidth_bytes_per_sec"], 1 << 20, "{profile}");
    assert_eq!(profile["timezone"], "Europe/Berlin", "{profile}");
    let heartbeat = agent
        .next_such(|m| match m {
            Message::LinkProfile { heartbeat_secs, .. } => Some(heartbeat_secs),
            _ => None,
        })
        .await;
    assert_eq!(heartbeat, 300);
    let (_, page) = console.page("/outposts/edge").await;
    assert!(page.contains("<dd data-heartbeat>300 s</dd>"), "{page}");
    let windows = profile["windows"].as_str().unwrap();
    assert!(
        page.contains(&format!(
            "<dd data-windows>{windows} (Europe&#x2f;Berlin)</dd>"
        )) || page.contains(&format!("<dd data-windows>{windows} (Europe/Berlin)</dd>")),
        "{page}"
    );
    // The form leaves empty fields as they are.
    let kept = console
        .post("/outposts/edge/link-profile", &[("bandwidth", "none")])
        .await;
    assert_eq!(kept.status(), StatusCode::SEE_OTHER);
    let (_, profile) = hub
        .call(admin, M::GET, "/outposts/edge/link-profile", None)
        .await;
    assert_eq!(profile["heartbeat_secs"], 300, "{profile}");
    assert!(
        profile.get("bandwidth_bytes_per_sec").is_none(),
        "{profile}"
    );
}
