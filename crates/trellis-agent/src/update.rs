//! Self-update: the agent replaces its own binary with another version the
//! hub offers, without touching the components it runs, and comes back by
//! itself when the new version does not.
//!
//! How an update goes ([`Updater::start`], on a [`Message::AgentUpdate`]):
//!
//! 1. **Refused before anything changes** when the update is for another
//!    architecture than this host's, or the version is the one running.
//! 2. **Fetched** as chunks over the agent's link identity (mutual TLS),
//!    like a release's artifacts, into `<data>/update/chunks`, then written
//!    next to the running binary (same file system, so the swap is one
//!    rename) and checked: its size and BLAKE3 digest are the hub's, it is
//!    an ELF executable for this host's machine, and `--version` names the
//!    version asked for.
//! 3. **Swapped**: the running binary is kept as `.<name>.previous`, a
//!    record of the update (`<data>/update/pending.json`, synced) says what
//!    to restore, a **watchdog** is started from the previous binary in its
//!    own session (so it outlives what follows), the new binary is renamed
//!    over the old one, and the agent `exec`s it: same pid, same children,
//!    so process components stay its children and containers are untouched;
//!    the new agent adopts both as any restarted agent does.
//! 4. **Confirmed** when the new agent's link is up: it takes the pending
//!    record (an atomic rename, so it and the watchdog cannot both act),
//!    reports `applied`, and the watchdog exits.
//! 5. **Rolled back** by the watchdog when the new agent has not linked by
//!    the deadline (or its process ended first): it takes the pending
//!    record, renames the previous binary back, stops the new agent, and
//!    starts the previous one again (under systemd, `Restart=always` does
//!    that). The restored agent reports the update `failed`, with why.
//!
//! A host that restarts mid-update takes the watchdog with it. The record
//! names the boot it was made in, so the agent that starts after the
//! restart ([`Updater::after_restart`]) knows: the new agent arms a
//! watchdog again, with the whole deadline, and an old agent whose swap
//! never happened reports the update failed.
//!
//! The final state is kept in `<data>/update/result.json` and sent after
//! every link-up until the hub acknowledges it.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use trellis_link::protocol::Message;

use crate::runtime::artifacts::{ArtifactSource, HubArtifacts};
use crate::state::AgentState;

/// The directory of update records inside the agent's data directory.
pub const DIR: &str = "update";
const PENDING: &str = "pending.json";
const RESULT: &str = "result.json";
/// Where the new agent, or the watchdog, moves the pending record to claim
/// it; whichever rename succeeds acts.
const CONFIRMING: &str = "confirming.json";
const ROLLING_BACK: &str = "rolling-back.json";
/// How long `--version` of a new binary may take.
const VERSION_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// The version this agent reports: the crate's, unless the binary set
/// another at start ([`set_version`]).
pub fn version() -> &'static str {
    VERSION.get().map_or(crate::AGENT_VERSION, String::as_str)
}

static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets the version this agent reports, once, before it runs (a build that
/// ships under its own version number).
pub fn set_version(version: String) {
    let _ = VERSION.set(version);
}

/// How this agent can replace itself: the binary it runs from and the
/// arguments it was started with (the new binary gets the same).
#[derive(Debug, Clone)]
pub struct SelfUpdate {
    pub exe: PathBuf,
    pub args: Vec<OsString>,
}

impl SelfUpdate {
    /// This process's own binary and arguments.
    pub fn current() -> std::io::Result<SelfUpdate> {
        Ok(SelfUpdate {
            exe: std::env::current_exe()?,
            args: std::env::args_os().skip(1).collect(),
        })
    }
}

/// What the hub asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateJob {
    pub id: u64,
    pub version: String,
    pub arch: String,
    pub artifact: String,
    pub digest: String,
    pub size: u64,
    pub deadline: Duration,
}

