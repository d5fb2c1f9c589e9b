//! The messages of the link protocol, version [`PROTOCOL_VERSION`].
//!
//! Every frame is an [`Envelope`]: `{"v": 1, "seq": 7, "msg": {"type":
//! "hello", …}}`. The message is tagged by `type` (kebab-case); fields are
//! snake_case; timestamps are RFC 3339 strings.
//!
//! Sync is level-triggered: the hub sends the latest full desired state of a
//! stage ([`Message::Desired`]), the agent persists it and only then
//! acknowledges it ([`Message::Ack`]); on reconnect the agent's
//! [`Message::Hello`] says which revisions it holds, so the hub sends only
//! what is newer. Status reports carry their own sequence numbers and are
//! acknowledged ([`Message::StatusAck`]) so the agent's outbox survives a
//! broken link.
//!
//! These types are the wire format, not the domain model: states are plain
//! strings here and are interpreted by the hub and the agent, so a new state
//! does not need a protocol version.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;

/// One frame on the link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Protocol version; see [`PROTOCOL_VERSION`].
    pub v: u16,
    /// Per-connection, per-direction frame counter, starting at 1; lets
    /// either side spot lost or reordered frames in logs.
    pub seq: u64,
    pub msg: Message,
}

impl Envelope {
    /// An envelope of the current protocol version.
    pub fn new(seq: u64, msg: Message) -> Self {
        Envelope {
            v: PROTOCOL_VERSION,
            seq,
            msg,
        }
    }
}

