//! The command line's grammar. Verbs first, as users of comparable
//! platforms know them: `trellis create stage …`, `trellis list build …`.
//!
//! The client's settings (`--endpoint`, `--key`, `--ca-cert`, `-o`) belong
//! to the client verbs only, so `trellis hub --help` shows the hub's flags
//! and nothing else: [`Client`] carries them into each verb, where they are
//! global to its nouns (`trellis list release -p shop -s prod -o json`).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use trellis_agent::cli::RuntimeArgs;

#[derive(Debug, Parser)]
#[command(
    name = "trellis",
    version,
    about = "Trellis: deliver applications to stages that run anywhere",
    long_about = "Trellis: deliver applications to stages that run anywhere.\n\n\
        Client commands talk to a hub. Say which with --endpoint/--access-key, the \
        TRELLIS_ENDPOINT/TRELLIS_KEY environment variables, or once with `trellis login`."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Where the hub is, who is asking, and how to print the answer.
#[derive(Debug, Args, Clone)]
pub struct GlobalArgs {
    /// The hub's address, e.g. https://127.0.0.1:7440
    #[arg(long, env = "TRELLIS_ENDPOINT", global = true)]
    pub endpoint: Option<String>,
    /// Access key `<key-id>:<secret>`
    #[arg(
        long,
        visible_alias = "access-key",
        env = "TRELLIS_KEY",
        global = true,
        hide_env_values = true
    )]
    pub key: Option<String>,
    /// PEM file of the CA that signed the hub's certificate, when the hub
    /// uses its own CA
    #[arg(long, env = "TRELLIS_CA_CERT", global = true)]
    pub ca_cert: Option<PathBuf>,
    /// Output format: a table for people, JSON or YAML for programs
    #[arg(short = 'o', long, value_enum, default_value_t = OutputFormat::Table, global = true)]
    pub output: OutputFormat,
}

/// A client verb: its nouns, and the client's settings.
#[derive(Debug, Args)]
pub struct Client<T: Subcommand> {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: T,
}

/// A client verb without nouns (`whoami`, `login`).
#[derive(Debug, Args)]
pub struct ClientOnly {
    #[command(flatten)]
    pub global: GlobalArgs,
}

