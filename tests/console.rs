//! The console in real headless Chromium, against a real hub and a real
//! Outpost Agent (both the `trellis` binary): sign in, create a project,
//! register an outpost, place a stage on it through the checkbox / Outpost
//! URI / Validate / Create flow, push a release, and watch the connection
//! status popup go `in-sync` and then `offline` when the agent is killed —
//! without reloading the page.
//!
//! Screenshots of the form after validation and of the popup (online and
//! offline) are saved to `target/tmp/console-screenshots/`; the test prints
//! the folder.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{AgentProcess, Cli, HubProcess, git_project};
use trellis_testkit::browser::{Browser, Client, Element, Locator, announce};

const MANIFEST: &str = "version: v1
components:
  - name: bridge
    process:
      path: ./bin
      command: [\"sh\", \"./bridge.sh\"]
";

const WAIT: Duration = Duration::from_secs(30);

fn screenshot_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots")
}

async fn text(client: &Client, css: &str) -> String {
    client
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no element {css:?} on the page: {e}"))
        .text()
        .await
        .unwrap()
}

async fn try_text(client: &Client, css: &str) -> Option<String> {
    client.find(Locator::Css(css)).await.ok()?.text().await.ok()
}

async fn is_enabled(client: &Client, css: &str) -> bool {
    client
        .find(Locator::Css(css))
        .await
        .unwrap()
        .is_enabled()
        .await
        .unwrap()
}

async fn fill(client: &Client, css: &str, value: &str) {
    let field = client.find(Locator::Css(css)).await.unwrap();
    field.clear().await.unwrap();
    field.send_keys(value).await.unwrap();
}

async fn click(client: &Client, css: &str) {
    client
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no element {css:?} to click: {e}"))
        .click()
        .await
        .unwrap();
}

async fn path(client: &Client) -> String {
    client.current_url().await.unwrap().path().to_owned()
}