/// Every message either side can send. The doc of each variant says who
/// sends it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Message {
    // --- agent → hub ---
    /// Agent → hub, first frame after connecting: who the agent is, what the
    /// host offers, which revisions it holds, and where its status outbox
    /// starts.
    Hello {
        agent_version: String,
        os: String,
        arch: String,
        runtimes: Vec<RuntimeInfo>,
        capacity: Capacity,
        /// The devices the outpost offers its stages' components (absent
        /// from agents before devices).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        devices: Vec<DeviceOffer>,
        stages: Vec<StageRevision>,
        /// The sequence number of the oldest status report still in the
        /// agent's outbox (not yet acknowledged); reports from here on follow.
        outbox_from: u64,
        /// What this agent understands beyond the messages every agent of
        /// this protocol version knows ([`FEATURE_STREAMS`]); the hub sends
        /// the messages of a feature only to agents that announce it.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        features: Vec<String>,
    },
    /// Agent → hub: these desired states are persisted on the outpost.
    Ack { desired: Vec<DesiredAck> },
    /// Agent → hub: status reports, numbered so the hub can acknowledge them.
    Status {
        seq: u64,
        reports: Vec<StatusReport>,
    },
    /// Agent → hub: a CSR (PEM) for a fresh client certificate, sent well
    /// before the current one expires.
    RenewCertificate { csr_pem: String },
    /// Agent → hub: log lines answering [`Message::Logs`] request `id`.
    /// `end` says no more lines follow (the request is done, or failed with
    /// `error`).
    LogLines {
        id: u64,
        lines: Vec<LogLine>,
        #[serde(default)]
        end: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// Agent → hub: how far the delivery of a stage's revision has come
    /// (its artifacts are being fetched): `fetched` of `total` content
    /// bytes, and the `step` in words. Neither acknowledged nor kept by
    /// the agent: a newer one replaces it, and the status report of the
    /// apply ends it.
    Delivery {
        project: String,
        stage: String,
        revision: u64,
        fetched: u64,
        total: u64,
        step: String,
    },

    /// Agent → hub: stream `id` (a [`Message::StreamOpen`]) is open; the
    /// hub may send `window` bytes of data before the agent grants more.
    StreamOpened { id: u64, window: u32 },
    /// Agent → hub: how agent update `id` (a [`Message::AgentUpdate`]) to
    /// `version` goes: `fetching` and `restarting` on the way, then
    /// `applied` (the new agent linked) or `failed` (refused before anything
    /// changed, or rolled back to the agent that ran before), with the
    /// reason in `message`. The final state is kept by the agent and sent
    /// after every link-up until the hub acknowledges it
    /// ([`Message::AgentUpdateAck`]).
    AgentUpdateState {
        id: u64,
        version: String,
        state: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        message: String,
    },

    // --- hub → agent ---
    /// Hub → agent, answer to `hello`: the link is up.
    Welcome {
        hub_version: String,
        /// How often the agent should expect (and send) heartbeats.
        heartbeat_secs: u32,
        /// The hub's clock, so the agent can report clock skew.
        server_time: DateTime<Utc>,
    },
    /// Hub → agent: the complete desired state of a stage at `revision`.
    Desired {
        project: String,
        stage: String,
        revision: u64,
        /// The full desired state; the hub fills it, the agent interprets it.
        state: serde_json::Value,
    },
    /// Hub → agent: the stage was deleted; remove it from the outpost.
    Forget { project: String, stage: String },
    /// Hub → agent: status reports up to and including `up_to_seq` are
    /// stored; the agent may drop them from its outbox.
    StatusAck { up_to_seq: u64 },
    /// Hub → agent: the renewed client certificate (PEM).
    Certificate { cert_pem: String },
    /// Hub → agent: go away and reconnect after `secs` (spreads a reconnect
    /// storm, or the hub is shutting down).
    RetryAfter { secs: u32, reason: String },
    /// Hub → agent: this outpost was revoked; do not reconnect.
    Revoked { reason: String },
    /// Hub → agent: send the log lines of a stage matching `query` as
    /// [`Message::LogLines`] with this `id`. Ids are the hub's, unique per
    /// link session.
    Logs {
        id: u64,
        project: String,
        stage: String,
        query: LogQuery,
    },
    /// Hub → agent: stop sending lines for request `id` (the reader left).
    LogsCancel { id: u64 },
    /// Hub → agent (agents announcing [`FEATURE_STREAMS`]): open stream
    /// `id` to `target` in a component of a stage on the outpost. The agent
    /// may send `window` bytes of data before the hub grants more. Answered
    /// by [`Message::StreamOpened`] or [`Message::StreamClose`] with the
    /// reason. Ids are the hub's, unique per link session.
    StreamOpen {
        id: u64,
        project: String,
        stage: String,
        target: StreamTarget,
        window: u32,
    },
    /// Hub → agent: the terminal of stream `id` changed size.
    StreamResize { id: u64, cols: u16, rows: u16 },
    /// Hub → agent (agents announcing [`FEATURE_BACKUPS`]): back up the
    /// stage's volumes into backup `id`, or restore them from it. The
    /// content travels over the agent's HTTPS (mutual TLS) endpoints
    /// (`/api/v1/agent/backups/{id}/…`), which also take the outcome; the
    /// link only says what to do. Sent again after every reconnect while
    /// the work is open: the agent ignores an id it is already at, and a
    /// backup asked again resumes (the hub keeps what was uploaded).
    BackupJob {
        id: u64,
        project: String,
        stage: String,
        op: BackupOp,
    },

    /// Hub → agent (agents announcing [`FEATURE_AGENT_UPDATE`]): replace
    /// yourself with agent `version` for `arch`, the artifact whose index
    /// has digest `artifact` (fetched as chunks, like a release's), whose
    /// whole content has BLAKE3 `digest` and `size` bytes. The new agent
    /// must link back within `deadline_secs` or the old one is restored.
    /// Sent again after every reconnect while the update is open: the agent
    /// ignores an id it is already working on or has reported.
    AgentUpdate {
        id: u64,
        version: String,
        arch: String,
        artifact: String,
        digest: String,
        size: u64,
        deadline_secs: u32,
    },
    /// Hub → agent: the final state of agent update `id` is stored; stop
    /// sending it.
    AgentUpdateAck { id: u64 },
    /// Hub → agent (agents announcing [`FEATURE_LINK_PROFILE`]): the
    /// outpost's link profile as it applies now. Sent after `welcome` when
    /// the outpost has a profile, and again whenever it changes (an
    /// administrator set it; a delivery window opened or closed).
    LinkProfile {
        /// How often the agent should send (and expect) heartbeats from now
        /// on; replaces the one `welcome` gave.
        heartbeat_secs: u32,
        /// Whether artifacts may be fetched now (a delivery window is
        /// open, or the outpost has none). Desired states flow regardless.
        delivery_open: bool,
        /// When closed: when the next window opens…
        #[serde(default, skip_serializing_if = "Option::is_none")]
        opens_at: Option<DateTime<Utc>>,
        /// …and the same in words, in the outpost's time zone
        /// (`22:00 Europe/Berlin`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        opens: Option<String>,
    },

    // --- both, streams ---
    /// Either side: bytes of stream `id`. On a WebSocket this travels as a
    /// binary message ([`crate::frame`]), never as JSON; the JSON form
    /// (base64) exists for logs and tests.
    StreamData {
        id: u64,
        channel: StreamChannel,
        #[serde(with = "base64_bytes")]
        data: bytes::Bytes,
    },
    /// Either side: the receiver consumed `bytes` more of stream `id`; the
    /// sender may send that much more. `grow`: besides, the receiver's
    /// window grew by that many bytes, which the sender may send too (a
    /// peer that predates it ignores the field and keeps the window it
    /// had, which the receiver still accepts).
    StreamCredit {
        id: u64,
        bytes: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        grow: Option<u32>,
    },
    /// Either side: no more data follows from this side on stream `id`
    /// (stdin closed, a connection's write half shut).
    StreamEof { id: u64 },
    /// Either side: stream `id` is over. `exit_code`: an exec's command
    /// exited so; `error`: why it was refused or broke off.
    StreamClose {
        id: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit_code: Option<i32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<StreamError>,
    },

    // --- both ---
    /// Either side: a request could not be handled.
    Error { code: String, message: String },
}

