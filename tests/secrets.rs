//! Access-key secrets never reach the hub's database: only argon2 hashes do.

mod common;

use common::{Cli, HubProcess, describe};

#[test]
fn the_database_holds_no_access_key_secret() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("hub");
    let hub = HubProcess::start(&data);
    let admin = hub.admin_key();
    let cli = Cli::for_hub(&hub, &admin, &tmp.path().join("config"));
    let mut secrets = vec![admin.split_once(':').unwrap().1.to_owned()];
    for user in ["alice", "bob"] {
        let out = cli.ok(&["create", "user", user]);
        let key = out.lines().last().unwrap().trim().to_owned();
        secrets.push(key.split_once(':').unwrap().1.to_owned());
        // Use the key so any caching path runs too.
        let user_cli = Cli::for_hub(&hub, &key, &tmp.path().join("config"));
        user_cli.ok(&["whoami"]);
    }
    let out = cli.ok(&["create", "key", "--user", "alice", "--description", "ci"]);
    secrets.push(
        out.lines()
            .last()
            .unwrap()
            .split_once(':')
            .unwrap()
            .1
            .trim()
            .to_owned(),
    );
    assert_eq!(secrets.len(), 4);
    for s in &secrets {
        assert_eq!(s.len(), 64, "secrets are 256-bit hex: {s}");
    }
    // Stop the hub hard, then read every file of the database (main file,
    // WAL and shared memory) as raw bytes.
    hub.kill9();
    let mut scanned = 0;
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("hub.db") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        scanned += bytes.len();
        let text = String::from_utf8_lossy(&bytes);
        for s in &secrets {
            assert!(
                !text.contains(s.as_str()),
                "{name} contains an access-key secret"
            );
        }
    }
    assert!(scanned > 0, "found no database file in {}", data.display());
    // The key ids are there (so the scan looked at the right data), and
    // their hashes are argon2id.
    let mut all = Vec::new();
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("hub.db")
        {
            all.extend(std::fs::read(&path).unwrap());
        }
    }
    let all = String::from_utf8_lossy(&all);
    assert!(
        all.contains(admin.split_once(':').unwrap().0),
        "the admin key id should be stored"
    );
    assert!(all.contains("$argon2id$"), "key hashes should be argon2id");
}