/// A duration as users write one: `30d`, `12h`, `90s`, `1h30m`.
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let seconds = trellis_hub::api::components::parse_since(text, chrono::DateTime::UNIX_EPOCH)
        .ok()
        .filter(|_| !text.contains('-') && !text.contains(':'))
        .map(|back| (chrono::DateTime::UNIX_EPOCH - back).num_seconds())
        .and_then(|s| u64::try_from(s).ok())
        .ok_or_else(|| format!("{text:?} is not a duration like 30d, 12h, 90s or 1h30m"))?;
    Ok(std::time::Duration::from_secs(seconds))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a hub, or work on a hub's data directory
    Hub(Box<HubCommand>),
    /// Run a hub on loopback with an example project, for a first look
    Dev(DevArgs),
    /// Check and remember the endpoint and key for later commands
    Login(ClientOnly),
    /// Show who the key belongs to
    Whoami(ClientOnly),
    /// Show this command line's version, the hub it talks to and who you
    /// are there
    #[command(alias = "version", alias = "about")]
    Info(ClientOnly),
    /// Print the shell completion script for bash, zsh or fish (e.g.
    /// `trellis completion bash > /etc/bash_completion.d/trellis`)
    Completion { shell: CompletionShell },
    /// Check something without changing anything
    Validate(Client<ValidateCommand>),
    /// Create a project, stage, outpost, user or key
    Create(Client<CreateCommand>),
    /// Push a build or a release
    Push(Client<PushCommand>),
    /// Add config data or a project member
    Add(Client<AddCommand>),
    /// Remove a project member
    Remove(Client<RemoveCommand>),
    /// List things
    List(ListArgs),
    /// Show one thing
    Get(GetArgs),
    /// Delete a thing: a project or stage is archived (restorable until the
    /// hub's retention period ends; --purge deletes it for good); others are
    /// refused while something depends on them, unless --force
    Delete(DeleteArgs),
    /// Bring back an archived project or stage
    Restore(Client<RestoreCommand>),
    /// Replace an outpost's URI with a new one (administrators)
    Rotate(Client<RotateCommand>),
    /// Change a project, a stage, an outpost or a user
    Update(Client<UpdateCommand>),
    /// Revoke an outpost (administrators)
    Revoke(Client<RevokeCommand>),
    /// Upload an agent binary for outposts to install and update to
    /// (administrators)
    Upload(Client<UploadCommand>),
    /// Show the connection status of an outpost stage
    Status(Client<StatusCommand>),
    /// Start a stopped component of a stage
    Start(Client<ComponentTarget>),
    /// Stop a component of a stage (it stays stopped across releases until started)
    Stop(Client<ComponentTarget>),
    /// Restart a component of a stage (starts it if it was stopped)
    Restart(Client<ComponentTarget>),
    /// Suspend a stage: every component stops; releases and settings are kept
    Suspend(Client<StageTarget>),
    /// Resume a suspended stage, or a paused (or manual) rollout
    Resume(Client<ResumeCommand>),
    /// Pause a rollout: no wave starts or is judged until it is resumed
    Pause(Client<RolloutTarget>),
    /// Abort a rollout: no further wave starts (--rollback: the stages
    /// that got its release go back to the release they ran before)
    Abort(Client<AbortCommand>),
    /// Show the log lines of a stage's components, read live from its outpost
    Logs(Client<LogsCommand>),
    /// Run a command in a component of a stage, on its outpost
    ///
    /// In a container component it runs in a container of it (the engine's
    /// exec); in a process component in its directory, with its env and
    /// user. Output, errors and the exit code come back; -i passes stdin,
    /// -t gives a terminal (raw mode, window size followed).
    Exec(ExecArgs),
    /// Reach a port of a component from here: each connection to the local
    /// port is carried to the component over the outpost's link
    #[command(name = "port-forward", alias = "local-connect")]
    PortForward(ForwardArgs),
    /// Run an Outpost Agent (on the outpost's host)
    #[command(subcommand)]
    Agent(trellis_agent::cli::AgentCommand),
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    #[command(flatten)]
    pub global: GlobalArgs,
    /// The component
    pub component: String,
    #[arg(short, long)]
    pub project: String,
    #[arg(short, long)]
    pub stage: String,
    /// Which replica (0-based; default: the first running one)
    #[arg(long)]
    pub replica: Option<u32>,
    /// Pass stdin to the command
    #[arg(short = 'i', long = "stdin")]
    pub stdin: bool,
    /// Run it under a terminal (containers)
    #[arg(short = 't', long = "tty")]
    pub tty: bool,
    /// The command and its arguments, after `--`
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ForwardArgs {
    #[command(flatten)]
    pub global: GlobalArgs,
    /// The component
    pub component: String,
    /// `[[ADDR:]LOCAL:]REMOTE`: listen on ADDR (default 127.0.0.1) port
    /// LOCAL (default REMOTE; 0: any free port) and forward to the
    /// component's port REMOTE
    pub ports: String,
    #[arg(short, long)]
    pub project: String,
    #[arg(short, long)]
    pub stage: String,
    /// Which replica (0-based; default: the first running one)
    #[arg(long)]
    pub replica: Option<u32>,
}

#[derive(Debug, Subcommand)]
pub enum StatusCommand {
    /// Link state, sync state, revisions, components and errors of a
    /// stage; without a name, how far every stage of the project (or those
    /// -l selects) has synced
    #[command(alias = "stages")]
    Stage {
        name: Option<String>,
        #[arg(short, long)]
        project: String,
        /// Only the stages whose outpost's labels match, e.g. site=munich,line!=3
        #[arg(short = 'l', long, conflicts_with = "name")]
        selector: Option<String>,
    },
    /// A rollout's waves, each stage's state and why it halted
    #[command(alias = "rollouts")]
    Rollout { id: u64 },
}

#[derive(Debug, Subcommand)]
pub enum ComponentTarget {
    #[command(alias = "components")]
    Component {
        name: String,
        #[arg(short, long)]
        project: String,
        #[arg(short, long)]
        stage: String,
        /// With `start`: a scheduled component also runs once now, outside
        /// its schedule
        #[arg(long)]
        now: bool,
        /// With `stop`: end it at once, without the grace period (SIGKILL,
        /// the container engine's kill)
        #[arg(long)]
        kill: bool,
    },
}