/// The record of a swap in progress, for the new agent and the watchdog.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pending {
    id: u64,
    from: String,
    to: String,
    exe: PathBuf,
    previous: PathBuf,
    args: Vec<String>,
    /// Seconds since the epoch after which the watchdog rolls back.
    deadline: u64,
    /// The pid that exec'd the new binary.
    pid: u32,
    /// The host's boot the record was made in (`/proc/sys/kernel/random/boot_id`);
    /// another at start means the host restarted and the watchdog is gone.
    #[serde(default)]
    boot: Option<String>,
    /// How long the new agent has to link, in seconds (the deadline again
    /// after a restart).
    #[serde(default)]
    grace_secs: u64,
}

/// The final state of an update, kept until the hub acknowledges it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub id: u64,
    pub version: String,
    /// `applied` or `failed`.
    pub state: String,
    pub message: String,
}

impl Outcome {
    pub fn to_message(&self) -> Message {
        Message::AgentUpdateState {
            id: self.id,
            version: self.version.clone(),
            state: self.state.clone(),
            message: self.message.clone(),
        }
    }
}

/// Carries out updates; one at a time.
pub struct Updater {
    data_dir: PathBuf,
    state: Arc<AgentState>,
    arch: String,
    this: SelfUpdate,
    /// The id being worked on, so a job sent again is not started twice.
    busy: Mutex<Option<u64>>,
    /// Frames for the hub (progress and outcomes).
    frames: mpsc::UnboundedSender<Message>,
}

impl std::fmt::Debug for Updater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Updater")
            .field("data_dir", &self.data_dir)
            .field("this", &self.this)
            .finish_non_exhaustive()
    }
}

impl Updater {
    /// An updater for this agent; frames for the hub come out of the
    /// returned receiver.
    pub fn new(
        data_dir: &Path,
        state: Arc<AgentState>,
        arch: String,
        this: SelfUpdate,
    ) -> (Arc<Updater>, mpsc::UnboundedReceiver<Message>) {
        let (frames, rx) = mpsc::unbounded_channel();
        (
            Arc::new(Updater {
                data_dir: data_dir.to_path_buf(),
                state,
                arch,
                this,
                busy: Mutex::new(None),
                frames,
            }),
            rx,
        )
    }

    fn dir(&self) -> PathBuf {
        self.data_dir.join(DIR)
    }

    /// The outcome not yet acknowledged by the hub, if any.
    pub fn unacknowledged(&self) -> Option<Outcome> {
        read_json(&self.dir().join(RESULT))
    }

    /// The hub stored the outcome of update `id`.
    pub fn acknowledged(&self, id: u64) {
        if self.unacknowledged().is_some_and(|o| o.id == id) {
            let _ = std::fs::remove_file(self.dir().join(RESULT));
        }
    }

    /// Called at start, before the link: after the host restarted mid-update,
    /// watches the new agent again, or reports that the swap never happened.
    pub fn after_restart(&self) {
        match after_restart(&self.dir(), version(), std::process::id()) {
            Ok(AfterRestart::Nothing) => {}
            Ok(AfterRestart::Rewatched { .. }) => tracing::warn!(
                version = %version(),
                "the host restarted during this agent's update; a watchdog watches it again until it links"
            ),
            Ok(AfterRestart::NotSwapped) => tracing::warn!(
                "the host restarted before the agent update swapped binaries; reporting it failed"
            ),
            Err(message) => {
                tracing::warn!(%message, "the agent update could not be resumed after the host restarted")
            }
        }
    }

    /// Called once the link is up: a new agent that was swapped in confirms
    /// its update (the watchdog stands down).
    pub fn linked(&self) {
        let dir = self.dir();
        let Some(pending) = read_json::<Pending>(&dir.join(PENDING)) else {
            return;
        };
        if pending.to != version() {
            return;
        }
        if std::fs::rename(dir.join(PENDING), dir.join(CONFIRMING)).is_err() {
            // The watchdog took it first: it is rolling back.
            return;
        }
        let outcome = Outcome {
            id: pending.id,
            version: pending.to.clone(),
            state: "applied".into(),
            message: format!("agent {} replaced {} and linked", pending.to, pending.from),
        };
        tracing::info!(from = %pending.from, to = %pending.to, "the agent update is confirmed");
        self.finish(outcome);
        let _ = std::fs::remove_file(dir.join(CONFIRMING));
    }