#[test]
fn the_admin_key_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("hub");
    let hub = HubProcess::start(&data);
    let mode = std::fs::metadata(data.join("admin.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let key = hub.admin_key();
    // A restart does not mint another key.
    hub.kill9();
    let hub = HubProcess::start(&data);
    assert_eq!(hub.admin_key(), key);
}

/// Secret config values, end to end: marked with `--secret-env` (given, or
/// taken from the environment), `--secret-file` and `--secret`; never
/// printed by `get`/`list` in any output format without `--with-values`,
/// which only owners get; absent from the console's pages, from the hub's
/// and the agent's logs at trace level, from raw scans of the hub's
/// database and of the agent's state (anywhere on the outpost but the
/// stage's own 0700 directory); present in the running component's
/// environment and file.
#[test]
fn secret_config_values_reach_only_the_component() {
    use common::{AgentProcess, git_project, join_command, wait_until};
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    let tmp = tempfile::tempdir().unwrap();
    let hub_data = tmp.path().join("hub");
    let hub_log = tmp.path().join("hub.log");
    let agent_data = tmp.path().join("agent");
    let agent_log = tmp.path().join("agent.log");
    let config = tmp.path().join("config");
    let hub = HubProcess::start_logged(&hub_data, &hub_log);
    let admin = Cli::for_hub(&hub, &hub.admin_key(), &config);

    // Three secrets, each marked another way, and a plain value.
    let from_arg = "s3cr3t-from-the-command-line-7f21";
    let from_env = "s3cr3t-from-the-environment-93ab";
    let in_file = "s3cr3t-in-a-file-c0de";
    let marked_later = "s3cr3t-marked-afterwards-5e11";
    let secrets = [from_arg, from_env, in_file, marked_later];

    let created = admin.ok(&["create", "outpost", "edge", "--max-stages", "2"]);
    let agent = AgentProcess::join_logged(
        &join_command(&created),
        &agent_data,
        &["--no-containers"],
        &agent_log,
    );
    let uri = admin.ok(&["get", "outpost-uri", "edge"]);
    admin.ok(&["create", "project", "shop"]);
    admin.ok(&[
        "create",
        "stage",
        "edge",
        "-p",
        "shop",
        "--outpost-uri",
        uri.trim(),
    ]);
    let alice_key = admin
        .ok(&["create", "user", "alice"])
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_owned();
    admin.ok(&["add", "member", "alice", "-p", "shop", "--role", "member"]);
    let alice = Cli::for_hub(&hub, &alice_key, &config);

    let token = tmp.path().join("token.txt");
    std::fs::write(&token, in_file).unwrap();
    let out = admin
        .command()
        .env("API_TOKEN", from_env)
        .args([
            "add",
            "config-data",
            "app",
            "-p",
            "shop",
            "-s",
            "edge",
            "--env",
            "GREETING=moin",
            "--env",
            &format!("LATER={marked_later}"),
            "--secret-env",
            &format!("DB_PASSWORD={from_arg}"),
            "--secret-env",
            "API_TOKEN",
        ])
        .arg("--secret-file")
        .arg(&token)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("3 secret"));
    admin.ok(&[
        "add",
        "config-data",
        "app",
        "-p",
        "shop",
        "-s",
        "edge",
        "--secret",
        "LATER",
    ]);
    let missing = admin.run(&[
        "add",
        "config-data",
        "app",
        "-p",
        "shop",
        "-s",
        "edge",
        "--secret",
        "NOPE",
    ]);
    assert_eq!(missing.status.code(), Some(1), "{}", describe(&missing));

    // A process component that reads them as env values and a file.
    let repo = tmp.path().join("repo");
    git_project(
        &repo,
        &[
            (
                "trellis.yaml",
                "version: v1\ncomponents:\n  - name: app\n    process:\n      path: ./app\n      command: [\"sh\", \"./run.sh\"]\n    env:\n      - name: DB_PASSWORD\n        config-ref: DB_PASSWORD\n      - name: API_TOKEN\n        config-ref: API_TOKEN\n      - name: LATER\n        config-ref: LATER\n      - name: GREETING\n        config-ref: GREETING\n    files:\n      - path: /etc/token.txt\n        config-ref: token.txt\n",
            ),
            (
                "app/run.sh",
                "#!/bin/sh\necho started\nwhile true; do sleep 1; done\n",
            ),
        ],
    );
    let out = admin.run_in(&repo, &["push", "build", "-p", "shop"]);
    assert!(out.status.success(), "{}", describe(&out));
    admin.ok(&["push", "release", "-p", "shop", "-s", "edge", "-c", "app"]);
    wait_until("the component runs", Duration::from_secs(90), || {
        let list = admin.json(&["list", "component", "-p", "shop", "-s", "edge"]);
        list["components"][0]["observed"]["state"] == "running"
    });

    // Nothing prints them without --with-values, in any format.
    let mut printed = String::new();
    for format in ["table", "json", "yaml"] {
        for args in [
            &["get", "config", "app", "-p", "shop", "-s", "edge"][..],
            &["list", "config", "-p", "shop", "-s", "edge"],
            &["list", "config", "-p", "shop"],
            &["list", "config-data", "-p", "shop", "-s", "edge"],
            &[
                "list",
                "config-data",
                "-p",
                "shop",
                "-s",
                "edge",
                "-c",
                "app",
            ],
            &["list", "releases", "-p", "shop", "-s", "edge"],
            &["get", "release", "1", "-p", "shop", "-s", "edge"],
        ] {
            let mut all = args.to_vec();
            all.extend(["-o", format]);
            for cli in [&admin, &alice] {
                let out = cli.ok(&all);
                printed.push_str(&out);
            }
        }
    }
    for secret in secrets {
        assert!(!printed.contains(secret), "{secret} printed");
    }
    assert!(printed.contains("moin"), "plain values are shown");
    assert!(printed.contains("DB_PASSWORD") && printed.contains("token.txt"));
    let table = admin.ok(&["list", "config-data", "-p", "shop", "-s", "edge"]);
    assert!(table.contains("--with-values shows it"), "{table}");

    // Owners see them when they ask; members may not.
    let shown = admin.ok(&[
        "list",
        "config-data",
        "-p",
        "shop",
        "-s",
        "edge",
        "--with-values",
        "-o",
        "json",
    ]);
    for secret in secrets {
        assert!(shown.contains(secret), "{secret} not in {shown}");
    }
    let out = alice.run(&[
        "list",
        "config-data",
        "-p",
        "shop",
        "-s",
        "edge",
        "--with-values",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("only owners"));

    // Nor does the console.
    let pages = console_pages(
        &hub,
        &hub.admin_key(),
        &["/projects/shop", "/projects/shop/stages/edge"],
    );
    for secret in secrets {
        assert!(!pages.contains(secret), "{secret} in the console");
    }
    assert!(pages.contains("app"), "the pages show the config's name");

    // The component has them: in its environment and its file.
    let (pid, root) = component_process(&agent_data);
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    for (name, value) in [
        ("DB_PASSWORD", from_arg),
        ("API_TOKEN", from_env),
        ("LATER", marked_later),
    ] {
        assert!(
            environ.contains(&format!("{name}={value}")),
            "{name} not in the environment"
        );
    }
    assert_eq!(
        std::fs::read_to_string(root.join("etc/token.txt")).unwrap(),
        in_file
    );

    // Stop everything hard, then read every byte the hub and the agent
    // keep.
    agent.kill9();
    hub.kill9();
    let hex: Vec<String> = secrets.iter().map(hex_of).collect();
    let contains =
        |bytes: &[u8], needle: &str| bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
    let mut db = Vec::new();
    for entry in std::fs::read_dir(&hub_data).unwrap() {
        let path = entry.unwrap().path();
        if !path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("hub.db")
        {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        for (secret, hex) in secrets.iter().zip(&hex) {
            assert!(
                !contains(&bytes, secret),
                "{} holds {secret}",
                path.display()
            );
            assert!(
                !contains(&bytes, hex),
                "{} holds {secret} in hex",
                path.display()
            );
        }
        db.extend(bytes);
    }
    // The scan read the configs (their keys are there, in the clear).
    assert!(contains(&db, "DB_PASSWORD") && contains(&db, "GREETING"));
    // On the outpost, only inside the stage's private directory.
    let stage_dir = agent_data.join("processes/shop/edge");
    assert_eq!(
        std::fs::metadata(&stage_dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let mut scanned = 0;
    let mut inside = 0;
    for path in files_under(&agent_data) {
        let bytes = std::fs::read(&path).unwrap();
        scanned += 1;
        let needles: Vec<&str> = secrets
            .iter()
            .copied()
            .chain(hex.iter().map(String::as_str))
            .collect();
        for secret in needles {
            if contains(&bytes, secret) {
                assert!(
                    path.starts_with(&stage_dir),
                    "{} (outside the stage's directory) holds a secret",
                    path.display()
                );
                inside += 1;
            }
        }
    }
    assert!(
        scanned > 3 && inside > 0,
        "scanned {scanned} files, {inside} inside"
    );
    assert!(agent_data.join("agent.redb").is_file());
    assert!(agent_data.join("state.key").is_file());

    // Nor the logs, at trace level.
    for log in [&hub_log, &agent_log] {
        let bytes = std::fs::read(log).unwrap();
        assert!(bytes.len() > 10_000, "{} is nearly empty", log.display());
        for (secret, hex) in secrets.iter().zip(&hex) {
            assert!(
                !contains(&bytes, secret),
                "{} holds {secret}",
                log.display()
            );
            assert!(
                !contains(&bytes, hex),
                "{} holds {secret} in hex",
                log.display()
            );
        }
    }
    common::kill_processes_under(&agent_data);
}

fn hex_of(s: &&str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                todo.push(path);
            } else if kind.is_file() {
                out.push(path);
            }
        }
    }
    out
}

/// The pid and working directory (its root) of the one process running
/// from under `data`.
fn component_process(data: &std::path::Path) -> (u32, std::path::PathBuf) {
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cwd) = std::fs::read_link(format!("/proc/{pid}/cwd"))
            && cwd.starts_with(data)
        {
            return (pid, cwd);
        }
    }
    panic!("no process runs from {}", data.display());
}

/// The console's pages at `paths`, signed in with `key`, concatenated.
fn console_pages(hub: &HubProcess, key: &str, paths: &[&str]) -> String {
    let pem = std::fs::read(hub.ca_cert()).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let signed_in = client
            .post(format!("{}/login", hub.endpoint))
            .header("Origin", &hub.endpoint)
            .form(&[("key", key), ("next", "/projects")])
            .send()
            .await
            .unwrap();
        let cookie = signed_in
            .headers()
            .get("set-cookie")
            .expect("signed in")
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_owned();
        let mut all = String::new();
        for path in paths {
            let page = client
                .get(format!("{}{path}", hub.endpoint))
                .header("Cookie", &cookie)
                .send()
                .await
                .unwrap();
            assert!(page.status().is_success(), "{path}: {}", page.status());
            all.push_str(&page.text().await.unwrap());
        }
        all
    })
}