/// Waits for the browser to arrive at `want` (a click that submits a form
/// returns before the next page loads); on a timeout, says what the page
/// showed instead.
async fn wait_path(client: &Client, want: &str) {
    let started = std::time::Instant::now();
    while path(client).await != want {
        if started.elapsed() > WAIT {
            let shown = try_text(client, "main").await.unwrap_or_default();
            panic!(
                "the browser is at {} instead of {want}; the page says:\n{shown}",
                path(client).await
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The element, once it is on the page.
async fn element(client: &Client, css: &str) -> Element {
    client
        .wait()
        .at_most(WAIT)
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no element {css:?} on the page within {WAIT:?}: {e}"))
}

async fn sign_in(client: &Client, hub: &HubProcess) {
    client
        .goto(&format!("{}/projects", hub.endpoint))
        .await
        .unwrap();
    wait_path(client, "/login").await;
    fill(client, "#key", "tk_0000000000000000:wrong").await;
    click(client, "form[action='/login'] button[type=submit]").await;
    let refused = element(client, ".error").await.text().await.unwrap();
    assert!(refused.contains("not valid"), "{refused}");
    fill(client, "#key", &hub.admin_key()).await;
    click(client, "form[action='/login'] button[type=submit]").await;
    wait_path(client, "/projects").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outpost_stage_is_created_validated_released_and_monitored_in_the_browser() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let client = browser.client.clone();
    let tmp = tempfile::tempdir().unwrap();
    let hub = HubProcess::start(&tmp.path().join("hub"));
    let cli = Cli::for_hub(&hub, &hub.admin_key(), &tmp.path().join("config"));
    let shots = screenshot_dir();
    announce(&format!(
        "console screenshots are saved in {}",
        shots.display()
    ));

    sign_in(&client, &hub).await;

    // A project, through the form.
    fill(&client, "#project-name", "plant").await;
    fill(&client, "#project-description", "Line 7 controllers").await;
    click(&client, "form[action='/projects'] button[type=submit]").await;
    wait_path(&client, "/projects/plant").await;

    // A build to release (builds come from `trellis push build`).
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
    let out = cli.run_in(&app, &["push", "build", "-p", "plant"]);
    assert!(out.status.success(), "{}", common::describe(&out));

    // An outpost, registered by the administrator in the console; its join
    // command starts a real agent.
    client
        .goto(&format!("{}/outposts", hub.endpoint))
        .await
        .unwrap();
    fill(&client, "#outpost-name", "line-7").await;
    fill(&client, "#outpost-display", "Line 7 controller").await;
    fill(&client, "#outpost-description", "Next to the bottling line").await;
    fill(&client, "#outpost-labels", "site=plant-3, line=7").await;
    click(&client, "form[action='/outposts'] button[type=submit]").await;
    let join = element(&client, "#join-command")
        .await
        .prop("value")
        .await
        .unwrap()
        .unwrap();
    let uri = client
        .find(Locator::Css("#outpost-uri-value"))
        .await
        .unwrap()
        .prop("value")
        .await
        .unwrap()
        .unwrap();
    assert!(uri.starts_with("trellis://"), "{uri}");
    let agent = AgentProcess::join(&join, &tmp.path().join("agent"));

    // Create stage: the checkbox reveals the URI field; Create waits for a
    // successful validation.
    client
        .goto(&format!("{}/projects/plant", hub.endpoint))
        .await
        .unwrap();
    click(&client, "#new-stage").await;
    element(&client, "#stage-form").await;
    fill(&client, "#stage-name", "line").await;
    fill(&client, "#stage-display", "Bottling line").await;
    assert!(
        !client
            .find(Locator::Css("#outpost-uri"))
            .await
            .unwrap()
            .is_displayed()
            .await
            .unwrap(),
        "the URI field is hidden until the box is ticked"
    );
    assert!(is_enabled(&client, "#create").await);
    let checkbox_label = text(&client, "label.check").await;
    assert!(
        checkbox_label.contains("THIS STAGE IS AN OUTPOST"),
        "{checkbox_label}"
    );
    click(&client, "#on-outpost").await;
    assert!(
        !is_enabled(&client, "#create").await,
        "disabled before validation"
    );

    // A bad URI: its error and hint, and Create stays disabled.
    fill(&client, "#outpost-uri", "trellis://nonsense").await;
    click(&client, "#validate").await;
    browser
        .wait("the validation error", WAIT, |c| async move {
            try_text(&c, "#validation .validation.error .hint").await
        })
        .await;
    let error = client
        .find(Locator::Css("#validation .validation.error"))
        .await
        .unwrap();
    assert_eq!(
        error.attr("data-code").await.unwrap().as_deref(),
        Some("malformed-uri")
    );
    assert!(!text(&client, "#validation .message").await.is_empty());
    assert!(
        text(&client, "#validation .hint")
            .await
            .contains("copy the whole URI")
    );
    assert!(!is_enabled(&client, "#create").await);

    // The right URI: the outpost's description, and Create enabled.
    fill(&client, "#outpost-uri", &uri).await;
    assert!(!is_enabled(&client, "#create").await, "not validated yet");
    click(&client, "#validate").await;
    let description = browser
        .wait("the outpost's description", WAIT, |c| async move {
            try_text(&c, "#validation .validation.ok").await
        })
        .await;
    for fact in [
        "Line 7 controller",
        "line-7",
        "Next to the bottling line",
        "line=7, site=plant-3",
    ] {
        assert!(
            description.contains(fact),
            "{fact:?} missing from:\n{description}"
        );
    }
    assert!(
        is_enabled(&client, "#create").await,
        "enabled after validation"
    );
    let shot = browser.screenshot(&shots, "create-stage-validated").await;
    announce(&format!("saved {}", shot.display()));

    // Editing the URI disables Create again, until it is validated again.
    client
        .find(Locator::Css("#outpost-uri"))
        .await
        .unwrap()
        .send_keys("x")
        .await
        .unwrap();
    assert!(
        !is_enabled(&client, "#create").await,
        "disabled after an edit"
    );
    fill(&client, "#outpost-uri", &uri).await;
    click(&client, "#validate").await;
    browser
        .wait("Create enabled again", WAIT, |c| async move {
            is_enabled(&c, "#create").await.then_some(())
        })
        .await;
    click(&client, "#create").await;
    wait_path(&client, "/projects/plant/stages/line").await;

    // Push a release from the build.
    click(&client, "#push-release").await;
    browser
        .wait("release 1 in the history", WAIT, |c| async move {
            try_text(&c, "#release-history tr[data-release='1']").await
        })
        .await;

    // The connection status popup: focus moves in, it goes in-sync live.
    client
        .execute("window.notReloaded = true;", vec![])
        .await
        .unwrap();
    click(&client, "#connection-status").await;
    let open = client
        .execute(
            "return document.getElementById('status-dialog').open",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(open, serde_json::json!(true));
    let focus_inside = client
        .execute(
            "return document.getElementById('status-dialog').contains(document.activeElement)",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        focus_inside,
        serde_json::json!(true),
        "focus moved into the popup"
    );
    browser
        .wait(
            "the popup to say online and in-sync",
            WAIT,
            |c| async move {
                let link = try_text(&c, "#status-dialog #status-link").await?;
                let sync = try_text(&c, "#status-dialog #status-sync").await?;
                (link == "online" && sync == "in-sync").then_some(())
            },
        )
        .await;
    let body = text(&client, "#status-dialog .status-body").await;
    for field in [
        "Last seen",
        "Round trip",
        "Agent version",
        "desired 1",
        "applied #1",
        "Errors",
    ] {
        assert!(body.contains(field), "{field:?} missing from:\n{body}");
    }
    let shot = browser.screenshot(&shots, "status-online").await;
    announce(&format!("saved {}", shot.display()));

    // The agent dies: the open popup turns offline by itself.
    agent.kill9();
    browser
        .wait("the popup to say offline", WAIT, |c| async move {
            (try_text(&c, "#status-dialog #status-link").await? == "offline").then_some(())
        })
        .await;
    let still = client
        .execute("return window.notReloaded === true", vec![])
        .await
        .unwrap();
    assert_eq!(still, serde_json::json!(true), "the page was not reloaded");
    let body = text(&client, "#status-dialog .status-body").await;
    assert!(
        body.contains("the connection to the agent broke"),
        "the popup says why the link went down:\n{body}"
    );
    assert!(
        !body.contains("link-protocol-error"),
        "a killed agent is an outage, not a protocol error:\n{body}"
    );
    assert_eq!(
        text(&client, "#status-dialog #status-sync").await,
        "in-sync (last known)",
        "what the agent confirmed is no longer shown as current"
    );
    assert_eq!(
        text(&client, "#connection-status .badge").await,
        "offline",
        "the button's badge follows"
    );
    let shot = browser.screenshot(&shots, "status-offline").await;
    announce(&format!("saved {}", shot.display()));

    // Escape closes it and gives focus back to the button.
    client
        .active_element()
        .await
        .unwrap()
        .send_keys("\u{e00c}")
        .await
        .unwrap();
    let closed = client
        .execute(
            "const d = document.getElementById('status-dialog'); \
             return !d.open && document.activeElement.id === 'connection-status'",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(closed, serde_json::json!(true), "Escape closed the popup");

    // The page behind kept itself current: the component the agent reported
    // running and the release it applied, without a reload.
    browser
        .wait("the live components table", WAIT, |c| async move {
            let row = try_text(&c, "tr[data-component='bridge']").await?;
            row.contains("running").then_some(())
        })
        .await;
    assert_eq!(text(&client, "#running-release").await, "#1");
    let still = client
        .execute("return window.notReloaded === true", vec![])
        .await
        .unwrap();
    assert_eq!(still, serde_json::json!(true), "the page was not reloaded");

    // The project page shows the stage with its link badge.
    client
        .goto(&format!("{}/projects/plant", hub.endpoint))
        .await
        .unwrap();
    let row = text(&client, "tr[data-stage='line']").await;
    assert!(row.contains("line-7") && row.contains("offline"), "{row}");

    // On a phone-sized screen the pages fit the width (wide tables scroll
    // inside their own box).
    client.set_window_size(390, 844).await.unwrap();
    for (page, shot) in [
        ("/projects/plant/stages/line", "stage-phone"),
        ("/projects/plant/stages/new", "create-stage-phone"),
    ] {
        client
            .goto(&format!("{}{page}", hub.endpoint))
            .await
            .unwrap();
        let fits = client
            .execute(
                "return document.documentElement.scrollWidth <= window.innerWidth",
                vec![],
            )
            .await
            .unwrap();
        let wide = client
            .execute(
                "return [window.innerWidth, document.documentElement.scrollWidth, ...[...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > window.innerWidth + 1).slice(0, 8).map(e => e.tagName + '#' + e.id + '.' + e.className + ':' + Math.round(e.getBoundingClientRect().right))]",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(
            fits,
            serde_json::json!(true),
            "{page} is wider than a phone: {wide}"
        );
        let saved = browser.screenshot(&shots, shot).await;
        announce(&format!("saved {}", saved.display()));
    }

    browser.close().await;
}

/// The stage page's terminal: a shell in a container component (Podman
/// through the test kit) in xterm.js, over the hub's WebSocket and a stream
/// on the outpost's link; what is typed runs and its output shows; the
/// open is in the project's audit log as a terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_on_the_stage_page_runs_what_is_typed() {
    let Some(mut on) = common::apps::OnEngine::new(trellis_testkit::engines::EngineKind::Podman)
    else {
        assert!(
            std::env::var_os("CI").is_none(),
            "Podman is not installed; CI must run this test"
        );
        eprintln!("skipped: Podman is not installed (CI would fail here)");
        return;
    };
    let Some(browser) = Browser::start().await else {
        return;
    };
    let client = browser.client.clone();
    let image = on.engine.busybox_image();
    let outpost = on.outpost("term-edge");
    let mut w = common::apps::World::new("term");
    let app = w.tmp.path().join("app");
    let manifest = format!(
        "version: v1
components:
  - name: app
    docker:
      image: {image}
    command: [\"sh\", \"-c\", \"trap 'exit 0' TERM; while true; do sleep 1; done\"]
"
    );
    git_project(&app, &[("trellis.yaml", manifest.as_str())]);
    let out = on.push_build(&w.cli, &app, "term");
    assert!(out.status.success(), "{}", common::describe(&out));
    w.stage_on("term", "dev", &outpost, &on.agent_args());
    w.cli.ok(&["push", "release", "-p", "term", "-s", "dev"]);
    w.running("term", "dev", 1, 1);

    sign_in(&client, &w.hub).await;
    client
        .goto(&format!("{}/projects/term/stages/dev", w.hub.endpoint))
        .await
        .unwrap();
    click(&client, "tr[data-component='app'] a[data-terminal]").await;
    wait_path(&client, "/projects/term/stages/dev/components/app/terminal").await;
    browser
        .wait("the terminal to connect", WAIT, |c| async move {
            try_text(&c, "#terminal-state")
                .await
                .filter(|t| t == "Connected.")
        })
        .await;
    let input = element(&client, ".xterm-helper-textarea").await;
    input
        .send_keys("echo typed-$((6*7))\u{E007}")
        .await
        .unwrap();
    let shown = browser
        .wait(
            "the command's output in the terminal",
            WAIT,
            |c| async move {
                try_text(&c, ".xterm-rows")
                    .await
                    .filter(|t| t.contains("typed-42"))
            },
        )
        .await;
    announce(&format!("the terminal shows: {shown:?}"));
    browser.screenshot(&screenshot_dir(), "terminal").await;
    input.send_keys("exit 3\u{E007}").await.unwrap();
    browser
        .wait("the shell's end", WAIT, |c| async move {
            try_text(&c, "#terminal-state")
                .await
                .filter(|t| t.contains("exited with code 3"))
        })
        .await;

    let audit = w.cli.json(&["list", "audit", "-p", "term"]);
    let entries = audit.as_array().unwrap();
    assert!(
        entries.iter().any(|e| e["action"] == "terminal"
            && e["component"] == "app"
            && e["result"] == "opened"),
        "{audit:#}"
    );
    browser.close().await;
}