    /// Keeps `outcome` until acknowledged and sends it.
    fn finish(&self, outcome: Outcome) {
        if let Err(e) = write_json_synced(&self.dir(), RESULT, &outcome) {
            tracing::warn!(error = %e, "could not keep the outcome of the agent update; it is sent once");
        }
        let _ = self.frames.send(outcome.to_message());
    }

    fn progress(&self, job: &UpdateJob, state: &str, message: String) {
        let _ = self.frames.send(Message::AgentUpdateState {
            id: job.id,
            version: job.version.clone(),
            state: state.into(),
            message,
        });
    }

    /// Starts update `job` unless it is under way or already reported.
    pub fn start(self: &Arc<Self>, job: UpdateJob) {
        if let Some(outcome) = self.unacknowledged().filter(|o| o.id == job.id) {
            let _ = self.frames.send(outcome.to_message());
            return;
        }
        {
            let Ok(mut busy) = self.busy.lock() else {
                return;
            };
            if busy.is_some() {
                return;
            }
            *busy = Some(job.id);
        }
        let this = self.clone();
        tokio::spawn(async move {
            let result = this.update(&job).await;
            // Only a failure comes back: success replaced this process.
            if let Err(message) = result {
                tracing::warn!(id = job.id, version = %job.version, %message, "the agent update failed");
                this.finish(Outcome {
                    id: job.id,
                    version: job.version.clone(),
                    state: "failed".into(),
                    message,
                });
            }
            if let Ok(mut busy) = this.busy.lock() {
                *busy = None;
            }
        });
    }

    async fn update(&self, job: &UpdateJob) -> Result<(), String> {
        if job.arch != self.arch {
            return Err(format!(
                "agent {} for {} was refused: this outpost runs on {}; nothing was changed",
                job.version, job.arch, self.arch
            ));
        }
        if job.version == version() {
            return Err(format!(
                "agent {} is already running here; nothing was changed",
                job.version
            ));
        }
        self.progress(job, "fetching", format!("fetching agent {}", job.version));
        let staged = self.fetch(job).await?;
        let checked = staged.clone();
        let expected = job.clone();
        let arch = self.arch.clone();
        let check = tokio::task::spawn_blocking(move || check_binary(&checked, &expected, &arch))
            .await
            .map_err(|e| format!("checking the new agent failed to run ({e})"))?;
        if let Err(e) = check {
            let _ = std::fs::remove_file(&staged);
            return Err(e);
        }
        self.progress(
            job,
            "restarting",
            format!("restarting as agent {}", job.version),
        );
        let dir = self.dir();
        let this = self.this.clone();
        let job = job.clone();
        tokio::task::spawn_blocking(move || swap_and_exec(&dir, &this, &job, &staged))
            .await
            .map_err(|e| format!("the swap failed to run ({e})"))?
    }

