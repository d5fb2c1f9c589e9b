//! PostgreSQL for tests: a throwaway cluster started once per test run and
//! shared by every test binary ([`server`]), a fresh database per test
//! ([`TestPostgres::database`]), and private clusters for the tests that stop
//! or restart the server under a hub ([`PrivatePostgres`]).
//!
//! Debian's `postgresql` package (binaries in `/usr/lib/postgresql/<v>/bin`)
//! refuses to run as root, so the kit runs `initdb` and `pg_ctl` as user
//! `postgres` (`runuser`), which must own the cluster's directory. The
//! server listens on 127.0.0.1 on a free port and on a socket in its own
//! directory (`-k`). Connections over TCP need a password (SCRAM), as on a
//! real server: tests connect as `trellis` (password `trellis`, allowed to
//! create databases), and a wrong password is refused. The shared cluster
//! is `/run/trellis-test/postgres-data` (`TRELLIS_TEST_DIR`), made afresh
//! whenever it is started, and stopped by the kit's watchdog two minutes
//! after its last user; it runs with `fsync=off`, since it holds only
//! test data and test databases come and go by the hundred. Private
//! clusters run with the defaults, since their tests restart the server
//! and check nothing acknowledged is lost.
//!
//! Without PostgreSQL or root the tests that need it say they were
//! skipped — except when `CI` is set, where they fail.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::service::{self, Service};
use crate::shared;

/// The role tests connect as, and its password.
pub const USER: &str = "trellis";
pub const PASSWORD: &str = "trellis";

/// The shared test server; see the module docs.
#[derive(Debug)]
pub struct TestPostgres {
    port: u16,
    socket_dir: PathBuf,
    bin: PathBuf,
}

/// The shared cluster, started if needed; `None` when it cannot run here
/// (a panic instead when `CI` is set).
pub fn server() -> Option<&'static TestPostgres> {
    static SERVER: OnceLock<Option<TestPostgres>> = OnceLock::new();
    SERVER.get_or_init(start_shared).as_ref()
}

fn start_shared() -> Option<TestPostgres> {
    let bin = match preflight() {
        Ok(bin) => bin,
        Err((what, remedy)) => return shared::unavailable(&what, &remedy),
    };
    let service = Service::new("postgres");
    let data = service.path("-data");
    let socket_dir = service.path("-socket");
    let port_file = service.path(".port");
    let ready = || read_port(&port_file).is_some_and(|port| answers(&bin, &socket_dir, port));
    service.ensure(
        ready,
        || {
            // A fresh cluster every time it starts: what an earlier run
            // left is of no use.
            let _ = fs::remove_dir_all(&data);
            let _ = fs::remove_dir_all(&socket_dir);
            let port = service::free_port(None);
            init_cluster(&bin, &data, &socket_dir);
            start_postmaster(
                &bin,
                &data,
                &socket_dir,
                port,
                &service.path(".log"),
                &["-c", "fsync=off", "-c", "full_page_writes=off"],
            );
            let pid = postmaster_pid(&data);
            create_role(&bin, &socket_dir, port);
            if let Err(e) = fs::write(&port_file, format!("{port}\n")) {
                panic!("trellis-testkit: cannot write {}: {e}", port_file.display());
            }
            pid
        },
        // Fast shutdown: connections are ended, nothing waits for them.
        "INT",
    );
    let port = read_port(&port_file)
        .unwrap_or_else(|| panic!("trellis-testkit: {} is missing", port_file.display()));
    Some(TestPostgres {
        port,
        socket_dir,
        bin,
    })
}

impl TestPostgres {
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `db` as the test role.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{USER}:{PASSWORD}@127.0.0.1:{}/{db}", self.port)
    }

    /// A new, empty database of the test's own, dropped when the returned
    /// value is.
    pub fn database(&'static self) -> TestDatabase {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "t_{}_{}_{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        self.sql(&format!("CREATE DATABASE {name} OWNER {USER}"));
        TestDatabase {
            url: self.url(&name),
            name,
            server: self,
        }
    }

    /// Runs `sql` as the superuser (over the socket).
    pub fn sql(&self, sql: &str) -> String {
        psql(&self.bin, &self.socket_dir, self.port, "postgres", sql)
    }
}

