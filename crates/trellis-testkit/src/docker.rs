//! A Docker Engine daemon for container tests, shared by every test binary.
//!
//! [`engine`] makes sure a `dockerd` of the kit's own answers on
//! `/run/trellis-test/docker.sock` (directory overridable with
//! `TRELLIS_TEST_DIR`) and returns a [`DockerEngine`] for it. Everything of
//! the daemon lives in that directory:
//!
//! | path | what |
//! |---|---|
//! | `docker.sock`, `docker.pid` | its API socket and pid file |
//! | `docker-data/`, `docker-exec/` | its data root (images, volumes) and exec root |
//! | `docker-daemon.json` | its (empty) config, so the host's `/etc/docker/daemon.json` does not apply |
//! | `dockerd.log` | its output |
//! | `docker-bin/docker` | the Docker client that matches it (a symlink) |
//! | `docker-watchdog.sh`, `docker-watchdog.log` | the watchdog that stops it |
//!
//! The daemon is started detached, in its own process group, so it
//! outlives the test binary that started it and serves the ones that
//! follow. Unlike Podman's service, `dockerd` has no idle timeout, so the
//! kit starts a watchdog with it: every process that calls [`engine`]
//! holds a shared `flock` on `docker-users.lock` for the rest of its life,
//! and once nobody has held it for two minutes the watchdog stops the
//! daemon and removes what dockerd leaves behind on the host (`docker0`
//! and the `br-…` bridges, the `DOCKER…` iptables rules and chains, the
//! FORWARD policy it set to DROP, mounts under its directories). The
//! watchdog is a shell script, `src/docker-watchdog.sh`, written next to
//! the socket; it also cleans up after a daemon that died on its own, and
//! the kit does before it starts one. Concurrent callers are serialised
//! by `flock` on `docker-service.lock` (starting and stopping) and
//! `docker-image.lock` (the test image), so exactly one daemon runs and
//! the image is built once.
//!
//! The kit runs Docker's CLI with the client installed next to `dockerd`
//! (`/usr/bin/docker` for `/usr/sbin/dockerd`), not the first `docker` on
//! `PATH`, which may be a newer client than the daemon, and with
//! `DOCKER_BUILDKIT=0`: the classic builder is part of the daemon, and
//! BuildKit would need the buildx plugin. A `FROM scratch` + `COPY`
//! Dockerfile builds for another platform with it (`docker build
//! --platform linux/arm64`). To run another program with this engine's
//! CLI (`trellis push build`), add [`DockerEngine::cli_env`] to its
//! environment. By hand:
//!
//! ```text
//! DOCKER_HOST=unix:///run/trellis-test/docker.sock /usr/bin/docker ps -a
//! ```
//!
//! What a test uses, all on [`DockerEngine`] (the same as on
//! [`crate::podman::PodmanEngine`], and on [`crate::engines::TestEngine`]
//! for tests written once for both engines):
//!
//! - [`DockerEngine::docker_host`] gives `unix:///run/trellis-test/docker.sock`
//!   for the code under test, and [`DockerEngine::socket`] its path.
//! - [`DockerEngine::busybox_image`] gives the test image
//!   ([`BUSYBOX_IMAGE`], imported once with `CMD ["/bin/sh"]`).
//! - [`DockerEngine::docker`] and [`DockerEngine::docker_ok`] run the CLI
//!   (its `Output`, or the standard output of a run that must succeed).
//! - [`DockerEngine::inspect`] gives an object's inspection as JSON, or
//!   `None` when it does not exist; [`DockerEngine::exec`] runs in a
//!   container.
//! - [`DockerEngine::labelled`] lists the names carrying a label, and
//!   [`DockerEngine::remove_labelled`] is a test's clean-up.
//! - [`DockerEngine::cli_env`] gives `DOCKER_HOST`, `PATH` and
//!   `DOCKER_BUILDKIT` for another program, and [`DockerEngine::client`]
//!   the client's path.
//!
//! The daemon must be the only `dockerd` on the machine: two daemons share
//! `docker0` and the `DOCKER` iptables chains, and the clean-up would take
//! them from the other. With another `dockerd` running, without `dockerd`
//! installed, or not as root, [`engine`] returns `None` and says why —
//! except when `CI` is set: there it panics, because container tests must
//! not be skipped silently in CI.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use rustix::process::{Pid, Signal};

