//! Drives the real `trellis` binary: starts hubs as child processes on
//! port 0, runs client commands against them, kills them with SIGKILL.

#![allow(dead_code)]

pub mod apps;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_trellis"))
}

/// A hub process with its own data directory.
pub struct HubProcess {
    pub child: Child,
    pub endpoint: String,
    pub data: PathBuf,
    /// Whether dropping it also stops the stage processes its local outpost
    /// started (they outlive the hub on purpose; a test cleans them up).
    sweep: bool,
}

impl HubProcess {
    /// Starts `trellis hub` on 127.0.0.1:0 and waits for its "listening"
    /// line.
    pub fn start(data: &Path) -> HubProcess {
        Self::start_with(data, &["--listen", "127.0.0.1:0"])
    }

    /// Starts `trellis hub --data DATA ARGS…`.
    pub fn start_with(data: &Path, args: &[&str]) -> HubProcess {
        Self::spawn_env(data, args, None, &[])
    }

    /// [`HubProcess::start_with`] with environment variables set for it.
    pub fn start_with_env(data: &Path, args: &[&str], env: &[(&str, &Path)]) -> HubProcess {
        Self::spawn_env(data, args, None, env)
    }

    /// Starts `trellis hub --listen 127.0.0.1:0 --data DATA` logging at
    /// trace level (`TRELLIS_LOG=trace`) into `log`.
    pub fn start_logged(data: &Path, log: &Path) -> HubProcess {
        Self::spawn(data, &["--listen", "127.0.0.1:0"], Some(log))
    }

    fn spawn(data: &Path, args: &[&str], log: Option<&Path>) -> HubProcess {
        Self::spawn_env(data, args, log, &[])
    }

    fn spawn_env(
        data: &Path,
        args: &[&str],
        log: Option<&Path>,
        env: &[(&str, &Path)],
    ) -> HubProcess {
        let mut command = Command::new(bin());
        command.envs(env.iter().copied());
        command
            .arg("hub")
            .args(args)
            .arg("--data")
            .arg(data)
            .stdout(Stdio::piped());
        match log {
            Some(log) => {
                command
                    .env("TRELLIS_LOG", "trace")
                    .stderr(std::fs::File::create(log).expect("create the hub's log"));
            }
            None => {
                command.stderr(Stdio::inherit());
            }
        }
        let mut child = command.spawn().expect("start trellis hub");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("hub listening on ") {
                    let _ = tx.send(rest.to_owned());
                }
            }
        });
        let endpoint = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("hub printed its address");
        HubProcess {
            child,
            endpoint,
            data: data.to_owned(),
            sweep: true,
        }
    }

    /// The hub CA's certificate, for `TRELLIS_CA_CERT`.
    pub fn ca_cert(&self) -> PathBuf {
        self.data.join("ca.pem")
    }

    pub fn admin_key(&self) -> String {
        std::fs::read_to_string(self.data.join("admin.key"))
            .expect("admin.key exists")
            .trim()
            .to_owned()
    }

    /// SIGKILL: no chance to flush or clean up. Stage processes keep
    /// running, as they would.
    pub fn kill9(mut self) {
        self.sweep = false;
        self.child.kill().expect("SIGKILL the hub");
        self.child.wait().expect("reap the hub");
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.sweep {
            kill_processes_under(&self.data);
        }
    }
}

pub use trellis_testkit::procs::kill_processes_under;

/// Runs the CLI with an isolated config directory.
pub struct Cli {
    pub endpoint: String,
    pub key: String,
    pub config_dir: PathBuf,
    pub ca_cert: Option<PathBuf>,
}

impl Cli {
    pub fn new(endpoint: &str, key: &str, config_dir: &Path) -> Cli {
        Cli {
            endpoint: endpoint.to_owned(),
            key: key.to_owned(),
            config_dir: config_dir.to_owned(),
            ca_cert: None,
        }
    }

    /// A client of `hub` that trusts the hub's CA.
    pub fn for_hub(hub: &HubProcess, key: &str, config_dir: &Path) -> Cli {
        Cli {
            ca_cert: Some(hub.ca_cert()),
            ..Cli::new(&hub.endpoint, key, config_dir)
        }
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(bin());
        cmd.env("TRELLIS_ENDPOINT", &self.endpoint)
            .env("TRELLIS_KEY", &self.key)
            .env("TRELLIS_CONFIG_DIR", &self.config_dir)
            .env_remove("TRELLIS_CA_CERT");
        if let Some(ca) = &self.ca_cert {
            cmd.env("TRELLIS_CA_CERT", ca);
        }
        cmd
    }

