//! One task per component: starts its replicas (or its scheduled runs),
//! notices exits, restarts with backoff, collects output, and publishes
//! what it sees for [`ProcessRuntime::observe`](super::ProcessRuntime).
//!
//! The task polls (every `tick`) instead of waiting on children, because
//! the processes it supervises are not always its children: after an agent
//! restart they are adopted from their pid files, and only `/proc` tells
//! whether they still run. Its own children are reaped with `try_wait` on
//! the same tick.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use trellis_model::manifest::Schedule;

use super::ProcessOptions;
use super::layout::{
    ComponentDirs, ComponentRecord, PidRecord, ScheduleRecord, read_dir_names, read_json,
    write_json,
};
use super::logs::{Collector, open_raw};
use super::prepare;
use super::sys;
use crate::runtime::schedule::next_run;
use crate::runtime::{
    ComponentObservation, ComponentPlan, ComponentState, LogStream, RuntimeError,
};

/// `PATH` of a component that sets none.
pub(super) const DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What a supervisor is started with.
pub(super) struct Launch {
    pub dirs: ComponentDirs,
    pub record: ComponentRecord,
    /// The prepared root directory, or why there is none.
    pub root: Result<PathBuf, RuntimeError>,
    pub options: Arc<ProcessOptions>,
}

enum Cmd {
    /// Stop (with `kill`: the processes too, SIGKILL after `grace`) and
    /// end the task.
    Shutdown {
        kill: bool,
        grace: Duration,
        done: oneshot::Sender<()>,
    },
}

/// The runtime's handle on one component's supervisor.
pub(super) struct Handle {
    status: Arc<Mutex<ComponentObservation>>,
    prepare_failed: bool,
    cmd: mpsc::Sender<Cmd>,
    task: JoinHandle<()>,
    dirs: ComponentDirs,
    grace: Duration,
}

impl Handle {
    /// Starts the supervisor; returns once it has adopted or started the
    /// component's processes (not once they are healthy).
    pub async fn start(launch: Launch) -> Handle {
        let prepare_failed = launch.root.is_err();
        let dirs = launch.dirs.clone();
        let grace = launch.options.stop_grace;
        let status = Arc::new(Mutex::new(ComponentObservation::missing(
            &launch.record.plan.name,
        )));
        let supervisor = Supervisor::new(launch, status.clone());
        let (cmd, rx) = mpsc::channel(4);
        let (ready_tx, ready_rx) = oneshot::channel();
        let task = tokio::spawn(supervisor.run(rx, ready_tx));
        let _ = ready_rx.await;
        Handle {
            status,
            prepare_failed,
            cmd,
            task,
            dirs,
            grace,
        }
    }