impl Message {
    /// The message's `type` tag as it appears on the wire, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Ack { .. } => "ack",
            Message::Status { .. } => "status",
            Message::RenewCertificate { .. } => "renew-certificate",
            Message::LogLines { .. } => "log-lines",
            Message::Delivery { .. } => "delivery",
            Message::Welcome { .. } => "welcome",
            Message::Desired { .. } => "desired",
            Message::Forget { .. } => "forget",
            Message::StatusAck { .. } => "status-ack",
            Message::Certificate { .. } => "certificate",
            Message::RetryAfter { .. } => "retry-after",
            Message::Revoked { .. } => "revoked",
            Message::Logs { .. } => "logs",
            Message::LogsCancel { .. } => "logs-cancel",
            Message::StreamOpened { .. } => "stream-opened",
            Message::AgentUpdateState { .. } => "agent-update-state",
            Message::AgentUpdate { .. } => "agent-update",
            Message::AgentUpdateAck { .. } => "agent-update-ack",
            Message::StreamOpen { .. } => "stream-open",
            Message::StreamResize { .. } => "stream-resize",
            Message::BackupJob { .. } => "backup-job",
            Message::LinkProfile { .. } => "link-profile",
            Message::StreamData { .. } => "stream-data",
            Message::StreamCredit { .. } => "stream-credit",
            Message::StreamEof { .. } => "stream-eof",
            Message::StreamClose { .. } => "stream-close",
            Message::Error { .. } => "error",
        }
    }
}

/// Every `type` tag of this protocol version, so a frame of an unknown type
/// can be reported as such. A test checks it against [`Message::kind`].
pub const MESSAGE_TYPES: &[&str] = &[
    "hello",
    "ack",
    "status",
    "renew-certificate",
    "log-lines",
    "delivery",
    "welcome",
    "desired",
    "forget",
    "status-ack",
    "certificate",
    "retry-after",
    "revoked",
    "logs",
    "logs-cancel",
    "stream-opened",
    "agent-update-state",
    "agent-update",
    "agent-update-ack",
    "stream-open",
    "stream-resize",
    "backup-job",
    "link-profile",
    "stream-data",
    "stream-credit",
    "stream-eof",
    "stream-close",
    "error",
];

/// What a [`Message::BackupJob`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackupOp {
    Backup,
    Restore,
}

/// The feature an agent announces in `hello` when it makes and restores
/// backups ([`Message::BackupJob`]).
pub const FEATURE_BACKUPS: &str = "backups";

/// The feature an agent announces in `hello` when it can replace itself
/// with another version ([`Message::AgentUpdate`]): the standalone
/// `trellis-agent` binary, which owns the file it runs from.
pub const FEATURE_AGENT_UPDATE: &str = "agent-update";
/// The feature an agent announces in `hello` when it follows the link
/// profile the hub sends ([`Message::LinkProfile`]): a changed heartbeat,
/// and deliveries held back while the outpost's delivery window is closed.
pub const FEATURE_LINK_PROFILE: &str = "link-profile";

/// The feature an agent announces in `hello` when it serves streams
/// (exec, port forwarding).
pub const FEATURE_STREAMS: &str = "streams";

/// What a stream reaches on the outpost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum StreamTarget {
    /// A command run in a component: in one of its containers (the
    /// engine's exec), or for a process component in its directory, with
    /// its env and user.
    Exec {
        component: String,
        /// Which replica (0-based); the first running one when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        replica: Option<u32>,
        command: Vec<String>,
        /// Under a terminal (pseudo-terminal), its size given.
        #[serde(default)]
        tty: bool,
        #[serde(default)]
        cols: u16,
        #[serde(default)]
        rows: u16,
    },
    /// A TCP connection to one of the component's ports.
    Forward {
        component: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        replica: Option<u32>,
        port: u16,
    },
}

/// Which way stream bytes flow: `in` towards the command or connection on
/// the outpost, `out` and `err` from it (an exec's stdout and stderr; a
/// connection's bytes come on `out`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamChannel {
    In,
    Out,
    Err,
}

impl StreamChannel {
    /// Its byte in a binary frame.
    pub fn as_byte(self) -> u8 {
        match self {
            StreamChannel::In => 0,
            StreamChannel::Out => 1,
            StreamChannel::Err => 2,
        }
    }

    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(StreamChannel::In),
            1 => Some(StreamChannel::Out),
            2 => Some(StreamChannel::Err),
            _ => None,
        }
    }
}

