//! The command line's grammar. Verbs first, as users of comparable
//! platforms know them: `trellis create stage …`, `trellis list build …`.

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
        Client commands talk to a hub. Say which with --endpoint/--key, the \
        TRELLIS_ENDPOINT/TRELLIS_KEY environment variables, or once with `trellis login`."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args, Clone)]
pub struct GlobalArgs {
    /// The hub's address, e.g. http://127.0.0.1:7440
    #[arg(long, env = "TRELLIS_ENDPOINT", global = true)]
    pub endpoint: Option<String>,
    /// Access key `<key-id>:<secret>`
    #[arg(long, env = "TRELLIS_KEY", global = true, hide_env_values = true)]
    pub key: Option<String>,
    /// PEM file of the CA that signed the hub's certificate, when the hub
    /// uses its own CA
    #[arg(long, env = "TRELLIS_CA_CERT", global = true)]
    pub ca_cert: Option<PathBuf>,
    /// Output format of list and get
    #[arg(short = 'o', long, value_enum, default_value_t = OutputFormat::Table, global = true)]
    pub output: OutputFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a hub
    Hub(HubArgs),
    /// Run a hub on loopback with an example project, for a first look
    Dev(DevArgs),
    /// Check and remember the endpoint and key for later commands
    Login,
    /// Show who the key belongs to
    Whoami,
    /// Check something without changing anything
    #[command(subcommand)]
    Validate(ValidateCommand),
    /// Create a project, stage, outpost, user or key
    #[command(subcommand)]
    Create(CreateCommand),
    /// Push a build or a release
    #[command(subcommand)]
    Push(PushCommand),
    /// Add config data or a project member
    #[command(subcommand)]
    Add(AddCommand),
    /// Remove a project member
    #[command(subcommand)]
    Remove(RemoveCommand),
    /// List things
    List(ListArgs),
    /// Show one thing
    Get(GetArgs),
    /// Delete a thing (refused while others depend on it, unless --force)
    Delete(DeleteArgs),
    /// Replace an outpost's URI with a new one (administrators)
    #[command(subcommand)]
    Rotate(RotateCommand),
    /// Change an outpost's description or ingress domain (administrators)
    #[command(subcommand)]
    Update(UpdateCommand),
    /// Revoke an outpost (administrators)
    #[command(subcommand)]
    Revoke(RevokeCommand),
    /// Show the connection status of an outpost stage
    #[command(subcommand)]
    Status(StatusCommand),
    /// Start a stopped component of a stage
    #[command(subcommand)]
    Start(ComponentTarget),
    /// Stop a component of a stage (it stays stopped across releases until started)
    #[command(subcommand)]
    Stop(ComponentTarget),
    /// Restart a component of a stage (starts it if it was stopped)
    #[command(subcommand)]
    Restart(ComponentTarget),
    /// Suspend a stage: every component stops; releases and settings are kept
    #[command(subcommand)]
    Suspend(StageTarget),
    /// Resume a suspended stage
    #[command(subcommand)]
    Resume(StageTarget),
    /// Show the log lines of a stage's components, read live from its outpost
    #[command(subcommand)]
    Logs(LogsCommand),
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
    /// Link state, sync state, revisions, components and errors of a stage
    Stage {
        name: String,
        #[arg(short, long)]
        project: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ComponentTarget {
    Component {
        name: String,
        #[arg(short, long)]
        project: String,
        #[arg(short, long)]
        stage: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum StageTarget {
    Stage {
        name: String,
        #[arg(short, long)]
        project: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum LogsCommand {
    /// The lines of one component
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
    /// Change what is given; the rest stays
    Outpost {
        name: String,
        #[arg(long)]
        display_name: Option<String>,
        #[arg(long)]
        description: Option<String>,
        /// The DNS name its ingresses are reachable under (`""`: back to
        /// `localhost`); every stage on it is sent its new hosts
        #[arg(long)]
        ingress_domain: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum RevokeCommand {
    /// Its URI stops validating and it takes no new stages
    Outpost { name: String },
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
    Project {
        name: String,
        #[arg(long, default_value = "")]
        description: String,
    },
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
    User {
        name: String,
        #[arg(long)]
        admin: bool,
    },
    /// Create another access key (for yourself, or for --user as an administrator)
    Key {
        #[arg(long)]
        user: Option<String>,
        #[arg(long, default_value = "")]
        description: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum PushCommand {
    /// Record a build from the project's git work tree (its HEAD commit):
    /// build or take each component's image, pack each `process:`
    /// directory, and upload the chunks the hub lacks
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
    Release {
        #[arg(short, long)]
        project: String,
        #[arg(short, long = "stage", required = true)]
        stage: Vec<String>,
        #[arg(short, long)]
        build: Option<String>,
        #[arg(short, long)]
        config: Option<String>,
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
    },
    /// Add a user to a project, or change their role
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
    Member {
        user: String,
        #[arg(short, long)]
        project: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    Project,
    Stage,
    Build,
    Release,
    Config,
    Outpost,
    User,
    Key,
    Member,
    /// An outpost's URI (`get outpost-uri NAME`)
    OutpostUri,
    /// The components of a stage's release, with their state
    /// (`list component -p PROJECT -s STAGE`)
    Component,
    /// Execs, port forwards and console terminals opened into a project's
    /// stages (`list audit -p PROJECT`, owners)
    Audit,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    pub kind: Kind,
    #[arg(short, long)]
    pub project: Option<String>,
    #[arg(short, long)]
    pub stage: Option<String>,
    /// For `list key`: another user's keys (administrators)
    #[arg(long)]
    pub user: Option<String>,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    pub kind: Kind,
    /// The name (a release's number for releases)
    pub name: String,
    #[arg(short, long)]
    pub project: Option<String>,
    #[arg(short, long)]
    pub stage: Option<String>,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    pub kind: Kind,
    pub name: String,
    #[arg(short, long)]
    pub project: Option<String>,
    #[arg(short, long)]
    pub stage: Option<String>,
    /// Delete what depends on it too
    #[arg(long)]
    pub force: bool,
}
