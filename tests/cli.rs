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
        String::from_utf8_lossy(&out.stdout).contains("already on the hub"),
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
    let port = common::free_port();
    let out = Command::new(bin())
        .current_dir(tmp.path())
        .args(["dev", "--listen", "127.0.0.1:0", "--no-serve"])
        .args(["--example-port", &port.to_string()])
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
    let page = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, urllib.request\nprint(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())",
            &url,
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&page.stdout).contains("Hello from a Trellis stage"),
        "{}",
        describe(&page)
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
