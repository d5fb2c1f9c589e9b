//! Both container engines behind one type, so a container test is written
//! once and run against each: [`TestEngine`] is a [`PodmanEngine`] or a
//! [`DockerEngine`] with the helpers they share.
//!
//! ```no_run
//! use trellis_testkit::engines::{self, EngineKind, Object};
//!
//! fn a_test_body(engine: engines::TestEngine) {
//!     let image = engine.busybox_image();
//!     let host = engine.docker_host(); // hand this to the code under test
//!     engine.cli_ok(&["run", "--rm", "--label", "t=x", image, "true"]);
//!     assert!(engine.labelled(Object::Container, "t=x").is_empty());
//! }
//!
//! // A `#[test]` (or `#[tokio::test]`) per engine:
//! fn a_test_on_podman() {
//!     if let Some(engine) = engines::get(EngineKind::Podman) {
//!         a_test_body(engine);
//!     }
//! }
//! ```
//!
//! [`get`] returns `None` when that engine is not installed (a panic when
//! `CI` is set), like [`crate::podman::engine`] and
//! [`crate::docker::engine`]; [`all`] gives every installed one.
//!
//! To run another program against an engine with its command line (e.g.
//! `trellis push build`), add [`TestEngine::cli_env`] to its environment
//! and tell it which engine it is ([`TestEngine::name`]).

use std::process::Output;

use crate::docker::DockerEngine;
use crate::podman::PodmanEngine;

/// The test image both engines provide (`busybox_image()`): a root file
/// system holding only a static busybox and its applets, `CMD
/// ["/bin/sh"]`.
pub const BUSYBOX_IMAGE: &str = "localhost/trellis-test/busybox:1";

/// Kinds of engine objects the helpers inspect and list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Object {
    Container,
    Network,
    Volume,
    Image,
}

impl Object {
    /// The CLI's word for it (`podman network inspect …`).
    pub fn as_str(self) -> &'static str {
        match self {
            Object::Container => "container",
            Object::Network => "network",
            Object::Volume => "volume",
            Object::Image => "image",
        }
    }
}

/// Which engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EngineKind {
    Podman,
    Docker,
}

impl EngineKind {
    /// Every engine the kit runs, in the order [`all`] returns them.
    pub const ALL: [EngineKind; 2] = [EngineKind::Podman, EngineKind::Docker];

    /// `podman` or `docker`: the CLI's name, and what the container
    /// runtime reports as the engine's name.
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Podman => "podman",
            EngineKind::Docker => "docker",
        }
    }
}

/// An engine that answers, for tests written once for both.
#[derive(Debug, Clone)]
pub enum TestEngine {
    Podman(PodmanEngine),
    Docker(DockerEngine),
}

/// The engine of `kind`, started if needed; `None` when it is not
/// installed (a panic instead when `CI` is set).
pub fn get(kind: EngineKind) -> Option<TestEngine> {
    match kind {
        EngineKind::Podman => crate::podman::engine().map(TestEngine::Podman),
        EngineKind::Docker => crate::docker::engine().map(TestEngine::Docker),
    }
}

/// Every installed engine, Podman first (under `CI` a missing one panics).
pub fn all() -> Vec<TestEngine> {
    EngineKind::ALL.into_iter().filter_map(get).collect()
}

impl TestEngine {
    pub fn kind(&self) -> EngineKind {
        match self {
            TestEngine::Podman(_) => EngineKind::Podman,
            TestEngine::Docker(_) => EngineKind::Docker,
        }
    }

    /// `podman` or `docker`.
    pub fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// `DOCKER_HOST` for the engine's API socket.
    pub fn docker_host(&self) -> String {
        match self {
            TestEngine::Podman(e) => e.docker_host(),
            TestEngine::Docker(e) => e.docker_host(),
        }
    }

    /// The test image, built on first use: [`BUSYBOX_IMAGE`].
    pub fn busybox_image(&self) -> &'static str {
        match self {
            TestEngine::Podman(e) => e.busybox_image(),
            TestEngine::Docker(e) => e.busybox_image(),
        }
    }

    /// Runs the engine's CLI (`podman args…` / `docker args…`) against the
    /// kit's engine; output and status, not checked.
    pub fn cli(&self, args: &[&str]) -> Output {
        match self {
            TestEngine::Podman(e) => e.podman(args),
            TestEngine::Docker(e) => e.docker(args),
        }
    }

    /// Runs the engine's CLI and returns its standard output; panics with
    /// its standard error when it fails.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        match self {
            TestEngine::Podman(e) => e.podman_ok(args),
            TestEngine::Docker(e) => e.docker_ok(args),
        }
    }

    /// The environment another program needs to use this engine through
    /// its CLI: `CONTAINERS_CONF` for Podman; `DOCKER_HOST`, a `PATH`
    /// whose first `docker` is the daemon's own client and
    /// `DOCKER_BUILDKIT=0` for Docker.
    pub fn cli_env(&self) -> Vec<(String, String)> {
        match self {
            TestEngine::Podman(e) => e.cli_env(),
            TestEngine::Docker(e) => e.cli_env(),
        }
    }

    /// `<cli> <object> inspect name`, or `None` when it does not exist.
    pub fn inspect(&self, object: Object, name: &str) -> Option<serde_json::Value> {
        match self {
            TestEngine::Podman(e) => e.inspect(object, name),
            TestEngine::Docker(e) => e.inspect(object, name),
        }
    }

    /// `<cli> exec container argv…` (output and status, not checked).
    pub fn exec(&self, container: &str, argv: &[&str]) -> Output {
        match self {
            TestEngine::Podman(e) => e.exec(container, argv),
            TestEngine::Docker(e) => e.exec(container, argv),
        }
    }

    /// Names of the objects carrying `label` (`key=value` or `key`), sorted.
    pub fn labelled(&self, object: Object, label: &str) -> Vec<String> {
        match self {
            TestEngine::Podman(e) => e.labelled(object, label),
            TestEngine::Docker(e) => e.labelled(object, label),
        }
    }

    /// Removes every container, network and volume carrying `label`
    /// (test clean-up; errors are ignored).
    pub fn remove_labelled(&self, label: &str) {
        match self {
            TestEngine::Podman(e) => e.remove_labelled(label),
            TestEngine::Docker(e) => e.remove_labelled(label),
        }
    }
}
