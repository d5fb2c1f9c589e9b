//! HAProxy for tests: Debian's `haproxy` running the repository's own
//! configuration (`deploy/haproxy/haproxy.cfg`) in front of hub instances
//! on loopback, one process per test (it starts in milliseconds), killed
//! when dropped.
//!
//! Without `haproxy` the tests that need it say they were skipped — except
//! when `CI` is set, where they fail.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::shared;

/// A running balancer.
#[derive(Debug)]
pub struct Balancer {
    child: Child,
    addr: SocketAddr,
}

/// The `haproxy` executable, or `None` (a panic under `CI`).
pub fn binary() -> Option<PathBuf> {
    match shared::find_program("haproxy", &["/usr/sbin", "/usr/local/sbin"]) {
        Some(bin) => Some(bin),
        None => shared::unavailable(
            "HAProxy is not installed",
            "install Debian's `haproxy` (as .ci/install-test-deps does)",
        ),
    }
}

impl Balancer {
    /// Runs `haproxy -f config` in the foreground, listening on `addr` (a
    /// free port the caller reserved: the hubs behind it must know their
    /// public address before they start), with `hubs` as `TRELLIS_HUB_1`… and `ca` as
    /// `TRELLIS_HUB_CA` (the variables the repository's configuration
    /// reads). Waits until it accepts connections.
    pub fn start(
        config: &Path,
        addr: SocketAddr,
        hubs: &[SocketAddr],
        ca: &Path,
    ) -> Option<Balancer> {
        let bin = binary()?;
        let mut command = Command::new(bin);
        command
            .arg("-db")
            .arg("-f")
            .arg(config)
            .env("TRELLIS_BALANCER_BIND", addr.to_string())
            .env("TRELLIS_HUB_CA", ca)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (i, hub) in hubs.iter().enumerate() {
            command.env(format!("TRELLIS_HUB_{}", i + 1), hub.to_string());
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("trellis-testkit: cannot start haproxy: {e}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("trellis-testkit: haproxy exited at start ({status}); see its output above");
            }
            assert!(
                Instant::now() < deadline,
                "trellis-testkit: haproxy did not listen on {addr} within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Balancer { child, addr })
    }

    /// The balancer's public address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
