//! Test helpers shared by Trellis' test suites. Development only: this
//! crate is never a normal dependency of a Trellis crate.
//!
//! - [`engines`]: the container engines behind one type ([`engines::TestEngine`]),
//!   so a container test is written once and run on Podman and on Docker;
//!   [`engines::get`] and [`engines::all`] hand them out.
//! - [`podman`]: a Podman API service (Docker Engine API over a unix
//!   socket), started once and shared by every test binary; it exits on its
//!   own when idle.
//! - [`docker`]: a Docker Engine daemon of the kit's own, started once and
//!   shared by every test binary; a watchdog stops it when idle and removes
//!   what it leaves on the host.
//! - Both provide the same small local test image, built from the host's
//!   static busybox — no registry needed ([`engines::BUSYBOX_IMAGE`]), and
//!   keep their sockets, configs, lock files and logs in
//!   `/run/trellis-test` (`TRELLIS_TEST_DIR`). Without an engine the tests
//!   that need it are skipped with a note — except under `CI`, where they
//!   fail.
//! - [`browser`]: headless Chromium driven over WebDriver (chromedriver),
//!   for the console's tests.
//! - [`procs`]: sweeping up the stage processes agents started, which
//!   outlive their agent by design.
//! - [`postgres`]: a PostgreSQL cluster started once per test run and
//!   shared by every test binary, a database per test, and private
//!   clusters for tests that restart the server.
//! - [`seaweedfs`]: SeaweedFS's S3 gateway, shared the same way, and
//!   private servers for tests that stop it.
//! - Both are shared services (`service.rs`): lock files in the kit's
//!   directory, and a watchdog that stops them when nobody has used them
//!   for two minutes.

pub mod browser;
pub mod docker;
pub mod engines;
pub mod podman;
pub mod postgres;
pub mod procs;
pub mod seaweedfs;
mod service;
mod shared;

pub use service::free_port;