/// Why a stream was refused or broke off, with a stable code
/// (`no-such-component`, `component-not-running`, `port-not-exposed`,
/// `too-many-streams`, …).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamError {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

mod base64_bytes {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<bytes::Bytes, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map(bytes::Bytes::from)
            .map_err(serde::de::Error::custom)
    }
}

/// A container or process runtime the agent found on its host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeInfo {
    /// e.g. `podman`, `docker`, `process`.
    pub name: String,
    pub version: String,
}

/// What the outpost's host offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    pub cpus: u32,
    pub memory_bytes: u64,
    pub disk_free_bytes: u64,
}

/// A device the outpost offers (`--device camera=/dev/video0`, `--gpu`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceOffer {
    /// What manifests name it by, e.g. `camera`.
    pub name: String,
    /// `device` (a device node of the host) or `gpu`.
    pub kind: String,
    /// The device node, for `device`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    /// The access given to it, as cgroups write it (`rw`, `r`, `rwm`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub access: String,
    /// The CDI device names of `gpu` (`nvidia.com/gpu=all`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cdi: Vec<String>,
    /// Held by at most one replica on the outpost.
    #[serde(default)]
    pub exclusive: bool,
    /// The projects whose stages may use it; empty: every project.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub projects: Vec<String>,
}

/// The revisions the agent holds for one stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageRevision {
    pub project: String,
    pub stage: String,
    /// The revision running on the outpost (0: none yet).
    pub applied_revision: u64,
    /// The newest desired revision the agent has persisted (0: none).
    pub desired_revision_held: u64,
}

/// One stage's desired revision that the agent has persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredAck {
    pub project: String,
    pub stage: String,
    pub revision: u64,
}

/// The state of one stage on the outpost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub project: String,
    pub stage: String,
    pub applied_revision: u64,
    /// The agent's view of the stage, e.g. `running`, `applying`, `failed`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default)]
    pub components: Vec<ComponentStatus>,
    #[serde(default)]
    pub errors: Vec<AgentError>,
    /// When the applied revision's release did not come up and the agent
    /// restored an earlier one: that release's number (0: the stage was
    /// emptied, there was nothing to go back to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back_to: Option<u64>,
}

/// The state of one component of a stage.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentStatus {
    pub name: String,
    /// e.g. `running`, `starting`, `stopped`, `crash-looping`, `failed`,
    /// `waiting`, `succeeded`.
    pub state: String,
    pub restarts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Replicas asked for (`scaling.min`) and running now.
    #[serde(default)]
    pub replicas: u32,
    #[serde(default)]
    pub running: u32,
    /// Since when it is in `state`, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    /// The release its workloads were made for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<u64>,
    /// Container ids or process ids of its replicas.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<String>,
    /// Scheduled components: when the last run ended and the next begins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_run: Option<DateTime<Utc>>,
    /// Why it is failed or crash-looping, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Where its ingresses are reachable through the outpost's entry point
    /// (`http://shop.dev.kasse.plant7.example.net:8080/`); empty when the
    /// outpost serves no entry point or the component has no ingress.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    /// The devices of the outpost it holds (by the names offered).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
}

/// Which log lines a [`Message::Logs`] request wants.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogQuery {
    /// One component, or every component of the stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub component: Option<String>,
    /// Only lines written at or after this instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    /// At most this many of the newest lines (before following).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail: Option<usize>,
    /// Keep sending new lines until the request is cancelled.
    #[serde(default)]
    pub follow: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    Stdout,
    Stderr,
}

/// One line a component wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    pub time: DateTime<Utc>,
    pub component: String,
    /// Replica number (0-based) for components with several.
    #[serde(default)]
    pub replica: u32,
    pub stream: LogStream,
    /// Without its line ending; invalid UTF-8 is replaced.
    pub line: String,
}

/// A de-duplicated error the agent met, including ones from while the link
/// was down.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentError {
    /// Stable code, e.g. `image-pull-failed`.
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub count: u32,
}

/// One component's standing requests in a stage's desired state
/// ([`Message::Desired`]`.state.controls.<component>`), made by `trellis
/// start|stop|restart component`. Level, not edge: an agent that hears of
/// them late (it was offline) acts on the state they describe. Fields
/// missing on the wire (hubs before them) read as their defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredControl {
    /// The component does not run until started.
    #[serde(default)]
    pub stopped: bool,
    /// With `stopped`: it was killed (`stop --kill`), so its workloads end
    /// at once (SIGKILL, the container engine's kill), without the grace
    /// period a stop gives.
    #[serde(default)]
    pub killed: bool,
    /// How many restarts were requested; a change restarts the component,
    /// and makes a scheduled one run once at once (`start --now`).
    #[serde(default)]
    pub restarts: u64,
}