pub use crate::engines::{BUSYBOX_IMAGE, Object};
use crate::shared::{self, Lock, answers, tail};

/// Seconds without any user after which the watchdog stops the daemon.
pub const DAEMON_IDLE_SECS: u32 = 120;

/// How often the watchdog looks for users, in seconds.
const WATCH_POLL_SECS: u32 = 5;

/// How long a freshly started daemon may take to answer.
const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(30);

/// The watchdog (see the module docs), written into the kit's directory.
const WATCHDOG: &str = include_str!("docker-watchdog.sh");

/// The daemon's config file: empty, so that none of the host's applies.
const DAEMON_JSON: &str = "{}\n";

/// The containerd namespace of the kit's containers, apart from a system
/// Docker's (`moby`) should dockerd find a system containerd to use.
const CONTAINERD_NAMESPACE: &str = "trellis-test";

/// A Docker Engine daemon that answers; see the module docs.
#[derive(Debug, Clone)]
pub struct DockerEngine {
    dir: PathBuf,
    /// The client installed with the daemon.
    client: PathBuf,
}

/// The kit's Docker daemon, started if needed; `None` when it cannot run
/// here (a panic instead when `CI` is set).
pub fn engine() -> Option<DockerEngine> {
    let Some(dockerd) = shared::find_program("dockerd", &["/usr/sbin", "/usr/bin"]) else {
        return shared::unavailable(
            "Docker Engine (dockerd) is not installed",
            "install it with `apt-get install -y docker.io busybox-static`",
        );
    };
    if !rustix::process::geteuid().is_root() {
        return shared::unavailable(
            "the Docker daemon needs root, and these tests do not run as root",
            "run them as root",
        );
    }
    let client = client_of(&dockerd);
    let engine = DockerEngine {
        dir: shared::kit_dir(),
        client,
    };
    engine.join_users();
    engine.write_files();
    if let Err(why) = engine.ensure_daemon(&dockerd) {
        return shared::unavailable(&why, "stop it (e.g. `systemctl stop docker docker.socket`)");
    }
    Some(engine)
}

impl DockerEngine {
    /// `DOCKER_HOST` for the daemon, e.g. `unix:///run/trellis-test/docker.sock`.
    pub fn docker_host(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// The daemon's socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("docker.sock")
    }

    /// The Docker client the kit runs: the one installed with the daemon.
    pub fn client(&self) -> &Path {
        &self.client
    }