    pub fn observation(&self) -> ComponentObservation {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether the component has no root directory (fetch or unpack
    /// failed): applying the same spec again should try again.
    pub fn prepare_failed(&self) -> bool {
        self.prepare_failed
    }

    /// Stops the processes (SIGTERM, then SIGKILL after the grace period)
    /// and ends the supervisor.
    pub async fn stop(self) {
        let grace = self.grace;
        self.stop_within(grace).await;
    }

    /// As [`Handle::stop`], with SIGKILL after `grace`; a zero grace sends
    /// SIGKILL only (`trellis stop component --kill`).
    pub async fn stop_within(self, grace: Duration) {
        let (done, done_rx) = oneshot::channel();
        if self
            .cmd
            .send(Cmd::Shutdown {
                kill: true,
                grace,
                done,
            })
            .await
            .is_ok()
        {
            let _ = done_rx.await;
        }
        let _ = self.task.await;
        // Whatever a failed supervisor left behind.
        kill_recorded(&self.dirs, grace).await;
    }

    /// Ends the supervisor and leaves the processes running (the agent
    /// stops; the next one adopts them).
    pub fn detach(&self) {
        self.task.abort();
    }
}

/// Stops every process recorded in the component's pid files and removes
/// the files.
pub(super) async fn kill_recorded(dirs: &ComponentDirs, grace: Duration) {
    let run = dirs.run();
    let Ok(names) = read_dir_names(&run) else {
        return;
    };
    let mut stops = Vec::new();
    for name in names {
        let path = run.join(&name);
        if let Some(record) = read_json::<PidRecord>(&path) {
            stops.push(async move {
                if sys::is_running(record.pid, record.start_ticks) {
                    sys::terminate(record.pid, record.start_ticks, None, grace).await;
                }
            });
        }
        let _ = std::fs::remove_file(&path);
    }
    futures_util::future::join_all(stops).await;
}

/// A process the supervisor watches.
struct Proc {
    pid: i32,
    start_ticks: u64,
    /// Ours to reap; `None` for an adopted process.
    child: Option<Child>,
    started: Instant,
    started_at: DateTime<Utc>,
}

impl Proc {
    /// `Some(exit code)` once it has exited; the code is unknown for an
    /// adopted process.
    fn exited(&mut self) -> Option<Option<i32>> {
        match &mut self.child {
            Some(child) => match child.try_wait() {
                Ok(Some(status)) => Some(Some(sys::exit_code(status))),
                Ok(None) => None,
                Err(_) => (!sys::is_running(self.pid, self.start_ticks)).then_some(None),
            },
            None => (!sys::is_running(self.pid, self.start_ticks)).then_some(None),
        }
    }
}

struct Replica {
    index: u32,
    proc: Option<Proc>,
    restarts: u32,
    exit_code: Option<i32>,
    /// Exits in a row, each after less than `reset_after` of uptime.
    consecutive: u32,
    backoff: Duration,
    /// When to start it again (`None`: as soon as possible).
    next_start: Option<Instant>,
    /// Why it cannot be started at all.
    failed: Option<String>,
    /// Why the last start did not work (it is retried).
    last_error: Option<String>,
}

struct Job {
    proc: Option<Proc>,
    attempt: u32,
    retry_at: Option<Instant>,
    next_run: Option<DateTime<Utc>>,
    backoff: Duration,
    record: ScheduleRecord,
}

/// A scheduled component's record of runs. One that knows no restart
/// generation yet (a component new to this outpost, or recorded by an
/// agent from before `start --now`) takes the plan's current one as run,
/// and says so on disk at once: only a generation that moves while the
/// component is here — `start --now`, a restart — runs it outside its
/// schedule, never an upgrade or a first deploy.
fn schedule_record(dirs: &ComponentDirs, plan: &ComponentPlan) -> ScheduleRecord {
    let mut record: ScheduleRecord = read_json(&dirs.schedule()).unwrap_or_default();
    if record.restart_ran.is_none() {
        record.restart_ran = Some(plan.restart_generation);
        if let Err(e) = write_json(&dirs.schedule(), &record) {
            tracing::warn!(component = %plan.name, error = %e, "cannot record a scheduled run");
        }
    }
    record
}

struct SpawnError {
    permanent: bool,
    message: String,
}

struct Supervisor {
    dirs: ComponentDirs,
    record: ComponentRecord,
    root: Option<PathBuf>,
    /// Why the component cannot run (no root, bad schedule, bad user).
    failed: Option<String>,
    owner: Option<(u32, u32)>,
    options: Arc<ProcessOptions>,
    status: Arc<Mutex<ComponentObservation>>,
    collector: Collector,
    replicas: Vec<Replica>,
    job: Option<Job>,
    last_exit: Option<i32>,
    state: Option<(ComponentState, DateTime<Utc>)>,
}

impl Supervisor {
    fn new(launch: Launch, status: Arc<Mutex<ComponentObservation>>) -> Supervisor {
        let Launch {
            dirs,
            record,
            root,
            options,
        } = launch;
        let plan = &record.plan;
        let collector = Collector::open(&dirs.logs(), &plan.name, options.log_file_max);
        let (root, mut failed) = match root {
            Ok(root) => (Some(root), None),
            Err(e) => (None, Some(e.sentence())),
        };
        let owner = match prepare::owner(plan) {
            Ok(owner) => owner,
            Err(e) => {
                failed.get_or_insert(e.sentence());
                None
            }
        };
        let job = plan.schedule.as_ref().map(|_| Job {
            proc: None,
            attempt: 0,
            retry_at: None,
            next_run: None,
            backoff: options.restart_initial,
            record: schedule_record(&dirs, plan),
        });
        let replicas = if job.is_some() {
            Vec::new()
        } else {
            (0..plan.replicas.max(1))
                .map(|index| Replica {
                    index,
                    proc: None,
                    restarts: 0,
                    exit_code: None,
                    consecutive: 0,
                    backoff: options.restart_initial,
                    next_start: None,
                    failed: None,
                    last_error: None,
                })
                .collect()
        };
        Supervisor {
            dirs,
            record,
            root,
            failed,
            owner,
            options,
            status,
            collector,
            replicas,
            job,
            last_exit: None,
            state: None,
        }
    }

    fn name(&self) -> &str {
        &self.record.plan.name
    }

    fn active(&self) -> bool {
        !self.record.plan.stopped && self.failed.is_none()
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>, ready: oneshot::Sender<()>) {
        self.startup().await;
        let mut ready = Some(ready);
        loop {
            if self.active() {
                if self.job.is_some() {
                    self.tick_job();
                } else {
                    self.tick_service();
                }
            }
            self.collector.collect(false);
            self.publish();
            if let Some(ready) = ready.take() {
                let _ = ready.send(());
            }
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(Cmd::Shutdown { kill, grace, done }) => {
                        if kill {
                            self.stop_all(grace).await;
                        }
                        self.collector.collect(true);
                        let _ = done.send(());
                        return;
                    }
                    None => return,
                },
                _ = tokio::time::sleep(self.options.tick) => {}
            }
        }
    }

