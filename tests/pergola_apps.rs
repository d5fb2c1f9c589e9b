//! Apps written for the platform our users come from, run on an outpost
//! unchanged, end to end with the real binaries and a real container
//! engine — Podman and Docker Engine, each test once per engine:
//!
//! - a three-component app (a front, an API reached through
//!   `component-ref` and a `$(VAR)`-built URL, a store with a volume) from
//!   a `pergola.yaml`: the API's environment holds the expanded URLs, its
//!   shell argument the literal `$(date)` (which the shell then runs), the
//!   front reaches the API and the API the store, and the identity the API
//!   names, which an outpost cannot provide, is in the stage's status;
//! - a multi-architecture build (`platform: [{arch: amd64}, {arch:
//!   arm64}]`, images built `FROM scratch` with `COPY`, so no emulator is
//!   needed): an outpost that reports arm64 (`--arch arm64`, the agent's
//!   test setting) runs the arm64 image, a native one the amd64 image, and
//!   a later build without amd64 fails on the amd64 outpost with a clear
//!   message while what ran keeps running.
//!
//! Without the engine these tests are skipped — except in CI, where they
//! fail.

mod common;

use std::time::Duration;

use common::apps::{OnEngine, World, fetch, ids_of, wait_for};
use common::{Cli, git_commit, git_project};
use serde_json::Value;
use trellis_testkit::engines::{EngineKind, Object};

// === a three-component app ===

/// The app, as a platform user writes it: only `image` is ours (the test
/// image, as no registry is reachable).
/// The ports are the test's own: the outpost publishes every component's
/// ports on the host, and the tests of both engines run at once.
fn shop_manifest(image: &str, front_port: u16, api_port: u16, store_port: u16) -> String {
    format!(
        r#"# A shop: the front serves what the API gets from the store.
version: v1
components:
  - name: front
    docker:
      image: {image}
    ports: [{front_port}]
    ingresses:
      - host: shop
    env:
      - name: API_HOST
        component-ref: api
      - name: API_URL
        value: http://$(API_HOST):{api_port}
    command: ["sh", "-c"]
    args:
      - >-
        trap 'exit 0' TERM; mkdir -p /www; httpd -p {front_port} -h /www;
        while true; do wget -qO /www/next "$(API_URL)/from-store.txt" && mv /www/next /www/from-api.txt;
        sleep 0.3; done

  - name: api
    docker:
      image: {image}
    ports: [{api_port}]
    identity: shop-orders-reader
    env:
      - {{name: POSTGRES_USER, config-ref: db-user, value: app}}
      - {{name: POSTGRES_PASSWORD, config-ref: db-password}}
      - {{name: DB_HOST, component-ref: store}}
      - name: DATABASE_URL
        value: postgresql://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@$(DB_HOST):5432/app
      - name: STORE_URL
        value: "http://$(DB_HOST):{store_port}"
      - name: SELF
        component-ref: api
    command: ["sh", "-c"]
    args:
      - >-
        trap 'exit 0' TERM; mkdir -p /www; echo "started at $(date)" > /www/started.txt;
        httpd -p {api_port} -h /www;
        while true; do wget -qO /www/next "$STORE_URL/greeting.txt" && mv /www/next /www/from-store.txt;
        sleep 0.3; done

  - name: store
    docker:
      image: {image}
    ports: [{store_port}]
    env:
      - name: GREETING
        config-ref: greeting
    command: ["sh", "-c", "trap 'exit 0' TERM; echo \"$GREETING\" > /data/greeting.txt; echo boot >> /data/boots.txt; httpd -f -p {store_port} -h /data & wait"]
    storage:
      - name: data
        path: /data
        size: 1Gi
"#
    )
}

