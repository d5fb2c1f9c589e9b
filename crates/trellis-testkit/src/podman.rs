//! A Podman API service for container tests, shared by every test binary.
//!
//! [`engine`] makes sure Podman's Docker-compatible API service answers on
//! `/run/trellis-test/podman.sock` (directory overridable with
//! `TRELLIS_TEST_DIR`) and returns a [`PodmanEngine`] for it. The service is
//! started detached (its own process group, output in `podman-service.log`
//! next to the socket) with `--time=120`, so it outlives the test binary
//! that started it, serves the ones that follow, and exits on its own once
//! idle for two minutes. Concurrent callers — threads of one test binary or
//! several binaries — are serialised by `flock` on lock files in the same
//! directory, so exactly one service is started and the test image is built
//! once.
//!
//! The machines Trellis is developed and tested on need two adjustments
//! (see `ENVIRONMENT.md`): the OCI runtime is `runc` (the default `crun`
//! fails there) and containers may not raise rlimits. Both are set in a
//! `containers.conf` the kit writes next to the socket and hands to every
//! podman process it starts through `CONTAINERS_CONF`; run podman by hand
//! against the same storage with that variable too:
//!
//! ```text
//! CONTAINERS_CONF=/run/trellis-test/containers.conf podman ps -a
//! ```
//!
//! Without podman installed, [`engine`] returns `None` so a developer's
//! machine without it can still run the other tests — except when `CI` is
//! set: there it panics, because container tests must not be skipped
//! silently in CI.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use crate::engines::{BUSYBOX_IMAGE, Object};
pub use crate::shared::DEFAULT_DIR;
use crate::shared::{self, Lock, answers, tail};

/// The `containers.conf` every podman process of the kit runs with.
pub const CONTAINERS_CONF: &str = "\
# Written by trellis-testkit. The default OCI runtime (crun) fails on the
# test machines, and containers there may not raise rlimits above the host's.
[containers]
default_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]

[engine]
runtime = \"runc\"
";

/// Idle seconds after which the API service exits on its own.
const SERVICE_IDLE_SECS: u32 = 120;

/// How long a freshly started service may take to answer.
const SERVICE_START_TIMEOUT: Duration = Duration::from_secs(30);

/// A Podman API service that answers; see the module docs.
#[derive(Debug, Clone)]
pub struct PodmanEngine {
    dir: PathBuf,
}

/// Podman's API service for tests, started if needed; `None` when podman
/// is not installed (a panic instead when `CI` is set).
pub fn engine() -> Option<PodmanEngine> {
    if shared::find_program("podman", &[]).is_none() {
        return shared::unavailable(
            "podman is not installed",
            "install it with `apt-get install -y podman runc busybox-static`",
        );
    }
    let engine = PodmanEngine {
        dir: shared::kit_dir(),
    };
    engine.write_conf();
    engine.ensure_service();
    Some(engine)
}

impl PodmanEngine {
    /// `DOCKER_HOST` for the service, e.g. `unix:///run/trellis-test/podman.sock`.
    pub fn docker_host(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// The service's socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("podman.sock")
    }

    /// The `containers.conf` to run podman with (`CONTAINERS_CONF`).
    pub fn containers_conf(&self) -> PathBuf {
        self.dir.join("containers.conf")
    }