/// One test's database; see [`TestPostgres::database`].
#[derive(Debug)]
pub struct TestDatabase {
    pub name: String,
    /// `postgres://trellis:trellis@127.0.0.1:PORT/NAME`
    pub url: String,
    server: &'static TestPostgres,
}

impl TestDatabase {
    /// Runs `sql` in this database as the superuser; its output (`psql -At`).
    pub fn sql(&self, sql: &str) -> String {
        psql(
            &self.server.bin,
            &self.server.socket_dir,
            self.server.port,
            &self.name,
            sql,
        )
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Best effort: the cluster goes with its next start anyway.
        let _ = run_psql(
            &self.server.bin,
            &self.server.socket_dir,
            self.server.port,
            "postgres",
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

/// A cluster of one test's own, for tests that stop, kill or restart the
/// server. Stopped (SIGQUIT) and removed when dropped.
#[derive(Debug)]
pub struct PrivatePostgres {
    dir: tempfile::TempDir,
    port: u16,
    bin: PathBuf,
}

impl PrivatePostgres {
    /// A new cluster with database `trellis`; `None` when PostgreSQL
    /// cannot run here (a panic under `CI`).
    pub fn start() -> Option<PrivatePostgres> {
        let bin = match preflight() {
            Ok(bin) => bin,
            Err((what, remedy)) => return shared::unavailable(&what, &remedy),
        };
        let base = shared::kit_dir().join("postgres-private");
        let _ = fs::create_dir_all(&base);
        let dir = tempfile::Builder::new()
            .prefix("pg-")
            .tempdir_in(&base)
            .unwrap_or_else(|e| {
                panic!(
                    "trellis-testkit: cannot make a directory in {}: {e}",
                    base.display()
                )
            });
        service::owned_dir(dir.path(), "postgres");
        let port = service::free_port(None);
        let cluster = PrivatePostgres { dir, port, bin };
        init_cluster(&cluster.bin, &cluster.data(), &cluster.socket_dir());
        cluster.start_server();
        create_role(&cluster.bin, &cluster.socket_dir(), port);
        psql(
            &cluster.bin,
            &cluster.socket_dir(),
            port,
            "postgres",
            &format!("CREATE DATABASE trellis OWNER {USER}"),
        );
        Some(cluster)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("socket")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `trellis`.
    pub fn url(&self) -> String {
        format!(
            "postgres://{USER}:{PASSWORD}@127.0.0.1:{}/trellis",
            self.port
        )
    }

    /// Runs `sql` in database `trellis` as the superuser.
    pub fn sql(&self, sql: &str) -> String {
        psql(&self.bin, &self.socket_dir(), self.port, "trellis", sql)
    }

    fn start_server(&self) {
        start_postmaster(
            &self.bin,
            &self.data(),
            &self.socket_dir(),
            self.port,
            &self.dir.path().join("postgres.log"),
            &[],
        );
    }

    /// Starts the server again (after [`PrivatePostgres::stop`]), on the
    /// same port and data.
    pub fn resume(&self) {
        self.start_server();
    }

    /// Stops the server: `fast` ends every connection and writes a
    /// checkpoint; otherwise `immediate`, a crash as far as the data is
    /// concerned (recovered from the WAL at the next start).
    pub fn stop(&self, fast: bool) {
        let mode = if fast { "fast" } else { "immediate" };
        let output = as_postgres(
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                &self.data().to_string_lossy(),
                "-m",
                mode,
                "-w",
                "stop",
            ],
        );
        if !output.status.success() {
            panic!(
                "trellis-testkit: pg_ctl stop failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if let Ok(text) = fs::read_to_string(self.data().join("postmaster.pid"))
            && let Some(pid) = text
                .lines()
                .next()
                .and_then(|l| l.trim().parse::<u32>().ok())
        {
            service::kill(pid, "QUIT");
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while service::running(pid) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// The binaries' directory, or why PostgreSQL cannot run here.
fn preflight() -> Result<PathBuf, (String, String)> {
    let install = "install it with `apt-get install -y postgresql` (as .ci/install-test-deps does)";
    let Some(bin) = bin_dir() else {
        return Err(("PostgreSQL is not installed".into(), install.into()));
    };
    if !rustix::process::geteuid().is_root() {
        return Err((
            "the PostgreSQL tests start a server as user postgres, which needs root".into(),
            "run them as root".into(),
        ));
    }
    let has_user = Command::new("id")
        .arg("postgres")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_user {
        return Err(("there is no user postgres".into(), install.into()));
    }
    Ok(bin)
}

/// The newest `/usr/lib/postgresql/<version>/bin` that has `initdb`.
fn bin_dir() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

fn read_port(path: &Path) -> Option<u16> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn as_postgres(program: &Path, args: &[&str]) -> Output {
    Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        // The server outlives this process; a Ctrl-C for the tests must
        // not reach it.
        .process_group(0)
        .output()
        .unwrap_or_else(|e| panic!("trellis-testkit: cannot run {}: {e}", program.display()))
}

fn init_cluster(bin: &Path, data: &Path, socket_dir: &Path) {
    let parent = data.parent().unwrap_or(Path::new("/"));
    if !parent.exists() {
        service::owned_dir(parent, "postgres");
    }
    service::owned_dir(data, "postgres");
    service::owned_dir(socket_dir, "postgres");
    let output = as_postgres(
        &bin.join("initdb"),
        &[
            "-D",
            &data.to_string_lossy(),
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--no-instructions",
        ],
    );
    if !output.status.success() {
        panic!(
            "trellis-testkit: initdb {} failed: {}",
            data.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

fn start_postmaster(
    bin: &Path,
    data: &Path,
    socket_dir: &Path,
    port: u16,
    log: &Path,
    extra: &[&str],
) {
    let mut options = format!(
        "-c listen_addresses=127.0.0.1 -p {port} -k {} -c max_connections=500",
        socket_dir.display()
    );
    for pair in extra.chunks(2) {
        options.push_str(&format!(
            " {} {}",
            pair[0],
            pair.get(1).copied().unwrap_or("")
        ));
    }
    // The log must be writable by postgres.
    let _ = fs::File::create(log);
    let _ = Command::new("chown")
        .arg("postgres:postgres")
        .arg(log)
        .status();
    let output = as_postgres(
        &bin.join("pg_ctl"),
        &[
            "-D",
            &data.to_string_lossy(),
            "-l",
            &log.to_string_lossy(),
            "-o",
            &options,
            "-w",
            "-t",
            "60",
            "start",
        ],
    );
    if !output.status.success() {
        panic!(
            "trellis-testkit: PostgreSQL did not start ({}); {} says: {}",
            String::from_utf8_lossy(&output.stderr).trim(),
            log.display(),
            shared::tail(log)
        );
    }
    if !service::wait_for_port(port, Duration::from_secs(30)) {
        panic!(
            "trellis-testkit: PostgreSQL does not accept connections on 127.0.0.1:{port}; {} says: {}",
            log.display(),
            shared::tail(log)
        );
    }
}

fn postmaster_pid(data: &Path) -> u32 {
    fs::read_to_string(data.join("postmaster.pid"))
        .ok()
        .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()))
        .unwrap_or_else(|| {
            panic!(
                "trellis-testkit: {} names no postmaster",
                data.join("postmaster.pid").display()
            )
        })
}

fn create_role(bin: &Path, socket_dir: &Path, port: u16) {
    psql(
        bin,
        socket_dir,
        port,
        "postgres",
        &format!("CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}' CREATEDB"),
    );
}

fn answers(bin: &Path, socket_dir: &Path, port: u16) -> bool {
    run_psql(bin, socket_dir, port, "postgres", "SELECT 1").is_ok_and(|o| o.status.success())
}

fn run_psql(
    bin: &Path,
    socket_dir: &Path,
    port: u16,
    db: &str,
    sql: &str,
) -> std::io::Result<Output> {
    Command::new(bin.join("psql"))
        .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-U", "postgres", "-h"])
        .arg(socket_dir)
        .args(["-p", &port.to_string(), "-d", db, "-c", sql])
        .stdin(Stdio::null())
        .output()
}

fn psql(bin: &Path, socket_dir: &Path, port: u16, db: &str, sql: &str) -> String {
    let output = run_psql(bin, socket_dir, port, db, sql)
        .unwrap_or_else(|e| panic!("trellis-testkit: cannot run psql: {e}"));
    if !output.status.success() {
        panic!(
            "trellis-testkit: psql {sql:?} in {db} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}