    /// The test image, built on first use (once, even under concurrent
    /// test binaries): [`BUSYBOX_IMAGE`].
    pub fn busybox_image(&self) -> &'static str {
        static BUILT: OnceLock<()> = OnceLock::new();
        BUILT.get_or_init(|| self.build_busybox());
        BUSYBOX_IMAGE
    }

    /// Runs `docker args…` against the kit's daemon.
    pub fn docker(&self, args: &[&str]) -> Output {
        match self.command(args).stdin(Stdio::null()).output() {
            Ok(output) => output,
            Err(e) => panic!(
                "trellis-testkit: cannot run {} {args:?}: {e}",
                self.client.display()
            ),
        }
    }

    /// Runs `docker args…` and returns its standard output; panics with its
    /// standard error when it fails.
    pub fn docker_ok(&self, args: &[&str]) -> String {
        shared::stdout_ok("docker", args, self.docker(args))
    }

    /// The environment another program needs to run `docker` against the
    /// kit's daemon: `DOCKER_HOST`, a `PATH` whose first directory holds
    /// only `docker` (the matching client) and `DOCKER_BUILDKIT=0`.
    pub fn cli_env(&self) -> Vec<(String, String)> {
        let mut path = self.bin_dir().into_os_string();
        if let Some(rest) = std::env::var_os("PATH").filter(|p| !p.is_empty()) {
            path.push(":");
            path.push(rest);
        }
        vec![
            ("DOCKER_HOST".to_owned(), self.docker_host()),
            ("PATH".to_owned(), path.to_string_lossy().into_owned()),
            ("DOCKER_BUILDKIT".to_owned(), "0".to_owned()),
        ]
    }

    /// `docker <object> inspect name`, or `None` when it does not exist.
    pub fn inspect(&self, object: Object, name: &str) -> Option<serde_json::Value> {
        shared::inspect(|args| self.docker(args), object, name)
    }

    /// `docker exec container argv…` (output and status, not checked).
    pub fn exec(&self, container: &str, argv: &[&str]) -> Output {
        let mut args = vec!["exec", container];
        args.extend_from_slice(argv);
        self.docker(&args)
    }

    /// Names of the objects carrying `label` (`key=value` or `key`).
    pub fn labelled(&self, object: Object, label: &str) -> Vec<String> {
        shared::labelled(|args| self.docker_ok(args), object, label)
    }

    /// Removes every container, network and volume carrying `label`
    /// (test clean-up; errors are ignored).
    pub fn remove_labelled(&self, label: &str) {
        for name in self.labelled(Object::Container, label) {
            let _ = self.docker(&["rm", "-f", &name]);
        }
        for name in self.labelled(Object::Network, label) {
            let _ = self.docker(&["network", "rm", &name]);
        }
        for name in self.labelled(Object::Volume, label) {
            let _ = self.docker(&["volume", "rm", "-f", &name]);
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.client);
        command
            .args(args)
            .env("DOCKER_HOST", self.docker_host())
            .env("DOCKER_BUILDKIT", "0");
        command
    }

    fn bin_dir(&self) -> PathBuf {
        self.dir.join("docker-bin")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Holds a shared lock on `docker-users.lock` until this process ends,
    /// and touches the file, so that the watchdog leaves the daemon
    /// running (even for a process shorter than its poll).
    fn join_users(&self) {
        static USERS: OnceLock<Lock> = OnceLock::new();
        let lock = USERS.get_or_init(|| Lock::share(&self.path("docker-users.lock")));
        if let Err(e) = lock.file().set_modified(SystemTime::now()) {
            panic!(
                "trellis-testkit: cannot touch {}: {e}",
                self.path("docker-users.lock").display()
            );
        }
    }

    /// The watchdog, the daemon's config and the client's link, once per
    /// process (other processes write their own temporary files).
    fn write_files(&self) {
        static WRITTEN: OnceLock<()> = OnceLock::new();
        WRITTEN.get_or_init(|| {
            shared::write_if_changed(&self.path("docker-watchdog.sh"), WATCHDOG, 0o755);
            shared::write_if_changed(&self.path("docker-daemon.json"), DAEMON_JSON, 0o644);
            self.link_client();
        });
    }

    /// `docker-bin/docker` → the client, for [`DockerEngine::cli_env`].
    fn link_client(&self) {
        let bin = self.bin_dir();
        let link = bin.join("docker");
        if fs::read_link(&link).is_ok_and(|to| to == self.client) {
            return;
        }
        let tmp = bin.join(format!(".docker.{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        let made = fs::create_dir_all(&bin)
            .and_then(|()| std::os::unix::fs::symlink(&self.client, &tmp))
            .and_then(|()| fs::rename(&tmp, &link));
        if let Err(e) = made {
            panic!(
                "trellis-testkit: cannot link {} to {}: {e}",
                link.display(),
                self.client.display()
            );
        }
    }

    /// Makes sure the daemon answers and a watchdog watches it; `Err` says
    /// why the kit must not start one here.
    fn ensure_daemon(&self, dockerd: &Path) -> Result<(), String> {
        let socket = self.socket();
        if answers(&socket) && self.watchdog_running() {
            return Ok(());
        }
        let _lock = Lock::take(&self.path("docker-service.lock"));
        if answers(&socket) {
            if !self.watchdog_running() {
                // Its watchdog was killed (not stopped: it stops the daemon
                // first); without one the daemon would run forever.
                let Some(pid) = self.daemon_pid() else {
                    panic!(
                        "trellis-testkit: a Docker daemon answers on {} but {} names no running \
                         dockerd; stop it and remove the pid file",
                        socket.display(),
                        self.path("docker.pid").display()
                    );
                };
                self.spawn_watchdog(pid);
            }
            return Ok(());
        }
        self.stop_hung_daemon();
        let others = other_daemons(self.daemon_pid());
        if !others.is_empty() {
            return Err(format!(
                "another Docker daemon runs on this machine (pid {}), and the kit's own would \
                 share docker0 and the DOCKER iptables chains with it",
                others.join(", ")
            ));
        }
        self.prepare_host();
        let pid = self.start_daemon(dockerd);
        self.spawn_watchdog(pid);
        Ok(())
    }

    /// The pid in `docker.pid` when it is a running dockerd.
    fn daemon_pid(&self) -> Option<u32> {
        let pid = read_pid(&self.path("docker.pid"))?;
        (comm(pid).as_deref() == Some("dockerd") && running(pid)).then_some(pid)
    }

    fn watchdog_running(&self) -> bool {
        read_pid(&self.path("docker-watchdog.pid")).is_some_and(|pid| {
            running(pid)
                && fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains("docker-watchdog.sh"))
        })
    }

    /// A daemon of the kit's that runs but does not answer (the kit starts
    /// and the watchdog stops daemons only under the service lock, which
    /// the caller holds: nobody is starting or stopping this one).
    fn stop_hung_daemon(&self) {
        let Some(pid) = self.daemon_pid() else {
            return;
        };
        eprintln!("trellis-testkit: the kit's dockerd {pid} runs but does not answer; killing it");
        if let Some(pid) = Pid::from_raw(pid as i32) {
            let _ = rustix::process::kill_process(pid, Signal::KILL);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while running(pid) {
            if Instant::now() > deadline {
                panic!(
                    "trellis-testkit: dockerd {pid} did not answer, and is still there 10 s \
                     after SIGKILL; stop it by hand"
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Removes what an earlier daemon left behind, and notes the FORWARD
    /// policy to restore once this one stops.
    fn prepare_host(&self) {
        let output = Command::new("sh")
            .arg(self.path("docker-watchdog.sh"))
            .arg("prepare")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .output();
        let log = self.path("docker-watchdog.log");
        match output {
            Ok(output) => {
                let mut text = output.stdout;
                text.extend_from_slice(&output.stderr);
                if !text.is_empty() {
                    let _ = fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&log)
                        .and_then(|mut f| std::io::Write::write_all(&mut f, &text));
                }
                if !output.status.success() {
                    panic!(
                        "trellis-testkit: preparing the host for the Docker daemon failed ({}); \
                         {} says: {}",
                        output.status,
                        log.display(),
                        tail(&log)
                    );
                }
            }
            Err(e) => panic!("trellis-testkit: cannot run sh docker-watchdog.sh prepare: {e}"),
        }
    }

    /// Starts dockerd and waits until it answers; its pid.
    fn start_daemon(&self, dockerd: &Path) -> u32 {
        let socket = self.socket();
        let _ = fs::remove_file(&socket);
        let log_path = self.path("dockerd.log");
        let (log, log_err) = shared::log_pair(&log_path);
        let spawned = Command::new(dockerd)
            .arg("--config-file")
            .arg(self.path("docker-daemon.json"))
            .arg("--data-root")
            .arg(self.path("docker-data"))
            .arg("--exec-root")
            .arg(self.path("docker-exec"))
            .arg("--pidfile")
            .arg(self.path("docker.pid"))
            .arg("--host")
            .arg(self.docker_host())
            .args(["--containerd-namespace", CONTAINERD_NAMESPACE])
            .arg("--containerd-plugins-namespace")
            .arg(format!("{CONTAINERD_NAMESPACE}-plugins"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Its own process group: a Ctrl-C meant for the tests does not
            // stop the daemon other test binaries may be using.
            .process_group(0)
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => panic!("trellis-testkit: cannot start {}: {e}", dockerd.display()),
        };
        let deadline = Instant::now() + DAEMON_START_TIMEOUT;
        while !answers(&socket) {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "trellis-testkit: dockerd exited at once ({status}); its log {} says: {}",
                    log_path.display(),
                    tail(&log_path)
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "trellis-testkit: dockerd did not answer on {} within {:?} (killed it); its \
                     log {} says: {}",
                    socket.display(),
                    DAEMON_START_TIMEOUT,
                    log_path.display(),
                    tail(&log_path)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let pid = child.id();
        reap_later(child);
        pid
    }

    /// Starts the watchdog for dockerd `pid`. Its pid file is written here,
    /// before the caller releases the service lock, so that a concurrent
    /// caller never sees the daemon without its watchdog and starts another.
    fn spawn_watchdog(&self, pid: u32) {
        let (log, log_err) = shared::log_pair(&self.path("docker-watchdog.log"));
        let spawned = Command::new("sh")
            .arg(self.path("docker-watchdog.sh"))
            .arg("watch")
            .arg(&self.dir)
            .args([
                pid.to_string(),
                DAEMON_IDLE_SECS.to_string(),
                WATCH_POLL_SECS.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) => panic!("trellis-testkit: cannot start the Docker daemon's watchdog: {e}"),
        };
        let pid_file = self.path("docker-watchdog.pid");
        if let Err(e) = fs::write(&pid_file, format!("{}\n", child.id())) {
            panic!("trellis-testkit: cannot write {}: {e}", pid_file.display());
        }
        reap_later(child);
    }

    fn build_busybox(&self) {
        let _lock = Lock::take(&self.path("docker-image.lock"));
        if self
            .docker(&["image", "inspect", BUSYBOX_IMAGE])
            .status
            .success()
        {
            return;
        }
        shared::import_busybox(
            "docker",
            self.command(&[
                "import",
                "--change",
                "CMD [\"/bin/sh\"]",
                "-",
                BUSYBOX_IMAGE,
            ]),
        );
    }
}

/// The client that came with `dockerd`: next to it, or in the `bin` beside
/// its `sbin` (Debian's `docker.io`: `/usr/sbin/dockerd`, `/usr/bin/docker`).
fn client_of(dockerd: &Path) -> PathBuf {
    let dir = dockerd.parent().unwrap_or(Path::new("/"));
    let candidates = [dir.join("docker"), dir.join("../bin/docker")];
    match candidates.iter().find(|c| c.is_file()) {
        Some(client) => client.canonicalize().unwrap_or_else(|_| client.clone()),
        None => panic!(
            "trellis-testkit: {} has no Docker client beside it (looked for {} and {}); \
             reinstall it with `apt-get install --reinstall docker.io`",
            dockerd.display(),
            candidates[0].display(),
            candidates[1].display()
        ),
    }
}

/// The detached children outlive this process on purpose; reap them if
/// they end first, so that they do not linger as zombies.
fn reap_later(mut child: Child) {
    std::thread::spawn(move || child.wait());
}

fn read_pid(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn comm(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim().to_owned())
}

/// Whether `pid` runs (a zombie does not).
fn running(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // `pid (comm) S …`: the state follows the last parenthesis.
    stat.rsplit_once(") ")
        .is_some_and(|(_, rest)| !rest.starts_with('Z'))
}

/// Running dockerd processes other than `ours`.
fn other_daemons(ours: Option<u32>) -> Vec<String> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| Some(pid) != ours)
        .filter(|&pid| comm(pid).as_deref() == Some("dockerd") && running(pid))
        .map(|pid| pid.to_string())
        .collect();
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_is_valid_shell() {
        let status = Command::new("sh")
            .args(["-n", "-c", WATCHDOG])
            .status()
            .unwrap();
        assert!(status.success());
    }

    #[test]
    fn a_zombie_is_not_running() {
        assert!(running(std::process::id()));
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(5);
        while running(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!running(pid), "an exited, unreaped child counts as gone");
        child.wait().unwrap();
    }

    #[test]
    fn the_client_is_found_beside_or_above_dockerd() {
        let root = tempfile::tempdir().unwrap();
        let sbin = root.path().join("sbin");
        let bin = root.path().join("bin");
        fs::create_dir_all(&sbin).unwrap();
        fs::create_dir_all(&bin).unwrap();
        fs::write(sbin.join("dockerd"), "").unwrap();
        fs::write(bin.join("docker"), "").unwrap();
        assert_eq!(
            client_of(&sbin.join("dockerd")),
            bin.join("docker").canonicalize().unwrap()
        );
        fs::write(sbin.join("docker"), "").unwrap();
        assert_eq!(
            client_of(&sbin.join("dockerd")),
            sbin.join("docker").canonicalize().unwrap()
        );
    }
}