    /// [`Cli::run_in`], asserting success; its stdout.
    pub fn ok_in(&self, dir: &Path, args: &[&str]) -> String {
        let out = self.run_in(dir, args);
        assert!(out.status.success(), "trellis {args:?}: {}", describe(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn run_in(&self, dir: &Path, args: &[&str]) -> Output {
        self.command()
            .current_dir(dir)
            .args(args)
            .output()
            .expect("run trellis")
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("run trellis")
    }

    /// Runs and requires success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "trellis {args:?} failed: {}",
            describe(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs and requires failure; returns stderr (the error as printed).
    pub fn err(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "trellis {args:?} succeeded: {}",
            describe(&out)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.ok(&all);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {out}"))
    }
}

pub fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Makes a git work tree holding `files` (path, content) and commits it.
pub fn git_project(dir: &Path, files: &[(&str, &str)]) {
    for (path, content) in files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    git(dir, &["init", "-q", "-b", "main"]);
    git_commit(dir, "test");
}

/// Commits everything in the work tree `dir`.
pub fn git_commit(dir: &Path, message: &str) {
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "-m", message]);
}

/// Runs git in `dir` as a test user; fails the test if git fails.
fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t.invalid",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {}", describe(&out));
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An Outpost Agent process.
pub struct AgentProcess {
    pub child: Child,
    pub data: PathBuf,
    /// See [`HubProcess`]'s field of the same name.
    sweep: bool,
}

impl AgentProcess {
    /// `trellis agent join HUB --token TOKEN --data DIR` (enrols, then runs).
    pub fn join(join_command: &str, data: &Path) -> AgentProcess {
        Self::join_with(join_command, data, &[])
    }

    /// [`AgentProcess::join`] with more arguments (runtime settings).
    pub fn join_with(join_command: &str, data: &Path, args: &[&str]) -> AgentProcess {
        Self::join_spawn(join_command, data, args, None)
    }

    /// [`AgentProcess::join_with`] logging at trace level into `log`.
    pub fn join_logged(join_command: &str, data: &Path, args: &[&str], log: &Path) -> AgentProcess {
        Self::join_spawn(join_command, data, args, Some(log))
    }

    fn join_spawn(
        join_command: &str,
        data: &Path,
        args: &[&str],
        log: Option<&Path>,
    ) -> AgentProcess {
        let words: Vec<&str> = join_command.split_whitespace().collect();
        assert_eq!(&words[..3], ["trellis", "agent", "join"], "{join_command}");
        let mut command = Command::new(bin());
        command
            .args(&words[1..])
            .args(args)
            .arg("--data")
            .arg(data)
            .stdout(Stdio::null());
        match log {
            Some(log) => {
                command
                    .env("TRELLIS_LOG", "trace")
                    .stderr(std::fs::File::create(log).expect("create the agent's log"));
            }
            None => {
                command.stderr(Stdio::inherit());
            }
        }
        let child = command.spawn().expect("start trellis agent join");
        AgentProcess {
            child,
            data: data.to_owned(),
            sweep: true,
        }
    }

    /// `trellis agent run --data DIR` of an enrolled agent.
    pub fn run(data: &Path) -> AgentProcess {
        Self::run_with(data, &[])
    }

    /// [`AgentProcess::run`] with more arguments (runtime settings).
    pub fn run_with(data: &Path, args: &[&str]) -> AgentProcess {
        let child = Command::new(bin())
            .args(["agent", "run"])
            .args(args)
            .arg("--data")
            .arg(data)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start trellis agent run");
        AgentProcess {
            child,
            data: data.to_owned(),
            sweep: true,
        }
    }

    /// `trellis agent run` that is expected to stop by itself (refusing its
    /// settings): its output.
    pub fn run_output(data: &Path, args: &[&str]) -> Output {
        Command::new(bin())
            .args(["agent", "run"])
            .args(args)
            .arg("--data")
            .arg(data)
            .output()
            .expect("run trellis agent run")
    }

    /// SIGKILL; the stage processes it started keep running, as they would.
    pub fn kill9(mut self) {
        self.sweep = false;
        self.child.kill().expect("SIGKILL the agent");
        self.child.wait().expect("reap the agent");
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.sweep {
            kill_processes_under(&self.data);
        }
    }
}

/// The `trellis agent join …` line that `trellis create outpost` printed.
pub fn join_command(create_outpost_output: &str) -> String {
    create_outpost_output
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("trellis agent join "))
        .unwrap_or_else(|| panic!("no join command in:\n{create_outpost_output}"))
        .to_owned()
}

/// A loopback port that was free a moment ago (for a hub that must come
/// back on the same port after a restart).
///
/// Taken below Linux's ephemeral range (32768–60999 by default), and not
/// from it as binding port 0 would: a port the kernel hands out there is
/// free only until it hands it out again as the source port of one of the
/// many connections the tests in parallel make, and a component that
/// publishes it later finds it in use. Each test process starts at its own
/// place in the range and never gives out a port twice.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 15_000;
    const SPAN: u32 = 32_768 - LOW;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7_919) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(LOW + (start + n) % SPAN).expect("below 32768");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 between {LOW} and 32767");
}