    /// Adopts the processes of the pid files that belong to this spec and
    /// restart generation, stops the others.
    async fn startup(&mut self) {
        if let Some(Schedule::Cron(expr)) = &self.record.plan.schedule {
            match next_run(expr, self.record.plan.timezone.as_deref(), Utc::now()) {
                Ok(next) => {
                    if let Some(job) = &mut self.job {
                        job.next_run = Some(next);
                    }
                }
                Err(e) => {
                    self.failed
                        .get_or_insert(format!("the schedule cannot be used: {e}"));
                }
            }
        }
        let wanted = if !self.active() {
            0
        } else if self.job.is_some() {
            1
        } else {
            self.replicas.len() as u32
        };
        let run = self.dirs.run();
        let names = read_dir_names(&run).unwrap_or_default();
        for name in names {
            let path = run.join(&name);
            let index = name
                .strip_suffix(".json")
                .and_then(|n| n.parse::<u32>().ok());
            let (Some(index), Some(record)) = (index, read_json::<PidRecord>(&path)) else {
                let _ = std::fs::remove_file(&path);
                continue;
            };
            let plan = &self.record.plan;
            let ours = index < wanted
                && record.spec_hash == plan.spec_hash
                && record.restart_generation == plan.restart_generation;
            let running = sys::is_running(record.pid, record.start_ticks);
            if running && ours {
                let age = (Utc::now() - record.started_at)
                    .to_std()
                    .unwrap_or_default();
                let proc = Proc {
                    pid: record.pid,
                    start_ticks: record.start_ticks,
                    child: None,
                    started: Instant::now().checked_sub(age).unwrap_or_else(Instant::now),
                    started_at: record.started_at,
                };
                tracing::info!(component = %plan.name, pid = record.pid, "adopted a running process");
                if let Some(job) = &mut self.job {
                    job.proc = Some(proc);
                } else if let Some(replica) = self.replicas.get_mut(index as usize) {
                    replica.proc = Some(proc);
                    replica.restarts = record.restarts;
                    replica.exit_code = record.exit_code;
                }
                continue;
            }
            if running {
                sys::terminate(
                    record.pid,
                    record.start_ticks,
                    None,
                    self.options.stop_grace,
                )
                .await;
            } else if ours && let Some(replica) = self.replicas.get_mut(index as usize) {
                // It died while no agent watched: that is a restart too.
                replica.restarts = record.restarts + 1;
                replica.exit_code = record.exit_code;
            }
            let _ = std::fs::remove_file(&path);
        }
    }