    /// The test image, built on first use (once, even under concurrent
    /// test binaries): [`BUSYBOX_IMAGE`].
    pub fn busybox_image(&self) -> &'static str {
        static BUILT: OnceLock<()> = OnceLock::new();
        BUILT.get_or_init(|| self.build_busybox());
        BUSYBOX_IMAGE
    }

    /// Runs `podman args…` with the kit's `CONTAINERS_CONF`.
    pub fn podman(&self, args: &[&str]) -> Output {
        match self.command(args).stdin(Stdio::null()).output() {
            Ok(output) => output,
            Err(e) => panic!("trellis-testkit: cannot run podman {args:?}: {e}"),
        }
    }

    /// Runs `podman args…` and returns its standard output; panics with its
    /// standard error when it fails.
    pub fn podman_ok(&self, args: &[&str]) -> String {
        shared::stdout_ok("podman", args, self.podman(args))
    }

    /// The environment another program needs to run podman against the
    /// kit's storage and settings: `CONTAINERS_CONF`.
    pub fn cli_env(&self) -> Vec<(String, String)> {
        vec![(
            "CONTAINERS_CONF".to_owned(),
            self.containers_conf().display().to_string(),
        )]
    }

    /// `podman <object> inspect name`, or `None` when it does not exist.
    pub fn inspect(&self, object: Object, name: &str) -> Option<serde_json::Value> {
        shared::inspect(|args| self.podman(args), object, name)
    }

    /// `podman exec container argv…` (output and status, not checked).
    pub fn exec(&self, container: &str, argv: &[&str]) -> Output {
        let mut args = vec!["exec", container];
        args.extend_from_slice(argv);
        self.podman(&args)
    }

    /// Names of the objects carrying `label` (`key=value` or `key`).
    pub fn labelled(&self, object: Object, label: &str) -> Vec<String> {
        shared::labelled(|args| self.podman_ok(args), object, label)
    }

    /// Removes every container, network and volume carrying `label`
    /// (test clean-up; errors are ignored).
    pub fn remove_labelled(&self, label: &str) {
        for name in self.labelled(Object::Container, label) {
            let _ = self.podman(&["rm", "-f", "-t", "0", &name]);
        }
        for name in self.labelled(Object::Network, label) {
            let _ = self.podman(&["network", "rm", "-f", &name]);
        }
        for name in self.labelled(Object::Volume, label) {
            let _ = self.podman(&["volume", "rm", "-f", &name]);
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("podman");
        command
            .args(args)
            .env("CONTAINERS_CONF", self.containers_conf());
        command
    }

    fn write_conf(&self) {
        shared::write_if_changed(&self.containers_conf(), CONTAINERS_CONF, 0o644);
    }

    fn ensure_service(&self) {
        let socket = self.socket();
        if answers(&socket) {
            return;
        }
        let _lock = Lock::take(&self.dir.join("service.lock"));
        if answers(&socket) {
            return;
        }
        let _ = fs::remove_file(&socket);
        let log_path = self.dir.join("podman-service.log");
        let (log, log_err) = shared::log_pair(&log_path);
        let time = format!("--time={SERVICE_IDLE_SECS}");
        let address = self.docker_host();
        let spawned = self
            .command(&["system", "service", &time, &address])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Its own process group: a Ctrl-C meant for the tests does not
            // stop the service other test binaries may be using.
            .process_group(0)
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => panic!("trellis-testkit: cannot start `podman system service`: {e}"),
        };
        let deadline = Instant::now() + SERVICE_START_TIMEOUT;
        loop {
            if answers(&socket) {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "trellis-testkit: `podman system service` exited at once ({status}); its \
                     log {} says: {}",
                    log_path.display(),
                    tail(&log_path)
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "trellis-testkit: `podman system service` did not answer on {} within {:?}; \
                     its log {} says: {}",
                    socket.display(),
                    SERVICE_START_TIMEOUT,
                    log_path.display(),
                    tail(&log_path)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // The service outlives this process on purpose; reap it if it
        // exits first so it does not linger as a zombie.
        std::thread::spawn(move || child.wait());
    }

    fn build_busybox(&self) {
        let _lock = Lock::take(&self.dir.join("image.lock"));
        if self
            .podman(&["image", "exists", BUSYBOX_IMAGE])
            .status
            .success()
        {
            return;
        }
        shared::import_busybox(
            "podman",
            self.command(&[
                "import",
                "--change",
                "CMD=[\"/bin/sh\"]",
                "-",
                BUSYBOX_IMAGE,
            ]),
        );
    }
}
