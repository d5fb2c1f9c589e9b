//! Headless Chromium for the console's tests, driven over WebDriver.
//!
//! Uses Debian's `chromium` and `chromium-driver` (see `ENVIRONMENT.md`):
//! [`Browser::start`] runs `chromedriver` on a free loopback port and opens
//! a session with a fresh profile. Without them the test is skipped with a
//! message — except when `CI` is set, where a missing browser fails it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use fantoccini::elements::Element;
pub use fantoccini::{Client, Locator};

/// A chromedriver process and a browser session on it.
pub struct Browser {
    pub client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

fn find(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| p.is_file())
}

impl Browser {
    /// A headless Chromium session; `None` (test skipped) when Chromium or
    /// chromedriver is not installed and `CI` is not set.
    pub async fn start() -> Option<Browser> {
        let chromium = find(&["chromium", "chromium-browser", "google-chrome"]);
        let driver = find(&["chromedriver"]);
        let (Some(chromium), Some(driver)) = (chromium, driver) else {
            let advice = "install them with `apt-get install -y chromium chromium-driver`";
            if std::env::var_os("CI").is_some() {
                panic!(
                    "chromium or chromedriver is not installed, and browser tests must not be \
                     skipped in CI (CI is set); {advice}"
                );
            }
            eprintln!(
                "trellis-testkit: chromium or chromedriver is missing; skipping this browser test ({advice})"
            );
            return None;
        };
        let port = free_port();
        let mut child = Command::new(&driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", driver.display()));
        let url = format!("http://127.0.0.1:{port}");
        let profile = tempfile::Builder::new()
            .prefix("trellis-chromium-")
            .tempdir()
            .expect("a profile directory");
        let capabilities = serde_json::json!({
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--disable-dev-shm-usage", "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        });
        let serde_json::Value::Object(capabilities) = capabilities else {
            unreachable!("an object literal")
        };
        let started = Instant::now();
        let client = loop {
            let mut builder = fantoccini::ClientBuilder::new(
                hyper_util::client::legacy::connect::HttpConnector::new(),
            );
            builder.capabilities(capabilities.clone());
            match builder.connect(&url).await {
                Ok(client) => break client,
                Err(e) if started.elapsed() < Duration::from_secs(30) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!("chromedriver exited ({status}) before a session started: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    let _ = child.kill();
                    panic!("no browser session within 30 s: {e}");
                }
            }
        };
        Some(Browser {
            client,
            driver: child,
            _profile: profile,
        })
    }

    /// Waits up to `timeout` until `check` returns `Some`, polling every
    /// 100 ms; panics naming `what` otherwise.
    pub async fn wait<T, F, Fut>(&self, what: &str, timeout: Duration, mut check: F) -> T
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let started = Instant::now();
        loop {
            if let Some(value) = check(self.client.clone()).await {
                return value;
            }
            assert!(
                started.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Saves a screenshot of the page as `dir/name.png`; returns its path.
    pub async fn screenshot(&self, dir: &Path, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("a screenshot");
        std::fs::create_dir_all(dir).expect("the screenshot directory");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write the screenshot");
        path
    }

    /// Ends the session and the driver.
    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // After `close` this finds the driver gone; after a panic it stops
        // the driver (and with it the browser).
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Writes a line to the test's output even when libtest captures it (the
/// capture only covers the print macros), so a person finds e.g. where the
/// screenshots went.
pub fn announce(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}