    fn tick_service(&mut self) {
        let now = Instant::now();
        let mut exited = false;
        let options = self.options.clone();
        for replica in &mut self.replicas {
            let Some(proc) = &mut replica.proc else {
                continue;
            };
            let Some(code) = proc.exited() else {
                continue;
            };
            let uptime = proc.started.elapsed();
            let pid = proc.pid;
            replica.proc = None;
            let _ = std::fs::remove_file(self.dirs.pid_file(replica.index));
            if uptime >= options.reset_after {
                replica.consecutive = 0;
                replica.backoff = options.restart_initial;
            }
            replica.consecutive += 1;
            replica.restarts += 1;
            if code.is_some() {
                replica.exit_code = code;
                self.last_exit = code;
            }
            replica.next_start = Some(now + replica.backoff);
            tracing::info!(component = %self.record.plan.name, replica = replica.index, pid,
                exit_code = ?code, restart_in = ?replica.backoff, "a process exited; restarting it");
            replica.backoff = (replica.backoff * 2).min(options.restart_max);
            exited = true;
        }
        if exited {
            self.collector.collect(true);
        }
        for i in 0..self.replicas.len() {
            let replica = &self.replicas[i];
            if replica.proc.is_some()
                || replica.failed.is_some()
                || replica.next_start.is_some_and(|t| t > now)
            {
                continue;
            }
            let index = replica.index;
            let restarts = replica.restarts;
            let exit_code = replica.exit_code;
            let result = self.spawn(index, restarts, exit_code);
            let replica = &mut self.replicas[i];
            match result {
                Ok(proc) => {
                    replica.proc = Some(proc);
                    replica.next_start = None;
                    replica.last_error = None;
                }
                Err(e) if e.permanent => replica.failed = Some(e.message),
                Err(e) => {
                    tracing::warn!(component = %self.record.plan.name, error = %e.message, "cannot start a process; retrying");
                    replica.last_error = Some(e.message);
                    replica.next_start = Some(now + replica.backoff);
                    replica.backoff = (replica.backoff * 2).min(options.restart_max);
                }
            }
        }
    }

    fn release_key(&self) -> u64 {
        self.record.release.unwrap_or(self.record.revision)
    }