fn a_three_component_app_runs_unchanged(kind: EngineKind) {
    let Some(mut on) = OnEngine::new(kind) else {
        return;
    };
    let image = on.engine.busybox_image();
    let outpost = on.outpost("shop-edge");
    let (front_port, api_port, store_port) = (
        common::free_port(),
        common::free_port(),
        common::free_port(),
    );
    let mut w = World::new("shop");
    let app = w.tmp.path().join("app");
    git_project(
        &app,
        &[(
            "pergola.yaml",
            shop_manifest(image, front_port, api_port, store_port).as_str(),
        )],
    );
    let out = on.push_build(&w.cli, &app, "shop");
    assert!(out.status.success(), "{}", common::describe(&out));
    w.stage_on("shop", "prod", &outpost, &on.agent_args());
    w.cli.ok(&[
        "add",
        "config-data",
        "-p",
        "shop",
        "-s",
        "prod",
        "main",
        "--env",
        "db-password=s3cr3t",
        "--env",
        "greeting=hello from the store",
    ]);
    w.cli
        .ok(&["push", "release", "-p", "shop", "-s", "prod", "-c", "main"]);
    let status = w.running("shop", "prod", 1, 3);

    // The front reached the API, and the API the store, by the names their
    // component-refs gave and the URLs built from them.
    let page = format!("http://127.0.0.1:{front_port}/from-api.txt");
    let reached = wait_for(Duration::from_secs(30), || {
        fetch(&page).as_deref() == Some("hello from the store\n")
    });
    assert!(
        reached,
        "the front never served what the API got from the store: {:?}",
        fetch(&page)
    );

    // The API's environment holds the expanded URLs; its shell argument
    // the literal $(date), which the shell ran.
    let api_id = &ids_of(&status, "api")[0];
    let api = on.container(api_id);
    let env: Vec<&str> = api["Config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let store_url = format!("STORE_URL=http://store:{store_port}");
    for want in [
        "DATABASE_URL=postgresql://app:s3cr3t@store:5432/app",
        store_url.as_str(),
        "SELF=api",
        "DB_HOST=store",
    ] {
        assert!(env.contains(&want), "{want} not in the API's env: {env:?}");
    }
    let cmd = api["Config"]["Cmd"].to_string();
    assert!(
        cmd.contains("echo \\\"started at $(date)\\\""),
        "the shell argument lost its $(date): {cmd}"
    );
    let started = on.engine.exec(api_id, &["cat", "/www/started.txt"]);
    let started = String::from_utf8_lossy(&started.stdout);
    assert!(
        started.starts_with("started at ") && !started.contains("$("),
        "the shell did not run $(date): {started:?}"
    );

    // The store's data is on its volume, which outlives its container.
    let store_id = &ids_of(&status, "store")[0];
    let store = on.container(store_id);
    let mounts = store["Mounts"].to_string();
    assert!(
        mounts.contains("trellis-shop_prod_store_data"),
        "the store's /data is not its volume: {mounts}"
    );

    // The identity the API names is not silently ignored.
    let errors = status["errors"].as_array().unwrap();
    let identity = errors
        .iter()
        .find(|e| e["code"] == "identity-unavailable")
        .unwrap_or_else(|| panic!("no identity-unavailable in {status:#}"));
    assert_eq!(identity["source"], "agent");
    assert!(
        identity["message"]
            .as_str()
            .unwrap()
            .contains("shop-orders-reader"),
        "{identity:#}"
    );
}

#[test]
fn a_three_component_app_runs_unchanged_on_podman() {
    a_three_component_app_runs_unchanged(EngineKind::Podman);
}

#[test]
fn a_three_component_app_runs_unchanged_on_docker() {
    a_three_component_app_runs_unchanged(EngineKind::Docker);
}

// === a multi-architecture build ===

fn kiosk_manifest(port: u16, arches: &[&str]) -> String {
    let platform: Vec<String> = arches.iter().map(|a| format!("{{arch: {a}}}")).collect();
    format!(
        r#"version: v1
components:
  - name: kiosk
    docker:
      file: images/kiosk/Dockerfile
      build-context: images/kiosk
      platform: [{}]
    command: ["/bin/busybox", "httpd", "-f", "-p", "{port}", "-h", "/www"]
    ports: [{port}]
"#,
        platform.join(", ")
    )
}

/// The image id each architecture's image has in the newest build.
fn image_ids(cli: &Cli) -> Vec<(String, String)> {
    let builds = cli.json(&["list", "build", "-p", "kiosk"]);
    builds[0]["components"][0]["artifact"]["platforms"]
        .as_array()
        .unwrap_or_else(|| panic!("a build per architecture: {builds:#}"))
        .iter()
        .map(|p| {
            (
                p["arch"].as_str().unwrap().to_owned(),
                p["archive"]["image_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn each_outpost_runs_the_image_of_its_architecture(kind: EngineKind) {
    let Some(mut on) = OnEngine::new(kind) else {
        return;
    };
    let (arm_port, x86_port) = (common::free_port(), common::free_port());
    let arm = on.outpost("kiosk-arm");
    let x86 = on.outpost("kiosk-x86");
    let mut w = World::new("kiosk");
    let app = w.tmp.path().join("app");
    std::fs::create_dir_all(app.join("images/kiosk")).unwrap();
    std::fs::copy("/bin/busybox", app.join("images/kiosk/busybox"))
        .expect("busybox-static is installed");
    let dockerfile = "FROM scratch\nCOPY busybox /bin/busybox\nCOPY www /www\n";
    // Both outposts publish on this host, so the x86 stage's build
    // publishes on a port of its own.
    let manifest = kiosk_manifest;
    git_project(
        &app,
        &[
            ("images/kiosk/Dockerfile", dockerfile),
            ("images/kiosk/www/index.html", "kiosk v1\n"),
            ("pergola.yaml", &manifest(arm_port, &["amd64", "arm64"])),
        ],
    );
    let out = on.push_build(&w.cli, &app, "kiosk");
    assert!(out.status.success(), "{}", common::describe(&out));
    let built = image_ids(&w.cli);
    assert_eq!(
        built.iter().map(|(a, _)| a.as_str()).collect::<Vec<_>>(),
        ["amd64", "arm64"]
    );
    assert_ne!(built[0].1, built[1].1, "one image per architecture");
    let engine_arch = |image_id: &str| {
        on.engine
            .inspect(Object::Image, image_id)
            .map(|i| i["Architecture"].as_str().unwrap_or_default().to_owned())
    };
    assert_eq!(engine_arch(&built[1].1).as_deref(), Some("arm64"));

    // An outpost that reports arm64 runs the arm64 image.
    let mut arm_args = on.agent_args();
    arm_args.extend(["--arch".to_owned(), "arm64".to_owned()]);
    w.stage_on("kiosk", "arm", &arm, &arm_args);
    w.cli.ok(&["push", "release", "-p", "kiosk", "-s", "arm"]);
    let status = w.running("kiosk", "arm", 1, 1);
    let uri = w.cli.ok(&["get", "outpost-uri", &arm]).trim().to_owned();
    let validated = w.cli.json(&["validate", "outpost-uri", &uri]);
    let container = on.container(&ids_of(&status, "kiosk")[0]);
    let running_image = container["Image"].as_str().unwrap().to_owned();
    assert!(
        built[1]
            .1
            .ends_with(running_image.trim_start_matches("sha256:")),
        "the arm64 outpost runs {running_image}, not the arm64 image {}",
        built[1].1
    );
    let served = wait_for(Duration::from_secs(20), || {
        fetch(&format!("http://127.0.0.1:{arm_port}/index.html")).as_deref() == Some("kiosk v1\n")
    });
    assert!(served, "the arm64 image does not serve its page");
    assert_eq!(
        validated["agent"]["arch"], "arm64",
        "the description shows the outpost's architecture: {validated:#}"
    );

    // A native (amd64) outpost runs the amd64 image of a build for the
    // x86 stage's port.
    std::fs::write(
        app.join("pergola.yaml"),
        manifest(x86_port, &["amd64", "arm64"]),
    )
    .unwrap();
    git_commit(&app, "the x86 kiosk's port");
    let out = on.push_build(&w.cli, &app, "kiosk");
    assert!(out.status.success(), "{}", common::describe(&out));
    let built2 = image_ids(&w.cli);
    w.stage_on("kiosk", "x86", &x86, &on.agent_args());
    w.cli.ok(&["push", "release", "-p", "kiosk", "-s", "x86"]);
    let status = w.running("kiosk", "x86", 1, 1);
    let x86_container = ids_of(&status, "kiosk")[0].clone();
    let running_image = on.container(&x86_container)["Image"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        built2[0]
            .1
            .ends_with(running_image.trim_start_matches("sha256:")),
        "the amd64 outpost runs {running_image}, not the amd64 image {}",
        built2[0].1
    );

    // A build without amd64 fails on the amd64 outpost before anything
    // changes: the release is failed with the reason, the stage keeps
    // running what it ran.
    std::fs::write(
        app.join("images/kiosk/www/index.html"),
        "kiosk v2, arm only\n",
    )
    .unwrap();
    std::fs::write(app.join("pergola.yaml"), manifest(x86_port, &["arm64"])).unwrap();
    git_commit(&app, "arm only");
    let out = on.push_build(&w.cli, &app, "kiosk");
    assert!(out.status.success(), "{}", common::describe(&out));
    w.cli.ok(&["push", "release", "-p", "kiosk", "-s", "x86"]);
    let mut last = Value::Null;
    let failed = wait_for(Duration::from_secs(90), || {
        last = w.status("kiosk", "x86");
        last["sync"]["state"] == "failed"
    });
    assert!(
        failed,
        "the release without amd64 was not refused: {last:#}"
    );
    let message = last["sync"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("runs on arm64") && message.contains("this outpost is amd64"),
        "{message}"
    );
    assert_eq!(last["sync"]["applied_release"], 1, "{last:#}");
    assert_eq!(
        ids_of(&last, "kiosk"),
        std::slice::from_ref(&x86_container),
        "the running container was replaced"
    );
    assert_eq!(
        fetch(&format!("http://127.0.0.1:{x86_port}/index.html")).as_deref(),
        Some("kiosk v1\n")
    );
    let releases = w.cli.json(&["list", "release", "-p", "kiosk", "-s", "x86"]);
    let state_of = |n: u64| {
        releases
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["number"] == n)
            .map(|r| r["state"].as_str().unwrap().to_owned())
    };
    assert_eq!(state_of(2).as_deref(), Some("failed"), "{releases:#}");
    assert_eq!(state_of(1).as_deref(), Some("applied"), "{releases:#}");
}

#[test]
fn each_outpost_runs_the_image_of_its_architecture_on_podman() {
    each_outpost_runs_the_image_of_its_architecture(EngineKind::Podman);
}

#[test]
fn each_outpost_runs_the_image_of_its_architecture_on_docker() {
    each_outpost_runs_the_image_of_its_architecture(EngineKind::Docker);
}