    /// Fetches the new binary's chunks and writes it next to the running
    /// one; returns where.
    async fn fetch(&self, job: &UpdateJob) -> Result<PathBuf, String> {
        let chunks = self.dir().join("chunks");
        let store = trellis_cas::ChunkStore::open(&chunks, trellis_cas::Durability::Cache)
            .map_err(|e| format!("could not open {}: {e}", chunks.display()))?;
        let source = HubArtifacts::new(self.state.clone(), store.clone());
        let index = source
            .fetch(&job.artifact, &|_| {})
            .await
            .map_err(|e| format!("could not fetch agent {}: {e}", job.version))?;
        if index.digest.to_string() != job.digest || index.size != job.size {
            return Err(format!(
                "the hub's agent {} is {} bytes with digest {}, not the {} bytes with digest {} announced; nothing was changed",
                job.version, index.size, index.digest, job.size, job.digest
            ));
        }
        let index_digest =
            crate::runtime::artifacts::parse_digest(&job.artifact).map_err(|e| e.to_string())?;
        let staged = staged_path(&self.this.exe, &job.version);
        let target = staged.clone();
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            let mut reader = store.open_artifact(&index_digest, &index);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode_executable()
                .open(&target)
                .map_err(|e| format!("could not write {}: {e}", target.display()))?;
            std::io::copy(&mut reader, &mut file)
                .map_err(|e| format!("could not write {}: {e}", target.display()))?;
            file.sync_all()
                .map_err(|e| format!("could not write {}: {e}", target.display()))?;
            Ok(())
        })
        .await
        .map_err(|e| format!("writing the new agent failed to run ({e})"))??;
        // The chunks are in the binary now.
        let _ = std::fs::remove_dir_all(&chunks);
        Ok(staged)
    }
}

trait ModeExecutable {
    fn mode_executable(&mut self) -> &mut Self;
}

impl ModeExecutable for std::fs::OpenOptions {
    fn mode_executable(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o755)
    }
}

fn staged_path(exe: &Path, version: &str) -> PathBuf {
    let name = exe.file_name().map_or_else(
        || "trellis-agent".into(),
        |n| n.to_string_lossy().into_owned(),
    );
    let safe: String = version
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    exe.with_file_name(format!(".{name}.{safe}.new"))
}

fn previous_path(exe: &Path) -> PathBuf {
    let name = exe.file_name().map_or_else(
        || "trellis-agent".into(),
        |n| n.to_string_lossy().into_owned(),
    );
    exe.with_file_name(format!(".{name}.previous"))
}

/// The new binary is what was announced and can run here.
fn check_binary(path: &Path, job: &UpdateJob, arch: &str) -> Result<(), String> {
    let mut header = [0u8; 20];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .map_err(|e| format!("could not read the new agent {}: {e}", path.display()))?;
    let found = trellis_model::agent_binary::elf_arch(&header).map_err(|e| {
        format!(
            "agent {} is not an executable this outpost can run ({e}); nothing was changed",
            job.version
        )
    })?;
    let found = trellis_model::manifest::Arch::oci_name(found);
    if found != arch {
        return Err(format!(
            "agent {} is an executable for {found}, not for this outpost's {arch}; nothing was changed",
            job.version
        ));
    }
    let output = run_with_timeout(path, VERSION_CHECK_TIMEOUT).map_err(|e| {
        format!(
            "agent {} does not start: {e}; nothing was changed",
            job.version
        )
    })?;
    if !output.contains(&job.version) {
        return Err(format!(
            "agent {} says it is {:?} (`--version`); nothing was changed",
            job.version,
            output.trim()
        ));
    }
    Ok(())
}

/// `path --version`'s output, killed after `timeout`.
fn run_with_timeout(path: &Path, timeout: Duration) -> Result<String, String> {
    let mut child = std::process::Command::new(path)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("`--version` could not start ({e})"))?;
    let started = std::time::Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => break,
            Ok(Some(status)) => return Err(format!("`--version` exited with {status}")),
            Ok(None) if started.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "`--version` did not finish in {} s",
                    timeout.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("`--version` could not be waited for ({e})")),
        }
    }
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = stdout.read_to_string(&mut out);
    }
    Ok(out)
}