    fn tick_job(&mut self) {
        let now = Instant::now();
        let wall = Utc::now();
        let max_retries = self.record.plan.max_retries;
        let options = self.options.clone();
        let Some(mut job) = self.job.take() else {
            return;
        };
        if let Some(proc) = &mut job.proc
            && let Some(code) = proc.exited()
        {
            job.proc = None;
            let _ = std::fs::remove_file(self.dirs.pid_file(0));
            self.collector.collect(true);
            match code {
                Some(c) if c != 0 && job.attempt < max_retries => {
                    job.attempt += 1;
                    job.retry_at = Some(now + job.backoff);
                    job.backoff = (job.backoff * 2).min(options.restart_max);
                    job.record.exit_code = Some(c);
                    job.record.attempts = job.attempt;
                    job.record.message = Some(format!(
                        "run exited with code {c}; retry {} of {max_retries}",
                        job.attempt
                    ));
                }
                _ => {
                    let ok = code.is_none_or(|c| c == 0);
                    job.record.result = Some(if ok {
                        ComponentState::Succeeded
                    } else {
                        ComponentState::Failed
                    });
                    job.record.exit_code = code;
                    job.record.last_run = Some(wall);
                    job.record.attempts = job.attempt + 1;
                    job.record.message = match code {
                        None => Some(
                            "the run ended while the agent was not running; its exit code is unknown"
                                .into(),
                        ),
                        Some(0) => None,
                        Some(c) => Some(format!(
                            "exited with code {c} after {} attempt(s)",
                            job.attempt + 1
                        )),
                    };
                    job.attempt = 0;
                    job.backoff = options.restart_initial;
                    self.last_exit = code;
                }
            }
            self.save_schedule(&job.record);
        }
        if job.proc.is_none() {
            let due = if let Some(at) = job.retry_at {
                (now >= at).then(|| {
                    job.retry_at = None;
                })
            } else {
                let generation = self.record.plan.restart_generation;
                match &self.record.plan.schedule {
                    // A restart generation not run yet (`start component
                    // --now`): once at once, recorded before it starts so
                    // a restarted agent does not run it again.
                    Some(_) if job.record.restart_ran.is_some_and(|ran| generation > ran) => {
                        job.record.restart_ran = Some(generation);
                        job.attempt = 0;
                        Some(())
                    }
                    Some(Schedule::OnRelease) => {
                        let key = self.release_key();
                        (job.record.release_ran != Some(key)).then(|| {
                            // Recorded before it starts: a restarted agent
                            // must not run it again.
                            job.record = ScheduleRecord {
                                release_ran: Some(key),
                                restart_ran: job.record.restart_ran,
                                ..ScheduleRecord::default()
                            };
                            job.attempt = 0;
                        })
                    }
                    Some(Schedule::Cron(expr)) => {
                        if job.next_run.is_some_and(|next| wall >= next) {
                            job.next_run =
                                next_run(expr, self.record.plan.timezone.as_deref(), wall).ok();
                            job.attempt = 0;
                            Some(())
                        } else {
                            None
                        }
                    }
                    None => None,
                }
            };
            if due.is_some() {
                job.record.result = None;
                self.save_schedule(&job.record);
                match self.spawn(0, 0, None) {
                    Ok(proc) => job.proc = Some(proc),
                    Err(e) if e.permanent => {
                        job.record.result = Some(ComponentState::Failed);
                        job.record.last_run = Some(wall);
                        job.record.message = Some(e.message);
                        self.save_schedule(&job.record);
                    }
                    Err(e) => {
                        job.record.message = Some(e.message);
                        job.retry_at = Some(now + job.backoff);
                        job.backoff = (job.backoff * 2).min(options.restart_max);
                    }
                }
            }
        } else if let Some(Schedule::Cron(expr)) = &self.record.plan.schedule
            && job.next_run.is_some_and(|next| wall >= next)
        {
            tracing::warn!(component = %self.record.plan.name,
                "a scheduled run is due while the previous one still runs; skipping it");
            job.next_run = next_run(expr, self.record.plan.timezone.as_deref(), wall).ok();
        }
        self.job = Some(job);
    }

    fn save_schedule(&self, record: &ScheduleRecord) {
        if let Err(e) = write_json(&self.dirs.schedule(), record) {
            tracing::warn!(component = %self.name(), error = %e, "cannot record a scheduled run");
        }
    }