/// `trellis resume stage|rollout`.
#[derive(Debug, Subcommand)]
pub enum ResumeCommand {
    /// Resume a suspended stage
    #[command(alias = "stages")]
    Stage {
        name: String,
        #[arg(short, long)]
        project: String,
    },
    /// Resume a paused rollout, or start the next wave of one waiting
    /// between waves
    #[command(alias = "rollouts")]
    Rollout { id: u64 },
}

#[derive(Debug, Subcommand)]
pub enum RolloutTarget {
    #[command(alias = "rollouts")]
    Rollout { id: u64 },
}

#[derive(Debug, Subcommand)]
pub enum AbortCommand {
    #[command(alias = "rollouts")]
    Rollout {
        id: u64,
        /// Push each stage that got the release the release it ran before
        #[arg(long)]
        rollback: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum StageTarget {
    #[command(alias = "stages")]
    Stage {
        name: String,
        #[arg(short, long)]
        project: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum LogsCommand {
    /// The lines of one component
    #[command(alias = "components")]
    Component {
        name: String,
        #[arg(short, long)]
        project: String,
        #[arg(short, long)]
        stage: String,
        #[command(flatten)]
        logs: LogArgs,
    },
    /// The lines of every component of a stage
    #[command(alias = "stages")]
    Stage {
        name: String,
        #[arg(short, long)]
        project: String,
        #[command(flatten)]
        logs: LogArgs,
    },
}

/// Which lines `trellis logs` shows. Lines print as
/// `<time> <component>[<replica>] <line>`; lines written to stderr have `!`
/// before the text.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Keep printing new lines as they are written (stop with Ctrl-C)
    #[arg(short, long)]
    pub follow: bool,
    /// Only lines written since then: a duration back from now (30s, 10m,
    /// 2h, 1d, 1h30m) or a time (2024-05-01T12:00:00Z)
    #[arg(long)]
    pub since: Option<String>,
    /// At most this many of the newest lines (before following)
    #[arg(long)]
    pub tail: Option<usize>,
}

#[derive(Debug, Subcommand)]
pub enum RotateCommand {
    /// Copies of the old URI stop validating; stages already placed keep working
    #[command(name = "outpost-uri")]
    OutpostUri { outpost: String },
}

#[derive(Debug, Subcommand)]
pub enum UpdateCommand {
    /// Change a project's display name or description (owners)
    #[command(alias = "projects")]
    Project {
        name: String,
        #[arg(long)]
        display_name: Option<String>,
        #[arg(long)]
        description: Option<String>,
    },
    /// Change a stage's display name or type
    #[command(alias = "stages")]
    Stage {
        name: String,
        #[arg(short, long)]
        project: String,
        #[arg(long)]
        display_name: Option<String>,
        /// dev, qa or prod
        #[arg(short = 't', long = "type")]
        stage_type: Option<String>,
        /// Back the stage up on this cron schedule (UTC; e.g. "0 3 * * *")
        #[arg(long, requires = "backup_keep")]
        backup_schedule: Option<String>,
        /// With --backup-schedule: how many scheduled backups to keep
        #[arg(long, requires = "backup_schedule")]
        backup_keep: Option<u32>,
        /// Stop backing the stage up on a schedule (its backups are kept)
        #[arg(long, conflicts_with = "backup_schedule")]
        no_backup_schedule: bool,
    },
    /// Make a user an administrator, or no longer one
    #[command(alias = "users")]
    User {
        name: String,
        /// true or false
        #[arg(long, action = clap::ArgAction::Set)]
        admin: bool,
    },
    /// Change what is given; the rest stays
    ///
    /// With --agent-version: replace the agents of the outposts chosen (by
    /// NAME or -l SELECTOR) with that version; each agent fetches it, swaps
    /// itself and restarts, keeping its components running, and goes back
    /// to the version it ran if the new one does not link within the
    /// deadline. With --waves, like a rollout: each wave is sent once the
    /// one before it passed --success-threshold, and the rest are halted
    /// when it cannot. `trellis list outposts` shows where each update
    /// stands.
    #[command(alias = "outposts")]
    Outpost {
        /// The outpost (or -l SELECTOR with --agent-version)
        #[arg(required_unless_present = "selector")]
        name: Option<String>,
        #[arg(long, conflicts_with = "agent_version")]
        display_name: Option<String>,
        #[arg(long, conflicts_with = "agent_version")]
        description: Option<String>,
        /// The DNS name its ingresses are reachable under (`""`: back to
        /// `localhost`); every stage on it is sent its new hosts
        #[arg(long, conflicts_with = "agent_version")]
        ingress_domain: Option<String>,
        /// The outposts to update by label, e.g. site=munich,line!=3
        #[arg(short = 'l', long, requires = "agent_version", conflicts_with = "name")]
        selector: Option<String>,
        /// The agent version to run, one the hub holds (`trellis list
        /// agent-binaries`)
        #[arg(long, value_name = "VERSION")]
        agent_version: Option<String>,
        /// How long each new agent has to link back before the previous one
        /// is restored, e.g. 2m
        #[arg(long, requires = "agent_version", value_parser = parse_duration)]
        deadline: Option<std::time::Duration>,
        /// Update in waves, each size cumulative, a count or a share of
        /// the outposts, ending with 100%: e.g. 1,10%,100% (default: all at
        /// once)
        #[arg(long, requires = "agent_version")]
        waves: Option<String>,
        /// The share of a wave's online outposts that must update for the
        /// next wave to be sent (default 100%), e.g. 95%
        #[arg(long, requires = "agent_version")]
        success_threshold: Option<String>,
        /// How long a wave may take once sent (default 30m): then its
        /// outposts still under way count as not updated
        #[arg(long, requires = "agent_version", value_parser = parse_duration)]
        wave_timeout: Option<std::time::Duration>,
        /// Link profile: seconds between heartbeats on its link, 5s to 1h
        /// (`300s`, `5m`); offline detection follows it; `default` for the
        /// hub's
        #[arg(
            long,
            help_heading = "Link profile (metered networks)",
            conflicts_with = "agent_version"
        )]
        heartbeat: Option<String>,
        /// Link profile: cap on its artifact deliveries (`1MiB/s`,
        /// `512KiB/s`; `none` for no cap)
        #[arg(
            long,
            help_heading = "Link profile (metered networks)",
            conflicts_with = "agent_version"
        )]
        bandwidth: Option<String>,
        /// Link profile: hours when artifacts may move, in its time zone
        /// (`mon-fri 22:00-06:00,sat,sun`; `always` for any time).
        /// Desired states flow regardless
        #[arg(
            long,
            help_heading = "Link profile (metered networks)",
            conflicts_with = "agent_version"
        )]
        windows: Option<String>,
        /// Link profile: the IANA time zone of --windows (`Europe/Berlin`;
        /// default UTC)
        #[arg(
            long,
            help_heading = "Link profile (metered networks)",
            conflicts_with = "agent_version"
        )]
        timezone: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum RevokeCommand {
    /// Its URI stops validating and it takes no new stages
    Outpost { name: String },
}