/// Keeps the running binary as the previous one, records the swap, starts
/// the watchdog, puts the new binary in place and becomes it. Returns only
/// on failure, with everything as it was.
fn swap_and_exec(
    dir: &Path,
    this: &SelfUpdate,
    job: &UpdateJob,
    staged: &Path,
) -> Result<(), String> {
    use std::os::unix::process::CommandExt;

    let args = this
        .args
        .iter()
        .map(|a| a.clone().into_string())
        .collect::<Result<Vec<String>, _>>()
        .map_err(|_| {
            "the agent's arguments are not UTF-8; it cannot restart itself with them".to_owned()
        })?;
    let previous = previous_path(&this.exe);
    let _ = std::fs::remove_file(&previous);
    std::fs::hard_link(&this.exe, &previous)
        .or_else(|_| std::fs::copy(&this.exe, &previous).map(|_| ()))
        .map_err(|e| {
            format!(
                "could not keep the running agent as {}: {e}",
                previous.display()
            )
        })?;
    let deadline = now_secs() + job.deadline.as_secs();
    let pending = Pending {
        id: job.id,
        from: version().to_owned(),
        to: job.version.clone(),
        exe: this.exe.clone(),
        previous: previous.clone(),
        args: args.clone(),
        deadline,
        pid: std::process::id(),
        boot: boot_id(),
        grace_secs: job.deadline.as_secs(),
    };
    write_json_synced(dir, PENDING, &pending)
        .map_err(|e| format!("could not record the update: {e}"))?;
    let undo = |why: String| {
        let _ = std::fs::remove_file(dir.join(PENDING));
        let _ = std::fs::remove_file(staged);
        why
    };
    let mut watchdog = spawn_watchdog(&previous, dir)
        .map_err(|e| undo(format!("could not start the update watchdog: {e}")))?;
    if let Err(e) = std::fs::rename(staged, &this.exe) {
        let _ = watchdog.kill();
        return Err(undo(format!(
            "could not put the new agent in place of {}: {e}",
            this.exe.display()
        )));
    }
    sync_dir(this.exe.parent());
    tracing::info!(from = %version(), to = %job.version, "restarting as the new agent");
    let err = std::process::Command::new(&this.exe).args(&args).exec();
    // Still here: put the old binary back and carry on as it.
    let _ = std::fs::rename(&previous, &this.exe);
    let _ = watchdog.kill();
    Err(undo(format!("could not start the new agent: {err}")))
}

/// Starts the watchdog from the previous binary, in a process group of its
/// own so that it outlives the agent it watches.
fn spawn_watchdog(previous: &Path, dir: &Path) -> std::io::Result<std::process::Child> {
    use std::os::unix::process::CommandExt;

    let mut watchdog = std::process::Command::new(previous);
    watchdog
        .arg("update-watchdog")
        .arg("--data")
        .arg(dir.parent().unwrap_or(dir))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .process_group(0);
    if !under_systemd() {
        watchdog.arg("--restart");
    }
    watchdog.spawn()
}

/// This boot of the host, or `None` where the kernel does not say.
fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|id| id.trim().to_owned())
        .filter(|id| !id.is_empty())
}

/// What [`after_restart`] found and did.
#[derive(Debug, PartialEq, Eq)]
enum AfterRestart {
    /// No update under way, or one of this boot (its watchdog is there).
    Nothing,
    /// This is the new agent: a watchdog (this pid) watches it again.
    Rewatched { watchdog: u32 },
    /// This is the old agent and the swap never happened: the update is
    /// reported failed.
    NotSwapped,
}