    /// Starts replica `index`. Nothing awaits between the start and the
    /// pid file, so an aborted supervisor never leaves an unrecorded
    /// process.
    fn spawn(&self, index: u32, restarts: u32, exit_code: Option<i32>) -> Result<Proc, SpawnError> {
        let plan = &self.record.plan;
        let Some(root) = &self.root else {
            return Err(SpawnError {
                permanent: true,
                message: "it has no directory to run in".into(),
            });
        };
        let argv = plan.process_argv();
        let Some(program) = argv.first() else {
            return Err(SpawnError {
                permanent: true,
                message: "it has no command; give `process.command` in the manifest".into(),
            });
        };
        let path = if program.contains('/') && !program.starts_with('/') {
            root.join(program)
        } else {
            PathBuf::from(program)
        };
        let logs = self.dirs.logs();
        let transient = |what: &str, e: std::io::Error| SpawnError {
            permanent: false,
            message: format!("cannot open its {what}: {e}"),
        };
        let stdout = open_raw(&logs, index, LogStream::Stdout).map_err(|e| transient("log", e))?;
        let stderr = open_raw(&logs, index, LogStream::Stderr).map_err(|e| transient("log", e))?;

        let mut command = Command::new(&path);
        command
            .args(&argv[1..])
            .current_dir(root)
            .env_clear()
            .envs(&plan.env);
        if !plan.env.contains_key("PATH") {
            command.env("PATH", DEFAULT_PATH);
        }
        if !plan.env.contains_key("HOME") {
            command.env("HOME", root);
        }
        command
            .env("TRELLIS_ROOT", root)
            .env("TRELLIS_REPLICA", index.to_string())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0)
            .kill_on_drop(false);
        if let Some((uid, gid)) = self.owner {
            command.uid(uid).gid(gid);
        }
        let child = command.spawn().map_err(|e| {
            let permanent = matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
            ) || matches!(e.raw_os_error(), Some(8 | 20 | 21));
            let where_ = if program.contains('/') {
                format!("{} (relative to the package's directory)", path.display())
            } else {
                format!(
                    "{program:?}, looked up in PATH ({})",
                    plan.env
                        .get("PATH")
                        .map(String::as_str)
                        .unwrap_or(DEFAULT_PATH)
                )
            };
            SpawnError {
                permanent,
                message: format!("cannot start {where_}: {e}"),
            }
        })?;
        drop(command);
        let pid = child.id().map(|p| p as i32).unwrap_or(0);
        let start_ticks = sys::stat(pid).map(|s| s.start_ticks).unwrap_or(0);
        let started_at = Utc::now();
        let record = PidRecord {
            pid,
            start_ticks,
            spec_hash: plan.spec_hash.clone(),
            revision: self.record.revision,
            release: self.record.release,
            restart_generation: plan.restart_generation,
            started_at,
            restarts,
            exit_code,
        };
        if let Err(e) = write_json(&self.dirs.pid_file(index), &record) {
            tracing::warn!(component = %plan.name, pid, error = %e,
                "cannot write a pid file; a restarted agent will not find this process");
        }
        tracing::info!(component = %plan.name, replica = index, pid, "started a process");
        Ok(Proc {
            pid,
            start_ticks,
            child: Some(child),
            started: Instant::now(),
            started_at,
        })
    }

    async fn stop_all(&mut self, grace: Duration) {
        let mut procs: Vec<Proc> = self
            .replicas
            .iter_mut()
            .filter_map(|r| r.proc.take())
            .collect();
        if let Some(proc) = self.job.as_mut().and_then(|j| j.proc.take()) {
            procs.push(proc);
        }
        futures_util::future::join_all(
            procs
                .iter_mut()
                .map(|p| sys::terminate(p.pid, p.start_ticks, p.child.as_mut(), grace)),
        )
        .await;
        kill_recorded(&self.dirs, grace).await;
    }

    fn publish(&mut self) {
        let plan = &self.record.plan;
        let mut obs = ComponentObservation::missing(&plan.name);
        obs.revision = self.record.revision;
        obs.release = self.record.release;
        obs.spec_hash = plan.spec_hash.clone();
        let reset_after = self.options.reset_after;

        let (state, message, running_since) = if let Some(job) = &self.job {
            obs.replicas_desired = 1;
            obs.last_run = job.record.last_run;
            obs.next_run = job.next_run;
            obs.exit_code = job.record.exit_code;
            if let Some(proc) = &job.proc {
                obs.replicas_running = 1;
                obs.ids.push(proc.pid.to_string());
            }
            if plan.stopped {
                (ComponentState::Stopped, None, None)
            } else if let Some(failed) = &self.failed {
                (ComponentState::Failed, Some(failed.clone()), None)
            } else if let Some(proc) = &job.proc {
                (
                    ComponentState::Running,
                    job.record.message.clone(),
                    Some(proc.started_at),
                )
            } else if job.retry_at.is_some() {
                (ComponentState::Waiting, job.record.message.clone(), None)
            } else {
                (
                    job.record.result.unwrap_or(ComponentState::Waiting),
                    job.record.message.clone(),
                    None,
                )
            }
        } else {
            obs.replicas_desired = self.replicas.len() as u32;
            let mut running = 0;
            let mut newest_start = None;
            let mut crash_looping = false;
            for replica in &self.replicas {
                obs.restarts += replica.restarts;
                if let Some(proc) = &replica.proc {
                    running += 1;
                    obs.ids.push(proc.pid.to_string());
                    newest_start = newest_start.max(Some(proc.started_at));
                }
                let recent = replica
                    .proc
                    .as_ref()
                    .is_none_or(|p| p.started.elapsed() < reset_after);
                if replica.consecutive >= 2 && recent {
                    crash_looping = true;
                }
            }
            obs.replicas_running = running;
            obs.exit_code = self
                .last_exit
                .or_else(|| self.replicas.iter().find_map(|r| r.exit_code));
            let failed = self
                .failed
                .clone()
                .or_else(|| self.replicas.iter().find_map(|r| r.failed.clone()));
            if plan.stopped {
                (ComponentState::Stopped, None, None)
            } else if let Some(failed) = failed {
                (ComponentState::Failed, Some(failed), None)
            } else if crash_looping {
                let next = self
                    .replicas
                    .iter()
                    .filter(|r| r.proc.is_none())
                    .filter_map(|r| r.next_start)
                    .min()
                    .map(|t| t.saturating_duration_since(Instant::now()));
                let mut message = match obs.exit_code {
                    Some(code) => format!("it keeps exiting (last exit code {code})"),
                    None => "it keeps exiting".to_owned(),
                };
                message.push_str(&format!("; restarted {} time(s)", obs.restarts));
                if let Some(next) = next {
                    message.push_str(&format!(", next start in {:.1} s", next.as_secs_f64()));
                }
                if let Some(error) = self.replicas.iter().find_map(|r| r.last_error.clone()) {
                    message.push_str(&format!(" ({error})"));
                }
                match self.collector.last_line() {
                    Some(line) => {
                        let line: String = line.chars().take(200).collect();
                        message.push_str(&format!("; last output: {line}"));
                    }
                    None => message.push_str("; its logs tell why"),
                }
                (ComponentState::CrashLooping, Some(message), None)
            } else if running == self.replicas.len() as u32 {
                (ComponentState::Running, None, newest_start)
            } else {
                (
                    ComponentState::Starting,
                    self.replicas.iter().find_map(|r| r.last_error.clone()),
                    None,
                )
            }
        };

        let now = Utc::now();
        let since = match self.state {
            Some((previous, since)) if previous == state => since,
            _ => running_since.unwrap_or(now),
        };
        self.state = Some((state, since));
        obs.state = state;
        obs.since = Some(since);
        obs.message = message;
        if obs.replicas_running > 0
            && let Some(port) = plan.first_port()
        {
            obs.endpoint = Some(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
        }
        if obs.replicas_running > 0 {
            // Replicas share the host's network: one address serves them
            // all (each binds the port with SO_REUSEPORT, or only one can).
            obs.addresses = vec![std::net::Ipv4Addr::LOCALHOST.into()];
        }
        *self.status.lock().unwrap_or_else(|p| p.into_inner()) = obs;
    }
}