#[derive(Debug, Subcommand)]
pub enum UploadCommand {
    /// An Outpost Agent executable (`trellis-agent`), held by the hub per
    /// version and architecture: `GET /install` installs the newest for
    /// the outpost's architecture
    AgentBinary {
        /// The executable
        file: std::path::PathBuf,
        /// The version it reports with --version (e.g. 0.1.0)
        #[arg(long = "version", value_name = "VERSION")]
        agent_version: String,
        /// Its architecture (x86_64, aarch64, arm, …; default: read from
        /// the file's ELF header)
        #[arg(long)]
        arch: Option<String>,
    },
}

/// `trellis hub [FLAGS]` runs a hub; `trellis hub reset-admin-key` works on
/// its data directory.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct HubCommand {
    #[command(subcommand)]
    pub action: Option<HubAction>,
    #[command(flatten)]
    pub run: HubArgs,
}

#[derive(Debug, Subcommand)]
pub enum HubAction {
    /// Mint a fresh administrator key and write it to `<data>/admin.key`,
    /// as at the first start (for when every administrator key is lost;
    /// works while the hub runs or is stopped, with the hub's --store)
    #[command(name = "reset-admin-key")]
    ResetAdminKey(StoreArgs),
    /// Copy a hub's whole state from its SQLite store into an empty
    /// PostgreSQL database, then run it (and more instances) there with
    /// `trellis hub --data <the same data directory> --store <URL>`
    Migrate {
        /// The hub's data directory (holding hub.db) or its SQLite file;
        /// stop that hub first
        #[arg(long)]
        from: PathBuf,
        /// postgres://USER:PASSWORD@HOST:PORT/DATABASE of an empty database
        #[arg(long)]
        to: String,
    },
}

