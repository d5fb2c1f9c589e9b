//! The kit's engines do what the container tests rely on: the test image
//! runs, labelled objects are found and removed, and another program that
//! runs the engine's CLI with `cli_env()` reaches the kit's engine — with
//! the matching Docker client — and builds a `FROM scratch` image for
//! another platform, as `trellis push build` does.
//!
//! Without an engine installed its tests pass as skipped, except under
//! `CI`.

use std::process::Command;

use trellis_testkit::engines::{self, EngineKind, Object, TestEngine};

/// `engine`'s CLI, run the way another program would: found on the `PATH`
/// of `cli_env()`, with nothing else of the kit's.
fn outside(engine: &TestEngine, args: &[&str]) -> std::process::Output {
    let output = Command::new(engine.name())
        .envs(engine.cli_env())
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{} {args:?}: {}",
        engine.name(),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn the_test_image_runs_and_labelled_objects_go(engine: TestEngine) {
    let image = engine.busybox_image();
    let label = format!(
        "trellis-testkit-test={}-{}",
        engine.name(),
        std::process::id()
    );
    let name = format!("testkit-{}-{}", engine.name(), std::process::id());
    engine.cli_ok(&[
        "create", "--name", &name, "--label", &label, image, "sleep", "60",
    ]);
    engine.cli_ok(&["network", "create", "--label", &label, &name]);
    engine.cli_ok(&["volume", "create", "--label", &label, &name]);
    assert_eq!(
        engine.labelled(Object::Container, &label),
        std::slice::from_ref(&name)
    );
    assert_eq!(
        engine.labelled(Object::Network, &label),
        std::slice::from_ref(&name)
    );
    assert_eq!(
        engine.labelled(Object::Volume, &label),
        std::slice::from_ref(&name)
    );
    assert!(engine.inspect(Object::Container, &name).is_some());
    engine.cli_ok(&["start", &name]);
    let out = engine.exec(&name, &["sh", "-c", "echo $((6 * 7))"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "42\n");

    engine.remove_labelled(&label);
    for object in [Object::Container, Object::Network, Object::Volume] {
        assert!(engine.labelled(object, &label).is_empty(), "{object:?}");
    }
    assert!(engine.inspect(Object::Container, &name).is_none());
}

fn another_program_builds_for_another_platform(engine: TestEngine) {
    let context = tempfile::tempdir().unwrap();
    std::fs::write(context.path().join("hello.txt"), "hello\n").unwrap();
    std::fs::write(
        context.path().join("Dockerfile"),
        "FROM scratch\nCOPY hello.txt /hello.txt\n",
    )
    .unwrap();
    let reference = format!(
        "trellis.local/testkit/{}-arm64:{}",
        engine.name(),
        std::process::id()
    );
    let context_dir = context.path().to_str().unwrap();
    outside(
        &engine,
        &[
            "build",
            "--platform",
            "linux/arm64",
            "-t",
            &reference,
            context_dir,
        ],
    );
    let inspected = engine.inspect(Object::Image, &reference);
    let _ = engine.cli(&["rmi", "-f", &reference]);
    let inspected = inspected.expect("the image was built on the kit's engine");
    assert_eq!(inspected["Architecture"], "arm64", "{inspected}");
    assert_eq!(inspected["Os"], "linux", "{inspected}");
}

/// Runs each body on both engines: `on_podman::<body>`, `on_docker::<body>`.
macro_rules! on_both_engines {
    ($($body:ident),+ $(,)?) => {
        mod on_podman {
            $(
                #[test]
                fn $body() {
                    if let Some(engine) = super::engines::get(super::EngineKind::Podman) {
                        super::$body(engine);
                    }
                }
            )+
        }
        mod on_docker {
            $(
                #[test]
                fn $body() {
                    if let Some(engine) = super::engines::get(super::EngineKind::Docker) {
                        super::$body(engine);
                    }
                }
            )+
        }
    };
}

on_both_engines!(
    the_test_image_runs_and_labelled_objects_go,
    another_program_builds_for_another_platform,
);

/// Docker's `cli_env()` puts the daemon's own client first on `PATH`, not
/// whatever `docker` comes first on the host's (this machine's
/// `/usr/local/bin/docker` is a newer one).
#[test]
fn another_program_runs_the_docker_daemons_own_client() {
    let Some(docker) = trellis_testkit::docker::engine() else {
        return;
    };
    let format = ["version", "--format", "{{.Client.Version}}"];
    let theirs = outside(&TestEngine::Docker(docker.clone()), &format);
    let ours = docker.docker_ok(&format);
    assert_eq!(String::from_utf8_lossy(&theirs.stdout), ours);
    let server = docker.docker_ok(&["version", "--format", "{{.Server.Version}}"]);
    assert_eq!(ours.trim(), server.trim(), "client and daemon match");
}

#[test]
fn every_engine_is_named_as_its_cli() {
    assert_eq!(EngineKind::Podman.name(), "podman");
    assert_eq!(EngineKind::Docker.name(), "docker");
    for engine in engines::all() {
        assert_eq!(engine.kind().name(), engine.name());
        assert!(engine.docker_host().starts_with("unix:///"));
    }
}
