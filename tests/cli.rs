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
fn dev_sets_up_an_example_project_with_a_release() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .current_dir(tmp.path())
        .args(["dev", "--listen", "127.0.0.1:0", "--no-serve"])
        .env("TRELLIS_CONFIG_DIR", tmp.path().join("config"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
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
