//! The command line's contract: exit codes, messages, manifests, dev mode.

mod common;

use common::{Cli, HubProcess, bin, describe, git_project};
use std::process::Command;

#[test]
fn exit_codes_separate_user_errors_from_hub_failures() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = HubProcess::start(&tmp.path().join("hub"));
    let cli = Cli::for_hub(&hub, &hub.admin_key(), &tmp.path().join("config"));
    // A refused request is the user's to fix: 1, with the hub's hint.
    let out = cli.run(&["get", "project", "missing"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not exist") && err.contains("hint:"),
        "{err}"
    );
    // Bad input caught locally: 1.
    let out = cli.run(&["create", "stage", "x", "-p", "p", "--type", "staging"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("dev, qa, prod"));
    // A wrong key: 1 (the user can fix it), saying what to do.
    let bad = Cli::for_hub(&hub, "tk_00:nope", &tmp.path().join("config"));
    let out = bad.run(&["list", "project"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("trellis login"),
        "{}",
        describe(&out)
    );
    // Nothing listening: 2.
    let gone = Cli::new(
        "http://127.0.0.1:9",
        &hub.admin_key(),
        &tmp.path().join("config"),
    );
    let out = gone.run(&["list", "project"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("could not reach the hub"));
}

#[test]
fn login_remembers_the_hub_for_later_commands() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = HubProcess::start(&tmp.path().join("hub"));
    let config = tmp.path().join("config");
    let cli = Cli::for_hub(&hub, &hub.admin_key(), &config);
    cli.ok(&["login"]);
    let out = Command::new(bin())
        .env_remove("TRELLIS_ENDPOINT")
        .env_remove("TRELLIS_KEY")
        .env("TRELLIS_CONFIG_DIR", &config)
        .args(["whoami"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("admin"));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(config.join("login.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn validate_manifest_reports_path_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    std::fs::create_dir_all(&good).unwrap();
    std::fs::write(
        good.join("pergola.yaml"),
        "version: v1\ncomponents:\n  - name: web\n    docker:\n      image: nginx\n",
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["validate", "manifest"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 component (web)"));

    let bad = tmp.path().join("trellis.yaml");
    std::fs::write(&bad, "version: v1\ncomponents:\n  - name: web\n    docker:\n      image: nginx\n    ports: [70000]\n").unwrap();
    let out = Command::new(bin())
        .args(["validate", "manifest"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("trellis.yaml:6:13: components[0].ports[0]: "),
        "{err}"
    );
}

#[test]
fn push_build_records_branch_commit_and_refuses_non_git_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = HubProcess::start(&tmp.path().join("hub"));
    let cli = Cli::for_hub(&hub, &hub.admin_key(), &tmp.path().join("config"));
    cli.ok(&["create", "project", "p"]);
    let plain = tmp.path().join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    let out = cli.run_in(&plain, &["push", "build", "-p", "p"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not in a git work tree"),
        "{}",
        describe(&out)
    );

    let repo = tmp.path().join("repo");
    git_project(
        &repo,
        &[
            (
                "trellis.yaml",
                "version: v1\ncomponents:\n  - name: bridge\n    process:\n      path: ./bin\n      command: [\"./run.sh\"]\n",
            ),
            ("bin/run.sh", "#!/bin/sh\necho hi\n"),
        ],
    );
    // An uncommitted edit is not part of the build.
    std::fs::write(repo.join("bin/run.sh"), "#!/bin/sh\necho changed\n").unwrap();
    let out = cli.run_in(&repo, &["push", "build", "-p", "p"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("uncommitted changes"),
        "{}",
        describe(&out)
    );
    let build = cli.json(&["get", "build", "main_b1", "-p", "p"]);
    let head = Command::new("git")
        .arg("-C")
        .arg(&repo)
        .args(["rev-parse", "HEAD"])
        .output()
        .unwrap();
    assert_eq!(
        build["commit"],
        String::from_utf8_lossy(&head.stdout).trim()
    );
    assert_eq!(build["branch"], "main");
    assert_eq!(build["components"][0]["artifact"]["kind"], "package");
    // Packing is deterministic: the same commit gives the same digest.
    let out = cli.run_in(&repo, &["push", "build", "-p", "p"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("100.0% already on hub"),
        "{}",
        describe(&out)
    );
    let second = cli.json(&["get", "build", "main_b2", "-p", "p"]);
    assert_eq!(
        second["components"][0]["artifact"]["digest"],
        build["components"][0]["artifact"]["digest"]
    );
}

#[test]
fn dev_sets_up_an_example_project_with_a_release_that_runs() {
    let tmp = tempfile::tempdir().unwrap();
    // The example's processes outlive `dev --no-serve` (an agent's stage
    // processes survive it, by design); this stops them at the end.
    struct Sweep(std::path::PathBuf);
    impl Drop for Sweep {
        fn drop(&mut self) {
            common::kill_processes_under(&self.0);
        }
    }
    let _sweep = Sweep(tmp.path().to_owned());
    // The example on the demo outpost takes the port after the example's.
    let port = loop {
        let port = common::free_port();
        if port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            break port;
        }
    };
    let out = Command::new(bin())
        .current_dir(tmp.path())
        .args(["dev", "--listen", "127.0.0.1:0", "--no-serve"])
        .args(["--example-port", &port.to_string()])
        .args(["--ingress-listen", "127.0.0.1:0"])
        .env("TRELLIS_CONFIG_DIR", tmp.path().join("config"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The example runs and answers at the printed URL.
    let url = format!("http://127.0.0.1:{port}/");
    assert!(
        stdout.contains(&format!("example:   {url}")),
        "no running example in:\n{stdout}"
    );
    let fetch = |url: &str| {
        let page = std::process::Command::new("python3")
            .args([
                "-c",
                "import sys, urllib.request\nprint(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())",
                url,
            ])
            .output()
            .unwrap();
        assert!(page.status.success(), "{url}: {}", describe(&page));
        String::from_utf8_lossy(&page.stdout).into_owned()
    };
    assert!(fetch(&url).contains("Hello from a Trellis stage"));
    // A copy of it runs on the demo outpost, whose agent joined and linked
    // over mutual TLS: the release ran there and answers.
    let demo_url = format!("http://127.0.0.1:{}/", port + 1);
    assert!(
        stdout.contains(&format!(
            "outpost:   {demo_url}   (project hello-outpost, stage demo on outpost demo, running)"
        )),
        "no running stage on the demo outpost in:\n{stdout}"
    );
    assert!(fetch(&demo_url).contains("project <code>hello-outpost</code>"));
    assert!(
        stdout.contains("/projects/hello-outpost/stages/demo/status   (its connection status)"),
        "no connection-status page in:\n{stdout}"
    );
    assert!(
        stdout.contains("ingress:   http://web.demo.hello-outpost.localhost:"),
        "no ingress URL of the demo outpost in:\n{stdout}"
    );
    // And by its ingress host, through the local outpost's entry point
    // (which `dev --no-serve` stopped again: only the URL is checked).
    let ingress = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("ingress:"))
        .map(|rest| {
            rest.split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .unwrap_or_else(|| panic!("no ingress URL in:\n{stdout}"));
    assert!(
        ingress.starts_with("http://web.dev.hello.localhost:") && ingress.ends_with('/'),
        "{ingress}"
    );
    for expected in [
        "console:",
        "endpoint:",
        "key:",
        "trellis list stage -p hello",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    // Run again on the same data: it reuses everything and still works.
    let out = Command::new(bin())
        .current_dir(tmp.path())
        .args(["dev", "--listen", "127.0.0.1:0", "--no-serve"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    // The example's release is recorded.
    let hub = HubProcess::start(&tmp.path().join(".trellis-dev/hub"));
    let cli = Cli::for_hub(&hub, &hub.admin_key(), &tmp.path().join("config"));
    let releases = cli.json(&["list", "release", "-p", "hello", "-s", "dev"]);
    assert_eq!(releases.as_array().unwrap().len(), 1);
    // The demo outpost is a registered outpost like any other, with the
    // stage on it and its agent's report.
    let outpost = cli.json(&["get", "outpost", "demo"]);
    assert_eq!(outpost["name"], "demo", "{outpost:#}");
    let status = cli.json(&["status", "stage", "demo", "-p", "hello-outpost"]);
    assert_eq!(status["sync"]["applied_release"], 1, "{status:#}");
}

/// The manifest corpus of `trellis-model`, checked through the command a
/// user runs: every valid file passes, every broken one exits 1 and
/// reports each expected problem with its line, column and field path.
#[test]
fn validate_manifest_on_the_whole_corpus() {
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("crates/trellis-model/tests/manifests");
    let mut checked = (0, 0);
    for entry in std::fs::read_dir(corpus.join("valid")).unwrap() {
        let path = entry.unwrap().path();
        let out = Command::new(bin())
            .args(["validate", "manifest"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            describe(&out)
        );
        checked.0 += 1;
    }
    for entry in std::fs::read_dir(corpus.join("invalid")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "expected") {
            continue;
        }
        let expected = std::fs::read_to_string(format!("{}.expected", path.display())).unwrap();
        let out = Command::new(bin())
            .args(["validate", "manifest"])
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}: {}",
            path.display(),
            describe(&out)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        for line in expected
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        {
            let mut parts = line.splitn(3, '|').map(str::trim);
            let (pos, field) = (parts.next().unwrap(), parts.next().unwrap());
            let (l, c) = pos.split_once(':').unwrap();
            let want = if field.is_empty() {
                format!("{}:{l}:{c}: ", path.display())
            } else {
                format!("{}:{l}:{c}: {field}: ", path.display())
            };
            assert!(
                stderr.contains(&want),
                "{}: expected {want:?} in:\n{stderr}",
                path.display()
            );
        }
        checked.1 += 1;
    }
    assert!(
        checked.0 >= 20 && checked.1 >= 20,
        "corpus too small: {checked:?}"
    );
}

/// The component lifecycle and logs through the command line, against a
/// hub whose local outpost runs a `process:` component: start, stop,
/// restart, suspend, resume, `list component`, `logs`, and the mistakes a
/// user makes (unknown component, no release yet, a bad `--since`, an
/// offline outpost).
#[test]
fn lifecycle_and_logs_of_a_component() {
    use common::wait_until;
    use std::time::Duration;

    let tmp = tempfile::tempdir().unwrap();
    let hub = HubProcess::start(&tmp.path().join("hub"));
    let cli = Cli::for_hub(&hub, &hub.admin_key(), &tmp.path().join("config"));
    cli.ok(&["create", "project", "p"]);
    cli.ok(&["create", "stage", "dev", "-p", "p"]);
    let repo = tmp.path().join("repo");
    git_project(
        &repo,
        &[
            (
                "trellis.yaml",
                "version: v1\ncomponents:\n  - name: talker\n    process:\n      path: ./talker\n      command: [\"sh\", \"./talk.sh\"]\n",
            ),
            (
                "talker/talk.sh",
                "#!/bin/sh\necho \"talker starting\" >&2\nn=0\nwhile true; do n=$((n+1)); echo \"hello $n\"; sleep 0.2; done\n",
            ),
        ],
    );
    let out = cli.run_in(&repo, &["push", "build", "-p", "p"]);
    assert!(out.status.success(), "{}", describe(&out));
    let talker = ["-p", "p", "-s", "dev"];
    let with = |args: &[&'static str]| -> Vec<&'static str> {
        args.iter().chain(talker.iter()).copied().collect()
    };

    // Nothing released yet.
    let out = cli.run(&with(&["stop", "component", "talker"]));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("has no release yet") && err.contains("trellis push release"),
        "{err}"
    );
    let out = cli.run(&["logs", "stage", "dev", "-p", "p"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let listed = cli.ok(&with(&["list", "component"]));
    assert!(listed.contains("has no release yet"), "{listed}");

    cli.ok(&["push", "release", "-p", "p", "-s", "dev"]);
    let state = |name: &str| -> String {
        let list = cli.json(&with(&["list", "component"]));
        list["components"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .map(|c| c["observed"]["state"].as_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    wait_until("talker running", Duration::from_secs(60), || {
        state("talker") == "running"
    });
    let table = cli.ok(&with(&["list", "component"]));
    for column in ["NAME", "STATE", "REPLICAS", "RESTARTS", "SINCE", "RELEASE"] {
        assert!(table.contains(column), "{table}");
    }
    assert!(
        table.contains("talker") && table.contains("running") && table.contains("1/1"),
        "{table}"
    );

    // Logs: the newest lines, stderr marked, in `<time> <component>[<replica>] <line>`.
    wait_until("a few lines written", Duration::from_secs(20), || {
        cli.ok(&with(&["logs", "component", "talker", "--tail", "3"]))
            .lines()
            .count()
            == 3
    });
    let printed = cli.ok(&["logs", "stage", "dev", "-p", "p", "--since", "10m"]);
    let first = printed.lines().next().unwrap();
    assert!(
        first.contains(" talker[0] ! talker starting"),
        "stderr is marked: {printed}"
    );
    let hello = printed.lines().find(|l| l.contains("hello 1")).unwrap();
    let (time, rest) = hello.split_once(' ').unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(time).is_ok(),
        "{hello}"
    );
    assert_eq!(rest, "talker[0] hello 1");
    let json = cli.ok(&with(&[
        "logs",
        "component",
        "talker",
        "--tail",
        "1",
        "-o",
        "json",
    ]));
    let line: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(line["component"], "talker");
    assert_eq!(line["stream"], "stdout");

    // Bad input, caught locally or by the hub, exits 1 with what to do.
    let out = cli.run(&with(&[
        "logs",
        "component",
        "talker",
        "--since",
        "yesterday",
    ]));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--since") && err.contains("10m"), "{err}");
    for verb in ["logs", "stop"] {
        let out = cli.run(&with(&[verb, "component", "nope"]));
        assert_eq!(out.status.code(), Some(1), "{verb}: {}", describe(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("no component \"nope\"") && err.contains("hint: use one of: talker"),
            "{verb}: {err}"
        );
    }

    // Stop, stop again, start, restart.
    let out = cli.ok(&with(&["stop", "component", "talker"]));
    assert!(out.contains("stop requested"), "{out}");
    wait_until("talker stopped", Duration::from_secs(30), || {
        state("talker") == "stopped"
    });
    let out = cli.ok(&with(&["stop", "component", "talker"]));
    assert!(out.contains("already stopped"), "{out}");
    let out = cli.ok(&with(&["start", "component", "talker"]));
    assert!(out.contains("start requested"), "{out}");
    wait_until("talker running again", Duration::from_secs(30), || {
        state("talker") == "running"
    });
    let restarted = cli.json(&with(&["restart", "component", "talker"]));
    assert_eq!(restarted["changed"], true);
    assert_eq!(restarted["control"]["restarts"], 1);

    // Suspend and resume the whole stage.
    let out = cli.ok(&["suspend", "stage", "dev", "-p", "p"]);
    assert!(out.contains("is suspended"), "{out}");
    wait_until(
        "talker stopped by the suspension",
        Duration::from_secs(30),
        || state("talker") == "stopped",
    );
    let listed = cli.ok(&with(&["list", "component"]));
    assert!(listed.contains("stage dev is suspended"), "{listed}");
    cli.ok(&["resume", "stage", "dev", "-p", "p"]);
    wait_until(
        "talker running after resume",
        Duration::from_secs(30),
        || state("talker") == "running",
    );

    // A stage on an outpost whose agent is not connected: the hub says so
    // (exit 2: nothing the user typed is wrong).
    cli.ok(&["create", "outpost", "edge"]);
    let uri = cli.ok(&["get", "outpost-uri", "edge"]);
    cli.ok(&[
        "create",
        "stage",
        "far",
        "-p",
        "p",
        "--outpost-uri",
        uri.trim(),
    ]);
    cli.ok(&["push", "release", "-p", "p", "-s", "far"]);
    let out = cli.run(&["logs", "stage", "far", "-p", "p", "--follow"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is not connected to the hub") && err.contains("read live from the outpost"),
        "{err}"
    );
    let listed = cli.ok(&["list", "component", "-p", "p", "-s", "far"]);
    assert!(listed.contains("unknown"), "{listed}");
    assert!(
        listed.contains("has not reported this stage yet"),
        "{listed}"
    );
}

/// `n` bytes that do not compress, the same every run (xorshift64*).
fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(n);
    out
}

/// The `uploaded X of Y; Z% already on hub` line of a push: (X, Y) in bytes
/// (as exact as the printed figures) and the line.
fn upload_summary(out: &std::process::Output) -> (f64, f64, String) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("uploaded "))
        .unwrap_or_else(|| panic!("no upload summary: {}", describe(out)))
        .to_owned();
    let size = |text: &str| -> f64 {
        let (number, unit) = text.split_once(' ').unwrap();
        let scale = match unit {
            "B" => 1.0,
            "KiB" => 1024.0,
            "MiB" => 1024.0 * 1024.0,
            "GiB" => 1024.0 * 1024.0 * 1024.0,
            other => panic!("unit {other:?} in {line}"),
        };
        number.parse::<f64>().unwrap() * scale
    };
    let rest = line.strip_prefix("uploaded ").unwrap();
    let (uploaded, rest) = rest.split_once(" of ").unwrap();
    let (total, share) = rest.split_once("; ").unwrap();
    assert!(share.ends_with("% already on hub"), "{line}");
    (size(uploaded), size(total), line)
}

/// Chunked uploads of a `process:` package: the first push sends it all,
/// an unchanged commit sends nothing, and a small edit to a large package
/// sends a small part of it.
#[test]
fn push_build_uploads_only_the_chunks_the_hub_lacks() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = HubProcess::start(&tmp.path().join("hub"));
    let cli = Cli::for_hub(&hub, &hub.admin_key(), &tmp.path().join("config"));
    cli.ok(&["create", "project", "p"]);
    let repo = tmp.path().join("repo");
    std::fs::create_dir_all(repo.join("app")).unwrap();
    std::fs::write(repo.join("app/data.bin"), noise(7, 8 * 1024 * 1024)).unwrap();
    git_project(
        &repo,
        &[
            (
                "trellis.yaml",
                "version: v1\ncomponents:\n  - name: app\n    process:\n      path: ./app\n      command: [\"./run.sh\"]\n",
            ),
            ("app/run.sh", "#!/bin/sh\necho version 1\n"),
        ],
    );

    let push = || {
        let out = cli.run_in(&repo, &["push", "build", "-p", "p"]);
        assert!(out.status.success(), "{}", describe(&out));
        out
    };
    let first = push();
    let (uploaded, total, line) = upload_summary(&first);
    assert!(line.ends_with("; 0.0% already on hub"), "{line}");
    assert!(
        uploaded == total && total >= 8.0 * 1024.0 * 1024.0,
        "{line}"
    );

    let again = push();
    let (uploaded, _, line) = upload_summary(&again);
    assert_eq!(uploaded, 0.0, "{line}");
    assert!(
        line.starts_with("uploaded 0 B of ") && line.ends_with("; 100.0% already on hub"),
        "{line}"
    );

    std::fs::write(repo.join("app/run.sh"), "#!/bin/sh\necho version 2\n").unwrap();
    common::git_commit(&repo, "version 2");
    let edited = push();
    let (uploaded, total, line) = upload_summary(&edited);
    assert!(uploaded > 0.0, "{line}");
    assert!(uploaded * 10.0 < total, "more than 10% sent again: {line}");

    let builds = cli.json(&["list", "build", "-p", "p"]);
    let digests: Vec<&str> = builds
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["components"][0]["artifact"]["digest"].as_str().unwrap())
        .collect();
    assert_eq!(digests.len(), 3, "{builds}");
    assert_eq!(
        digests
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len(),
        2,
        "the unchanged commit names the same package: {digests:?}"
    );
}

/// A project with container components needs an engine, and says how to
/// get one; a process-only project does not.
#[test]
fn push_build_needs_an_engine_only_for_container_components() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = HubProcess::start(&tmp.path().join("hub"));
    let cli = Cli::for_hub(&hub, &hub.admin_key(), &tmp.path().join("config"));
    cli.ok(&["create", "project", "p"]);
    // A PATH with git and nothing else.
    let bin_dir = tmp.path().join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let git = String::from_utf8(
        Command::new("sh")
            .args(["-c", "command -v git"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    std::os::unix::fs::symlink(git.trim(), bin_dir.join("git")).unwrap();
    let run = |repo: &std::path::Path, extra: &[&str]| {
        let mut args = vec!["push", "build", "-p", "p"];
        args.extend_from_slice(extra);
        cli.command()
            .current_dir(repo)
            .env("PATH", &bin_dir)
            .env_remove("TRELLIS_ENGINE")
            .args(&args)
            .output()
            .unwrap()
    };

    let processes = tmp.path().join("processes");
    git_project(
        &processes,
        &[
            (
                "trellis.yaml",
                "version: v1\ncomponents:\n  - name: app\n    process:\n      path: ./app\n      command: [\"./run.sh\"]\n",
            ),
            ("app/run.sh", "#!/bin/sh\necho hi\n"),
        ],
    );
    let out = run(&processes, &[]);
    assert!(out.status.success(), "{}", describe(&out));

    let containers = tmp.path().join("containers");
    git_project(
        &containers,
        &[
            (
                "trellis.yaml",
                "version: v1\ncomponents:\n  - name: web\n    docker:\n      file: Dockerfile\n",
            ),
            ("Dockerfile", "FROM scratch\n"),
        ],
    );
    let out = run(&containers, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`podman` nor `docker`") && err.contains("--engine") && err.contains("web"),
        "{err}"
    );
    let out = run(&containers, &["--engine", "docker"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no `docker` on PATH"), "{err}");
    let builds = cli.json(&["list", "build", "-p", "p"]);
    assert_eq!(builds.as_array().unwrap().len(), 1, "{builds}");
}

/// Runs `trellis push build` in `repo` with Podman as the engine (and the
/// test kit's containers.conf).
fn push_with_podman(
    cli: &Cli,
    engine: &trellis_testkit::podman::PodmanEngine,
    repo: &std::path::Path,
    project: &str,
    extra: &[&str],
) -> std::process::Output {
    let mut args = vec!["push", "build", "-p", project];
    args.extend_from_slice(extra);
    cli.command()
        .current_dir(repo)
        .env("CONTAINERS_CONF", engine.containers_conf())
        .env("TRELLIS_ENGINE", "podman")
        .args(&args)
        .output()
        .unwrap()
}

fn head_commit(repo: &std::path::Path) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["rev-parse", "HEAD"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Removes the images a test built, whatever happens.
struct RemoveImages(trellis_testkit::podman::PodmanEngine, Vec<String>);
impl Drop for RemoveImages {
    fn drop(&mut self) {
        for image in &self.1 {
            let _ = self.0.podman(&["rmi", "-f", image]);
        }
    }
}

/// Container components: a `docker.file` image is built from the commit and
/// a `docker.image` taken from the local engine; both are saved, chunked
/// and recorded with their archives; pushing again sends nothing.
#[test]
fn push_build_builds_and_uploads_container_images() {
    let Some(engine) = trellis_testkit::podman::engine() else {
        return;
    };
    let busybox = engine.busybox_image();
    let tmp = tempfile::tempdir().unwrap();
    let hub = HubProcess::start(&tmp.path().join("hub"));
    let cli = Cli::for_hub(&hub, &hub.admin_key(), &tmp.path().join("config"));
    cli.ok(&["create", "project", "imgs"]);
    let repo = tmp.path().join("repo");
    let manifest = format!(
        "version: v1\ncomponents:\n  - name: web\n    docker:\n      file: web/Dockerfile\n      build-context: web\n      build-args:\n        GREETING: moin\n  - name: tools\n    docker:\n      image: {busybox}\n"
    );
    git_project(
        &repo,
        &[
            ("trellis.yaml", manifest.as_str()),
            (
                "web/Dockerfile",
                "FROM scratch\nARG GREETING\nCOPY hello.txt /hello.txt\n",
            ),
            ("web/hello.txt", "hello from a trellis build\n"),
        ],
    );
    let commit = head_commit(&repo);
    let reference = format!("trellis.local/imgs/web:{}", &commit[..12]);
    let _cleanup = RemoveImages(engine.clone(), vec![reference.clone()]);

    let out = push_with_podman(&cli, &engine, &repo, "imgs", &[]);
    assert!(out.status.success(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("COPY hello.txt /hello.txt"),
        "the build's output is shown: {stderr}"
    );
    let (uploaded, total, line) = upload_summary(&out);
    assert!(uploaded > 0.0 && uploaded == total, "{line}");

    let build = cli.json(&["get", "build", "main_b1", "-p", "imgs"]);
    let components = build["components"].as_array().unwrap();
    let artifact = |name: &str| {
        components
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {build}"))["artifact"]
            .clone()
    };
    let web = artifact("web");
    assert_eq!(web["kind"], "image", "{web}");
    assert_eq!(web["reference"], reference.as_str(), "{web}");
    let archive = &web["archive"];
    assert_eq!(archive["index"].as_str().unwrap().len(), 64, "{web}");
    assert!(archive["size"].as_u64().unwrap() > 0, "{web}");
    let image_id = archive["image_id"].as_str().unwrap();
    let local_id = engine.podman_ok(&["image", "inspect", "--format", "{{.Id}}", &reference]);
    assert_eq!(image_id, format!("sha256:{}", local_id.trim()), "{web}");
    let tools = artifact("tools");
    assert_eq!(tools["reference"], busybox, "{tools}");
    assert!(
        tools["archive"]["image_id"]
            .as_str()
            .unwrap()
            .starts_with("sha256:"),
        "{tools}"
    );

    let out = push_with_podman(&cli, &engine, &repo, "imgs", &[]);
    assert!(out.status.success(), "{}", describe(&out));
    let (_, _, line) = upload_summary(&out);
    assert!(
        line.starts_with("uploaded 0 B of ") && line.ends_with("; 100.0% already on hub"),
        "{line}"
    );
}

/// What goes wrong with container components is said clearly, exits 1 and
/// records nothing: a Dockerfile that is not committed, a build that fails
/// (its output repeated in the error), an image the engine does not have,
/// and a pull that fails.
#[test]
fn push_build_explains_container_build_failures() {
    let Some(engine) = trellis_testkit::podman::engine() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let hub = HubProcess::start(&tmp.path().join("hub"));
    let cli = Cli::for_hub(&hub, &hub.admin_key(), &tmp.path().join("config"));
    cli.ok(&["create", "project", "bad"]);
    let failing = |repo: &std::path::Path, extra: &[&str]| -> String {
        let out = push_with_podman(&cli, &engine, repo, "bad", extra);
        assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        // The error itself, after whatever the engine printed.
        stderr
            .split_once("error: ")
            .map(|(_, e)| e.to_owned())
            .unwrap_or_else(|| panic!("no error line: {stderr}"))
    };

    // A Dockerfile in the work tree but not in the commit.
    let uncommitted = tmp.path().join("uncommitted");
    git_project(
        &uncommitted,
        &[(
            "trellis.yaml",
            "version: v1\ncomponents:\n  - name: web\n    docker:\n      file: Dockerfile\n",
        )],
    );
    std::fs::write(uncommitted.join("Dockerfile"), "FROM scratch\n").unwrap();
    let err = failing(&uncommitted, &[]);
    assert!(
        err.contains("docker.file")
            && err.contains("\"Dockerfile\"")
            && err.contains("not committed"),
        "{err}"
    );

    // A build that fails: its output is streamed, and its end repeated.
    let broken = tmp.path().join("broken");
    git_project(
        &broken,
        &[
            (
                "trellis.yaml",
                "version: v1\ncomponents:\n  - name: web\n    docker:\n      file: Dockerfile\n",
            ),
            ("Dockerfile", "FROM scratch\nCOPY nonexistent /x\n"),
        ],
    );
    let reference = format!("trellis.local/bad/web:{}", &head_commit(&broken)[..12]);
    let _cleanup = RemoveImages(engine.clone(), vec![reference]);
    let err = failing(&broken, &[]);
    assert!(
        err.contains("building its image") && err.contains("nonexistent") && err.contains("  | "),
        "{err}"
    );

    // An image the engine does not have, without and with --pull (no
    // registry answers on this loopback port).
    let absent = tmp.path().join("absent");
    git_project(
        &absent,
        &[(
            "trellis.yaml",
            "version: v1\ncomponents:\n  - name: db\n    docker:\n      image: 127.0.0.1:9/trellis-test/absent:1\n",
        )],
    );
    let err = failing(&absent, &[]);
    assert!(
        err.contains("127.0.0.1:9/trellis-test/absent:1") && err.contains("--pull"),
        "{err}"
    );
    let err = failing(&absent, &["--pull"]);
    assert!(
        err.contains("pulling \"127.0.0.1:9/trellis-test/absent:1\"") && err.contains("  | "),
        "{err}"
    );

    let builds = cli.json(&["list", "build", "-p", "bad"]);
    assert_eq!(builds, serde_json::json!([]), "nothing was recorded");
}

/// A staging directory on a full disk: the error names it and TMPDIR, and
/// nothing is recorded. The CLI runs in its own mount namespace with TMPDIR
/// on a small tmpfs (skipped where namespaces cannot be made, i.e. not root).
#[test]
fn push_build_says_when_the_staging_disk_is_full() {
    let usable = Command::new("unshare")
        .args(["-m", "true"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !usable {
        assert!(
            std::env::var_os("CI").is_none(),
            "`unshare -m` does not work, and this test must not be skipped in CI"
        );
        eprintln!("skipping: `unshare -m` does not work here (run as root)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let hub = HubProcess::start(&tmp.path().join("hub"));
    let cli = Cli::for_hub(&hub, &hub.admin_key(), &tmp.path().join("config"));
    cli.ok(&["create", "project", "p"]);
    let repo = tmp.path().join("repo");
    std::fs::create_dir_all(repo.join("app")).unwrap();
    std::fs::write(repo.join("app/data.bin"), noise(11, 3_000_000)).unwrap();
    git_project(
        &repo,
        &[(
            "trellis.yaml",
            "version: v1\ncomponents:\n  - name: app\n    process:\n      path: ./app\n      command: [\"true\"]\n",
        )],
    );
    let small = tmp.path().join("small");
    std::fs::create_dir_all(&small).unwrap();
    // The commit's files fit; the package packed next to them does not.
    let template = cli.command();
    let mut command = Command::new("unshare");
    for (key, value) in template.get_envs() {
        match value {
            Some(value) => command.env(key, value),
            None => command.env_remove(key),
        };
    }
    let out = command
        .current_dir(&repo)
        .env("TMPDIR", &small)
        .args(["-m", "sh", "-c"])
        .arg(r#"mount -t tmpfs -o size=4m tmpfs "$TMPDIR" && exec "$0" push build -p p"#)
        .arg(bin())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("staging directory {}", small.display()))
            && err.contains("TMPDIR")
            && err.contains("Nothing was recorded"),
        "{err}"
    );
    let builds = cli.json(&["list", "build", "-p", "p"]);
    assert_eq!(builds, serde_json::json!([]), "nothing was recorded");
}

/// Nobody can lock the hub's administrators out: every administrator key
/// but the last can be deleted, the last one (and demoting its holder) is
/// refused with a hint, and `trellis hub reset-admin-key` mints a fresh
/// one on a running and on a stopped hub.
#[test]
fn the_last_administrator_key_stays_and_a_lost_one_can_be_reset() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("hub");
    let config = tmp.path().join("config");
    let hub = HubProcess::start(&data);
    let first = hub.admin_key();
    let admin = Cli::for_hub(&hub, &first, &config);
    let last_line = |out: String| out.lines().last().unwrap().trim().to_owned();
    // A second administrator and a second key of the first one.
    let ops_key = last_line(admin.ok(&["create", "user", "ops", "--admin"]));
    let second = last_line(admin.ok(&["create", "key", "--description", "spare"]));
    let id = |key: &str| key.split_once(':').unwrap().0.to_owned();
    let ops = Cli::for_hub(&hub, &ops_key, &config);
    // Nobody demotes themselves or deletes the key they sign with, even
    // while other administrators hold keys.
    let out = admin.run(&["update", "user", "admin", "--admin", "false"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot take their own"));
    let out = admin.run(&["delete", "key", &id(&first)]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("signed with key"));
    // Every administrator key but the last goes.
    ops.ok(&["delete", "key", &id(&second)]);
    admin.ok(&["delete", "access-key", &id(&ops_key)]);
    let out = admin.run(&["delete", "key", &id(&first)]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("last access key any administrator holds")
            && err.contains("trellis hub reset-admin-key"),
        "{err}"
    );
    // Its holder cannot be demoted either; ops (no key left) can.
    let out = admin.run(&["update", "user", "admin", "--admin", "false"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("last access keys of any administrator"),
        "{}",
        describe(&out)
    );
    let ops_now = admin.json(&["update", "users", "ops", "--admin", "false"]);
    assert_eq!(ops_now["admin"], false, "{ops_now}");
    assert!(admin.ok(&["whoami"]).contains("admin"));

    // Lost anyway (say the file was deleted): reset on the running hub.
    let reset = |data: &std::path::Path| {
        let out = Command::new(bin())
            .args(["hub", "reset-admin-key", "--data"])
            .arg(data)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", describe(&out));
        let key = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap()
            .trim()
            .to_owned();
        assert_eq!(
            std::fs::read_to_string(data.join("admin.key"))
                .unwrap()
                .trim(),
            key,
            "written like the first one"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.join("admin.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        key
    };
    let running = reset(&data);
    assert_ne!(running, first);
    let fresh = Cli::for_hub(&hub, &running, &config);
    assert!(fresh.ok(&["whoami"]).contains("admin"));
    // With a fresh key, the old one may go.
    fresh.ok(&["delete", "key", &id(&first)]);
    assert_eq!(admin.run(&["whoami"]).status.code(), Some(1));

    // And on a stopped hub.
    hub.kill9();
    let stopped = reset(&data);
    let hub = HubProcess::start(&data);
    let after = Cli::for_hub(&hub, &stopped, &config);
    assert!(after.ok(&["whoami"]).contains("admin"));
    let keys = after.json(&["list", "keys"]);
    assert_eq!(keys.as_array().unwrap().len(), 2, "{keys}");

    // A directory that holds no hub is refused, not turned into one.
    let empty = tmp.path().join("not-a-hub");
    std::fs::create_dir_all(&empty).unwrap();
    let out = Command::new(bin())
        .args(["hub", "reset-admin-key", "--data"])
        .arg(&empty)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("holds no hub database"));
    assert!(!empty.join("hub.db").exists());
}

/// `trellis hub reset-admin-key` works on the store the hub is given:
/// with `--store postgres://…` it mints the key in PostgreSQL, for the
/// running hub and for a stopped one. Skipped without PostgreSQL (except
/// under `CI`).
#[test]
fn reset_admin_key_works_on_a_postgresql_store() {
    let Some(server) = trellis_testkit::postgres::server() else {
        return;
    };
    let db = server.database();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("hub");
    let config = tmp.path().join("config");
    let args = ["--listen", "127.0.0.1:0", "--store", db.url.as_str()];
    let hub = HubProcess::start_with(&data, &args);
    let first = hub.admin_key();
    let reset = || {
        let out = Command::new(bin())
            .args(["hub", "reset-admin-key", "--data"])
            .arg(&data)
            .args(["--store", &db.url])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", describe(&out));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap()
            .trim()
            .to_owned()
    };
    let running = reset();
    assert_ne!(running, first);
    assert!(
        Cli::for_hub(&hub, &running, &config)
            .ok(&["whoami"])
            .contains("admin")
    );
    hub.kill9();
    let stopped = reset();
    let hub = HubProcess::start_with(&data, &args);
    let after = Cli::for_hub(&hub, &stopped, &config);
    assert!(after.ok(&["whoami"]).contains("admin"));
    // All three keys are in PostgreSQL: the hub reads no SQLite file.
    assert_eq!(after.json(&["list", "keys"]).as_array().unwrap().len(), 3);
    assert!(!data.join("hub.db").exists());
}
