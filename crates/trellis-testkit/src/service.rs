//! A server process the kit starts once and shares between test binaries
//! (PostgreSQL, SeaweedFS), the way [`crate::docker`] shares its daemon:
//! its files live in the kit's directory under the service's name, a
//! process that uses it holds a shared `flock` on `<name>-users.lock` for
//! the rest of its life, it is started under an exclusive `flock` on
//! `<name>-service.lock`, and a watchdog (`src/service-watchdog.sh`) stops
//! it two minutes after its last user is gone.

use std::collections::HashMap;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use crate::shared::{self, Lock};

/// Seconds without any user after which the watchdog stops a service.
pub const SERVICE_IDLE_SECS: u32 = 120;

const WATCH_POLL_SECS: u32 = 5;

const WATCHDOG: &str = include_str!("service-watchdog.sh");

/// One shared service; see the module docs.
#[derive(Debug, Clone)]
pub(crate) struct Service {
    pub name: &'static str,
    pub dir: PathBuf,
}

impl Service {
    pub fn new(name: &'static str) -> Service {
        Service {
            name,
            dir: shared::kit_dir(),
        }
    }

    /// `<dir>/<name><suffix>`, e.g. `postgres-data`, `postgres.pid`.
    pub fn path(&self, suffix: &str) -> PathBuf {
        self.dir.join(format!("{}{suffix}", self.name))
    }

    /// Holds a shared lock on the users file until this process ends, and
    /// touches the file, so that the watchdog leaves the service running.
    pub fn join_users(&self) {
        static USERS: OnceLock<Mutex<HashMap<&'static str, Lock>>> = OnceLock::new();
        let users = USERS.get_or_init(|| Mutex::new(HashMap::new()));
        let mut users = users.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.path("-users.lock");
        let lock = users.entry(self.name).or_insert_with(|| Lock::share(&path));
        if let Err(e) = lock.file().set_modified(SystemTime::now()) {
            panic!("trellis-testkit: cannot touch {}: {e}", path.display());
        }
    }

    /// The pid in `<name>.pid`, if that process runs.
    pub fn pid(&self) -> Option<u32> {
        let pid: u32 = fs::read_to_string(self.path(".pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        running(pid).then_some(pid)
    }

    /// Makes sure the service runs and answers (`ready`), starting it with
    /// `start` (which returns its pid) under the service lock if needed,
    /// with a watchdog that stops it with `signal` when idle.
    pub fn ensure(&self, ready: impl Fn() -> bool, start: impl FnOnce() -> u32, signal: &str) {
        self.join_users();
        if self.pid().is_some() && self.watchdog_running() && ready() {
            return;
        }
        let _lock = Lock::take(&self.path("-service.lock"));
        if let Some(pid) = self.pid() {
            if ready() {
                if !self.watchdog_running() {
                    self.spawn_watchdog(pid, signal);
                }
                return;
            }
            eprintln!(
                "trellis-testkit: {} {pid} runs but does not answer; killing it",
                self.name
            );
            kill(pid, "KILL");
            wait_gone(pid, Duration::from_secs(10));
        }
        let pid = start();
        if let Err(e) = fs::write(self.path(".pid"), format!("{pid}\n")) {
            panic!(
                "trellis-testkit: cannot write {}: {e}",
                self.path(".pid").display()
            );
        }
        self.spawn_watchdog(pid, signal);
    }

    fn watchdog_running(&self) -> bool {
        fs::read_to_string(self.path("-watchdog.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            .is_some_and(|pid| {
                running(pid)
                    && fs::read(format!("/proc/{pid}/cmdline"))
                        .is_ok_and(|c| String::from_utf8_lossy(&c).contains("service-watchdog.sh"))
            })
    }

    fn spawn_watchdog(&self, pid: u32, signal: &str) {
        let script = self.dir.join("service-watchdog.sh");
        shared::write_if_changed(&script, WATCHDOG, 0o755);
        let (log, log_err) = shared::log_pair(&self.path("-watchdog.log"));
        let spawned = Command::new("sh")
            .arg(&script)
            .arg(&self.dir)
            .arg(self.name)
            .args([
                pid.to_string(),
                SERVICE_IDLE_SECS.to_string(),
                WATCH_POLL_SECS.to_string(),
                signal.to_owned(),
            ])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) => panic!(
                "trellis-testkit: cannot start the watchdog of {}: {e}",
                self.name
            ),
        };
        let pid_file = self.path("-watchdog.pid");
        if let Err(e) = fs::write(&pid_file, format!("{}\n", child.id())) {
            panic!("trellis-testkit: cannot write {}: {e}", pid_file.display());
        }
        reap_later(child);
    }
}

/// Whether `pid` runs (a zombie does not).
pub(crate) fn running(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    stat.rsplit_once(") ")
        .is_some_and(|(_, rest)| !rest.starts_with('Z'))
}

/// Sends signal `name` (`KILL`, `INT`, …) to `pid`.
pub(crate) fn kill(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

/// Waits until `pid` is gone; panics after `timeout`.
pub(crate) fn wait_gone(pid: u32, timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    while running(pid) {
        if std::time::Instant::now() > deadline {
            panic!(
                "trellis-testkit: process {pid} is still there {timeout:?} after it was told to stop"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Detached children outlive this process on purpose; reap them if they
/// end first, so that they do not linger as zombies.
pub(crate) fn reap_later(mut child: Child) {
    std::thread::spawn(move || child.wait());
}

/// A TCP port on 127.0.0.1 nobody listens on now (and, with `plus`, the
/// port `plus` above it too: SeaweedFS serves gRPC 10,000 ports above each
/// HTTP port).
pub fn free_port(plus: Option<u16>) -> u16 {
    for _ in 0..200 {
        let Ok(listener) = std::net::TcpListener::bind("127.0.0.1:0") else {
            continue;
        };
        let Ok(addr) = listener.local_addr() else {
            continue;
        };
        let port = addr.port();
        match plus {
            None => return port,
            Some(plus) => {
                let Some(other) = port.checked_add(plus) else {
                    continue;
                };
                if std::net::TcpListener::bind(("127.0.0.1", other)).is_ok() {
                    return port;
                }
            }
        }
    }
    panic!("trellis-testkit: found no free port on 127.0.0.1");
}

/// Waits until something accepts TCP connections on `127.0.0.1:port`.
pub(crate) fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Creates `dir` owned by `user` (and mode 0700).
pub(crate) fn owned_dir(dir: &Path, user: &str) {
    if let Err(e) = fs::create_dir_all(dir) {
        panic!("trellis-testkit: cannot create {}: {e}", dir.display());
    }
    let status = Command::new("chown")
        .arg("-R")
        .arg(format!("{user}:{user}"))
        .arg(dir)
        .status();
    if !status.is_ok_and(|s| s.success()) {
        panic!(
            "trellis-testkit: cannot give {} to user {user}",
            dir.display()
        );
    }
    use std::os::unix::fs::PermissionsExt;
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_is_valid_shell() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("w.sh");
        fs::write(&script, WATCHDOG).unwrap();
        let status = Command::new("sh").arg("-n").arg(&script).status().unwrap();
        assert!(status.success());
    }

    #[test]
    fn free_ports_are_free() {
        let port = free_port(Some(10_000));
        assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok());
        assert!(std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok());
    }
}