/// The update record after the host restarted, from the agent with `pid`
/// running `running` (its version).
fn after_restart(dir: &Path, running: &str, pid: u32) -> Result<AfterRestart, String> {
    let Some(mut pending) = read_json::<Pending>(&dir.join(PENDING)) else {
        return Ok(AfterRestart::Nothing);
    };
    // A record without a boot predates the field: leave it to its watchdog.
    let (Some(made_in), Some(now)) = (pending.boot.as_deref(), boot_id()) else {
        return Ok(AfterRestart::Nothing);
    };
    if made_in == now {
        return Ok(AfterRestart::Nothing);
    }
    if pending.to == running {
        pending.pid = pid;
        pending.boot = Some(now);
        pending.deadline = now_secs() + pending.grace_secs.max(60);
        write_json_synced(dir, PENDING, &pending)
            .map_err(|e| format!("could not record the update again: {e}"))?;
        let mut watchdog = spawn_watchdog(&pending.previous, dir)
            .map_err(|e| format!("could not start the update watchdog again: {e}"))?;
        let pid = watchdog.id();
        // This agent stays the watchdog's parent: wait for it, or it lingers
        // as a zombie once it stands down.
        let _ = std::thread::Builder::new()
            .name("update-watchdog".into())
            .spawn(move || watchdog.wait());
        return Ok(AfterRestart::Rewatched { watchdog: pid });
    }
    // Still the old agent: the host restarted before the new binary was in
    // place. Whoever claims the record reports it.
    if std::fs::rename(dir.join(PENDING), dir.join(ROLLING_BACK)).is_err() {
        return Ok(AfterRestart::Nothing);
    }
    let outcome = Outcome {
        id: pending.id,
        version: pending.to.clone(),
        state: "failed".into(),
        message: format!(
            "the host restarted before agent {} was in place; still agent {}",
            pending.to, running
        ),
    };
    write_json_synced(dir, RESULT, &outcome)
        .map_err(|e| format!("could not record the update's end: {e}"))?;
    let _ = std::fs::remove_file(dir.join(ROLLING_BACK));
    Ok(AfterRestart::NotSwapped)
}

fn under_systemd() -> bool {
    std::env::var_os("INVOCATION_ID").is_some()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    let text = std::fs::read(path).ok()?;
    serde_json::from_slice(&text).ok()
}

fn write_json_synced<T: Serialize>(dir: &Path, name: &str, value: &T) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?)?;
    file.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    sync_dir(Some(dir));
    Ok(())
}

fn sync_dir(dir: Option<&Path>) {
    if let Some(dir) = dir
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
}

/// Whether `pid` runs (a zombie does not).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the command name, which is in parentheses.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            !matches!(state, Some("Z" | "X") | None)
        }
        Err(_) => false,
    }
}

/// The watchdog (`trellis-agent update-watchdog`): waits for the new agent
/// to confirm; rolls back when it does not by the deadline, or its process
/// ends first; with `restart` (no service manager to do it) starts the
/// previous agent again as itself. Runs from the previous binary.
pub fn watchdog(data_dir: &Path, restart: bool) -> Result<(), String> {
    let dir = data_dir.join(DIR);
    let Some(pending) = read_json::<Pending>(&dir.join(PENDING)) else {
        return Ok(());
    };
    loop {
        if !dir.join(PENDING).exists() {
            // Confirmed by the new agent.
            return Ok(());
        }
        // A new agent that died before linking is not waited for; under a
        // service manager a restarted one has another pid, and one that
        // crashes at start is as good as gone.
        if !alive(pending.pid) || now_secs() >= pending.deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    if std::fs::rename(dir.join(PENDING), dir.join(ROLLING_BACK)).is_err() {
        return Ok(());
    }
    let why = if !alive(pending.pid) {
        format!("agent {} stopped before it linked", pending.to)
    } else {
        format!("agent {} did not link within the deadline", pending.to)
    };
    std::fs::rename(&pending.previous, &pending.exe).map_err(|e| {
        format!(
            "could not put agent {} back at {}: {e}",
            pending.from,
            pending.exe.display()
        )
    })?;
    sync_dir(pending.exe.parent());
    let outcome = Outcome {
        id: pending.id,
        version: pending.to.clone(),
        state: "failed".into(),
        message: format!("{why}; rolled back to agent {}", pending.from),
    };
    write_json_synced(&dir, RESULT, &outcome)
        .map_err(|e| format!("could not record the rollback: {e}"))?;
    let _ = std::fs::remove_file(dir.join(ROLLING_BACK));
    if alive(pending.pid) {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(pending.pid as i32).ok_or("no pid")?,
            rustix::process::Signal::KILL,
        );
    }
    if restart {
        use std::os::unix::process::CommandExt;
        let err = std::process::Command::new(&pending.exe)
            .args(&pending.args)
            .stdin(std::process::Stdio::null())
            .exec();
        return Err(format!(
            "could not start agent {} again: {err}",
            pending.from
        ));
    }
    Ok(())
}