/// Which hub's data a command works on.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// The hub's data directory
    #[arg(long, env = "TRELLIS_DATA", default_value = "trellis-data")]
    pub data: PathBuf,
    /// The hub's store, as `trellis hub --store` gives it: a
    /// postgres://USER:PASSWORD@HOST:PORT/DATABASE URL (default: SQLite in
    /// the data directory)
    #[arg(long, env = "TRELLIS_STORE")]
    pub store: Option<String>,
}

#[derive(Debug, Args)]
pub struct HubArgs {
    /// `host:port` under which users and agents reach this hub, written into
    /// Outpost URIs (default: the listen address)
    #[arg(long, env = "TRELLIS_PUBLIC_ADDRESS")]
    pub public_address: Option<String>,
    /// Data directory (database, artifacts, admin.key)
    #[arg(long, env = "TRELLIS_DATA", default_value = "trellis-data")]
    pub data: PathBuf,
    /// The store: a postgres://USER:PASSWORD@HOST:PORT/DATABASE URL, which
    /// several hubs may share (default: SQLite in the data directory)
    #[arg(long, env = "TRELLIS_STORE")]
    pub store: Option<String>,
    /// Pooled connections to PostgreSQL (default 10)
    #[arg(long)]
    pub store_connections: Option<u32>,
    /// The artifact store: s3://BUCKET[/PREFIX]?endpoint=URL[&region=R], with
    /// credentials from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (default:
    /// the directory artifacts/ in the data directory)
    #[arg(long, env = "TRELLIS_CHUNKS")]
    pub chunks: Option<String>,
    /// With a shared (PostgreSQL) store: host:port at which the other hub
    /// instances reach this one (default: the listen address)
    #[arg(long, env = "TRELLIS_INSTANCE_ADDRESS")]
    pub instance_address: Option<String>,
    /// An agent binary of this host's architecture to hold from the start,
    /// under the version it prints with --version (repeatable). Without
    /// it, a `trellis-agent` next to the `trellis` binary is offered when
    /// an outpost of this architecture asks for one and none was uploaded
    #[arg(
        long = "agent-binary",
        value_name = "PATH",
        env = "TRELLIS_AGENT_BINARY"
    )]
    pub agent_binaries: Vec<std::path::PathBuf>,
    /// With a shared (PostgreSQL) store, run the local outpost here too (one
    /// instance at a time runs it; off by default there)
    #[arg(long)]
    pub local_outpost: bool,
    /// Address to listen on
    #[arg(long, env = "TRELLIS_LISTEN", default_value = "127.0.0.1:7440")]
    pub listen: SocketAddr,
    /// Seconds between heartbeats on each outpost link (default 25)
    #[arg(long)]
    pub heartbeat_secs: Option<u64>,
    /// New outpost links admitted per second; the rest retry later (default 400)
    #[arg(long)]
    pub admissions_per_sec: Option<u32>,
    /// TLS handshakes in progress at once at most (default 64)
    #[arg(long)]
    pub max_handshakes: Option<usize>,
    /// Streams (execs, forwarded connections, console terminals) an
    /// outpost's link carries at once (default 64)
    #[arg(long)]
    pub max_streams_per_outpost: Option<usize>,
    /// Streams one user may have open at once (default 32)
    #[arg(long)]
    pub max_streams_per_user: Option<usize>,
    /// Validity of the certificates issued to agents, in seconds (default 30 days)
    #[arg(long)]
    pub cert_validity_secs: Option<u64>,
    /// How long deleted projects and stages stay archived (restorable)
    /// before they are purged, e.g. 30d, 12h
    #[arg(long, default_value = "30d", value_parser = parse_duration)]
    pub archive_retention: std::time::Duration,
    /// How the hub's local outpost runs components
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Data directory of the development hub
    #[arg(long, default_value = ".trellis-dev")]
    pub data: PathBuf,
    /// Address to listen on (loopback)
    #[arg(long, default_value = "127.0.0.1:7440")]
    pub listen: SocketAddr,
    /// Set everything up, print what to try, then stop instead of serving
    #[arg(long)]
    pub no_serve: bool,
    /// The loopback port the example app serves on (written into its
    /// manifest on the first run)
    #[arg(long, default_value_t = 7441)]
    pub example_port: u16,
    /// How the local outpost runs components
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(Debug, Subcommand)]
pub enum ValidateCommand {
    /// Check a manifest file (or a project directory) and report every problem
    Manifest {
        /// A manifest file, or a directory holding trellis.yaml / pergola.yaml|yml|json
        path: PathBuf,
    },
    /// Check an Outpost URI and describe the outpost it names
    #[command(name = "outpost-uri")]
    OutpostUri {
        uri: String,
        /// Also check that you may place stages of this project there
        #[arg(short, long)]
        project: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum CreateCommand {
    #[command(alias = "projects")]
    Project {
        name: String,
        #[arg(long, default_value = "")]
        description: String,
        /// How people see it named (default: its name)
        #[arg(long)]
        display_name: Option<String>,
    },
    #[command(alias = "stages")]
    Stage {
        name: String,
        #[arg(short, long)]
        project: String,
        /// dev, qa or prod
        #[arg(short = 't', long = "type", default_value = "dev")]
        stage_type: String,
        #[arg(long)]
        display_name: Option<String>,
        /// Place the stage on the outpost this URI names (from your administrator)
        #[arg(long)]
        outpost_uri: Option<String>,
    },
    /// Register an outpost (administrators)
    #[command(alias = "outposts")]
    Outpost {
        name: String,
        #[arg(long)]
        display_name: Option<String>,
        #[arg(long, default_value = "")]
        description: String,
        /// A label `key=value`; repeatable
        #[arg(long = "label")]
        labels: Vec<String>,
        /// How many stages it may hold
        #[arg(long)]
        max_stages: Option<u32>,
        /// The DNS name its ingresses are reachable under, with a wildcard
        /// record pointing at the outpost (`plant7.example.net` serves
        /// `<host>.<stage>.<project>.plant7.example.net`); default `localhost`
        #[arg(long)]
        ingress_domain: Option<String>,
        /// How long the printed join token stays valid, in seconds (default: 24 h)
        #[arg(long)]
        token_ttl_secs: Option<u64>,
    },
    /// A new one-time join token for an outpost's agent (administrators)
    #[command(name = "join-token")]
    JoinToken {
        outpost: String,
        /// Validity in seconds (default: 24 h)
        #[arg(long)]
        token_ttl_secs: Option<u64>,
    },
    /// Create a user and print their first key (administrators)
    #[command(alias = "users")]
    User {
        name: String,
        #[arg(long)]
        admin: bool,
    },
    /// Create another access key (for yourself, or for --user as an administrator)
    #[command(alias = "keys", alias = "access-key")]
    Key {
        #[arg(long)]
        user: Option<String>,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Roll a build out to the stages -l selects, in waves: each wave must
    /// be applied by the threshold of its online stages before the next
    /// starts, or the rollout halts (outposts offline when their wave
    /// starts get the release when they link, without counting)
    #[command(alias = "rollouts")]
    Rollout {
        #[arg(short, long)]
        project: String,
        #[arg(short, long)]
        build: String,
        /// The config (of each stage, by name) the releases take
        #[arg(short, long)]
        config: Option<String>,
        /// The stages whose outpost's labels match, e.g. site=munich,line!=3
        #[arg(short = 'l', long)]
        selector: String,
        /// Each wave's cumulative size, a count or a share of the selected
        /// stages, ending with 100%
        #[arg(long, default_value = "1,5%,25%,100%")]
        waves: String,
        /// The share of a wave's online stages that must apply the release
        #[arg(long, default_value = "100%")]
        success_threshold: String,
        /// How long a wave may take, e.g. 30m
        #[arg(long, default_value = "30m", value_parser = parse_duration)]
        wave_timeout: std::time::Duration,
        /// Wait this long between waves, e.g. 10m
        #[arg(long, value_parser = parse_duration, conflicts_with = "manual")]
        pause: Option<std::time::Duration>,
        /// Start each wave after the first only on `trellis resume rollout ID`
        #[arg(long)]
        manual: bool,
        /// Only show which stage falls in which wave; create nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Back up a stage's storage (its components' volumes); the outpost
    /// does it now, or when it is linked again
    #[command(alias = "backups")]
    Backup {
        #[arg(short, long)]
        project: String,
        #[arg(short, long)]
        stage: String,
        #[arg(long)]
        display_name: Option<String>,
        /// Wait until the backup completed or failed
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum PushCommand {
    /// Record a build from the project's git work tree (its HEAD commit):
    /// build or take each component's image, pack each `process:`
    /// directory, and upload the chunks the hub lacks
    #[command(alias = "builds")]
    Build {
        #[arg(short, long)]
        project: String,
        /// The project's directory
        #[arg(long, default_value = ".")]
        path: PathBuf,
        /// The container engine that builds, pulls and saves images (default:
        /// the first of podman, docker found on PATH; needed only when the
        /// manifest has `docker:` components)
        #[arg(long, value_enum, env = "TRELLIS_ENGINE")]
        engine: Option<EngineKind>,
        /// Pull `docker.image` images the local engine does not have
        /// (otherwise such an image is an error)
        #[arg(long)]
        pull: bool,
    },
    /// Push a release of a build (the newest by default) to a stage, or to
    /// several at once (`-s line-1 -s line-2`: all get it, or none does)
    #[command(alias = "releases")]
    Release {
        #[arg(short, long)]
        project: String,
        #[arg(short, long = "stage", required_unless_present = "selector")]
        stage: Vec<String>,
        /// Instead of -s: every stage of the project whose outpost's labels
        /// match, e.g. `-l site=munich,line!=3` or `-l 'site in (a,b)'`
        #[arg(short = 'l', long, conflicts_with = "stage")]
        selector: Option<String>,
        #[arg(short, long)]
        build: Option<String>,
        #[arg(short, long)]
        config: Option<String>,
        /// Wait until the release runs on its stage's outpost (past its
        /// health window), showing how its delivery goes; exit 1 with the
        /// reason if it fails and is rolled back, 2 at --timeout (an
        /// offline outpost keeps it pending-delivery)
        #[arg(long)]
        when_ready: bool,
        /// How long --when-ready waits, e.g. 90s, 10m
        #[arg(long, default_value = "30m", value_parser = parse_duration, requires = "when_ready")]
        timeout: std::time::Duration,
    },
}

/// A container engine's command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineKind {
    Podman,
    Docker,
}

#[derive(Debug, Subcommand)]
pub enum AddCommand {
    /// Add env values and files to a stage's config (created if needed)
    ConfigData {
        config: String,
        #[arg(short, long)]
        project: String,
        #[arg(short, long)]
        stage: String,
        /// `KEY=VALUE`; repeatable
        #[arg(long = "env")]
        env: Vec<String>,
        /// A file to add under its file name, or `NAME=PATH`; repeatable
        #[arg(long = "file")]
        files: Vec<String>,
        /// A secret env value, `KEY=VALUE`, or `KEY` to take the value of
        /// the environment variable KEY (keeping it off the command line);
        /// repeatable. Secret values are never printed without
        /// `--with-values`
        #[arg(long = "secret-env")]
        secret_env: Vec<String>,
        /// A secret file, as for --file; repeatable
        #[arg(long = "secret-file")]
        secret_files: Vec<String>,
        /// Mark a key the config already holds (an env value or a file)
        /// secret; repeatable
        #[arg(long = "secret")]
        secret: Vec<String>,
    },
    /// Add a user to a project, or change their role
    #[command(alias = "members")]
    Member {
        user: String,
        #[arg(short, long)]
        project: String,
        /// owner or member
        #[arg(long, default_value = "member")]
        role: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum RemoveCommand {
    /// Remove env values or files from a stage's config (a new version of it)
    #[command(name = "config-data")]
    ConfigData {
        config: String,
        #[arg(short, long)]
        project: String,
        #[arg(short, long)]
        stage: String,
        /// The env key or file name to remove; repeatable. (Here `--key`
        /// is the platform's, a config key: give the access key with
        /// --access-key or TRELLIS_KEY.)
        #[arg(id = "key", long = "key", required = true)]
        keys: Vec<String>,
        /// Access key `<key-id>:<secret>`
        #[arg(long = "access-key", hide_env_values = true)]
        access_key: Option<String>,
    },
    #[command(alias = "members")]
    Member {
        user: String,
        #[arg(short, long)]
        project: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    #[value(alias = "projects")]
    Project,
    #[value(alias = "stages")]
    Stage,
    #[value(alias = "builds")]
    Build,
    #[value(alias = "releases")]
    Release,
    #[value(alias = "configs")]
    Config,
    #[value(alias = "outposts")]
    Outpost,
    #[value(alias = "users")]
    User,
    #[value(alias = "keys", alias = "access-key", alias = "access-keys")]
    Key,
    #[value(alias = "members")]
    Member,
    /// An outpost's URI (`get outpost-uri NAME`)
    #[value(alias = "outpost-uris")]
    OutpostUri,
    /// The components of a stage's release, with their state
    /// (`list component -p PROJECT -s STAGE`)
    #[value(alias = "components")]
    Component,
    /// The keys and values of a stage's configs (`list config-data -p
    /// PROJECT -s STAGE [-c CONFIG] [--with-values]`)
    ConfigData,
    Audit,
    /// A backup of a stage's storage (`list backup -p PROJECT -s STAGE`)
    #[value(alias = "backups")]
    Backup,
    /// A rollout (`list rollout -p PROJECT`)
    #[value(alias = "rollouts")]
    Rollout,
    /// An agent binary the hub holds (`list agent-binary`; `delete
    /// agent-binary VERSION/ARCH`)
    #[value(alias = "agent-binaries")]
    AgentBinary,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub global: GlobalArgs,
    pub kind: Kind,
    #[arg(short, long)]
    pub project: Option<String>,
    #[arg(short, long)]
    pub stage: Option<String>,
    /// For `list key`: another user's keys (administrators)
    #[arg(long)]
    pub user: Option<String>,
    /// For `list stage` and `list outpost`: only those whose outpost's
    /// labels match, e.g. site=munich,line!=3
    #[arg(short = 'l', long)]
    pub selector: Option<String>,
    /// For `list config-data`: only this config
    #[arg(short, long)]
    pub config: Option<String>,
    /// For `list project` and `list stage`: the archived ones (deleted,
    /// restorable) instead
    #[arg(long)]
    pub archived: bool,
    /// For `list config-data` and `list config`: show secret values too
    /// (owners only)
    #[arg(long)]
    pub with_values: bool,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    #[command(flatten)]
    pub global: GlobalArgs,
    pub kind: Kind,
    /// The name (a release's number for releases)
    pub name: String,
    #[arg(short, long)]
    pub project: Option<String>,
    #[arg(short, long)]
    pub stage: Option<String>,
    /// For `get config`: show secret values too (owners only)
    #[arg(long)]
    pub with_values: bool,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    #[command(flatten)]
    pub global: GlobalArgs,
    pub kind: Kind,
    pub name: String,
    #[arg(short, long)]
    pub project: Option<String>,
    #[arg(short, long)]
    pub stage: Option<String>,
    /// Delete what depends on it too (for a project or stage: as --purge)
    #[arg(long)]
    pub force: bool,
    /// A project or stage: delete it for good at once instead of archiving
    /// it (`trellis restore` brings an archived one back until the hub's
    /// retention period ends)
    #[arg(long)]
    pub purge: bool,
}

/// `trellis restore project|stage|backup`.
#[derive(Debug, Subcommand)]
pub enum RestoreCommand {
    /// Bring an archived project back, with the stages archived with it
    #[command(alias = "projects")]
    Project { name: String },
    /// Bring an archived stage back: its outpost runs its release again,
    /// with the volumes it kept
    #[command(alias = "stages")]
    Stage {
        name: String,
        #[arg(short, long)]
        project: String,
    },
    /// Restore a backup into its stage's volumes (the stage must be
    /// suspended: `trellis suspend stage`)
    #[command(alias = "backups")]
    Backup {
        /// The backup's id (`trellis list backup` shows them)
        id: u64,
        #[arg(short, long)]
        project: String,
        #[arg(short, long)]
        stage: String,
        /// Return at once instead of waiting until the restore ends
        #[arg(long)]
        no_wait: bool,
    },
}

#[cfg(test)]
mod tests {
    /// clap's own checks of the whole grammar (one long option per name in
    /// each command, aliases that do not collide, …), which otherwise run
    /// only when a command is used.
    #[test]
    fn the_grammar_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
