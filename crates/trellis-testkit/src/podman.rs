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

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rustix::fs::{FlockOperation, flock};

/// The test image [`PodmanEngine::busybox_image`] provides: a root file
/// system holding only a static busybox and its applets.
pub const BUSYBOX_IMAGE: &str = "localhost/trellis-test/busybox:1";

/// Where the socket, the config, the lock files and the service's log live
/// unless `TRELLIS_TEST_DIR` says otherwise.
pub const DEFAULT_DIR: &str = "/run/trellis-test";

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

/// Applets linked into the test image (`/bin/<applet>` → `busybox`).
const APPLETS: &[&str] = &[
    "sh", "ash", "cat", "cp", "date", "echo", "env", "false", "grep", "head", "hostname", "httpd",
    "id", "kill", "ls", "mkdir", "nc", "nslookup", "ping", "printf", "ps", "rm", "seq", "sleep",
    "tail", "test", "touch", "true", "wc", "wget",
];

/// A Podman API service that answers; see the module docs.
#[derive(Debug, Clone)]
pub struct PodmanEngine {
    dir: PathBuf,
}

/// Podman's API service for tests, started if needed; `None` when podman
/// is not installed (a panic instead when `CI` is set).
pub fn engine() -> Option<PodmanEngine> {
    if !podman_installed() {
        if std::env::var_os("CI").is_some() {
            panic!(
                "podman is not installed, and container tests must not be skipped in CI (CI is \
                 set); install it with `apt-get install -y podman runc busybox-static`"
            );
        }
        eprintln!(
            "trellis-testkit: podman is not installed; skipping this container test (install \
             podman, runc and busybox-static to run it)"
        );
        return None;
    }
    let dir = std::env::var_os("TRELLIS_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR));
    if let Err(e) = fs::create_dir_all(&dir) {
        panic!(
            "trellis-testkit: cannot create {} ({e}); run the container tests as root or set \
             TRELLIS_TEST_DIR to a writable directory",
            dir.display()
        );
    }
    let engine = PodmanEngine { dir };
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
        let output = self.podman(args);
        if !output.status.success() {
            panic!(
                "trellis-testkit: podman {args:?} failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `podman <object> inspect name`, or `None` when it does not exist.
    pub fn inspect(&self, object: Object, name: &str) -> Option<serde_json::Value> {
        let output = self.podman(&[object.as_str(), "inspect", name]);
        if !output.status.success() {
            return None;
        }
        let value: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
        match value {
            serde_json::Value::Array(mut items) if !items.is_empty() => Some(items.remove(0)),
            _ => None,
        }
    }

    /// `podman exec container argv…` (output and status, not checked).
    pub fn exec(&self, container: &str, argv: &[&str]) -> Output {
        let mut args = vec!["exec", container];
        args.extend_from_slice(argv);
        self.podman(&args)
    }

    /// Names of the objects carrying `label` (`key=value` or `key`).
    pub fn labelled(&self, object: Object, label: &str) -> Vec<String> {
        let filter = format!("label={label}");
        let out = match object {
            Object::Container => {
                self.podman_ok(&["ps", "-a", "--filter", &filter, "--format", "{{.Names}}"])
            }
            Object::Network => self.podman_ok(&[
                "network",
                "ls",
                "--filter",
                &filter,
                "--format",
                "{{.Name}}",
            ]),
            Object::Volume => {
                self.podman_ok(&["volume", "ls", "--filter", &filter, "--format", "{{.Name}}"])
            }
            Object::Image => self.podman_ok(&[
                "images",
                "--filter",
                &filter,
                "--format",
                "{{.Repository}}:{{.Tag}}",
            ]),
        };
        let mut names: Vec<String> = out
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        names.sort();
        names
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
        let path = self.containers_conf();
        if fs::read_to_string(&path).is_ok_and(|now| now == CONTAINERS_CONF) {
            return;
        }
        let _lock = Lock::take(&self.dir.join("conf.lock"));
        let tmp = self
            .dir
            .join(format!("containers.conf.{}", std::process::id()));
        let written = fs::write(&tmp, CONTAINERS_CONF).and_then(|()| fs::rename(&tmp, &path));
        if let Err(e) = written {
            panic!("trellis-testkit: cannot write {}: {e}", path.display());
        }
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
        let log = match OpenOptions::new().create(true).append(true).open(&log_path) {
            Ok(log) => log,
            Err(e) => panic!("trellis-testkit: cannot open {}: {e}", log_path.display()),
        };
        let log_err = match log.try_clone() {
            Ok(log) => log,
            Err(e) => panic!("trellis-testkit: cannot open {}: {e}", log_path.display()),
        };
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
        let rootfs = busybox_rootfs();
        let mut child = match self
            .command(&[
                "import",
                "--change",
                "CMD=[\"/bin/sh\"]",
                "-",
                BUSYBOX_IMAGE,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(child) => child,
            Err(e) => panic!("trellis-testkit: cannot run podman import: {e}"),
        };
        if let Some(mut stdin) = child.stdin.take()
            && let Err(e) = stdin.write_all(&rootfs)
        {
            panic!("trellis-testkit: cannot feed podman import: {e}");
        }
        let output = match child.wait_with_output() {
            Ok(output) => output,
            Err(e) => panic!("trellis-testkit: podman import failed: {e}"),
        };
        if !output.status.success() {
            panic!(
                "trellis-testkit: podman import of {BUSYBOX_IMAGE} failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
    }
}

/// Kinds of podman objects the helpers inspect and list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Object {
    Container,
    Network,
    Volume,
    Image,
}

impl Object {
    fn as_str(self) -> &'static str {
        match self {
            Object::Container => "container",
            Object::Network => "network",
            Object::Volume => "volume",
            Object::Image => "image",
        }
    }
}

fn podman_installed() -> bool {
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| dir.join("podman").is_file())
}

/// Whether an API service answers `GET /_ping` on `socket`.
fn answers(socket: &Path) -> bool {
    let Ok(mut stream) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    if stream
        .write_all(b"GET /_ping HTTP/1.1\r\nHost: podman\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response);
    response.starts_with("HTTP/1.1 200") && response.contains("OK")
}

/// The last lines of a log file, for a panic message.
fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// An exclusive `flock` held until dropped.
struct Lock(File);

impl Lock {
    fn take(path: &Path) -> Lock {
        let file = match OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
        {
            Ok(file) => file,
            Err(e) => panic!("trellis-testkit: cannot open {}: {e}", path.display()),
        };
        if let Err(e) = flock(&file, FlockOperation::LockExclusive) {
            panic!("trellis-testkit: cannot lock {}: {e}", path.display());
        }
        Lock(file)
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = flock(&self.0, FlockOperation::Unlock);
    }
}

/// The static busybox the test image is made of.
const BUSYBOX_BINARY: &str = "/bin/busybox";

/// A tar of the test image's root file system.
fn busybox_rootfs() -> Vec<u8> {
    let busybox = match fs::read(BUSYBOX_BINARY) {
        Ok(bytes) => bytes,
        Err(e) => panic!(
            "trellis-testkit: cannot read {BUSYBOX_BINARY} ({e}); install it with `apt-get \
             install -y busybox-static`"
        ),
    };
    if has_interpreter(&busybox) {
        panic!(
            "trellis-testkit: {BUSYBOX_BINARY} is dynamically linked and cannot run in an empty \
             image; install the static one with `apt-get install -y busybox-static`"
        );
    }
    let mut tar = tar::Builder::new(Vec::new());
    let mut append = |path: &str, kind: tar::EntryType, mode: u32, data: &[u8], link: &str| {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_size(data.len() as u64);
        let result = if kind == tar::EntryType::Symlink {
            tar.append_link(&mut header, path, link)
        } else {
            tar.append_data(&mut header, path, data)
        };
        if let Err(e) = result {
            panic!("trellis-testkit: cannot build the test image's tar ({path}): {e}");
        }
    };
    for dir in ["bin", "etc", "root", "www", "data", "var", "var/run"] {
        append(dir, tar::EntryType::Directory, 0o755, &[], "");
    }
    append("tmp", tar::EntryType::Directory, 0o1777, &[], "");
    append(
        "etc/passwd",
        tar::EntryType::Regular,
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        "",
    );
    append(
        "etc/group",
        tar::EntryType::Regular,
        0o644,
        b"root:x:0:\nnogroup:x:65534:\n",
        "",
    );
    append("bin/busybox", tar::EntryType::Regular, 0o755, &busybox, "");
    for applet in APPLETS {
        append(
            &format!("bin/{applet}"),
            tar::EntryType::Symlink,
            0o777,
            &[],
            "busybox",
        );
    }
    match tar.into_inner() {
        Ok(bytes) => bytes,
        Err(e) => panic!("trellis-testkit: cannot finish the test image's tar: {e}"),
    }
}

/// Whether an ELF64 little-endian executable names a program interpreter
/// (is dynamically linked).
fn has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u64_at = |at: usize| {
        elf.get(at..at + 8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a) as usize
        })
    };
    if elf.get(..4) != Some(b"\x7fELF") || elf.get(4) != Some(&2) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        elf.get(at..at + 4)
            .is_some_and(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) == PT_INTERP)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_elf_interpreters() {
        assert!(!has_interpreter(b"not an elf"));
        if let Ok(sh) = fs::read("/bin/sh") {
            assert!(has_interpreter(&sh), "/bin/sh is dynamically linked");
        }
    }

    #[test]
    fn the_rootfs_holds_busybox_and_its_applets() {
        if fs::metadata(BUSYBOX_BINARY).is_err() {
            return;
        }
        let tar = busybox_rootfs();
        let mut archive = tar::Archive::new(&tar[..]);
        let paths: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert!(paths.contains(&"bin/busybox".to_owned()));
        assert!(paths.contains(&"bin/httpd".to_owned()));
    }
}