/// Reaps, as they exit, the children this process already had when it
/// started. After the `exec` of a self-update the components' processes
/// are still this process's children, and nothing in the new image waits
/// for them: without this they would stay zombies, and a stopped
/// component's process group would never be seen gone. Call it first
/// thing, before anything of this image starts a child.
pub fn reap_inherited_children() {
    let me = std::process::id();
    let mut left: Vec<rustix::process::Pid> = children_of(me)
        .into_iter()
        .filter_map(|pid| rustix::process::Pid::from_raw(pid as i32))
        .collect();
    if left.is_empty() {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("reap-inherited".into())
        .spawn(move || {
            while !left.is_empty() {
                left.retain(|pid| {
                    matches!(
                        rustix::process::waitpid(Some(*pid), rustix::process::WaitOptions::NOHANG),
                        Ok(None)
                    )
                });
                std::thread::sleep(Duration::from_secs(1));
            }
        });
}

/// The pids whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let rest = stat.rsplit_once(')')?.1;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(dir: &Path, exe: &Path, pid: u32, deadline: u64) -> Pending {
        Pending {
            id: 7,
            from: "0.1.0".into(),
            to: "0.2.0".into(),
            exe: exe.to_path_buf(),
            previous: previous_path(exe),
            args: vec!["run".into(), "--data".into(), dir.display().to_string()],
            deadline,
            pid,
            boot: boot_id(),
            grace_secs: 600,
        }
    }

    /// A pid that is not running: a child that exited and was reaped.
    fn gone_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    #[test]
    fn the_watchdog_restores_the_previous_binary_when_the_new_agent_dies() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let exe = tmp.path().join("trellis-agent");
        std::fs::write(&exe, b"new").unwrap();
        std::fs::write(previous_path(&exe), b"old").unwrap();
        let record = pending(&data, &exe, gone_pid(), now_secs() + 600);
        write_json_synced(&data.join(DIR), PENDING, &record).unwrap();

        // Not restarting (a service manager would): it only restores.
        watchdog(&data, false).unwrap();
        assert_eq!(std::fs::read(&exe).unwrap(), b"old");
        assert!(!previous_path(&exe).exists());
        assert!(!data.join(DIR).join(PENDING).exists());
        let outcome: Outcome = read_json(&data.join(DIR).join(RESULT)).unwrap();
        assert_eq!((outcome.id, outcome.state.as_str()), (7, "failed"));
        assert!(
            outcome.message.contains("rolled back to agent 0.1.0"),
            "{}",
            outcome.message
        );
    }

    #[test]
    fn the_watchdog_rolls_back_at_the_deadline_and_stands_down_once_confirmed() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let exe = tmp.path().join("trellis-agent");
        std::fs::write(&exe, b"new").unwrap();
        std::fs::write(previous_path(&exe), b"old").unwrap();
        // Past its deadline, the agent still running (a child that
        // sleeps; the rollback kills it).
        let mut agent = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let record = pending(&data, &exe, agent.id(), now_secs().saturating_sub(1));
        write_json_synced(&data.join(DIR), PENDING, &record).unwrap();
        watchdog(&data, false).unwrap();
        assert_eq!(std::fs::read(&exe).unwrap(), b"old");
        let outcome: Outcome = read_json(&data.join(DIR).join(RESULT)).unwrap();
        assert!(
            outcome.message.contains("did not link within the deadline"),
            "{}",
            outcome.message
        );
        let status = agent.wait().unwrap();
        assert!(!status.success(), "the new agent was stopped");

        // Confirmed: the pending record is gone, the watchdog leaves
        // everything as it is.
        std::fs::write(&exe, b"new").unwrap();
        std::fs::write(previous_path(&exe), b"old").unwrap();
        std::fs::remove_file(data.join(DIR).join(RESULT)).unwrap();
        watchdog(&data, false).unwrap();
        assert_eq!(std::fs::read(&exe).unwrap(), b"new");
        assert!(!data.join(DIR).join(RESULT).exists());
    }

    #[test]
    fn after_a_host_restart_the_new_agent_is_watched_again() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let exe = tmp.path().join("trellis-agent");
        std::fs::write(&exe, b"new").unwrap();
        // The previous binary stands in for the watchdog: it notes how it
        // was started.
        let started = tmp.path().join("watchdog-started");
        std::fs::write(
            previous_path(&exe),
            format!(
                "#!/bin/sh\necho \"$@\" > {}.tmp && mv {0}.tmp {0}\n",
                started.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(previous_path(&exe), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let dir = data.join(DIR);
        let mut record = pending(&data, &exe, gone_pid(), now_secs() - 3600);
        record.to = version().to_owned();

        // Made in this boot: its watchdog is there, nothing to do.
        write_json_synced(&dir, PENDING, &record).unwrap();
        assert_eq!(
            after_restart(&dir, version(), std::process::id()).unwrap(),
            AfterRestart::Nothing
        );
        assert!(!started.exists());

        // Made in another boot: the new agent is watched again, with the
        // whole grace period from now.
        record.boot = Some("an-earlier-boot".into());
        write_json_synced(&dir, PENDING, &record).unwrap();
        let AfterRestart::Rewatched { watchdog } =
            after_restart(&dir, version(), std::process::id()).unwrap()
        else {
            panic!("the new agent was not watched again");
        };
        let again: Pending = read_json(&dir.join(PENDING)).unwrap();
        assert_eq!(again.pid, std::process::id());
        assert_eq!(again.boot, boot_id());
        assert!(again.deadline >= now_secs() + 590, "{}", again.deadline);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !started.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let args = std::fs::read_to_string(&started).unwrap();
        assert!(
            args.starts_with(&format!("update-watchdog --data {}", data.display())),
            "{args}"
        );
        // Once it exits, the watchdog is reaped rather than left a zombie.
        let proc = PathBuf::from(format!("/proc/{watchdog}"));
        while proc.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!proc.exists(), "watchdog {watchdog} was not reaped");
    }

    #[test]
    fn after_a_host_restart_before_the_swap_the_update_is_reported_failed() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let exe = tmp.path().join("trellis-agent");
        let dir = data.join(DIR);
        let mut record = pending(&data, &exe, gone_pid(), now_secs() + 600);
        record.to = format!("{}-next", version());
        record.boot = Some("an-earlier-boot".into());
        write_json_synced(&dir, PENDING, &record).unwrap();
        assert_eq!(
            after_restart(&dir, version(), std::process::id()).unwrap(),
            AfterRestart::NotSwapped
        );
        assert!(!dir.join(PENDING).exists());
        let outcome: Outcome = read_json(&dir.join(RESULT)).unwrap();
        assert_eq!((outcome.id, outcome.state.as_str()), (7, "failed"));
        assert!(
            outcome.message.contains("host restarted before agent"),
            "{}",
            outcome.message
        );
    }

    #[test]
    fn staged_binaries_sit_next_to_the_running_one_under_safe_names() {
        let exe = Path::new("/usr/local/bin/trellis-agent");
        assert_eq!(
            staged_path(exe, "0.2.0-rc.1+build/../x"),
            Path::new("/usr/local/bin/.trellis-agent.0.2.0-rc.1_build_.._x.new")
        );
        assert_eq!(
            previous_path(exe),
            Path::new("/usr/local/bin/.trellis-agent.previous")
        );
    }

    #[test]
    fn a_zombie_is_not_alive() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Exited but not reaped: a zombie.
        std::thread::sleep(Duration::from_millis(200));
        assert!(!alive(pid));
        child.wait().unwrap();
        assert!(alive(std::process::id()));
    }
}
