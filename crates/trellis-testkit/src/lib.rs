//! Test helpers shared by Trellis' test suites. Development only: this
//! crate is never a normal dependency of a Trellis crate.
//!
//! - [`podman`]: a Podman API service (Docker Engine API over a unix
//!   socket) for the container runtime's tests, started once and shared by
//!   every test binary, and a small local test image built from the host's
//!   static busybox — no registry needed.
//! - [`browser`]: headless Chromium driven over WebDriver (chromedriver),
//!   for the console's tests.
//! - [`procs`]: sweeping up the stage processes agents started, which
//!   outlive their agent by design.

pub mod browser;
pub mod podman;
pub mod procs;
